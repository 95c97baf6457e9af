"""The chapter as an experiment: LeNet + BatchNorm on Fashion-MNIST (``python -m experiments.lenet_fmnist``).

Shaped like Flax's ``examples/imagenet``:

* ``input_pipeline``: Fashion-MNIST from IDX files or tensorflow-datasets;
* ``models`` (and ``conv``): LeNet with ours, Flax's or no BatchNorm; ``models_nnx``: the same in Flax NNX;
* ``train``: the one training/evaluation loop (linen or NNX, one device or a mesh, several processes);
* ``config``: the run's settings, declared once (:class:`config.RunConfig`, one field per flag, each saying
  whether ``--resume`` compares it and whether every process must agree on it);
* ``main``, ``arguments``: the command line (parse, one :func:`train_and_evaluate.train_and_evaluate` call,
  errors mapped to exit codes) and its flags, derived from ``config``;
* ``train_and_evaluate``, ``variant``, ``evaluation``: the run (every variant), one variant phase by phase
  (model, state, epoch loop, files), and what a variant is evaluated with (precise BN, EMA weights);
* ``dataset``, ``compile_cache``, ``distributed``, ``checkpoint``, ``report``: the run's data, JAX's persistent
  compilation cache, process control and agreement, the run's files, and what it prints and plots;
* ``porting``: the chapter's PyTorch LeNet weights, both ways.
"""

from experiments.lenet_fmnist.arguments import parse_args
from experiments.lenet_fmnist.main import main

__all__ = ["main", "parse_args"]
