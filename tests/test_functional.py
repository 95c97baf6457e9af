"""Specification of `bnjax.batch_norm`: the math, the state, composition with JAX transforms, errors."""

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.test_util import check_grads

from bnjax import BatchStats, batch_norm, init_batch_stats
from bnjax.moments import SHIFT_FRACTION, SPELLED_BYTES, WHOLE_MEAN_BYTES
from tests.helpers import CPU_DEVICES
from tests.tolerance import assert_trees_close


def reference_batch_norm(x, gamma, beta, mean, var, *, feature_axes, train, eps=1e-5, momentum=0.9):
  """The chapter's batch_norm in float64 NumPy, generalized to any feature axes."""
  x = np.asarray(x, np.float64)
  red = tuple(a for a in range(x.ndim) if a not in feature_axes)
  shape = [x.shape[a] if a in feature_axes else 1 for a in range(x.ndim)]
  if train:
    m = x.mean(axis=red)
    v = ((x - m.reshape(shape)) ** 2).mean(axis=red)
    new_mean, new_var = momentum * mean + (1 - momentum) * m, momentum * var + (1 - momentum) * v
  else:
    m, v, new_mean, new_var = mean, var, mean, var
  x_hat = (x - np.reshape(m, shape)) / np.sqrt(np.reshape(v, shape) + eps)
  return np.reshape(gamma, shape) * x_hat + np.reshape(beta, shape), new_mean, new_var


def random_case(rng, shape, feature_axes):
  """Input with non-zero mean and non-unit variance per feature, plus random gamma/beta."""
  fshape = tuple(shape[a] for a in feature_axes)
  bshape = [shape[a] if a in feature_axes else 1 for a in range(len(shape))]
  loc = rng.normal(0, 3, fshape).reshape(bshape)
  spread = rng.uniform(0.5, 4, fshape).reshape(bshape)
  x = (loc + spread * rng.standard_normal(shape)).astype(np.float32)
  gamma = rng.uniform(0.5, 2, fshape).astype(np.float32)
  beta = rng.normal(0, 1, fshape).astype(np.float32)
  return x, gamma, beta


SHAPES_AND_AXES = [
  ((32, 7), -1),  # the chapter's fully connected case
  ((16, 5, 6, 6), 1),  # the chapter's NCHW convolution case
  ((16, 6, 6, 5), -1),  # NHWC, the JAX default
  ((8, 9, 4), -1),  # 3-D: (batch, time, features)
  ((4, 3, 4, 5, 2), 1),  # 5-D: NCDHW
  ((8, 3, 4, 5), (1, 3)),  # several feature axes
]


@pytest.mark.parametrize("shape,axis", SHAPES_AND_AXES)
def test_matches_numpy_reference_over_several_steps_then_eval(rng, shape, axis):
  feature_axes = tuple(sorted(a % len(shape) for a in np.atleast_1d(axis)))
  fshape = tuple(shape[a] for a in feature_axes)
  stats = init_batch_stats(fshape)
  ref_mean, ref_var = np.zeros(fshape), np.ones(fshape)
  step = jax.jit(functools.partial(batch_norm, use_running_average=False, axis=axis, momentum=0.9))
  for _ in range(4):
    x, gamma, beta = random_case(rng, shape, feature_axes)
    y, stats = step(x, gamma, beta, stats)
    ref_y, ref_mean, ref_var = reference_batch_norm(
      x, gamma, beta, ref_mean, ref_var, feature_axes=feature_axes, train=True
    )
    assert_trees_close((y, stats.mean, stats.var), (ref_y, ref_mean, ref_var))

  x, gamma, beta = random_case(rng, shape, feature_axes)
  y, eval_stats = batch_norm(x, gamma, beta, stats, use_running_average=True, axis=axis)
  ref_y, _, _ = reference_batch_norm(x, gamma, beta, ref_mean, ref_var, feature_axes=feature_axes, train=False)
  assert_trees_close(y, ref_y)
  assert eval_stats is stats, "evaluation mode must return the running statistics unchanged"


def test_trailing_features_over_the_caches_match_the_reference_too(rng):
  """Past ``SPELLED_BYTES`` each deviation sum subtracts the shift for itself (no shared ``d``): same numbers."""
  shape = (64, 16, 16, 64)
  x, gamma, beta = random_case(rng, shape, (3,))
  assert x.nbytes >= SPELLED_BYTES
  y, stats = jax.jit(functools.partial(batch_norm, use_running_average=False, momentum=0.9))(
    x, gamma, beta, init_batch_stats(64)
  )
  ref_y, ref_mean, ref_var = reference_batch_norm(
    x, gamma, beta, np.zeros(64), np.ones(64), feature_axes=(3,), train=True
  )
  assert_trees_close((y, stats.mean, stats.var), (ref_y, ref_mean, ref_var))


def test_closed_form_after_one_step_from_init(rng):
  x = rng.normal(3.0, 2.0, (64, 4)).astype(np.float32)
  _, stats = batch_norm(x, None, None, init_batch_stats(4), use_running_average=False, momentum=0.9)
  assert_trees_close(stats.mean, 0.1 * x.astype(np.float64).mean(0))
  assert_trees_close(stats.var, 0.9 + 0.1 * x.astype(np.float64).var(0))


def test_train_output_has_mean_bias_and_std_scale(rng):
  x, gamma, beta = random_case(rng, (128, 6, 6, 3), (3,))
  y, _ = batch_norm(x, gamma, beta, init_batch_stats(3), use_running_average=False, epsilon=1e-8)
  y = np.asarray(y, np.float64)
  np.testing.assert_allclose(y.mean(axis=(0, 1, 2)), beta, atol=1e-5)
  np.testing.assert_allclose(y.std(axis=(0, 1, 2)), gamma, rtol=1e-4)


def test_nhwc_and_nchw_give_the_same_numbers(rng):
  x, gamma, beta = random_case(rng, (16, 4, 7, 7), (1,))
  stats = init_batch_stats(4)
  y_nchw, s_nchw = batch_norm(x, gamma, beta, stats, use_running_average=False, axis=1)
  y_nhwc, s_nhwc = batch_norm(x.transpose(0, 2, 3, 1), gamma, beta, stats, use_running_average=False, axis=-1)
  assert_trees_close((y_nhwc.transpose(0, 3, 1, 2), s_nhwc), (y_nchw, s_nchw))


def test_absent_scale_and_bias_mean_identity_and_zero(rng):
  x, _, _ = random_case(rng, (16, 5), (1,))
  stats = init_batch_stats(5)
  y_none, _ = batch_norm(x, None, None, stats, use_running_average=False)
  y_unit, _ = batch_norm(x, jnp.ones(5), jnp.zeros(5), stats, use_running_average=False)
  assert_trees_close(y_none, y_unit)


def test_training_without_running_stats_returns_none(rng):
  x, _, _ = random_case(rng, (16, 5), (1,))
  y, stats = batch_norm(x, None, None, None, use_running_average=False)
  assert stats is None and y.shape == x.shape


@pytest.mark.parametrize("fast", [False, True])
def test_unbiased_running_var_uses_n_over_n_minus_1(rng, fast):
  x = rng.normal(0, 2, (10, 3, 2)).astype(np.float32)  # n = 10 * 2 = 20 values per feature on axis 1
  _, stats = batch_norm(
    x,
    None,
    None,
    init_batch_stats(3),
    use_running_average=False,
    axis=1,
    momentum=0.0,
    unbiased_running_var=True,
    use_fast_variance=fast,
  )
  expected = x.astype(np.float64).var(axis=(0, 2), ddof=1)
  np.testing.assert_allclose(stats.var, expected, rtol=1e-5 if not fast else 1e-4)


@pytest.mark.parametrize("shape,axis", [((64, 8), -1), ((32, 3, 8, 8), 1)])
def test_gradients_match_finite_differences(rng, shape, axis):
  x, gamma, beta = random_case(rng, shape, (len(shape) - 1 if axis == -1 else axis,))
  with jax.enable_x64(True):
    x, gamma, beta = (jnp.asarray(a, jnp.float64) for a in (x, gamma, beta))
    stats = init_batch_stats(gamma.shape, jnp.float64)

    def train_out(x, gamma, beta):
      return batch_norm(x, gamma, beta, stats, use_running_average=False, axis=axis)[0]

    def eval_out(x, gamma, beta):
      return batch_norm(x, gamma, beta, stats, use_running_average=True, axis=axis)[0]

    check_grads(train_out, (x, gamma, beta), order=2, modes=("fwd", "rev"))
    check_grads(eval_out, (x, gamma, beta), order=1, modes=("rev",))


def test_gradient_of_normalized_output_sums_to_zero_per_feature(rng):
  # Batch norm's output is invariant to a per-feature shift of x, so the input gradient has zero mean.
  x, gamma, beta = random_case(rng, (32, 6), (1,))
  w = rng.standard_normal(x.shape).astype(np.float32)
  g = jax.grad(lambda x: jnp.sum(w * batch_norm(x, gamma, beta, None, use_running_average=False)[0]))(x)
  np.testing.assert_allclose(np.asarray(g).sum(0), 0.0, atol=1e-4)


@pytest.mark.parametrize("loc", [1e4, -3e4])
def test_stable_variance_acceptance_far_from_zero(rng, loc):
  """float32, per-channel mean ~1e4, std 1: relative error of the batch variance < 1e-3."""
  x = (loc + rng.standard_normal((256, 8, 8, 16))).astype(np.float32)
  exact = x.astype(np.float64).var(axis=(0, 1, 2))
  _, stats = batch_norm(x, None, None, init_batch_stats(16), use_running_average=False, momentum=0.0)
  rel = np.max(np.abs(np.asarray(stats.var, np.float64) - exact) / exact)
  assert rel < 1e-3, f"stable variance relative error {rel:.2e}"
  # The fast path is the documented opt-in that fails here; this keeps the acceptance input meaningful.
  _, fast = batch_norm(
    x, None, None, init_batch_stats(16), use_running_average=False, momentum=0.0, use_fast_variance=True
  )
  assert np.max(np.abs(np.asarray(fast.var, np.float64) - exact) / exact) > 1e-3


@pytest.mark.parametrize("masked", [False, True])
def test_gradients_far_from_zero_match_the_float64_closed_form(rng, masked):
  """float32, per-channel mean ~1e4, std 1, the first sixth of the batch (where the shift is sampled) two
  standard deviations off: the input, scale and bias gradients of the float64 closed form, padding excluded."""
  n, valid = 96, 80 if masked else 96
  x = (1e4 + rng.standard_normal((n, 8, 8, 16))).astype(np.float32)
  # Large enough that a masked input's shift is its sample's mean too (smaller ones take all valid values).
  assert x.nbytes >= WHOLE_MEAN_BYTES
  x[: n // 6] += 2.0  # the shift (the sample's mean) lies well off the batch mean: its correction matters
  x[valid:] = 1e6  # padding, excluded by the mask
  gamma, beta = rng.uniform(0.5, 2, 16).astype(np.float32), rng.normal(0, 1, 16).astype(np.float32)
  w = rng.standard_normal(x.shape).astype(np.float32)
  keep = (np.arange(n) < valid)[:, None, None, None]
  mask = keep if masked else None

  def loss(x, gamma, beta):
    y = batch_norm(x, gamma, beta, None, use_running_average=False, mask=mask)[0]
    return jnp.sum(jnp.where(keep, w * y, 0.0))

  dx, dgamma, dbeta = jax.grad(loss, argnums=(0, 1, 2))(x, gamma, beta)

  xv, wv = x[:valid].astype(np.float64), w[:valid].astype(np.float64)
  mean, var = xv.mean(axis=(0, 1, 2)), xv.var(axis=(0, 1, 2))
  xhat = (xv - mean) / np.sqrt(var + 1e-5)
  mean_w, mean_wx = wv.mean(axis=(0, 1, 2)), (wv * xhat).mean(axis=(0, 1, 2))
  dx_exact = gamma / np.sqrt(var + 1e-5) * (wv - mean_w - xhat * mean_wx)
  exact = (dx_exact, (wv * xhat).sum(axis=(0, 1, 2)), wv.sum(axis=(0, 1, 2)))
  assert_trees_close((np.asarray(dx)[:valid], dgamma, dbeta), exact, "framework")
  np.testing.assert_array_equal(np.asarray(dx)[valid:], 0.0)


@pytest.mark.parametrize("outliers", ["first slice", "whole sample"])
@pytest.mark.parametrize("axis", [-1, 1, 0], ids=["NHWC", "NCHW", "CHWN"])
def test_stable_variance_stays_accurate_when_the_slices_its_shift_is_taken_from_are_outliers(rng, axis, outliers):
  """Features far from zero at locations of their own; along the first reduced axis, the first slice (or the
  first sixth, all the shift reads) 100 std off the rest. The worst case costs a factor of at most 6 in the
  cancellation: the variance stays within 5e-5 of the exact one (a shift from the first slice alone was off
  by 6e-5 to 8e-4 on the first case)."""
  feature_axis = axis % 4
  first_reduced = 1 if feature_axis == 0 else 0
  shape = [2, 2, 2, 2]
  shape[feature_axis], shape[first_reduced] = 6, 512
  locations = np.array([1e4, -3e4, 2e4, -1e4, 5e3, 3e4], np.float64)
  x = rng.standard_normal(shape) + np.expand_dims(locations, tuple(a for a in range(4) if a != feature_axis))
  sampled = 1 if outliers == "first slice" else -(-512 // SHIFT_FRACTION)
  np.moveaxis(x, first_reduced, 0)[:sampled] += 100.0
  x = x.astype(np.float32)
  exact = x.astype(np.float64).var(axis=tuple(a for a in range(4) if a != feature_axis))
  _, stats = batch_norm(x, None, None, init_batch_stats(6), use_running_average=False, momentum=0.0, axis=axis)
  rel = np.max(np.abs(np.asarray(stats.var, np.float64) - exact) / exact)
  assert rel < 5e-5, f"stable variance relative error {rel:.2e}"


@pytest.mark.parametrize("valid", ["late padding", "early padding", "one sampled", "each feature its own"])
@pytest.mark.parametrize("axis", [-1, 0], ids=["NF", "FN"])
@pytest.mark.parametrize("n", [512, 12288], ids=["small: the whole mean", "sampled"])
def test_masked_stable_variance_stays_accurate_wherever_the_padding_is(rng, n, axis, valid):
  """With a mask the shift is the valid values' mean over the same first sixth when that holds at least a sixth of
  them, else over all of them (and over all of them for an input under WHOLE_MEAN_BYTES: this mask may vary). The
  sixth is 100 std off the rest and padding is inf: with the padding late, early (nothing valid sampled: a zero
  shift was off by a factor 100) or leaving one valid value in the sixth (a shift from it alone: off by 1e-4), or
  each feature padded its own way, the variance of the valid values stays within 5e-5."""
  assert (n * 6 * 4 < WHOLE_MEAN_BYTES) == (n == 512)
  locations = np.array([1e4, -3e4, 2e4, -1e4, 5e3, 3e4], np.float64)
  x = rng.standard_normal((n, 6)) + locations
  sampled = -(-n // SHIFT_FRACTION)
  x[:sampled] += 100.0
  rows = np.arange(n)
  masks = {
    "late padding": rows < n * 300 // 512,
    "early padding": rows >= n * 400 // 512,
    "one sampled": rows >= sampled - 1,
  }
  if valid == "each feature its own":  # features 0, 1 and 5 sample enough valid values, 2 to 4 do not
    kinds = ("late padding", "late padding", "early padding", "one sampled", "early padding", "late padding")
    mask = np.stack([masks[k] for k in kinds], 1)
  else:
    mask = masks[valid][:, None]
  mask = np.broadcast_to(mask, x.shape)
  x[~mask] = np.inf
  x = x.astype(np.float32)
  exact = np.array([x[mask[:, f], f].astype(np.float64).var() for f in range(6)])
  x, mask = (x, mask) if axis == -1 else (x.T, mask.T)
  _, stats = batch_norm(
    x, None, None, init_batch_stats(6), use_running_average=False, momentum=0.0, axis=axis, mask=mask
  )
  rel = np.max(np.abs(np.asarray(stats.var, np.float64) - exact) / exact)
  assert rel < 5e-5, f"stable variance relative error {rel:.2e}"


@pytest.mark.parametrize("rows, checks", [(256, False), (4096, True)], ids=["small", "large"])
def test_a_small_masked_input_takes_its_shift_from_all_its_valid_values_with_no_check(rng, rows, checks):
  x = rng.standard_normal((rows, 120)).astype(np.float32)
  assert (x.nbytes >= WHOLE_MEAN_BYTES) == checks
  mask = (np.arange(rows) < rows - 96)[:, None]
  bn = functools.partial(batch_norm, use_running_average=False, momentum=0.0, mask=mask)
  jaxpr = str(jax.make_jaxpr(lambda x: bn(x, None, None, init_batch_stats(120)))(x))
  assert ("cond[" in jaxpr) == checks
  _, stats = bn(x, None, None, init_batch_stats(120))
  exact = x[: rows - 96].astype(np.float64)
  assert_trees_close((stats.mean, stats.var), (exact.mean(0), exact.var(0)))


def test_masked_half_precision_reductions_when_asked_sum_the_shift_in_float32(rng):
  """force_float32_reductions=False with a mask, on a small input (its shift the mean of all its valid values):
  that mean's sum (1792 values near 50, over float16's 65504) is taken in float32, as the sample's is, so the
  statistics stay finite and within half-precision rounding."""
  x = jnp.asarray((50.0 + 2.0 * rng.standard_normal((2048, 4))).astype(np.float32), jnp.float16)
  assert x.nbytes < WHOLE_MEAN_BYTES
  valid = np.arange(2048) >= 256
  _, stats = batch_norm(
    x,
    None,
    None,
    init_batch_stats(4),
    use_running_average=False,
    momentum=0.0,
    force_float32_reductions=False,
    mask=valid[:, None],
  )
  exact = np.asarray(x, np.float64)[valid]
  assert_trees_close(
    (np.asarray(stats.mean, np.float64), np.asarray(stats.var, np.float64)), (exact.mean(0), exact.var(0)), "half"
  )


@pytest.mark.parametrize(
  "mask_shape, checked",
  [((1, 1, 1, 32), False), ((32,), False), ((1, 24, 1, 32), True)],
  ids=["per example, 4-D", "per example, right-aligned", "varies along H"],
)
def test_a_mask_constant_along_the_sampled_axis_needs_no_check_and_gives_the_same_values(rng, mask_shape, checked):
  """A per-example mask of CHWN activations (features first, examples last), given as (1, 1, 1, N) or (N,), does
  not vary along H, the axis the shift's sample is taken from: every slice holds the same share of the valid
  values, so the program carries no check (no ``cond``) and no second pass for it. A mask whose shape lets it
  vary along H is checked. The values and gradients are those of the same mask given at full size, which makes
  no such promise and is checked (to rounding: masks of other shapes are fused differently by some jax versions)."""
  x = (3.0 + rng.standard_normal((6, 24, 24, 32))).astype(np.float32)
  assert x.nbytes >= WHOLE_MEAN_BYTES  # (smaller inputs with a mask that may vary take the whole mean)
  keep = np.arange(32) < 20
  x[..., ~keep] = np.inf  # padding, which must reach nothing
  given, full = np.broadcast_to(keep, mask_shape).copy(), np.broadcast_to(keep, x.shape)
  gamma, beta = rng.standard_normal(6).astype(np.float32), rng.standard_normal(6).astype(np.float32)
  w = rng.standard_normal(x.shape).astype(np.float32)

  def loss(x, gamma, beta, mask):
    y, stats = batch_norm(x, gamma, beta, init_batch_stats(6), use_running_average=False, axis=0, mask=mask)
    return jnp.sum(jnp.where(mask, w * y, 0.0)), (y, stats)

  def conds(mask):
    return str(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, gamma, beta, mask)).count("cond[")

  assert (conds(given) > 0) == checked and conds(full) > 0
  results = [jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(x, gamma, beta, m) for m in (given, full)]
  leaves = [
    np.asarray(jnp.where(full, a, 0.0)) if a.shape == x.shape else np.asarray(a) for a in jax.tree.leaves(results[0])
  ]
  others = [
    np.asarray(jnp.where(full, a, 0.0)) if a.shape == x.shape else np.asarray(a) for a in jax.tree.leaves(results[1])
  ]
  assert_trees_close(leaves, others)
  assert all(np.all(np.isfinite(a)) for a in leaves)


@pytest.mark.parametrize("shape", [(512, 4), (64, 8, 8, 4)], ids=["dense", "folded NHWC"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_reductions_when_asked_stay_within_half_precision(rng, dtype, shape):
  """force_float32_reductions=False: the statistics are reduced in the input's dtype, on the dense and the
  folded paths, and come out within half-precision rounding of the exact ones (std 2: float16's sums of
  squared deviations stay below its 65504)."""
  x = jnp.asarray((50.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32), dtype)
  _, stats = batch_norm(
    x, None, None, init_batch_stats(4), use_running_average=False, momentum=0.0, force_float32_reductions=False
  )
  exact = np.asarray(x, np.float64).reshape(-1, 4)
  assert_trees_close(
    (np.asarray(stats.mean, np.float64), np.asarray(stats.var, np.float64)), (exact.mean(0), exact.var(0)), "half"
  )


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_reduces_in_float32_and_returns_input_dtype(rng, dtype):
  # float16 overflows at 65504: a naive sum of squares over this batch would be inf.
  x32 = (50.0 + 10.0 * rng.standard_normal((512, 4))).astype(np.float32)
  x = jnp.asarray(x32, dtype)
  y, stats = batch_norm(x, None, None, init_batch_stats(4), use_running_average=False, momentum=0.0)
  assert y.dtype == dtype and stats.mean.dtype == jnp.float32 and stats.var.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(y, np.float32))) and np.all(np.isfinite(stats.var))
  exact = np.asarray(x, np.float64)
  np.testing.assert_allclose(stats.var, exact.var(0), rtol=1e-5)
  assert_trees_close(np.asarray(y, np.float32), (exact - exact.mean(0)) / np.sqrt(exact.var(0) + 1e-5), "half")


def test_mask_excludes_padded_examples(rng):
  x, gamma, beta = random_case(rng, (12, 3, 4), (2,))
  keep = np.arange(12) < 9
  padded = x.copy()
  padded[~keep] = 1e6  # garbage in the padding must not reach the real outputs or their gradients
  mask = keep[:, None, None]
  stats = init_batch_stats(4)
  y_masked, s_masked = batch_norm(padded, gamma, beta, stats, use_running_average=False, mask=mask)
  y_real, s_real = batch_norm(x[keep], gamma, beta, stats, use_running_average=False)
  assert_trees_close((np.asarray(y_masked)[keep], s_masked), (y_real, s_real))

  w = rng.standard_normal(x.shape).astype(np.float32)
  grad_masked = jax.grad(
    lambda x: jnp.sum(jnp.where(mask, w * batch_norm(x, gamma, beta, None, use_running_average=False, mask=mask)[0], 0))
  )(padded)
  grad_real = jax.grad(lambda x: jnp.sum(w[keep] * batch_norm(x, gamma, beta, None, use_running_average=False)[0]))(
    x[keep]
  )
  assert_trees_close(np.asarray(grad_masked)[keep], grad_real, "framework")
  np.testing.assert_array_equal(np.asarray(grad_masked)[~keep], 0.0)


@pytest.mark.parametrize("fast", [False, True])
def test_axis_name_under_vmap_equals_the_flattened_batch(rng, fast):
  x, gamma, beta = random_case(rng, (4, 16, 6), (2,))  # 4 "devices" x 16 examples
  stats = init_batch_stats(6)
  bn = functools.partial(batch_norm, use_running_average=False, axis_name="devices", use_fast_variance=fast)
  y, new = jax.vmap(lambda x: bn(x, gamma, beta, stats), axis_name="devices")(x)
  y_flat, new_flat = bn(x.reshape(64, 6), gamma, beta, stats, axis_name=None)
  # The fast variance's cancellation amplifies reduction-order rounding, hence its looser tolerance.
  kind = "framework" if fast else "rounding"
  assert_trees_close(y.reshape(64, 6), y_flat, kind)
  assert_trees_close(jax.tree_util.tree_map(lambda a: a[0], new), new_flat, kind)
  w = rng.standard_normal(x.shape).astype(np.float32)
  grads = jax.grad(lambda x: jnp.sum(w * jax.vmap(lambda x: bn(x, gamma, beta, stats)[0], axis_name="devices")(x)))(x)
  grads_flat = jax.grad(lambda x: jnp.sum(w.reshape(64, 6) * bn(x, gamma, beta, stats, axis_name=None)[0]))(
    x.reshape(64, 6)
  )
  assert_trees_close(grads.reshape(64, 6), grads_flat, "framework")


def test_axis_name_with_unequal_masked_shards_weights_by_count(rng):
  x, _, _ = random_case(rng, (2, 10, 3), (2,))
  mask = np.zeros((2, 10, 1), bool)
  mask[0, :3] = True  # 3 real examples on shard 0, 10 on shard 1
  mask[1] = True
  _, new = jax.vmap(
    lambda x, m: batch_norm(
      x, None, None, init_batch_stats(3), use_running_average=False, momentum=0.0, axis_name="d", mask=m
    ),
    axis_name="d",
  )(x, mask)
  real = np.concatenate([x[0, :3], x[1]]).astype(np.float64)
  assert_trees_close((new.mean[0], new.var[0]), (real.mean(0), real.var(0)))


def test_pmap_over_host_devices_with_index_groups(rng):
  if len(CPU_DEVICES) < 4:
    pytest.fail("conftest.py should give 4 host CPU devices via XLA_FLAGS")
  x, _, _ = random_case(rng, (4, 8, 3), (2,))
  groups = [[0, 1], [2, 3]]
  _, new = jax.pmap(
    lambda x: batch_norm(
      x,
      None,
      None,
      init_batch_stats(3),
      use_running_average=False,
      momentum=0.0,
      axis_name="d",
      axis_index_groups=groups,
    ),
    axis_name="d",
    devices=CPU_DEVICES,
  )(x)
  for group in groups:
    real = x[group].reshape(-1, 3).astype(np.float64)
    for i in group:
      assert_trees_close((new.mean[i], new.var[i]), (real.mean(0), real.var(0)))


def test_shard_map_over_host_devices_equals_the_whole_batch(rng):
  from jax.sharding import Mesh
  from jax.sharding import PartitionSpec as P

  try:
    from jax import shard_map
  except ImportError:  # older jax
    from jax.experimental.shard_map import shard_map
  mesh = Mesh(np.array(CPU_DEVICES[:4]), ("batch",))
  x, gamma, beta = random_case(rng, (32, 5), (1,))

  def local(x):
    y, new = batch_norm(x, gamma, beta, init_batch_stats(5), use_running_average=False, axis_name="batch")
    return y, new

  y, new = shard_map(local, mesh=mesh, in_specs=P("batch"), out_specs=(P("batch"), P()))(x)
  assert_trees_close((y, new), batch_norm(x, gamma, beta, init_batch_stats(5), use_running_average=False))


def test_jit_grad_vmap_compose(rng):
  x, gamma, beta = random_case(rng, (3, 16, 4), (2,))  # vmap over 3 independent batches

  def loss(gamma, beta, x):
    y, new = batch_norm(x, gamma, beta, init_batch_stats(4), use_running_average=False)
    return jnp.sum(jnp.sin(y)), new

  grads, new = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1), has_aux=True), in_axes=(None, None, 0)))(gamma, beta, x)
  for i in range(3):
    g_i, new_i = jax.grad(loss, argnums=(0, 1), has_aux=True)(gamma, beta, x[i])
    assert_trees_close(jax.tree_util.tree_map(lambda a, i=i: a[i], (grads, new)), (g_i, new_i))


def test_running_stats_carry_no_gradient(rng):
  x, gamma, beta = random_case(rng, (16, 3), (1,))
  g = jax.grad(lambda x: jnp.sum(batch_norm(x, gamma, beta, init_batch_stats(3), use_running_average=False)[1].var))(x)
  np.testing.assert_array_equal(g, 0.0)


@settings(max_examples=25, deadline=None)
@given(
  shape=st.lists(st.integers(1, 5), min_size=2, max_size=5).map(tuple),
  axis_seed=st.integers(0, 10**6),
  dtype=st.sampled_from([np.float32, jnp.bfloat16]),
  seed=st.integers(0, 2**31),
)
def test_property_any_shape_axis_dtype(shape, axis_seed, dtype, seed):
  rng = np.random.default_rng(seed)
  ndim = len(shape)
  axis = int(np.random.default_rng(axis_seed).integers(-ndim, ndim))
  feature_axes = (axis % ndim,)
  if np.prod([s for i, s in enumerate(shape) if i != axis % ndim]) < 2:
    shape = (shape[0] + 1,) + shape[1:] if axis % ndim != 0 else shape[:1] + (shape[1] + 1,) + shape[2:]
  x, gamma, beta = random_case(rng, shape, feature_axes)
  x_in = jnp.asarray(x, dtype)
  stats = init_batch_stats(shape[axis])
  y, new = batch_norm(x_in, gamma, beta, stats, use_running_average=False, axis=axis, momentum=0.9)
  assert y.shape == x.shape and y.dtype == x_in.dtype
  ref_y, ref_mean, ref_var = reference_batch_norm(
    np.asarray(x_in, np.float32),
    gamma,
    beta,
    np.zeros(shape[axis]),
    np.ones(shape[axis]),
    feature_axes=feature_axes,
    train=True,
  )
  # float32 to its rounding even for a nearly constant feature (see the test below), half precision to its.
  kind = "rounding" if dtype == np.float32 else "half"
  assert_trees_close((np.asarray(y, np.float32), new.mean), (ref_y, ref_mean), kind)
  assert_trees_close(new.var, ref_var, "framework")


def test_a_nearly_constant_feature_is_normalized_to_float32_precision():
  # Two values 4.6e-4 apart at 4.55 (found by hypothesis): x - mean with the mean rounded to float32 is
  # off by up to half a unit in the last place of 4.55, a 1e-3 relative error in each deviation; the
  # mean kept as m1 + mean_d, subtracted in two steps, is not.
  x = np.array([[4.5458174], [4.5462737]], np.float32)
  gamma, beta = np.array([1.6664342], np.float32), np.array([1.0687431], np.float32)
  y, new = batch_norm(x, gamma, beta, init_batch_stats(1), use_running_average=False, momentum=0.9)
  ref_y, ref_mean, ref_var = reference_batch_norm(
    x, gamma, beta, np.zeros(1), np.ones(1), feature_axes=(1,), train=True
  )
  assert_trees_close((y, new.mean, new.var), (ref_y, ref_mean, ref_var))


# --- errors: every message names the argument, what was seen and what was expected ---------------


@pytest.mark.parametrize(
  "kwargs,error,pattern",
  [
    (dict(x=np.ones(4, np.float32)), ValueError, r"`x` has shape \(4,\) \(rank 1\).*rank >= 2"),
    (dict(x=np.array([["a", "b"]] * 4)), TypeError, r"`x` has dtype <U1.*numeric"),
    (dict(axis=2), ValueError, r"`axis` is 2.*rank 2.*\[-2, 1\]"),
    (dict(axis=(0, 1)), ValueError, r"`axis` is \(0, 1\).*every axis"),
    (dict(axis=(1, "a")), ValueError, r"`axis` is \(1, 'a'\).*int"),
    (dict(scale=np.ones(4)), ValueError, r"`scale` has shape \(4,\).*feature shape \(3,\)"),
    (dict(bias=np.ones((1, 3))), ValueError, r"`bias` has shape \(1, 3\).*feature shape \(3,\)"),
    (dict(stats=BatchStats(np.zeros(3), np.ones(2))), ValueError, r"`stats.var` has shape \(2,\)"),
    (dict(stats=(np.zeros(3), np.ones(3))), TypeError, r"`stats` is a tuple.*BatchStats"),
    (dict(momentum=1.5), ValueError, r"`momentum` is 1.5.*\[0, 1\]"),
    (dict(momentum=-0.1), ValueError, r"`momentum` is -0.1"),
    (dict(momentum=jnp.array(1.5)), ValueError, r"`momentum` is 1.5.*\[0, 1\]"),
    (dict(momentum=np.float32(-2)), ValueError, r"`momentum` is -2.0"),
    (dict(momentum="0.9"), TypeError, r"`momentum` is '0.9' \(str\).*real number"),
    (dict(momentum=jnp.ones(3)), TypeError, r"`momentum` has shape \(3,\).*real scalar"),
    (dict(epsilon=-1e-5), ValueError, r"`epsilon` is -1e-05.*>= 0"),
    (dict(epsilon=float("nan")), ValueError, r"`epsilon` is nan.*finite"),
    (dict(use_running_average=None), TypeError, r"`use_running_average` is None \(NoneType\).*bool"),
    (dict(use_running_average="False"), TypeError, r"`use_running_average` is 'False' \(str\).*bool"),
    (dict(use_running_average=0), TypeError, r"`use_running_average` is 0 \(int\).*bool"),
    (dict(use_running_average=jnp.zeros(2, bool)), TypeError, r"`use_running_average` is .*bool"),
    (dict(stats=BatchStats(np.zeros(3, np.int32), np.ones(3))), TypeError, r"`stats.mean` has dtype int32.*truncate"),
    (dict(stats=BatchStats(np.zeros(3), np.ones(3, np.int64))), TypeError, r"`stats.var` has dtype int"),
    (dict(stats=None, use_running_average=True), ValueError, r"`stats` is None.*evaluation mode"),
  ],
)
def test_bad_input_raises_a_clear_error(kwargs, error, pattern):
  args = dict(
    x=np.ones((4, 3), np.float32),
    scale=np.ones(3),
    bias=np.zeros(3),
    stats=init_batch_stats(3),
    use_running_average=False,
  )
  args.update(kwargs)
  x = args.pop("x")
  scale, bias, stats = args.pop("scale"), args.pop("bias"), args.pop("stats")
  with pytest.raises(error, match=pattern):
    batch_norm(x, scale, bias, stats, **args)


def test_checks_are_static_and_raise_under_jit():
  f = jax.jit(lambda x: batch_norm(x, jnp.ones(5), None, None, use_running_average=False))
  with pytest.raises(ValueError, match=r"`scale` has shape \(5,\)"):
    f(jnp.ones((4, 3)))


def test_batch_of_one_with_spatial_dims_is_fine_and_silent(recwarn):
  x = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
  y, _ = batch_norm(x, None, None, init_batch_stats(3), use_running_average=False, axis=1)
  assert np.all(np.isfinite(y)) and not recwarn.list


# --- trust: no silent wrong statistics (issue 8) ------------------------------------------------


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("mapper", ["vmap", "pmap"])
def test_an_all_masked_shard_adds_nothing_to_the_statistics(rng, fast, mapper):
  # A padded last batch spread over devices: shard 2 holds only padding. It must not count as an example.
  x = rng.normal(5.0, 1.0, (4, 8, 3)).astype(np.float32)
  mask = np.ones((4, 8, 1), bool)
  mask[2] = False
  x[2] = 1e6  # padding garbage must not leak either

  def step(x, m):
    return batch_norm(
      x,
      None,
      None,
      init_batch_stats(3),
      use_running_average=False,
      momentum=0.5,
      axis_name="d",
      mask=m,
      use_fast_variance=fast,
    )

  mapped = jax.vmap(step, axis_name="d") if mapper == "vmap" else jax.pmap(step, axis_name="d", devices=CPU_DEVICES)
  y, new = mapped(x, mask)
  valid = x[[0, 1, 3]].reshape(-1, 3).astype(np.float64)
  kind = "framework" if fast else "rounding"
  for i in range(4):
    assert_trees_close((new.mean[i], new.var[i]), (0.5 * valid.mean(0), 0.5 + 0.5 * valid.var(0)), kind)
  y_whole, _ = batch_norm(valid.astype(np.float32), None, None, None, use_running_average=False)
  assert_trees_close(np.asarray(y)[[0, 1, 3]].reshape(-1, 3), y_whole, kind)


@pytest.mark.parametrize("fast", [False, True])
def test_a_feature_with_no_valid_example_keeps_its_running_statistics(rng, fast):
  x = rng.normal(2.0, 3.0, (8, 3)).astype(np.float32)
  mask = np.ones((8, 3), bool)
  mask[:, 1] = False  # feature 1 never has a valid value
  stats = BatchStats(jnp.array([0.0, 0.7, 0.0]), jnp.array([1.0, 2.5, 1.0]))
  scale, bias = jnp.array([1.0, 2.0, 1.0]), jnp.array([0.0, 0.5, 0.0])
  for _ in range(3):
    y, stats = batch_norm(
      x, scale, bias, stats, use_running_average=False, momentum=0.9, mask=mask, use_fast_variance=fast
    )
  np.testing.assert_array_equal((stats.mean[1], stats.var[1]), (np.float32(0.7), np.float32(2.5)))
  np.testing.assert_array_equal(np.asarray(y)[:, 1], 0.5)  # documented: xhat = 0, so y = bias
  assert_trees_close(np.asarray(stats.mean)[[0, 2]], (1 - 0.9**3) * x[:, [0, 2]].astype(np.float64).mean(0))
  g = jax.grad(lambda x: jnp.sum(batch_norm(x, scale, bias, None, use_running_average=False, mask=mask)[0]))(x)
  np.testing.assert_array_equal(np.asarray(g)[:, 1], 0.0)
  assert np.all(np.isfinite(g))
  # An all-False mask: nothing changes at all.
  _, same = batch_norm(x, None, None, stats, use_running_average=False, mask=np.zeros((8, 1), bool))
  assert_trees_close(same, stats)


def test_float64_inputs_keep_float64_running_statistics():
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = 1e8 + rng.standard_normal((256, 3))
    stats = init_batch_stats(3, jnp.float64)
    for _ in range(50):
      _, stats = batch_norm(x, None, None, stats, use_running_average=False, momentum=0.5)
    assert stats.mean.dtype == jnp.float64 and stats.var.dtype == jnp.float64
    y, _ = batch_norm(x, None, None, stats, use_running_average=True)
    np.testing.assert_allclose(np.asarray(y).mean(0), 0.0, atol=1e-3)
    # float32 statistics are promoted by a float64 batch rather than rounded down
    _, promoted = batch_norm(x, None, None, init_batch_stats(3), use_running_average=False)
    assert promoted.mean.dtype == jnp.float64


def test_a_traced_mode_selects_between_training_and_evaluation(rng):
  x, gamma, beta = random_case(rng, (16, 4), (1,))
  stats = BatchStats(jnp.full(4, 0.3), jnp.full(4, 2.0))
  f = jax.jit(lambda x, mode: batch_norm(x, gamma, beta, stats, use_running_average=mode))
  for mode in (False, True):
    assert_trees_close(f(x, jnp.asarray(mode)), batch_norm(x, gamma, beta, stats, use_running_average=mode))
  assert_trees_close(batch_norm(x, gamma, beta, stats, use_running_average=np.bool_(True)), f(x, True))


def test_a_batch_of_one_normalizes_to_bias_silently_as_in_flax():
  x = np.arange(5.0, dtype=np.float32)[None]
  with warnings.catch_warnings():
    warnings.simplefilter("error")  # flax's own test configuration: a warning would be an error
    y, stats = batch_norm(x, None, jnp.full(5, 0.25), init_batch_stats(5), use_running_average=False, momentum=0.0)
  np.testing.assert_array_equal(y, 0.25)
  assert_trees_close(stats, BatchStats(x[0], np.zeros(5)))


@pytest.mark.parametrize("fast", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_complex_input_is_normalized_by_its_modulus_variance(rng, fast, with_mask):
  x = (rng.standard_normal((16, 3, 2)) + 1j * rng.standard_normal((16, 3, 2)) + (1 - 2j)).astype(np.complex64)
  mask = rng.random((16, 3, 1)) < 0.7 if with_mask else None
  where = np.ones(x.shape, bool) if mask is None else np.broadcast_to(mask, x.shape)
  y, stats = batch_norm(
    x, None, None, init_batch_stats(2), use_running_average=False, momentum=0.9, mask=mask, use_fast_variance=fast
  )
  assert y.dtype == jnp.complex64 and stats.mean.dtype == jnp.complex64 and stats.var.dtype == jnp.float32
  xd = x.astype(np.complex128)
  mean = xd.mean((0, 1), where=where)
  var = (np.abs(xd - mean) ** 2).mean((0, 1), where=where)
  assert_trees_close((stats.mean, stats.var), (0.1 * mean, 0.9 + 0.1 * var), "framework")
  assert_trees_close(np.asarray(y)[where], ((xd - mean) / np.sqrt(var + 1e-5))[where], "framework")
  # the closed-form derivative holds for complex input too (compared with autodiff of the formula)
  w = rng.standard_normal(x.shape).astype(np.float32)

  def loss(x):
    y = batch_norm(x, None, None, None, use_running_average=False, mask=mask)[0]
    return jnp.sum(jnp.where(where, w * jnp.abs(y) ** 2, 0.0))

  def loss_ref(x):
    m = jnp.mean(x, (0, 1), where=where)
    v = jnp.mean(jnp.abs(x - m) ** 2, (0, 1), where=where)
    return jnp.sum(jnp.where(where, w * jnp.abs((x - m) / jnp.sqrt(v + 1e-5)) ** 2, 0.0))

  g, g_ref = jax.grad(loss)(x), jax.grad(loss_ref)(x)
  assert_trees_close(np.asarray(g)[where], np.asarray(g_ref)[where], "framework")


@pytest.mark.parametrize("dtype", [np.int32, np.uint8, np.bool_])
def test_integer_and_bool_inputs_are_promoted_to_float32(rng, dtype):
  x = rng.integers(0, 2 if dtype == np.bool_ else 50, (32, 3)).astype(dtype)
  y, stats = batch_norm(x, None, None, init_batch_stats(3), use_running_average=False)
  y_float, stats_float = batch_norm(x.astype(np.float32), None, None, init_batch_stats(3), use_running_average=False)
  assert y.dtype == jnp.float32
  assert_trees_close((y, stats), (y_float, stats_float))


def test_a_repeated_axis_counts_once(rng):
  x, gamma, beta = random_case(rng, (8, 3, 4), (1,))
  stats = init_batch_stats(3)
  expected = batch_norm(x, gamma, beta, stats, use_running_average=False, axis=1)
  assert_trees_close(batch_norm(x, gamma, beta, stats, use_running_average=False, axis=(1, -2, 1)), expected)


def test_epsilon_zero_is_allowed(rng):
  x, gamma, beta = random_case(rng, (32, 3), (1,))
  y, _ = batch_norm(x, gamma, beta, init_batch_stats(3), use_running_average=False, epsilon=0.0)
  ref, _, _ = reference_batch_norm(x, gamma, beta, 0.0, 1.0, feature_axes=(1,), train=True, eps=0.0)
  assert_trees_close(y, ref, "framework")


# --- variants: frozen, ghost, renormalized BN, PyTorch's cumulative average (issue 11) -----------


def train_step(x, scale, bias, stats, **kwargs):
  return batch_norm(x, scale, bias, stats, use_running_average=False, momentum=0.9, **kwargs)


def test_frozen_statistics_normalize_by_the_batch_and_return_the_stats_unchanged(rng):
  x, gamma, beta = random_case(rng, (16, 4, 4, 5), (3,))
  stats = BatchStats(jnp.full(5, 0.3), jnp.full(5, 2.0))
  y, new = train_step(x, gamma, beta, stats, update_stats=False)
  y_default, _ = train_step(x, gamma, beta, stats)
  assert new is stats
  np.testing.assert_array_equal(y, y_default)
  loss = lambda f: lambda x, g: jnp.sum(jnp.sin(f(x, g)[0]))  # noqa: E731
  grads = jax.grad(loss(lambda x, g: train_step(x, g, beta, stats, update_stats=False)), (0, 1))(x, gamma)
  assert_trees_close(grads, jax.grad(loss(lambda x, g: train_step(x, g, beta, stats)), (0, 1))(x, gamma))


def reference_ghost(x, gamma, beta, mean, var, k, *, momentum=0.9, eps=1e-5, unbiased=False, mask=None):
  """Ghost BN over axis 0 in float64 NumPy: each group of k by itself; running stats as documented."""
  x = np.asarray(x, np.float64)
  mask = np.ones(x.shape[0], bool) if mask is None else mask
  ys, counts, means, m2s = [], [], [], []
  for start in range(0, x.shape[0], k):
    g, valid = x[start : start + k], mask[start : start + k]
    red = tuple(range(g.ndim - 1))
    n = valid.sum() * np.prod(g.shape[1:-1])
    m = g[valid].mean(axis=red) if n else np.zeros(g.shape[-1])
    v = ((g[valid] - m) ** 2).mean(axis=red) if n else np.zeros(g.shape[-1])
    ys.append(gamma * (g - m) / np.sqrt(v + eps) + beta if n else np.broadcast_to(beta, g.shape))
    counts.append(n), means.append(m), m2s.append(n * v)
  counts = np.array(counts, np.float64)[:, None]
  batch_mean = (counts * np.array(means)).sum(0) / counts.sum()
  dof = np.maximum(counts - 1, 0).sum() if unbiased else counts.sum()
  batch_var = np.array(m2s).sum(0) / dof
  return np.concatenate(ys), momentum * mean + (1 - momentum) * batch_mean, momentum * var + (1 - momentum) * batch_var


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("shape", [(12, 5), (12, 3, 3, 4)])
def test_ghost_batch_norm_normalizes_each_group_by_itself(rng, shape, unbiased):
  x, gamma, beta = random_case(rng, shape, (len(shape) - 1,))
  stats = init_batch_stats(shape[-1])
  y, new = jax.jit(functools.partial(train_step, virtual_batch_size=4, unbiased_running_var=unbiased))(
    x, gamma, beta, stats
  )
  y_ref, mean_ref, var_ref = reference_ghost(x, gamma, beta, 0.0, 1.0, 4, unbiased=unbiased)
  assert_trees_close((y, new.mean, new.var), (y_ref, mean_ref, var_ref))


def test_ghost_batch_norm_with_a_mask_drops_empty_groups_and_padding(rng):
  x, gamma, beta = random_case(rng, (12, 5), (1,))
  mask = np.array([1, 1, 0, 1, 0, 0, 0, 0, 1, 1, 1, 1], bool)  # group 2 is all padding
  y, new = train_step(x, gamma, beta, init_batch_stats(5), virtual_batch_size=4, mask=mask[:, None])
  y_ref, mean_ref, var_ref = reference_ghost(x, gamma, beta, 0.0, 1.0, 4, mask=mask)
  assert_trees_close((y[mask], new.mean, new.var), (y_ref[mask], mean_ref, var_ref))


def test_ghost_batch_norm_keeps_the_shifts_check_where_a_groups_mask_varies_along_its_sample(rng):
  """Ghost batches reshape the batch axis: a per-example mask that cannot vary along the input's features can
  vary along a group's examples, the axis its shift's sample is taken from. Each group's first 400 examples are
  padding, so a sample (its first 342) holds none: the check takes the whole valid mean instead (a zero shift
  would lose the variance of values near 1e4)."""
  x = (1e4 + rng.standard_normal((4096, 24))).astype(np.float32)
  assert x.nbytes >= WHOLE_MEAN_BYTES
  mask = np.arange(4096) % 2048 >= 400
  ones, zeros = np.ones(24, np.float32), np.zeros(24, np.float32)
  _, new = train_step(x, ones, zeros, init_batch_stats(24), virtual_batch_size=2048, mask=mask[:, None])
  _, mean_ref, var_ref = reference_ghost(x, ones, zeros, 0.0, 1.0, 2048, mask=mask)
  assert_trees_close((new.mean, new.var), (mean_ref, var_ref))


def test_one_virtual_batch_is_plain_batch_norm_and_ghost_gradients_are_per_group(rng):
  x, gamma, beta = random_case(rng, (8, 6), (1,))
  stats = init_batch_stats(6)
  assert_trees_close(train_step(x, gamma, beta, stats, virtual_batch_size=8), train_step(x, gamma, beta, stats))
  # The gradient of ghost BN is that of plain BN applied to each group separately.
  loss = lambda f: lambda x, g, b: jnp.sum(jnp.sin(f(x, g, b)))  # noqa: E731
  ghost = jax.grad(loss(lambda x, g, b: train_step(x, g, b, stats, virtual_batch_size=4)[0]), (0, 1, 2))(x, gamma, beta)
  halves = [
    jax.grad(loss(lambda x, g, b: train_step(x, g, b, stats)[0]), (0, 1, 2))(h, gamma, beta) for h in (x[:4], x[4:])
  ]
  expected = (np.concatenate([halves[0][0], halves[1][0]]), halves[0][1] + halves[1][1], halves[0][2] + halves[1][2])
  assert_trees_close(ghost, expected)
  check_grads(lambda x, g: train_step(x, g, beta, stats, virtual_batch_size=4)[0], (x, gamma), order=1, modes=["rev"])


def test_ghost_batch_norm_under_vmap_and_in_evaluation(rng):
  x, gamma, beta = random_case(rng, (3, 8, 5), (2,))  # vmap over the leading axis
  stats = init_batch_stats(5)
  ys, news = jax.vmap(lambda x: train_step(x, gamma, beta, stats, virtual_batch_size=4))(x)
  for i in range(3):
    assert_trees_close((ys[i], news.mean[i]), reference_ghost(x[i], gamma, beta, 0.0, 1.0, 4)[:2])
  # Evaluation uses the running statistics: the group size plays no part (any batch size works).
  y_eval, _ = batch_norm(x[0, :3], gamma, beta, stats, use_running_average=True, virtual_batch_size=2)
  assert_trees_close(y_eval, batch_norm(x[0, :3], gamma, beta, stats, use_running_average=True)[0])


def reference_renorm(x, gamma, beta, stats, r_max, d_max, *, eps=1e-5, momentum=0.9, renorm_momentum=0.8):
  """Ioffe (2017), Algorithm 1, in float64 NumPy over axis 0..n-2 (features last)."""
  x = np.asarray(x, np.float64)
  red = tuple(range(x.ndim - 1))
  mean, var, rm, rs = (np.asarray(getattr(stats, f), np.float64) for f in ("mean", "var", "renorm_mean", "renorm_std"))
  m = x.mean(red)
  v = ((x - m) ** 2).mean(red)
  sigma = np.sqrt(v + eps)
  r = np.clip(sigma / rs, 1 / r_max, r_max)
  d = np.clip((m - rm) / rs, -d_max, d_max)
  y = gamma * ((x - m) / sigma * r + d) + beta
  a, b = 1 - momentum, 1 - renorm_momentum  # the paper's update rate alpha
  return y, (mean + a * (m - mean), var + a * (v - var), rm + b * (m - rm), rs + b * (sigma - rs))


def test_batch_renorm_follows_the_paper_over_several_steps(rng):
  gamma, beta = rng.uniform(0.5, 2, 4), rng.normal(0, 1, 4)
  stats = init_batch_stats(4, renorm=True)
  step = jax.jit(
    lambda x, stats, clip: train_step(x, gamma, beta, stats, renorm=True, renorm_clipping=clip, renorm_momentum=0.8)
  )
  for i, clip in enumerate([(1.0, 0.0), (1.5, 0.5), (3.0, 5.0), (3.0, 5.0)]):  # a ramp, traced: one compile
    x = (rng.normal(2 * i, 1 + i, (16, 3, 3, 4))).astype(np.float32)
    y_ref, expected = reference_renorm(x, gamma, beta, stats, *clip)
    y, stats = step(x, stats, tuple(jnp.float32(c) for c in clip))
    assert_trees_close((y, (stats.mean, stats.var, stats.renorm_mean, stats.renorm_std)), (y_ref, expected))
  assert step._cache_size() == 1
  assert float(jnp.min(stats.renorm_std)) > 1.5  # the moving std did move, so r was clipped along the way


def test_batch_renorm_with_r_max_1_and_d_max_0_is_plain_batch_norm(rng):
  x, gamma, beta = random_case(rng, (16, 5), (1,))
  stats = init_batch_stats(5, renorm=True)._replace(renorm_mean=jnp.full(5, 3.0), renorm_std=jnp.full(5, 0.2))
  renorm = lambda x, g, b: train_step(x, g, b, stats, renorm=True, renorm_clipping=(1.0, 0.0))  # noqa: E731
  plain = lambda x, g, b: train_step(x, g, b, stats)  # noqa: E731
  (y_r, s_r), (y_p, s_p) = renorm(x, gamma, beta), plain(x, gamma, beta)
  assert_trees_close((y_r, s_r.mean, s_r.var), (y_p, s_p.mean, s_p.var))
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)[0]))  # noqa: E731
  assert_trees_close(
    jax.grad(loss(renorm), (0, 1, 2))(x, gamma, beta), jax.grad(loss(plain), (0, 1, 2))(x, gamma, beta)
  )


def test_batch_renorm_has_no_gradient_through_r_and_d(rng):
  x, gamma, beta = random_case(rng, (16, 5), (1,))
  stats = init_batch_stats(5, renorm=True)._replace(renorm_mean=jnp.full(5, 0.5), renorm_std=jnp.full(5, 1.5))

  def by_autodiff(x, g, b):  # the paper's forward pass, r and d held constant
    m, v = jnp.mean(x, 0), jnp.var(x, 0)
    sigma = jnp.sqrt(v + 1e-5)
    r = jax.lax.stop_gradient(jnp.clip(sigma / stats.renorm_std, 1 / 2.0, 2.0))
    d = jax.lax.stop_gradient(jnp.clip((m - stats.renorm_mean) / stats.renorm_std, -1.0, 1.0))
    return g * ((x - m) / sigma * r + d) + b

  ours = lambda x, g, b: train_step(x, g, b, stats, renorm=True, renorm_clipping=(2.0, 1.0))[0]  # noqa: E731
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a)))  # noqa: E731
  assert_trees_close(
    jax.grad(loss(ours), (0, 1, 2))(x, gamma, beta), jax.grad(loss(by_autodiff), (0, 1, 2))(x, gamma, beta)
  )


def test_batch_renorm_composes_with_a_mask_and_axis_name(rng):
  x, gamma, beta = random_case(rng, (2, 8, 4), (2,))
  stats = init_batch_stats(4, renorm=True)._replace(renorm_mean=jnp.full(4, 0.5), renorm_std=jnp.full(4, 1.5))
  mask = np.ones((2, 8, 1), bool)
  mask[1, 5:] = False
  f = lambda x, m: train_step(x, gamma, beta, stats, renorm=True, renorm_clipping=(1.2, 0.3), mask=m)  # noqa: E731
  y_sharded, s_sharded = jax.vmap(
    lambda x, m: batch_norm(
      x,
      gamma,
      beta,
      stats,
      use_running_average=False,
      momentum=0.9,
      renorm=True,
      renorm_clipping=(1.2, 0.3),
      mask=m,
      axis_name="d",
    ),
    axis_name="d",
  )(x, mask)
  y_whole, s_whole = f(x.reshape(16, 4), mask.reshape(16, 1))
  valid = mask.reshape(16)
  assert_trees_close(
    (y_sharded.reshape(16, 4)[valid], jax.tree.map(lambda a: a[0], s_sharded)), (y_whole[valid], s_whole)
  )
  y_ref, expected = reference_renorm(x.reshape(16, 4)[valid], gamma, beta, stats, 1.2, 0.3, renorm_momentum=0.99)
  assert_trees_close(
    (y_whole[valid], (s_whole.mean, s_whole.var, s_whole.renorm_mean, s_whole.renorm_std)), (y_ref, expected)
  )


def test_momentum_none_is_the_cumulative_average_with_a_batch_counter(rng):
  stats = init_batch_stats(3, num_batches_tracked=True)
  step = jax.jit(lambda x, s: batch_norm(x, None, None, s, use_running_average=False, momentum=None))
  batches = [rng.normal(i, 1 + i, (10, 3)).astype(np.float32) for i in range(4)]
  for x in batches:
    _, stats = step(x, stats)
  assert int(stats.num_batches_tracked) == 4 and stats.num_batches_tracked.dtype == jnp.int32
  # The first batch replaces the initial values (weight 1/1), then each batch weighs 1/n.
  assert_trees_close(
    (stats.mean, stats.var), (np.mean([b.mean(0) for b in batches], 0), np.mean([b.var(0) for b in batches], 0))
  )


def test_the_counter_counts_training_updates_only(rng):
  x = rng.standard_normal((6, 3)).astype(np.float32)
  stats = init_batch_stats(3, num_batches_tracked=True)
  _, stats = batch_norm(x, None, None, stats, use_running_average=False)
  _, stats = batch_norm(x, None, None, stats, use_running_average=True)
  _, stats = batch_norm(x, None, None, stats, use_running_average=False, update_stats=False)
  assert int(stats.num_batches_tracked) == 1
  _, picked = jax.jit(lambda m: batch_norm(x, None, None, stats, use_running_average=m))(jnp.array(False))
  assert int(picked.num_batches_tracked) == 2


@pytest.mark.parametrize(
  "kwargs,error,pattern",
  [
    (dict(update_stats="no"), TypeError, r"`update_stats` is 'no' \(str\).*bool"),
    (dict(virtual_batch_size=3), ValueError, r"batch axis 0 has 4 examples, not divisible by `virtual_batch_size` 3"),
    (dict(virtual_batch_size=0), ValueError, r"`virtual_batch_size` is 0.*positive"),
    (dict(virtual_batch_size=2.0), TypeError, r"`virtual_batch_size` is 2.0.*int"),
    (dict(virtual_batch_size=2, axis_name="d"), ValueError, r"`virtual_batch_size` \(2\) and `axis_name` \('d'\)"),
    (dict(renorm=True), ValueError, r"`renorm=True` needs `stats.renorm_mean`.*init_batch_stats\(..., renorm=True\)"),
    (dict(renorm_clipping=(3, 5)), ValueError, r"`renorm_clipping` is set, but `renorm` is False"),
    (dict(renorm=True, renorm_clipping=3), TypeError, r"`renorm_clipping` is 3.*pair \(r_max, d_max\)"),
    (dict(renorm=True, renorm_clipping=(0.5, 1)), ValueError, r"r_max 0.5.*>= 1"),
    (dict(renorm=True, renorm_clipping=(2, -1)), ValueError, r"d_max -1.0.*>= 0"),
    (dict(renorm=True, renorm_momentum=2.0), ValueError, r"`renorm_momentum` is 2.0"),
    (dict(momentum=None), ValueError, r"`momentum` is None.*`stats.num_batches_tracked`.*num_batches_tracked=True"),
    (dict(track_num_batches=True), ValueError, r"`track_num_batches` is True.*`stats.num_batches_tracked`"),
    (
      dict(stats=init_batch_stats(3)._replace(num_batches_tracked=jnp.zeros(()))),
      TypeError,
      r"`stats.num_batches_tracked` has shape \(\) and dtype float32.*integer scalar",
    ),
    (
      dict(stats=init_batch_stats(3)._replace(renorm_std=jnp.ones(2))),
      ValueError,
      r"`stats.renorm_std` has shape \(2,\)",
    ),
  ],
)
def test_bad_variant_options_raise_a_clear_error(kwargs, error, pattern):
  args = dict(stats=init_batch_stats(3), use_running_average=False)
  args.update(kwargs)
  stats = args.pop("stats")
  with pytest.raises(error, match=pattern):
    batch_norm(np.ones((4, 3), np.float32), np.ones(3), np.zeros(3), stats, **args)


def test_renorm_refuses_complex_input():
  x = (np.ones((4, 3)) + 1j).astype(np.complex64)
  with pytest.raises(TypeError, match=r"`renorm=True` needs a real input.*complex64"):
    batch_norm(x, None, None, init_batch_stats(3, renorm=True), use_running_average=False, renorm=True)


@pytest.mark.parametrize(
  "options",
  [
    dict(update_stats=False),
    dict(renorm=True, renorm_clipping=(1.5, 0.5)),
    dict(momentum=None, track_num_batches=True),
    dict(renorm=True, renorm_clipping=(2.0, 1.0), momentum=None, unbiased_running_var=True),
  ],
  ids=["frozen", "renorm", "cumulative", "renorm+cumulative+unbiased"],
)
def test_variants_under_jit_vmap_axis_name_and_mask_equal_the_whole_batch(rng, options):
  x, gamma, beta = random_case(rng, (4, 6, 3), (2,))
  mask = rng.random((4, 6, 1)) > 0.3
  stats = init_batch_stats(3, num_batches_tracked=True, renorm=True)._replace(
    renorm_mean=jnp.full(3, 0.4), renorm_std=jnp.full(3, 1.3)
  )
  call = functools.partial(batch_norm, scale=gamma, bias=beta, stats=stats, use_running_average=False, **options)
  sharded = jax.jit(jax.vmap(lambda x, m: call(x, mask=m, axis_name="d"), axis_name="d"))(x, mask)
  whole = call(x.reshape(24, 3), mask=mask.reshape(24, 1))
  valid = mask.reshape(24)
  assert_trees_close(sharded[0].reshape(24, 3)[valid], whole[0][valid])
  assert_trees_close(jax.tree.map(lambda a: a[0], sharded[1]), whole[1])
  loss = lambda f: lambda x: jnp.sum(jnp.where(mask, jnp.sin(f(x)), 0.0))  # noqa: E731
  g_sharded = jax.grad(
    loss(lambda x: jax.vmap(lambda x, m: call(x, mask=m, axis_name="d")[0], axis_name="d")(x, mask))
  )(x)
  g_whole = jax.grad(loss(lambda x: call(x.reshape(24, 3), mask=mask.reshape(24, 1))[0].reshape(4, 6, 3)))(x)
  assert_trees_close(g_sharded, g_whole)


def test_optional_statistics_no_option_uses_come_back_unchanged(rng):
  x = rng.standard_normal((8, 3)).astype(np.float32)
  stats = init_batch_stats(3, renorm=True)._replace(renorm_mean=jnp.full(3, 0.5))
  _, new = batch_norm(x, None, None, stats, use_running_average=False)  # renorm off in this call
  assert_trees_close((new.renorm_mean, new.renorm_std), (stats.renorm_mean, stats.renorm_std))
  _, picked = jax.jit(lambda m: batch_norm(x, None, None, stats, use_running_average=m))(jnp.array(False))
  assert jax.tree.structure(picked) == jax.tree.structure(stats)


# --- the last silent-wrong statistics (issue 17) -------------------------------------------------


@pytest.mark.parametrize("poison", [np.nan, np.inf])
def test_non_finite_padding_reaches_no_output_and_no_gradient(rng, poison):
  x = rng.normal(size=(8, 3)).astype(np.float32)
  x[6:] = poison
  mask = (np.arange(8) < 6)[:, None]

  def loss(x, scale, bias):
    y, _ = batch_norm(x, scale, bias, init_batch_stats(3), use_running_average=False, mask=mask)
    return jnp.sum(jnp.where(mask, y**2 + y, 0.0)), y

  (_, y), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(jnp.asarray(x), jnp.ones(3), jnp.zeros(3))
  clean = np.where(mask, x, 0.0)
  (_, y_clean), grads_clean = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
    jnp.asarray(clean), jnp.ones(3), jnp.zeros(3)
  )
  assert np.all(np.isfinite(np.asarray(y[6:])))  # masked outputs: finite placeholders
  assert_trees_close((y[:6], grads[0][:6], grads[1], grads[2]), (y_clean[:6], grads_clean[0][:6], *grads_clean[1:]))
  assert np.all(np.asarray(grads[0][6:]) == 0.0)


def test_cumulative_momentum_does_not_count_an_all_masked_batch(rng):
  x = rng.normal(size=(8, 3)).astype(np.float32)
  stats = init_batch_stats(3, num_batches_tracked=True)
  kwargs = dict(use_running_average=False, momentum=None)
  _, skipped = batch_norm(x, None, None, stats, mask=np.zeros((8, 1), bool), **kwargs)
  assert int(skipped.num_batches_tracked) == 0
  _, after = batch_norm(x, None, None, skipped, mask=np.ones((8, 1), bool), **kwargs)
  assert int(after.num_batches_tracked) == 1
  assert_trees_close(after.mean, x.mean(0))  # the first counted batch has weight 1, not 1/2


def test_values_whose_squares_overflow_give_an_infinite_variance_not_nan(rng):
  x = (rng.normal(size=(16, 3)) * 1e30).astype(np.float32)
  for fast in (False, True):
    y, stats = batch_norm(x, None, None, init_batch_stats(3), use_running_average=False, use_fast_variance=fast)
    assert np.all(np.isposinf(stats.var)) and np.all(np.isfinite(y)), (fast, stats.var)


@pytest.mark.parametrize(
  "call,pattern",
  [
    (dict(x=np.zeros((0, 3), np.float32)), r"`x` has shape \(0, 3\): no value to compute training-mode"),
    (dict(axis=1.0), r"`axis` is 1.0, but should be an int or a non-empty tuple of ints"),
    (dict(axis=True), r"`axis` is True, but should be an int"),
  ],
)
def test_empty_batches_and_non_integer_axes_are_clear_errors(call, pattern):
  kwargs = {"x": np.ones((4, 3), np.float32), "axis": -1, **call}
  with pytest.raises(ValueError, match=pattern):
    batch_norm(kwargs.pop("x"), None, None, init_batch_stats(3), use_running_average=False, **kwargs)


def test_an_empty_batch_is_fine_in_evaluation():
  y, _ = batch_norm(np.zeros((0, 3), np.float32), None, None, init_batch_stats(3), use_running_average=True)
  assert y.shape == (0, 3)


def test_the_nonfinite_guard_keeps_the_state_of_poisoned_features_only(rng):
  x = rng.normal(size=(8, 3)).astype(np.float32)
  x[2, 1] = np.nan  # one bad value in feature 1
  stats = init_batch_stats(3, num_batches_tracked=True)
  _, poisoned = batch_norm(x, None, None, stats, use_running_average=False, momentum=0.5)
  assert np.isnan(poisoned.mean[1]) and np.isnan(poisoned.var[1])  # the default, as in Flax and PyTorch
  _, guarded = batch_norm(x, None, None, stats, use_running_average=False, momentum=0.5, skip_nonfinite=True)
  assert guarded.mean[1] == 0.0 and guarded.var[1] == 1.0 and int(guarded.num_batches_tracked) == 1
  keep = np.array([0, 2])
  assert_trees_close((guarded.mean[keep], guarded.var[keep]), (poisoned.mean[keep], poisoned.var[keep]))
  _, none_finite = batch_norm(
    np.full((4, 3), np.inf, np.float32), None, None, stats, use_running_average=False, skip_nonfinite=True
  )
  assert int(none_finite.num_batches_tracked) == 0 and np.all(none_finite.var == 1.0)
  with pytest.raises(TypeError, match=r"`skip_nonfinite` is 1 \(int\), but should be a Python bool"):
    batch_norm(x, None, None, stats, use_running_average=False, skip_nonfinite=1)


# --- batch_norm's named steps, each on its own -----------------------------------------------------


def test_grouping_splits_the_batch_axis_and_pools_within_groups(rng):
  from bnjax.functional import Grouping

  grouping = Grouping.of((8, 5, 3), (2,), 0, 4)  # NWC, ghost groups of 4 examples
  assert grouping.shape == (2, 4, 5, 3) and grouping.group_pos == 0 and grouping.layout.feature_shape == (2, 3)
  x = rng.normal(size=(2, 20, 3))  # two groups' values per feature
  mean, var, count = x.mean(1), x.var(1), np.full((2, 3), 20.0)
  m, v, running, n = grouping.combine_groups(mean, var, count, unbiased=True)
  assert_trees_close((m, v, n), (x.mean((0, 1)), var.mean(0), np.full(3, 40.0)))
  assert_trees_close(running, (var * 20).sum(0) / 38)  # pooled, / sum (n_g - 1)
  plain, one_var = Grouping.of((8, 3), (1,), 0, None), var[0]
  assert plain.group_pos is None and plain.combine_groups(mean[0], one_var, count[0], unbiased=False)[2] is one_var


def test_update_running_stats_is_the_ema_with_counter_and_guards():
  from bnjax.functional import update_running_stats

  stats = init_batch_stats(2, num_batches_tracked=True)
  mean, var, count = jnp.array([1.0, jnp.nan]), jnp.array([4.0, 1.0]), jnp.array([3.0, 3.0])
  kwargs = dict(epsilon=1e-5, renorm=False, renorm_momentum=0.99, masked=False)
  new = update_running_stats(stats, mean, var, var, count, momentum=0.5, **kwargs)
  assert float(new.mean[0]) == 0.5 and float(new.var[0]) == 2.5 and int(new.num_batches_tracked) == 1
  guarded = update_running_stats(stats, mean, var, var, count, momentum=0.5, skip_nonfinite=True, **kwargs)
  assert float(guarded.mean[1]) == 0.0 and float(guarded.mean[0]) == 0.5
  cumulative = update_running_stats(stats, mean, var, var, count, momentum=None, **kwargs)
  assert float(cumulative.mean[0]) == 1.0  # the first batch has weight 1
