"""experiments/precise_figure.py: the precise-BN figure and table from two runs' metrics."""

import pytest


def test_the_precise_bn_figure_script(tmp_path, capsys):
  import json

  from experiments import precise_figure

  runs = []
  for name, accs in (("plain", [0.80, 0.78]), ("precise", [0.85, 0.86])):
    run = tmp_path / name
    run.mkdir()
    history = [
      {"epoch": i + 1, "test_acc": a, "precise_bn_seconds": 0.5 if name == "precise" else 0.0}
      for i, a in enumerate(accs)
    ]
    (run / "metrics.json").write_text(json.dumps({"epochs": history}))
    runs.append(str(run))
  precise_figure.main(["--plain", runs[0], "--precise", runs[1], "--out", str(tmp_path / "fig")])
  assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"
  table = (tmp_path / "fig.md").read_text()
  assert "| 0 precise BN | 0.850 | 0.860 | 0.50 |" in table and "| 0 running averages | 0.800 | 0.780 | 0.00 |" in table
  with pytest.raises(SystemExit):
    precise_figure.main(["--plain", runs[0], runs[1], "--precise", runs[1], "--out", str(tmp_path / "x")])
