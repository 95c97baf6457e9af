"""experiments/lenet_fmnist/porting.py: the chapter's whole PyTorch LeNet <-> ours, without torch (layer
conversions: tests/test_porting.py; numerical parity: tests/experiments/test_torch_parity.py)."""

import numpy as np
import pytest

from experiments.lenet_fmnist import porting as lenet_porting


def lenet_state_dict(with_bn=True):
  """A state dict with the chapter's BN LeNet keys and shapes (values do not matter here)."""
  sd = {}
  for ours, theirs in (lenet_porting.LENET_BN_LAYOUT if with_bn else lenet_porting.LENET_PLAIN_LAYOUT).items():
    shape = {"conv1": (6, 1, 5, 5), "conv2": (16, 6, 5, 5), "fc1": (120, 256), "fc2": (84, 120), "fc3": (10, 84)}
    if ours.startswith("bn"):
      c = {"bn1": 6, "bn2": 16, "bn3": 120, "bn4": 84}[ours]
      for name in ("weight", "bias", "running_mean", "running_var"):
        sd[f"{theirs}.{name}"] = np.ones(c, np.float32)
      sd[f"{theirs}.num_batches_tracked"] = np.array(3)
    else:
      sd[f"{theirs}.weight"] = np.zeros(shape[ours], np.float32)
      sd[f"{theirs}.bias"] = np.zeros(shape[ours][0], np.float32)
  return sd


def test_unknown_keys_are_an_error_unless_not_strict():
  sd = {**lenet_state_dict(), "16.weight": np.zeros(3), "1.extra": np.zeros(1)}
  with pytest.raises(KeyError, match=r"does not use: \['1.extra', '16.weight'\]\. Pass strict=False"):
    lenet_porting.lenet_from_torch(sd)
  assert set(lenet_porting.lenet_from_torch(sd, strict=False)["params"]) == {
    "conv1",
    "bn1",
    "conv2",
    "bn2",
    "fc1",
    "bn3",
    "fc2",
    "bn4",
    "fc3",
  }


def test_a_missing_batch_norm_key_is_named_not_a_neighbours():
  sd = lenet_state_dict()
  del sd["1.weight"]
  with pytest.raises(
    KeyError, match=r"missing 1 key\(s\) of LeNet: '1.weight' or '1.gamma'; keys of those modules: \['1.bias'"
  ):
    lenet_porting.lenet_from_torch(sd)
  plain = randomized(lenet_state_dict(with_bn=False))
  del plain["3.bias"]
  with pytest.raises(KeyError, match=r"^state_dict is missing 1 key\(s\) of LeNet: '3.bias'; keys of those modules: "):
    lenet_porting.lenet_from_torch(plain)


def test_a_data_parallel_prefix_is_recognised():
  sd = lenet_state_dict()
  wrapped = {f"module.{k}": v for k, v in sd.items()}
  unwrapped = lenet_porting.lenet_from_torch(wrapped)
  assert set(unwrapped["batch_stats"]) == {"bn1", "bn2", "bn3", "bn4"}
  partly = {**sd, "module.0.weight": sd["0.weight"]}
  with pytest.raises(KeyError, match=r"'module\.' prefix is removed only when every key has it"):
    lenet_porting.lenet_from_torch(partly)


def randomized(sd):
  rng = np.random.default_rng(0)
  return {k: rng.standard_normal(v.shape).astype(np.float32) if v.dtype == np.float32 else v for k, v in sd.items()}


def test_lenet_round_trips_through_a_torch_state_dict_counter_included():
  sd = randomized(lenet_state_dict())
  for name in ("1", "5", "10", "13"):
    sd[f"{name}.num_batches_tracked"] = np.array(11 + int(name), np.int64)
  variables = lenet_porting.lenet_from_torch(sd, num_batches_tracked=True)
  assert variables["batch_stats"]["bn2"]["num_batches_tracked"] == 16
  back = lenet_porting.lenet_to_torch(variables)
  assert set(back) == set(sd)
  for key, value in sd.items():
    np.testing.assert_array_equal(back[key], value, err_msg=key)
  # Without the flag the counter is not imported, and exports as 0 (what a fresh nn.BatchNorm holds).
  assert "num_batches_tracked" not in lenet_porting.lenet_from_torch(sd)["batch_stats"]["bn1"]
  assert lenet_porting.lenet_to_torch(lenet_porting.lenet_from_torch(sd))["1.num_batches_tracked"] == 0
  plain = randomized(lenet_state_dict(with_bn=False))
  back = lenet_porting.lenet_to_torch(lenet_porting.lenet_from_torch(plain))
  assert all(np.array_equal(v, plain[k]) for k, v in back.items())


def test_a_counter_asked_for_but_missing_is_named():
  sd = {k: v for k, v in lenet_state_dict().items() if k != "1.num_batches_tracked"}
  with pytest.raises(KeyError, match=r"state_dict has no '1.num_batches_tracked'.*num_batches_tracked=False"):
    lenet_porting.lenet_from_torch(sd, num_batches_tracked=True)


def test_all_keys_of_a_bn_layer_missing_are_named_as_missing():
  sd = lenet_state_dict()
  for name in [k for k in sd if k.startswith("1.")]:
    del sd[name]
  with pytest.raises(KeyError, match=r"missing 4 key\(s\) of LeNet: '1.weight' or '1.gamma', '1.bias' or '1.beta', "):
    lenet_porting.lenet_from_torch(sd)
