"""What a run shows: the per-epoch line, the chapter's closing lines, the comparison table, the figures."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from experiments.lenet_fmnist.checkpoint import atomic_write

CHAPTER = {  # what the chapter printed (PyTorch, one GPU)
  "ours": {"loss": 0.273, "train_acc": 0.899, "test_acc": 0.807, "examples_per_sec": 32293.9},
  "flax": {"loss": 0.267, "train_acc": 0.902, "test_acc": 0.708, "examples_per_sec": 50597.3},
}
LABELS = {
  "ours": "bnjax.BatchNorm",
  "flax": "flax.linen.BatchNorm",
  "none": "no BatchNorm",
  "ours-precise": "bnjax.BatchNorm + precise BN",
}


def device_name() -> str:
  d = jax.devices()[0]
  kind = f" ({d.device_kind})" if d.device_kind.lower() != d.platform else ""
  return f"{d.platform}:{d.id}{kind}"


def plot_curves(histories: dict[str, list[dict]], stem: Path) -> None:
  """The chapter's figure (train loss, train acc, test acc vs epoch), one panel per variant."""
  import matplotlib  # imported here: a run that never plots (another process, an early error) skips it

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
  try:
    fig.tight_layout()
    for ext in ("png", "svg"):
      atomic_write(stem.with_suffix(f".{ext}"), lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=110))
  finally:
    plt.close(fig)


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


def closing_lines(norm: str, history: list[dict], params: dict) -> dict:
  """Prints the chapter's closing lines (loss and accuracies, steady-state examples/sec, bn1's gamma and beta)
  and returns them as the run's summary."""
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
    gamma = np.asarray(params["bn1"]["scale"]).reshape(-1)
    beta = np.asarray(params["bn1"]["bias"]).reshape(-1)
    print(f"gamma (bn1 scale): {np.array2string(gamma, precision=4)}")
    print(f"beta  (bn1 bias):  {np.array2string(beta, precision=4)}")
    summary.update(gamma=gamma.tolist(), beta=beta.tolist())
  return summary
