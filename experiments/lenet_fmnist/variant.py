"""One variant's run, phase by phase: its model, its state (new or resumed), the epoch loop, its files.

:func:`run_variant` reads as the algorithm; each phase is a function of its own, so a test can run one alone
and a researcher can train another model through :func:`build_model`'s :class:`Model`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
from tqdm.auto import tqdm

from bnjax import sync
from experiments.lenet_fmnist import models, report, train
from experiments.lenet_fmnist.checkpoint import (
  CHECKPOINT,
  METRICS,
  RunError,
  atomic_write_text,
  restore_checkpoint,
  run_config,
  save_checkpoint,
)
from experiments.lenet_fmnist.compile_cache import program_store
from experiments.lenet_fmnist.config import RunConfig
from experiments.lenet_fmnist.distributed import barrier
from experiments.lenet_fmnist.evaluation import ema_decay, precise_batches, state_to_evaluate
from experiments.lenet_fmnist.train_and_evaluate import Progress


class Run(NamedTuple):
  """What every variant of a run shares."""

  config: RunConfig
  dataset: Any  # the host arrays, as input_pipeline loads them
  fingerprint: str  # checkpoint.data_fingerprint of them
  data: tuple[train.Data, train.Data]  # (train, test) where the loop reads them: on the device, or over the mesh
  mesh: Any  # the mesh, None on one device
  watchdog: Any  # distributed.Watchdog with several processes, else None
  figures: report.Figures
  progress: Progress


class Model(NamedTuple):
  """What the loop needs of a model."""

  init: Callable[[jax.Array], dict]  # key -> variables, on one device (train.init_run)
  apply: train.Apply  # the training loop's: linen or NNX, with the mesh's axis name on a mesh
  precise_apply: Callable  # (variables, uint8 images, **kwargs) on one device: precise BN's


class Variant(NamedTuple):
  """One variant of the run: its model and the settings it records."""

  norm: str
  out: Path  # its folder
  model: Model
  precise: int  # precise BN's batches before every evaluation (0: off)
  ema: float  # the decay of the weights' moving average evaluated (0: the weights themselves)
  label: str  # report.label
  identity: dict  # checkpoint.run_config: what --resume compares
  programs: Any  # programs.ProgramStore of its compiled programs without a data-parallel mesh, or None (make_variant)


def build_model(norm: str, config: RunConfig, axis_name: str | None) -> Model:
  """LeNet with the variant's norm (``ours-precise``, ``ours-ema``: the ours model) in ``--api``'s Flax API."""
  base = norm.split("-")[0]
  model = models.LeNet(norm=base, conv_impl=config.conv_impl, axis_name=axis_name, precision=config.precision)
  if config.api == "nnx":
    from flax import nnx  # (imported only for an NNX run)

    from experiments.lenet_fmnist.models_nnx import NNXLeNet

    nnx_model = NNXLeNet(
      base, conv_impl=config.conv_impl, precision=config.precision, axis_name=axis_name, rngs=nnx.Rngs(0)
    )
    apply = train.nnx_apply(nnx_model)
  else:
    apply = train.linen_apply(model)
  # Both APIs start from the linen model's initial variables (same names), so they give the same numbers.
  init = functools.partial(models.init_lenet, model.clone(axis_name=None))
  precise_model = model.clone(axis_name=None)  # precise BN runs on one device, identically on every process

  def precise_apply(variables, images, **kwargs):  # one function per run: its compiled program is reused
    return precise_model.apply(variables, train.as_float_images(images), **kwargs)

  return Model(init, apply, precise_apply)


def make_variant(norm: str, run: Run, out: Path, build: Callable = build_model) -> Variant:
  """The variant's model (``build``) and settings: precise BN and EMA as :mod:`evaluation` decides, its identity."""
  config, mesh = run.config, run.mesh
  model = build(norm, config, None if mesh is None else sync.DATA)
  precise, ema = precise_batches(norm, config), ema_decay(norm, config)
  label = report.label(norm, precise, ema)  # --precise-bn and --ema apply to plain variants too: say so
  # Each BN layer normalizes over the examples of its group: the global batch, or its share on a mesh of groups.
  group_examples = config.batch_size if mesh is None else config.batch_size // mesh.shape[sync.GROUP]
  identity = run_config(
    config, bn=norm, precise_bn=precise, ema=ema, data=run.fingerprint, bn_group_examples=group_examples
  )
  # Compiled programs are stored for this experiment's own model off a data-parallel mesh, named by its settings; a
  # model from another `build` may differ in ways these settings do not say, so its programs are traced every run.
  settings = dict(norm=norm, api=config.api, conv_impl=config.conv_impl, precision=config.precision, lr=config.lr)
  stored = build is build_model and mesh is None
  programs = program_store(config, repr(sorted({**settings, "ema": ema}.items()))) if stored else None
  return Variant(norm, out, model, precise, ema, label, identity, programs)


def clear_run_files(out: Path) -> None:
  """``--overwrite``: the old run's files in ``out`` go before the new run writes any."""
  for name in (CHECKPOINT, METRICS, "summary.json", "curves.png", "curves.svg"):
    (out / name).unlink(missing_ok=True)
  for per_seed in out.glob("seed-*/"):
    shutil.rmtree(per_seed)


def compile_ahead(state, variant: Variant, run: Run, then: Callable[[], Any] | None = None) -> None:
  """Without a data-parallel mesh: the epoch's and the evaluation's programs are queued for compilation, in the
  order the run needs them (``state`` may be shapes); ``then`` as :func:`train.compile_ahead` has it (called in
  any case)."""
  if run.mesh is None:
    train_data, test_data = run.data
    config = run.config
    train.compile_ahead(
      state,
      train_data,
      test_data,
      config.batch_size,
      loop=config.loop,
      replicated=len(config.seeds) > 1,
      store=variant.programs,
      then=then,
    )
  elif then is not None:
    then()


def new_state(variant: Variant, run: Run):
  """``(state, shuffle_key)``: the variant's initial train state and the run's shuffle key. Without
  ``--resume`` the programs compile from the state's shapes alone, beside the initialization's own compilation."""
  config = run.config
  replicated = len(config.seeds) > 1
  seed = config.seeds if replicated else config.seed

  def create(variables):
    return train.create_train_state(
      variant.model.apply, variables, config.lr, ema_decay=variant.ema, replicated=replicated
    )

  init = []

  def prepare_init():
    init.append(train.prepare_init(variant.model.init, seed, variant.programs))

  if config.resume:
    prepare_init()
  else:  # the initialization's program is queued right after the longest one, the epoch's first
    shapes = jax.eval_shape(create, train.init_run_shapes(variant.model.init, seed)[0])
    compile_ahead(shapes, variant, run, then=prepare_init)
  variables, shuffle_key = train.init_run(variant.model.init, seed, prepared=init[0])
  return create(variables), shuffle_key


def resume(variant: Variant, state, progress: Progress):
  """``(state, epoch, history)`` from the variant's checkpoint (``state`` and nothing done when it has none)."""
  norm, out = variant.norm, variant.out
  ckpt_path, metrics_path = out / CHECKPOINT, out / METRICS
  if not ckpt_path.is_file():
    print(f"[{norm}] --resume: no run in {out} yet, starting from scratch")
    return state, 0, []
  state, start_epoch, history = restore_checkpoint(ckpt_path, state, variant.identity)
  progress.saved[norm] = start_epoch
  try:
    json.loads(metrics_path.read_text())
  except (OSError, ValueError) as e:  # the checkpoint carries the history: nothing is lost
    reason = e.strerror if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
    print(f"note: {metrics_path} is unreadable ({reason}); it is rewritten from the checkpoint", file=sys.stderr)
  print(f"[{norm}] resumed from {ckpt_path} after epoch {start_epoch}")
  return state, start_epoch, history


def nothing_to_do(variant: Variant, config: RunConfig, start_epoch: int, history: list[dict], state) -> dict:
  """The summary of a variant already trained to ``--epochs`` (with ``--bn all``); RunError for a single one."""
  norm = variant.norm
  if config.bn != "all":
    raise RunError(
      f"[{norm}] nothing to do: {variant.out / CHECKPOINT} is already at epoch {start_epoch} >= --epochs "
      f"{config.epochs}."
    )
  # --bn all interrupted in a later variant: this one is done, its lines come from the checkpoint.
  print(f"[{norm}] already trained to epoch {start_epoch} (--epochs {config.epochs}): nothing to do")
  return report.closing_lines(norm, history, state.params, variant.label)


def host_state(state, mesh):
  """The state as host arrays (on a mesh), or as it is."""
  return sync.to_host(state) if mesh is not None else state


def heartbeat(watchdog) -> Callable[[], None]:
  """Tells the watchdog (several processes) that the collectives progress; a no-op without one."""
  return watchdog.beat if watchdog is not None else lambda: None


def progress_bar(norm: str, epoch: int, config: RunConfig, steps: int) -> tqdm:
  """The epoch's progress bar on stdout (hidden with ``--no-progress``), gone when closed."""
  return tqdm(
    total=steps,
    desc=f"[{norm}] epoch {epoch + 1}/{config.epochs}",
    unit="batch",
    leave=False,
    disable=config.no_progress,
    file=sys.stdout,
  )


def timed_epoch(state, shuffle_key, epoch: int, run: Run, bar: tqdm, beat: Callable[[], None]):
  """``(state, metrics, seconds)``: one epoch of training, timed to its last result, with the bar advancing."""
  config = run.config

  def on_progress(n):
    beat()
    bar.update(n)
    run.figures.prepare()  # (training is under way: the main thread mostly waits on the device now)

  t0 = time.perf_counter()
  state, metrics = train.train_epoch(
    state,
    run.data[0],
    shuffle_key,
    config.batch_size,
    epoch=epoch,
    mesh=run.mesh,
    loop=config.loop,
    on_progress=on_progress,
    replicated=len(config.seeds) > 1,
  )
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - t0
  bar.close()
  return state, metrics, seconds


def epoch_row(
  epoch: int, metrics, test: dict, seconds: float, eval_seconds: float, precise_seconds: float, seeds: list[int]
) -> dict:
  """The epoch's line of the history: training metrics (summed over the epoch), test metrics, timings
  (``eval_seconds``: the evaluation after the epoch, precise BN's statistics included)."""
  tr = train.summarize(metrics)
  return {
    "epoch": epoch + 1,
    "train_loss": tr["loss"],
    "train_acc": tr["acc"],
    "test_loss": test["loss"],
    "test_acc": test["acc"],
    "train_seconds": seconds,
    "eval_seconds": eval_seconds,
    "examples_per_sec": int(sync.to_host(metrics)["count"].sum()) / seconds,  # (all seeds' examples)
    "precise_bn_seconds": precise_seconds,
    **({"seeds": seeds} if len(seeds) > 1 else {}),
  }


def write_epoch(variant: Variant, config: RunConfig, history: list[dict], state) -> None:
  """``metrics.json`` (and each seed's), then the checkpoint of the host ``state``, which carries the history
  too: an interruption between the two leaves a checkpoint one epoch behind metrics.json, and resume trims
  the history to it."""
  out = variant.out
  record = {
    "bn": variant.norm,
    "label": variant.label,
    "args": dataclasses.asdict(config),
    "device": report.device_name(),
    "epochs": history,
  }
  atomic_write_text(out / METRICS, json.dumps(record, indent=1))
  for i, seed in enumerate(config.seeds if len(config.seeds) > 1 else []):  # each seed's history as its own run's
    seed_record = {**record, "seed": seed, "epochs": report.seed_history(history, i)}
    (out / f"seed-{seed}").mkdir(exist_ok=True)
    atomic_write_text(out / f"seed-{seed}" / METRICS, json.dumps(seed_record, indent=1))
  save_checkpoint(out / CHECKPOINT, state, history[-1]["epoch"], history, variant.identity)


def evaluate_epoch(variant: Variant, run: Run, state, shuffle_key, epoch: int):
  """``(state, test metrics, precise BN seconds)`` after an epoch: the weights evaluated as :mod:`evaluation`
  decides (the state's or their average, with precise BN's statistics or the running ones) on the test set."""
  config = run.config
  state, evaluated, precise_seconds = state_to_evaluate(
    state,
    precise=variant.precise,
    ema=variant.ema,
    apply=variant.model.precise_apply,
    images=run.dataset.train_images,
    batch_size=config.batch_size,
    shuffle_key=shuffle_key,
    epoch=epoch,
    seeds=len(config.seeds),
    mesh=run.mesh,
  )
  test = train.evaluate(evaluated, run.data[1], mesh=run.mesh, replicated=len(config.seeds) > 1)
  return state, train.summarize(test), precise_seconds


def train_epochs(variant: Variant, run: Run, state, shuffle_key, start_epoch: int, history: list[dict]):
  """``(state, history)`` after training from ``start_epoch`` to ``--epochs``: after every epoch, an evaluation,
  a line, the files (process 0) and a barrier (several processes)."""
  config, norm, mesh = run.config, variant.norm, run.mesh
  beat = heartbeat(run.watchdog)
  steps = train.steps_per_epoch(len(run.dataset.train_labels), config.batch_size)
  for epoch in range(start_epoch, config.epochs):
    bar = progress_bar(norm, epoch, config, steps)
    state, metrics, seconds = timed_epoch(state, shuffle_key, epoch, run, bar, beat)
    t0 = time.perf_counter()
    state, test, precise_seconds = evaluate_epoch(variant, run, state, shuffle_key, epoch)
    row = epoch_row(epoch, metrics, test, seconds, time.perf_counter() - t0, precise_seconds, config.seeds)
    beat()
    history.append(row)
    print(report.epoch_line(norm, row, config.epochs), flush=True)
    if jax.process_index() == 0:
      write_epoch(variant, config, history, host_state(state, mesh))
    run.progress.saved[norm] = epoch + 1
    if run.watchdog is not None:
      barrier(f"checkpoint {norm} {epoch + 1}")  # nobody runs ahead of a checkpoint it may have to resume from
      beat()
  return state, history


def finish(variant: Variant, run: Run, state, history: list[dict]) -> dict:
  """The variant's figure and ``summary.json`` (process 0); returns the summary."""
  main_process = jax.process_index() == 0
  if main_process:
    run.figures.draw(report.plot_curves, {variant.norm: history}, variant.out / "curves", {variant.norm: variant.label})
  summary = report.closing_lines(variant.norm, history, host_state(state, run.mesh).params, variant.label)
  if main_process:
    atomic_write_text(variant.out / "summary.json", json.dumps(summary, indent=1))
  return summary


def run_variant(norm: str, run: Run, out: Path, build: Callable = build_model) -> tuple[dict, list[dict]]:
  """Trains one variant into ``out``; returns its summary (final metrics, throughput, gamma/beta) and per-epoch
  history. Only process 0 writes files."""
  out.mkdir(parents=True, exist_ok=True)
  if run.config.overwrite and jax.process_index() == 0:  # explicit: the old run's files go before the new run's
    clear_run_files(out)
  variant = make_variant(norm, run, out, build)
  state, shuffle_key = new_state(variant, run)
  run.progress.current = norm
  state, start_epoch, history = resume(variant, state, run.progress) if run.config.resume else (state, 0, [])
  if start_epoch >= run.config.epochs:
    return nothing_to_do(variant, run.config, start_epoch, history, state), history
  if run.config.resume:  # (now that there is an epoch left to train)
    compile_ahead(state, variant, run)
  state, history = train_epochs(variant, run, train.place(state, run.mesh), shuffle_key, start_epoch, history)
  return finish(variant, run, state, history), history
