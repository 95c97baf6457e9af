"""Reproduce D2L's "Batch Normalization" chapter: LeNet + BatchNorm on Fashion-MNIST.

    python -m experiments.lenet_fmnist                  # ours, the chapter's settings
    python -m experiments.lenet_fmnist --bn all         # every variant, plus a comparison
    python -m experiments.lenet_fmnist --seeds 0-7      # 8 seeds in one program, a distribution
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

import contextlib
import os
import sys
from pathlib import Path

from experiments.lenet_fmnist.arguments import parse_args
from experiments.lenet_fmnist.checkpoint import CHECKPOINT, RunError, check_runs, exclusive, prepare_out_dir
from experiments.lenet_fmnist.config import RunConfig
from experiments.lenet_fmnist.train_and_evaluate import Progress, train_and_evaluate, variant_names


def run(config: RunConfig, progress: Progress) -> list[dict]:
  """``--out`` checked and locked (process 0), then :func:`train_and_evaluate`."""
  out = prepare_out_dir(config.out)  # before the imports and the data: a bad --out fails in a blink
  if config.process_id:  # only process 0 writes; --out is shared by every process
    return train_and_evaluate(config, out, progress)
  with exclusive(out):
    check_runs(out, variant_names(config), config)
    return train_and_evaluate(config, out, progress)


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


def stopped(config: RunConfig, progress: Progress, how: str, code: int) -> SystemExit:
  """The line after an interruption: what is saved, and how to continue."""
  saved = [f"[{n}] epoch {e} in {Path(config.out) / n / CHECKPOINT}" for n, e in progress.saved.items()]
  where = f" during [{progress.current}]" if progress.current else ""
  print(
    f"\nerror: {how}{where}. Saved: {'; '.join(saved) or 'nothing yet'}. "
    f"Continue with the same command plus --resume (--out {config.out}).",
    file=sys.stderr,
  )
  return SystemExit(code)


def main(argv=None) -> list[dict]:
  """The command line: parse, run, and map what stops the run to one ``error:`` line and an exit status
  (1: an error, 3: a collective failed, 130: Ctrl-C, 143: SIGTERM)."""
  config = parse_args(argv)
  progress = Progress()
  try:
    with terminated_as_exception():
      if config.distributed == "auto":  # first: which process is process 0 comes from the job's environment
        from experiments.lenet_fmnist.distributed import join_from_environment

        config = join_from_environment(config)
      return run(config, progress)
  except RunError as e:
    raise SystemExit(f"error: {e}") from None
  except RuntimeError as e:
    if config.num_processes < 2 or "Xla" not in type(e).__name__ and "Jax" not in type(e).__name__:
      raise
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
    print(
      f"error: process {config.process_id} of {config.num_processes}: a collective operation failed ({first}); "
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
    raise stopped(config, progress, "interrupted", 130) from None
  except Terminated:
    raise stopped(config, progress, "terminated (SIGTERM)", 143) from None
