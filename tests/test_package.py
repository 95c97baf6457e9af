"""The library is light: importing it pulls in none of the experiment's or the tests' packages."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("optax", "tensorflow_datasets", "tensorflow", "matplotlib", "tqdm", "torch", "experiments")


def imported(modules: str) -> list[str]:
  code = f"import sys, {modules}; print(sorted(m for m in {HEAVY!r} if m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
  return eval(out)  # a list of names printed by the child


def test_importing_the_library_imports_no_experiment_dependency():
  assert imported("bnjax, bnjax.sync, bnjax.porting, bnjax.precise, bnjax.folding, bnjax.presets") == []


def test_the_nnx_module_brings_only_what_flax_nnx_itself_imports():
  # flax.nnx imports optax (for nnx.Optimizer); bnjax.nnx adds nothing to that.
  assert imported("bnjax.nnx") == imported("flax.nnx") == ["optax"]


def test_the_library_declares_jax_flax_numpy_only_and_the_rest_as_extras():
  import tomllib  # (Python >= 3.11, as declared)

  project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
  names = {d.split(">")[0].split("=")[0].split("[")[0] for d in project["dependencies"]}
  assert names == {"jax", "flax", "numpy"}
  extras = project["optional-dependencies"]
  assert {"optax", "tensorflow-datasets", "matplotlib", "tqdm"} <= {d.split(">")[0] for d in extras["experiments"]}
  assert "torch==2.13.0" in extras["test"]  # the CPU wheel: a bare torch pulls a multi-GB CUDA build
  assert project["license"] == "Apache-2.0" and (ROOT / "LICENSE").is_file() and (ROOT / "bnjax" / "py.typed").is_file()


def test_no_library_module_imports_the_experiment():
  for path in (ROOT / "bnjax").glob("*.py"):
    text = path.read_text()
    assert "import experiments" not in text and "from experiments" not in text, path
