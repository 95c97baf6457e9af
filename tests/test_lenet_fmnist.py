"""The experiment end to end on a tiny synthetic data directory: outputs, resume, comparison, errors."""

import json

import numpy as np
import pytest
from tolerance import assert_trees_close

from experiments import lenet_fmnist


def cli(fmnist_dir, out, *extra):
  return [
    "--data-dir",
    str(fmnist_dir),
    "--out",
    str(out),
    "--allow-partial-data",
    "--batch-size",
    "64",
    "--no-progress",
    *extra,
  ]


def last_acc(metrics):
  return metrics["epochs"][-1]["test_acc"]


def test_end_to_end_writes_metrics_plot_checkpoint_and_prints_the_chapter_lines(fmnist_dir, tmp_path, capsys):
  (summary,) = lenet_fmnist.main(cli(fmnist_dir, tmp_path / "run", "--epochs", "2"))
  printed = capsys.readouterr().out
  run = tmp_path / "run" / "ours"
  metrics = json.loads((run / "metrics.json").read_text())
  assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
  assert {"train_loss", "train_acc", "test_acc", "examples_per_sec"} <= set(metrics["epochs"][0])
  for name in ("curves.png", "curves.svg"):
    assert (run / name).stat().st_size > 1000, name
  assert json.loads((run / "summary.json").read_text())["test_acc"] == last_acc(metrics)
  assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert (run / "checkpoint").is_dir()
  last = metrics["epochs"][-1]
  assert f"loss {last['train_loss']:.3f}, train acc {last['train_acc']:.3f}, test acc {last['test_acc']:.3f}" in printed
  assert "examples/sec on cpu:0" in printed and "gamma (bn1 scale):" in printed and "beta  (bn1 bias):" in printed
  assert len(summary["gamma"]) == 6


def test_resume_equals_an_uninterrupted_run(fmnist_dir, tmp_path):
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "straight", "--epochs", "3"))
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "resumed", "--epochs", "1"))
  lenet_fmnist.main(cli(fmnist_dir, tmp_path / "resumed", "--epochs", "3", "--resume"))
  straight = json.loads((tmp_path / "straight" / "ours" / "metrics.json").read_text())["epochs"]
  resumed = json.loads((tmp_path / "resumed" / "ours" / "metrics.json").read_text())["epochs"]
  keys = ("epoch", "train_loss", "train_acc", "test_loss", "test_acc")
  assert_trees_close([[r[k] for k in keys] for r in resumed], [[r[k] for k in keys] for r in straight])
  a = json.loads((tmp_path / "straight" / "ours" / "summary.json").read_text())
  b = json.loads((tmp_path / "resumed" / "ours" / "summary.json").read_text())
  assert_trees_close(np.array(b["gamma"]), np.array(a["gamma"]))


def test_all_variants_and_a_comparison_table(fmnist_dir, tmp_path, capsys):
  summaries = lenet_fmnist.main(cli(fmnist_dir, tmp_path / "all", "--epochs", "1", "--bn", "all"))
  assert [s["bn"] for s in summaries] == ["ours", "flax", "none"]
  table = (tmp_path / "all" / "comparison.md").read_text()
  assert "| bnjax.BatchNorm |" in table and "| flax.linen.BatchNorm |" in table and "| no BatchNorm |" in table
  assert "0.899 / 0.807" in table  # the chapter's numbers stand beside ours
  assert (tmp_path / "all" / "comparison.png").exists() and "| BatchNorm |" in capsys.readouterr().out


def test_missing_data_exits_with_one_clear_message(tmp_path):
  with pytest.raises(SystemExit, match=r"error: Fashion-MNIST directory .*nowhere does not exist.*apt-get install"):
    lenet_fmnist.main(["--data-dir", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("flag,value", [("--epochs", "0"), ("--batch-size", "-1"), ("--lr", "0")])
def test_bad_flags_are_rejected(flag, value, capsys):
  with pytest.raises(SystemExit):
    lenet_fmnist.parse_args([flag, value])
  assert flag in capsys.readouterr().err
