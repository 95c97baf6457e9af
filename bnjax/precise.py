"""Precise batch norm: running statistics replaced by the exact population statistics of each BN layer's input.

During training the running averages lag the weights (at the chapter's lr 1.0 they trail by several
hundred steps of fast-moving weights), which makes test accuracy swing from epoch to epoch. With the
weights frozen, :func:`precise_batch_stats` runs forward passes in training mode, records the input
of every batch-norm layer (``bnjax.BatchNorm`` and ``flax.linen.BatchNorm`` alike, found by
intercepting their calls, so models need no change), and combines the per-batch moments by counts
(Chan et al.) into the mean and variance over all examples seen.

    variables = precise_batch_stats(model.apply, variables, batches, model_kwargs={"train": True})
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from bnjax.functional import Grouping, _local_moments, canonicalize_axes, real_dtype
from bnjax.linen import BatchNorm

BATCH_NORMS = (BatchNorm, nn.BatchNorm)
# (layer path, pooled) -> (count, mean, M2). `pooled` layers (ghost BN) keep M2 within their groups.
Moments = dict[tuple[tuple[str, ...], bool], tuple[jax.Array, jax.Array, jax.Array]]


def _combine(a, b, pooled: bool = False):
  """Chan et al.: the (count, mean, M2) of two disjoint sets from theirs; empty sets add nothing.

  ``pooled``: M2 is a sum of within-group squared deviations (ghost BN), so the sets' means add no
  between-set term.
  """
  (na, ma, m2a), (nb, mb, m2b) = a, b
  n = na + nb
  safe = jnp.maximum(n, 1.0)
  delta = mb - ma
  between = 0.0 if pooled else jnp.real(delta * jnp.conj(delta)) * na * nb / safe
  return n, ma + delta * nb / safe, m2a + m2b + between


def batch_moments_by_layer(apply_fn: Callable, variables: Mapping, x: jax.Array, mask=None, **model_kwargs) -> Moments:
  """The (count, mean, M2) of every batch-norm layer's input for one forward pass in training mode.

  A layer called several times (shared weights) gets the moments of all its calls together. A ghost-BN
  layer (``virtual_batch_size``) records the pooled within-group M2: the spread training normalizes by.
  """
  records: Moments = {}

  def record(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and isinstance(module, BATCH_NORMS):
      inputs = jnp.asarray(args[0])
      inputs = inputs.astype(jnp.promote_types(inputs.dtype, jnp.float32))
      feature_axes = canonicalize_axes(inputs.ndim, module.axis)
      reduction_axes = tuple(a for a in range(inputs.ndim) if a not in feature_axes)
      ghost = getattr(module, "virtual_batch_size", None)
      grouping = Grouping.of(inputs.shape, feature_axes, reduction_axes[0], ghost)
      layout = grouping.layout
      layer_mask = kwargs.get("mask")
      if layer_mask is not None:
        layer_mask = layout.to_work(
          jnp.broadcast_to(jnp.asarray(layer_mask, bool), inputs.shape).reshape(grouping.shape)
        )
      count, mean, m2 = _local_moments(layout.to_work(inputs.reshape(grouping.shape)), layout, layer_mask)
      count, mean, m2 = (layout.per_feature_from_work(jnp.broadcast_to(v, mean.shape)) for v in (count, mean, m2))
      if grouping.group_pos is not None:  # per-group moments -> the batch's, M2 within the groups
        g = grouping.group_pos
        total = jnp.sum(count, g)
        mean = jnp.sum(count * mean, g) / jnp.maximum(total, 1.0)
        count, m2 = total, jnp.sum(m2, g)
      key = (tuple(module.path), grouping.group_pos is not None)
      records[key] = _combine(records[key], (count, mean, m2), key[1]) if key in records else (count, mean, m2)
    return next_fun(*args, **kwargs)

  kwargs = dict(model_kwargs)
  if mask is not None:
    kwargs["mask"] = mask
  with nn.intercept_methods(record):
    apply_fn(variables, x, mutable=["batch_stats"], **kwargs)
  return records


def _split(batch) -> tuple[jax.Array, jax.Array | None]:
  if isinstance(batch, tuple | list):
    if len(batch) != 2:
      raise ValueError(f"a batch is an array or a pair (inputs, mask), but got a sequence of {len(batch)} items.")
    return batch[0], batch[1]
  return batch, None


# Compiled once per (apply_fn, model_kwargs, shapes): a stable apply_fn (e.g. model.apply) reuses them.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _moments_of_batch(apply_fn, model_kwargs: tuple, variables, x, mask) -> Moments:
  return batch_moments_by_layer(apply_fn, variables, x, mask, **dict(model_kwargs))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _moments_of_stack(apply_fn, model_kwargs: tuple, variables, xs) -> Moments:
  """All batches of an array ``(num_batches, batch, ...)`` in one program: a scan combining by counts."""

  def moments(x):
    return batch_moments_by_layer(apply_fn, variables, x, None, **dict(model_kwargs))

  def body(total, x):
    new = moments(x)
    return {k: _combine(total[k], new[k], k[1]) for k in total}, None

  total, _ = jax.lax.scan(body, moments(xs[0]), xs[1:])
  return total


def precise_batch_stats(
  apply_fn: Callable,
  variables: Mapping,
  batches: Iterable | jax.Array,
  num_batches: int | None = None,
  *,
  model_kwargs: Mapping[str, Any] | None = None,
) -> dict:
  """``variables`` with every batch-norm layer's ``batch_stats`` set to the population statistics of its input.

  Args:
    apply_fn: the model's apply function, e.g. ``model.apply`` (linen).
    variables: ``{"params": ..., "batch_stats": ...}``; the weights are not changed.
    batches: an iterable of input batches, or an array whose leading axis indexes batches
      (``(num_batches, batch, ...)``). A batch may be a pair ``(inputs, mask)``; the mask is passed as
      ``mask=`` to ``apply_fn`` and masked examples are left out, as in training.
    num_batches: use at most this many batches (all if None).
    model_kwargs: what puts the model in training mode, e.g. ``{"train": True}`` for the chapter's
      LeNet; passed to every call.

  Returns:
    A copy of ``variables`` whose ``batch_stats`` hold, per BN layer, the mean and the variance over
    all (unmasked) examples and positions seen (for a ghost-BN layer, the pooled within-group variance,
    as its training updates use). The variance is the biased one (divided by the number
    of values), because that is what training normalizes by: at evaluation the layer then divides by
    the same kind of spread it saw in training, estimated over the population instead of one batch.
    (Over thousands of values per feature the unbiased one differs by less than float32 resolution.)

  An array of batches runs as one compiled program (a scan); an iterable compiles one program per
  batch shape. Both are cached for a given ``apply_fn`` (pass the same function, e.g. ``model.apply``,
  to reuse them). Layers that saw no valid value keep their statistics.

  Raises:
    ValueError: no batches, or a model with no batch-norm layer in ``variables['batch_stats']``.
  """
  if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
    raise ValueError(f"`num_batches` is {num_batches!r}, but should be a positive int (or None for all batches).")
  kwargs = tuple(sorted((model_kwargs or {}).items()))
  total: Moments | None = None
  if isinstance(batches, jax.Array | np.ndarray):
    if batches.ndim < 2 or batches.shape[0] == 0 or num_batches == 0:
      raise ValueError(f"`batches` has shape {batches.shape}: no batch to compute precise statistics from.")
    total = _moments_of_stack(apply_fn, kwargs, variables, jnp.asarray(batches[:num_batches]))
  else:
    for seen, batch in enumerate(batches):
      if num_batches is not None and seen >= num_batches:
        break
      moments = _moments_of_batch(apply_fn, kwargs, variables, *_split(batch))
      total = moments if total is None else {k: _combine(total[k], v, k[1]) for k, v in moments.items()}
  if total is None:
    raise ValueError("`batches` yielded no batch: precise statistics need at least one.")
  stats = unfreeze(variables.get("batch_stats", {}))
  if not total:
    raise ValueError("the model called no bnjax.BatchNorm or flax.linen.BatchNorm layer; nothing to recompute.")
  for (path, _), (count, mean, m2) in total.items():
    node = stats
    for name in path:
      if name not in node:
        raise ValueError(f"BN layer {'/'.join(path)} has no entry in variables['batch_stats'].")
      node = node[name]
    old_mean, old_var = node["mean"], node["var"]
    seen_any = count > 0
    var = m2 / jnp.maximum(count, 1.0)
    node["mean"] = jnp.where(seen_any, mean, old_mean).astype(jnp.result_type(old_mean, mean))
    node["var"] = jnp.where(seen_any, var, old_var).astype(real_dtype(jnp.result_type(old_var, var)))
  return {**variables, "batch_stats": stats}
