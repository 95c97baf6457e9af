"""Several processes for the chapter's CLI: joining them, a watchdog on every wait, a barrier, agreeing on
the run's settings, and the run's devices (:func:`setup_devices`).

Only process control lives here (global JAX configuration, exiting the process); the mesh and the
synchronized-BN pieces are :mod:`bnjax.sync`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from bnjax import sync
from experiments.lenet_fmnist.checkpoint import CHECKPOINT, RunError
from experiments.lenet_fmnist.config import AGREED, RunConfig


class DistributedError(RuntimeError):
  """Setting up or running on several processes failed; the message says what happened and what to do."""


def initialize(coordinator: str, num_processes: int, process_id: int, timeout_s: float = 60) -> None:
  """``jax.distributed.initialize`` with CPU collectives (gloo) and a bounded wait.

  Every process calls it with the same ``coordinator`` (``HOST:PORT`` of process 0) and
  ``num_processes``, and its own ``process_id``. If the others have not all arrived within
  ``timeout_s`` seconds, the process prints one ``error:`` line naming the coordinator and the count
  expected, and exits with status 3 (JAX's own deadline would abort with a C++ stack trace, so a
  watchdog ends the wait first).
  """
  if not 0 <= process_id < num_processes:
    raise DistributedError(f"--process-id is {process_id}, but should lie in [0, {num_processes - 1}].")
  host, _, port = coordinator.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedError(f"--coordinator is {coordinator!r}, but should be HOST:PORT (e.g. 127.0.0.1:12355).")
  message = (
    f"error: process {process_id} of {num_processes} could not join the coordinator at {coordinator} within "
    f"{timeout_s:.0f} s: not every process arrived. Start all {num_processes} processes with the same --coordinator "
    "and --num-processes, each with its own --process-id, within that time (--timeout)."
  )
  try:
    _join(timeout_s, message, coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
  except Exception as e:  # e.g. the coordinator's port is taken
    raise DistributedError(
      f"process {process_id} of {num_processes} could not join the coordinator at {coordinator} ({_first_line(e)})."
    ) from None


def _join(timeout_s: float, stalled: str, **where) -> None:
  """``jax.distributed.initialize(**where)`` with CPU collectives (gloo), bounded by a watchdog that exits with the
  line ``stalled`` after ``timeout_s`` seconds (JAX's own deadline would abort with a C++ stack trace)."""
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices need it; GPUs ignore it
  with Watchdog(timeout_s, lambda: stalled):
    jax.distributed.initialize(
      **where,
      initialization_timeout=math.ceil(timeout_s) + 60,
      # A dead peer is reported by the training watchdog (timeout_s) before the runtime's own check.
      heartbeat_timeout_seconds=max(math.ceil(2 * timeout_s), 10),
    )


def _first_line(e: Exception) -> str:
  """``Type: first line of the message`` (200 characters at most) of an error from JAX's runtime."""
  return f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"


def join_from_environment(config: RunConfig) -> RunConfig:
  """``--distributed auto``: ``jax.distributed.initialize()`` finds the coordinator, the number of processes and
  this process's index in the job's environment (SLURM, Open MPI, Cloud TPU, ...); returns ``config`` with them.

  Called before anything else of the run, so that only process 0 takes ``--out``'s lock. A process outside such a
  job, or one that cannot join within ``--timeout``, stops with one ``error:`` line.
  """
  message = (
    f"error: --distributed auto: the job's processes did not all join within {config.timeout:.0f} s (--timeout); "
    "start the same command in every task of the job (e.g. srun ... python -m experiments.lenet_fmnist ...)."
  )
  try:
    _join(config.timeout, message)
  except ValueError as e:  # JAX found no cluster: "coordinator_address should be defined."
    raise RunError(
      f"--distributed auto found no SLURM, Open MPI or Cloud TPU job in this process's environment ({e}). Run "
      "it in every task of such a job (e.g. srun), or start the processes with --coordinator, --num-processes "
      "and --process-id."
    ) from None
  except Exception as e:  # e.g. the coordinator's port is taken
    raise RunError(f"--distributed auto could not join the job's processes ({_first_line(e)}).") from None
  joined = dataclasses.replace(config, num_processes=jax.process_count(), process_id=jax.process_index())
  if joined.num_processes > 1 and len(joined.seeds) > 1:
    raise RunError(f"--seeds trains its replicas in one process; this job has {joined.num_processes} processes")
  return joined


class Watchdog:
  """Ends the process with one ``error:`` line (``message()``) when nothing ``beat()`` for ``timeout_s`` seconds.

  When another process dies or hangs, the collectives of the survivors wait for it; the watchdog
  turns that wait into a clear message and exit status 3 instead of a silent hang. ``beat()`` after
  every finished step.
  """

  def __init__(self, timeout_s: float, message: Callable[[], str], exit_code: int = 3):
    self.timeout_s, self.message, self.exit_code = timeout_s, message, exit_code
    self.last = time.monotonic()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._watch, daemon=True, name="bnjax-watchdog")

  def __enter__(self):
    self.beat()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()

  def beat(self) -> None:
    self.last = time.monotonic()

  def _watch(self):
    while not self._stop.wait(min(1.0, self.timeout_s / 4)):
      if time.monotonic() - self.last > self.timeout_s:
        print(f"\n{self.message()}", file=sys.stderr, flush=True)
        os._exit(self.exit_code)


def stalled_message(timeout_s: float, doing: str) -> str:
  """The watchdog's message while training: who stopped, for how long, and what to do."""
  return (
    f"error: process {jax.process_index()} of {jax.process_count()}: no progress for {timeout_s:.0f} s {doing}: "
    "another process has probably died or hangs, so the collectives cannot complete. Exiting; the last "
    "checkpoint is kept (rerun every process with --resume). --timeout sets this limit."
  )


def allgather_rows(row: np.ndarray) -> np.ndarray:
  """Every process's ``row`` (the same shape and dtype on each), stacked in process order.

  One device per process carries the rows, so processes with different numbers of local devices can
  exchange them (``jax.experimental.multihost_utils`` lays its arrays out on every process's devices as a
  ``(process_count, local_device_count)`` grid, which only exists when every process has as many).
  """
  from jax.sharding import Mesh, NamedSharding, PartitionSpec

  if jax.process_count() == 1:
    return np.asarray(row)[None]
  firsts = [
    min((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id) for p in range(jax.process_count())
  ]
  mesh = Mesh(np.array(firsts), ("processes",))
  mine = jax.device_put(np.asarray(row)[None], firsts[jax.process_index()])
  rows = jax.make_array_from_single_device_arrays(
    (len(firsts), *np.shape(row)), NamedSharding(mesh, PartitionSpec("processes")), [mine]
  )
  everyone = jax.jit(lambda x: x, out_shardings=NamedSharding(mesh, PartitionSpec()))(rows)
  return np.asarray(everyone.addressable_data(0))


def barrier(name: str) -> None:
  """All processes meet here (a no-op with one process); a process at another barrier is an error."""
  if jax.process_count() > 1:
    names = allgather_rows(np.array([zlib.crc32(name.encode())], np.uint32))
    if (names != names[0]).any():
      raise DistributedError(f"process {jax.process_index()} reached barrier {name!r} while another did not.")


def setup_devices(config: RunConfig):
  """Joins the other processes and builds the mesh; None for the one-device path. Errors before any work."""
  from experiments.lenet_fmnist import train

  if config.num_processes > 1:
    try:
      if config.distributed != "auto":  # (auto joined first of all: distributed.join_from_environment)
        initialize(config.coordinator, config.num_processes, config.process_id, timeout_s=config.timeout)
    except DistributedError as e:
      raise RunError(str(e)) from None
    if config.process_id:  # only process 0 speaks (the C++ collectives' notes too); errors still go to stderr
      sys.stdout.flush()
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, sys.stdout.fileno())
      os.close(devnull)
  devices = jax.local_device_count() if config.devices is None else config.devices
  if config.devices is None and train.devices_requested():  # (host devices an earlier --seeds run asked for)
    devices = 1
  if len(config.seeds) > 1:  # replicas in one program, no data-parallel mesh (the flags allow nothing else)
    devices = 1
  if config.num_processes == 1 and devices == 1 and config.bn_group_size is None:
    return None
  try:
    mesh = sync.make_mesh(devices, config.bn_group_size)
    sync.check_divisible(mesh, config.batch_size)
  except ValueError as e:  # the library names its arguments; the CLI user knows the flags
    message = str(e).replace("`devices_per_process`", "--devices").replace("`bn_group_size`", "--bn-group-size")
    raise RunError(message.replace("the global batch size", "--batch-size")) from None
  return mesh


def make_watchdog(config: RunConfig):
  """A watchdog with several processes (one process cannot wait for another), else a no-op."""
  if config.num_processes < 2:
    return contextlib.nullcontext()
  return Watchdog(config.timeout, lambda: stalled_message(config.timeout, "waiting for the other processes"))


def checkpoint_digest(path: Path) -> str | None:
  """A SHA-256 prefix of the checkpoint file, None when there is none."""
  return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def agreed_settings(config: RunConfig, fingerprint: str, out: Path, norms: list[str], mesh) -> dict:
  """Everything that shapes the trajectory, for the processes to agree on (not where each one runs from):
  :data:`config.AGREED`'s fields, the data's ``fingerprint``, with a mesh each process's number of devices
  on it, and with ``--resume`` the digests of the checkpoints resumed from."""
  settings = {**{k: getattr(config, k) for k in AGREED}, "data": fingerprint}
  if mesh is not None:  # the devices each process trains on (--devices, default all: may differ per machine)
    settings["devices"] = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  if config.resume:  # every process must resume from the same checkpoint (--out must be shared)
    settings["checkpoints"] = {norm: checkpoint_digest(out / norm / CHECKPOINT) for norm in norms}
  return settings


def agree_across_processes(settings: dict) -> None:
  """Every process must run the same settings: process 0's are gathered with everyone's, and a difference
  stops every process with the same one line, before any work."""
  if jax.process_count() == 1:
    return
  size = 4096
  blob = json.dumps(settings, sort_keys=True).encode()
  if len(blob) > size:
    raise RunError(f"the run's settings take {len(blob)} bytes, more than the {size} processes compare")
  rows = allgather_rows(np.frombuffer(blob.ljust(size), np.uint8))
  ours = json.loads(bytes(rows[0]).decode())
  for p, row in enumerate(rows[1:], start=1):
    theirs = json.loads(bytes(row).decode())
    differ = [
      f"{k} {theirs.get(k)} (process 0: {ours.get(k)})" for k in sorted(ours | theirs) if ours.get(k) != theirs.get(k)
    ]
    if differ:
      devices = " (pass every process --devices N, N at most the fewest local devices any has)"
      raise RunError(
        f"process {p} of {len(rows)} runs with {', '.join(differ)}; every process must be started with the same "
        "settings and data, or the replicas would train different models"
        f"{devices if 'devices' in theirs and theirs['devices'] != ours['devices'] else ''}. Nothing was trained."
      )
