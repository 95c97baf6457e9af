"""What a run shows: the per-epoch line, the chapter's closing lines, the comparison table, the figures.

A run of several seeds (``--seeds``) keeps one history whose per-seed entries (:data:`PER_SEED`) are lists
over the seeds; everything here shows them as a distribution: mean +- std, and the minimum of test accuracy.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from experiments.lenet_fmnist.checkpoint import atomic_write

CHAPTER = {  # what the chapter printed (PyTorch, one GPU)
  "ours": {"loss": 0.273, "train_acc": 0.899, "test_acc": 0.807, "examples_per_sec": 32293.9},
  "flax": {"loss": 0.267, "train_acc": 0.902, "test_acc": 0.708, "examples_per_sec": 50597.3},
}
MODELS = {"ours": "bnjax.BatchNorm", "flax": "flax.linen.BatchNorm", "none": "no BatchNorm"}
CURVES = (("train_loss", "-", "train loss"), ("train_acc", "m--", "train acc"), ("test_acc", "g-.", "test acc"))
PER_SEED = ("train_loss", "train_acc", "test_loss", "test_acc")  # lists over the seeds in a multi-seed row


def label(norm: str, precise_bn: int = 0, ema: float = 0.0) -> str:
  """What a variant ran, in words: its model's normalization, then "+ precise BN" when its statistics were
  recomputed before evaluation, "+ EMA weights" when it was evaluated with averaged weights. Every table,
  title and legend names a run by it, so two rows that ran the same thing read the same."""
  return MODELS[norm.split("-")[0]] + (" + precise BN" if precise_bn else "") + (" + EMA weights" if ema else "")


def num_seeds(history: list[dict]) -> int:
  """How many seeds a history holds (1 for a single-seed run)."""
  return len(history[0]["train_acc"]) if history and isinstance(history[0]["train_acc"], list) else 1


def seed_history(history: list[dict], i: int) -> list[dict]:
  """Seed ``i``'s history, rows as a single-seed run writes them (its own losses and accuracies)."""
  return [{k: (v[i] if k in PER_SEED else v) for k, v in row.items() if k != "seeds"} for row in history]


def spread(values) -> dict[str, float]:
  """``mean``, ``std`` (population), ``min`` and ``max`` of one number per seed."""
  a = np.atleast_1d(np.asarray(values, np.float64))
  return {"mean": float(a.mean()), "std": float(a.std()), "min": float(a.min()), "max": float(a.max())}


def distribution(history: list[dict]) -> list[dict]:
  """Per epoch: :func:`spread` of every per-seed metric across the seeds."""
  return [{"epoch": row["epoch"], **{k: spread(row[k]) for k in PER_SEED}} for row in history]


def _shown(values, digits: int = 3, with_min: bool = False) -> str:
  """One number as ``0.840``; several as ``0.840 ± 0.020`` (``(min 0.808)`` with ``with_min``)."""
  if not isinstance(values, list):
    return f"{values:.{digits}f}"
  d = spread(values)
  return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}" + (f" (min {d['min']:.{digits}f})" if with_min else "")


def epoch_line(norm: str, row: dict, epochs: int) -> str:
  """The line printed after every epoch (a multi-seed run's shows mean ± std over its seeds)."""
  over = f"  [{len(row['seeds'])} seeds]" if "seeds" in row else ""
  return (
    f"[{norm}] epoch {row['epoch']:2d}/{epochs}  loss {_shown(row['train_loss'])}  "
    f"train acc {_shown(row['train_acc'])}  test acc {_shown(row['test_acc'], with_min=True)}{over}  "
    f"{row['examples_per_sec']:,.0f} ex/s  ({row['train_seconds']:.1f} s)"
  )


def device_name() -> str:
  d = jax.devices()[0]
  kind = f" ({d.device_kind})" if d.device_kind.lower() != d.platform else ""
  return f"{d.platform}:{d.id}{kind}"


class Figures:
  """Draws and writes the run's figures in a thread of its own, beside training: matplotlib is imported
  there once :meth:`prepare` is called (while the first epoch trains), each figure is drawn while the run goes
  on, and :meth:`wait` (or the end of the ``with`` block) waits for them and raises what a drawing raised (a
  full disk, say). ``draw=False`` (processes other than 0) draws nothing and imports nothing."""

  def __init__(self, draw: bool = True):
    self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="figures") if draw else None
    self._pending: list[concurrent.futures.Future] = []
    self._prepared = False

  def prepare(self) -> None:
    """Starts importing matplotlib in the figures' thread; call it when the main thread waits on the device.
    (The import is half a second of Python, which would otherwise hold the interpreter while the run starts.)"""
    if self._pool is not None and not self._prepared:
      self._prepared = True
      self._pending.append(self._pool.submit(_pyplot))

  def draw(self, plot: Callable, histories: dict[str, list[dict]], *args) -> None:
    """``plot(histories, *args)`` in the figures' thread (on a copy of the histories, which the run extends)."""
    if self._pool is not None:
      self.prepare()
      self._pending.append(self._pool.submit(plot, {k: list(v) for k, v in histories.items()}, *args))

  def wait(self) -> None:
    while self._pending:
      self._pending.pop(0).result()

  def __enter__(self) -> Figures:
    return self

  def __exit__(self, *exc) -> None:
    if self._pool is not None:
      self._pool.shutdown(wait=True, cancel_futures=exc[0] is not None)
    if exc[0] is None:
      self.wait()


def _pyplot():
  """matplotlib's pyplot with the file-only Agg backend (imported here: a run that never plots skips it)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def save_figure(fig, stem: Path) -> None:
  """``stem.png`` and ``stem.svg``, each written atomically; the figure is closed however that ends."""
  import matplotlib.pyplot as plt

  try:
    fig.tight_layout()
    for ext in ("png", "svg"):
      atomic_write(stem.with_suffix(f".{ext}"), lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=110))
  finally:
    plt.close(fig)


def plot_curves(histories: dict[str, list[dict]], stem: Path, labels: dict[str, str]) -> None:
  """The chapter's figure (train loss, train acc, test acc vs epoch), one panel per variant (titled by
  ``labels[variant]``, see :func:`label`); for several seeds, the mean curves with a band of +- one standard
  deviation and the lowest test accuracy dotted."""
  plt = _pyplot()
  fig, axes = plt.subplots(1, len(histories), figsize=(4.2 * len(histories), 3.2), squeeze=False, sharey=True)
  for ax, (name, history) in zip(axes[0], histories.items(), strict=True):
    epochs = [h["epoch"] for h in history]
    seeds = num_seeds(history)
    dist = distribution(history)
    for key, style, label in CURVES:
      mean = np.array([d[key]["mean"] for d in dist])
      (line,) = ax.plot(epochs, mean, style, label=label if seeds == 1 else f"{label} (mean)")
      if seeds > 1:
        std = np.array([d[key]["std"] for d in dist])
        ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    if seeds > 1:
      ax.plot(epochs, [d["test_acc"]["min"] for d in dist], "g:", label="test acc (lowest seed)")
    title = labels[name] + (f"\n{seeds} seeds, band: ± 1 std" if seeds > 1 else "")
    ax.set(title=title, xlabel="epoch", xlim=(1, max(epochs[-1], 2)))
    ax.grid(True, alpha=0.3)
    ax.legend()
  save_figure(fig, stem)


def plot_test_accuracy(histories: dict[str, list[dict]], stem: Path, labels: dict[str, str]) -> None:
  """Test accuracy per epoch of every variant on one axes (mean, ± 1 std band and lowest seed for several
  seeds), with the chapter's printed epoch-10 test accuracies marked."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7.5, 4.5))
  for name, history in histories.items():
    epochs = [h["epoch"] for h in history]
    dist = distribution(history)
    mean = np.array([d["test_acc"]["mean"] for d in dist])
    (line,) = ax.plot(epochs, mean, "-o", markersize=3, label=labels[name])
    if num_seeds(history) > 1:
      std = np.array([d["test_acc"]["std"] for d in dist])
      ax.fill_between(epochs, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
      ax.plot(epochs, [d["test_acc"]["min"] for d in dist], ":", color=line.get_color(), linewidth=1)
  last = max(h["epoch"] for history in histories.values() for h in history)
  for chapter, what in zip(CHAPTER.values(), ("its BN from scratch", "nn.BatchNorm"), strict=True):
    ax.plot([last], [chapter["test_acc"]], "kx", markersize=8)
    ax.annotate(f"chapter (PyTorch, {what}): {chapter['test_acc']:.3f}", (last, chapter["test_acc"]),
                textcoords="offset points", xytext=(-8, 4), ha="right", fontsize=7)  # fmt: skip
  seeds = max(num_seeds(h) for h in histories.values())
  ax.set(xlabel="epoch", ylabel="test accuracy", xlim=(1, max(last, 2)))
  title = f"test accuracy, {seeds} seeds: mean, ± 1 std band, lowest seed dotted" if seeds > 1 else "test accuracy"
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  save_figure(fig, stem)


def comparison_table(summaries: list[dict]) -> str:
  lines = [
    "| BatchNorm | loss | train acc | test acc | examples/sec | chapter (train / test acc, ex/s) |",
    "| --- | --- | --- | --- | --- | --- |",
  ]
  if "per_seed" in summaries[0]:
    lines[0] = lines[0].replace("| test acc |", f"| test acc (min) over {len(summaries[0]['seeds'])} seeds |")
  for s in summaries:
    ch = CHAPTER.get(s["bn"])
    chapter = f"{ch['train_acc']:.3f} / {ch['test_acc']:.3f}, {ch['examples_per_sec']:,.0f}" if ch else "-"
    last = s.get("per_seed", s)
    lines.append(
      f"| {s['label']} | {_shown(last['train_loss'])} | {_shown(last['train_acc'])} | "
      f"{_shown(last['test_acc'], with_min=True)} | {s['examples_per_sec']:,.0f} | {chapter} |"
    )
  return "\n".join(lines)


def seed_table(histories: dict[str, list[dict]], labels: dict[str, str], steady_from: int = 5) -> str:
  """Markdown: each seed's test accuracy at the last epoch, and its lowest test accuracy from epoch
  ``steady_from`` on (how far the swing reaches once training has settled), per variant."""
  seeds = next(iter(histories.values()))[-1]["seeds"]
  last = max(h[-1]["epoch"] for h in histories.values())
  start = min(steady_from, last)
  head = "| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± std | min |"
  rule = "| --- " * (len(seeds) + 3) + "|"
  tables = []
  for title, pick in (
    (f"test accuracy at epoch {last}", lambda history: history[-1]["test_acc"]),
    (
      f"lowest test accuracy over epochs {start}-{last}",
      lambda history: np.min([h["test_acc"] for h in history if h["epoch"] >= start], axis=0).tolist(),
    ),
  ):
    lines = [f"{title}:", "", head, rule]
    for name, history in histories.items():
      values = pick(history)
      d = spread(values)
      cells = " | ".join(f"{v:.3f}" for v in values)
      lines.append(f"| {labels[name]} | {cells} | {d['mean']:.3f} ± {d['std']:.3f} | {d['min']:.3f} |")
    tables.append("\n".join(lines))
  return "\n\n".join(tables)


def closing_lines(norm: str, history: list[dict], params: dict, label: str) -> dict:
  """Prints the chapter's closing lines (loss and accuracies, steady-state examples/sec, bn1's gamma and beta)
  and returns them as the run's summary (with ``label``, what the run ran: see :func:`label`)."""
  last = history[-1]
  seeds = last.get("seeds")
  # Steady-state throughput: the first epoch also pays for compilation, so it is reported apart.
  timed = [h for h in history if h["epoch"] > 1] or history
  ex_per_sec = sum(h["examples_per_sec"] * h["train_seconds"] for h in timed) / sum(h["train_seconds"] for h in timed)
  print(
    f"loss {_shown(last['train_loss'])}, train acc {_shown(last['train_acc'])}, "
    f"test acc {_shown(last['test_acc'], with_min=bool(seeds))}" + (f" over {len(seeds)} seeds" if seeds else "")
  )
  if seeds:
    print("test acc per seed: " + ", ".join(f"{s}: {a:.3f}" for s, a in zip(seeds, last["test_acc"], strict=True)))
  print(f"{ex_per_sec:.1f} examples/sec on {device_name()}" + (f" (all {len(seeds)} seeds together)" if seeds else ""))
  if history[0]["epoch"] == 1 and len(history) > 1:
    print(f"(epoch 1, including compilation: {history[0]['train_seconds']:.1f} s)")
  summary = {"bn": norm, "label": label, "examples_per_sec": ex_per_sec}
  if seeds:  # the means at the top level, as a single seed's numbers are; every seed's and the spread apart
    summary.update({k: spread(last[k])["mean"] for k in ("train_loss", "train_acc", "test_acc")})
    summary.update(seeds=seeds, per_seed={k: last[k] for k in PER_SEED}, distribution=distribution(history))
  else:
    summary.update({k: last[k] for k in ("train_loss", "train_acc", "test_acc")})
  if norm != "none":
    first = jax.tree.map(lambda a: np.asarray(a)[0], params) if seeds else params
    gamma = np.asarray(first["bn1"]["scale"]).reshape(-1)
    beta = np.asarray(first["bn1"]["bias"]).reshape(-1)
    of = f", seed {seeds[0]}" if seeds else ""
    print(f"gamma (bn1 scale{of}): {np.array2string(gamma, precision=4)}")
    print(f"beta  (bn1 bias{of}):  {np.array2string(beta, precision=4)}")
    summary.update(gamma=gamma.tolist(), beta=beta.tolist())
  return summary
