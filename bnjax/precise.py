"""Precise batch norm: running statistics replaced by the exact population statistics of each BN layer's input.

During training the running averages lag the weights (at the chapter's lr 1.0 they trail by several
hundred steps of fast-moving weights), which makes test accuracy swing from epoch to epoch. With the
weights frozen, :func:`precise_batch_stats` runs forward passes in training mode, records the input
of every batch-norm layer (``bnjax.BatchNorm`` and ``flax.linen.BatchNorm`` alike, found by
intercepting their calls, so models need no change), and combines the per-batch moments by counts
(Chan et al.) into the mean and variance over all examples seen.

Only the layers that update their running statistics in that pass are recomputed, as in detectron2's
precise BN: a layer frozen for fine-tuning (``use_running_average=True`` inside a model applied with
``train=True``, or bnjax's ``update_stats=False``) keeps its statistics, and the layers after it are
measured on the output it gives with them. Each layer adds its moments to the ``batch_stats``
collection while the model runs, so they travel through Flax's lifted transforms as its running
statistics do: a layer under ``nn.remat`` gets its own statistics, and a layer under ``nn.scan`` or
``nn.vmap`` (``batch_stats`` in ``variable_axes``) one set per iteration, as in the unrolled model.

    variables = precise_batch_stats(model.apply, variables, batches, model_kwargs={"train": True})
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from bnjax.checks import canonicalize_axes, check_mode
from bnjax.linen import BatchNorm
from bnjax.moments import local_moments
from bnjax.state import real_dtype
from bnjax.variants import Grouping

BATCH_NORMS = (BatchNorm, nn.BatchNorm)
# The name under which a layer collects its moments in `batch_stats` during a pass (never returned).
MOMENTS_NAME = "precise_bn_moments"


class LayerMoments(NamedTuple):
  """Moments of one BN layer's input, per feature, combined by counts (Chan et al.)."""

  count: jax.Array  # feature shape: the number of values seen
  mean: jax.Array  # feature shape
  m2: jax.Array  # feature shape: the sum of squared deviations from the mean (from each group's, if pooled)
  pooled: jax.Array  # feature shape, bool: a ghost-BN layer, whose M2 stays within its groups


# The batch_stats tree cut down to the recomputed layers: module names down to each layer's LayerMoments.
Moments = dict[str, Any]


def _combine(a: LayerMoments, b: LayerMoments) -> LayerMoments:
  """The moments of two disjoint sets from theirs; empty sets add nothing.

  For a ``pooled`` layer (ghost BN) M2 is a sum of within-group squared deviations, so the sets' means add
  no between-set term.
  """
  n = a.count + b.count
  safe = jnp.maximum(n, 1.0)
  delta = b.mean - a.mean
  between = jnp.where(a.pooled, 0.0, jnp.real(delta * jnp.conj(delta)) * a.count * b.count / safe)
  return LayerMoments(n, a.mean + delta * b.count / safe, a.m2 + b.m2 + between, a.pooled)


def _combine_trees(a: Moments, b: Moments) -> Moments:
  return jax.tree.map(_combine, a, b, is_leaf=lambda node: isinstance(node, LayerMoments))


def _input_moments(module: nn.Module, x: jax.Array, mask: jax.Array | None) -> LayerMoments:
  """The moments of one call's input ``x`` (unmasked values only) as the layer's training step groups it."""
  inputs = jnp.asarray(x)
  inputs = inputs.astype(jnp.promote_types(inputs.dtype, jnp.float32))
  feature_axes = canonicalize_axes(inputs.ndim, module.axis)
  reduction_axes = tuple(a for a in range(inputs.ndim) if a not in feature_axes)
  ghost = getattr(module, "virtual_batch_size", None)
  grouping = Grouping.of(inputs.shape, feature_axes, reduction_axes[0], ghost)
  layout = grouping.layout
  mask, uniform = grouping.mask_to_work(mask, inputs.shape) if mask is not None else (None, ())
  count, mean, m2 = local_moments(layout.to_work(inputs.reshape(grouping.shape)), layout, mask, uniform)
  count, mean, m2 = (layout.per_feature_from_work(jnp.broadcast_to(v, mean.shape)) for v in (count, mean, m2))
  if grouping.group_pos is not None:  # per-group moments -> the batch's, M2 within the groups
    g = grouping.group_pos
    total = jnp.sum(count, g)
    mean = jnp.sum(count * mean, g) / jnp.maximum(total, 1.0)
    count, m2 = total, jnp.sum(m2, g)
  return LayerMoments(count, mean, m2, jnp.full(mean.shape, grouping.group_pos is not None))


def _updates_running_stats(module: nn.Module, args: tuple, kwargs: Mapping) -> bool | jax.Array:
  """Whether this call of a BN layer updates its running statistics (a traced bool for a traced flag)."""
  call_flag = args[1] if len(args) > 1 else kwargs.get("use_running_average")
  use_running_average = nn.merge_param("use_running_average", module.use_running_average, call_flag)
  if not isinstance(module, BatchNorm):
    return not use_running_average
  if not module.update_stats:
    return False
  mode = check_mode(use_running_average)
  return jnp.logical_not(mode) if isinstance(mode, jax.Array) else not mode


def _record(next_fun, args, kwargs, context):
  """An interceptor: a BN layer that updates its running statistics adds its input's moments to ``batch_stats``."""
  y = next_fun(*args, **kwargs)  # first: a call the layer refuses fails with the layer's own error
  module = context.module
  if context.method_name != "__call__" or not isinstance(module, BATCH_NORMS) or module.is_initializing():
    return y
  training = _updates_running_stats(module, args, kwargs)
  if training is False:
    return y
  moments = _input_moments(module, args[0], kwargs.get("mask"))
  if training is not True:  # a traced flag: an evaluation call adds an empty set
    moments = moments._replace(**{f: jnp.where(training, getattr(moments, f), 0) for f in ("count", "mean", "m2")})
  if module.has_variable("batch_stats", MOMENTS_NAME):  # a shared layer: all its calls together
    moments = _combine(module.get_variable("batch_stats", MOMENTS_NAME), moments)
  module.put_variable("batch_stats", MOMENTS_NAME, moments)
  return y


def _collected(stats: Mapping) -> Moments:
  """The layers' moments out of an updated ``batch_stats`` tree, at the same paths."""
  if MOMENTS_NAME in stats:
    return stats[MOMENTS_NAME]
  children = {name: _collected(node) for name, node in stats.items() if isinstance(node, Mapping)}
  return {name: node for name, node in children.items() if isinstance(node, LayerMoments) or node}


def batch_moments_by_layer(apply_fn: Callable, variables: Mapping, x: jax.Array, mask=None, **model_kwargs) -> Moments:
  """The moments of every recomputed batch-norm layer's input for one forward pass, by the layer's path.

  Returns the ``batch_stats`` tree cut down to the layers that update their running statistics in this
  pass, each a :class:`LayerMoments` (with a leading axis per iteration under ``nn.scan``/``nn.vmap``).
  A layer called several times (shared weights) gets the moments of all its calls together. A ghost-BN
  layer (``virtual_batch_size``) records the pooled within-group M2: the spread training normalizes by.
  """
  kwargs = dict(model_kwargs)
  if mask is not None:
    kwargs["mask"] = mask
  with nn.intercept_methods(_record):
    _, updated = apply_fn(variables, x, mutable=["batch_stats"], **kwargs)
  return _collected(unfreeze(updated).get("batch_stats", {}))


def _split(batch) -> tuple[jax.Array, jax.Array | None]:
  if isinstance(batch, tuple | list):
    if len(batch) != 2:
      raise ValueError(f"a batch is an array or a pair (inputs, mask), but got a sequence of {len(batch)} items.")
    return batch[0], batch[1]
  return batch, None


def _split_model_kwargs(model_kwargs: Mapping[str, Any]) -> tuple[tuple, dict]:
  """``model_kwargs`` as (hashable values compiled in, as sorted pairs; pytrees of arrays, passed traced)."""
  static, traced = [], {}
  for name, value in sorted(model_kwargs.items()):
    if all(isinstance(leaf, jax.Array | np.ndarray) for leaf in jax.tree.leaves(value)):
      traced[name] = value
      continue
    try:
      hash(value)
    except TypeError:
      raise TypeError(
        f"`model_kwargs[{name!r}]` is a {type(value).__name__}, but should be hashable (a bool, number, string "
        "or tuple of them: compiled in) or a pytree of arrays (passed traced, e.g. `rngs`)."
      ) from None
    static.append((name, value))
  return tuple(static), traced


def _call_kwargs(static: tuple, traced: dict, index: int | jax.Array) -> dict:
  """The keyword arguments of batch ``index``'s call: each stream in ``rngs`` folded with ``index``."""
  kwargs = {**dict(static), **traced}
  if "rngs" in traced:
    kwargs["rngs"] = jax.tree.map(lambda key: jax.random.fold_in(key, index), traced["rngs"])
  return kwargs


# Compiled once per (apply_fn, hashable model_kwargs, shapes): a stable apply_fn (e.g. model.apply) reuses them.
@functools.partial(jax.jit, static_argnums=(0, 1))
def _moments_of_batch(apply_fn, static: tuple, traced: dict, variables, x, mask, index) -> Moments:
  return batch_moments_by_layer(apply_fn, variables, x, mask, **_call_kwargs(static, traced, index))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _moments_of_stack(apply_fn, static: tuple, traced: dict, variables, xs) -> Moments:
  """All batches of an array ``(num_batches, batch, ...)`` in one program: a scan combining by counts."""

  def moments(x, index):
    return batch_moments_by_layer(apply_fn, variables, x, None, **_call_kwargs(static, traced, index))

  def body(total, x_and_index):
    return _combine_trees(total, moments(*x_and_index)), None

  total, _ = jax.lax.scan(body, moments(xs[0], 0), (xs[1:], jnp.arange(1, xs.shape[0])))
  return total


def _write(stats: dict, moments: Moments, path: tuple[str, ...] = ()) -> None:
  """Sets ``mean``/``var`` of every layer in ``moments`` from them; layers that saw no valid value keep theirs."""
  for name, node in moments.items():
    where = (*path, name)
    if name not in stats:
      raise ValueError(f"BN layer {'/'.join(where)} has no entry in variables['batch_stats'].")
    if not isinstance(node, LayerMoments):
      _write(stats[name], node, where)
      continue
    layer = stats[name]
    old_mean, old_var = layer["mean"], layer["var"]
    seen_any = node.count > 0
    var = node.m2 / jnp.maximum(node.count, 1.0)
    layer["mean"] = jnp.where(seen_any, node.mean, old_mean).astype(jnp.result_type(old_mean, node.mean))
    layer["var"] = jnp.where(seen_any, var, old_var).astype(real_dtype(jnp.result_type(old_var, var)))


def precise_batch_stats(
  apply_fn: Callable,
  variables: Mapping,
  batches: Iterable | jax.Array,
  num_batches: int | None = None,
  *,
  model_kwargs: Mapping[str, Any] | None = None,
) -> dict:
  """``variables`` with every training batch-norm layer's ``batch_stats`` set to the population statistics of its input.

  Args:
    apply_fn: the model's apply function, e.g. ``model.apply`` (linen).
    variables: ``{"params": ..., "batch_stats": ...}``; the weights are not changed.
    batches: an iterable of input batches, or an array whose leading axis indexes batches
      (``(num_batches, batch, ...)``). A batch may be a pair ``(inputs, mask)``; the mask is passed as
      ``mask=`` to ``apply_fn`` and masked examples are left out, as in training.
    num_batches: use at most this many batches (all if None).
    model_kwargs: what puts the model in training mode, e.g. ``{"train": True}`` for the chapter's
      LeNet; passed to every call. Hashable values (bools, numbers, strings) are compiled in; pytrees of
      arrays are passed traced. ``rngs`` (e.g. ``{"dropout": key}`` for a model with dropout) gives
      batch ``i`` every stream folded with ``i`` (``jax.random.fold_in(key, i)``): each batch draws its
      own dropout masks, and the same key gives the same statistics.

  Returns:
    A copy of ``variables`` whose ``batch_stats`` hold, per BN layer that updates its running statistics
    in these calls, the mean and the variance over all (unmasked) examples and positions seen (for a
    ghost-BN layer, the pooled within-group variance, as its training updates use). The variance is the
    biased one (divided by the number of values), because that is what training normalizes by: at
    evaluation the layer then divides by the same kind of spread it saw in training, estimated over the
    population instead of one batch. (Over thousands of values per feature the unbiased one differs by
    less than float32 resolution.)

  Layers that do not update their running statistics in these calls (``use_running_average=True``, or
  ``update_stats=False``: frozen for fine-tuning) keep them, as in detectron2's precise BN; the layers
  after them are measured on the output those statistics give, so every statistic describes its layer's
  input under the returned variables. A traced ``use_running_average`` is followed per call. Layers under
  ``nn.remat``, ``nn.scan`` or ``nn.vmap`` (``batch_stats`` in ``variable_axes``) get the statistics of the
  unrolled model, one set per iteration; layers that saw no valid value keep their statistics.

  An array of batches runs as one compiled program (a scan); an iterable compiles one program per
  batch shape. Both are cached for a given ``apply_fn`` and hashable ``model_kwargs`` (pass the same
  function, e.g. ``model.apply``, to reuse them).

  Raises:
    ValueError: no batches; a model with no batch-norm layer in training mode in these calls (e.g.
      ``model_kwargs`` without ``{"train": True}``); a recomputed layer with no entry in
      ``variables['batch_stats']``.
    TypeError: a ``model_kwargs`` value that is neither hashable nor a pytree of arrays.
  """
  if num_batches is not None and (isinstance(num_batches, bool) or not isinstance(num_batches, int) or num_batches < 1):
    raise ValueError(f"`num_batches` is {num_batches!r}, but should be a positive int (or None for all batches).")
  static, traced = _split_model_kwargs(model_kwargs or {})
  total: Moments | None = None
  if isinstance(batches, jax.Array | np.ndarray):
    if batches.ndim < 2 or batches.shape[0] == 0 or num_batches == 0:
      raise ValueError(f"`batches` has shape {batches.shape}: no batch to compute precise statistics from.")
    total = _moments_of_stack(apply_fn, static, traced, variables, jnp.asarray(batches[:num_batches]))
  else:
    for seen, batch in enumerate(batches):
      if num_batches is not None and seen >= num_batches:
        break
      moments = _moments_of_batch(apply_fn, static, traced, variables, *_split(batch), seen)
      total = moments if total is None else _combine_trees(total, moments)
  if total is None:
    raise ValueError("`batches` yielded no batch: precise statistics need at least one.")
  if not total:
    raise ValueError(
      "the model called no bnjax.BatchNorm or flax.linen.BatchNorm layer in training mode (one that updates "
      "its running statistics), so there is nothing to recompute: pass what puts the model in training mode "
      'as `model_kwargs`, e.g. {"train": True}.'
    )
  stats = unfreeze(variables.get("batch_stats", {}))
  _write(stats, total)
  return {**variables, "batch_stats": stats}
