"""What the linen and NNX modules share: the options they pass through, the statistics they create, the call.

Both modules keep :data:`bnjax.functional.PASSED_OPTIONS` as attributes of the same names and
defaults; :func:`optional_statistics` says which running statistics a module holds besides ``mean``
and ``var``, and :func:`call_batch_norm` is their one call of :func:`bnjax.batch_norm`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bnjax.functional import PASSED_OPTIONS, BatchStats, batch_norm

# Defaults of the passed-through options, the same for both modules (and for batch_norm).
OPTION_DEFAULTS: dict[str, Any] = {
  "momentum": 0.99,
  "epsilon": 1e-5,
  "axis_name": None,
  "axis_index_groups": None,
  "use_fast_variance": False,
  "unbiased_running_var": False,
  "force_float32_reductions": True,
  "update_stats": True,
  "virtual_batch_size": None,
  "renorm": False,
  "renorm_clipping": None,
  "renorm_momentum": 0.99,
  "track_num_batches": False,
  "skip_nonfinite": False,
}
assert tuple(OPTION_DEFAULTS) == PASSED_OPTIONS


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
