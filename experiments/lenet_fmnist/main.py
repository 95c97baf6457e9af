"""Reproduce D2L's "Batch Normalization" chapter: LeNet + BatchNorm on Fashion-MNIST.

    python -m experiments.lenet_fmnist                  # ours, the chapter's settings
    python -m experiments.lenet_fmnist --bn all         # every variant, plus a comparison
    python -m experiments.lenet_fmnist --seeds 0-7      # 8 seeds side by side (jax.vmap), a distribution
    python -m experiments.lenet_fmnist --resume         # continue from --out's checkpoints

Prints a progress bar per epoch, a line per epoch, then the chapter's lines (loss, train acc,
test acc, examples/sec) and the first BN layer's gamma and beta. Writes to ``--out/<bn>/``:
``checkpoint.msgpack`` (state, epoch, history and the run's settings) and ``metrics.json`` after
every epoch, ``curves.png``/``curves.svg`` (the chapter's figure) and ``summary.json`` at the end; with
several seeds also ``seed-S/metrics.json`` per seed, and mean +- std wherever one seed shows a number.
Every file is written to a temporary name and renamed, so an interruption at any moment leaves the
last complete checkpoint and never a half-written file; it loses at most the epoch in progress.

More devices, more hosts: ``--devices N`` trains data-parallel on N local devices (default: all),
with BN synchronized over the whole global batch (``--bn-group-size G``: within groups of G devices);
``--coordinator HOST:PORT --num-processes P --process-id I`` joins P processes. Only process 0
prints, writes metrics, plots and checkpoints; ``--timeout`` bounds every wait.

Compiled programs are kept in JAX's persistent compilation cache (``--compile-cache``, default
``$BNJAX_COMPILE_CACHE`` or ``~/.cache/bnjax/xla``), so a second run skips compilation.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import functools
import json
import os
import shutil
import sys
import time
from pathlib import Path

from experiments.lenet_fmnist.arguments import DEFAULT_EMA_DECAY, DEFAULT_PRECISE_BATCHES, VARIANTS, parse_args
from experiments.lenet_fmnist.checkpoint import (
  CHECKPOINT,
  METRICS,
  RunError,
  atomic_write_text,
  check_runs,
  check_same_epoch,
  data_fingerprint,
  exclusive,
  make_writable_dir,
  prepare_out_dir,
  restore_checkpoint,
  run_config,
  save_checkpoint,
)


class Progress:
  """What is safely on disk, for the message after an interruption."""

  def __init__(self):
    self.current: str | None = None
    self.saved: dict[str, int] = {}


def precise_stats(apply, variables, images, num_batches: int, batch_size: int, shuffle_key, epoch: int, seeds=1):
  """Precise BN for the chapter: ``num_batches`` random training batches, weights frozen, population statistics.

  ``apply`` is the (one-device) model's apply function on uint8 images; pass the same one every epoch,
  so that the compiled program is reused. ``images`` are the host's; every process computes the same.
  With ``seeds`` > 1, ``variables`` and ``shuffle_key`` hold that many replicas: each gets its own
  statistics, exactly as its single-seed run (stacked again).
  """
  import jax
  import numpy as np

  from bnjax import precise_batch_stats
  from experiments.lenet_fmnist.train import replica

  if seeds > 1:
    each = [
      precise_stats(apply, replica(variables, i), images, num_batches, batch_size, shuffle_key[i], epoch)
      for i in range(seeds)
    ]
    return jax.tree.map(lambda *a: np.stack(a), *each)

  check_one_full_batch(images.shape[0], batch_size)
  count = min(num_batches * batch_size, images.shape[0]) // batch_size * batch_size
  # A different stream from the epoch's shuffle (fold_in of a second index), fixed per epoch: reproducible.
  perm = jax.random.permutation(jax.random.fold_in(jax.random.fold_in(shuffle_key, epoch), 1), images.shape[0])
  batches = np.asarray(images)[np.asarray(perm[:count])].reshape(-1, batch_size, *images.shape[1:])
  return precise_batch_stats(apply, variables, batches, model_kwargs={"train": True})["batch_stats"]


def check_one_full_batch(n_train: int, batch_size: int) -> None:
  """Precise BN draws whole batches: with fewer training examples than one, it has none."""
  if n_train < batch_size:
    raise RunError(
      f"precise BN needs at least one full batch of {batch_size} training examples, but there are "
      f"{n_train}; lower --batch-size."
    )


def precise_batches(norm: str, args: argparse.Namespace) -> int:
  """How many batches precise BN uses before every evaluation of this variant (0: off). Averaged weights
  (``ours-ema``, ``--ema``) always get statistics of their own: the running averages belong to other weights."""
  if norm == "none":
    return 0
  recompute = norm in ("ours-precise", "ours-ema") or ema_decay(norm, args) > 0
  return args.precise_bn or (DEFAULT_PRECISE_BATCHES if recompute else 0)


def ema_decay(norm: str, args: argparse.Namespace) -> float:
  """The decay of the weights' moving average this variant is evaluated with (0: the weights themselves)."""
  return args.ema or (DEFAULT_EMA_DECAY if norm == "ours-ema" else 0.0)


def checkpoint_digest(path: Path) -> str | None:
  """A SHA-256 prefix of the checkpoint file, None when there is none."""
  import hashlib

  return hashlib.sha256(path.read_bytes()).hexdigest()[:16] if path.is_file() else None


def agree_across_processes(settings: dict) -> None:
  """Every process must run the same settings: process 0's are gathered with everyone's, and a difference
  stops every process with the same one line, before any work."""
  import jax
  import numpy as np

  from experiments.lenet_fmnist.distributed import allgather_rows

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


def run_variant(
  norm: str,
  dataset,
  fingerprint: str,
  data,
  args: argparse.Namespace,
  out: Path,
  progress: Progress,
  mesh,
  watchdog,
  figures,
):
  """Trains one variant; returns its summary (final metrics, throughput, gamma/beta) and per-epoch history.

  ``data`` is ``(train, test)`` as :class:`train.Data` (on the device, or replicated over ``mesh``);
  ``dataset`` holds the host arrays. Only process 0 writes files.
  """
  import jax
  from flax import nnx
  from tqdm.auto import tqdm

  from bnjax import sync
  from experiments.lenet_fmnist import models, report, train
  from experiments.lenet_fmnist.distributed import barrier

  train_data, test_data = data
  main_process = jax.process_index() == 0
  out.mkdir(parents=True, exist_ok=True)
  ckpt_path, metrics_path = out / CHECKPOINT, out / METRICS
  if args.overwrite and main_process:  # explicit: the old run's files go before the new run writes any
    for name in (CHECKPOINT, METRICS, "summary.json", "curves.png", "curves.svg"):
      (out / name).unlink(missing_ok=True)
    for per_seed in out.glob("seed-*/"):
      shutil.rmtree(per_seed)
  base = norm.split("-")[0]  # ours-precise, ours-ema: the ours model
  seeds = len(args.seeds)
  replicated = seeds > 1
  axis_name = None if mesh is None else sync.DATA
  model = models.LeNet(norm=base, conv_impl=args.conv_impl, axis_name=axis_name, precision=args.precision)
  if args.api == "nnx":
    apply = train.nnx_apply(
      models.NNXLeNet(base, conv_impl=args.conv_impl, precision=args.precision, axis_name=axis_name, rngs=nnx.Rngs(0))
    )
  else:
    apply = train.linen_apply(model)
  precise, ema = precise_batches(norm, args), ema_decay(norm, args)
  ran = report.label(norm, precise, ema)  # --precise-bn and --ema apply to plain variants too: say so
  # Each BN layer normalizes over the examples of its group: the global batch, or its share on a mesh of groups.
  group_examples = args.batch_size if mesh is None else args.batch_size // mesh.shape[sync.GROUP]
  config = run_config(args, bn=norm, precise_bn=precise, ema=ema, data=fingerprint, bn_group_examples=group_examples)
  # Both APIs start from the linen model's initial variables (same names), so they give the same numbers.
  init = functools.partial(models.init_lenet, model.clone(axis_name=None))
  seed = args.seeds if replicated else args.seed

  def new_state(variables):
    return train.create_train_state(apply, variables, args.lr, ema_decay=ema, replicated=replicated)

  def compile_ahead(state):  # one device: the epoch's and the evaluation's programs compile side by side
    if mesh is None:
      train.compile_ahead(state, train_data, test_data, args.batch_size, loop=args.loop, replicated=replicated)

  if not args.resume:  # (from the state's shapes alone, beside the initialization's own compilation)
    compile_ahead(jax.eval_shape(new_state, train.init_run_shapes(init, seed)[0]))
  variables, shuffle_key = train.init_run(init, seed)
  state = new_state(variables)
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
    if args.bn != "all":
      raise RunError(
        f"[{norm}] nothing to do: {ckpt_path} is already at epoch {start_epoch} >= --epochs {args.epochs}."
      )
    # --bn all interrupted in a later variant: this one is done, its lines come from the checkpoint.
    print(f"[{norm}] already trained to epoch {start_epoch} (--epochs {args.epochs}): nothing to do")
    return report.closing_lines(norm, history, state.params, ran), history
  if args.resume:  # (now that there is an epoch left to train)
    compile_ahead(state)
  state = train.place(state, mesh)
  host_state = sync.to_host if mesh is not None else (lambda s: s)
  precise_model = model.clone(axis_name=None)  # precise BN runs on one device, identically on every process

  def precise_apply(variables, images, **kwargs):  # one function per run: its compiled program is reused
    return precise_model.apply(variables, train.as_float_images(images), **kwargs)

  def beat():
    if watchdog is not None:  # several processes: tell the watchdog the collectives progress
      watchdog.beat()

  steps = train.steps_per_epoch(len(dataset.train_labels), args.batch_size)
  for epoch in range(start_epoch, args.epochs):
    bar = tqdm(
      total=steps,
      desc=f"[{norm}] epoch {epoch + 1}/{args.epochs}",
      unit="batch",
      leave=False,
      disable=args.no_progress,
      file=sys.stdout,
    )

    def on_progress(n, bar=bar):
      beat()
      bar.update(n)

    t0 = time.perf_counter()
    state, metrics = train.train_epoch(
      state,
      train_data,
      shuffle_key,
      args.batch_size,
      epoch=epoch,
      mesh=mesh,
      loop=args.loop,
      on_progress=on_progress,
      replicated=replicated,
    )
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    bar.close()
    precise_seconds = 0.0
    # Evaluated: the weights, or their moving average; with precise BN, statistics recomputed for those.
    evaluated = state.replace(params=state.ema_params) if ema else state
    if precise:
      t1 = time.perf_counter()
      now = host_state(evaluated)
      variables = {"params": now.params, "batch_stats": now.batch_stats}
      stats = precise_stats(
        precise_apply, variables, dataset.train_images, precise, args.batch_size, shuffle_key, epoch, seeds
      )
      stats = jax.block_until_ready(stats)  # (dispatch is asynchronous: time the work)
      evaluated = evaluated.replace(batch_stats=train.place(sync.to_host(stats), mesh) if mesh is not None else stats)
      precise_seconds = time.perf_counter() - t1
      if not ema:  # the state keeps them: its checkpoint evaluates to the numbers reported
        state = evaluated
    tr = train.summarize(metrics)
    te = train.summarize(train.evaluate(evaluated, test_data, mesh=mesh, replicated=replicated))
    beat()
    row = {
      "epoch": epoch + 1,
      "train_loss": tr["loss"],
      "train_acc": tr["acc"],
      "test_loss": te["loss"],
      "test_acc": te["acc"],
      "train_seconds": seconds,
      "examples_per_sec": int(sync.to_host(metrics)["count"].sum()) / seconds,  # (all seeds' examples)
      "precise_bn_seconds": precise_seconds,
      **({"seeds": args.seeds} if replicated else {}),
    }
    history.append(row)
    print(report.epoch_line(norm, row, args.epochs), flush=True)
    # Metrics first, then the checkpoint (which carries the history too): an interruption between the
    # two leaves a checkpoint one epoch behind metrics.json, and resume trims the history to it.
    if main_process:
      record = {"bn": norm, "label": ran, "args": vars(args), "device": report.device_name(), "epochs": history}
      atomic_write_text(metrics_path, json.dumps(record, indent=1))
      for i, seed in enumerate(args.seeds if replicated else []):  # each seed's history as its own run's
        seed_record = {**record, "seed": seed, "epochs": report.seed_history(history, i)}
        (out / f"seed-{seed}").mkdir(exist_ok=True)
        atomic_write_text(out / f"seed-{seed}" / METRICS, json.dumps(seed_record, indent=1))
      save_checkpoint(ckpt_path, host_state(state), epoch + 1, history, config)
    progress.saved[norm] = epoch + 1
    if watchdog is not None:
      barrier(f"checkpoint {norm} {epoch + 1}")  # nobody runs ahead of a checkpoint it may have to resume from
      beat()

  if main_process:
    figures.draw(report.plot_curves, {norm: history}, out / "curves", {norm: ran})
  summary = report.closing_lines(norm, history, host_state(state).params, ran)
  if main_process:
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1))
  return summary, history


@contextlib.contextmanager
def compile_cache(args: argparse.Namespace):
  """JAX's persistent compilation cache for the run (none at all with ``--no-compile-cache``, not even one
  the environment configures, e.g. ``JAX_COMPILATION_CACHE_DIR``), set back after it: ``main()`` called
  from Python (a notebook, the tests) leaves no global setting behind."""
  import jax
  from jax.experimental.compilation_cache import compilation_cache

  names = (
    "jax_compilation_cache_dir",
    "jax_enable_compilation_cache",
    "jax_persistent_cache_min_compile_time_secs",
    "jax_persistent_cache_min_entry_size_bytes",
  )
  before = {name: getattr(jax.config, name) for name in names}
  try:
    compilation_cache.reset_cache()  # JAX opens its cache once per process: make it see this run's setting
    if args.no_compile_cache:
      jax.config.update("jax_enable_compilation_cache", False)
    else:
      enable_compile_cache(args.compile_cache)
    yield
  finally:
    for name, value in before.items():
      jax.config.update(name, value)
    compilation_cache.reset_cache()


def enable_compile_cache(directory: str) -> None:
  """JAX's persistent compilation cache in ``directory``, with one line on stderr saying so (or why not)."""
  import jax

  path = Path(directory).expanduser()
  try:
    make_writable_dir(path)
    entries = sum(1 for p in path.iterdir() if not p.name.startswith("."))
  except OSError as e:
    print(
      f"note: compilation cache {path} cannot be written ({e.strerror or e}); compiling from scratch "
      "(--compile-cache DIR to choose another, --no-compile-cache to silence this)",
      file=sys.stderr,
    )
    jax.config.update("jax_enable_compilation_cache", False)
    return
  jax.config.update("jax_compilation_cache_dir", str(path))
  # LeNet's programs compile in well under JAX's default 1 s threshold; cache them all.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  print(f"compilation cache: {path} ({entries} programs cached; --no-compile-cache to bypass)", file=sys.stderr)


def load_data(args: argparse.Namespace):
  from experiments.lenet_fmnist import input_pipeline

  try:
    # Raw uint8 pixels: the training step scales them on the device (bit for bit as x / 255).
    return input_pipeline.load_fashion_mnist(
      args.data_dir, source=args.data_source, expect_full=not args.allow_partial_data, pixels="uint8"
    )
  except input_pipeline.DataError as e:
    raise RunError(str(e)) from None


def run(args: argparse.Namespace, progress: Progress) -> list[dict]:
  norms = list(VARIANTS) if args.bn == "all" else [args.bn]
  out = prepare_out_dir(args.out)  # before the imports and the data: a bad --out fails in a blink
  if args.process_id:  # only process 0 writes; --out is shared by every process
    return train_all(args, progress, out, norms)
  with exclusive(out):
    check_runs(out, norms, args)
    return train_all(args, progress, out, norms)


def train_all(args: argparse.Namespace, progress: Progress, out: Path, norms: list[str]) -> list[dict]:
  """Joins the processes, loads the data and trains every variant (process 0 holds --out's lock)."""
  # The data are read and decompressed in a thread while JAX is imported and the processes join.
  with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="load-data") as loader:
    dataset = loader.submit(load_data, args)
    with compile_cache(args):
      return train_variants(args, progress, out, norms, dataset)


def train_variants(
  args: argparse.Namespace, progress: Progress, out: Path, norms: list[str], dataset: concurrent.futures.Future
) -> list[dict]:
  mesh = setup_devices(args)
  from experiments.lenet_fmnist import report
  from experiments.lenet_fmnist.distributed import barrier

  # From here on every wait for another process is bounded: one that failed (bad data, other settings)
  # or died leaves the others a clear line within --timeout, not a hang.
  with make_watchdog(args) as watchdog, report.Figures(draw=not args.process_id) as figures:
    dataset, fingerprint, data = prepare_data(dataset.result(), args, out, norms, mesh)
    if args.resume and len(norms) > 1:  # (every process reads the same checkpoints: all stop with one line)
      check_same_epoch(out, norms, args.epochs)
    summaries, histories = [], {}
    for norm in norms:
      summary, histories[norm] = run_variant(
        norm, dataset, fingerprint, data, args, out / norm, progress, mesh, watchdog, figures
      )
      summaries.append(summary)
    if len(summaries) > 1:
      labels = {s["bn"]: s["label"] for s in summaries}
      table = report.comparison_table(summaries)
      print(table)
      if not args.process_id:
        atomic_write_text(out / "comparison.md", table + "\n")
        figures.draw(report.plot_curves, histories, out / "comparison", labels)
        figures.draw(report.plot_test_accuracy, histories, out / "comparison_test_acc", labels)
    if len(args.seeds) > 1 and not args.process_id and all(histories.values()):
      atomic_write_text(out / "seeds.md", report.seed_table(histories, {s["bn"]: s["label"] for s in summaries}) + "\n")
    figures.wait()
    barrier("done")
  print(f"wrote {out.resolve()}")
  return summaries


def prepare_data(dataset, args: argparse.Namespace, out: Path, norms: list[str], mesh):
  """``(dataset, fingerprint, (train, test))``: the host arrays (``dataset``, as loaded), their fingerprint, and
  where the loop reads them; every process agrees on the settings and data first."""
  import jax

  from experiments.lenet_fmnist import report, train

  print(
    f"Fashion-MNIST from {dataset.source}: {len(dataset.train_labels)} train, {len(dataset.test_labels)} test; "
    f"device {report.device_name()}"
  )
  if len(dataset.train_labels) < 2 or len(dataset.test_labels) < 1:
    raise RunError(
      f"Fashion-MNIST from {dataset.source} has {len(dataset.train_labels)} training and {len(dataset.test_labels)} "
      "test examples; training needs at least 2 and evaluation at least 1."
    )
  if any(precise_batches(norm, args) for norm in norms):
    check_one_full_batch(len(dataset.train_labels), args.batch_size)  # before any epoch trains, not after one
  if args.batch_size > len(dataset.train_labels):  # (its padding would be allocated: 10^8 runs out of memory)
    raise RunError(
      f"--batch-size is {args.batch_size}, but the training set has {len(dataset.train_labels)} examples; use at "
      f"most {len(dataset.train_labels)} (one batch is then the whole set)."
    )
  fingerprint = data_fingerprint(*dataset[:4])
  # Everything that shapes the trajectory, for the processes to agree on (not where each one runs from).
  local = ("process_id", "coordinator", "no_progress", "compile_cache", "no_compile_cache", "data_dir", "timeout")
  settings = {**{k: v for k, v in vars(args).items() if k not in local}, "data": fingerprint}
  del settings["seeds"]  # several processes train one seed (arguments.py refuses more): "seed" says it
  if mesh is not None:  # the devices each process trains on (--devices, default all: may differ per machine)
    settings["devices"] = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  if args.resume:  # every process must resume from the same checkpoint (--out must be shared)
    settings["checkpoints"] = {norm: checkpoint_digest(out / norm / CHECKPOINT) for norm in norms}
  agree_across_processes(settings)
  data = tuple(train.Data.put(x, y, mesh) for x, y in (dataset[:2], dataset[2:4]))
  if mesh is not None:
    print(
      f"data parallel: {mesh.size} devices ({mesh.shape['group']} BN group(s) of {mesh.shape['data']}), "
      f"{args.num_processes} process(es); global batch {args.batch_size}"
    )
  return dataset, fingerprint, data


def setup_devices(args: argparse.Namespace):
  """Joins the other processes and builds the mesh; None for the one-device path. Errors before any work."""
  if args.num_processes > 1:
    from experiments.lenet_fmnist import distributed

    try:
      distributed.initialize(args.coordinator, args.num_processes, args.process_id, timeout_s=args.timeout)
    except distributed.DistributedError as e:
      raise RunError(str(e)) from None
    if args.process_id:  # only process 0 speaks (the C++ collectives' notes too); errors still go to stderr
      sys.stdout.flush()
      devnull = os.open(os.devnull, os.O_WRONLY)
      os.dup2(devnull, sys.stdout.fileno())
      os.close(devnull)
  import jax

  from bnjax import sync

  devices = jax.local_device_count() if args.devices is None else args.devices
  if len(args.seeds) > 1:  # replicas side by side on one device (the flags allow nothing else)
    devices = 1
  if args.num_processes == 1 and devices == 1 and args.bn_group_size is None:
    return None
  try:
    mesh = sync.make_mesh(devices, args.bn_group_size)
    sync.check_divisible(mesh, args.batch_size)
  except ValueError as e:  # the library names its arguments; the CLI user knows the flags
    message = str(e).replace("`devices_per_process`", "--devices").replace("`bn_group_size`", "--bn-group-size")
    raise RunError(message.replace("the global batch size", "--batch-size")) from None
  return mesh


def make_watchdog(args: argparse.Namespace):
  """A watchdog with several processes (one process cannot wait for another), else a no-op."""
  if args.num_processes < 2:
    return contextlib.nullcontext()
  from experiments.lenet_fmnist import distributed

  return distributed.Watchdog(
    args.timeout, lambda: distributed.stalled_message(args.timeout, "waiting for the other processes")
  )


class Terminated(BaseException):
  """SIGTERM, raised where the run is (as Ctrl-C raises KeyboardInterrupt): not caught as an ``Exception``."""


@contextlib.contextmanager
def terminated_as_exception():
  """SIGTERM (``kill``, a scheduler's stop) raises :class:`Terminated` while the run lasts, so that it ends
  as Ctrl-C does: files closed, temporary files removed, one line saying what ``--resume`` continues from."""
  import signal
  import threading

  if threading.current_thread() is not threading.main_thread():  # (only the main thread handles signals)
    yield
    return

  def stop(signum, frame):
    raise Terminated

  before = signal.signal(signal.SIGTERM, stop)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, before)


def stopped(args: argparse.Namespace, progress: Progress, how: str, code: int) -> SystemExit:
  """The line after an interruption: what is saved, and how to continue."""
  saved = [f"[{n}] epoch {e} in {Path(args.out) / n / CHECKPOINT}" for n, e in progress.saved.items()]
  where = f" during [{progress.current}]" if progress.current else ""
  print(
    f"\nerror: {how}{where}. Saved: {'; '.join(saved) or 'nothing yet'}. "
    f"Continue with the same command plus --resume (--out {args.out}).",
    file=sys.stderr,
  )
  return SystemExit(code)


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  progress = Progress()
  try:
    with terminated_as_exception():
      return run(args, progress)
  except RunError as e:
    raise SystemExit(f"error: {e}") from None
  except RuntimeError as e:
    if args.num_processes < 2 or "Xla" not in type(e).__name__ and "Jax" not in type(e).__name__:
      raise
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    print(
      f"error: process {args.process_id} of {args.num_processes}: a collective operation failed ({first}); "
      "another process has probably died. The last checkpoint is kept: rerun every process with --resume.",
      file=sys.stderr,
      flush=True,
    )
    # Exit now, as the watchdog does: a normal exit runs JAX's distributed shutdown, which waits for every
    # process and aborts this one (C++ check failure, status 134) when a peer is dead. Files are closed.
    sys.stdout.flush()
    os._exit(3)
  except OSError as e:  # disk full, permissions changed mid-run: name the file, no traceback
    where = f" ({e.filename})" if e.filename else ""
    raise SystemExit(f"error: cannot write the run's files{where}: {e.strerror or e}") from None
  except KeyboardInterrupt:
    raise stopped(args, progress, "interrupted", 130) from None
  except Terminated:
    raise stopped(args, progress, "terminated (SIGTERM)", 143) from None
