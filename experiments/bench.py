"""Side-by-side throughput: bnjax vs Flax's BatchNorm vs the chapter's PyTorch code, in one sitting.

    python -m experiments.bench --end-to-end  # the main job vs the chapter's PyTorch code, whole processes
    python -m experiments.bench               # LeNet train loop (warm steps), folded inference, BN op
    python -m experiments.bench --quick       # a smoke test small enough for CI

End to end: ``python -m experiments.lenet_fmnist`` and ``python -m experiments.torch_lenet`` (the
chapter's loop with ``nn.BatchNorm2d/1d``: same epochs, batch, lr and per-epoch test evaluation on the
same IDX files) run as subprocesses, alternating, after one warm-up pair (so the compilation cache a
user has on a second run counts). Each run's wall time is measured from outside, start-up, data
loading, compilation and file writing included; peak memory is the child's maximum resident set
size as the OS reports it. The ratio is torch wall / bnjax wall (> 1: bnjax is faster).

Model section: the chapter's LeNet at batch 256, float32, SGD lr 1.0, the same random
Fashion-MNIST-sized data for every row. bnjax rows run the experiment's ``train.train_epoch`` (data on the
device, on-device shuffle, scan-driven loop); PyTorch rows run the chapter's eager loop (forward,
cross-entropy, backward, ``SGD.step``). Warm-up is excluded; the first (compiling) call is reported
apart; figures are the median of ``--repeats`` timed runs of ``--steps`` steps. One more row trains ``--seeds``
seeds side by side (the experiment's ``--seeds`` program, each seed one pass), with their time over one
seed's, the median of the per-round ratios.

Inference section: evaluation-mode logits of the BN LeNet against the same network with every BN folded
into the conv/dense layer before it (``models.fold_lenet``), one jitted program each over the
same images, round-robin repeats.

Op section: forward + backward of one batch-norm layer in training mode, with the bytes a fused
implementation must move (read x, write y; read x and dy, write dx: 5 x the tensor) and the achieved
GB/s. bnjax's and Flax's blocks of calls alternate, and bnjax's time over Flax's is the median of the per-round
ratios; PyTorch's blocks run after all the JAX pairs, its time over Flax's a ratio of medians.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import batch_norm, init_batch_stats
from experiments.lenet_fmnist import train
from experiments.lenet_fmnist.models import LeNet, fold_lenet, init_lenet

OP_SHAPES = [(256, 24, 24, 6), (256, 8, 8, 16), (256, 120), (256, 84), (128, 56, 56, 64)]
QUICK_OP_SHAPES = [(256, 8, 8, 16), (256, 84)]


def _median_time(fn, repeats: int) -> tuple[float, list[float]]:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times), times


def round_robin(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[float]]:
  """The seconds of every call of each of ``runs`` over ``repeats`` rounds, each round calling every one once in
  a random order (seeded): a slow spell of a shared machine hits all alike, and none runs right after the same
  other one more often than chance. (PyTorch's threads spin a while after each call and slow whatever runs next:
  in a fixed order, whatever always follows it, by up to 20%.)"""
  rng = random.Random(0)
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name in rng.sample(list(runs), len(runs)):
      t0 = time.perf_counter()
      runs[name]()
      times[name].append(time.perf_counter() - t0)
  return times


def try_import_torch():
  try:
    import torch

    return torch
  except ImportError:
    return None


def machine() -> str:
  """The device, the host's CPU model, cores and memory, and the versions that the figures depend on."""
  dev = jax.devices()[0]
  cpu = platform.processor() or platform.machine()
  try:
    names = [line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")]
    cpu = names[0] if names else cpu
  except OSError:
    pass
  cores = train.usable_cores()
  memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else float("nan")
  torch = try_import_torch()
  versions = f"jax {jax.__version__}" + (f", torch {torch.__version__}" if torch is not None else "")
  return f"{dev.platform}:{dev.id} {dev.device_kind}; host {cpu}, {cores} cores, {memory:.0f} GiB; {versions}"


def setup_bnjax(
  norm: str, images: np.ndarray, labels: np.ndarray, batch_size: int, loop: str, api: str = "linen", seeds: int = 1
):
  """Returns ``(run, first_call_seconds)``: ``run()`` trains one pass over the data, warm.

  ``api="nnx"`` trains the NNX LeNet (with ``bnjax.nnx.BatchNorm``) in the same loop. ``seeds`` > 1 trains that
  many seeds side by side in one program, as ``--seeds`` does (each seed one pass over the data).
  """
  data = train.Data.put(images, labels, train.replica_mesh(seeds))
  model = LeNet(norm=norm)
  apply = train.linen_apply(model)
  if api == "nnx":
    from flax import nnx

    from experiments.lenet_fmnist.models_nnx import NNXLeNet

    apply = train.nnx_apply(NNXLeNet(norm, rngs=nnx.Rngs(0)))
  replicated = seeds > 1
  variables, key = train.init_run(functools.partial(init_lenet, model), list(range(seeds)) if replicated else 0)
  state = train.create_train_state(apply, variables, 1.0, replicated=replicated)
  t0 = time.perf_counter()
  state, m = train.train_epoch(state, data, key, batch_size, epoch=0, loop=loop, replicated=replicated)
  jax.block_until_ready(m)
  first = time.perf_counter() - t0
  holder = {"state": state, "epoch": 1}

  def run():
    holder["state"], m = train.train_epoch(
      holder["state"], data, key, batch_size, epoch=holder["epoch"], loop=loop, replicated=replicated
    )
    holder["epoch"] += 1
    jax.block_until_ready(m)

  run()  # warm-up
  return run, first


def setup_torch(torch, variant: str, images: np.ndarray, labels: np.ndarray, batch_size: int):
  """Returns ``(run, first_call_seconds)`` for the chapter's PyTorch training loop."""
  from torch import nn

  from experiments.torch_lenet import init_like_train_ch6, lenet_scratch_bn, lenet_torch_bn, nchw_tensor

  net = init_like_train_ch6((lenet_scratch_bn if variant == "scratch" else lenet_torch_bn)(), seed=0).train()
  opt = torch.optim.SGD(net.parameters(), lr=1.0)
  loss_fn = nn.CrossEntropyLoss()
  x = nchw_tensor(images)
  y = torch.from_numpy(labels.astype(np.int64))
  n = len(y)

  def run():
    perm = torch.randperm(n)
    for start in range(0, n, batch_size):
      idx = perm[start : start + batch_size]
      opt.zero_grad()
      loss = loss_fn(net(x[idx]), y[idx])
      loss.backward()
      opt.step()

  t0 = time.perf_counter()
  run()
  first = time.perf_counter() - t0
  run()  # warm-up
  return run, first


def _jax_op_runner(fn, x, scale, bias, dy, stats) -> Callable[[int], None]:
  """``run(n)``: ``n`` jitted forward + backward (VJP) calls of ``fn(x, scale, bias, stats)``, compiled and warm."""

  @jax.jit
  def fwd_bwd(x, scale, bias, dy, stats):
    (_, new_stats), vjp = jax.vjp(lambda x, s, b: fn(x, s, b, stats), x, scale, bias)
    return vjp((dy, jax.tree_util.tree_map(jnp.zeros_like, new_stats))), new_stats

  args = [jnp.asarray(a) for a in (x, scale, bias, dy)] + [stats]
  jax.block_until_ready(fwd_bwd(*args))

  def run(n):
    for _ in range(n):
      out = fwd_bwd(*args)
    jax.block_until_ready(out)

  return run


def _torch_op_runner(torch, x, dy) -> Callable[[int], None]:
  import torch.nn.functional as F

  c = x.shape[-1]
  xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1))).requires_grad_(True)
  dyt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(dy, -1, 1)))
  wt, bt = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)
  rm, rv = torch.zeros(c), torch.ones(c)

  def run(n):
    for _ in range(n):
      xt.grad = wt.grad = bt.grad = None
      F.batch_norm(xt, rm, rv, wt, bt, True, 0.1, 1e-5).backward(dyt)

  run(1)
  return run


def alternating(first: Callable[[], Any], second: Callable[[], Any], rounds: int) -> tuple[list[float], list[float]]:
  """The seconds of every call of ``first`` and ``second`` over ``rounds`` rounds, each round calling both, the
  one that goes first taking turns: two implementations timed in the same moment, nothing else between them."""
  times: tuple[list[float], list[float]] = ([], [])
  for i in range(rounds):
    for j in (0, 1) if i % 2 == 0 else (1, 0):
      t0 = time.perf_counter()
      (first, second)[j]()
      times[j].append(time.perf_counter() - t0)
  return times


def _op_inputs(shape) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """``(x, dy, scale, bias)`` of the op section at one shape: x with mean 1 and std 2, dy standard normal."""
  rng = np.random.default_rng(0)
  c = shape[-1]
  x = (1.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
  dy = rng.standard_normal(shape).astype(np.float32)
  return x, dy, np.ones(c, np.float32), np.zeros(c, np.float32)


def _op_row(shape, impl: str, seconds: list[float], vs_flax: float, calls: int) -> dict:
  us = statistics.median(seconds) * 1e6
  bytes_moved = 5 * math.prod(shape) * 4
  return {
    "shape": list(shape),
    "impl": impl,
    "us": us,
    "vs_flax": vs_flax,
    "calls_per_block": calls,
    "bytes": bytes_moved,
    "gb_per_s": bytes_moved / us / 1e3,
  }


def bench_op_shape(shape, rounds: int, seconds_per_block: float = 0.01) -> list[dict]:
  """Forward + backward of bnjax's and Flax's batch norm at one NHWC (or (N, C)) shape, per call: the median of
  blocks of calls, the two implementations' blocks alternating over ``rounds`` rounds; bnjax's time over Flax's is
  the median of the per-round ratios. A block holds as many calls as ``seconds_per_block`` over one call of Flax's
  timed alone, with its wait for the result (calls in a row take less each: at 256x120, blocks of about 3 ms for
  0.01 s)."""
  import flax.linen as nn

  x, dy, scale, bias = _op_inputs(shape)

  def ours(x, scale, bias, stats):
    return batch_norm(x, scale, bias, stats, use_running_average=False, momentum=0.9)

  flax_bn = nn.BatchNorm(use_running_average=False, momentum=0.9)

  def theirs(x, scale, bias, stats):
    y, upd = flax_bn.apply({"params": {"scale": scale, "bias": bias}, "batch_stats": stats}, x, mutable=["batch_stats"])
    return y, upd["batch_stats"]

  flax_stats = flax_bn.init(jax.random.key(0), x[:2])["batch_stats"]
  ours_run = _jax_op_runner(ours, x, scale, bias, dy, init_batch_stats(shape[-1]))
  flax_run = _jax_op_runner(theirs, x, scale, bias, dy, flax_stats)
  one = _median_time(lambda: flax_run(1), 3)[0]
  calls = max(1, min(1000, round(seconds_per_block / max(one, 1e-9))))
  ours_t, flax_t = alternating(functools.partial(ours_run, calls), functools.partial(flax_run, calls), rounds)
  ours_t, flax_t = [t / calls for t in ours_t], [t / calls for t in flax_t]
  vs_flax = statistics.median(a / b for a, b in zip(ours_t, flax_t, strict=True))
  return [
    _op_row(shape, "bnjax.batch_norm", ours_t, vs_flax, calls),
    _op_row(shape, "flax.linen.BatchNorm", flax_t, 1.0, calls),
  ]


def bench_torch_op_shape(torch, shape, flax_us: float, rounds: int, calls: int) -> dict:
  """PyTorch's ``F.batch_norm`` forward + backward at one shape (NCHW, as the chapter's tensors), blocks of
  ``calls`` calls, its time over Flax's (``flax_us``, from :func:`bench_op_shape`) a ratio of medians."""
  x, dy, _, _ = _op_inputs(shape)
  run = functools.partial(_torch_op_runner(torch, x, dy), calls)
  seconds = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    run()
    seconds.append((time.perf_counter() - t0) / calls)
  return _op_row(shape, "torch F.batch_norm (NCHW)", seconds, statistics.median(seconds) * 1e6 / flax_us, calls)


def bench_inference(images: np.ndarray, batch_size: int, repeats: int) -> dict:
  """Evaluation-mode logits of BN LeNet vs the same LeNet with its BN folded in (``fold_lenet``).

  Both run as one jitted program over all ``images`` in batches (``lax.map``), as the experiment's
  evaluation does; the BN statistics are made non-trivial so folding does real work.
  """
  rng = np.random.default_rng(0)
  variables = init_lenet(LeNet(norm="ours"), jax.random.key(0))
  stats = {
    bn: {
      "mean": jnp.asarray(rng.normal(0, 1, s["mean"].shape), jnp.float32),
      "var": jnp.asarray(rng.uniform(0.5, 2, s["var"].shape), jnp.float32),
    }
    for bn, s in variables["batch_stats"].items()
  }
  variables = {"params": variables["params"], "batch_stats": stats}
  usable = len(images) // batch_size * batch_size
  x = jnp.asarray(images[:usable]).reshape(-1, batch_size, 28, 28, 1)

  def program(model, v):
    f = jax.jit(lambda v, x: jax.lax.map(lambda b: model.apply(v, b, train=False), x))
    t0 = time.perf_counter()
    f(v, x).block_until_ready()
    return (lambda: f(v, x).block_until_ready()), time.perf_counter() - t0

  t0 = time.perf_counter()
  folded = fold_lenet(variables)
  jax.block_until_ready(folded)
  fold_seconds = time.perf_counter() - t0
  runs = {
    "LeNet + bnjax.BatchNorm, eval mode": program(LeNet(norm="ours"), variables),
    "LeNet with BN folded into conv/dense": program(LeNet(norm="none"), folded),
  }
  times = round_robin({name: run for name, (run, _) in runs.items()}, repeats)
  rows = [
    {
      "name": name,
      "seconds": statistics.median(times[name]),
      "all_seconds": times[name],
      "first_call_seconds": first,
      "examples_per_sec": usable / statistics.median(times[name]),
    }
    for name, (_, first) in runs.items()
  ]
  logits = [
    np.asarray(run_logits)
    for run_logits in (
      LeNet(norm="ours").apply(variables, x[0], train=False),
      LeNet(norm="none").apply(folded, x[0], train=False),
    )
  ]
  return {
    "examples": usable,
    "batch_size": batch_size,
    "rows": rows,
    "fold_seconds": fold_seconds,
    "speedup": rows[1]["examples_per_sec"] / rows[0]["examples_per_sec"],
    "max_abs_logit_diff": float(np.max(np.abs(logits[0] - logits[1]))),
  }


def _timed_child(cmd: list[str], log: Path | None = None) -> tuple[float, float, int]:
  """``(wall seconds, peak RSS in MB, exit code)`` of one child process, measured from outside; its standard
  output goes to ``log`` (or nowhere)."""
  import subprocess

  with open(log if log is not None else os.devnull, "wb") as stdout:
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE)
    err = child.stderr.read().decode(errors="replace")  # (read while it runs: a full pipe would stall it)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - t0
  child.returncode = os.waitstatus_to_exitcode(status)
  child.stderr.close()
  if child.returncode:
    raise SystemExit(f"error: {' '.join(cmd)} failed (exit {child.returncode}):\n{err[-2000:]}")
  return wall, usage.ru_maxrss / 1024, child.returncode


def _e2e_commands(args, tmp: Path) -> dict:
  """``name -> command(run_index, epochs, extra)`` for the whole-process runs (``--no-progress``: no bar)."""
  import sys

  common = ["--batch-size", str(args.batch_size)]
  if args.data_dir:
    common += ["--data-dir", args.data_dir]
  if args.allow_partial_data:
    common += ["--allow-partial-data"]

  def bnjax(i, epochs, extra=(), out_name=None):
    out = ["--out", str(tmp / (out_name or f"r{i}-{epochs}")), "--overwrite"]
    return [
      sys.executable,
      "-m",
      "experiments.lenet_fmnist",
      "--no-progress",
      *out,
      "--epochs",
      str(epochs),
      *common,
      *extra,
    ]

  def torch(i, epochs, extra=()):
    return [sys.executable, "-m", "experiments.torch_lenet", "--epochs", str(epochs), *common, *extra]

  return {"bnjax": bnjax, "torch": torch}


def _alternating(runs: dict, pairs: int, label: str, logs: Path | None = None) -> dict[str, list[dict]]:
  """Runs ``runs`` (name -> command(i)) as whole processes, ``pairs`` rounds after one warm-up round, the
  order reversed every other round so that neither always goes first; ``name -> [{seconds, peak_mb}]`` (and
  ``log``, the run's standard output, when ``logs`` names a folder for them)."""
  out = {name: [] for name in runs}
  for i in range(pairs + 1):
    order = list(runs) if i % 2 == 0 else list(reversed(runs))
    for name in order:
      log = logs / f"{name.replace(' ', '-')}-{i}.txt" if logs is not None else None
      wall, rss, _ = _timed_child(runs[name](i), log)
      print(f"  {label} {'warm-up' if i == 0 else f'round {i}':8s} {name:24s} {wall:7.1f} s  {rss:7.0f} MB", flush=True)
      if i > 0:
        out[name].append({"seconds": wall, "peak_mb": rss, **({"log": str(log)} if log is not None else {})})
  return out


def main_job(args, commands) -> dict:
  """The main job (``--epochs`` epochs) against the chapter's PyTorch code: wall time and peak memory."""
  runs = _alternating({n: (lambda i, c=c: c(i, args.epochs)) for n, c in commands.items()}, args.pairs, "main job")
  med = {n: statistics.median(r["seconds"] for r in rs) for n, rs in runs.items()}
  mem = {n: statistics.median(r["peak_mb"] for r in rs) for n, rs in runs.items()}
  ratios = [t["seconds"] / b["seconds"] for b, t in zip(runs["bnjax"], runs["torch"], strict=True)]
  print(f"\n{'whole process':52s} {'wall s (median)':>16s} {'peak MB':>8s}")
  print(f"{'python -m experiments.lenet_fmnist (bnjax)':52s} {med['bnjax']:16.1f} {mem['bnjax']:8.0f}")
  print(f"{'python -m experiments.torch_lenet (PyTorch nn.BN)':52s} {med['torch']:16.1f} {mem['torch']:8.0f}")
  print(
    f"speed ratio torch/bnjax: {med['torch'] / med['bnjax']:.2f}x (median of medians); per pair: "
    f"{', '.join(f'{r:.2f}' for r in ratios)} (median {statistics.median(ratios):.2f}x); "
    f"memory bnjax/torch: {mem['bnjax'] / mem['torch']:.2f}x\n"
  )
  return {
    "runs": runs,
    "median_seconds": med,
    "median_peak_mb": mem,
    "ratio_torch_over_bnjax": med["torch"] / med["bnjax"],
    "pair_ratios": ratios,
  }


def fixed_costs(args, commands, tmp: Path) -> dict:
  """What every run pays besides its epochs: a 2-epoch process's wall time, measured from outside, minus
  twice its second epoch (training and evaluation) as the process itself times it.

  That remainder is the fixed cost: start-up, imports, data loading, compilation (or loading compiled
  programs), the first epoch's extra (tracing, warm-up), the files (each epoch's and the final ones) and the
  exit (PyTorch's loop writes no files). Each figure comes from one process, so it carries one run's noise,
  not the difference of two runs'.
  "cold" compiles into an empty compilation cache, as a user's first run does; "warm" finds the programs
  cached, as every later run does. bnjax reports its epochs' seconds in ``metrics.json``, the chapter's
  PyTorch loop on its epoch lines.
  """
  outs = {"bnjax warm": "warm-{}", "bnjax cold": "cold-{}"}  # each bnjax run's --out folder
  runs = {
    "bnjax warm": lambda i: commands["bnjax"](i, 2, out_name=outs["bnjax warm"].format(i)),
    "bnjax cold": lambda i: commands["bnjax"](
      i, 2, ["--compile-cache", str(tmp / f"cache-{i}")], outs["bnjax cold"].format(i)
    ),
    "torch": lambda i: commands["torch"](i, 2),
  }
  walls = _alternating(runs, args.pairs, "fixed cost", logs=tmp)
  result = {}
  for name, rounds in walls.items():
    epochs = [
      _torch_epoch_seconds(Path(r["log"])) if name == "torch" else _bnjax_epoch_seconds(tmp / outs[name].format(i))
      for i, r in enumerate(rounds, start=1)
    ]
    fixed = [r["seconds"] - 2 * e for r, e in zip(rounds, epochs, strict=True)]
    result[name] = {
      "fixed_seconds": statistics.median(fixed),
      "epoch_seconds": statistics.median(epochs),
      "per_round_fixed_seconds": fixed,
      "two_epoch_seconds": [r["seconds"] for r in rounds],
      "second_epoch_seconds": epochs,
    }
  print(f"{'fixed cost (2-epoch wall - 2 x its 2nd epoch)':52s} {'fixed s':>8s} {'epoch s':>8s}  per round")
  for name, r in result.items():
    rounds = ", ".join(f"{f:.1f}" for f in r["per_round_fixed_seconds"])
    print(f"{name:52s} {r['fixed_seconds']:8.1f} {r['epoch_seconds']:8.1f}  {rounds}")
  return result


def _bnjax_epoch_seconds(out: Path) -> float:
  """The second epoch's training and evaluation seconds, from the run's ``metrics.json``."""
  found = list(out.glob("*/metrics.json"))
  if len(found) != 1:
    raise SystemExit(f"error: expected one variant's metrics.json in {out}, found {len(found)}")
  second = json.loads(found[0].read_text())["epochs"][1]
  return second["train_seconds"] + second["eval_seconds"]


def _torch_epoch_seconds(log: Path) -> float:
  """The second epoch's seconds (training and its test evaluation), from the PyTorch loop's epoch line."""
  import re

  found = re.search(r"^epoch +2/2 .*\(([0-9.]+) s\)$", log.read_text(), re.MULTILINE)
  if found is None:
    raise SystemExit(f"error: no second epoch line in {log}")
  return float(found.group(1))


def end_to_end(args) -> dict:
  """The main job against the chapter's PyTorch code, and the fixed cost of each, as whole processes."""
  import tempfile

  tmp = Path(tempfile.mkdtemp(prefix="bnjax-e2e-"))
  commands = _e2e_commands(args, tmp)
  print(f"machine: {machine()}")
  print(f"end to end, batch {args.batch_size}: 1 warm-up round, then {args.pairs} rounds, alternating\n")
  result = {"machine": machine(), "epochs": args.epochs, "batch_size": args.batch_size}
  result["main_job"] = main_job(args, commands)
  if not args.no_fixed_cost:
    result["fixed_cost"] = fixed_costs(args, commands, tmp)
  return result


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.bench", description=__doc__.split("\n\n")[0])
  p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test, not a measurement")
  p.add_argument("--steps", type=int, default=None, help="train steps per timed repeat (default 60; quick 3)")
  p.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 5; quick 1)")
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--loop", choices=train.LOOPS, default="auto")
  p.add_argument(
    "--seeds", type=int, default=None, help="a row training this many seeds side by side (default 8; quick 2; 1: none)"
  )
  p.add_argument("--no-torch", action="store_true", help="leave out the PyTorch rows")
  p.add_argument("--no-ops", action="store_true", help="leave out the op-level section")
  p.add_argument("--out", default=None, help="also write the results as JSON here")
  e2e = p.add_argument_group("end to end")
  e2e.add_argument("--end-to-end", action="store_true", help="time the main job vs the chapter's PyTorch code")
  # 5 rounds: on a shared 2-core machine one process of either side can take 20-30% longer than the next.
  e2e.add_argument("--pairs", type=int, default=5, help="timed rounds after the warm-up round (default 5)")
  e2e.add_argument("--no-fixed-cost", action="store_true", help="only the main job, not the fixed cost's 2-epoch runs")
  e2e.add_argument("--epochs", type=int, default=10)
  e2e.add_argument("--data-dir", default=None)
  e2e.add_argument("--allow-partial-data", action="store_true")
  args = p.parse_args(argv)
  if args.end_to_end and (args.pairs < 1 or args.epochs < 1):
    p.error(f"--pairs ({args.pairs}) and --epochs ({args.epochs}) should be at least 1")
  args.steps = args.steps or (3 if args.quick else 60)
  args.repeats = args.repeats or (1 if args.quick else 5)
  if args.seeds is not None and args.seeds < 1:
    p.error(f"--seeds ({args.seeds}) should be at least 1")
  args.seeds = args.seeds or (2 if args.quick else 8)
  return args


def training_rows(args, torch) -> tuple[list[dict], np.ndarray]:
  """The model section: every row trains the same random data, round-robin repeats; ``(rows, images)``."""
  n = args.steps * args.batch_size
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (n, 28, 28, 1)).astype(np.float32)
  labels = rng.integers(0, 10, n).astype(np.int32)
  print(
    f"\nLeNet train loop: batch {args.batch_size}, {args.steps} steps per repeat, median of {args.repeats}, float32"
  )
  bs = args.batch_size
  setups = [
    ("bnjax LeNet + bnjax.BatchNorm", lambda: setup_bnjax("ours", images, labels, bs, args.loop)),
    ("bnjax LeNet + flax.linen.BatchNorm", lambda: setup_bnjax("flax", images, labels, bs, args.loop)),
    ("bnjax NNXLeNet + bnjax.nnx.BatchNorm", lambda: setup_bnjax("ours", images, labels, bs, args.loop, api="nnx")),
  ]
  if args.seeds > 1:
    setups.append((seeds_row(args.seeds), lambda: setup_bnjax("ours", images, labels, bs, args.loop, seeds=args.seeds)))
  if torch is not None:
    setups += [
      ("PyTorch eager, chapter's scratch BatchNorm", lambda: setup_torch(torch, "scratch", images, labels, bs)),
      ("PyTorch eager, nn.BatchNorm2d/1d", lambda: setup_torch(torch, "nn", images, labels, bs)),
    ]
  runners = [(name, *setup()) for name, setup in setups]
  times = round_robin({name: run for name, run, _ in runners}, args.repeats)
  rows = []
  for name, _, first in runners:
    median = statistics.median(times[name])
    seeds = args.seeds if name == seeds_row(args.seeds) else 1
    rows.append(
      {
        "name": name,
        "seconds": median,
        "all_seconds": times[name],
        "first_call_seconds": first,
        "examples_per_sec": seeds * n / median,  # (every seed's examples)
      }
    )
    if seeds > 1:  # the time of all seeds over one seed's, round by round: 8x is no gain and no loss
      one = times["bnjax LeNet + bnjax.BatchNorm"]
      ratios = [a / b for a, b in zip(times[name], one, strict=True)]
      mesh = train.replica_mesh(seeds)
      rows[-1].update(seeds=seeds, devices=1 if mesh is None else mesh.size, time_vs_one_seed=statistics.median(ratios))
  # Throughput of one row over another as the median of the per-round ratios (each round runs every row once, in a
  # random order): on this shared machine a row's repeats move by 20-40%, and a round's rows move together.
  ours, flax, nnx = rows[0]["name"], rows[1]["name"], rows[2]["name"]
  rows[1]["ours_over_this"] = statistics.median(b / a for a, b in zip(times[ours], times[flax], strict=True))
  rows[2]["this_over_linen"] = statistics.median(a / b for a, b in zip(times[ours], times[nnx], strict=True))
  ref = next((r for r in rows if "nn.BatchNorm2d" in r["name"]), None)
  for r in rows:
    r["ratio_to_torch_nn_bn"] = r["examples_per_sec"] / ref["examples_per_sec"] if ref else None
  return rows, images


def seeds_row(seeds: int) -> str:
  return f"bnjax LeNet + bnjax.BatchNorm, {seeds} seeds"


def print_training_rows(rows: list[dict]) -> None:
  print(f"{'':45s} {'examples/sec':>13s} {'vs torch nn.BN':>15s} {'first call (s)':>15s}")
  for r in rows:
    ratio = f"{r['ratio_to_torch_nn_bn']:.2f}x" if r["ratio_to_torch_nn_bn"] else "-"
    print(f"{r['name']:45s} {r['examples_per_sec']:13,.0f} {ratio:>15s} {r['first_call_seconds']:15.2f}")
  ours_flax = rows[0]["examples_per_sec"] / rows[1]["examples_per_sec"]
  print(
    f"bnjax.BatchNorm / flax.linen.BatchNorm throughput: {rows[1]['ours_over_this']:.3f} (median of per-round "
    f"ratios; of the medians: {ours_flax:.3f})"
  )
  nnx_linen = rows[2]["examples_per_sec"] / rows[0]["examples_per_sec"]
  print(
    f"NNX / linen throughput (both with bnjax's BatchNorm): {rows[2]['this_over_linen']:.3f} (median of per-round "
    f"ratios; of the medians: {nnx_linen:.3f})"
  )
  for r in rows:
    if "seeds" in r:
      print(
        f"{r['seeds']} seeds side by side (one program, --seeds; {r['devices']} device(s)) / one seed, time: "
        f"{r['time_vs_one_seed']:.2f}x "
        f"(median of per-round ratios; {r['seeds']}x: no gain, no loss)"
      )


def print_inference(inference: dict) -> None:
  print(
    f"\nInference: eval-mode logits for {inference['examples']:,} images, batch {inference['batch_size']}, "
    "one jitted program"
  )
  print(f"{'':45s} {'examples/sec':>13s} {'first call (s)':>15s}")
  for r in inference["rows"]:
    print(f"{r['name']:45s} {r['examples_per_sec']:13,.0f} {r['first_call_seconds']:15.2f}")
  print(
    f"folded / BN throughput: {inference['speedup']:.2f}x (folding took {inference['fold_seconds'] * 1e3:.1f} ms; "
    f"largest logit difference {inference['max_abs_logit_diff']:.1e})"
  )


def op_rows(args, torch) -> list[dict]:
  """The op section: forward + backward of one BN layer per shape and implementation, printed. Every shape's
  JAX pair runs before any PyTorch call: PyTorch's threads spin a while after each call and slow whatever runs
  next (a JAX block right after one by up to 20%)."""
  shapes = QUICK_OP_SHAPES if args.quick else OP_SHAPES
  rounds = 4 if args.quick else 60
  block = 0.002 if args.quick else 0.01
  print(
    "\nBatch-norm op, training mode, forward + backward (bytes = 5 x tensor, float32); per call, median of"
    f" {rounds} blocks of calls; bnjax's and Flax's blocks alternate, x Flax: median of the per-round ratios;"
    " PyTorch's after all the JAX pairs, x Flax: ratio of medians"
  )
  pairs = [bench_op_shape(shape, rounds, block) for shape in shapes]
  rows = []
  for shape, pair in zip(shapes, pairs, strict=True):
    rows += pair
    if torch is not None:
      flax_row = pair[1]
      rows.append(bench_torch_op_shape(torch, shape, flax_row["us"], rounds, flax_row["calls_per_block"]))
  print(f"{'shape':22s} {'implementation':28s} {'us':>10s} {'x Flax':>7s} {'MB moved':>9s} {'GB/s':>7s}")
  for r in rows:
    shape = "x".join(map(str, r["shape"]))
    print(
      f"{shape:22s} {r['impl']:28s} {r['us']:10.1f} {r['vs_flax']:7.3f} {r['bytes'] / 1e6:9.2f} {r['gb_per_s']:7.2f}"
    )
  return rows


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.end_to_end:
    result = end_to_end(args)
  else:
    if args.seeds > 1:  # (before JAX starts) the seeds' row trains as --seeds does: on CPU, over host devices
      train.request_host_devices(args.seeds)
    torch = None if args.no_torch else try_import_torch()
    print(f"machine: {machine()}")
    if torch is not None:
      print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    elif not args.no_torch:
      print("note: torch is not installed, so the PyTorch rows are skipped (pip install torch==2.13.0)")
    rows, images = training_rows(args, torch)
    print_training_rows(rows)
    inference = bench_inference(images, args.batch_size, args.repeats)
    print_inference(inference)
    result = {
      "machine": machine(),
      "steps": args.steps,
      "repeats": args.repeats,
      "batch_size": args.batch_size,
      "model": rows,
      "inference": inference,
      "ops": [] if args.no_ops else op_rows(args, torch),
    }
  if args.out:
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out}")
  return result


if __name__ == "__main__":
  main()
