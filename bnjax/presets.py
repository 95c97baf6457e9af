"""Keyword presets that give :func:`bnjax.batch_norm` and the modules another framework's semantics."""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np


def pytorch_preset(momentum: float | None = 0.1, eps: float = 1e-5) -> dict[str, Any]:
  """Keyword arguments for ``torch.nn.BatchNorm*(momentum=momentum, eps=eps)`` semantics.

  Pass them to :func:`bnjax.batch_norm`, :class:`bnjax.BatchNorm` or :class:`bnjax.nnx.BatchNorm`:

  * PyTorch's ``momentum`` is the weight of the *new* value; bnjax's is the old one's, so it becomes
    ``1 - momentum``. ``momentum=None`` (PyTorch's cumulative moving average) stays None.
  * the running variance is updated with the unbiased batch variance (``unbiased_running_var``);
  * the batch counter ``num_batches_tracked`` is kept (``track_num_batches``; for the function, start
    from ``init_batch_stats(..., num_batches_tracked=True)``), so :mod:`bnjax.porting` maps it both ways.

  Layout is separate: PyTorch is NCHW (``axis=1``), bnjax defaults to the last axis.

  >>> pytorch_preset()
  {'momentum': 0.9, 'epsilon': 1e-05, 'unbiased_running_var': True, 'track_num_batches': True}
  """
  if momentum is not None:
    if isinstance(momentum, bool | np.bool_) or not isinstance(momentum, numbers.Real) or not 0.0 <= momentum <= 1.0:
      raise ValueError(f"`momentum` is {momentum!r}, but PyTorch's momentum is a number in [0, 1] or None.")
  if isinstance(eps, bool | np.bool_) or not isinstance(eps, numbers.Real) or not (eps >= 0 and math.isfinite(eps)):
    raise ValueError(f"`eps` is {eps!r}, but should be a finite number >= 0.")
  return {  # plain Python floats (a NumPy scalar in, a float out)
    "momentum": None if momentum is None else 1.0 - float(momentum),
    "epsilon": float(eps),
    "unbiased_running_var": True,
    "track_num_batches": True,
  }
