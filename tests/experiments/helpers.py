"""Helpers shared by the experiment's tests: synthetic Fashion-MNIST files, a train state, the CLI's
arguments, and the CLI started as processes (the library's helpers are in tests/helpers.py)."""

import gzip
import os
import struct
import subprocess
import sys

import numpy as np

from tests.helpers import ROOT


def write_idx(path, array, magic, compress=True):
  """Writes `array` (uint8) as an IDX file, gzipped when `compress`."""
  payload = struct.pack(f">{1 + array.ndim}I", magic, *array.shape) + np.asarray(array, np.uint8).tobytes()
  if compress:
    with gzip.open(str(path) + ".gz", "wb") as f:
      f.write(payload)
  else:
    with open(path, "wb") as f:
      f.write(payload)


def make_fmnist_dir(directory, n_train=512, n_test=128, seed=0, compress=True):
  """A small, learnable Fashion-MNIST look-alike: each class is a bright bar at its own position."""
  from experiments.lenet_fmnist import input_pipeline as data

  rng = np.random.default_rng(seed)
  directory.mkdir(parents=True, exist_ok=True)
  for split, n in (("train", n_train), ("test", n_test)):
    labels = rng.integers(0, 10, n).astype(np.uint8)
    images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
      images[i, 2 + 2 * c : 5 + 2 * c, 4:24] = 255
    write_idx(directory / data.FILES[f"{split}_images"], images, data.IMAGE_MAGIC, compress)
    write_idx(directory / data.FILES[f"{split}_labels"], labels, data.LABEL_MAGIC, compress)
  return directory


def new_state(model, key, lr):
  """The chapter's train state (plain SGD) for a linen LeNet initialized from ``key``."""
  from experiments.lenet_fmnist import train
  from experiments.lenet_fmnist.models import init_lenet

  return train.create_train_state(train.linen_apply(model), init_lenet(model, key), lr)


def lenet_compiled_ahead(train_data, test_data, lr, *, store=None, batch_size=64, **compile_ahead):
  """``(state, shuffle key, futures)``: a linen LeNet (ours) whose epoch's and evaluation's programs
  ``train.compile_ahead`` prepares from the state's shapes (``batch_size``; ``store``: loaded from it or saved
  to it)."""
  import functools

  import jax

  from experiments.lenet_fmnist import train
  from experiments.lenet_fmnist.models import LeNet, init_lenet

  model = LeNet(norm="ours")
  init = functools.partial(init_lenet, model)
  apply = train.linen_apply(model)

  def create(variables):
    return train.create_train_state(apply, variables, lr)

  shapes = jax.eval_shape(create, train.init_run_shapes(init, 0)[0])
  futures = train.compile_ahead(shapes, train_data, test_data, batch_size, store=store, **compile_ahead)
  variables, key = train.init_run(init, 0, store)
  return create(variables), key, futures


def cli(data_dir, out, *extra, batch_size=64, devices="1"):
  """The CLI's arguments for a quick run on a synthetic data directory, then ``extra``.

  ``devices="1"`` runs the one-device path (conftest.py gives this process 4 host devices); ``None``
  passes no ``--devices`` (every local device, or what ``extra`` says).
  """
  return [
    "--data-dir",
    str(data_dir),
    "--out",
    str(out),
    "--allow-partial-data",
    "--batch-size",
    str(batch_size),
    "--no-progress",
    *(["--devices", devices] if devices is not None else []),
    *extra,
  ]


def cli_command(*args, ctrl_c=False):
  """The command line that runs the CLI as a process (from the repository root).

  ``ctrl_c``: with Python's own Ctrl-C handler even where the suite runs as a background job (`cmd &`, nohup),
  whose children start with SIGINT ignored and so would never see a Ctrl-C a test sends.
  """
  if ctrl_c:
    start = (
      "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
      "sys.argv[0] = 'lenet_fmnist'; runpy.run_module('experiments.lenet_fmnist', run_name='__main__')"
    )
    return [sys.executable, "-c", start, *args]
  return [sys.executable, "-m", "experiments.lenet_fmnist", *args]


def host_devices_env(count):
  """The environment of a CLI process on ``count`` host CPU devices (JAX_PLATFORMS=cpu: the same on a GPU machine)."""
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={count}", "JAX_PLATFORMS": "cpu"}


def start_cli(args, env, ctrl_c=False):
  """The CLI started as a process from the repository root, its output piped; returns the Popen object."""
  return subprocess.Popen(
    cli_command(*args, ctrl_c=ctrl_c), cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def launch(fmnist_dir, out, *extra, cache=None, ctrl_c=False):
  """Starts one CLI process (one device, its output unbuffered) on ``fmnist_dir``; ``cache``: its compilation cache;
  ``ctrl_c``: see :func:`cli_command`."""
  args = cli(fmnist_dir, out, *extra) + (["--compile-cache", str(cache)] if cache else [])
  return start_cli(args, {**os.environ, "PYTHONUNBUFFERED": "1"}, ctrl_c=ctrl_c)
