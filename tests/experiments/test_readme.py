"""The experiment's README (experiments/lenet_fmnist/README.md) is executable: its python blocks run from
the repository root, its links hold, its flags table is complete and the lines it quotes are what the
experiment prints (the front page and guides: tests/test_readme.py)."""

import re

import pytest

from tests.helpers import ROOT, blocks, check_relative_links, printed_as_quoted, with_outputs_checked

EXAMPLE = ROOT / "experiments" / "lenet_fmnist" / "README.md"


@pytest.mark.parametrize("doc", [EXAMPLE], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_and_heading(doc):
  check_relative_links(doc)


@pytest.mark.slow
@pytest.mark.parametrize("code", blocks(EXAMPLE, "python"), ids=lambda c: c.strip().splitlines()[-1][:50])
def test_the_example_readme_python_blocks_run_from_the_repository_root(code, monkeypatch):
  monkeypatch.chdir(ROOT)  # `experiments` is importable from the repository root, as the example says
  source, _ = with_outputs_checked(code)
  exec(compile(source, str(EXAMPLE), "exec"), {"__name__": "__readme__", "__printed__": printed_as_quoted})


def test_the_example_readme_lists_every_flag():
  from experiments.lenet_fmnist import arguments

  text = EXAMPLE.read_text()
  for action in arguments.build_parser()._actions:
    if action.dest != "help":
      assert f"| `{action.option_strings[0]}" in text, f"{action.option_strings[0]} is missing from the flags table"


def test_the_example_readme_has_python_blocks():
  assert len(blocks(EXAMPLE, "python")) >= 3


def as_pattern(line: str) -> str:
  """A quoted output line with its numbers (and the arrays of gamma/beta) made variable."""
  pattern = re.escape(line.strip())
  pattern = re.sub(r"\\\[.*\\\]", r"\\[.*\\]", pattern)  # gamma/beta arrays
  # The device is the machine's: "cpu:0" here, "cuda:0 (NVIDIA H200)" on a GPU.
  pattern = re.sub(r"(on|device)\\ cpu:0", r"\1\\ \\w+:0(\\ \\(.*\\))?", pattern)
  pattern = re.sub(r"-?\d[\d,]*(\\\.\d+)?", r"-?[\\d,]+(\\.\\d+)?", pattern)
  return re.sub(r"(\\ )+", r"\\s+", pattern)  # column padding ("epoch  2/10") varies


@pytest.mark.slow
def test_quoted_experiment_output_matches_what_it_prints(fmnist_dir, tmp_path, capsys):
  from experiments import lenet_fmnist

  (quoted,) = [b for b in blocks(EXAMPLE, "text") if "examples/sec on" in b]
  args = ["--data-dir", str(fmnist_dir), "--allow-partial-data", "--batch-size", "64"]
  lenet_fmnist.main([*args, "--out", str(tmp_path / "o"), "--epochs", "2", "--no-progress", "--devices", "1"])
  printed = capsys.readouterr().out
  for line in quoted.strip().splitlines():
    if line.startswith("$") or "..." in line:
      continue
    found = re.search(f"^{as_pattern(line)}$", printed, flags=re.M)
    assert found, f"the example's README quotes {line!r}, which the experiment does not print"
