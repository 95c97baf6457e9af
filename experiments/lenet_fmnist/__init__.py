"""The chapter as an experiment: LeNet + BatchNorm on Fashion-MNIST (``python -m experiments.lenet_fmnist``).

Shaped like Flax's ``examples/imagenet``:

* ``input_pipeline``: Fashion-MNIST from IDX files or tensorflow-datasets;
* ``models`` (and ``conv``): LeNet in linen and NNX, with ours, Flax's or no BatchNorm;
* ``train``: the one training/evaluation loop (linen or NNX, one device or a mesh, several processes);
* ``arguments``, ``main``, ``report``, ``checkpoint``, ``distributed``: the command line, the run,
  what it prints and plots, its files, and process control;
* ``porting``: the chapter's PyTorch LeNet weights, both ways.
"""

from experiments.lenet_fmnist.arguments import parse_args
from experiments.lenet_fmnist.main import main

__all__ = ["main", "parse_args"]
