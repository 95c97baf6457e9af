"""bnjax.porting without torch: layouts and error messages (numerical parity: test_torch_parity.py)."""

import numpy as np
import pytest

from bnjax import porting


def test_conv_kernel_goes_from_oihw_to_hwio():
  w = np.arange(6 * 2 * 5 * 3, dtype=np.float32).reshape(6, 2, 5, 3)
  out = porting.conv_from_torch({"c.weight": w, "c.bias": np.zeros(6)}, "c")
  assert out["kernel"].shape == (5, 3, 2, 6) and out["kernel"][4, 1, 0, 5] == w[5, 0, 4, 1]


def test_dense_after_flatten_reorders_chw_to_hwc():
  w = np.random.default_rng(0).standard_normal((3, 2 * 4 * 5)).astype(np.float32)
  out = porting.dense_from_torch({"f.weight": w, "f.bias": np.zeros(3)}, "f", flatten_chw=(2, 4, 5))
  x_chw = np.random.default_rng(1).standard_normal((2, 4, 5)).astype(np.float32)
  np.testing.assert_allclose(x_chw.transpose(1, 2, 0).reshape(-1) @ out["kernel"], w @ x_chw.reshape(-1), rtol=1e-5)


def test_chapter_and_torch_batch_norm_names_are_both_understood():
  chapter = {
    "1.gamma": np.ones((1, 3, 1, 1)),
    "1.beta": np.zeros((1, 3, 1, 1)),
    "1.moving_mean": np.full((1, 3, 1, 1), 2.0),
    "1.moving_var": np.full((1, 3, 1, 1), 3.0),
  }
  torch_style = {
    "1.weight": np.ones(3),
    "1.bias": np.zeros(3),
    "1.running_mean": np.full(3, 2.0),
    "1.running_var": np.full(3, 3.0),
    "1.num_batches_tracked": np.array(7),
  }
  for sd in (chapter, torch_style):
    params, stats = porting.batch_norm_from_torch(sd, "1")
    assert params["scale"].shape == (3,) and stats["var"].tolist() == [3.0, 3.0, 3.0]


def test_missing_key_names_it_and_lists_what_is_there():
  with pytest.raises(KeyError, match=r"no '0.bias'.*keys of that module: \['0.weight'\]"):
    porting.conv_from_torch({"0.weight": np.zeros((6, 1, 5, 5))}, "0")


def test_wrong_shapes_are_rejected():
  with pytest.raises(ValueError, match=r"`0.weight` has shape \(6, 25\), but a Conv2d weight"):
    porting.conv_from_torch({"0.weight": np.zeros((6, 25)), "0.bias": np.zeros(6)}, "0")
  with pytest.raises(ValueError, match=r"flatten of \(16, 4, 4\) gives 256 inputs"):
    porting.dense_from_torch({"9.weight": np.zeros((120, 400)), "9.bias": np.zeros(120)}, "9", (16, 4, 4))
  with pytest.raises(ValueError, match=r"inconsistent feature counts"):
    porting.batch_norm_from_torch(
      {"1.weight": np.ones(3), "1.bias": np.zeros(3), "1.running_mean": np.zeros(4), "1.running_var": np.ones(3)}, "1"
    )


def test_a_counter_beyond_int32_is_refused_not_wrapped():
  sd = bn_state_dict()
  sd["1.num_batches_tracked"] = np.array(2**40, np.int64)
  with pytest.raises(ValueError, match=r"`1.num_batches_tracked` is 1099511627776, but bnjax keeps the batch counter"):
    porting.batch_norm_from_torch(sd, "1", num_batches_tracked=True)


def test_bfloat16_and_float16_tensors_convert_exactly():
  import torch

  values = torch.tensor([1.5, -2.25, 3.0e-3])
  for dtype in (torch.bfloat16, torch.float16):
    got = porting.to_numpy(values.to(dtype))
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, values.to(dtype).float().numpy())


def bn_state_dict(**shapes):
  """A torch-named BatchNorm layer "1" with 3 features; `shapes` overrides a tensor's shape by its name."""
  names = ("weight", "bias", "running_mean", "running_var")
  return {f"1.{n}": np.ones(shapes.get(n, (3,)), np.float32) for n in names}


@pytest.mark.parametrize(
  "convert, message",
  [
    (
      lambda: porting.batch_norm_from_torch(bn_state_dict(running_var=(2, 3)), "1"),
      r"^`1.running_var` has shape \(2, 3\), but should be \(3,\) \(or \(1, 3\) / \(1, 3, 1, 1\)",
    ),
    (
      lambda: porting.batch_norm_from_torch(bn_state_dict(weight=(3, 1, 2)), "1"),
      r"^`1.weight` has shape \(3, 1, 2\), but should be \(3,\) \(or \(1, 3\) / \(1, 3, 1, 1\)",
    ),
    (
      lambda: porting.conv_from_torch({"0.weight": np.zeros((6, 1, 5, 5)), "0.bias": np.zeros(5)}, "0"),
      r"^`0.bias` has shape \(5,\), but should be \(6,\): one per output channel of `0.weight` \(6, 1, 5, 5\)\.",
    ),
    (
      lambda: porting.dense_from_torch({"9.weight": np.zeros((120, 256)), "9.bias": np.zeros((1, 120))}, "9"),
      r"^`9.bias` has shape \(1, 120\), but should be \(120,\): one per output of `9.weight` \(120, 256\)\.",
    ),
    (
      lambda: porting.dense_to_torch({"kernel": np.zeros((256, 120)), "bias": np.zeros(120)}, "9", (16, 5, 5)),
      r"^`flatten_chw` is \(16, 5, 5\), which gives 400 inputs, but `kernel` has shape \(256, 120\): 256 inputs\.",
    ),
    (
      lambda: porting.dense_to_torch({"kernel": np.zeros((256, 120)), "bias": np.zeros(84)}, "9"),
      r"^`bias` has shape \(84,\), but should be \(120,\): one per output of `kernel` \(256, 120\)\.",
    ),
    (
      lambda: porting.conv_to_torch({"kernel": np.zeros((5, 5, 6)), "bias": np.zeros(6)}, "0"),
      r"^`kernel` has shape \(5, 5, 6\), but a Conv kernel \(kh, kw, in, out\) has 4 dimensions\.",
    ),
    (
      lambda: porting.batch_norm_to_torch({"bias": np.zeros(3)}, {"mean": np.zeros(3), "var": np.ones(3)}, "1"),
      r"^`params` has no 'scale' \(a BatchNorm layer's, for '1.weight'\); it has \['bias'\]\.$",
    ),
    (
      lambda: porting.batch_norm_to_torch({"scale": np.ones(3), "bias": np.zeros(3)}, {"mean": np.zeros(3)}, "1"),
      r"^`stats` has no 'var' \(a BatchNorm layer's, for '1.running_var'\); it has \['mean'\]\.$",
    ),
    (
      lambda: porting.batch_norm_to_torch(
        {"scale": np.ones(3), "bias": np.zeros(4)}, {"mean": np.zeros(3), "var": np.ones(3)}, "1"
      ),
      r"^`bias` has shape \(4,\), but should be \(3,\) \(the shape of `scale`\)\.$",
    ),
    (
      lambda: porting.batch_norm_to_torch(
        {"scale": np.ones(3), "bias": np.zeros(3)}, {"mean": np.zeros(3), "var": np.ones((2, 3))}, "1"
      ),
      r"^`var` has shape \(2, 3\), but should be \(3,\): one value per feature\.$",
    ),
  ],
  ids=[
    "running_var_of_two_rows",
    "weight_of_three_dimensions",
    "conv_bias_of_wrong_length",
    "dense_bias_of_wrong_shape",
    "flatten_chw_that_does_not_match_the_kernel",
    "dense_export_bias_of_wrong_length",
    "conv_export_kernel_of_three_dimensions",
    "batch_norm_export_without_scale",
    "batch_norm_export_without_var",
    "batch_norm_export_bias_of_another_length",
    "batch_norm_export_var_of_two_rows",
  ],
)
def test_a_tensor_of_the_wrong_shape_or_a_missing_one_is_named_with_what_was_expected(convert, message):
  with pytest.raises((ValueError, KeyError), match=message):
    convert()


def test_the_chapter_s_row_and_column_shaped_statistics_are_still_accepted():
  sd = bn_state_dict(weight=(1, 3), bias=(1, 3, 1, 1), running_mean=(3, 1))
  params, stats = porting.batch_norm_from_torch(sd, "1")
  assert {k: v.shape for k, v in {**params, **stats}.items()} == {k: (3,) for k in ("scale", "bias", "mean", "var")}
