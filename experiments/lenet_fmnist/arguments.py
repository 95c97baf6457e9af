"""The command line of ``python -m experiments.lenet_fmnist``: flags, their checks, one ``error:`` line each.

Nothing here imports jax, so ``--help`` and a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

DESCRIPTION = 'Reproduce D2L\'s "Batch Normalization" chapter: LeNet + BatchNorm on Fashion-MNIST.'
NORMS = ("ours", "flax", "none")  # models.NORMS, repeated so --help needs no jax import
PRECISIONS = ("default", "high", "highest")  # models.PRECISIONS, likewise
# A variant is a norm; ours with its statistics recomputed by precise BN before every evaluation; or that,
# evaluated with a moving average of the weights (whose statistics precise BN computes).
VARIANTS = (*NORMS, "ours-precise", "ours-ema")
DEFAULT_PRECISE_BATCHES = 100  # for the ours-precise and ours-ema variants when --precise-bn is not given
# For ours-ema when --ema is not given: an average over about one epoch of the chapter's run (234 full
# batches of 256), chosen by reasoning before any multi-seed result was seen: long enough to average out
# the last steps' noise at lr 1.0, short enough to lag the still-improving weights by half an epoch only.
DEFAULT_EMA_DECAY = 0.996
MAX_SEED = 2**32 - 1
MAX_SEEDS = 64


def parse_seeds(spec: str) -> list[int]:
  """``"0-7"``, ``"0,3,5"`` or both (``"0-3,8"``) as a list of distinct seeds, in order; ValueError otherwise."""
  seeds: list[int] = []
  for part in spec.split(","):
    lo, sep, hi = part.strip().partition("-")
    try:
      first, last = int(lo), int(hi if sep else lo)
    except ValueError:
      raise ValueError(f"{part.strip()!r} is not a seed or a range like 0-7") from None
    if first > last:
      raise ValueError(f"the range {part.strip()} is empty (write low-high)")
    if last - first >= MAX_SEEDS:
      raise ValueError(f"{part.strip()} holds more than {MAX_SEEDS} seeds")
    seeds.extend(range(first, last + 1))
  if len(set(seeds)) != len(seeds):
    raise ValueError("a seed is given twice")
  if len(seeds) > MAX_SEEDS:
    raise ValueError(f"{len(seeds)} seeds, more than {MAX_SEEDS}")
  if not all(0 <= s <= MAX_SEED for s in seeds):
    raise ValueError(f"seeds should lie in [0, {MAX_SEED}]")
  return seeds


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
  return os.environ.get("BNJAX_COMPILE_CACHE") or str(Path(base) / "bnjax" / "xla")


EPILOG = """examples:
  python -m experiments.lenet_fmnist                             # the chapter: bnjax.BatchNorm, 10 epochs
  python -m experiments.lenet_fmnist --epochs 20 --resume        # continue that run to 20 epochs
  python -m experiments.lenet_fmnist --bn all --seeds 0-7 --out runs/seeds  # every variant, 8 seeds side by side

Fashion-MNIST is read from --data-dir, else $BNJAX_DATA_DIR, else /usr/share/datasets/fashion-mnist (the
Debian package dataset-fashion-mnist), else a prepared tensorflow-datasets copy."""


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
  """argparse's help with every option's default shown (as ``ArgumentDefaultsHelpFormatter`` does) and the
  epilog's line breaks kept; a help that already states its default (``default:``) is left as it is."""

  def _get_help_string(self, action: argparse.Action) -> str:
    text = action.help or ""
    if "default:" in text or action.default is argparse.SUPPRESS or not action.option_strings:
      return text
    if isinstance(action, argparse._StoreTrueAction):
      return f"{text} (default: off)"
    return f"{text} (default: %(default)s)"


def build_parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="python -m experiments.lenet_fmnist", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
  )
  # Flags are added in one fixed order (the order of the run's recorded settings); --help shows them by group.
  training = p.add_argument_group("training (the chapter's settings by default)")
  variants = p.add_argument_group("variants")
  data = p.add_argument_group("data")
  output = p.add_argument_group("output")
  dist = p.add_argument_group("devices and hosts (bnjax.sync)")
  variants.add_argument(
    "--bn",
    choices=[*VARIANTS, "all"],
    default="ours",
    help="normalization: ours (bnjax.BatchNorm), flax (flax.linen.BatchNorm), none (no BN layer), ours-precise "
    f"(ours, its statistics recomputed by precise BN from --precise-bn N batches, else {DEFAULT_PRECISE_BATCHES}, "
    "before every evaluation), ours-ema (ours-precise evaluated with a moving average of the weights, --ema "
    f"DECAY, else {DEFAULT_EMA_DECAY}), or all: the five one after another, with a comparison table",
  )
  training.add_argument("--epochs", type=int, default=10, help="epochs to train (with --resume: the total)")
  training.add_argument("--lr", type=float, default=1.0, help="SGD learning rate")
  training.add_argument("--batch-size", type=int, default=256, help="global batch size, split over all devices")
  training.add_argument("--seed", type=int, default=None, help="the run's seed (default: 0)")
  training.add_argument(
    "--seeds",
    default=None,
    metavar="SPEC",
    help="train several seeds side by side in one program (jax.vmap), e.g. 0-7 or 0,3,5: files per seed "
    "and a summary (mean, std, min) across them (default: one seed, --seed)",
  )
  variants.add_argument(
    "--ema",
    type=float,
    default=None,
    metavar="DECAY",
    help="evaluate with an exponential moving average of the weights (decay in (0, 1), about 1/(1-DECAY) "
    f"steps); BN statistics are recomputed for the averaged weights by precise BN (default: off; {DEFAULT_EMA_DECAY} "
    "for --bn ours-ema)",
  )
  variants.add_argument(
    "--precise-bn",
    type=int,
    default=0,
    metavar="N",
    help="before every evaluation, recompute the BN statistics from N training batches (bnjax.precise_batch_stats); "
    f"0: off (default: 0; {DEFAULT_PRECISE_BATCHES} for --bn ours-precise and ours-ema)",
  )
  data.add_argument(
    "--data-source",
    choices=("auto", "idx", "tfds"),
    default="auto",
    help="where Fashion-MNIST comes from: idx (the four IDX .gz files of --data-dir), tfds (tensorflow-datasets, "
    "which downloads the data set when not prepared), or auto (IDX files when found, else a prepared tfds copy)",
  )
  data.add_argument(
    "--data-dir",
    default=None,
    help="directory of Fashion-MNIST IDX files (default: $BNJAX_DATA_DIR, then /usr/share/datasets/fashion-mnist)",
  )
  output.add_argument(
    "--out", default="runs/lenet_fmnist", help="where metrics, plots and checkpoints go (one folder per variant)"
  )
  output.add_argument("--resume", action="store_true", help="continue each variant from its checkpoint in --out")
  output.add_argument("--overwrite", action="store_true", help="replace the runs already in --out")
  training.add_argument(
    "--api",
    choices=("linen", "nnx"),
    default="linen",
    help="Flax API of the model: linen (LeNet) or nnx (NNXLeNet); the same loop, the same numbers",
  )
  training.add_argument(
    "--loop",
    choices=("auto", "step", "scan"),
    default="auto",
    help="how an epoch's full batches run: scan (equal chunks of at most 47 steps, each chunk one lax.scan "
    "call), step (one jitted call per step), auto (scan); the same numbers either way",
  )
  training.add_argument(
    "--conv-impl",
    choices=("auto", "xla", "im2col", "lanes"),
    default="auto",
    help="how convolutions are computed: lanes (the batch on the vector lanes, CHWN matmuls: fastest on CPU), "
    "im2col (NHWC patch matmuls), xla (lax.conv: fastest on GPU); auto picks lanes on CPU, xla elsewhere",
  )
  training.add_argument(
    "--precision",
    choices=PRECISIONS,
    default="highest",
    help="of LeNet's float32 convolutions and matmuls: highest (true float32), high or default "
    "(XLA's choice: TF32 on NVIDIA GPUs); all three compute the same on CPU",
  )
  output.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
  output.add_argument(
    "--compile-cache",
    default=default_cache_dir(),
    metavar="DIR",
    help="persistent compilation cache ($BNJAX_COMPILE_CACHE, else $XDG_CACHE_HOME/bnjax/xla or "
    "~/.cache/bnjax/xla; default: %(default)s)",
  )
  output.add_argument(
    "--no-compile-cache",
    action="store_true",
    help="compile from scratch: no persistent cache, not even one set by JAX_COMPILATION_CACHE_DIR",
  )
  data.add_argument(
    "--allow-partial-data",
    action="store_true",
    help="accept IDX files with fewer than 60000/10000 examples (subsets, test fixtures)",
  )
  dist.add_argument("--devices", type=int, default=None, metavar="N", help="local devices to train on (default: all)")
  dist.add_argument(
    "--bn-group-size",
    type=int,
    default=None,
    metavar="G",
    help="synchronize BN within groups of G devices (default: all devices in one group)",
  )
  dist.add_argument(
    "--coordinator",
    default=None,
    metavar="HOST:PORT",
    help="process 0's address, for several processes (default: none, one process)",
  )
  dist.add_argument("--num-processes", type=int, default=1, metavar="P", help="number of processes")
  dist.add_argument("--process-id", type=int, default=0, metavar="I", help="this process's index in [0, P)")
  dist.add_argument(
    "--timeout",
    type=float,
    default=120.0,
    metavar="S",
    help="with several processes: seconds to wait for the others to join, and for any step to finish",
  )
  return p


def parse_args(argv=None) -> argparse.Namespace:
  """The command line's flags, each checked: a bad one exits with one ``error:`` line (argparse's)."""
  p = build_parser()
  args = p.parse_args(argv)
  if args.devices is not None and args.devices < 1:
    p.error(f"--devices is {args.devices}, but should be at least 1")
  if args.bn_group_size is not None and args.bn_group_size < 1:
    p.error(f"--bn-group-size is {args.bn_group_size}, but should be at least 1")
  if args.num_processes < 1:
    p.error(f"--num-processes is {args.num_processes}, but should be at least 1")
  if args.coordinator is not None:
    host, _, port = args.coordinator.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
      p.error(
        f"--coordinator is {args.coordinator!r}, but should be HOST:PORT with a port in 1..65535 "
        "(process 0's address, e.g. 127.0.0.1:12355)"
      )
  if not args.no_compile_cache and not args.compile_cache.strip():  # JAX reads "" as the current directory
    p.error(
      f"--compile-cache is {args.compile_cache!r}, but should name a directory (an empty one would fill the "
      "current directory); --no-compile-cache turns the cache off"
    )
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
  if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
    p.error(f"--seed is {args.seed}, but should lie in [0, {MAX_SEED}]")
  if args.seeds is not None:
    if args.seed is not None:
      p.error("--seed and --seeds both given: use --seeds alone (--seeds 3 is one seed)")
    try:
      args.seeds = parse_seeds(args.seeds)
    except ValueError as e:
      p.error(f"--seeds {args.seeds}: {e}")
  else:
    args.seeds = [0 if args.seed is None else args.seed]
  args.seed = args.seeds[0]
  if len(args.seeds) > 1 and ((args.devices or 1) > 1 or args.num_processes > 1 or args.bn_group_size):
    p.error(
      "--seeds trains its replicas side by side on one device; it does not combine with --devices N > 1, "
      "--bn-group-size or several processes"
    )
  if args.ema is not None and not (math.isfinite(args.ema) and 0 < args.ema < 1):
    p.error(f"--ema is {args.ema}, but should lie in (0, 1), e.g. {DEFAULT_EMA_DECAY}")
  if args.precise_bn < 0:
    p.error(f"--precise-bn is {args.precise_bn}, but should be >= 0 (0: off)")
  if args.resume and args.overwrite:
    p.error("--resume and --overwrite contradict each other: choose one")
  return args
