"""The run's settings, declared once: one field per command-line flag, each saying what it means for the run.

Every field of :class:`RunConfig` is declared with :func:`setting`, which records, beside the flag's
argparse options, its two classifications:

* ``identity``: part of the run's identity (shapes the trajectory; ``--resume`` compares it with the
  checkpoint's run), given as its place in :data:`RUN_IDENTITY`, or None;
* ``agree``: whether every process must run with the same value (checked before any work), or not (where
  each process runs from, what it shows, its timeouts).

A field with neither is free to differ between runs and between processes. :data:`RUN_IDENTITY`,
:data:`AGREED` and ``arguments.build_parser``'s flags all derive from these fields, so a new flag is
classified where it is declared. Nothing here imports jax: ``--help`` answers at once.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

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

DISTRIBUTED = ("flags", "auto")  # how several processes find each other (--distributed)

# The argument groups of --help, in the order --help shows them.
GROUPS = {
  "training": "training (the chapter's settings by default)",
  "variants": "variants",
  "data": "data",
  "output": "output",
  "dist": "devices and hosts (bnjax.sync)",
}


def default_cache_dir() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
  return os.environ.get("BNJAX_COMPILE_CACHE") or str(Path(base) / "bnjax" / "xla")


def setting(*, identity: int | None, agree: bool, group: str, default=None, default_factory=None, **flag):
  """A :class:`RunConfig` field for the flag ``--<name>`` (its name with dashes).

  Args:
    identity: its place in :data:`RUN_IDENTITY` (the order of ``--resume``'s messages and of the settings a
      checkpoint records), or None when it is not part of the run's identity.
    agree: whether every process must be started with the same value; the identity's fields must.
    group: the key of its argument group in :data:`GROUPS`.
    default: the flag's default (``default_factory``: computed when the parser is built).
    **flag: ``argparse.ArgumentParser.add_argument``'s other options (type, choices, metavar, action, help).
  """
  if identity is not None and not agree:
    raise ValueError(f"`agree` is False for a field of the run's identity (place {identity}), but should be True")
  metadata = {"identity": identity, "agree": agree, "group": group, "flag": flag}
  if default_factory is not None:
    return dataclasses.field(default_factory=default_factory, metadata=metadata)
  return dataclasses.field(default=default, metadata=metadata)


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """One run's settings, as ``arguments.parse_args`` checks them: one field per flag, in the flags' order
  (the order of the run's recorded settings, ``metrics.json``'s ``args``). ``seed`` and ``seeds`` are
  filled in together: ``seeds`` is the list of seeds, ``seed`` its first."""

  bn: str = setting(
    identity=0,  # (the variant's name: with --bn all, each variant records its own)
    agree=True,
    group="variants",
    default="ours",
    choices=[*VARIANTS, "all"],
    help="normalization: ours (bnjax.BatchNorm), flax (flax.linen.BatchNorm), none (no BN layer), ours-precise "
    f"(ours, its statistics recomputed by precise BN from --precise-bn N batches, else {DEFAULT_PRECISE_BATCHES}, "
    "before every evaluation), ours-ema (ours-precise evaluated with a moving average of the weights, --ema "
    f"DECAY, else {DEFAULT_EMA_DECAY}), or all: the five one after another, with a comparison table",
  )
  epochs: int = setting(  # a resume may train further
    identity=None,
    agree=True,
    group="training",
    default=10,
    type=int,
    help="epochs to train (with --resume: the total)",
  )
  lr: float = setting(identity=2, agree=True, group="training", default=1.0, type=float, help="SGD learning rate")
  batch_size: int = setting(
    identity=1, agree=True, group="training", default=256, type=int, help="global batch size, split over all devices"
  )
  seed: int | None = setting(  # (recorded as the list of seeds for a run of several, --seeds)
    identity=3, agree=True, group="training", default=None, type=int, help="the run's seed (default: 0)"
  )
  seeds: list[int] | None = setting(  # recorded as "seed"; several processes train one seed (it says which)
    identity=None,
    agree=False,
    group="training",
    default=None,
    metavar="SPEC",
    help="train several seeds side by side in one program (on CPU split over host devices, one per core; jax.vmap "
    "on accelerators), e.g. 0-7 or 0,3,5: files per seed and a summary (mean, std, min) across them (default: one "
    "seed, --seed)",
  )
  ema: float | None = setting(
    identity=8,  # (the variant's decay: ours-ema's default when not given)
    agree=True,
    group="variants",
    default=None,
    type=float,
    metavar="DECAY",
    help="evaluate with an exponential moving average of the weights (decay in (0, 1), about 1/(1-DECAY) "
    f"steps); BN statistics are recomputed for the averaged weights by precise BN (default: off; {DEFAULT_EMA_DECAY} "
    "for --bn ours-ema)",
  )
  precise_bn: int = setting(
    identity=7,  # (the variant's batches: ours-precise's and ours-ema's default when not given)
    agree=True,
    group="variants",
    default=0,
    type=int,
    metavar="N",
    help="before every evaluation, recompute the BN statistics from N training batches (bnjax.precise_batch_stats); "
    f"0: off (default: 0; {DEFAULT_PRECISE_BATCHES} for --bn ours-precise and ours-ema)",
  )
  data_source: str = setting(  # (the data themselves are the identity's "data", their fingerprint)
    identity=None,
    agree=True,
    group="data",
    default="auto",
    choices=("auto", "idx", "tfds"),
    help="where Fashion-MNIST comes from: idx (the four IDX .gz files of --data-dir), tfds (tensorflow-datasets, "
    "which downloads the data set when not prepared), or auto (IDX files when found, else a prepared tfds copy)",
  )
  data_dir: str | None = setting(  # each process reads its own copy (the fingerprints must agree)
    identity=None,
    agree=False,
    group="data",
    default=None,
    help="directory of Fashion-MNIST IDX files (default: $BNJAX_DATA_DIR, then /usr/share/datasets/fashion-mnist)",
  )
  out: str = setting(
    identity=None,
    agree=True,  # shared by every process
    group="output",
    default="runs/lenet_fmnist",
    help="where metrics, plots and checkpoints go (one folder per variant)",
  )
  resume: bool = setting(
    identity=None,
    agree=True,
    group="output",
    default=False,
    action="store_true",
    help="continue each variant from its checkpoint in --out",
  )
  overwrite: bool = setting(
    identity=None,
    agree=True,
    group="output",
    default=False,
    action="store_true",
    help="replace the runs already in --out",
  )
  api: str = setting(  # the same numbers either way
    identity=None,
    agree=True,
    group="training",
    default="linen",
    choices=("linen", "nnx"),
    help="Flax API of the model: linen (LeNet) or nnx (NNXLeNet); the same loop, the same numbers",
  )
  loop: str = setting(  # the same numbers either way
    identity=None,
    agree=True,
    group="training",
    default="auto",
    choices=("auto", "step", "scan"),
    help="how an epoch's batches run: scan (equal chunks of at most 47 steps, each chunk one lax.scan "
    "call), step (one jitted call per step), auto (scan); the same numbers either way",
  )
  conv_impl: str = setting(
    identity=4,
    agree=True,
    group="training",
    default="auto",
    choices=("auto", "xla", "im2col", "lanes"),
    help="how convolutions are computed: lanes (the batch on the vector lanes, CHWN matmuls: fastest on CPU), "
    "im2col (NHWC patch matmuls), xla (lax.conv: fastest on GPU); auto picks lanes on CPU, xla elsewhere",
  )
  precision: str = setting(
    identity=5,
    agree=True,
    group="training",
    default="highest",
    choices=PRECISIONS,
    help="of LeNet's float32 convolutions and matmuls: highest (true float32), high or default "
    "(XLA's choice: TF32 on NVIDIA GPUs); all three compute the same on CPU",
  )
  no_progress: bool = setting(
    identity=None,
    agree=False,
    group="output",
    default=False,
    action="store_true",
    help="no progress bars (logs, CI)",
  )
  compile_cache: str = setting(
    identity=None,
    agree=False,
    group="output",
    default_factory=default_cache_dir,
    metavar="DIR",
    help="persistent compilation cache ($BNJAX_COMPILE_CACHE, else $XDG_CACHE_HOME/bnjax/xla or "
    "~/.cache/bnjax/xla; default: %(default)s)",
  )
  no_compile_cache: bool = setting(
    identity=None,
    agree=False,
    group="output",
    default=False,
    action="store_true",
    help="compile from scratch: no persistent cache, not even one set by JAX_COMPILATION_CACHE_DIR",
  )
  allow_partial_data: bool = setting(  # (the data themselves are agreed on by their fingerprint)
    identity=None,
    agree=True,
    group="data",
    default=False,
    action="store_true",
    help="accept IDX files with fewer than 60000/10000 examples (subsets, test fixtures)",
  )
  devices: int | None = setting(  # (compared as each process's number of devices on the mesh)
    identity=None,  # (what it changes in the computation is the identity's "bn_group_examples")
    agree=True,
    group="dist",
    default=None,
    type=int,
    metavar="N",
    help="local devices to train on (default: all)",
  )
  bn_group_size: int | None = setting(
    identity=None,  # (likewise: "bn_group_examples")
    agree=True,
    group="dist",
    default=None,
    type=int,
    metavar="G",
    help="synchronize BN within groups of G devices (default: all devices in one group)",
  )
  distributed: str = setting(
    identity=None,
    agree=True,
    group="dist",
    default="flags",
    choices=DISTRIBUTED,
    help="how several processes find each other: flags (--coordinator, --num-processes, --process-id; one process "
    "without them), or auto (jax.distributed.initialize() reads them from a SLURM, Open MPI or Cloud TPU job's "
    "environment, e.g. every task of `srun`)",
  )
  coordinator: str | None = setting(
    identity=None,
    agree=False,
    group="dist",
    default=None,
    metavar="HOST:PORT",
    help="process 0's address, for several processes (default: none, one process)",
  )
  num_processes: int = setting(
    identity=None, agree=True, group="dist", default=1, type=int, metavar="P", help="number of processes"
  )
  process_id: int = setting(
    identity=None,
    agree=False,
    group="dist",
    default=0,
    type=int,
    metavar="I",
    help="this process's index in [0, P)",
  )
  timeout: float = setting(
    identity=None,
    agree=False,
    group="dist",
    default=120.0,
    type=float,
    metavar="S",
    help="with several processes: seconds to wait for the others to join, and for any step to finish",
  )


FIELDS = dataclasses.fields(RunConfig)
# Entries of the identity that no flag sets alone, at their places: the examples each BN layer normalizes over
# (--batch-size over the number of BN groups: what --devices, the process count and --bn-group-size change in
# the computation), and the data set's fingerprint.
DERIVED_IDENTITY = {"bn_group_examples": 6, "data": 9}
# What a resumed run must share with the checkpoint's run (--epochs may grow), in the checkpoint's words.
# "seed" is the list of seeds for a run of several (--seeds). The devices themselves are free to change
# when they lay out the same computation (e.g. 2 devices in groups of 1, or 4 in groups of 2).
RUN_IDENTITY = tuple(
  name
  for _, name in sorted(
    [(f.metadata["identity"], f.name) for f in FIELDS if f.metadata["identity"] is not None]
    + [(place, name) for name, place in DERIVED_IDENTITY.items()]
  )
)
# The fields every process must be started with (checked by ``distributed.agree_across_processes``).
AGREED = tuple(f.name for f in FIELDS if f.metadata["agree"])
