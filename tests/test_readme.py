"""README.md's examples are executable documentation: every ```python block runs as pasted, on its own,
and the lines the README quotes from the experiment's output are the lines it prints."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def blocks(language: str) -> list[str]:
  return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("code", blocks("python"), ids=lambda c: c.strip().splitlines()[-1][:50])
def test_every_python_block_runs_on_its_own(code, monkeypatch, capsys):
  monkeypatch.chdir(ROOT)  # `experiments` is importable from the repository root, as in the README
  exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})


def test_the_readme_has_python_blocks():
  assert len(blocks("python")) >= 4


def as_pattern(line: str) -> str:
  """A quoted output line with its numbers (and the arrays of gamma/beta) made variable."""
  pattern = re.escape(line.strip())
  pattern = re.sub(r"\\\[.*\\\]", r"\\[.*\\]", pattern)  # gamma/beta arrays
  # The device is the machine's: "cpu:0" here, "cuda:0 (NVIDIA H200)" on a GPU.
  pattern = re.sub(r"(on|device)\\ cpu:0", r"\1\\ \\w+:0(\\ \\(.*\\))?", pattern)
  pattern = re.sub(r"-?\d[\d,]*(\\\.\d+)?", r"-?[\\d,]+(\\.\\d+)?", pattern)
  return re.sub(r"(\\ )+", r"\\s+", pattern)  # column padding ("epoch  2/10") varies


def test_quoted_experiment_output_matches_what_it_prints(fmnist_dir, tmp_path, capsys):
  from experiments import lenet_fmnist

  (quoted,) = [b for b in blocks("text") if "examples/sec on" in b]
  args = ["--data-dir", str(fmnist_dir), "--allow-partial-data", "--batch-size", "64"]
  lenet_fmnist.main([*args, "--out", str(tmp_path / "o"), "--epochs", "2", "--no-progress", "--devices", "1"])
  printed = capsys.readouterr().out
  for line in quoted.strip().splitlines():
    if line.startswith("$") or "..." in line:
      continue
    found = re.search(f"^{as_pattern(line)}$", printed, flags=re.M)
    assert found, f"README quotes {line!r}, which the experiment does not print"


PRINTED = re.compile(r"^(\s*)print\((.*)\)\s+#\s*(.+?)\s*$")  # print(x)  # what it prints


def with_outputs_checked(code: str) -> tuple[str, int]:
  """``code`` with every ``print(...)  # output`` line turned into a check that it prints ``output``; the count."""
  lines = code.splitlines()
  for i, line in enumerate(lines):
    found = PRINTED.match(line)
    if found:
      indent, args, quoted = found.groups()
      lines[i] = f"{indent}__printed__({quoted!r}, {args})"
  return "\n".join(lines), sum(bool(PRINTED.match(line)) for line in code.splitlines())


def printed_as_quoted(quoted: str, *args) -> None:
  got = " ".join(map(str, args))
  assert got == quoted, f"README says this prints {quoted!r}, but it prints {got!r}"


def test_the_outputs_quoted_in_python_blocks_are_what_they_print(monkeypatch):
  monkeypatch.chdir(ROOT)
  checked = 0
  for code in blocks("python"):
    source, count = with_outputs_checked(code)
    exec(compile(source, "README.md", "exec"), {"__name__": "__readme__", "__printed__": printed_as_quoted})
    checked += count
  assert checked >= 5  # (6,), 1, ['mean', ...], True, (4, 10)


def test_a_wrong_quoted_output_is_caught():
  source, count = with_outputs_checked("print(1 + 1)  # 3")
  with pytest.raises(AssertionError, match=r"README says this prints '3', but it prints '2'"):
    exec(compile(source, "README.md", "exec"), {"__printed__": printed_as_quoted})
  assert count == 1
