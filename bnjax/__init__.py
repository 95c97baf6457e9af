"""bnjax: batch normalization for JAX and Flax, with explicit state.

Public API:
  batch_norm        the pure function: (y, new_stats) from x, scale, bias, stats.
  BatchStats        NamedTuple(mean, var) of running statistics.
  init_batch_stats  zeros/ones running statistics for a feature shape.
  BatchNorm         Flax linen module, a drop-in for flax.linen.BatchNorm.
  precise_batch_stats  population statistics of every BN layer's input (precise BN).
  pytorch_preset    keyword arguments for torch.nn.BatchNorm* semantics (function and modules).
  fold_batch_norm   an eval-mode BN folded into the preceding conv/dense kernel and bias.

Submodules (imported on demand): bnjax.nnx (BatchNorm for Flax NNX), bnjax.data
(Fashion-MNIST), bnjax.models (LeNet, fold_lenet), bnjax.train (jitted training),
bnjax.parallel (data-parallel training on a device mesh, several processes), bnjax.porting
(PyTorch weights, both ways).
"""

from bnjax.folding import fold_batch_norm
from bnjax.functional import BatchStats, batch_norm, init_batch_stats
from bnjax.linen import BatchNorm
from bnjax.precise import precise_batch_stats
from bnjax.presets import pytorch_preset

__all__ = [
  "BatchNorm",
  "BatchStats",
  "batch_norm",
  "fold_batch_norm",
  "init_batch_stats",
  "precise_batch_stats",
  "pytorch_preset",
]
__version__ = "0.1.0"
