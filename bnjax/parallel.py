"""Data-parallel training on a device mesh, with batch norm synchronized exactly over the global batch.

The mesh has two axes, ``("group", "data")``. Every global batch is split over all devices (both
axes); parameters, optimizer state and running statistics are replicated. Each BN layer combines its
batch statistics over the ``"data"`` axis with :func:`bnjax.batch_norm`'s ``axis_name``: one
collective per layer in the forward pass, carrying every shard's (count, mean, M2), so shards are
weighted by their numbers of valid examples and a padded (masked) last batch stays exact. With
``bn_group_size=g`` the ``"data"`` axis has ``g`` devices and statistics are combined within each
group of ``g`` consecutive devices only (what ``axis_index_groups`` does under ``pmap``; ``shard_map``
does not support ``axis_index_groups``, a mesh axis is its equivalent there). Gradients, loss and
metrics are always reduced over every device, and the running statistics are averaged over the groups
so the replicas never drift apart. With one group (the default) this is synchronized BN over all
devices, and the numbers are those of one device with the whole batch, up to float rounding.

The step is ``jax.jit`` of a ``shard_map`` (not a jit over ``NamedSharding``-annotated arrays left to
the SPMD partitioner): the per-device program then says exactly which collectives run, BN's count-
weighted combination included, and ``axis_name`` is what the BN layers already understand. The
gradient is taken *outside* the ``shard_map``, of the global mean loss, so JAX's transpose of the
collectives gives exactly the gradient of the one-device computation.

Several processes (hosts): call :func:`initialize` first; :func:`make_mesh` then spans every
process's devices, and each process feeds only the rows of each global batch that live on its own
devices (:func:`shard_batch`).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bnjax import train

GROUP, DATA = "group", "data"
BATCH = P((GROUP, DATA))  # the batch axis is split over every device
REPLICATED = P()


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


def make_mesh(devices_per_process: int | None = None, bn_group_size: int | None = None) -> Mesh:
  """A ``("group", "data")`` mesh over the first ``devices_per_process`` local devices of every process.

  ``bn_group_size`` (default: all devices) is the number of devices whose BN statistics are combined.
  """
  local = jax.local_device_count()
  n = local if devices_per_process is None else devices_per_process
  if not 1 <= n <= local:
    platform = jax.local_devices()[0].platform
    hint = ""
    if platform == "cpu":
      hint = f"; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={max(n, 2)} gives that many host devices"
    raise ValueError(f"--devices is {n}, but this process has {local} local {platform} device(s){hint}.")
  by_process: dict[int, list] = {}
  for d in jax.devices():
    by_process.setdefault(d.process_index, []).append(d)
  devices = [d for p in sorted(by_process) for d in sorted(by_process[p], key=lambda d: d.id)[:n]]
  g = len(devices) if bn_group_size is None else bn_group_size
  if g < 1 or len(devices) % g:
    raise ValueError(f"bn_group_size is {g}, but it should divide the number of devices, {len(devices)}.")
  return Mesh(np.array(devices).reshape(len(devices) // g, g), (GROUP, DATA))


def check_batch_size(mesh: Mesh, batch_size: int) -> None:
  """A global batch must split evenly over the devices: a clear error before any work."""
  if batch_size % mesh.size:
    raise ValueError(
      f"--batch-size {batch_size} (the global batch) is not divisible by the {mesh.size} devices; use a "
      f"multiple of {mesh.size}, e.g. {batch_size // mesh.size * mesh.size or mesh.size}."
    )


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host values (identical on every process) as arrays replicated over ``mesh``."""
  sharding = NamedSharding(mesh, REPLICATED)

  def put(v):
    v = np.asarray(v)
    return jax.make_array_from_callback(v.shape, sharding, lambda index: v[index])

  return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
  """Replicated arrays as NumPy, from this process's own copy (works with several processes)."""
  return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else a, tree)


def shard_batch(mesh: Mesh, images: np.ndarray, labels: np.ndarray, idx: np.ndarray, mask: np.ndarray):
  """The global batch ``images[idx]``, ``labels[idx]``, ``mask`` split over the mesh.

  Every process knows ``idx`` (same seed, same permutation) but gathers and transfers only the rows of
  its own devices.
  """
  sharding = NamedSharding(mesh, BATCH)

  def make(source, rows):
    shape = (len(idx),) + source.shape[1:]
    return jax.make_array_from_callback(shape, sharding, lambda index: source[rows[index[0]]])

  return make(images, idx), make(labels, idx), jax.make_array_from_callback(mask.shape, sharding, lambda i: mask[i])


def _metrics(logits, labels, loss_sum, mask) -> train.Metrics:
  """The one-device metrics of this shard, summed over every device."""
  return jax.lax.psum(train._batch_metrics(logits, labels, loss_sum, mask), (GROUP, DATA))


def make_train_step(mesh: Mesh) -> Callable:
  """``step(state, images, labels, mask) -> (state, metrics)``, jitted, on global batches from :func:`shard_batch`.

  The state's model must use ``axis_name="data"`` for its BN layers (``LeNet(axis_name=parallel.DATA)``).
  """

  def local_loss(apply_fn, params, batch_stats, images, labels, mask):
    logits, updates = apply_fn(
      {"params": params, "batch_stats": batch_stats},
      train.as_float_images(images),
      train=True,
      mask=mask,
      mutable=["batch_stats"],
    )
    _, loss_sum = train.cross_entropy(logits, labels, mask)
    metrics = _metrics(logits, labels, loss_sum, mask)
    # Statistics are already combined within a BN group; averaging over the groups keeps replicas equal.
    new_stats = jax.lax.pmean(updates.get("batch_stats", {}), GROUP)
    return metrics["loss_sum"] / jnp.maximum(metrics["count"], 1), (new_stats, metrics)

  @functools.partial(jax.jit, donate_argnums=(0,))
  def step(state, images, labels, mask):
    sharded = jax.shard_map(
      functools.partial(local_loss, state.apply_fn),
      mesh=mesh,
      in_specs=(REPLICATED, REPLICATED, BATCH, BATCH, BATCH),
      out_specs=(REPLICATED, (REPLICATED, REPLICATED)),
    )
    grads, (batch_stats, metrics) = jax.grad(
      lambda p: sharded(p, state.batch_stats, images, labels, mask), has_aux=True
    )(state.params)
    return state.apply_gradients(grads=grads, batch_stats=batch_stats), metrics

  return step


def make_eval_step(mesh: Mesh) -> Callable:
  """``eval_step(state, images, labels, mask) -> metrics`` in evaluation mode (running statistics)."""

  def local(apply_fn, params, batch_stats, images, labels, mask):
    logits = apply_fn({"params": params, "batch_stats": batch_stats}, train.as_float_images(images), train=False)
    return _metrics(logits, labels, train.cross_entropy(logits, labels, mask)[1], mask)

  @jax.jit
  def eval_step(state, images, labels, mask):
    return jax.shard_map(
      functools.partial(local, state.apply_fn),
      mesh=mesh,
      in_specs=(REPLICATED, REPLICATED, BATCH, BATCH, BATCH),
      out_specs=REPLICATED,
    )(state.params, state.batch_stats, images, labels, mask)

  return eval_step


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


def train_epoch(
  state,
  step: Callable,
  mesh: Mesh,
  images: np.ndarray,
  labels: np.ndarray,
  perm: np.ndarray,
  batch_size: int,
  *,
  on_step: Callable[[int], None] | None = None,
):
  """One pass in ``perm``'s order (the same on every process), in global batches of ``batch_size``.

  The remainder batch is padded (wrapping around ``perm``) and masked, as in :func:`bnjax.train.train_epoch`;
  a remainder of one example is dropped (:func:`bnjax.train.epoch_plan`).
  """
  check_batch_size(mesh, batch_size)
  metrics = None
  for start, size in train.epoch_plan(len(perm), batch_size):
    idx, mask = (np.asarray(a) for a in train.batch_indices(perm, start, batch_size, size))
    state, m = step(state, *shard_batch(mesh, images, labels, idx, mask))
    metrics = m if metrics is None else train._add(metrics, m)
    if on_step is not None:
      jax.block_until_ready(m)  # progress (and the watchdog) count finished steps, not dispatched ones
      on_step(1)
  return state, metrics


def evaluate(state, eval_step: Callable, mesh: Mesh, images: np.ndarray, labels: np.ndarray, batch_size: int = 1000):
  """Evaluation metrics over the whole set, in global batches split over the mesh (the last padded, masked)."""
  batch_size = -(-batch_size // mesh.size) * mesh.size
  metrics = None
  for start in range(0, len(labels), batch_size):
    pos = start + np.arange(batch_size)
    idx, mask = np.minimum(pos, len(labels) - 1), pos < len(labels)
    m = eval_step(state, *shard_batch(mesh, images, labels, idx, mask))
    metrics = m if metrics is None else train._add(metrics, m)
  return metrics


def count_all_reduces(step: Callable, *args) -> int:
  """How many all-reduce ops the compiled (optimized) program of ``step(*args)`` runs."""
  text = step.lower(*args).compile().as_text()
  return sum(1 for line in text.splitlines() if " all-reduce(" in line or " all-reduce-start(" in line)
