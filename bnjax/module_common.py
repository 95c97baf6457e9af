"""What the linen and NNX modules share: the options they pass through, the statistics they create, the call.

The options are declared once, by :func:`bnjax.batch_norm`'s signature (:data:`bnjax.functional.OPTION_DEFAULTS`):
both modules keep them as attributes of the same names and defaults, which :func:`check_declares_options`
verifies when each module is defined. :func:`stores_options` makes the NNX constructor's arguments those
attributes; :func:`optional_statistics` says which running statistics a module holds besides ``mean`` and
``var``, and :func:`call_batch_norm` is their one call of :func:`bnjax.batch_norm`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from bnjax.functional import OPTION_DEFAULTS, PASSED_OPTIONS, BatchStats, batch_norm


def check_declares_options(init: Callable[..., Any], owner: str) -> None:
  """Raises TypeError unless ``init`` takes every option of :func:`bnjax.batch_norm` with its default.

  Called once per module class, at import: a new option of ``batch_norm`` that a module does not
  declare, or declares with another default, fails there rather than at the first call.
  """
  parameters = inspect.signature(init).parameters
  for name, default in OPTION_DEFAULTS.items():
    if name not in parameters:
      raise TypeError(f"`{owner}` does not declare the option `{name}` of bnjax.batch_norm.")
    declared = parameters[name].default
    if type(declared) is not type(default) or declared != default:
      raise TypeError(f"`{owner}` declares `{name}` with default {declared!r}, but bnjax.batch_norm's is {default!r}.")


def stores_options(init: Callable[..., None]) -> Callable[..., None]:
  """Decorates an ``__init__`` so that its options (:data:`bnjax.functional.PASSED_OPTIONS`) become attributes.

  A call's arguments are bound to ``init``'s own signature (defaults applied) and each option is stored
  under its name before ``init``'s body runs, so the constructor lists its options once, in its signature.
  The signature is checked first (:func:`check_declares_options`).
  """
  check_declares_options(init, f"{init.__module__}.{init.__qualname__}")
  signature = inspect.signature(init)

  @functools.wraps(init)
  def wrapper(self, *args: Any, **kwargs: Any) -> None:
    try:
      arguments = signature.bind(self, *args, **kwargs)
    except TypeError:  # a wrong call: raise Python's own message, as the undecorated __init__ would
      return init(self, *args, **kwargs)
    arguments.apply_defaults()
    for name in PASSED_OPTIONS:
      setattr(self, name, arguments.arguments[name])
    init(self, *args, **kwargs)

  return wrapper


def optional_statistics(module: Any, feature_shape: tuple[int, ...], dtype: Any) -> dict[str, jax.Array]:
  """Initial values of the statistics beyond ``mean``/``var`` that ``module``'s options need, by field name.

  They exist only when an option uses them, so default checkpoints keep Flax's names: PyTorch's batch
  counter for ``momentum=None`` or ``track_num_batches``, renorm's moving mean and std for ``renorm``.
  """
  extra = {}
  if module.momentum is None or module.track_num_batches:
    extra["num_batches_tracked"] = jnp.zeros((), jnp.int32)
  if module.renorm:
    extra["renorm_mean"] = jnp.zeros(feature_shape, dtype)
    extra["renorm_std"] = jnp.ones(feature_shape, dtype)
  return extra


def call_batch_norm(
  module: Any,
  x: jax.Array,
  scale: jax.Array | None,
  bias: jax.Array | None,
  stats: dict[str, jax.Array | None],
  *,
  mode: bool | jax.Array,
  axis: Any,
  mask: jax.Array | None,
  renorm_clipping: Any,
  **overrides: Any,
) -> tuple[jax.Array, BatchStats]:
  """:func:`bnjax.batch_norm` with ``module``'s options; a call's ``renorm_clipping`` overrides the field.

  ``stats`` maps :class:`BatchStats` field names to values (absent optional fields: None or missing).
  """
  options = {name: getattr(module, name) for name in PASSED_OPTIONS}
  if renorm_clipping is not None:
    options["renorm_clipping"] = renorm_clipping
  options.update(overrides)
  return batch_norm(
    x,
    scale,
    bias,
    BatchStats(**{name: stats.get(name) for name in BatchStats._fields}),
    use_running_average=mode,
    axis=axis,
    mask=mask,
    **options,
  )
