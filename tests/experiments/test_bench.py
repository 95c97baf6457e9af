"""Smoke test of the benchmark harness (no timing asserts: speed is read from its printout)."""

import json
import re
from pathlib import Path

import pytest

from experiments import bench


@pytest.mark.slow
def test_quick_benchmark_runs_every_row_and_reports_ratios(capsys, tmp_path, pin_cores):
  pin_cores(2)
  result = bench.main(["--quick", "--steps", "2", "--out", str(tmp_path / "bench.json")])
  names = [r["name"] for r in result["model"]]
  assert names == [
    "bnjax LeNet + bnjax.BatchNorm",
    "bnjax LeNet + flax.linen.BatchNorm",
    "bnjax NNXLeNet + bnjax.nnx.BatchNorm",
    "bnjax LeNet + bnjax.BatchNorm, 2 seeds",
    "PyTorch eager, chapter's scratch BatchNorm",
    "PyTorch eager, nn.BatchNorm2d/1d",
  ]
  assert all(r["examples_per_sec"] > 0 and r["ratio_to_torch_nn_bn"] > 0 for r in result["model"])
  assert [r.get("seeds") for r in result["model"]] == [None, None, None, 2, None, None]
  assert result["model"][3]["time_vs_one_seed"] > 0
  assert result["model"][1]["ours_over_this"] > 0 and result["model"][2]["this_over_linen"] > 0  # per-round medians
  assert result["model"][3]["devices"] == 2  # the seeds split over two host devices, as --seeds on 2 cores
  assert {r["impl"] for r in result["ops"]} == {"bnjax.batch_norm", "flax.linen.BatchNorm", "torch F.batch_norm (NCHW)"}
  assert all(r["gb_per_s"] > 0 and r["vs_flax"] > 0 and r["calls_per_block"] >= 1 for r in result["ops"])
  assert {r["vs_flax"] for r in result["ops"] if r["impl"] == "flax.linen.BatchNorm"} == {1.0}
  assert [r["name"] for r in result["inference"]["rows"]] == [
    "LeNet + bnjax.BatchNorm, eval mode",
    "LeNet with BN folded into conv/dense",
  ]
  assert result["inference"]["speedup"] > 0 and result["inference"]["max_abs_logit_diff"] < 1e-4
  out = capsys.readouterr().out
  assert (
    "vs torch nn.BN" in out
    and "GB/s" in out
    and "x Flax" in out
    and "NNX / linen throughput" in out
    and re.search(r"2 seeds side by side \(one program, --seeds; 2 device\(s\)\) / one seed, time:", out)
    and "folded / BN throughput" in out
    and (tmp_path / "bench.json").exists()
  )


@pytest.mark.slow
def test_without_torch_the_torch_rows_are_skipped_with_a_note(monkeypatch, capsys):
  monkeypatch.setattr(bench, "try_import_torch", lambda: None)
  result = bench.main(["--quick", "--steps", "2", "--no-ops", "--seeds", "1"])
  assert len(result["model"]) == 3 and all(r["ratio_to_torch_nn_bn"] is None for r in result["model"])
  assert "torch is not installed, so the PyTorch rows are skipped" in capsys.readouterr().out


@pytest.mark.slow
def test_the_data_parallel_benchmark_reports_every_device_count(capsys):
  from experiments import bench_parallel

  result = bench_parallel.main(["--steps", "2", "--repeats", "1", "--batch-size", "16"])
  names = [r["name"] for r in result["rows"]]
  assert names == [
    "1 device, no mesh",
    "1 device(s), shard_map step",
    "2 device(s), shard_map step",
    "4 device(s), shard_map step",
  ]
  assert all(r["steps_per_sec"] > 0 and r["max_diff"] < 1e-3 for r in result["rows"])
  assert result["rows"][-1]["all_reduces"] >= 4 and "all-reduces" in capsys.readouterr().out


def test_the_end_to_end_benchmark_times_whole_processes_and_derives_fixed_costs(monkeypatch, capsys, tmp_path):
  """Fixed cost = wall(2 epochs) - 2 x the second epoch's own seconds, per round (bnjax's from metrics.json,
  PyTorch's from its epoch line); the ratio is torch's wall over bnjax's."""
  launched = []

  def fake_child(cmd, log=None):  # walls: bnjax 3 s + 2 s per epoch (cold: 9 s + 2 s), torch 1 s + 4 s per epoch
    launched.append(cmd)
    epochs = int(cmd[cmd.index("--epochs") + 1])
    if "experiments.torch_lenet" in cmd:
      if log is not None:
        lines = [f"epoch {e:2d}/{epochs}  loss 0.500  train acc 0.800  test acc 0.800  (4.00 s)" for e in (1, 2)]
        log.write_text("\n".join(lines) + "\nloss 0.500, train acc 0.800, test acc 0.800\n")
      return 1.0 + 4.0 * epochs, 100.0, 0
    out = Path(cmd[cmd.index("--out") + 1]) / "ours"
    out.mkdir(parents=True, exist_ok=True)
    epoch = {"train_seconds": 1.5, "eval_seconds": 0.5}
    first = {**epoch, "train_seconds": 6.0}  # (compiling: not a steady epoch)
    (out / "metrics.json").write_text(json.dumps({"epochs": [first] + [epoch] * (epochs - 1)}))
    return (9.0 if "--compile-cache" in cmd else 3.0) + 2.0 * epochs, 50.0, 0

  monkeypatch.setattr(bench, "_timed_child", fake_child)
  result = bench.main(["--end-to-end", "--pairs", "2", "--epochs", "10", "--out", str(tmp_path / "e2e.json")])
  assert result["main_job"]["median_seconds"] == {"bnjax": 23.0, "torch": 41.0}
  assert result["main_job"]["ratio_torch_over_bnjax"] == 41.0 / 23.0
  fixed = {name: (r["fixed_seconds"], r["epoch_seconds"]) for name, r in result["fixed_cost"].items()}
  assert fixed == {"bnjax warm": (3.0, 2.0), "bnjax cold": (9.0, 2.0), "torch": (1.0, 4.0)}
  cold = [c for c in launched if "--compile-cache" in c]
  assert len({c[c.index("--compile-cache") + 1] for c in cold}) == len(cold)  # an empty cache for every cold run
  assert len(launched) == 3 * 2 + 3 * 3  # (1 warm-up + 2 rounds) x (2 main-job runs + 3 two-epoch runs)
  assert "fixed cost" in capsys.readouterr().out and (tmp_path / "e2e.json").exists()


def test_two_implementations_alternate_which_goes_first_and_are_timed_per_round(monkeypatch):
  """The op section's pairing: one call of each per round, the one that goes first taking turns, each call's
  seconds filed under its own implementation."""
  clock, order = [0.0], []

  def call(name, seconds):
    def run():
      order.append(name)
      clock[0] += seconds

    return run

  monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])
  first, second = bench.alternating(call("a", 1.0), call("b", 3.0), rounds=3)
  assert order == ["a", "b", "b", "a", "a", "b"]
  assert first == [1.0] * 3 and second == [3.0] * 3
