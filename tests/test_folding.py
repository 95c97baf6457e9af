"""Folding eval-mode BN into the layer before it: same outputs, no BN layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests.helpers import random_bn
from tests.tolerance import assert_trees_close


@pytest.mark.parametrize("layer_kind", ["dense", "conv", "conv without bias"])
@pytest.mark.parametrize("bn_affine", [(True, True), (False, False)], ids=["affine", "no scale/bias"])
def test_a_folded_layer_equals_the_layer_then_eval_batch_norm(rng, layer_kind, bn_affine):
  if layer_kind == "dense":
    layer, x = nn.Dense(7), rng.standard_normal((5, 11)).astype(np.float32)
  else:
    layer, x = nn.Conv(7, (3, 3), use_bias=layer_kind == "conv"), rng.standard_normal((2, 6, 6, 3)).astype(np.float32)
  layer_params = layer.init(jax.random.key(0), x)["params"]
  bn_params, bn_stats = random_bn(rng, 7, *bn_affine)
  bn = bnjax.BatchNorm(use_running_average=True, use_scale=bn_affine[0], use_bias=bn_affine[1], epsilon=1e-3)
  expected = bn.apply({"params": bn_params, "batch_stats": bn_stats}, layer.apply({"params": layer_params}, x))
  folded = bnjax.fold_batch_norm(layer_params, bn_params, bn_stats, epsilon=1e-3)
  with_bias = layer.clone(use_bias=True) if layer_kind != "dense" else layer
  assert_trees_close(with_bias.apply({"params": folded}, x), expected)


def test_folding_errors_name_the_problem(rng):
  bn_params, bn_stats = random_bn(rng, 4)
  with pytest.raises(ValueError, match=r"BN mean has shape \(4,\), but the kernel \(3, 5\) has 5 output features"):
    bnjax.fold_batch_norm({"kernel": jnp.ones((3, 5)), "bias": jnp.zeros(5)}, bn_params, bn_stats)
  with pytest.raises(KeyError, match=r"`bn_stats` has no 'var'"):
    bnjax.fold_batch_norm({"kernel": jnp.ones((3, 4))}, bn_params, {"mean": bn_stats["mean"]})


@pytest.mark.parametrize("epsilon", [-1.0, float("nan"), float("inf"), "1e-5"])
def test_a_bad_epsilon_is_refused_not_folded_into_nan_kernels(epsilon):
  with pytest.raises(ValueError, match=r"`epsilon` is .*, but should be the BN layer's epsilon"):
    bnjax.fold_batch_norm({"kernel": np.ones((2, 3))}, {}, {"mean": np.zeros(3), "var": np.ones(3)}, epsilon)
