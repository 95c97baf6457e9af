"""`bnjax.BatchNorm`: a drop-in replacement for `flax.linen.BatchNorm`.

The module only does bookkeeping (parameters, the ``batch_stats`` collection,
the train/eval switch); the math is :func:`bnjax.batch_norm`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax.linen import dtypes, initializers, module
from flax.linen.module import Module, compact

from bnjax.checks import canonicalize_axes, check_mode
from bnjax.functional import OPTION_DEFAULTS as D
from bnjax.module_common import call_batch_norm, check_declares_options, optional_statistics
from bnjax.state import stats_dtypes

Initializer = Any


class BatchNorm(Module):
  """BatchNorm Module with the fields, defaults and variable names of `flax.linen.BatchNorm`.

  Parameters are ``params/{scale,bias}``, running statistics
  ``batch_stats/{mean,var}`` (starting at 0 and 1), all with the feature shape,
  so checkpoints move between this module and Flax's unchanged. The statistics
  are float32, or the input's/parameters' dtype when that is more precise
  (float64 under ``jax_enable_x64``; a complex mean for complex input).
  As in Flax, the running statistics are not updated while the module is
  initializing, and ``axis_name`` is ignored then; a batch of one example is
  accepted (at ``init`` silently).

  Deliberate differences from Flax:

  * ``use_fast_variance`` defaults to False: the variance is computed in a
    numerically stable form (Flax's default ``E[x^2] - E[x]^2`` returns garbage
    in float32 when ``|mean| >> std``, e.g. mean 1e4, std 1). Set it to True for
    Flax's behaviour.
  * ``unbiased_running_var`` (new, default False) updates the running variance
    with the unbiased batch variance, as ``torch.nn.BatchNorm*`` does.
  * bnjax's variants, all off by default (see :func:`bnjax.batch_norm` for the math):
    ``update_stats=False`` (train with batch statistics, keep the running ones),
    ``virtual_batch_size`` (ghost BN), ``renorm``/``renorm_clipping``/``renorm_momentum``
    (batch renormalization; adds ``batch_stats/{renorm_mean,renorm_std}``), ``momentum=None``
    (PyTorch's cumulative average) and ``track_num_batches`` (both keep PyTorch's counter in
    ``batch_stats/num_batches_tracked``). :func:`bnjax.pytorch_preset` sets them the PyTorch way.

  Attributes:
    use_running_average: if True, normalize by the running statistics.
    axis: the feature axis (or axes) of the input.
    momentum: decay of the running averages (``torch momentum = 1 - momentum``).
    epsilon: added to the variance to avoid dividing by zero.
    dtype: the dtype of the result (default: inferred from input and params).
    param_dtype: the dtype of the parameters.
    use_bias: if True, add ``bias`` (beta).
    use_scale: if True, multiply by ``scale`` (gamma).
    bias_init: initializer for ``bias``.
    scale_init: initializer for ``scale``.
    axis_name: mapped axis over which to combine batch statistics.
    axis_index_groups: subgroups of ``axis_name``.
    use_fast_variance: opt in to ``E[x^2] - E[x]^2``, less stable far from zero.
    force_float32_reductions: compute statistics in at least float32.
    unbiased_running_var: PyTorch-style unbiased running variance update.
    update_stats: whether training calls update the running statistics.
    virtual_batch_size: ghost batch norm's group size (None: the whole batch).
    renorm: batch renormalization.
    renorm_clipping: ``(r_max, d_max)``; the call's ``renorm_clipping`` overrides it (for schedules).
    renorm_momentum: decay of renorm's moving mean and standard deviation.
    track_num_batches: keep a count of training batches (implied by ``momentum=None``).
    skip_nonfinite: a feature whose batch statistics are NaN or inf keeps its running statistics.

  >>> import jax, jax.numpy as jnp
  >>> bn = BatchNorm(momentum=0.9)
  >>> x = jnp.ones((4, 3))
  >>> variables = bn.init(jax.random.key(0), x, use_running_average=False)
  >>> y, updates = bn.apply(variables, x, use_running_average=False, mutable=['batch_stats'])
  """

  use_running_average: bool | None = None
  axis: int | tuple[int, ...] = -1
  momentum: float | None = D["momentum"]
  epsilon: float = D["epsilon"]
  dtype: Any | None = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = initializers.zeros
  scale_init: Initializer = initializers.ones
  axis_name: str | None = D["axis_name"]
  axis_index_groups: Any = D["axis_index_groups"]
  use_fast_variance: bool = D["use_fast_variance"]
  force_float32_reductions: bool = D["force_float32_reductions"]
  unbiased_running_var: bool = D["unbiased_running_var"]
  update_stats: bool = D["update_stats"]
  virtual_batch_size: int | None = D["virtual_batch_size"]
  renorm: bool = D["renorm"]
  renorm_clipping: tuple[Any, Any] | None = D["renorm_clipping"]
  renorm_momentum: float = D["renorm_momentum"]
  track_num_batches: bool = D["track_num_batches"]
  skip_nonfinite: bool = D["skip_nonfinite"]

  @compact
  def __call__(
    self,
    x: jax.Array,
    use_running_average: bool | None = None,
    *,
    mask: jax.Array | None = None,
    renorm_clipping: tuple[Any, Any] | None = None,
  ) -> jax.Array:
    """Normalizes ``x`` by batch (training) or running (evaluation) statistics.

    Args:
      x: the input, rank >= 2.
      use_running_average: overrides the field of the same name; exactly one
        of the two must be set.
      mask: boolean array broadcastable to ``x``; False entries are left out of
        the batch statistics.
      renorm_clipping: ``(r_max, d_max)`` for this call, e.g. traced values from a schedule;
        overrides the field.

    Returns:
      The normalized input, with the shape of ``x``.
    """
    use_running_average = module.merge_param("use_running_average", self.use_running_average, use_running_average)
    x = jnp.asarray(x)
    if x.ndim < 2:
      raise ValueError(f"`x` has shape {tuple(x.shape)} (rank {x.ndim}), but BatchNorm needs rank >= 2.")
    feature_axes = canonicalize_axes(x.ndim, self.axis)
    feature_shape = tuple(x.shape[a] for a in feature_axes)
    mean_dtype, var_dtype = stats_dtypes(x.dtype, self.param_dtype)

    inits = {
      "mean": lambda: jnp.zeros(feature_shape, mean_dtype),
      "var": lambda: jnp.ones(feature_shape, var_dtype),
      **{k: (lambda v=v: v) for k, v in optional_statistics(self, feature_shape, var_dtype).items()},
    }
    variables = {name: self.variable("batch_stats", name, init) for name, init in inits.items()}
    scale = self.param("scale", self.scale_init, feature_shape, self.param_dtype) if self.use_scale else None
    bias = self.param("bias", self.bias_init, feature_shape, self.param_dtype) if self.use_bias else None

    initializing = self.is_initializing()
    # Flax's output dtype rule: the promoted type of the input and the parameters unless `dtype` is set.
    out_dtype = dtypes.canonicalize_dtype(*(a for a in (x, scale, bias) if a is not None), dtype=self.dtype)
    # A traced flag (possible under jit) selects inside batch_norm; the statistics are then always written.
    mode = check_mode(use_running_average)
    # As in Flax, nothing is synchronized (or learned) while initializing.
    overrides = {"axis_name": None, "axis_index_groups": None} if initializing else {}
    y, new_stats = call_batch_norm(
      self,
      x,
      scale,
      bias,
      {name: v.value for name, v in variables.items()},
      mode=mode,
      axis=feature_axes,
      mask=mask,
      renorm_clipping=renorm_clipping,
      dtype=out_dtype,
      **overrides,
    )
    if mode is not True and not initializing and self.update_stats:
      for name, variable in variables.items():
        variable.value = getattr(new_stats, name)
    return y


check_declares_options(BatchNorm.__init__, "bnjax.BatchNorm")  # its fields are batch_norm's options, same defaults
