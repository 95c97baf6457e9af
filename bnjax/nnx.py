"""`bnjax.nnx.BatchNorm`: a drop-in replacement for `flax.nnx.BatchNorm`.

Like the linen module (:mod:`bnjax.linen`), it only keeps state (``scale``/``bias`` as
``nnx.Param``, ``mean``/``var`` as ``nnx.BatchStat``) and the train/eval switch; the math is
:func:`bnjax.batch_norm`, so the two modules give the same numbers bit for bit.

    >>> from flax import nnx
    >>> import jax, jax.numpy as jnp
    >>> from bnjax.nnx import BatchNorm
    >>> layer = BatchNorm(6, momentum=0.9, rngs=nnx.Rngs(0))
    >>> y = layer(jax.random.normal(jax.random.key(0), (5, 6)))  # training: updates mean/var in place
    >>> layer.eval()  # or nnx.view(layer, use_running_average=True)
    >>> y = layer(jnp.ones((5, 6)))
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx.nn import dtypes, initializers

from bnjax.checks import canonicalize_axes, check_mode
from bnjax.functional import OPTION_DEFAULTS as D
from bnjax.module_common import call_batch_norm, optional_statistics, stores_options
from bnjax.state import BatchStats

_ZEROS, _ONES = initializers.zeros_init(), initializers.ones_init()  # Flax's defaults
_NO_MODE = (
  "No `use_running_average` was given to bnjax.nnx.BatchNorm: pass it to the constructor, to the call, "
  "or use model.train() / model.eval() / nnx.view(model, use_running_average=True/False)."
)


class BatchNorm(nnx.Module):
  """BatchNorm with the constructor, state and call of ``flax.nnx.BatchNorm``.

  Deliberate differences, as for the linen module (README, "Deliberate differences from Flax"):
  ``use_fast_variance`` defaults to False (the stable variance); ``use_running_average`` must be a
  bool (or a traced bool); a feature without valid (unmasked) values keeps its statistics. bnjax's
  own options come last: ``unbiased_running_var`` (PyTorch's running-variance update) and
  ``force_float32_reductions``.

  Args:
    num_features: the size of the feature axis.
    use_running_average: True to normalize by the running statistics (evaluation), False to
      normalize by the batch's and update them (training).
    axis: the feature axis of the input.
    momentum: decay of the running averages (``torch momentum = 1 - momentum``).
    epsilon: added to the variance.
    dtype: the dtype of the computation and result (default: promoted from input and parameters).
    param_dtype: the dtype of ``scale``/``bias``.
    use_bias, use_scale: whether ``bias`` (beta) / ``scale`` (gamma) exist.
    bias_init, scale_init: their initializers (used here, not stored).
    axis_name, axis_index_groups: the mapped axis (and its groups) over which statistics combine.
    use_fast_variance: opt in to ``E[x^2] - E[x]^2``, less stable far from zero.
    promote_dtype: called as Flax calls it, on ``(x, mean, var, scale, bias)`` with ``dtype=``.
    rngs: where the initializers' keys come from.
    bias_metadata, scale_metadata: passed to the ``nnx.Param`` (e.g. sharding annotations).
    unbiased_running_var: update the running variance with ``n / (n - 1)`` times the batch's.
    force_float32_reductions: compute statistics in at least float32.
    update_stats, virtual_batch_size, renorm, renorm_clipping, renorm_momentum, track_num_batches, skip_nonfinite:
      bnjax's variants, as in the linen module (``momentum=None`` too); renorm adds the
      ``renorm_mean``/``renorm_std`` statistics and the counter ``num_batches_tracked``.
  """

  @stores_options  # the options (momentum ... skip_nonfinite) become attributes of the same names
  def __init__(
    self,
    num_features: int,
    *,
    use_running_average: bool | None = False,
    axis: int = -1,
    momentum: float | None = D["momentum"],
    epsilon: float = D["epsilon"],
    dtype: Any | None = None,
    param_dtype: Any = jnp.float32,
    use_bias: bool = True,
    use_scale: bool = True,
    bias_init: Any = _ZEROS,
    scale_init: Any = _ONES,
    axis_name: str | None = D["axis_name"],
    axis_index_groups: Any = D["axis_index_groups"],
    use_fast_variance: bool = D["use_fast_variance"],
    promote_dtype: Any = dtypes.promote_dtype,
    rngs: nnx.Rngs,
    bias_metadata: Mapping[str, Any] = MappingProxyType({}),
    scale_metadata: Mapping[str, Any] = MappingProxyType({}),
    unbiased_running_var: bool = D["unbiased_running_var"],
    force_float32_reductions: bool = D["force_float32_reductions"],
    update_stats: bool = D["update_stats"],
    virtual_batch_size: int | None = D["virtual_batch_size"],
    renorm: bool = D["renorm"],
    renorm_clipping: tuple[Any, Any] | None = D["renorm_clipping"],
    renorm_momentum: float = D["renorm_momentum"],
    track_num_batches: bool = D["track_num_batches"],
    skip_nonfinite: bool = D["skip_nonfinite"],
  ):
    feature_shape = (num_features,)
    self.mean = nnx.BatchStat(jnp.zeros(feature_shape, jnp.float32))
    self.var = nnx.BatchStat(jnp.ones(feature_shape, jnp.float32))
    self.scale = (
      nnx.Param(scale_init(rngs.params(), feature_shape, param_dtype), **scale_metadata)
      if use_scale
      else nnx.data(None)
    )
    self.bias = (
      nnx.Param(bias_init(rngs.params(), feature_shape, param_dtype), **bias_metadata) if use_bias else nnx.data(None)
    )
    self.num_features, self.use_running_average, self.axis = num_features, use_running_average, axis
    self.dtype, self.param_dtype, self.promote_dtype = dtype, param_dtype, promote_dtype
    self.use_bias, self.use_scale = use_bias, use_scale
    # Optional statistics exist only when an option uses them (same names as the linen module's).
    extra = optional_statistics(self, feature_shape, jnp.float32)
    for name in BatchStats._fields[2:]:
      setattr(self, name, nnx.BatchStat(extra[name]) if name in extra else nnx.data(None))

  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
    renorm_clipping: tuple[Any, Any] | None = None,
  ):
    """Normalizes ``x``; in training mode (``use_running_average=False``) updates the statistics in place.

    ``renorm_clipping`` overrides the attribute for this call (e.g. traced values from a schedule).
    """
    mode = use_running_average if use_running_average is not None else self.use_running_average
    if mode is None:
      raise ValueError(_NO_MODE)
    mode = check_mode(mode)
    x = jnp.asarray(x)
    if x.ndim < 2:
      raise ValueError(f"`x` has shape {tuple(x.shape)} (rank {x.ndim}), but BatchNorm needs rank >= 2.")
    (axis,) = canonicalize_axes(x.ndim, self.axis)
    if x.shape[axis] != self.num_features:
      raise ValueError(
        f"`x` has shape {tuple(x.shape)}: {x.shape[axis]} features on axis {self.axis}, but this BatchNorm "
        f"was built for num_features={self.num_features}."
      )
    scale = self.scale[...] if self.scale is not None else None
    bias = self.bias[...] if self.bias is not None else None
    # Flax's promote_dtype decides the computation's dtype; the running statistics stay as stored (float32):
    # cast to float16, a variance near 9e4 becomes inf and every output 0 (flax.nnx.BatchNorm does that).
    x, _, _, scale, bias = self.promote_dtype((x, self.mean[...], self.var[...], scale, bias), dtype=self.dtype)
    stats = {name: getattr(self, name) for name in BatchStats._fields}
    stats = {k: v[...] for k, v in stats.items() if v is not None}
    y, new_stats = call_batch_norm(
      self, x, scale, bias, stats, mode=mode, axis=axis, mask=mask, renorm_clipping=renorm_clipping
    )
    if mode is not True and self.update_stats:
      for name, value in zip(BatchStats._fields, new_stats, strict=True):
        if value is not None:
          getattr(self, name)[...] = value
    return y

  def set_view(self, use_running_average: bool | None = None):
    """The hook ``nnx.view`` (and ``train()``/``eval()``) call to switch modes.

    Args:
      use_running_average: if True, the stored batch statistics will be used instead of computing the
        batch statistics on the input.
    """
    if use_running_average is not None:
      self.use_running_average = use_running_average
