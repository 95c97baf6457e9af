"""One run, as Flax's examples have it: :func:`train_and_evaluate` trains and evaluates every variant ``--bn``
names into a folder, with the run's data, devices and compilation cache; ``main`` only parses and maps errors.

Only the standard library and jax-free modules are imported at the top: the data load (a thread) starts
before jax is imported, and overlaps it.
"""

from __future__ import annotations

import concurrent.futures
import gc
from collections.abc import Callable
from pathlib import Path

from experiments.lenet_fmnist.checkpoint import atomic_write_text, check_same_epoch
from experiments.lenet_fmnist.compile_cache import compile_cache
from experiments.lenet_fmnist.config import VARIANTS, RunConfig
from experiments.lenet_fmnist.dataset import load_data, prepare_data


class ImportsSpared:
  """Python's cyclic garbage collector paused while the run imports jax, flax and optax, and then told to leave
  every object alive at that point alone (``gc.freeze`` at :meth:`imported`): mostly those libraries' modules,
  classes and functions, which live as long as the process, and which every full collection would otherwise
  walk again. On a 2-core CPU a 1-epoch run spent 0.39 s collecting when it compiled its programs (full
  collections of 20-145 ms, one while it traced the training steps) and 0.22 s when it loaded them; frozen,
  0.13 s and 0.03 s. Undone at the end (``gc.unfreeze``, the collector as it was), for a caller that goes on in
  the same process; a caller that froze objects itself keeps them frozen, and nothing more is frozen."""

  def __enter__(self) -> ImportsSpared:
    self._enabled = gc.isenabled()
    self._freeze = gc.get_freeze_count() == 0  # (the caller's own freeze is left as it is)
    gc.disable()
    return self

  def imported(self) -> None:
    if self._freeze:
      gc.freeze()
    if self._enabled:
      gc.enable()

  def __exit__(self, *exc) -> None:
    if self._freeze:
      gc.unfreeze()
    if self._enabled:
      gc.enable()


class Progress:
  """What is safely on disk, for the message after an interruption."""

  def __init__(self):
    self.current: str | None = None
    self.saved: dict[str, int] = {}


def variant_names(config: RunConfig) -> list[str]:
  """The variants the run trains, in order: ``--bn``'s, or all five."""
  return list(VARIANTS) if config.bn == "all" else [config.bn]


def train_and_evaluate(
  config: RunConfig, out: Path, progress: Progress | None = None, build_model: Callable | None = None
) -> list[dict]:
  """Trains every variant of ``config`` into ``out/<variant>/`` and returns their summaries.

  Args:
    config: the run's settings (``arguments.parse_args``, or ``RunConfig(...)``).
    out: the run's folder, writable (``checkpoint.prepare_out_dir``); process 0 holds its lock.
    progress: filled in with what is safely on disk, for a message after an interruption.
    build_model: ``(norm, config, axis_name) -> variant.Model``; default LeNet (``variant.build_model``).

  Raises:
    RunError: a problem the user can act on, before any work where it can be known then.
  """
  progress = Progress() if progress is None else progress
  # The data are read and decompressed in a thread while JAX is imported and the processes join.
  with ImportsSpared() as imports, concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="load-data") as loader:
    dataset = loader.submit(load_data, config)
    with compile_cache(config):
      return train_variants(config, out, dataset, progress, imports, build_model)


def train_variants(
  config: RunConfig,
  out: Path,
  dataset: concurrent.futures.Future,
  progress: Progress,
  imports: ImportsSpared,
  build_model=None,
) -> list[dict]:
  """Joins the processes, prepares the data and trains the variants one after another, then compares them.
  ``imports``: told when the run's libraries are imported."""
  from experiments.lenet_fmnist import report, train, variant
  from experiments.lenet_fmnist.distributed import barrier, make_watchdog, setup_devices

  imports.imported()
  if len(config.seeds) > 1:  # before JAX starts: on CPU, the host devices the seeds are split over
    train.request_host_devices(len(config.seeds))

  norms = variant_names(config)
  mesh = setup_devices(config)
  # From here on every wait for another process is bounded: one that failed (bad data, other settings)
  # or died leaves the others a clear line within --timeout, not a hang.
  with make_watchdog(config) as watchdog, report.Figures(draw=not config.process_id) as figures:
    dataset = dataset.result()
    fingerprint, data = prepare_data(dataset, config, out, norms, mesh)
    if config.resume and len(norms) > 1:  # (every process reads the same checkpoints: all stop with one line)
      check_same_epoch(out, norms, config.epochs)
    run = variant.Run(config, dataset, fingerprint, data, mesh, watchdog, figures, progress)
    summaries, histories = [], {}
    for norm in norms:
      summary, histories[norm] = variant.run_variant(norm, run, out / norm, build_model or variant.build_model)
      summaries.append(summary)
    compare_variants(config, out, summaries, histories, figures)
    figures.wait()
    barrier("done")
  print(f"wrote {out.resolve()}")
  return summaries


def compare_variants(config: RunConfig, out: Path, summaries: list[dict], histories: dict, figures) -> None:
  """With several variants, the comparison table (printed; ``comparison.md``) and figures; with several seeds,
  ``seeds.md``. Only process 0 writes."""
  from experiments.lenet_fmnist import report

  labels = {s["bn"]: s["label"] for s in summaries}
  if len(summaries) > 1:
    table = report.comparison_table(summaries)
    print(table)
    if not config.process_id:
      atomic_write_text(out / "comparison.md", table + "\n")
      figures.draw(report.plot_curves, histories, out / "comparison", labels)
      figures.draw(report.plot_test_accuracy, histories, out / "comparison_test_acc", labels)
  if len(config.seeds) > 1 and not config.process_id and all(histories.values()):
    atomic_write_text(out / "seeds.md", report.seed_table(histories, labels) + "\n")
