"""Several processes for the chapter's CLI: joining them, a watchdog on every wait, a barrier.

Only process control lives here (global JAX configuration, exiting the process); the mesh and the
synchronized-BN pieces are :mod:`bnjax.sync`.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
import zlib
from collections.abc import Callable

import jax
import numpy as np


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
  jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices need it; GPUs ignore it
  message = (
    f"error: process {process_id} of {num_processes} could not join the coordinator at {coordinator} within "
    f"{timeout_s:.0f} s: not every process arrived. Start all {num_processes} processes with the same --coordinator "
    "and --num-processes, each with its own --process-id, within that time (--timeout)."
  )
  with Watchdog(timeout_s, lambda: message):
    try:
      jax.distributed.initialize(
        coordinator,
        num_processes,
        process_id,
        initialization_timeout=math.ceil(timeout_s) + 60,
        # A dead peer is reported by the training watchdog (timeout_s) before the runtime's own check.
        heartbeat_timeout_seconds=max(math.ceil(2 * timeout_s), 10),
      )
    except Exception as e:  # e.g. the coordinator's port is taken
      raise DistributedError(
        f"process {process_id} of {num_processes} could not join the coordinator at {coordinator} "
        f"({type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''})."
      ) from None


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
