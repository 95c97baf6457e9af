"""Checks of :func:`bnjax.batch_norm`'s arguments: they raise early, name the argument and show its value.

They read shapes, dtypes and concrete numbers only, so they cost nothing under ``jax.jit``; traced values
are the caller's responsibility.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax.state import BatchStats

Axes = int | Sequence[int]


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


def feature_and_reduction_axes(ndim: int, axis: Axes) -> tuple[tuple[int, ...], tuple[int, ...]]:
  """``(feature axes, reduction axes)`` of an input of rank ``ndim``, or raises ValueError.

  The feature axes are ``axis`` canonicalized (:func:`canonicalize_axes`); at least one axis must be left to reduce.
  """
  feature_axes = canonicalize_axes(ndim, axis)
  reduction_axes = tuple(a for a in range(ndim) if a not in feature_axes)
  if not reduction_axes:
    raise ValueError(f"`axis` is {axis!r}, which covers every axis of `x`; nothing is left to reduce over.")
  return feature_axes, reduction_axes


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


def check_inputs(x, scale, bias, stats, feature_axes, momentum, epsilon):
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


def check_options(
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


def check_training(
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
