"""pytest plugin: run Flax's own NNX tests with ``flax.nnx.BatchNorm`` replaced by ``bnjax.nnx.BatchNorm``.

Loaded by ``.ci/flax_nnx_tests`` (``-p flax_swap``) before any test module is imported. It keeps only the
tests whose source builds ``BatchNorm`` (every other Flax test says nothing about us) and checks that each
collected test module sees bnjax's class.
"""

import ast
import os
import pathlib
import sys

import flax.nnx
import flax.nnx.nn.normalization
import pytest

import bnjax.nnx

SWAP = os.environ.get("FLAX_SWAP", "1") != "0"  # FLAX_SWAP=0: the same tests on Flax's own class
FLAX_BATCH_NORM = flax.nnx.nn.normalization.BatchNorm
USED = bnjax.nnx.BatchNorm if SWAP else FLAX_BATCH_NORM
for _name, _module in list(sys.modules.items()):
  if _name.startswith("flax") and getattr(_module, "BatchNorm", None) is FLAX_BATCH_NORM:
    _module.BatchNorm = USED


def _tests_building_batch_norm(path: pathlib.Path) -> set[str]:
  """Names ``Class::test`` / ``test`` of the test functions in ``path`` whose source mentions BatchNorm."""
  source = path.read_text()
  names = set()
  for node in ast.parse(source).body:
    scopes = [(node.name + "::", node.body)] if isinstance(node, ast.ClassDef) else [("", [node])]
    for prefix, body in scopes:
      for fn in body:
        if isinstance(fn, ast.FunctionDef) and fn.name.startswith("test"):
          if "BatchNorm" in (ast.get_source_segment(source, fn) or ""):
            names.add(prefix + fn.name)
  return names


# Flax's linen-equivalence tests compare nnx with linen by exact equality. Where bnjax differs from Flax on
# purpose (README, "Deliberate differences from Flax") they are expected to fail, and strictly so: a case
# that starts passing (unless the difference may vanish: not strict), or one not listed here that fails,
# shows up in the summary. Matched on absl's parameter string of each case:
# (test name, substrings its parameters all contain, strict, reason).
DELIBERATE = (
  (
    "test_nnx_linen_batchnorm_equivalence",
    ("mask=array(",),
    True,
    "the mask removes whole features: Flax's statistics and outputs are NaN, bnjax keeps the running "
    "statistics and gives finite placeholder outputs",
  ),
  (
    "test_nnx_linen_batchnorm_equivalence",
    ("use_fast_variance=False, mask=None",),
    False,
    "bnjax's mean is refined by the mean deviation from a shift (closer to float64), so its last bit can differ",
  ),
  (
    "test_nnx_linen_spectralnorm_equivalence",
    ("(dtype=<class 'jax.numpy.float32'>", "update_stats=True"),  # without an update no variance is computed
    True,
    "float32 with the default variance: bnjax's default is the stable shifted variance, Flax's the "
    "one-pass one (1-ulp differences; both pass with use_fast_variance=True)",
  ),
)


def _deliberate_difference(item):
  """The xfail mark of a listed case, else None."""
  params = getattr(getattr(item, "obj", None), "__x_params_repr__", None) or ""
  for test, needles, strict, reason in DELIBERATE:
    if item.name.startswith(test) and all(needle in params for needle in needles):
      return pytest.mark.xfail(strict=strict, reason=f"deliberate difference: {reason}")
  return None


def pytest_collection_modifyitems(config, items):
  selected = {}
  keep = []
  for item in items:
    path = pathlib.Path(str(item.fspath))
    if path not in selected:
      selected[path] = _tests_building_batch_norm(path)
    base = item.nodeid.split("::", 1)[1] if "::" in item.nodeid else ""
    # absl's parameterized cases are named test_x0, test_x_functional1, ...: match by prefix.
    if any(base == name or base.startswith(name) for name in selected[path]):
      keep.append(item)
  config.hook.pytest_deselected(items=[item for item in items if item not in keep])
  items[:] = keep
  if SWAP:
    for item in keep:
      mark = _deliberate_difference(item)
      if mark:
        item.add_marker(mark)
  for name, module in sys.modules.items():
    nnx = getattr(module, "nnx", None)
    if name.endswith("_test") and getattr(nnx, "BatchNorm", USED) is not USED:
      raise RuntimeError(f"{name}: nnx.BatchNorm is not {USED.__module__}'s")


def pytest_report_header(config):
  return f"flax_swap: nnx.BatchNorm is {USED.__module__}.BatchNorm"
