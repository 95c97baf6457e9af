"""Test accuracy per epoch with and without precise BN, several seeds, in one figure and one table.

    python -m experiments.precise_figure --plain runs/seed{0,1,2}/ours \\
        --precise runs/precise_seed{0,1,2}/ours-precise --out experiments/results/precise_bn

reads each run's ``metrics.json`` and writes ``<out>.png`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(run: str) -> list[dict]:
  path = Path(run) / "metrics.json"
  try:
    return json.loads(path.read_text())["epochs"]
  except (OSError, ValueError, KeyError) as e:
    raise SystemExit(f"error: {path} cannot be read ({type(e).__name__}: {e})") from None


def main(argv=None) -> None:
  p = argparse.ArgumentParser(prog="python -m experiments.precise_figure", description=__doc__.split("\n\n")[0])
  p.add_argument("--plain", nargs="+", required=True, help="run directories without precise BN, one per seed")
  p.add_argument("--precise", nargs="+", required=True, help="run directories with precise BN, same seeds, same order")
  p.add_argument("--out", required=True, help="output path without extension")
  args = p.parse_args(argv)
  if len(args.plain) != len(args.precise):
    p.error(f"{len(args.plain)} --plain runs but {len(args.precise)} --precise runs: give one of each per seed")
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6.4, 3.6))
  epochs = len(load(args.plain[0]))
  rows = ["| seed | " + " | ".join(f"epoch {e}" for e in range(1, epochs + 1)) + " | precise BN s/epoch |"]
  rows.append("| --- " * (epochs + 2) + "|")
  for seed, (plain_dir, precise_dir) in enumerate(zip(args.plain, args.precise, strict=True)):
    for label, run, style in (("running averages", plain_dir, "--"), ("precise BN", precise_dir, "-")):
      history = load(run)
      ax.plot([h["epoch"] for h in history], [h["test_acc"] for h in history], style, color=f"C{seed}",
              label=f"seed {seed}, {label}")  # fmt: skip
      cost = sum(h.get("precise_bn_seconds", 0.0) for h in history) / len(history)
      accs = " | ".join(f"{h['test_acc']:.3f}" for h in history)
      rows.append(f"| {seed} {label} | {accs} | {cost:.2f} |")
  ax.set(
    xlabel="epoch", ylabel="test accuracy", title="LeNet + bnjax.BatchNorm, lr 1.0: precise BN vs running averages"
  )
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(f"{args.out}.png", dpi=110)
  Path(f"{args.out}.md").write_text("\n".join(rows) + "\n")
  print("\n".join(rows))
  print(f"wrote {args.out}.png and {args.out}.md")


if __name__ == "__main__":
  main()
