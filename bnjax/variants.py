"""The training variants of batch norm: ghost batches (:class:`Grouping`), batch renormalization and the
running-statistics update (cumulative average, masked and non-finite guards).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from bnjax.layout import Layout
from bnjax.state import BatchStats, ema, real_dtype, where_stats


class Grouping(NamedTuple):
  """How training sees the input: its working ``shape``, feature axes and layout, and for ghost BN the
  position ``group_pos`` of the group axis among the features (None without ghost BN).

  Ghost BN turns the batch axis into (groups, virtual_batch_size) and the group axis into a feature
  axis, so every group gets its own statistics from the same code path.
  """

  shape: tuple[int, ...]
  layout: Layout
  group_pos: int | None

  @classmethod
  def of(cls, shape, feature_axes, batch_axis, virtual_batch_size) -> Grouping:
    if virtual_batch_size is None:
      return cls(tuple(shape), Layout(shape, feature_axes), None)
    b = batch_axis
    work_shape = shape[:b] + (shape[b] // virtual_batch_size, virtual_batch_size) + shape[b + 1 :]
    work_axes = tuple(a for a in feature_axes if a < b) + (b,) + tuple(a + 1 for a in feature_axes if a > b)
    return cls(work_shape, Layout(work_shape, work_axes), sum(a < b for a in feature_axes))

  def mask_to_work(self, mask, shape: tuple[int, ...]) -> tuple[jax.Array, tuple[int, ...]]:
    """A mask broadcastable to the input's ``shape``, in the working shape (bool), and the working axes along
    which it cannot vary, by its own shape (none for ghost batches, whose batch axis is reshaped: no promise
    is made there). The promise spares the masked moments their shift's check (``mask_uniform_axes``)."""
    work = self.layout.to_work(jnp.broadcast_to(jnp.asarray(mask, bool), shape).reshape(self.shape))
    if self.shape != tuple(shape):
      return work, ()
    aligned = (1,) * (len(shape) - np.ndim(mask)) + tuple(np.shape(mask))
    return work, tuple(a for a, (m, n) in enumerate(zip(aligned, shape, strict=True)) if m == 1 and n > 1)

  def per_feature(self, v: jax.Array) -> jax.Array:
    """A per-feature array in working form, repeated over the groups (its transpose sums over them)."""
    if self.group_pos is not None:
      v = jnp.broadcast_to(jnp.expand_dims(v, self.group_pos), self.layout.feature_shape)
    return self.layout.per_feature_to_work(v)

  def combine_groups(self, mean, var, count, unbiased: bool):
    """Per-feature ``(mean, var, running var, count)`` of the whole batch from per-group statistics:
    the count-weighted mean and the pooled within-group variance (``/ sum (n_g - 1)`` when unbiased)."""
    if self.group_pos is None:
      running_var = var * count / jnp.maximum(count - 1.0, 1.0) if unbiased else var
      return mean, var, running_var, count
    g = self.group_pos
    total, pooled = jnp.sum(count, g), jnp.sum(count * var, g)
    dof = jnp.sum(jnp.maximum(count - 1.0, 0.0), g) if unbiased else total
    mean = jnp.sum(count * mean, g) / jnp.maximum(total, 1.0)
    return mean, pooled / jnp.maximum(total, 1.0), pooled / jnp.maximum(dof, 1.0), total


def renorm_correction(y, mean, var, count, stats, scale, bias, epsilon, clipping, grouping: Grouping, dtype):
  """Batch renormalization: ``scale * (xhat * r + d) + bias`` from the normalized ``y = xhat``, with
  ``r``, ``d`` measured against ``stats.renorm_mean``/``renorm_std``, clipped, without gradient.

  ``scale`` and ``bias`` are per-feature arrays in working form (see :meth:`Grouping.per_feature`).
  """
  renorm_std = grouping.per_feature(stats.renorm_std.astype(dtype))
  r = jnp.sqrt(var + epsilon) / renorm_std
  d = (mean - grouping.per_feature(stats.renorm_mean.astype(dtype))) / renorm_std
  r_max, d_max = (None, None) if clipping is None else clipping
  if r_max is not None:
    r = jnp.clip(r, 1.0 / r_max, r_max)
  if d_max is not None:
    d = jnp.clip(d, -d_max, d_max)
  seen = count > 0  # a feature (or group) with no valid example: xhat = 0 and no correction
  r, d = lax.stop_gradient(jnp.where(seen, r, 1.0)), lax.stop_gradient(jnp.where(seen, d, 0.0))
  expand = grouping.layout.expand
  return y * expand(r * scale) + expand(d * scale + bias)


def update_running_stats(
  stats: BatchStats,
  mean,
  var,
  running_var,
  count,
  *,
  momentum,
  epsilon,
  renorm,
  renorm_momentum,
  masked: bool,
  skip_nonfinite: bool = False,
) -> BatchStats:
  """The running statistics after one training batch (its per-feature statistics, without gradient).

  ``momentum=None`` is the cumulative average (the ``n``-th batch weighs ``1/n``). With a mask, a
  feature with no valid example keeps its statistics, and a batch with none at all is not counted.
  With ``skip_nonfinite``, a feature whose batch mean or variance is not finite keeps its statistics
  too, and a batch in which no feature is finite is not counted.
  """
  mean, var, running_var = (lax.stop_gradient(v) for v in (mean, var, running_var))
  n = stats.num_batches_tracked
  if momentum is None:  # PyTorch's cumulative average: the (n+1)-th batch gets weight 1 / (n+1)
    real = real_dtype(mean.dtype)
    momentum = n.astype(real) / (n + 1).astype(real)
  # From `stats`, so optional fields that no option of this call updates come back as they went in.
  new = stats._replace(mean=ema(stats.mean, mean, momentum), var=ema(stats.var, running_var, momentum))
  if renorm:
    new = new._replace(
      renorm_mean=ema(stats.renorm_mean, mean, renorm_momentum),
      renorm_std=ema(stats.renorm_std, jnp.sqrt(var + epsilon), renorm_momentum),
    )
  if not masked and not skip_nonfinite:
    return new if n is None else new._replace(num_batches_tracked=n + 1)
  learned = count > 0  # no valid example for a feature: nothing to learn, keep its statistics
  if skip_nonfinite:
    learned = learned & jnp.isfinite(mean) & jnp.isfinite(running_var)
  new = where_stats(learned, new, stats)
  return new if n is None else new._replace(num_batches_tracked=n + jnp.any(learned).astype(n.dtype))
