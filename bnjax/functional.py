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
import math
import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Axes = int | Sequence[int]


class BatchStats(NamedTuple):
  """Running statistics of a batch-norm layer.

  ``mean`` and ``var`` are always there. The optional fields are None unless an option needs them
  (None is an empty pytree, so the default two-field state jits, maps and checkpoints as before):
  ``num_batches_tracked`` counts training updates, as PyTorch does (``momentum=None`` needs it), and
  ``renorm_mean``/``renorm_std`` are batch renormalization's moving averages (``renorm=True``).
  """

  mean: jax.Array  # [*feature_shape], starts at 0.
  var: jax.Array  # [*feature_shape], starts at 1.
  num_batches_tracked: jax.Array | None = None  # int32 scalar, starts at 0.
  renorm_mean: jax.Array | None = None  # [*feature_shape], starts at 0.
  renorm_std: jax.Array | None = None  # [*feature_shape], starts at 1.


def init_batch_stats(
  feature_shape: int | Sequence[int],
  dtype: Any = jnp.float32,
  *,
  num_batches_tracked: bool = False,
  renorm: bool = False,
) -> BatchStats:
  """Returns the chapter's initial running statistics: mean 0, variance 1.

  ``num_batches_tracked=True`` adds PyTorch's batch counter (needed by ``momentum=None``);
  ``renorm=True`` adds batch renormalization's moving mean 0 and standard deviation 1.

  >>> init_batch_stats(3).var
  Array([1., 1., 1.], dtype=float32)
  """
  shape = (feature_shape,) if isinstance(feature_shape, numbers.Integral) else tuple(feature_shape)
  return BatchStats(
    mean=jnp.zeros(shape, dtype),
    var=jnp.ones(shape, dtype),
    num_batches_tracked=jnp.zeros((), jnp.int32) if num_batches_tracked else None,
    renorm_mean=jnp.zeros(shape, real_dtype(dtype)) if renorm else None,
    renorm_std=jnp.ones(shape, real_dtype(dtype)) if renorm else None,
  )


def canonicalize_axes(ndim: int, axis: Axes, name: str = "axis") -> tuple[int, ...]:
  """Returns ``axis`` as a sorted tuple of non-negative axes, or raises ValueError."""
  try:
    axes = (axis,) if isinstance(axis, numbers.Integral) else tuple(axis)
  except TypeError:  # a float, None, ...: not iterable
    axes = ()
  if not axes or not all(isinstance(a, numbers.Integral) and not isinstance(a, bool) for a in axes):
    raise ValueError(f"`{name}` is {axis!r}, but should be an int or a non-empty tuple of ints.")
  for a in axes:
    if not -ndim <= a < ndim:
      raise ValueError(
        f"`{name}` is {axis!r}, but the input has rank {ndim}, so each axis must lie in [{-ndim}, {ndim - 1}]."
      )
  # A repeated axis, e.g. (1, -3) on rank 4, means the same thing once (Flax dedups too).
  return tuple(sorted({int(a) % ndim for a in axes}))


def real_dtype(dtype: Any) -> jnp.dtype:
  """The real counterpart of a floating or complex dtype (complex64 -> float32)."""
  return jnp.finfo(dtype).dtype


def stats_dtypes(*dtypes: Any) -> tuple[jnp.dtype, jnp.dtype]:
  """``(mean dtype, var dtype)`` of running statistics for inputs/params of ``dtypes``.

  At least float32, and the highest precision among ``dtypes`` (float64 under ``jax_enable_x64``);
  the mean is complex for complex inputs, the variance always real.
  """
  mean = jnp.promote_types(jnp.float32, jnp.result_type(*(d for d in dtypes if jnp.issubdtype(d, jnp.inexact))))
  return mean, real_dtype(mean)


def ema(running: jax.Array, batch: jax.Array, momentum: float | jax.Array) -> jax.Array:
  """The chapter's moving average: ``momentum * running + (1 - momentum) * batch``.

  The result keeps the running statistics' dtype unless the batch statistic is more precise (float64
  input with float32 statistics, or a complex mean): statistics are never stored below the input's
  precision.
  """
  dtype = jnp.promote_types(running.dtype, batch.dtype)
  m = jnp.asarray(momentum, real_dtype(dtype))
  # A Python momentum: 1 - momentum in double, rounded once, as Flax does (1 - float32(0.99) is not
  # float32(0.01), and that last bit would make every update differ from Flax's).
  rest = jnp.asarray(1 - momentum, m.dtype) if isinstance(momentum, (int, float)) else 1 - m
  return (m * running.astype(dtype) + rest * batch.astype(dtype)).astype(dtype)


def _abs2(v: jax.Array) -> jax.Array:
  """``|v|^2``, real: ``v * v`` for real arrays, ``re(v conj(v))`` for complex ones."""
  if jnp.iscomplexobj(v):
    return jnp.real(v * jnp.conj(v))
  return v * v


def _re_conj_mul(a: jax.Array, b: jax.Array) -> jax.Array:
  """``re(conj(a) b)``: the real inner product's terms; plain ``a * b`` for real arrays."""
  if jnp.iscomplexobj(a) or jnp.iscomplexobj(b):
    return jnp.real(jnp.conj(a) * b)
  return a * b


def _is_traced(value: Any) -> bool:
  return isinstance(value, jax.core.Tracer)


def _concrete_scalar(name: str, value: Any) -> float | None:
  """A Python float for a concrete number (Python, NumPy or a concrete jax.Array); None when traced."""
  if _is_traced(value):
    return None  # traced values are the caller's responsibility (documented in batch_norm)
  if isinstance(value, bool) or not isinstance(value, numbers.Real | np.ndarray | jax.Array | np.generic):
    raise TypeError(f"`{name}` is {value!r} ({type(value).__name__}), but should be a real number.")
  array = np.asarray(value)
  if array.shape != () or not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise TypeError(f"`{name}` has shape {array.shape} and dtype {array.dtype}, but should be a real scalar.")
  return float(array)


def check_mode(use_running_average: Any) -> bool | jax.Array:
  """``use_running_average`` as a Python bool, or a traced scalar bool left as it is.

  Anything else is an error: None, strings ("False" is truthy) and numbers would silently pick a mode.
  """
  v = use_running_average
  if isinstance(v, bool | np.bool_):
    return bool(v)
  if isinstance(v, jax.Array | np.ndarray) and v.shape == () and v.dtype == jnp.bool_:
    return v if _is_traced(v) else bool(v)
  raise TypeError(
    f"`use_running_average` is {v!r} ({type(v).__name__}), but should be a bool (or a traced scalar bool): "
    "False to normalize by the batch statistics and update the running ones (training), True to "
    "normalize by the running statistics (evaluation)."
  )


def _check_inputs(x, scale, bias, stats, feature_axes, momentum, epsilon):
  """Static checks: they read shapes, dtypes and concrete numbers only, so they cost nothing under jit."""
  feature_shape = tuple(x.shape[a] for a in feature_axes)
  for name, value in (("scale", scale), ("bias", bias)):
    if value is not None and tuple(jnp.shape(value)) != feature_shape:
      raise ValueError(
        f"`{name}` has shape {tuple(jnp.shape(value))}, but the input {tuple(x.shape)} has "
        f"feature shape {feature_shape} on axes {feature_axes}; they must be equal."
      )
  if stats is not None:
    if not isinstance(stats, BatchStats):
      raise TypeError(f"`stats` is a {type(stats).__name__}, but should be a bnjax.BatchStats or None.")
    for field in ("mean", "var", "renorm_mean", "renorm_std"):
      value = getattr(stats, field)
      if value is None and field.startswith("renorm"):
        continue
      shape = tuple(jnp.shape(value))
      if shape != feature_shape:
        raise ValueError(
          f"`stats.{field}` has shape {shape}, but the input {tuple(x.shape)} has feature "
          f"shape {feature_shape} on axes {feature_axes}; they must be equal."
        )
      kind = jnp.inexact if field == "mean" else jnp.floating
      if not jnp.issubdtype(jnp.result_type(value), kind):
        raise TypeError(
          f"`stats.{field}` has dtype {jnp.result_type(value)}, but running statistics must be floating "
          "point (an integer array would silently truncate every update); start from bnjax.init_batch_stats."
        )
    n = stats.num_batches_tracked
    if n is not None and (jnp.shape(n) != () or not jnp.issubdtype(jnp.result_type(n), jnp.integer)):
      raise TypeError(
        f"`stats.num_batches_tracked` has shape {tuple(jnp.shape(n))} and dtype {jnp.result_type(n)}, but should "
        "be an integer scalar (a count of training batches)."
      )
  m = None if momentum is None else _concrete_scalar("momentum", momentum)
  if m is not None and not 0.0 <= m <= 1.0:
    raise ValueError(f"`momentum` is {m}, but should lie in [0, 1] (outside, running variances can turn negative).")
  eps = _concrete_scalar("epsilon", epsilon)
  if eps is not None and not (eps >= 0.0 and math.isfinite(eps)):
    raise ValueError(f"`epsilon` is {eps}, but should be a finite number >= 0.")


def _fold_factor(rows: int, features: int) -> int:
  """How many rows to fold into the lane axis of a ``(rows, features)`` view, see :class:`Layout`."""
  if features >= 64:
    return 1
  for k in (1, 2, 4, 8, 16, 32, 64):
    if rows % k == 0 and k * features >= 32 and (k * features) % 8 == 0:
      return k
  return 1


class Layout:
  """How per-feature reductions and broadcasts are spelled for one input shape and feature axes.

  With the features on the trailing axes (NHWC, (N, F), ...) a per-feature sum views its operand as
  a matrix ``(rows / k, k * F)``, sums down the columns and finishes with a tiny ``(k, F)`` sum. A
  trailing axis of a few channels (LeNet's 6) is otherwise a poor vector lane: on CPU, XLA's column
  sums over ``(N, H, W, 6)`` ran about 5x slower than over the folded ``(N*H*W/8, 48)`` view, and the
  LeNet training step about 8% faster with it. The view is a free reshape, and elementwise work stays
  in the input's layout, so it still fuses with its neighbours. Per-feature arrays are flat ``(F,)``
  there. Other layouts (NCHW, non-trailing feature axes) reduce over their axes directly, with
  feature-shaped per-feature arrays. ``to_work``/``per_feature_to_work``/``per_feature_from_work``
  convert to and from the working forms.
  """

  def __init__(self, shape: tuple[int, ...], feature_axes: tuple[int, ...]):
    ndim = len(shape)
    self.shape, self.feature_axes = tuple(shape), feature_axes
    self.feature_shape = tuple(shape[a] for a in feature_axes)
    features = math.prod(self.feature_shape)
    self.count = math.prod(shape) // max(features, 1)  # values per feature
    self.flat = feature_axes == tuple(range(ndim - len(feature_axes), ndim)) and features > 0
    self.fold = _fold_factor(self.count, features) if self.flat else 1
    self.reduction_axes = tuple(a for a in range(ndim) if a not in feature_axes)

  def to_work(self, x: jax.Array) -> jax.Array:
    """An input-shaped array, or a mask broadcastable to it, in the working shape (the input's)."""
    return jnp.broadcast_to(x, self.shape)

  def per_feature_to_work(self, v: jax.Array) -> jax.Array:
    return jnp.reshape(v, -1) if self.flat else v

  def per_feature_from_work(self, v: jax.Array) -> jax.Array:
    return jnp.reshape(v, self.feature_shape)

  def sum(self, v: jax.Array) -> jax.Array:
    """Per-feature sum of a working-shape array."""
    if self.flat:
      total = jnp.sum(v.reshape(self.count // self.fold, -1), 0)
      return total.reshape(self.fold, -1).sum(0) if self.fold > 1 else total
    return jnp.sum(v, self.reduction_axes)

  def expand(self, v: jax.Array) -> jax.Array:
    """A per-feature array, ready to broadcast against a working-shape array."""
    if self.flat:
      return v.reshape(self.feature_shape)  # trailing axes: NumPy broadcasting lines them up
    return jnp.expand_dims(v, self.reduction_axes)


def _local_moments(x, layout: Layout, mask):
  """Per-feature (count, mean, M2 = sum of squared deviations) of this shard (see ``_shifted_moments``)."""
  count, m1, mean_d, m2 = _shifted_moments(x, layout, mask)
  return count, m1 + mean_d, m2


def _shifted_moments(x, layout: Layout, mask):
  """Per-feature (count, m1, mean_d, M2 = sum of squared deviations) of this shard: the mean is ``m1 + mean_d``.

  Shifted two-pass form: a first mean ``m1`` (which may carry float32
  accumulation error when the data sit far from zero) is refined by the mean of
  ``d = x - m1``; the variance comes from ``d``, whose values are of the order
  of the spread, so nothing large is ever squared. This keeps float32 variance
  accurate for e.g. mean 1e4, std 1, where ``E[x^2] - E[x]^2`` loses all digits.

  With a mask the count may be 0 (a fully padded shard or feature): then mean and M2 are 0 and the
  count stays 0, so the shard drops out of any combination by counts.

  The mean is returned in two parts because ``x - mean`` is best computed as ``(x - m1) - mean_d``: the
  rounded sum ``m1 + mean_d`` is off by up to half a unit in the last place of the data's magnitude, which
  for a nearly constant feature (spread 1e-4 at 4.5) is a 1e-3 relative error in every deviation.
  """
  if mask is None:
    count = jnp.asarray(float(layout.count), real_dtype(x.dtype))
    m1 = lax.stop_gradient(layout.sum(x) / count)
    d = x - layout.expand(m1)
    mean_d = layout.sum(d) / count
    mean_d2 = layout.sum(_abs2(d)) / count
  else:
    count = layout.sum(mask.astype(real_dtype(x.dtype)))
    safe = jnp.maximum(count, 1.0)
    m1 = lax.stop_gradient(layout.sum(jnp.where(mask, x, 0.0)) / safe)
    # Zero the masked positions before squaring so padding (even inf) never leaks into values or grads.
    d = jnp.where(mask, x - layout.expand(m1), 0.0)
    mean_d = layout.sum(d) / safe
    mean_d2 = layout.sum(_abs2(d)) / safe
  # Values so large that their squares overflow: the variance is inf (inf - inf would say NaN), as in Flax.
  var = jnp.where(jnp.isinf(mean_d2), mean_d2, jnp.maximum(mean_d2 - _abs2(mean_d), 0.0))
  return count, m1, mean_d, var * count


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
) -> tuple[jax.Array, jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None]:
  """Per-feature ``(mean, biased var, count, center)`` of a working-shape ``x`` (and across ``axis_name``).

  ``center`` is ``(m1, mean_d)`` when ``x - mean`` is more exact as ``(x - m1) - mean_d`` (the stable
  variance on one shard), else None.

  ``x`` (and ``mask``) should already be in the reduction dtype and ``layout``'s working shape.
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

  count, m1, mean_d, m2 = _shifted_moments(x, layout, mask)
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


def normalize(
  x: jax.Array,
  mean: jax.Array,
  var: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  feature_axes: tuple[int, ...],
  epsilon: float,
  dtype: Any,
) -> jax.Array:
  """``(x - mean) * rsqrt(var + epsilon) * scale + bias`` with given (running) statistics."""
  layout = Layout(x.shape, feature_axes)
  compute = jnp.promote_types(x.dtype, mean.dtype)

  def per_feature(v):
    return layout.expand(layout.per_feature_to_work(jnp.asarray(v).astype(compute)))

  mul = lax.rsqrt(var.astype(compute) + epsilon)
  if scale is not None:
    mul = mul * jnp.asarray(scale).astype(compute)
  y = (layout.to_work(x.astype(compute)) - per_feature(mean)) * per_feature(mul)
  if bias is not None:
    y = y + per_feature(bias)
  return y.reshape(x.shape).astype(dtype)


def normalize_by_batch(
  x: jax.Array,
  scale: jax.Array,
  bias: jax.Array,
  layout: Layout,
  epsilon: float,
  *,
  mask: jax.Array | None = None,
  axis_name: str | None = None,
  axis_index_groups: Any = None,
  use_fast_variance: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """``(y, mean, var, count)``: ``y = scale * xhat + bias`` with ``xhat`` standardized by batch statistics.

  ``x`` and ``mask`` are in ``layout``'s working shape, ``scale``/``bias`` and the per-feature results
  in its per-feature shape. Differentiation uses the closed form, as a custom JVP so forward and
  reverse mode both work:

      dy = xhat dscale + dbias + k (dx - E[dx] - xhat re E[conj(xhat) dx]),   k = scale * rsqrt(var + epsilon)

  with ``E`` the (masked, cross-device) batch mean (``conj`` and ``re`` only matter for complex input).
  The per-feature factor ``k`` is applied after each batch mean, so the transpose (the backward pass)
  needs only ``sum(dy)`` and ``sum(dy * xhat)``, the same two reductions that give the bias and scale
  gradients, and one elementwise pass for ``dx``. Autodiff through the stable variance's arithmetic
  would add several more passes over the activations.
  """
  moments = functools.partial(
    batch_moments,
    layout=layout,
    mask=mask,
    axis_name=axis_name,
    axis_index_groups=axis_index_groups,
    use_fast_variance=use_fast_variance,
  )
  per_feature = layout.expand

  def batch_mean(v, count):
    if mask is not None:
      v = jnp.where(mask, v, 0.0)
    total = layout.sum(v)
    if axis_name is not None:
      total = lax.psum(total, axis_name, axis_index_groups=axis_index_groups)
    return total / jnp.maximum(count, 1.0)

  def primal(x, scale, bias):
    mean, var, count, center = moments(x)
    r = lax.rsqrt(var + epsilon)
    if mask is not None:
      # A feature with no valid example anywhere has no statistics: its xhat is defined as 0 (y = bias),
      # and, with k = scale * r = 0, no gradient flows to its inputs.
      r = jnp.where(count > 0, r, 0.0)
    if mask is not None:  # padding (even NaN or inf) is replaced before it can reach outputs or gradients
      x = jnp.where(mask, x, 0.0)
    if center is None:
      xhat = (x - per_feature(mean)) * per_feature(r)
    else:
      m1, mean_d = center
      xhat = ((x - per_feature(m1)) - per_feature(mean_d)) * per_feature(r)
    return xhat * per_feature(scale) + per_feature(bias), mean, var, count, xhat, r

  @jax.custom_jvp
  def normalize(x, scale, bias):
    return primal(x, scale, bias)[:4]

  @normalize.defjvp
  def normalize_jvp(primals, tangents):
    (x, scale, bias), (dx, dscale, dbias) = primals, tangents
    y, mean, var, count, xhat, r = primal(x, scale, bias)
    k = scale * r
    dmean = batch_mean(dx, count)
    xhat_dx = batch_mean(_re_conj_mul(xhat, dx), count)
    # Only additions, with each per-feature factor (and sign) inside per_feature(...): the transpose
    # then reduces exactly sum(ct) and sum(xhat * ct), which XLA shares with the bias/scale gradients.
    dy = xhat * per_feature(dscale) + per_feature(dbias)
    dy = dy + per_feature(k) * dx + per_feature(-k * dmean) + xhat * per_feature(-k * xhat_dx)
    # d E[|x - mean|^2] = 2 re E[conj(x - mean) dx], and x - mean = xhat * sqrt(var + epsilon).
    dvar = 2.0 * xhat_dx * jnp.sqrt(var + epsilon)
    if mask is not None:  # masked outputs are placeholders: no gradient flows through them
      dy = jnp.where(mask, dy, 0.0)
    return (y, mean, var, count), (dy, dmean, dvar, jnp.zeros_like(count))

  return normalize(x, scale, bias)


def _check_options(
  update_stats, virtual_batch_size, renorm, renorm_clipping, renorm_momentum, axis_name, skip_nonfinite=False
):
  """Static checks of the variant options (frozen, ghost, renormalized BN, the non-finite guard)."""
  for name, value in (("update_stats", update_stats), ("renorm", renorm), ("skip_nonfinite", skip_nonfinite)):
    if not isinstance(value, bool | np.bool_):
      raise TypeError(f"`{name}` is {value!r} ({type(value).__name__}), but should be a Python bool.")
  if virtual_batch_size is not None:
    if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, numbers.Integral):
      raise TypeError(f"`virtual_batch_size` is {virtual_batch_size!r}, but should be a positive int or None.")
    if virtual_batch_size < 1:
      raise ValueError(f"`virtual_batch_size` is {virtual_batch_size}, but should be a positive int or None.")
    if axis_name is not None:
      raise ValueError(
        f"`virtual_batch_size` ({virtual_batch_size}) and `axis_name` ({axis_name!r}) cannot be combined: ghost "
        "batch norm normalizes small groups on each device, synchronized BN one batch over all devices. Use one."
      )
  if renorm_clipping is not None and not renorm:
    raise ValueError("`renorm_clipping` is set, but `renorm` is False; pass renorm=True to use batch renormalization.")
  if renorm:
    m = _concrete_scalar("renorm_momentum", renorm_momentum)
    if m is not None and not 0.0 <= m <= 1.0:
      raise ValueError(f"`renorm_momentum` is {m}, but should lie in [0, 1].")
    if renorm_clipping is not None:
      if not isinstance(renorm_clipping, tuple | list) or len(renorm_clipping) != 2:
        raise TypeError(f"`renorm_clipping` is {renorm_clipping!r}, but should be a pair (r_max, d_max) or None.")
      r_max, d_max = (
        None if v is None else _concrete_scalar(n, v) for n, v in zip(("r_max", "d_max"), renorm_clipping, strict=True)
      )
      if r_max is not None and not r_max >= 1.0:
        raise ValueError(
          f"`renorm_clipping` has r_max {r_max}, but r_max should be >= 1 (r is clipped to [1/r_max, r_max])."
        )
      if d_max is not None and not d_max >= 0.0:
        raise ValueError(
          f"`renorm_clipping` has d_max {d_max}, but d_max should be >= 0 (d is clipped to [-d_max, d_max])."
        )


# The options of batch_norm that the linen and NNX modules keep as fields of the same names and pass
# through unchanged (one declaration: bnjax.options).
PASSED_OPTIONS = (
  "momentum",
  "epsilon",
  "axis_name",
  "axis_index_groups",
  "use_fast_variance",
  "unbiased_running_var",
  "force_float32_reductions",
  "update_stats",
  "virtual_batch_size",
  "renorm",
  "renorm_clipping",
  "renorm_momentum",
  "track_num_batches",
  "skip_nonfinite",
)


def _where_stats(cond: jax.Array, new: BatchStats, old: BatchStats) -> BatchStats:
  """Field by field ``where(cond, new, old)`` (absent fields stay None), in the new statistics' dtypes."""
  return BatchStats(*(n if n is None else jnp.where(cond, n, o.astype(n.dtype)) for n, o in zip(new, old, strict=True)))


def as_input(x: Any) -> jax.Array:
  """``x`` as an inexact array of rank >= 2 (integer and bool promoted to float32, as Flax does), or raises."""
  x_dtype = getattr(x, "dtype", None) or np.asarray(x).dtype
  if not (jnp.issubdtype(x_dtype, jnp.number) or x_dtype == np.bool_):  # strings, objects, dates
    raise TypeError(f"`x` has dtype {x_dtype}, but batch norm needs a numeric (float, complex, integer or bool) input.")
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.inexact):
    x = x.astype(jnp.float32)
  if x.ndim < 2:
    raise ValueError(
      f"`x` has shape {tuple(x.shape)} (rank {x.ndim}), but batch norm needs rank >= 2: "
      "a batch axis and at least one feature axis."
    )
  return x


def _check_training(
  x,
  stats,
  reduction_axes,
  momentum,
  update_stats,
  renorm,
  virtual_batch_size,
  track_num_batches,
):
  """Training-mode requirements of the options and of the batch, checked before any work."""
  for needed, why in (
    (momentum is None, "`momentum` is None (PyTorch's cumulative average)"),
    (track_num_batches, "`track_num_batches` is True"),
  ):
    if needed and (stats is None or stats.num_batches_tracked is None) and update_stats:
      raise ValueError(
        f"{why}, which needs the batch counter `stats.num_batches_tracked`; start from "
        "bnjax.init_batch_stats(..., num_batches_tracked=True)."
      )
  if renorm:
    if jnp.iscomplexobj(x):
      raise TypeError(f"`renorm=True` needs a real input, but `x` has dtype {x.dtype}.")
    if stats is None or stats.renorm_mean is None or stats.renorm_std is None:
      raise ValueError(
        "`renorm=True` needs `stats.renorm_mean` and `stats.renorm_std` (the moving averages r and d are "
        "measured against); start from bnjax.init_batch_stats(..., renorm=True)."
      )
  if math.prod(x.shape[a] for a in reduction_axes) == 0:
    raise ValueError(
      f"`x` has shape {tuple(x.shape)}: no value to compute training-mode batch statistics from (the batch is "
      "empty); evaluation mode accepts an empty batch."
    )
  batch_axis = reduction_axes[0]
  if virtual_batch_size is not None and x.shape[batch_axis] % virtual_batch_size:
    raise ValueError(
      f"`x` has shape {tuple(x.shape)}, whose batch axis {batch_axis} has {x.shape[batch_axis]} examples, not "
      f"divisible by `virtual_batch_size` {virtual_batch_size}; use a batch size that is a multiple of it."
    )


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
  new = _where_stats(learned, new, stats)
  return new if n is None else new._replace(num_batches_tracked=n + jnp.any(learned).astype(n.dtype))


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
    use_fast_variance: opt in to ``E[x^2] - E[x]^2`` in one pass; it loses
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
  feature_axes = canonicalize_axes(x.ndim, axis)
  reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
  if not reduction_axes:
    raise ValueError(f"`axis` is {axis!r}, which covers every axis of `x`; nothing is left to reduce over.")
  _check_inputs(x, scale, bias, stats, feature_axes, momentum, epsilon)
  _check_options(update_stats, virtual_batch_size, renorm, renorm_clipping, renorm_momentum, axis_name, skip_nonfinite)
  out_dtype = x.dtype if dtype is None else dtype

  def evaluate():
    if stats is None:
      raise ValueError("`stats` is None, but evaluation mode (use_running_average=True) normalizes by them.")
    return normalize(x, stats.mean, stats.var, scale, bias, feature_axes, epsilon, out_dtype), stats

  if use_running_average is True:
    return evaluate()

  _check_training(x, stats, reduction_axes, momentum, update_stats, renorm, virtual_batch_size, track_num_batches)
  reduce_dtype = jnp.promote_types(x.dtype, jnp.float32) if force_float32_reductions else x.dtype
  grouping = Grouping.of(x.shape, feature_axes, reduction_axes[0], virtual_batch_size)
  layout = grouping.layout

  def per_feature(v, default):  # absent scale/bias act as 1/0 (symbolic-zero tangents: free)
    v = jnp.full(tuple(x.shape[a] for a in feature_axes), default, reduce_dtype) if v is None else v
    return grouping.per_feature(jnp.asarray(v).astype(reduce_dtype))

  work_mask = None
  if mask is not None:
    work_mask = layout.to_work(jnp.broadcast_to(jnp.asarray(mask, bool), x.shape).reshape(grouping.shape))
  # Renorm applies scale and bias after its correction, so the normalization itself gets 1 and 0.
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
  )
  if renorm:
    g, beta = per_feature(scale, 1.0), per_feature(bias, 0.0)
    y = renorm_correction(y, mean, var, count, stats, g, beta, epsilon, renorm_clipping, grouping, reduce_dtype)
  y = y.reshape(x.shape).astype(out_dtype)

  new_stats = stats
  if stats is not None and update_stats:
    batch = (layout.per_feature_from_work(v) for v in (mean, var, count))
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
  return jnp.where(use_running_average, y_eval, y), _where_stats(jnp.logical_not(use_running_average), new_stats, stats)
