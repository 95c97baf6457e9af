"""The documentation is executable: every ```python block of the front page (README.md) and the guides
(docs/*.md) runs as pasted, on its own, from a temporary directory with only the installed package
importable; the experiment's README runs its blocks from the repository root; and the outputs the docs
quote (``print(x)  # output`` comments, the experiment's printed lines) are what the code prints."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FRONT_PAGE = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs").glob("*.md"))
EXAMPLE = ROOT / "experiments" / "lenet_fmnist" / "README.md"
LIBRARY_DOCS = [FRONT_PAGE, *GUIDES]


def blocks(path: Path, language: str) -> list[str]:
  return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


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
  assert got == quoted, f"the docs say this prints {quoted!r}, but it prints {got!r}"


# Runs in a fresh interpreter outside the checkout: each block in its own namespace, then one JSON line.
CHILD = r"""
import json, sys, traceback

def printed_as_quoted(quoted, *args):
  got = " ".join(map(str, args))
  assert got == quoted, f"the docs say this prints {quoted!r}, but it prints {got!r}"

report = []
for name, source in json.loads(sys.stdin.read()):
  try:
    exec(compile(source, name, "exec"), {"__name__": "__docs__", "__printed__": printed_as_quoted})
    report.append(None)
  except BaseException:
    report.append(traceback.format_exc(limit=-3))
import importlib.util
importable = importlib.util.find_spec("experiments") is not None
print(json.dumps({"errors": report, "experiments": "experiments" in sys.modules, "importable": importable}))
"""


def outside_the_checkout_env() -> dict[str, str]:
  """The environment without any PYTHONPATH entry inside the repository: only the installed bnjax imports."""
  env = dict(os.environ)
  kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not os.path.abspath(p).startswith(str(ROOT))]
  env["PYTHONPATH"] = os.pathsep.join(kept)
  return env


@pytest.mark.parametrize("doc", LIBRARY_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_python_block_runs_outside_the_checkout_with_its_quoted_outputs(doc, tmp_path):
  codes = blocks(doc, "python")
  sources = [(f"{doc.name}, block {i + 1}", with_outputs_checked(code)[0]) for i, code in enumerate(codes)]
  done = subprocess.run(
    [sys.executable, "-c", CHILD],
    input=json.dumps(sources),
    cwd=tmp_path,
    env=outside_the_checkout_env(),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(done.stdout.strip().splitlines()[-1])
  assert not result["importable"] and not result["experiments"], result  # only the installed package
  failed = {name: error for (name, _), error in zip(sources, result["errors"], strict=True) if error}
  assert not failed, "\n".join(f"{name} fails:\n{error}" for name, error in failed.items())


def test_the_front_page_is_short_and_shows_the_three_snippets():
  assert len(FRONT_PAGE.read_text().splitlines()) <= 300
  code = "\n".join(blocks(FRONT_PAGE, "python"))
  for api in ("bnjax.batch_norm(", "bnjax.BatchNorm(", "from bnjax.nnx import BatchNorm"):
    assert api in code, api
  assert all(blocks(guide, "python") for guide in GUIDES if guide.name != "benchmarks.md")


def test_quoted_outputs_are_checked_in_the_library_docs():
  count = sum(with_outputs_checked(code)[1] for doc in LIBRARY_DOCS for code in blocks(doc, "python"))
  assert count >= 8


def test_the_fresh_machine_commands_are_on_the_front_page():
  (commands,) = [b for b in blocks(FRONT_PAGE, "bash") if ".ci/setup" in b]
  assert "bash .ci/setup && .venv/bin/python -m experiments.lenet_fmnist\n" in commands
  assert "bash .ci/setup && .venv/bin/ruff check . && .venv/bin/python -m pytest\n" in commands


def anchors(path: Path) -> set[str]:
  """The anchors GitHub (and MyST) give a Markdown file's headings: lowercase, punctuation dropped, dashes."""
  text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
  titles = re.findall(r"^#{1,6} (.+)$", text, flags=re.M)
  return {re.sub(r"[^\w\- ]", "", t.strip().lower()).replace(" ", "-") for t in titles}


@pytest.mark.parametrize("doc", [*LIBRARY_DOCS, EXAMPLE], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_and_heading(doc):
  for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", doc.read_text()):
    if re.match(r"[a-z]+://", target):
      continue
    path = (doc.parent / target) if target else doc
    assert path.exists(), f"{doc.relative_to(ROOT)} links to {target}, which does not exist"
    if anchor:
      assert anchor in anchors(path), f"{doc.relative_to(ROOT)} links to {target}#{anchor}: no such heading"


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


def test_a_wrong_quoted_output_is_caught():
  source, count = with_outputs_checked("print(1 + 1)  # 3")
  with pytest.raises(AssertionError, match=r"the docs say this prints '3', but it prints '2'"):
    exec(compile(source, "README.md", "exec"), {"__printed__": printed_as_quoted})
  assert count == 1
