"""The one tolerance helper of the test suite.

Tolerances are named by what separates the two computations, not picked per test:

* ``"rounding"``: the same float32 math in a different order (XLA vs NumPy float64 reference, NHWC vs
  NCHW, fused vs unfused). A normalized value is O(1), so float32 rounding of a few reductions over
  ~1e5 elements stays well below 1e-5 relative / 1e-6 absolute.
* ``"framework"``: float32 across frameworks (JAX vs PyTorch) through several layers or steps, where
  different reduction orders and convolution algorithms compound: 1e-4 relative, 1e-5 absolute.
* ``"trajectory"``: parameters after several SGD steps at the chapter's lr 1.0. Each step feeds the
  previous step's rounding differences back through sigmoids and batch statistics, so they grow
  roughly tenfold over five steps: 1e-3 relative, 3e-4 absolute (parameters are O(0.01..1)).
* ``"half"``: outputs rounded to bfloat16/float16 (8/11 significant bits).
"""

import jax
import numpy as np

TOLERANCES = {
  "rounding": dict(rtol=1e-5, atol=1e-6),
  "framework": dict(rtol=1e-4, atol=1e-5),
  "trajectory": dict(rtol=1e-3, atol=3e-4),
  "half": dict(rtol=2e-2, atol=2e-2),
}


def assert_trees_close(actual, expected, kind: str = "rounding"):
  """Asserts two pytrees have the same structure and element-wise close leaves."""
  tol = TOLERANCES[kind]
  a_leaves, a_tree = jax.tree_util.tree_flatten(actual)
  e_leaves, e_tree = jax.tree_util.tree_flatten(expected)
  assert a_tree == e_tree, f"tree structures differ: {a_tree} vs {e_tree}"
  for i, (a, e) in enumerate(zip(a_leaves, e_leaves, strict=True)):
    wide = np.complex128 if np.iscomplexobj(a) or np.iscomplexobj(e) else np.float64
    a, e = np.asarray(a, wide), np.asarray(e, wide)
    assert a.shape == e.shape, f"leaf {i}: shape {a.shape} vs {e.shape}"
    np.testing.assert_allclose(a, e, err_msg=f"leaf {i} ({kind} tolerance)", **tol)


def max_abs_diff(actual, expected) -> float:
  """Largest absolute difference over all leaves (for reports)."""
  diffs = jax.tree_util.tree_map(
    lambda a, e: float(np.max(np.abs(np.asarray(a, np.complex128) - np.asarray(e, np.complex128)))), actual, expected
  )
  return max(jax.tree_util.tree_leaves(diffs))


# Largest difference seen per named check, printed at the end of the run (see conftest.py).
MAX_DIFFS: dict[str, float] = {}


def assert_close_and_record(check: str, actual, expected, kind: str = "rounding"):
  """`assert_trees_close`, remembering the largest absolute difference under the name `check`."""
  MAX_DIFFS[check] = max(MAX_DIFFS.get(check, 0.0), max_abs_diff(actual, expected))
  assert_trees_close(actual, expected, kind)
