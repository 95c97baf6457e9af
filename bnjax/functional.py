"""Batch normalization as a pure function with explicit running statistics.

For an input ``x`` with feature axes ``F`` and reduction axes ``R`` (all the
others), training mode computes per-feature batch statistics

    mean = E_R[x],    var = E_R[(x - mean)^2]

normalizes ``y = scale * (x - mean) / sqrt(var + epsilon) + bias`` and returns
running statistics updated by an exponential moving average

    new_running = momentum * running + (1 - momentum) * batch_statistic.

Evaluation mode (``use_running_average=True``) normalizes by the running
statistics and returns them unchanged. Nothing is mutated: the statistics go in
and come out as a :class:`BatchStats` pytree, so the function composes with
``jax.jit``, ``jax.grad``, ``jax.vmap``, ``shard_map`` and ``pmap``.

Momentum follows the chapter and Flax. PyTorch's ``momentum`` is the weight of
the *new* value, so ``torch momentum = 1 - bnjax momentum`` (PyTorch's default
0.1 is bnjax's 0.9). PyTorch also updates the running variance with the
unbiased batch variance; pass ``unbiased_running_var=True`` to do the same.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import jax
import jax.numpy as jnp

from bnjax.checks import (
  Axes,
  as_input,
  canonicalize_axes,
  check_inputs,
  check_mode,
  check_options,
  check_training,
  feature_and_reduction_axes,
)
from bnjax.layout import Layout
from bnjax.moments import batch_moments, local_moments
from bnjax.normalization import normalize, normalize_by_batch
from bnjax.state import BatchStats, ema, init_batch_stats, real_dtype, stats_dtypes, where_stats
from bnjax.variants import Grouping, renorm_correction, update_running_stats

# The names importable from here before the math was split into modules, and the options.
__all__ = [
  "MODULE_ARGUMENTS",
  "OPTION_DEFAULTS",
  "PASSED_OPTIONS",
  "Axes",
  "BatchStats",
  "Grouping",
  "Layout",
  "as_input",
  "batch_moments",
  "batch_norm",
  "canonicalize_axes",
  "check_mode",
  "ema",
  "init_batch_stats",
  "local_moments",
  "normalize",
  "normalize_by_batch",
  "real_dtype",
  "renorm_correction",
  "stats_dtypes",
  "update_running_stats",
]


def batch_norm(
  x: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  stats: BatchStats | None,
  *,
  use_running_average: bool | jax.Array,
  axis: Axes = -1,
  momentum: float | jax.Array | None = 0.99,
  epsilon: float | jax.Array = 1e-5,
  axis_name: str | None = None,
  axis_index_groups: Any = None,
  mask: jax.Array | None = None,
  use_fast_variance: bool = False,
  unbiased_running_var: bool = False,
  force_float32_reductions: bool = True,
  dtype: Any = None,
  update_stats: bool = True,
  virtual_batch_size: int | None = None,
  renorm: bool = False,
  renorm_clipping: tuple[Any, Any] | None = None,
  renorm_momentum: float | jax.Array = 0.99,
  track_num_batches: bool = False,
  skip_nonfinite: bool = False,
) -> tuple[jax.Array, BatchStats | None]:
  """Batch-normalizes ``x`` and returns ``(y, new_stats)``.

  Args:
    x: input of rank >= 2: floating or complex; integer and bool inputs are promoted to float32.
    scale: per-feature gamma with the feature shape, or None for no scaling.
    bias: per-feature beta with the feature shape, or None for no shift.
    stats: running :class:`BatchStats` with the feature shape (floating point; the mean may be
      complex). Required in evaluation mode; may be None in training mode (then None is returned).
    use_running_average: True for evaluation (normalize by ``stats``, return
      them unchanged); False for training (normalize by batch statistics,
      return updated running statistics). Always explicit: a Python or NumPy bool, a concrete
      scalar bool array, or a traced scalar bool (then both modes are computed and one is selected).
    axis: the feature axis or axes (a repeated axis counts once); every other axis is reduced. -1
      is NHWC, 1 is NCHW.
    momentum: weight of the old running value, in [0, 1]; ``torch momentum = 1 - momentum``. None is
      PyTorch's ``momentum=None``: the cumulative average over all training batches so far, which
      needs ``stats.num_batches_tracked`` (the ``n``-th batch gets weight ``1/n``).
    epsilon: added to the variance before the square root, >= 0. Concrete values of ``momentum``
      and ``epsilon`` (numbers or arrays) are checked; traced values cannot be, and are the
      caller's responsibility.
    axis_name: a mapped axis (vmap, pmap, shard_map) across which the batch
      statistics are combined, in one collective, weighted by each shard's count of valid values
      (a fully masked shard adds nothing).
    axis_index_groups: subgroups of ``axis_name`` to combine separately.
    mask: boolean array broadcastable to ``x``; False entries (e.g. padded
      examples) are left out of the batch statistics. In training mode, masked values (even NaN or
      inf) reach no valid output and no gradient: outputs at masked positions are finite
      placeholders that carry no gradient. Evaluation ignores the mask. A feature with no valid
      entry at all (over every shard) keeps its running statistics unchanged, and its output in that
      call is ``bias`` (``xhat = 0``) with no gradient to ``x``.
    use_fast_variance: opt in to ``E[x^2] - E[x]^2`` (Flax's default); it loses
      precision when ``|mean| >> std``. The default is the stable form.
    unbiased_running_var: update the running variance with the unbiased batch
      variance ``var * n / (n - 1)``, as PyTorch does. Normalization always
      uses the biased variance.
    force_float32_reductions: compute statistics in at least float32 (so
      bf16/fp16 inputs never overflow or lose the statistics).
    dtype: dtype of ``y``; defaults to ``x.dtype`` (float32 for integer/bool ``x``).
    update_stats: whether a training call updates the running statistics. False ("frozen" running
      statistics) normalizes by the batch but returns ``stats`` unchanged; to normalize by frozen
      running statistics instead (fine-tuning), use ``use_running_average=True``.
    virtual_batch_size: ghost batch norm (Hoffer et al. 2017): in training, the batch axis (the first
      non-feature axis) is split into consecutive groups of this many examples, each normalized by its
      own statistics. The batch must be divisible by it. The running statistics are updated once per
      call: the mean by the batch mean (the count-weighted mean of the group means) and the variance by
      the pooled within-group variance ``sum_g n_g var_g / sum_g n_g`` (``/ sum_g (n_g - 1)`` with
      ``unbiased_running_var``), the spread training actually normalized by, as Keras does. Cannot be
      combined with ``axis_name``. Evaluation ignores it.
    renorm: batch renormalization (Ioffe 2017). Training normalizes by the batch statistics, then
      corrects towards the moving averages ``renorm_mean``/``renorm_std`` of ``stats``:
      ``y = scale * (xhat * r + d) + bias`` with ``r = clip(sigma_B / renorm_std, 1/r_max, r_max)``,
      ``d = clip((mean_B - renorm_mean) / renorm_std, -d_max, d_max)``, ``sigma_B = sqrt(var_B +
      epsilon)``, and no gradient through ``r`` and ``d``. ``renorm_mean``/``renorm_std`` then move
      towards ``mean_B``/``sigma_B`` with ``renorm_momentum``; ``mean``/``var`` are updated as in plain
      BN (with ``momentum``) and serve evaluation. Needs ``stats`` from
      ``init_batch_stats(..., renorm=True)``. Real inputs only.
    renorm_clipping: ``(r_max, d_max)``, numbers or traced scalars (so a schedule can ramp them, e.g.
      from (1, 0), plain BN, to (3, 5)); an entry None means unclipped. None: no clipping at all.
    renorm_momentum: weight of the old value in ``renorm_mean``/``renorm_std``.
    track_num_batches: require the batch counter ``stats.num_batches_tracked`` (PyTorch's). Whenever the
      counter is there, each training update adds 1 to it; this flag only makes a missing one an error,
      so :func:`bnjax.pytorch_preset`'s keywords serve the function and the modules alike.
    skip_nonfinite: a guard for data with NaN or inf. By default (as in Flax and PyTorch) one non-finite
      value makes its feature's batch statistics, and so its running statistics, NaN or inf for good.
      True keeps the running statistics of such a feature unchanged in that call (and does not count
      a batch with no finite feature). The outputs of that batch are still non-finite: this protects
      the model's state, not the step.

  Returns:
    ``(y, new_stats)``: ``y`` has the shape of ``x``; ``new_stats`` is the
    updated :class:`BatchStats` in training mode and ``stats`` in evaluation. Updated statistics
    keep their dtype unless the batch statistics are more precise (float64 input, complex mean).

  A training batch with a single value per feature (one example, no spatial axes) is accepted, as
  in Flax and without a warning (Flax does not warn, and a drop-in must not break code that runs
  with warnings as errors, e.g. shape inference on one example): its variance is 0, so ``y = bias``.

  Raises:
    TypeError: ``x`` that is not numeric, ``stats`` of the wrong type or an integer dtype, a
      ``use_running_average`` that is not a bool, option values of the wrong type.
    ValueError: rank < 2, a bad ``axis``, shapes that do not match the feature shape, a concrete
      ``momentum`` outside [0, 1] or ``epsilon`` < 0, a batch not divisible by
      ``virtual_batch_size``, options that need fields ``stats`` lacks, refused combinations.

  >>> x = jnp.arange(12.0).reshape(4, 3)
  >>> y, stats = batch_norm(x, jnp.ones(3), jnp.zeros(3), init_batch_stats(3),
  ...                       use_running_average=False, momentum=0.9)
  >>> jnp.round(stats.mean, 2)  # 0.9 * 0 + 0.1 * [4.5, 5.5, 6.5]
  Array([0.45, 0.55, 0.65], dtype=float32)
  """
  x = as_input(x)
  use_running_average = check_mode(use_running_average)
  feature_axes, reduction_axes = feature_and_reduction_axes(x.ndim, axis)
  check_inputs(x, scale, bias, stats, feature_axes, momentum, epsilon)
  check_options(update_stats, virtual_batch_size, renorm, renorm_clipping, renorm_momentum, axis_name, skip_nonfinite)
  out_dtype = x.dtype if dtype is None else dtype
  evaluate = functools.partial(_evaluate, x, scale, bias, stats, feature_axes, epsilon, out_dtype)
  if use_running_average is True:
    return evaluate()

  check_training(x, stats, reduction_axes, momentum, update_stats, renorm, virtual_batch_size, track_num_batches)
  reduce_dtype = jnp.promote_types(x.dtype, jnp.float32) if force_float32_reductions else x.dtype
  grouping = Grouping.of(x.shape, feature_axes, reduction_axes[0], virtual_batch_size)
  y, mean, var, count = _normalize_training(
    x,
    scale,
    bias,
    stats,
    feature_axes,
    grouping,
    epsilon,
    reduce_dtype,
    mask=mask,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    use_fast_variance=use_fast_variance,
    renorm=renorm,
    renorm_clipping=renorm_clipping,
  )
  y = y.astype(out_dtype)

  new_stats = stats
  if stats is not None and update_stats:
    batch = (grouping.layout.per_feature_from_work(v) for v in (mean, var, count))
    mean, var, running_var, count = grouping.combine_groups(*batch, unbiased=unbiased_running_var)
    new_stats = update_running_stats(
      stats,
      mean,
      var,
      running_var,
      count,
      momentum=momentum,
      epsilon=epsilon,
      renorm=renorm,
      renorm_momentum=renorm_momentum,
      masked=mask is not None,
      skip_nonfinite=skip_nonfinite,
    )
  if use_running_average is False:
    return y, new_stats
  # A traced mode (e.g. a train flag passed through jit as an array): both results, one selected.
  if stats is None:
    raise ValueError("`stats` is None, but a traced `use_running_average` may select evaluation, which needs them.")
  y_eval, _ = evaluate()
  return jnp.where(use_running_average, y_eval, y), where_stats(jnp.logical_not(use_running_average), new_stats, stats)


def _evaluate(x, scale, bias, stats, feature_axes, epsilon, dtype) -> tuple[jax.Array, BatchStats]:
  """Evaluation mode: ``(y, stats)``, ``x`` normalized by the running statistics, which come back unchanged."""
  if stats is None:
    raise ValueError("`stats` is None, but evaluation mode (use_running_average=True) normalizes by them.")
  return normalize(x, stats.mean, stats.var, scale, bias, feature_axes, epsilon, dtype), stats


def _normalize_training(
  x,
  scale,
  bias,
  stats,
  feature_axes,
  grouping: Grouping,
  epsilon,
  reduce_dtype,
  *,
  mask,
  axis_name,
  axis_index_groups,
  use_fast_variance,
  renorm,
  renorm_clipping,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Training mode's ``(y, mean, var, count)``: ``y`` (``x``'s shape, ``reduce_dtype``) normalized by the batch
  (or ghost-group) statistics, which come per feature in ``grouping``'s working form.

  Absent ``scale``/``bias`` act as 1/0 (symbolic-zero tangents: free). Renorm applies scale and bias after
  its correction, so the normalization itself gets 1 and 0.
  """
  layout = grouping.layout

  def per_feature(v, default):
    v = jnp.full(tuple(x.shape[a] for a in feature_axes), default, reduce_dtype) if v is None else v
    return grouping.per_feature(jnp.asarray(v).astype(reduce_dtype))

  work_mask, uniform = grouping.mask_to_work(mask, x.shape) if mask is not None else (None, ())
  y, mean, var, count = normalize_by_batch(
    layout.to_work(x.astype(reduce_dtype).reshape(grouping.shape)),
    per_feature(None if renorm else scale, 1.0),
    per_feature(None if renorm else bias, 0.0),
    layout,
    epsilon,
    mask=work_mask,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    use_fast_variance=use_fast_variance,
    mask_uniform_axes=uniform,
  )
  if renorm:
    g, beta = per_feature(scale, 1.0), per_feature(bias, 0.0)
    y = renorm_correction(y, mean, var, count, stats, g, beta, epsilon, renorm_clipping, grouping, reduce_dtype)
  return y.reshape(x.shape), mean, var, count


# batch_norm's keyword arguments that the linen and NNX modules set themselves on every call: the mode, the
# feature axes, the mask and the output dtype.
MODULE_ARGUMENTS = ("use_running_average", "axis", "mask", "dtype")
# Every other keyword argument of batch_norm is an option that both modules keep as a field (attribute) of
# the same name and default and pass through unchanged. Declared once, by batch_norm's signature: name ->
# default, in signature order.
OPTION_DEFAULTS: dict[str, Any] = {
  name: parameter.default
  for name, parameter in inspect.signature(batch_norm).parameters.items()
  if parameter.kind is inspect.Parameter.KEYWORD_ONLY and name not in MODULE_ARGUMENTS
}
PASSED_OPTIONS = tuple(OPTION_DEFAULTS)
