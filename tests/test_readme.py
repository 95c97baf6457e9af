"""The documentation is executable: every ```python block of the front page (README.md) and the guides
(docs/*.md) runs as pasted, on its own, from a temporary directory with only the installed package
importable, and the outputs the docs quote (``print(x)  # output`` comments) are what the code prints.
(The experiment's README: tests/experiments/test_readme.py.)"""

import json
import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT, blocks, check_relative_links, printed_as_quoted, with_outputs_checked

FRONT_PAGE = ROOT / "README.md"
GUIDES = sorted((ROOT / "docs").glob("*.md"))
LIBRARY_DOCS = [FRONT_PAGE, *GUIDES]


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


@pytest.mark.slow  # (a fresh interpreter per document)
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


@pytest.mark.parametrize("doc", LIBRARY_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_a_file_and_heading(doc):
  check_relative_links(doc)


def test_a_wrong_quoted_output_is_caught():
  source, count = with_outputs_checked("print(1 + 1)  # 3")
  with pytest.raises(AssertionError, match=r"the docs say this prints '3', but it prints '2'"):
    exec(compile(source, "README.md", "exec"), {"__printed__": printed_as_quoted})
  assert count == 1
