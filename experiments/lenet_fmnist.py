"""Reproduce D2L's "Batch Normalization" chapter: LeNet + BatchNorm on Fashion-MNIST.

    python -m experiments.lenet_fmnist                  # ours, the chapter's settings
    python -m experiments.lenet_fmnist --bn all         # ours, Flax's and no BN, plus a comparison
    python -m experiments.lenet_fmnist --resume         # continue from --out's checkpoints

Prints a progress bar per epoch, a line per epoch, then the chapter's lines (loss, train acc,
test acc, examples/sec) and the first BN layer's gamma and beta. Writes to ``--out/<bn>/``:
``metrics.json`` (per epoch), ``curves.png``/``curves.svg`` (the chapter's figure) and an orbax
``checkpoint`` of the final state, all refreshed after every epoch so an interruption loses at most
the epoch in progress.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from bnjax import data, models, train

CHAPTER = {  # what the chapter printed (PyTorch, one GPU)
  "ours": {"loss": 0.273, "train_acc": 0.899, "test_acc": 0.807, "examples_per_sec": 32293.9},
  "flax": {"loss": 0.267, "train_acc": 0.902, "test_acc": 0.708, "examples_per_sec": 50597.3},
}
LABELS = {"ours": "bnjax.BatchNorm", "flax": "flax.linen.BatchNorm", "none": "no BatchNorm"}


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.lenet_fmnist", description=__doc__.split("\n\n")[0])
  p.add_argument(
    "--bn",
    choices=[*models.NORMS, "all"],
    default="ours",
    help="normalization layer: ours (bnjax.BatchNorm), flax (flax.linen.BatchNorm), none, or all three",
  )
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--lr", type=float, default=1.0)
  p.add_argument("--batch-size", type=int, default=256)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--data-dir",
    default=None,
    help=f"directory of Fashion-MNIST IDX files (default: ${data.ENV_VAR}, then {data.DEBIAN_DIR})",
  )
  p.add_argument("--out", default="runs/lenet_fmnist", help="where metrics, plots and checkpoints go")
  p.add_argument("--resume", action="store_true", help="continue each variant from its checkpoint in --out")
  p.add_argument("--loop", choices=train.LOOPS, default="auto", help="epoch loop driver (see bnjax.train)")
  p.add_argument("--conv-impl", choices=("auto", "xla", "im2col"), default="auto", help="see bnjax.conv")
  p.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
  p.add_argument(
    "--allow-partial-data",
    action="store_true",
    help="accept IDX files with fewer than 60000/10000 examples (subsets, test fixtures)",
  )
  args = p.parse_args(argv)
  for name in ("epochs", "batch_size"):
    if getattr(args, name) < 1:
      p.error(f"--{name.replace('_', '-')} is {getattr(args, name)}, but should be at least 1")
  if args.lr <= 0:
    p.error(f"--lr is {args.lr}, but should be positive")
  return args


def device_name() -> str:
  d = jax.devices()[0]
  return f"{d.platform}:{d.id} ({d.device_kind})"


def _checkpointer():
  import orbax.checkpoint as ocp

  return ocp.StandardCheckpointer()


def save_checkpoint(path: Path, state: train.TrainState, epoch: int) -> None:
  ckpt = _checkpointer()
  ckpt.save(path.absolute(), {"state": _state_tree(state), "epoch": epoch}, force=True)
  ckpt.wait_until_finished()


def _state_tree(state: train.TrainState) -> dict:
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats, "opt_state": state.opt_state}


def restore_checkpoint(path: Path, state: train.TrainState) -> tuple[train.TrainState, int]:
  target = {"state": _state_tree(state), "epoch": 0}
  restored = _checkpointer().restore(path.absolute(), target)
  return state.replace(**restored["state"]), int(restored["epoch"])


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
    fig.savefig(stem.with_suffix(f".{ext}"), dpi=110)
  plt.close(fig)


def run_variant(norm: str, dataset: data.FashionMNIST, args: argparse.Namespace, out: Path) -> tuple[dict, list[dict]]:
  """Trains one variant; returns its summary (final metrics, throughput, gamma/beta) and per-epoch history."""
  from tqdm.auto import tqdm

  out.mkdir(parents=True, exist_ok=True)
  model = models.LeNet(norm=norm, conv_impl=args.conv_impl)
  key = jax.random.key(args.seed)
  init_key, shuffle_key = jax.random.split(key)
  state = train.create_train_state(model, init_key, args.lr)
  history: list[dict] = []
  start_epoch = 0
  ckpt_path, metrics_path = out / "checkpoint", out / "metrics.json"
  if args.resume and ckpt_path.exists():
    state, start_epoch = restore_checkpoint(ckpt_path, state)
    history = json.loads(metrics_path.read_text())["epochs"][:start_epoch] if metrics_path.exists() else []
    print(f"[{norm}] resumed from {ckpt_path} after epoch {start_epoch}")
  elif args.resume:
    print(f"[{norm}] --resume: no checkpoint at {ckpt_path}, starting from scratch")

  train_x, train_y = jnp.asarray(dataset.train_images), jnp.asarray(dataset.train_labels)
  test_x, test_y = jnp.asarray(dataset.test_images), jnp.asarray(dataset.test_labels)
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
    state, metrics = train.train_epoch(
      state,
      train_x,
      train_y,
      jax.random.fold_in(shuffle_key, epoch),
      args.batch_size,
      loop=args.loop,
      on_progress=bar.update,
    )
    jax.block_until_ready(metrics)
    seconds = time.perf_counter() - t0
    bar.close()
    tr, te = train.summarize(metrics), train.summarize(train.evaluate(state, test_x, test_y))
    row = {
      "epoch": epoch + 1,
      "train_loss": tr["loss"],
      "train_acc": tr["acc"],
      "test_loss": te["loss"],
      "test_acc": te["acc"],
      "train_seconds": seconds,
      "examples_per_sec": len(train_y) / seconds,
    }
    history.append(row)
    print(
      f"[{norm}] epoch {epoch + 1:2d}/{args.epochs}  loss {tr['loss']:.3f}  train acc {tr['acc']:.3f}  "
      f"test acc {te['acc']:.3f}  {row['examples_per_sec']:,.0f} ex/s  ({seconds:.1f} s)",
      flush=True,
    )
    # Everything is written after every epoch: an interruption loses at most the epoch in progress.
    save_checkpoint(ckpt_path, state, epoch + 1)
    metrics_path.write_text(
      json.dumps({"bn": norm, "args": vars(args), "device": device_name(), "epochs": history}, indent=1)
    )
    plot_curves({norm: history}, out / "curves")

  if not history:
    raise SystemExit(f"[{norm}] nothing to do: the checkpoint is already at epoch {start_epoch} >= --epochs.")
  last = history[-1]
  # Steady-state throughput: the first epoch also pays for compilation, so it is reported apart.
  timed = [h for h in history if h["epoch"] > 1] or history
  ex_per_sec = len(train_y) * len(timed) / sum(h["train_seconds"] for h in timed)
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
  (out / "summary.json").write_text(json.dumps(summary, indent=1))
  return summary, history


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


def main(argv=None) -> list[dict]:
  args = parse_args(argv)
  try:
    dataset = data.load_fashion_mnist(args.data_dir, expect_full=not args.allow_partial_data)
  except data.DataError as e:
    raise SystemExit(f"error: {e}") from None
  print(
    f"Fashion-MNIST from {dataset.source}: {len(dataset.train_labels)} train, {len(dataset.test_labels)} test; "
    f"device {device_name()}"
  )
  out = Path(args.out)
  norms = list(models.NORMS) if args.bn == "all" else [args.bn]
  summaries, histories = [], {}
  for norm in norms:
    summary, histories[norm] = run_variant(norm, dataset, args, out / norm)
    summaries.append(summary)
  if len(summaries) > 1:
    table = comparison_table(summaries)
    print(table)
    (out / "comparison.md").write_text(table + "\n")
    plot_curves(histories, out / "comparison")
  print(f"wrote {out.resolve()}")
  return summaries


if __name__ == "__main__":
  main()
