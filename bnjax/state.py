"""The state of a batch-norm layer: :class:`BatchStats`, its initial values and dtypes, the moving average.

The update rule itself is in the module docstring of :mod:`bnjax.functional`.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


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


def where_stats(cond: jax.Array, new: BatchStats, old: BatchStats) -> BatchStats:
  """Field by field ``where(cond, new, old)`` (absent fields stay None), in the new statistics' dtypes."""
  return BatchStats(*(n if n is None else jnp.where(cond, n, o.astype(n.dtype)) for n, o in zip(new, old, strict=True)))
