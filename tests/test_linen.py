"""`bnjax.BatchNorm` is a drop-in replacement for `flax.linen.BatchNorm`."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests.tolerance import assert_trees_close


def make_model(norm_cls, **norm_kwargs):
  class Model(nn.Module):
    """Dense/conv then batch norm twice, so the state of two layers has to line up."""

    @nn.compact
    def __call__(self, x, train: bool):
      norm = lambda: norm_cls(use_running_average=not train, momentum=0.9, **norm_kwargs)  # noqa: E731
      if x.ndim == 4:
        x = nn.Conv(4, (3, 3))(x)
      else:
        x = nn.Dense(5)(x)
      x = nn.relu(norm()(x))
      return norm()(x * 3.0 + 1.0)

  return Model()


@pytest.mark.parametrize("shape", [(16, 7), (8, 6, 6, 3)], ids=["2d", "4d"])
def test_same_outputs_and_batch_stats_as_flax_in_train_and_eval(rng, shape):
  x = (2.0 + 3.0 * rng.standard_normal(shape)).astype(np.float32)
  theirs, ours = make_model(nn.BatchNorm, use_fast_variance=False), make_model(bnjax.BatchNorm)
  variables = theirs.init(jax.random.key(0), x, train=True)
  # Same tree, same shapes, same dtypes: a checkpoint of one loads into the other.
  assert jax.tree_util.tree_structure(ours.init(jax.random.key(0), x, train=True)) == jax.tree_util.tree_structure(
    variables
  )
  # Perturb the parameters so scale/bias are not the trivial 1/0.
  variables = jax.tree_util.tree_map(lambda v: v + 0.1 * rng.standard_normal(v.shape).astype(v.dtype), variables)
  for _ in range(3):  # several steps: the running statistics must keep agreeing
    y_t, upd_t = theirs.apply(variables, x, train=True, mutable=["batch_stats"])
    y_o, upd_o = ours.apply(variables, x, train=True, mutable=["batch_stats"])
    assert_trees_close((y_o, upd_o), (y_t, upd_t))
    variables = {**variables, **upd_o}
    x = x * 1.1 + 0.3
  assert_trees_close(ours.apply(variables, x, train=False), theirs.apply(variables, x, train=False))


@pytest.mark.parametrize("with_mask", [False, True], ids=["all", "masked rows"])
def test_bit_for_bit_flax_with_flax_s_default_fast_variance(rng, with_mask):
  # Flax's own NNX-vs-linen tests compare with exact equality; with the same formula we pass them too.
  x = (2.0 + 3.0 * rng.standard_normal((10, 5))).astype(np.float32)
  mask = np.broadcast_to((np.arange(10) % 3 != 0)[:, None], x.shape) if with_mask else None
  theirs = nn.BatchNorm(use_running_average=False)
  ours = bnjax.BatchNorm(use_running_average=False, use_fast_variance=True)
  variables = theirs.init(jax.random.key(1), x)
  for _ in range(3):
    y_t, upd_t = theirs.apply(variables, x, mask=mask, mutable=["batch_stats"])
    y_o, upd_o = ours.apply(variables, x, mask=mask, mutable=["batch_stats"])
    valid = np.ones(len(x), bool) if mask is None else mask[:, 0]  # masked rows: placeholders (README)
    np.testing.assert_array_equal(y_o[valid], y_t[valid])
    jax.tree_util.tree_map(np.testing.assert_array_equal, upd_o, upd_t)
    variables, x = {**variables, **upd_o}, x * 1.1 + 0.3


def test_matches_flax_default_fast_variance_when_well_conditioned(rng):
  x = rng.standard_normal((32, 6)).astype(np.float32)
  theirs, ours = nn.BatchNorm(use_running_average=False), bnjax.BatchNorm(use_running_average=False)
  variables = theirs.init(jax.random.key(0), x)
  assert_trees_close(
    ours.apply(variables, x, mutable=["batch_stats"]), theirs.apply(variables, x, mutable=["batch_stats"])
  )


def test_constructor_fields_and_defaults_follow_flax():
  ours = {f.name: f.default for f in dataclasses.fields(bnjax.BatchNorm) if f.name not in ("parent", "name")}
  theirs = {f.name: f.default for f in dataclasses.fields(nn.BatchNorm) if f.name not in ("parent", "name")}
  assert list(ours)[: len(theirs)] == list(theirs), "flax's fields, in flax's order, come first"
  deliberate = {"use_fast_variance": False}  # documented difference: stable variance by default
  for name, default in theirs.items():
    assert ours[name] == deliberate.get(name, default), name
  assert ours["unbiased_running_var"] is False


def test_init_does_not_update_running_stats(rng):
  x = (5.0 + rng.standard_normal((8, 3))).astype(np.float32)
  variables = bnjax.BatchNorm(use_running_average=False).init(jax.random.key(0), x)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)
  np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)


def test_eval_needs_no_mutable_collection_and_changes_nothing(rng):
  x = rng.standard_normal((8, 3)).astype(np.float32)
  bn = bnjax.BatchNorm()
  variables = bn.init(jax.random.key(0), x, use_running_average=True)
  y = bn.apply(variables, x, use_running_average=True)
  assert_trees_close(y, x / np.sqrt(1.0 + 1e-5))


def test_use_running_average_must_be_given_exactly_once(rng):
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="use_running_average"):
    bnjax.BatchNorm().init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="use_running_average"):
    bnjax.BatchNorm(use_running_average=True).init(jax.random.key(0), x, use_running_average=True)


@pytest.mark.parametrize(
  "x_dtype,module_dtype,expected",
  [
    (jnp.bfloat16, None, jnp.float32),  # flax's rule: promote input with float32 params
    (jnp.bfloat16, jnp.bfloat16, jnp.bfloat16),
    (jnp.float32, jnp.bfloat16, jnp.bfloat16),
    (jnp.float16, jnp.float16, jnp.float16),
  ],
)
def test_output_dtype_follows_flax(x_dtype, module_dtype, expected):
  x = jnp.asarray(np.random.default_rng(0).normal(100.0, 5.0, (64, 4)), x_dtype)
  for cls in (bnjax.BatchNorm, nn.BatchNorm):
    bn = cls(use_running_average=False, dtype=module_dtype)
    variables = bn.init(jax.random.key(0), x)
    y, upd = bn.apply(variables, x, mutable=["batch_stats"])
    assert y.dtype == expected, cls
    assert upd["batch_stats"]["var"].dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(y, np.float32)))


def test_nchw_axis_and_no_scale_or_bias(rng):
  x = rng.standard_normal((4, 3, 5, 5)).astype(np.float32)
  bn = bnjax.BatchNorm(use_running_average=False, axis=1, use_scale=False, use_bias=False)
  variables = bn.init(jax.random.key(0), x)
  assert "params" not in variables and variables["batch_stats"]["mean"].shape == (3,)
  flax_bn = nn.BatchNorm(use_running_average=False, axis=1, use_scale=False, use_bias=False, use_fast_variance=False)
  assert_trees_close(
    bn.apply(variables, x, mutable=["batch_stats"]), flax_bn.apply(variables, x, mutable=["batch_stats"])
  )


def test_mask_matches_flax(rng):
  x = rng.standard_normal((10, 4)).astype(np.float32)
  mask = (np.arange(10) < 7)[:, None]
  ours = bnjax.BatchNorm(use_running_average=False)
  theirs = nn.BatchNorm(use_running_average=False, use_fast_variance=False)
  variables = ours.init(jax.random.key(0), x)
  (y, stats), (y_flax, stats_flax) = (m.apply(variables, x, mask=mask, mutable=["batch_stats"]) for m in (ours, theirs))
  assert_trees_close((y[:7], stats), (y_flax[:7], stats_flax))
  # Deliberate difference: Flax computes masked outputs from the padding; bnjax's are finite placeholders.
  assert np.all(np.isfinite(np.asarray(y[7:])))


def test_axis_name_is_ignored_during_init_and_used_in_apply(rng):
  x = rng.standard_normal((2, 8, 3)).astype(np.float32)
  bn = bnjax.BatchNorm(use_running_average=False, axis_name="batch", momentum=0.0)
  variables = bn.init(jax.random.key(0), x[0])  # no mapped axis exists here
  _, upd = jax.vmap(lambda x: bn.apply(variables, x, mutable=["batch_stats"]), axis_name="batch")(x)
  assert_trees_close(upd["batch_stats"]["var"][0], x.reshape(16, 3).astype(np.float64).var(0))


def test_unbiased_running_var_field(rng):
  x = rng.standard_normal((5, 2)).astype(np.float32)
  bn = bnjax.BatchNorm(use_running_average=False, momentum=0.0, unbiased_running_var=True)
  _, upd = bn.apply(bn.init(jax.random.key(0), x), x, mutable=["batch_stats"])
  assert_trees_close(upd["batch_stats"]["var"], x.astype(np.float64).var(0, ddof=1))


def test_rank_one_input_is_rejected_clearly():
  with pytest.raises(ValueError, match=r"`x` has shape \(3,\) \(rank 1\)"):
    bnjax.BatchNorm(use_running_average=False).init(jax.random.key(0), jnp.ones(3))


def test_bad_momentum_is_rejected_clearly():
  with pytest.raises(ValueError, match=r"`momentum` is 2.0"):
    bnjax.BatchNorm(use_running_average=False, momentum=2.0).init(jax.random.key(0), jnp.ones((4, 3)))


# --- Flax's own linen BatchNorm tests (google/flax tests/linen/linen_test.py), with bnjax.BatchNorm ---
# Their specification restated: normalized output of mean 0 / var 1 over the valid entries, running
# statistics after one step from init, complex input, NaN padding under a mask, two calls at init.


def _flax_spec_case(dtype, with_mask):
  key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key1, (4, 3, 2), dtype=dtype)
  m = None
  if with_mask:
    m = jax.random.randint(key2, (4, 3, 1), minval=0, maxval=2, dtype=jnp.int32).astype(jnp.bool_)
    x = jnp.where(m, x, jnp.ones_like(x) * jnp.nan)
  return key3, x, m


@pytest.mark.parametrize("with_mask", [True, False])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.complex64], ids=["real", "complex"])
def test_flax_linen_batch_norm_spec(dtype, with_mask):
  key, x, m = _flax_spec_case(dtype, with_mask)
  kwargs = {"dtype": jnp.complex64} if dtype == jnp.complex64 else {}
  bn = bnjax.BatchNorm(momentum=0.9, use_running_average=False, **kwargs)
  y, variables = bn.init_with_output(key, x, mask=m)
  np.testing.assert_allclose(y.mean((0, 1), where=m), np.zeros(2), atol=1e-4)
  np.testing.assert_allclose(y.var((0, 1), where=m), np.ones(2), rtol=1e-4)
  assert y.dtype == dtype
  _, updates = bn.apply(variables, x, mutable=["batch_stats"], mask=m)
  ema = updates["batch_stats"]
  np.testing.assert_allclose(ema["mean"], 0.1 * x.mean((0, 1), where=m), atol=1e-4)
  np.testing.assert_allclose(ema["var"], 0.9 + 0.1 * x.var((0, 1), where=m), rtol=1e-4)


def test_flax_linen_batch_norm_multi_init_spec():
  class Twice(nn.Module):
    @nn.compact
    def __call__(self, x):
      norm = bnjax.BatchNorm(name="norm", use_running_average=False, axis_name="batch")
      x = norm(x)
      return x, norm(x)

  (y1, y2), _ = Twice().init_with_output(jax.random.key(0), jax.random.normal(jax.random.key(1), (2, 4)))
  np.testing.assert_allclose(y1, y2, rtol=0.005)


# --- drop-in breaks that used to raise (issue 8) ------------------------------------------------


def test_a_batch_of_one_example_inits_and_trains_like_flax():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool, norm=bnjax.BatchNorm):
      return norm(use_running_average=not train)(nn.Dense(8)(x))

  x = jnp.ones((1, 784))
  variables = Net().init(jax.random.key(0), x, train=True)  # the common one-example init
  ours = Net().apply(variables, x, train=True, mutable=["batch_stats"])
  theirs = Net().apply(variables, x, train=True, mutable=["batch_stats"], norm=nn.BatchNorm)
  assert_trees_close(ours, theirs)


def test_float64_parameters_keep_float64_statistics_and_eval_is_centred():
  with jax.enable_x64(True):
    x = 1e8 + np.random.default_rng(0).standard_normal((256, 3))
    bn = bnjax.BatchNorm(momentum=0.5, param_dtype=jnp.float64)
    variables = bn.init(jax.random.key(0), x, use_running_average=False)
    assert variables["batch_stats"]["mean"].dtype == jnp.float64
    for _ in range(60):
      _, upd = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
      variables = {**variables, **upd}
    y = bn.apply(variables, x, use_running_average=True)
    np.testing.assert_allclose(np.asarray(y).mean(0), 0.0, atol=1e-3)


@pytest.mark.parametrize("x", [np.arange(12, dtype=np.int32).reshape(4, 3), np.eye(4, 3, dtype=bool)])
def test_integer_and_bool_inputs_are_promoted_like_flax(x):
  ours, theirs = bnjax.BatchNorm(use_running_average=False), nn.BatchNorm(use_running_average=False)
  variables = theirs.init(jax.random.key(0), x)
  y, upd = ours.apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == jnp.float32
  assert_trees_close((y, upd), theirs.apply(variables, x, mutable=["batch_stats"]))


def test_duplicated_axes_and_zero_epsilon_are_accepted_like_flax(rng):
  x = (1.0 + rng.standard_normal((8, 3, 4))).astype(np.float32)
  for kwargs in (dict(axis=(1, 1)), dict(axis=(1, -2)), dict(epsilon=0.0)):
    ours = bnjax.BatchNorm(use_running_average=False, use_fast_variance=True, **kwargs)
    theirs = nn.BatchNorm(use_running_average=False, **kwargs)
    variables = theirs.init(jax.random.key(0), x)
    assert_trees_close(
      ours.apply(variables, x, mutable=["batch_stats"]),
      theirs.apply(variables, x, mutable=["batch_stats"]),
      "framework",
    )


def test_a_traced_train_flag_under_jit(rng):
  x = rng.standard_normal((8, 3)).astype(np.float32)
  bn = bnjax.BatchNorm(momentum=0.9)
  variables = bn.init(jax.random.key(0), x, use_running_average=True)
  f = jax.jit(lambda v, x, mode: bn.apply(v, x, use_running_average=mode, mutable=["batch_stats"]))
  for mode in (False, True):
    expected = bn.apply(variables, x, use_running_average=mode, mutable=["batch_stats"])
    if mode:
      expected = (expected[0], {"batch_stats": variables["batch_stats"]})
    assert_trees_close(f(variables, x, jnp.asarray(mode)), expected)


def test_a_string_mode_is_rejected():
  with pytest.raises(TypeError, match=r"`use_running_average` is 'False' \(str\)"):
    bnjax.BatchNorm(use_running_average="False").init(jax.random.key(0), jnp.ones((4, 3)))


# --- variants (issue 11): each is one field, and the module gives the function's numbers ---------


def test_update_stats_false_trains_with_batch_statistics_and_keeps_the_running_ones(rng):
  x = rng.standard_normal((8, 4)).astype(np.float32) * 2 + 1
  layer = bnjax.BatchNorm(use_running_average=False, update_stats=False)
  variables = layer.init(jax.random.key(0), x)
  y, updates = layer.apply(variables, x, mutable=["batch_stats"])
  assert_trees_close(updates["batch_stats"], variables["batch_stats"])
  assert_trees_close(y, bnjax.BatchNorm(use_running_average=False).apply(variables, x, mutable=["batch_stats"])[0])


@pytest.mark.parametrize(
  "fields,stat_names",
  [
    (dict(), {"mean", "var"}),
    (dict(virtual_batch_size=4), {"mean", "var"}),
    (dict(renorm=True, renorm_clipping=(2.0, 1.0), renorm_momentum=0.9), {"mean", "var", "renorm_mean", "renorm_std"}),
    (dict(momentum=None), {"mean", "var", "num_batches_tracked"}),
    (bnjax.pytorch_preset(), {"mean", "var", "num_batches_tracked"}),
  ],
)
def test_each_variant_is_a_field_and_matches_the_function(rng, fields, stat_names):
  x = (rng.standard_normal((8, 3, 3, 5)) * 2 + 1).astype(np.float32)
  layer = bnjax.BatchNorm(**{"momentum": 0.9, **fields})
  variables = layer.init(jax.random.key(0), x, use_running_average=False)
  assert set(variables["batch_stats"]) == stat_names
  y, updates = layer.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  stats = bnjax.BatchStats(**variables["batch_stats"])
  kwargs = {"momentum": 0.9, **fields}
  y_f, new = bnjax.batch_norm(
    x, variables["params"]["scale"], variables["params"]["bias"], stats, use_running_average=False, **kwargs
  )
  assert_trees_close(y, y_f)
  assert_trees_close(updates["batch_stats"], {k: v for k, v in new._asdict().items() if v is not None})


def test_a_renorm_clipping_schedule_is_a_traced_call_argument(rng):
  x = (rng.standard_normal((8, 5)) * 3 + 2).astype(np.float32)
  layer = bnjax.BatchNorm(use_running_average=False, renorm=True)
  variables = layer.init(jax.random.key(0), x)
  step = jax.jit(lambda v, clip: layer.apply(v, x, renorm_clipping=clip, mutable=["batch_stats"])[0])
  for r_max in (1.0, 2.0, 3.0):
    expected = layer.clone(renorm_clipping=(r_max, r_max)).apply(variables, x, mutable=["batch_stats"])[0]
    assert_trees_close(step(variables, (jnp.float32(r_max), jnp.float32(r_max))), expected)
  assert step._cache_size() == 1


def test_flax_defaults_create_no_extra_statistics():
  variables = bnjax.BatchNorm(use_running_average=True).init(jax.random.key(0), jnp.ones((2, 3)))
  assert set(variables["batch_stats"]) == {"mean", "var"}


def test_the_nonfinite_guard_is_a_field_as_in_the_function():
  x = np.ones((4, 2), np.float32)
  x[:, 0] = [1.0, 2.0, np.inf, 3.0]
  bn = bnjax.BatchNorm(momentum=0.5, skip_nonfinite=True)
  variables = bn.init(jax.random.key(0), x, use_running_average=False)
  _, updates = bn.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
  assert float(updates["batch_stats"]["mean"][0]) == 0.0 and float(updates["batch_stats"]["mean"][1]) == 0.5
