"""Per-feature batch moments: the stable shifted form, the fast form, and their
combination across a mapped axis in one collective.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from bnjax.layout import Layout
from bnjax.state import real_dtype


def _abs2(v: jax.Array) -> jax.Array:
  """``|v|^2``, real: ``v * v`` for real arrays, ``re(v conj(v))`` for complex ones."""
  if jnp.iscomplexobj(v):
    return jnp.real(v * jnp.conj(v))
  return v * v


def local_moments(x, layout: Layout, mask, mask_uniform_axes: tuple[int, ...] = ()):
  """Per-feature (count, mean, M2 = sum of squared deviations) of this shard (see ``_shifted_moments``)."""
  count, m1, mean_d, m2 = _shifted_moments(x, layout, mask, mask_uniform_axes)
  return count, m1 + mean_d, m2


def _shifted_moments(x, layout: Layout, mask, mask_uniform_axes: tuple[int, ...] = ()):
  """Per-feature (count, m1, mean_d, M2 = sum of squared deviations) of this shard: the mean is ``m1 + mean_d``.

  Shifted form: the deviations ``d = x - m1`` from a shift ``m1`` near the mean give the mean's remainder
  ``mean_d`` and the variance ``E[d^2] - mean_d^2``. The values of ``d`` are of the order of the spread, so
  nothing large is ever squared: float32 variance stays accurate for e.g. mean 1e4, std 1, where
  ``E[x^2] - E[x]^2`` loses all digits. ``m1`` is the mean of a sample of ``x`` (:func:`_sample_mean`, a
  sixth of it; with a mask, :func:`_masked_sample_mean`), so no full pass goes to a first mean before the sums
  of ``d`` (:func:`_deviation_sums`), but for a small masked input, whose shift is its mean. The cancellation in
  ``E[d^2] - mean_d^2`` costs a factor ``1 + (m1 - mean)^2 / var`` of float32 precision: at most 6 whatever the
  data (and mask), about 1 typically.

  With a mask the count may be 0 (a fully padded shard or feature): then mean and M2 are 0 and the
  count stays 0, so the shard drops out of any combination by counts. ``mask_uniform_axes``: axes of ``x``
  along which the mask is known not to vary (from its shape before broadcasting).

  The mean is returned in two parts because ``x - mean`` is best computed as ``(x - m1) - mean_d``: the
  rounded sum ``m1 + mean_d`` is off by up to half a unit in the last place of the data's magnitude, which
  for a nearly constant feature (spread 1e-4 at 4.5) is a 1e-3 relative error in every deviation.
  """
  if mask is None:
    count = jnp.asarray(float(layout.count), real_dtype(x.dtype))
    m1 = lax.stop_gradient(_sample_mean(x, layout))
    sum_d, sum_d2 = _deviation_sums(x, m1, layout)
    mean_d, mean_d2 = sum_d / count, sum_d2 / count
  else:
    count = layout.sum(mask.astype(real_dtype(x.dtype)))
    safe = jnp.maximum(count, 1.0)
    m1 = lax.stop_gradient(_masked_sample_mean(x, mask, count, layout, mask_uniform_axes))
    # Zero the masked positions before squaring so padding (even inf) never leaks into values or grads.
    d = jnp.where(mask, x - layout.expand(m1), 0.0)
    mean_d = layout.sum(d) / safe
    mean_d2 = layout.sum(_abs2(d)) / safe
  # Values so large that their squares overflow: the variance is inf (inf - inf would say NaN), as in Flax.
  var = jnp.where(jnp.isinf(mean_d2), mean_d2, jnp.maximum(mean_d2 - _abs2(mean_d), 0.0))
  return count, m1, mean_d, var * count


def _deviation_sums(x, m1, layout: Layout) -> tuple[jax.Array, jax.Array]:
  """Per-feature ``(sum(d), sum(|d|^2))`` of ``d = x - m1``.

  Where a few trailing features are folded (see :class:`Layout`), or trailing features span at least
  ``SPELLED_BYTES`` (in the reduction dtype: too large for the caches), each sum subtracts for itself, in its view
  (folded: ``(rows / k, k * F)``, where the shift is a tiled row): XLA:CPU writes out any full-size value, even a
  broadcast, that two of its library-fused reductions share, so one ``d`` for both cost a write and two reads
  (256x8x8x16: 168 us against 107 us for both sums; 128x56x56x64: about 5% of the forward and backward). ``d``
  is spelled twice for that, equal bit for bit: ``x + (-m1)`` and ``x - barrier(m1)``. Smaller trailing
  features (256x84 5% faster, 256x2048 3%) and every other layout, whatever its size, share one ``d`` (LeNet's
  first BN, CHWN 6x24x24x256: 0.3 ms against 0.5 ms a step).
  """
  spelled = layout.fold > 1 or (layout.flat and x.size * x.dtype.itemsize >= SPELLED_BYTES)
  if not spelled:
    d = x - layout.expand(m1)
    return layout.sum(d), layout.sum(_abs2(d))
  view, shift = layout.view(x), layout.per_feature_to_view(m1)
  sum_d = layout.sum_view(view + (-shift))
  sum_d2 = layout.sum_view(_abs2(view - lax.optimization_barrier(shift)))
  return sum_d, sum_d2


# Trailing features over at least this many bytes: the deviation sums subtract each for itself (one shared d
# measured faster at 256x2048, 2 MB, and slower at 64x14x14x128, 6.4 MB, and at 128x56x56x64).
SPELLED_BYTES = 4 * 2**20


# The shift is the mean of the first 1/SHIFT_FRACTION of the slices along the first reduced axis.
SHIFT_FRACTION = 6


def _sample(a, layout: Layout):
  """The sample the shift is taken from: the first ``ceil(n / SHIFT_FRACTION)`` of the ``n`` slices of a
  working-shape ``a`` (the input, or its mask) along its first reduction axis."""
  axis = layout.reduction_axes[0]
  return lax.slice_in_dim(a, 0, -(-a.shape[axis] // SHIFT_FRACTION), axis=axis)


def _sample_mean(x, layout: Layout):
  """Per-feature mean of the first ``ceil(n / SHIFT_FRACTION)`` of the ``n`` slices of ``x`` along its first
  reduction axis (the first sixth of the images of NHWC, of the rows of every image of CHWN): a shift near
  the feature's mean from a sixth of ``x``.

  Any sample holding a fraction ``f`` of the values differs from the mean by at most ``sqrt((1 - f) / f)``
  standard deviations (its share of the between-group variance), so the shift costs the variance a factor
  ``1 + (m1 - mean)^2 / var <= 1 / f <= SHIFT_FRACTION`` of float32 precision, whatever the data.
  """
  axis = layout.reduction_axes[0]
  if x.shape[axis] == 0:  # nothing to sample (and no statistics: the count is 0), any shift will do
    return layout.per_feature_to_work(jnp.zeros(layout.feature_shape, x.dtype))
  sample = _sample(x, layout)
  size = sample.shape[axis]
  if axis == 0:
    # A leading block, averaged over its slices by a dot with constant weights: on XLA:CPU 4-5x faster than
    # a reduction over the block (256x24x24x6: 46 us against 190 us). In at least float32, as a mean would
    # accumulate (a half-precision 1/size is rounded); HIGHEST: no TF32 rounding on GPU.
    wide = jnp.promote_types(x.dtype, jnp.float32)
    weights = jnp.full((size,), 1.0 / size, real_dtype(wide))
    sample = jnp.tensordot(weights, sample, axes=1, precision=lax.Precision.HIGHEST, preferred_element_type=wide)
    rest = tuple(a - 1 for a in layout.reduction_axes[1:])
  else:
    rest = layout.reduction_axes
  shift = jnp.mean(sample, axis=rest) if rest else sample
  return layout.per_feature_to_work(jnp.reshape(shift, layout.feature_shape).astype(x.dtype))


# Masked inputs smaller than this, in their reduction dtype, take their shift from all of their valid values unless
# their mask cannot vary along the sampled axis: one pass more, a few microseconds at these sizes (forward and
# backward 5% slower at 256x120, 16% at 256x84, on a 2-core CPU), for a program without the sample's check, a
# `lax.cond` with a pass of its own, and so about ten kernels fewer to compile (XLA:CPU compiles each apart).
WHOLE_MEAN_BYTES = 2**18


def _masked_sample_mean(x, mask, count, layout: Layout, mask_uniform_axes: tuple[int, ...] = ()):
  """Per-feature masked mean of :func:`_sample_mean`'s sample (its first ``ceil(n / SHIFT_FRACTION)`` slices)
  where the sample holds at least ``1 / SHIFT_FRACTION`` of the feature's ``count`` valid values, which keeps
  the same bound whatever the mask; elsewhere (padding early in ``x``: few or no valid values sampled) the
  masked mean of all of ``x``, a second full pass that runs only when some feature needs it.

  A mask that does not vary along the sampled axis (it is in ``mask_uniform_axes``), e.g. a per-example mask of
  CHWN activations, sampled along H, leaves every slice the same share of the valid values: the sample always
  holds enough, and the check and the second pass are left out of the program. Other masked inputs under
  ``WHOLE_MEAN_BYTES`` take the masked mean of all of ``x``: one pass, and no sample or check."""
  uniform = layout.reduction_axes[0] in mask_uniform_axes  # (the sample always holds enough)
  if not uniform and x.size * x.dtype.itemsize < WHOLE_MEAN_BYTES:
    return _masked_mean(x, mask, count, layout)  # (small: one pass, and no check)
  sample, sampled = _sample(x, layout), _sample(mask, layout)

  def per_feature_sum(v):
    return layout.per_feature_to_work(jnp.sum(v, axis=layout.reduction_axes).reshape(layout.feature_shape))

  wide = jnp.promote_types(x.dtype, jnp.float32)  # (as _sample_mean's dot: a half-precision sum may overflow)
  n = per_feature_sum(sampled.astype(real_dtype(wide)))
  shift = (per_feature_sum(jnp.where(sampled, sample, 0.0).astype(wide)) / jnp.maximum(n, 1.0)).astype(x.dtype)
  if uniform:
    return shift
  enough = n * SHIFT_FRACTION >= count  # (count 0: nothing to sample, and the shift 0 will do)

  def whole():
    return jnp.where(enough, shift, _masked_mean(x, mask, count, layout))

  return lax.cond(jnp.all(enough), lambda: shift, whole)


def _masked_mean(x, mask, count, layout: Layout):
  """Per-feature mean of the valid values of ``x`` (``count`` of them), summed in at least float32, as the
  sample is (a half-precision sum may overflow)."""
  wide = jnp.promote_types(x.dtype, jnp.float32)
  return (layout.sum(jnp.where(mask, x, 0.0).astype(wide)) / jnp.maximum(count, 1.0)).astype(x.dtype)


def _fast_moments(x, layout: Layout, mask):
  """Per-feature (count, sum, sum of |x|^2): one fused pass, unstable when |mean| >> std."""
  if mask is None:
    count = jnp.asarray(float(layout.count), real_dtype(x.dtype))
    return count, layout.sum(x), layout.sum(_abs2(x))
  x = jnp.where(mask, x, 0.0)
  count = layout.sum(mask.astype(real_dtype(x.dtype)))
  return count, layout.sum(x), layout.sum(_abs2(x))


def batch_moments(
  x: jax.Array,
  layout: Layout,
  *,
  mask: jax.Array | None = None,
  axis_name: str | None = None,
  axis_index_groups: Any = None,
  use_fast_variance: bool = False,
  mask_uniform_axes: tuple[int, ...] = (),
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None]:
  """Per-feature ``(mean, biased var, count, center)`` of a working-shape ``x`` (and across ``axis_name``).

  ``center`` is ``(m1, mean_d)`` when ``x - mean`` is more exact as ``(x - m1) - mean_d`` (the stable
  variance on one shard), else None.

  ``x`` (and ``mask``) should already be in the reduction dtype and ``layout``'s working shape.
  ``mask_uniform_axes``: axes along which the mask is known not to vary (a promise: it spares the shift's check).
  Across a named axis the shards' moments travel in one collective: a gather (as one ``psum``) of
  every shard's (count, mean, M2), combined with Chan et al.'s formula for the stable variance, or
  one ``psum`` of (count, sum, sum of squares) for the fast one.
  """
  if use_fast_variance:
    count, s1, s2 = _fast_moments(x, layout, mask)
    if axis_name is not None:
      # One collective: the three moments stacked (count and sum of |x|^2 are real parts of the stack).
      stacked = jnp.stack(jnp.broadcast_arrays(count.astype(s1.dtype), s1, s2.astype(s1.dtype)))
      stacked = lax.psum(stacked, axis_name, axis_index_groups=axis_index_groups)
      count, s1, s2 = jnp.real(stacked[0]), stacked[1], jnp.real(stacked[2])
    safe = jnp.maximum(count, 1.0)  # count 0 (nothing valid anywhere): mean and var 0, count 0
    mean = s1 / safe
    var = jnp.where(jnp.isinf(s2), s2, jnp.maximum(s2 / safe - _abs2(mean), 0.0))
    return mean, var, jnp.broadcast_to(count, mean.shape), None

  count, m1, mean_d, m2 = _shifted_moments(x, layout, mask, mask_uniform_axes)
  mean, center = m1 + mean_d, (m1, mean_d)
  if axis_name is not None:
    center = None  # the combined mean is rounded once more; (x - m1) would not make it exact
    # A gather written as a psum: each shard fills its own row of a zero table. Unlike all_gather, the
    # result is known to be replicated (shard_map's check needs that), and shards outside this shard's
    # axis_index_groups group simply contribute rows with count 0. One collective carries all three.
    row = jnp.stack(jnp.broadcast_arrays(count.astype(mean.dtype), mean, m2.astype(mean.dtype)))
    slot = jax.nn.one_hot(lax.axis_index(axis_name), lax.axis_size(axis_name), dtype=real_dtype(row.dtype))
    shards = lax.psum(slot.reshape((-1,) + (1,) * row.ndim) * row, axis_name, axis_index_groups=axis_index_groups)
    counts, means, m2s = jnp.real(shards[:, 0]), shards[:, 1], jnp.real(shards[:, 2])
    # Chan et al.: shards with count 0 (all padding) get weight 0 and add nothing.
    count = jnp.sum(counts, axis=0)
    mean = jnp.sum(counts * means, axis=0) / jnp.maximum(count, 1.0)
    m2 = jnp.sum(m2s, axis=0) + jnp.sum(counts * _abs2(means - mean), axis=0)
  count = jnp.broadcast_to(count, mean.shape)
  return mean, m2 / jnp.maximum(count, 1.0), count, center
