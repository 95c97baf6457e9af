"""The command line of ``python -m experiments.lenet_fmnist``: flags, their checks, one ``error:`` line each.

Nothing here imports jax, so ``--help`` and a bad flag answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math

from experiments.lenet_fmnist.config import (
  DEFAULT_EMA_DECAY,
  DEFAULT_PRECISE_BATCHES,
  FIELDS,
  GROUPS,
  NORMS,
  PRECISIONS,
  VARIANTS,
  RunConfig,
  default_cache_dir,
)

# (The constants of config.py are this module's too: the command line's choices and defaults.)
__all__ = [
  "DEFAULT_EMA_DECAY",
  "DEFAULT_PRECISE_BATCHES",
  "NORMS",
  "PRECISIONS",
  "VARIANTS",
  "build_parser",
  "default_cache_dir",
  "parse_args",
  "parse_seeds",
]

DESCRIPTION = 'Reproduce D2L\'s "Batch Normalization" chapter: LeNet + BatchNorm on Fashion-MNIST.'
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
  """The flags of :class:`config.RunConfig`'s fields, in their order, each in its group."""
  p = argparse.ArgumentParser(
    prog="python -m experiments.lenet_fmnist", description=DESCRIPTION, epilog=EPILOG, formatter_class=HelpFormatter
  )
  # Flags are added in one fixed order (the order of the run's recorded settings); --help shows them by group.
  groups = {key: p.add_argument_group(title) for key, title in GROUPS.items()}
  for field in FIELDS:
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    flag = f"--{field.name.replace('_', '-')}"
    groups[field.metadata["group"]].add_argument(flag, default=default, **field.metadata["flag"])
  return p


def check_setup_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
  """The flags of devices, hosts and the compilation cache, in :func:`parse_args`'s order of checks."""
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
  if args.distributed == "auto" and (args.coordinator or args.num_processes != 1 or args.process_id):
    p.error(
      "--distributed auto takes the processes from the job's environment: leave out --coordinator, "
      "--num-processes and --process-id"
    )
  if args.num_processes > 1 and not args.coordinator:
    p.error(f"--num-processes {args.num_processes} needs --coordinator HOST:PORT (process 0's address)")
  if args.coordinator and args.num_processes < 2:
    p.error("--coordinator is given, but --num-processes is 1: say how many processes join")
  if not 0 <= args.process_id < args.num_processes:
    p.error(f"--process-id is {args.process_id}, but should lie in [0, {args.num_processes - 1}] (--num-processes)")
  if not (math.isfinite(args.timeout) and args.timeout > 0):
    p.error(f"--timeout is {args.timeout}, but should be a positive number of seconds")


def parse_args(argv=None) -> RunConfig:
  """The command line's flags, each checked: a bad one exits with one ``error:`` line (argparse's)."""
  p = build_parser()
  args = p.parse_args(argv)
  check_setup_flags(p, args)
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
      "--seeds trains its replicas in one program (on CPU split over host devices, one per core); it does not "
      "combine with data-parallel training (--devices N > 1, --bn-group-size) or several processes"
    )
  if args.ema is not None and not (math.isfinite(args.ema) and 0 < args.ema < 1):
    p.error(f"--ema is {args.ema}, but should lie in (0, 1), e.g. {DEFAULT_EMA_DECAY}")
  if args.precise_bn < 0:
    p.error(f"--precise-bn is {args.precise_bn}, but should be >= 0 (0: off)")
  if args.resume and args.overwrite:
    p.error("--resume and --overwrite contradict each other: choose one")
  return RunConfig(**vars(args))
