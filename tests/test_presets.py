"""`bnjax.pytorch_preset`: the keywords, and its errors (numerical parity with torch: test_torch_parity.py)."""

import pytest

import bnjax


def test_the_preset_translates_pytorch_momentum_and_keeps_the_counter():
  assert bnjax.pytorch_preset() == {
    "momentum": 0.9,
    "epsilon": 1e-5,
    "unbiased_running_var": True,
    "track_num_batches": True,
  }
  assert bnjax.pytorch_preset(None, eps=1e-3)["momentum"] is None
  assert bnjax.pytorch_preset(0.25)["momentum"] == 0.75


@pytest.mark.parametrize(
  "kwargs,pattern",
  [
    (dict(momentum=1.5), r"`momentum` is 1.5, but PyTorch's momentum is a number in \[0, 1\] or None"),
    (dict(momentum="0.1"), r"`momentum` is '0.1'"),
    (dict(eps=-1.0), r"`eps` is -1.0, but should be a finite number >= 0"),
    (dict(eps=float("inf")), r"`eps` is inf"),
  ],
)
def test_bad_values_are_named(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    bnjax.pytorch_preset(**kwargs)


def test_numpy_scalars_are_numbers_too():
  import numpy as np

  assert bnjax.pytorch_preset(np.float32(0.1))["momentum"] == pytest.approx(0.9)  # not "must be a number"
  preset = bnjax.pytorch_preset(np.float64(0.1), eps=np.float32(1e-3))
  assert preset["momentum"] == pytest.approx(0.9) and type(preset["momentum"]) is float
  assert preset["epsilon"] == pytest.approx(1e-3) and type(preset["epsilon"]) is float
