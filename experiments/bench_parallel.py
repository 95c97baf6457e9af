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


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m experiments.bench_parallel", description=__doc__.split("\n\n")[0])
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--steps", type=int, default=20, help="steps per timed repeat")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  b = args.batch_size
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.steps * b, 28, 28, 1)).astype(np.uint8)
  labels = rng.integers(0, 10, args.steps * b).astype(np.int32)
  mask = np.ones(b, bool)
  # Host CPU devices, whatever the default backend (on a GPU machine too): this measures the collectives.
  cpus = jax.devices("cpu")
  counts = [n for n in (1, 2, 4) if n <= len(cpus)]
  print(f"{len(cpus)} host cpu devices; global batch {b}, {args.steps} steps per repeat")

  step = jax.jit(train.train_step, static_argnames="mesh", donate_argnums=(0,))

  # Reference: the step without a mesh.
  def one_device():
    state = jax.device_put(new_state(LeNet("ours")), cpus[0])
    data = [
      jax.device_put((images[i * b : (i + 1) * b], labels[i * b : (i + 1) * b]), cpus[0]) for i in range(args.steps)
    ]

    def run(state, n=args.steps):
      losses = []
      for x, y in data[:n]:
        state, m = step(state, x, y)
        losses.append(m["loss_sum"] / b)
      return jax.block_until_ready(state), losses

    return state, run

  def on_mesh(n):
    mesh = sync.make_mesh(n, devices=cpus)
    state = sync.replicate(new_state(LeNet("ours", axis_name=sync.DATA)), mesh)
    sharding = jax.sharding.NamedSharding(mesh, sync.BATCH)
    data = [
      jax.device_put((images[i * b : (i + 1) * b], labels[i * b : (i + 1) * b], mask), sharding)
      for i in range(args.steps)
    ]
    reduces = sync.count_all_reduces(step, state, *data[0], mesh=mesh)

    def run(state, n=args.steps):
      losses = []
      for batch in data[:n]:
        state, m = step(state, *batch, mesh=mesh)
        losses.append(m["loss_sum"] / b)
      return jax.block_until_ready(state), losses

    return state, run, reduces

  rows = {ONE: (*one_device(), 0)}
  for n in counts:
    rows[f"{n} device(s), shard_map step"] = on_mesh(n)

  # Accuracy: 5 steps from the same start, against the one-device step.
  def fresh(state):  # the parallel step donates its state: every run starts from its own copy
    return jax.tree.map(
      lambda a: jax.device_put(a, a.sharding, may_alias=False) if isinstance(a, jax.Array) else a, state
    )

  results = {name: run(fresh(state), 5) for name, (state, run, _) in rows.items()}
  ref_state, ref_losses = results[ONE]
  ref = sync.to_host((ref_state.params, ref_state.batch_stats, [float(v) for v in ref_losses]))

  def max_diff(name):
    state, losses = results[name]
    got = sync.to_host((state.params, state.batch_stats, [float(v) for v in losses]))
    return max(
      float(np.max(np.abs(np.asarray(a) - np.asarray(e))))
      for a, e in zip(jax.tree.leaves(got), jax.tree.leaves(ref), strict=True)
    )

  times = {name: [] for name in rows}
  for _ in range(args.repeats):
    for name, (state, run, _) in rows.items():
      start = fresh(state)
      t0 = time.perf_counter()
      run(start)
      times[name].append(time.perf_counter() - t0)
  out = []
  print(f"{'':36s} {'steps/s':>8s} {'vs 1 device':>12s} {'all-reduces':>12s} {'max diff after 5 steps':>23s}")
  base = args.steps / statistics.median(times[ONE])
  for name, (_, _, reduces) in rows.items():
    sps = args.steps / statistics.median(times[name])
    row = {
      "name": name,
      "steps_per_sec": sps,
      "all_seconds": times[name],
      "all_reduces": reduces,
      "max_diff": max_diff(name),
    }
    out.append(row)
    print(f"{name:36s} {sps:8.1f} {sps / base:11.2f}x {reduces:12d} {row['max_diff']:23.1e}")
  result = {
    "devices": len(cpus),
    "batch_size": b,
    "steps": args.steps,
    "repeats": args.repeats,
    "rows": out,
  }
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
  return result


if __name__ == "__main__":
  main()
