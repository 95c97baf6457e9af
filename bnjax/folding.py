"""Folding an evaluation-mode batch norm into the conv or dense layer before it.

In evaluation BN is a fixed per-channel affine map, ``y = (z - mean) * m + beta`` with
``m = scale / sqrt(var + epsilon)``, applied to ``z = x @ W + b``. So it can be merged into the layer:

    W' = W * m      (on the kernel's output-channel axis, the last in Flax)
    b' = (b - mean) * m + beta

and inference skips the BN layer entirely (one pass less over every activation). Training needs the
batch statistics, so this is for inference only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp


def fold_batch_norm(
  layer_params: Mapping[str, Any],
  bn_params: Mapping[str, Any],
  bn_stats: Mapping[str, Any],
  epsilon: float = 1e-5,
) -> dict[str, Any]:
  """``{"kernel", "bias"}`` of a conv/dense layer whose output equals the layer followed by eval-mode BN.

  Args:
    layer_params: the layer's ``params``: ``kernel`` with the output features on its last axis (Flax's
      ``Dense``/``Conv``: (in, out), (kh, kw, in, out), ...) and ``bias`` (absent with ``use_bias=False``).
    bn_params: the BN layer's ``params`` (``scale``/``bias``, either absent when not used).
    bn_stats: the BN layer's ``batch_stats`` (``mean``, ``var``).
    epsilon: the BN layer's epsilon.

  Returns:
    ``{"kernel": W', "bias": b'}`` in the kernel's dtype (computed in at least float32): the folded layer
    always has a bias.

  Raises:
    KeyError: a missing ``kernel``, ``mean`` or ``var``.
    ValueError: feature counts that disagree (the BN must normalize the layer's output features), or an
      ``epsilon`` that is negative, NaN or infinite.
  """
  eps = float(epsilon) if isinstance(epsilon, numbers.Real) and not isinstance(epsilon, bool) else None
  if eps is None or not (eps >= 0.0 and math.isfinite(eps)):
    raise ValueError(f"`epsilon` is {epsilon!r}, but should be the BN layer's epsilon: a finite number >= 0.")
  for name, tree, key in (
    ("layer_params", layer_params, "kernel"),
    ("bn_stats", bn_stats, "mean"),
    ("bn_stats", bn_stats, "var"),
  ):
    if key not in tree:
      raise KeyError(f"`{name}` has no {key!r}; it has {sorted(tree)}.")
  kernel = jnp.asarray(layer_params["kernel"])
  features = kernel.shape[-1]
  compute = jnp.promote_types(kernel.dtype, jnp.float32)
  per_channel = {
    "bias": layer_params.get("bias"),
    "mean": bn_stats["mean"],
    "var": bn_stats["var"],
    "scale": bn_params.get("scale"),
    "beta": bn_params.get("bias"),
  }
  for name, value in per_channel.items():
    if value is not None and tuple(jnp.shape(value)) != (features,):
      raise ValueError(
        f"BN {name} has shape {tuple(jnp.shape(value))}, but the kernel {tuple(kernel.shape)} has {features} "
        "output features on its last axis; the BN layer must follow this layer directly."
      )
  as_compute = lambda v, default: jnp.full((features,), default, compute) if v is None else jnp.asarray(v, compute)  # noqa: E731
  m = as_compute(per_channel["scale"], 1.0) * jnp.reciprocal(jnp.sqrt(as_compute(per_channel["var"], 1.0) + epsilon))
  bias = (as_compute(per_channel["bias"], 0.0) - as_compute(per_channel["mean"], 0.0)) * m + as_compute(
    per_channel["beta"], 0.0
  )
  return {"kernel": (kernel.astype(compute) * m).astype(kernel.dtype), "bias": bias.astype(kernel.dtype)}
