"""Reproduce D2L's "Batch Normalization" chapter: LeNet + BatchNorm on Fashion-MNIST.

    python -m experiments.lenet_fmnist                  # ours, the chapter's settings
    python -m experiments.lenet_fmnist --bn all         # ours, Flax's and no BN, plus a comparison
    python -m experiments.lenet_fmnist --resume         # continue from --out's checkpoints

Prints a progress bar per epoch, a line per epoch, then the chapter's lines (loss, train acc,
test acc, examples/sec) and the first BN layer's gamma and beta. Writes to ``--out/<bn>/``:
``checkpoint.msgpack`` (state, epoch, history and the run's settings) and ``metrics.json`` after
every epoch, ``curves.png``/``curves.svg`` (the chapter's figure) and ``summary.json`` at the end.
Every file is written to a temporary name and renamed, so an interruption at any moment leaves the
last complete checkpoint and never a half-written file; it loses at most the epoch in progress.

More devices, more hosts: ``--devices N`` trains data-parallel on N local devices (default: all),
with BN synchronized over the whole global batch (``--bn-group-size G``: within groups of G devices);
``--coordinator HOST:PORT --num-processes P --process-id I`` joins P processes (``bnjax.parallel``).
Only process 0 prints, writes metrics, plots and checkpoints; ``--timeout`` bounds every wait.

Compiled programs are kept in JAX's persistent compilation cache (``--compile-cache``, default
``$BNJAX_COMPILE_CACHE`` or ``~/.cache/bnjax/xla``), so a second run skips compilation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path

CHAPTER = {  # what the chapter printed (PyTorch, one GPU)
  "ours": {"loss": 0.273, "train_acc": 0.899, "test_acc": 0.807, "examples_per_sec": 32293.9},
  "flax": {"loss": 0.267, "train_acc": 0.902, "test_acc": 0.708, "examples_per_sec": 50597.3},
}
NORMS = ("ours", "flax", "none")  # bnjax.models.NORMS, repeated so --help needs no jax import
# A variant is a norm, or ours with its statistics recomputed by precise BN before every evaluation.
VARIANTS = (*NORMS, "ours-precise")
LABELS = {
  "ours": "bnjax.BatchNorm",
  "flax": "flax.linen.BatchNorm",
  "none": "no BatchNorm",
  "ours-precise": "bnjax.BatchNorm + precise BN",
}
DEFAULT_PRECISE_BATCHES = 100  # for the ours-precise variant when --precise-bn is not given
CHECKPOINT, METRICS = "checkpoint.msgpack", "metrics.json"
# What a resumed run must share with the checkpoint's run (--epochs may grow).
RUN_IDENTITY = ("bn", "batch_size", "lr", "seed", "conv_impl")
MAX_SEED = 2**32 - 1


class RunError(Exception):
  """A problem the user can act on: printed as one ``error:`` line, no traceback."""


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
  return os.environ.get("BNJAX_COMPILE_CACHE") or str(Path(base) / "bnjax" / "xla")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.lenet_fmnist", description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--bn",
    choices=[*VARIANTS, "all"],
    default="ours",
    help="normalization: ours (bnjax.BatchNorm), flax (flax.linen.BatchNorm), none, ours-precise (ours + "
    f"precise BN, --precise-bn N or {DEFAULT_PRECISE_BATCHES} batches), or all four",
  )
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--lr", type=float, default=1.0)
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--precise-bn",
    type=int,
    default=0,
    metavar="N",
    help="before every evaluation, recompute the BN statistics from N training batches (bnjax.precise_batch_stats)",
  )
  p.add_argument(
    "--data-dir",
    default=None,
    help="directory of Fashion-MNIST IDX files (default: $BNJAX_DATA_DIR, then /usr/share/datasets/fashion-mnist)",
  )
  p.add_argument("--out", default="runs/lenet_fmnist", help="where metrics, plots and checkpoints go")
  p.add_argument("--resume", action="store_true", help="continue each variant from its checkpoint in --out")
  p.add_argument("--overwrite", action="store_true", help="replace the runs already in --out")
  p.add_argument(
    "--api",
    choices=("linen", "nnx"),
    default="linen",
    help="Flax API: linen (LeNet + TrainState) or nnx (NNXLeNet + nnx.Optimizer); same numbers",
  )
  p.add_argument("--loop", choices=("auto", "step", "scan"), default="auto", help="epoch loop driver (see bnjax.train)")
  p.add_argument("--conv-impl", choices=("auto", "xla", "im2col"), default="auto", help="see bnjax.conv")
  p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
  p.add_argument(
    "--compile-cache",
    default=default_cache_dir(),
    metavar="DIR",
    help="persistent compilation cache (default: %(default)s)",
  )
  p.add_argument("--no-compile-cache", action="store_true", help="compile from scratch, do not read or write the cache")
  p.add_argument(
    "--allow-partial-data",
    action="store_true",
    help="accept IDX files with fewer than 60000/10000 examples (subsets, test fixtures)",
  )
  dist = p.add_argument_group("more devices, more hosts (bnjax.parallel)")
  dist.add_argument("--devices", type=int, default=None, metavar="N", help="local devices to train on (default: all)")
  dist.add_argument(
    "--bn-group-size",
    type=int,
    default=None,
    metavar="G",
    help="synchronize BN within groups of G devices (default: all)",
  )
  dist.add_argument(
    "--coordinator", default=None, metavar="HOST:PORT", help="process 0's address, for several processes"
  )
  dist.add_argument("--num-processes", type=int, default=1, metavar="P", help="number of processes (default 1)")
  dist.add_argument("--process-id", type=int, default=0, metavar="I", help="this process's index in [0, P)")
  dist.add_argument(
    "--timeout",
    type=float,
    default=120.0,
    metavar="S",
    help="with several processes: seconds to wait for the others to join, and for any step to finish (default 120)",
  )
  args = p.parse_args(argv)
  if args.devices is not None and args.devices < 1:
    p.error(f"--devices is {args.devices}, but should be at least 1")
  if args.bn_group_size is not None and args.bn_group_size < 1:
    p.error(f"--bn-group-size is {args.bn_group_size}, but should be at least 1")
  if args.num_processes < 1:
    p.error(f"--num-processes is {args.num_processes}, but should be at least 1")
  if args.num_processes > 1 and not args.coordinator:
    p.error(f"--num-processes {args.num_processes} needs --coordinator HOST:PORT (process 0's address)")
  if args.coordinator and args.num_processes < 2:
    p.error("--coordinator is given, but --num-processes is 1: say how many processes join")
  if not 0 <= args.process_id < args.num_processes:
    p.error(f"--process-id is {args.process_id}, but should lie in [0, {args.num_processes - 1}] (--num-processes)")
  if not (math.isfinite(args.timeout) and args.timeout > 0):
    p.error(f"--timeout is {args.timeout}, but should be a positive number of seconds")
  if args.epochs < 1:
    p.error(f"--epochs is {args.epochs}, but should be at least 1")
  if args.batch_size < 2:
    p.error(f"--batch-size is {args.batch_size}, but batch statistics need at least 2 examples per batch")
  if not (math.isfinite(args.lr) and args.lr > 0):
    p.error(f"--lr is {args.lr}, but should be a positive finite number")
  if not 0 <= args.seed <= MAX_SEED:
    p.error(f"--seed is {args.seed}, but should lie in [0, {MAX_SEED}]")
  if args.precise_bn < 0:
    p.error(f"--precise-bn is {args.precise_bn}, but should be >= 0 (0: off)")
  if args.resume and args.overwrite:
    p.error("--resume and --overwrite contradict each other: choose one")
  return args


def run_config(args: argparse.Namespace, norm: str) -> dict:
  return {"bn": norm, "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "conv_impl": args.conv_impl}


def device_name() -> str:
  import jax

  d = jax.devices()[0]
  kind = f" ({d.device_kind})" if d.device_kind.lower() != d.platform else ""
  return f"{d.platform}:{d.id}{kind}"


# --- files: every write is atomic (temporary name, then rename) -----------------------------------


def atomic_write(path: Path, write) -> None:
  """``write(tmp_path)`` then rename over ``path``: readers see the old file or the new one, never half."""
  tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
  try:
    write(tmp)
    with open(tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
  atomic_write(path, lambda tmp: tmp.write_text(text))


def make_writable_dir(path: Path) -> None:
  """Creates ``path`` and proves a file can be written there; OSError otherwise."""
  path.mkdir(parents=True, exist_ok=True)
  probe = path / f".write-test.{os.getpid()}"
  probe.write_text("")
  probe.unlink()


def check_out_dir(out: Path, norms: list[str], args: argparse.Namespace) -> None:
  """Before any work: --out is a writable directory, and it holds no run that would be silently replaced."""
  if out.exists() and not out.is_dir():
    raise RunError(f"--out {out} is an existing file, not a directory.")
  try:
    make_writable_dir(out)
  except OSError as e:
    raise RunError(f"--out {out} is not writable ({e.strerror or e}).") from None
  for norm in norms:
    run = out / norm
    held = run.is_dir() and any(run.iterdir())
    if args.resume and held and not (run / CHECKPOINT).is_file():
      raise RunError(
        f"--resume: {run} exists but holds no checkpoint ({CHECKPOINT}); nothing to resume. "
        "Use --overwrite to start it over, or a new --out."
      )
    if not args.resume and not args.overwrite and held:
      raise RunError(
        f"{run} already holds a run; pass --resume to continue it, --overwrite to replace it, or a new --out."
      )


def _state_tree(state) -> dict:
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}


def save_checkpoint(path: Path, state, epoch: int, history: list[dict], config: dict) -> None:
  """State, epoch, history and settings in one msgpack file (a few hundred KB for LeNet), written atomically."""
  from flax import serialization

  payload = {"state": _state_tree(state), "epoch": epoch, "history": json.dumps(history), "config": json.dumps(config)}
  data = serialization.to_bytes(payload)
  atomic_write(path, lambda tmp: tmp.write_bytes(data))


def restore_checkpoint(path: Path, state, config: dict):
  """``(state, epoch, history)`` from ``path``; RunError for a corrupted file or another run's settings."""
  from flax import serialization

  try:
    raw = serialization.msgpack_restore(path.read_bytes())
    saved = json.loads(raw["config"])
    restored = serialization.from_state_dict(_state_tree(state), raw["state"])
    epoch, history = int(raw["epoch"]), json.loads(raw["history"])
  except Exception as e:  # msgpack, KeyError, ValueError from shapes, JSON: all mean "not a usable checkpoint"
    raise RunError(
      f"checkpoint {path} cannot be restored ({type(e).__name__}: {str(e)[:200]}); it is truncated, "
      "corrupted or not bnjax's. Use --overwrite to start over, or a new --out."
    ) from None
  differ = [
    f"--{k.replace('_', '-')} {saved.get(k)} (now {config[k]})" for k in RUN_IDENTITY if saved.get(k) != config[k]
  ]
  if differ:
    raise RunError(
      f"--resume: the checkpoint {path} belongs to a run with {', '.join(differ)}; resuming would mix two "
      "runs in one history. Rerun with the checkpoint's settings, or use a new --out."
    )
  return state.replace(**restored), epoch, history[:epoch]


def plot_curves(histories: dict[str, list[dict]], stem: Path) -> None:
  """The chapter's figure (train loss, train acc, test acc vs epoch), one panel per variant."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(histories), figsize=(4.2 * len(histories), 3.2), squeeze=False, sharey=True)
  for ax, (name, history) in zip(axes[0], histories.items(), strict=True):
    epochs = [h["epoch"] for h in history]
    ax.plot(epochs, [h["train_loss"] for h in history], "-", label="train loss")
    ax.plot(epochs, [h["train_acc"] for h in history], "m--", label="train acc")
    ax.plot(epochs, [h["test_acc"] for h in history], "g-.", label="test acc")
    ax.set(title=LABELS[name], xlabel="epoch", xlim=(1, max(epochs[-1], 2)))
    ax.grid(True, alpha=0.3)
    ax.legend()
  fig.tight_layout()
  for ext in ("png", "svg"):
    atomic_write(stem.with_suffix(f".{ext}"), lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=110))
  plt.close(fig)


# --- training ------------------------------------------------------------------------------------


class Progress:
  """What is safely on disk, for the message after an interruption."""

  def __init__(self):
    self.current: str | None = None
    self.saved: dict[str, int] = {}


class LinenRun:
  """The linen API: a ``TrainState`` threaded through :mod:`bnjax.train`."""

  def __init__(self, state, args: argparse.Namespace):
    self.state, self.loop = state, args.loop

  def epoch(self, images, labels, key, batch_size, on_progress):
    from bnjax import train

    self.state, metrics = train.train_epoch(
      self.state, images, labels, key, batch_size, loop=self.loop, on_progress=on_progress
    )
    return metrics

  def evaluate(self, images, labels):
    from bnjax import train

    return train.evaluate(self.state, images, labels)

  def train_state(self):
    return self.state

  def set_batch_stats(self, batch_stats):
    self.state = self.state.replace(batch_stats=batch_stats)


class NNXRun:
  """The NNX API: :class:`bnjax.models.NNXLeNet` and an ``nnx.Optimizer``, trained in place by
  :mod:`bnjax.train_nnx`. Initialized from (and checkpointed as) the linen run's variables, so both
  APIs start from the same weights, give the same numbers and share one checkpoint format (plain
  SGD keeps no optimizer state besides the step)."""

  def __init__(self, state, args: argparse.Namespace, norm: str):
    import optax
    from flax import nnx

    from bnjax import models

    self.template = state
    model = models.NNXLeNet(norm, conv_impl=args.conv_impl, rngs=nnx.Rngs(0))
    self.model = models.lenet_to_nnx(model, {"params": state.params, "batch_stats": state.batch_stats})
    self.optimizer = nnx.Optimizer(self.model, optax.sgd(args.lr), wrt=nnx.Param)
    self.optimizer.step[...] = self.optimizer.step[...].dtype.type(int(state.step))

  def epoch(self, images, labels, key, batch_size, on_progress):
    from bnjax import train_nnx

    return train_nnx.train_epoch(self.model, self.optimizer, images, labels, key, batch_size, on_progress=on_progress)

  def evaluate(self, images, labels):
    from bnjax import train_nnx

    return train_nnx.evaluate(self.model, images, labels)

  def train_state(self):
    from bnjax import models

    variables = models.lenet_from_nnx(self.model)
    return self.template.replace(
      step=int(self.optimizer.step[...]), params=variables["params"], batch_stats=variables.get("batch_stats", {})
    )

  def set_batch_stats(self, batch_stats):
    from flax import nnx

    nnx.update(self.model, batch_stats)


class ParallelRun:
  """Data-parallel training over a device mesh (:mod:`bnjax.parallel`), one or several processes.

  The state lives replicated on the mesh; what leaves this class (metrics, the state for checkpoints
  and the summary) is host NumPy, read from this process's own copy.
  """

  def __init__(self, state, mesh, watchdog=None):
    from bnjax import parallel

    self.mesh, self.watchdog = mesh, watchdog
    self.state = parallel.replicate(state, mesh)
    self.step, self.eval_step = parallel.make_train_step(mesh), parallel.make_eval_step(mesh)

  def epoch(self, images, labels, key, batch_size, on_progress):
    import jax
    import numpy as np

    from bnjax import parallel

    perm = np.asarray(jax.random.permutation(key, len(labels)))  # the same order as on one device

    def on_step(n):
      self.beat()
      on_progress(n)

    self.state, metrics = parallel.train_epoch(
      self.state, self.step, self.mesh, images, labels, perm, batch_size, on_step=on_step
    )
    return parallel.to_host(metrics)

  def evaluate(self, images, labels):
    from bnjax import parallel

    metrics = parallel.to_host(parallel.evaluate(self.state, self.eval_step, self.mesh, images, labels))
    self.beat()
    return metrics

  def beat(self):
    if self.watchdog is not None:  # several processes: tell the watchdog a step finished
      self.watchdog.beat()

  def train_state(self):
    from bnjax import parallel

    return parallel.to_host(self.state)


def precise_stats(apply, state, images, num_batches: int, args: argparse.Namespace, shuffle_key, epoch: int):
  """Precise BN for the chapter: ``num_batches`` random training batches, weights frozen, population statistics.

  ``apply`` is the model's apply function on uint8 images; pass the same one every epoch, so that the
  compiled program is reused.
  """
  import jax

  from bnjax import precise_batch_stats

  count = min(num_batches * args.batch_size, images.shape[0]) // args.batch_size * args.batch_size
  # A different stream from the epoch's shuffle (fold_in of a second index), fixed per epoch: reproducible.
  perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(shuffle_key, epoch), 1), images.shape[0])
  batches = images[perm[:count]].reshape(-1, args.batch_size, *images.shape[1:])
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  return precise_batch_stats(apply, variables, batches, model_kwargs={"train": True})["batch_stats"]


def run_variant(
  norm: str, arrays, args: argparse.Namespace, out: Path, progress: Progress, mesh=None, watchdog=None
) -> tuple[dict, list[dict]]:
  """Trains one variant; returns its summary (final metrics, throughput, gamma/beta) and per-epoch history.

  With a ``mesh``, data-parallel (:class:`ParallelRun`); only process 0 writes files.
  """
  import jax
  import numpy as np
  from tqdm.auto import tqdm

  from bnjax import models, train

  train_x, train_y, test_x, test_y = arrays
  main_process = jax.process_index() == 0
  out.mkdir(parents=True, exist_ok=True)
  ckpt_path, metrics_path = out / CHECKPOINT, out / METRICS
  if args.overwrite and main_process:  # explicit: the old run's files go before the new run writes any
    for name in (CHECKPOINT, METRICS, "summary.json", "curves.png", "curves.svg"):
      (out / name).unlink(missing_ok=True)
  config = run_config(args, norm)
  axis_name = None if mesh is None else "data"  # bnjax.parallel.DATA: the BN layers sync over it
  model = models.LeNet(norm=norm.removesuffix("-precise"), conv_impl=args.conv_impl, axis_name=axis_name)
  precise = 0 if norm == "none" else args.precise_bn or (DEFAULT_PRECISE_BATCHES if norm == "ours-precise" else 0)
  init_key, shuffle_key = jax.random.split(jax.random.key(args.seed))
  state = train.create_train_state(model, init_key, args.lr)
  history: list[dict] = []
  start_epoch = 0
  progress.current = norm
  if args.resume and ckpt_path.is_file():
    state, start_epoch, history = restore_checkpoint(ckpt_path, state, config)
    progress.saved[norm] = start_epoch
    try:
      json.loads(metrics_path.read_text())
    except (OSError, ValueError) as e:  # the checkpoint carries the history: nothing is lost
      reason = e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
      print(f"note: {metrics_path} is unreadable ({reason}); it is rewritten from the checkpoint", file=sys.stderr)
    print(f"[{norm}] resumed from {ckpt_path} after epoch {start_epoch}")
  elif args.resume:
    print(f"[{norm}] --resume: no run in {out} yet, starting from scratch")
  if start_epoch >= args.epochs:
    raise RunError(f"[{norm}] nothing to do: {ckpt_path} is already at epoch {start_epoch} >= --epochs {args.epochs}.")

  if mesh is not None:
    runner = ParallelRun(state, mesh, watchdog)
  elif args.api == "nnx":
    runner = NNXRun(state, args, norm.removesuffix("-precise"))
  else:
    runner = LinenRun(state, args)

  def precise_apply(variables, images, **kwargs):  # one function per run: its compiled program is reused
    return model.apply(variables, train.as_float_images(images), **kwargs)

  steps = train.steps_per_epoch(len(train_y), args.batch_size)
  for epoch in range(start_epoch, args.epochs):
    bar = tqdm(
      total=steps,
      desc=f"[{norm}] epoch {epoch + 1}/{args.epochs}",
      unit="batch",
      leave=False,
      disable=args.no_progress,
      file=sys.stdout,
    )
    t0 = time.perf_counter()
    metrics = runner.epoch(train_x, train_y, jax.random.fold_in(shuffle_key, epoch), args.batch_size, bar.update)
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    bar.close()
    precise_seconds = 0.0
    if precise:
      t1 = time.perf_counter()
      stats = precise_stats(precise_apply, runner.train_state(), train_x, precise, args, shuffle_key, epoch)
      runner.set_batch_stats(jax.block_until_ready(stats))  # (dispatch is asynchronous: time the work)
      precise_seconds = time.perf_counter() - t1
    tr, te = train.summarize(metrics), train.summarize(runner.evaluate(test_x, test_y))
    row = {
      "epoch": epoch + 1,
      "train_loss": tr["loss"],
      "train_acc": tr["acc"],
      "test_loss": te["loss"],
      "test_acc": te["acc"],
      "train_seconds": seconds,
      "examples_per_sec": int(metrics["count"]) / seconds,
      "precise_bn_seconds": precise_seconds,
    }
    history.append(row)
    print(
      f"[{norm}] epoch {epoch + 1:2d}/{args.epochs}  loss {tr['loss']:.3f}  train acc {tr['acc']:.3f}  "
      f"test acc {te['acc']:.3f}  {row['examples_per_sec']:,.0f} ex/s  ({seconds:.1f} s)",
      flush=True,
    )
    # Metrics first, then the checkpoint (which carries the history too): an interruption between the
    # two leaves a checkpoint one epoch behind metrics.json, and resume trims the history to it.
    state_now = runner.train_state()
    if main_process:
      atomic_write_text(
        metrics_path, json.dumps({"bn": norm, "args": vars(args), "device": device_name(), "epochs": history}, indent=1)
      )
      save_checkpoint(ckpt_path, state_now, epoch + 1, history, config)
    progress.saved[norm] = epoch + 1
    if watchdog is not None:
      barrier(f"checkpoint {norm} {epoch + 1}")  # nobody runs ahead of a checkpoint it may have to resume from
      watchdog.beat()

  if main_process:
    plot_curves({norm: history}, out / "curves")
  state = runner.train_state()
  last = history[-1]
  # Steady-state throughput: the first epoch also pays for compilation, so it is reported apart.
  timed = [h for h in history if h["epoch"] > 1] or history
  ex_per_sec = sum(h["examples_per_sec"] * h["train_seconds"] for h in timed) / sum(h["train_seconds"] for h in timed)
  print(f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}, test acc {last['test_acc']:.3f}")
  print(f"{ex_per_sec:.1f} examples/sec on {device_name()}")
  if history[0]["epoch"] == 1 and len(history) > 1:
    print(f"(epoch 1, including compilation: {history[0]['train_seconds']:.1f} s)")
  summary = {
    "bn": norm,
    **{k: last[k] for k in ("train_loss", "train_acc", "test_acc")},
    "examples_per_sec": ex_per_sec,
  }
  if norm != "none":
    gamma = np.asarray(state.params["bn1"]["scale"]).reshape(-1)
    beta = np.asarray(state.params["bn1"]["bias"]).reshape(-1)
    print(f"gamma (bn1 scale): {np.array2string(gamma, precision=4)}")
    print(f"beta  (bn1 bias):  {np.array2string(beta, precision=4)}")
    summary.update(gamma=gamma.tolist(), beta=beta.tolist())
  if main_process:
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
  return summary, history


def barrier(name: str) -> None:
  """All processes meet here (a no-op with one process)."""
  import jax

  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def comparison_table(summaries: list[dict]) -> str:
  lines = [
    "| BatchNorm | loss | train acc | test acc | examples/sec | chapter (train / test acc, ex/s) |",
    "| --- | --- | --- | --- | --- | --- |",
  ]
  for s in summaries:
    ch = CHAPTER.get(s["bn"])
    chapter = f"{ch['train_acc']:.3f} / {ch['test_acc']:.3f}, {ch['examples_per_sec']:,.0f}" if ch else "-"
    lines.append(
      f"| {LABELS[s['bn']]} | {s['train_loss']:.3f} | {s['train_acc']:.3f} | {s['test_acc']:.3f} | "
      f"{s['examples_per_sec']:,.0f} | {chapter} |"
    )
  return "\n".join(lines)


def enable_compile_cache(directory: str) -> None:
  """JAX's persistent compilation cache in ``directory``, with one line on stderr saying so (or why not)."""
  import jax

  path = Path(directory).expanduser()
  try:
    make_writable_dir(path)
  except OSError as e:
    print(
      f"note: compilation cache {path} cannot be written ({e.strerror or e}); compiling from scratch "
      "(--compile-cache DIR to choose another, --no-compile-cache to silence this)",
      file=sys.stderr,
    )
    return
  entries = sum(1 for p in path.iterdir() if not p.name.startswith("."))
  jax.config.update("jax_compilation_cache_dir", str(path))
  # LeNet's programs compile in well under JAX's default 1 s threshold; cache them all.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  print(f"compilation cache: {path} ({entries} programs cached; --no-compile-cache to bypass)", file=sys.stderr)


def run(args: argparse.Namespace, progress: Progress) -> list[dict]:
  out = Path(args.out)
  norms = list(VARIANTS) if args.bn == "all" else [args.bn]
  check_out_dir(out, norms, args)  # before the imports and the data: a bad --out fails in a blink

  if not args.no_compile_cache:
    enable_compile_cache(args.compile_cache)
  mesh = setup_devices(args, norms)
  import jax.numpy as jnp

  from bnjax import data

  try:
    # Raw uint8 pixels: the training step scales them on the device (bit for bit as x / 255).
    dataset = data.load_fashion_mnist(args.data_dir, expect_full=not args.allow_partial_data, pixels="uint8")
  except data.DataError as e:
    raise RunError(str(e)) from None
  print(
    f"Fashion-MNIST from {dataset.source}: {len(dataset.train_labels)} train, {len(dataset.test_labels)} test; "
    f"device {device_name()}"
  )
  if mesh is None:
    arrays = tuple(jnp.asarray(a) for a in dataset[:4])
  else:  # host arrays: every process gathers only its own rows of each global batch
    arrays = tuple(dataset[:4])
    print(
      f"data parallel: {mesh.size} devices ({mesh.shape['group']} BN group(s) of {mesh.shape['data']}), "
      f"{args.num_processes} process(es); global batch {args.batch_size}"
    )
  summaries, histories = [], {}
  with make_watchdog(args) as watchdog:
    for norm in norms:
      summary, histories[norm] = run_variant(norm, arrays, args, out / norm, progress, mesh, watchdog)
      summaries.append(summary)
    if len(summaries) > 1:
      table = comparison_table(summaries)
      print(table)
      if not args.process_id:
        atomic_write_text(out / "comparison.md", table + "\n")
        plot_curves(histories, out / "comparison")
    barrier("done")
  print(f"wrote {out.resolve()}")
  return summaries


def setup_devices(args: argparse.Namespace, norms: list[str]):
  """Joins the other processes and builds the mesh; None for the one-device path. Errors before any work."""
  if args.num_processes > 1:
    from bnjax import parallel

    try:
      parallel.initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.timeout)
    except parallel.DistributedError as e:
      raise RunError(str(e)) from None
    if args.process_id:  # only process 0 speaks (the C++ collectives' notes too); errors still go to stderr
      sys.stdout.flush()
      os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  import jax

  one_device_only = None
  if args.api == "nnx":
    one_device_only = (
      "--api nnx trains on one device; data-parallel training (--devices, several processes) is linen's."
    )
  elif "ours-precise" in norms or args.precise_bn:
    what = "ours-precise" if "ours-precise" in norms else "--precise-bn"
    one_device_only = f"precise BN ({what}) runs on one device; leave it out with --devices/several processes."
  devices = args.devices
  if devices is None:  # default: all local devices, or one for what runs on one device only
    devices = jax.local_device_count()
    if one_device_only and devices > 1 and args.num_processes == 1 and args.bn_group_size is None:
      print(f"note: {one_device_only.split(';')[0]}: using 1 of {devices} devices", file=sys.stderr)
      devices = 1
  if args.num_processes == 1 and devices == 1 and args.bn_group_size is None:
    return None
  from bnjax import parallel

  if one_device_only:
    raise RunError(one_device_only)
  try:
    mesh = parallel.make_mesh(devices, args.bn_group_size)
    parallel.check_batch_size(mesh, args.batch_size)
  except ValueError as e:
    raise RunError(str(e)) from None
  return mesh


def make_watchdog(args: argparse.Namespace):
  """:class:`bnjax.parallel.Watchdog` with several processes (one process cannot wait for another), else a no-op."""
  if args.num_processes < 2:
    return contextlib.nullcontext()
  from bnjax import parallel

  return parallel.Watchdog(
    args.timeout, lambda: parallel.stalled_message(args.timeout, "waiting for a step or checkpoint")
  )


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  progress = Progress()
  try:
    return run(args, progress)
  except RunError as e:
    raise SystemExit(f"error: {e}") from None
  except RuntimeError as e:
    if args.num_processes < 2 or "Xla" not in type(e).__name__ and "Jax" not in type(e).__name__:
      raise
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    raise SystemExit(
      f"error: process {args.process_id} of {args.num_processes}: a collective operation failed ({first}); "
      "another process has probably died. The last checkpoint is kept: rerun every process with --resume."
    ) from None
  except OSError as e:  # disk full, permissions changed mid-run: name the file, no traceback
    where = f" ({e.filename})" if e.filename else ""
    raise SystemExit(f"error: cannot write the run's files{where}: {e.strerror or e}") from None
  except KeyboardInterrupt:
    saved = [f"[{n}] epoch {e} in {Path(args.out) / n / CHECKPOINT}" for n, e in progress.saved.items()]
    where = f" during [{progress.current}]" if progress.current else ""
    print(
      f"\nerror: interrupted{where}. Saved: {'; '.join(saved) or 'nothing yet'}. "
      f"Continue with the same command plus --resume (--out {args.out}).",
      file=sys.stderr,
    )
    raise SystemExit(130) from None


if __name__ == "__main__":
  main()
