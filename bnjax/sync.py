"""The pieces of a data-parallel training step with batch norm synchronized over the global batch.

Synchronized BN itself is :func:`bnjax.batch_norm`'s ``axis_name``: inside ``shard_map`` (or
``pmap``/``vmap``) each BN layer combines its shards' (count, mean, M2) in one collective, weighted by
counts, so a padded (masked) shard adds nothing and the statistics are those of the whole batch. What a
step around it needs is here:

* :func:`make_mesh`: a ``("group", "data")`` mesh. BN layers use ``axis_name=DATA``; with
  ``bn_group_size=g`` the ``"data"`` axis has ``g`` devices, so statistics combine within groups of
  ``g`` consecutive devices (``shard_map`` does not support ``axis_index_groups``; a mesh axis is its
  equivalent). Gradients and metrics are reduced over both axes.
* :func:`average_over_groups`: running statistics averaged over the groups, so replicas stay equal.
* :func:`replicate` / :func:`to_host`: host values in and out of mesh-replicated arrays (with several
  processes too: each process passes identical values and reads its own copy; an array split over this
  process's devices comes back whole).
* :func:`count_all_reduces`: how many all-reduces a compiled step runs (one per BN layer forward).

A complete step (``shard_map`` over this mesh, the gradient taken outside it) is the chapter's loop,
``experiments/lenet_fmnist/train.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

GROUP, DATA = "group", "data"
BATCH = P((GROUP, DATA))  # a batch axis split over every device of the mesh
REPLICATED = P()


def make_mesh(
  devices_per_process: int | None = None, bn_group_size: int | None = None, devices: Sequence | None = None
) -> Mesh:
  """A ``("group", "data")`` mesh over the first ``devices_per_process`` devices of every process.

  Args:
    devices_per_process: how many of each process's devices to use (default: all of them).
    bn_group_size: how many devices combine their BN statistics (default: all devices of the mesh).
    devices: the devices to choose from (default ``jax.devices()``; e.g. ``jax.devices("cpu")``).
  """
  devices = list(jax.devices() if devices is None else devices)
  by_process: dict[int, list] = {}
  for d in devices:
    by_process.setdefault(d.process_index, []).append(d)
  local = len(by_process.get(jax.process_index(), []))
  n = local if devices_per_process is None else devices_per_process
  if not 1 <= n <= local:
    platform = devices[0].platform if devices else "no"
    hint = ""
    if platform == "cpu":
      hint = f"; on CPU, XLA_FLAGS=--xla_force_host_platform_device_count={max(n, 2)} gives that many host devices"
    raise ValueError(f"`devices_per_process` is {n}, but this process has {local} local {platform} device(s){hint}.")
  chosen = [d for p in sorted(by_process) for d in sorted(by_process[p], key=lambda d: d.id)[:n]]
  g = len(chosen) if bn_group_size is None else bn_group_size
  if g < 1 or len(chosen) % g:
    raise ValueError(f"`bn_group_size` is {g}, but it should divide the number of devices, {len(chosen)}.")
  return Mesh(np.array(chosen).reshape(len(chosen) // g, g), (GROUP, DATA))


def check_divisible(mesh: Mesh, batch_size: int) -> None:
  """A global batch must split evenly over the mesh's devices: a clear error before any work."""
  if batch_size % mesh.size:
    raise ValueError(
      f"the global batch size {batch_size} is not divisible by the {mesh.size} devices; use a "
      f"multiple of {mesh.size}, e.g. {batch_size // mesh.size * mesh.size or mesh.size}."
    )


def average_over_groups(batch_stats: Any) -> Any:
  """Inside ``shard_map``: running statistics (already combined within a BN group) averaged over the groups.

  Integer leaves (PyTorch's batch counter) are the same in every group and stay as they are.
  """

  def average(v):
    return jax.lax.pmean(v, GROUP) if jnp.issubdtype(v.dtype, jnp.inexact) else v

  return jax.tree.map(average, batch_stats)


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Host values (identical on every process) as arrays replicated over ``mesh``."""
  sharding = NamedSharding(mesh, REPLICATED)

  def put(v):
    v = np.asarray(v)
    return jax.make_array_from_callback(v.shape, sharding, lambda index: v[index])

  return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
  """Arrays as NumPy: whole where this process holds all of an array (one device, or replicated or split over
  this process's devices), else, for an array replicated over several processes, from this process's own copy."""

  def host(a):
    if not isinstance(a, jax.Array):
      return a
    return np.asarray(a) if a.is_fully_addressable else np.asarray(a.addressable_data(0))

  return jax.tree.map(host, tree)


def count_all_reduces(step: Callable, *args, **kwargs) -> int:
  """How many all-reduce ops the compiled (optimized) program of the jitted ``step(*args, **kwargs)`` runs."""
  text = step.lower(*args, **kwargs).compile().as_text()
  return sum(1 for line in text.splitlines() if " all-reduce(" in line or " all-reduce-start(" in line)
