"""bnjax: batch normalization for JAX and Flax, with explicit state.

Public API:
  batch_norm        the pure function: (y, new_stats) from x, scale, bias, stats.
  BatchStats        NamedTuple(mean, var, ...) of running statistics.
  init_batch_stats  zeros/ones running statistics for a feature shape.
  BatchNorm         Flax linen module, a drop-in for flax.linen.BatchNorm.
  precise_batch_stats  population statistics of every BN layer's input (precise BN).
  pytorch_preset    keyword arguments for torch.nn.BatchNorm* semantics (function and modules).
  fold_batch_norm   an eval-mode BN folded into the preceding conv/dense kernel and bias.

Submodules (imported on demand): bnjax.nnx (BatchNorm for Flax NNX), bnjax.sync (the mesh and
helpers of a data-parallel step with synchronized BN), bnjax.porting (PyTorch conv/dense/BN weights,
both ways). bnjax depends on jax, flax and numpy only; the D2L chapter's experiment (data set,
LeNet, training loop, CLI) is ``experiments/lenet_fmnist``.
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
__version__ = "0.4.7"
