"""The run's data: loaded (in a thread, while jax is imported), checked against the flags, fingerprinted, agreed
on by every process, and placed where the loop reads them.

jax is imported inside :func:`prepare_data` only, so that :func:`load_data` can start first.
"""

from __future__ import annotations

from pathlib import Path

from experiments.lenet_fmnist.checkpoint import RunError, data_fingerprint
from experiments.lenet_fmnist.config import RunConfig


def load_data(config: RunConfig):
  """Fashion-MNIST as ``--data-dir``/``--data-source`` say, raw uint8 pixels; RunError when it cannot be read."""
  from experiments.lenet_fmnist import input_pipeline

  try:
    # Raw uint8 pixels: the training step scales them on the device (bit for bit as x / 255).
    return input_pipeline.load_fashion_mnist(
      config.data_dir, source=config.data_source, expect_full=not config.allow_partial_data, pixels="uint8"
    )
  except input_pipeline.DataError as e:
    raise RunError(str(e)) from None


def check_data(dataset, config: RunConfig, norms: list[str]) -> None:
  """One line naming the data and the device; RunError, before any epoch trains, when the data set is too small
  for training, evaluation, a batch or precise BN."""
  from experiments.lenet_fmnist import report
  from experiments.lenet_fmnist.evaluation import check_one_full_batch, precise_batches

  n_train, n_test = len(dataset.train_labels), len(dataset.test_labels)
  print(f"Fashion-MNIST from {dataset.source}: {n_train} train, {n_test} test; device {report.device_name()}")
  if n_train < 2 or n_test < 1:
    raise RunError(
      f"Fashion-MNIST from {dataset.source} has {n_train} training and {n_test} "
      "test examples; training needs at least 2 and evaluation at least 1."
    )
  if any(precise_batches(norm, config) for norm in norms):
    check_one_full_batch(n_train, config.batch_size)  # before any epoch trains, not after one
  if config.batch_size > n_train:  # (its padding would be allocated: 10^8 runs out of memory)
    raise RunError(
      f"--batch-size is {config.batch_size}, but the training set has {n_train} examples; use at "
      f"most {n_train} (one batch is then the whole set)."
    )


def prepare_data(dataset, config: RunConfig, out: Path, norms: list[str], mesh):
  """``(fingerprint, (train, test))``: the host arrays' fingerprint, and where the loop reads them (as
  :class:`train.Data`); every process agrees on the settings and data first."""
  from experiments.lenet_fmnist import train
  from experiments.lenet_fmnist.distributed import agree_across_processes, agreed_settings

  check_data(dataset, config, norms)
  fingerprint = data_fingerprint(*dataset[:4])
  agree_across_processes(agreed_settings(config, fingerprint, out, norms, mesh))
  # (several seeds on CPU: the data on each host device the seeds are split over)
  where = mesh if mesh is not None else train.replica_mesh(len(config.seeds))
  data = tuple(train.Data.put(x, y, where) for x, y in (dataset[:2], dataset[2:4]))
  if where is not None and mesh is None:
    seeds, devices = len(config.seeds), where.size
    print(f"{seeds} seeds split over {devices} host CPU devices ({seeds // devices} each, one after the other)")
  if mesh is not None:
    print(
      f"data parallel: {mesh.size} devices ({mesh.shape['group']} BN group(s) of {mesh.shape['data']}), "
      f"{config.num_processes} process(es); global batch {config.batch_size}"
    )
  return fingerprint, data
