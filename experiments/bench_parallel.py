"""Data-parallel overhead on host devices: steps/s on 1, 2 and 4 devices, all-reduces per step, accuracy.

    python -m experiments.bench_parallel            # 4 host CPU devices in this process
    python -m experiments.bench_parallel --out experiments/results/bench_parallel_cpu.json

The chapter's LeNet step at global batch 256, with the same random Fashion-MNIST-sized batches for
every row: the experiment's train step without a mesh, and the same step on meshes of 1, 2 and
4 devices (``shard_map``, BN synchronized with ``bnjax.sync``), timed round-robin (a slow spell of a
shared machine hits every row alike), median of ``--repeats``. On a 2-core CPU the host devices share
the cores, so no speed-up is expected: the figures measure what the collectives cost. Also printed:
the all-reduces in each compiled program, and the largest difference (loss, parameters, running
statistics) from the one-device run after 5 steps.
"""

from __future__ import annotations

import os

# Host devices must be configured before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from bnjax import sync  # noqa: E402
from experiments.lenet_fmnist import train  # noqa: E402
from experiments.lenet_fmnist.models import LeNet, init_lenet  # noqa: E402

ONE = "1 device, no mesh"


def new_state(model):
  return train.create_train_state(train.linen_apply(model), init_lenet(model, jax.random.key(0)), 1.0)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.bench_parallel", description=__doc__.split("\n\n")[0])
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=None)
  return p.parse_args(argv)


def one_device_runner(step, images, labels, b: int, steps: int, device):
  """``(state, run)``: the step without a mesh on ``device``; ``run(state, n)`` -> ``(state, losses)``."""
  state = jax.device_put(new_state(LeNet("ours")), device)
  data = [jax.device_put((images[i * b : (i + 1) * b], labels[i * b : (i + 1) * b]), device) for i in range(steps)]

  def run(state, n=steps):
    losses = []
    for x, y in data[:n]:
      state, m = step(state, x, y)
      losses.append(m["loss_sum"] / b)
    return jax.block_until_ready(state), losses

  return state, run


def mesh_runner(step, images, labels, b: int, steps: int, n: int, devices):
  """``(state, run, all_reduces)``: the same step in a ``shard_map`` over the first ``n`` of ``devices``."""
  mesh = sync.make_mesh(n, devices=devices)
  state = sync.replicate(new_state(LeNet("ours", axis_name=sync.DATA)), mesh)
  sharding = jax.sharding.NamedSharding(mesh, sync.BATCH)
  mask = np.ones(b, bool)
  data = [
    jax.device_put((images[i * b : (i + 1) * b], labels[i * b : (i + 1) * b], mask), sharding) for i in range(steps)
  ]
  reduces = sync.count_all_reduces(step, state, *data[0], mesh=mesh)

  def run(state, n=steps):
    losses = []
    for batch in data[:n]:
      state, m = step(state, *batch, mesh=mesh)
      losses.append(m["loss_sum"] / b)
    return jax.block_until_ready(state), losses

  return state, run, reduces


def fresh(state):
  """A copy of ``state`` where it lies: the step donates its state, so every run starts from its own."""
  return jax.tree.map(
    lambda a: jax.device_put(a, a.sharding, may_alias=False) if isinstance(a, jax.Array) else a, state
  )


def max_diffs(rows: dict) -> dict[str, float]:
  """Per row, the largest difference from the one-device step after 5 steps from the same start."""

  def host(result):
    state, losses = result
    return sync.to_host((state.params, state.batch_stats, [float(v) for v in losses]))

  results = {name: host(run(fresh(state), 5)) for name, (state, run, _) in rows.items()}
  return {
    name: max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(e))))
      for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(results[ONE]), strict=True)
    )
    for name, got in results.items()
  }


def timings(rows: dict, repeats: int) -> dict[str, list[float]]:
  """Round-robin repeats of every row's run (a slow spell of the machine hits every row alike)."""
  times = {name: [] for name in rows}
  for _ in range(repeats):
    for name, (state, run, _) in rows.items():
      start = fresh(state)
      t0 = time.perf_counter()
      run(start)
      times[name].append(time.perf_counter() - t0)
  return times


def main(argv=None) -> dict:
  args = parse_args(argv)
  b = args.batch_size
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.steps * b, 28, 28, 1)).astype(np.uint8)
  labels = rng.integers(0, 10, args.steps * b).astype(np.int32)
  # Host CPU devices, whatever the default backend (on a GPU machine too): this measures the collectives.
  cpus = jax.devices("cpu")
  print(f"{len(cpus)} host cpu devices; global batch {b}, {args.steps} steps per repeat")
  step = jax.jit(train.train_step, static_argnames="mesh", donate_argnums=(0,))
  rows = {ONE: (*one_device_runner(step, images, labels, b, args.steps, cpus[0]), 0)}
  for n in (n for n in (1, 2, 4) if n <= len(cpus)):
    rows[f"{n} device(s), shard_map step"] = mesh_runner(step, images, labels, b, args.steps, n, cpus)
  diffs = max_diffs(rows)
  times = timings(rows, args.repeats)
  out = []
  print(f"{'':36s} {'steps/s':>8s} {'vs 1 device':>12s} {'all-reduces':>12s} {'max diff after 5 steps':>23s}")
  base = args.steps / statistics.median(times[ONE])
  for name, (_, _, reduces) in rows.items():
    sps = args.steps / statistics.median(times[name])
    out.append(
      {"name": name, "steps_per_sec": sps, "all_seconds": times[name], "all_reduces": reduces, "max_diff": diffs[name]}
    )
    print(f"{name:36s} {sps:8.1f} {sps / base:11.2f}x {reduces:12d} {diffs[name]:23.1e}")
  result = {"devices": len(cpus), "batch_size": b, "steps": args.steps, "repeats": args.repeats, "rows": out}
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
