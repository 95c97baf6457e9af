"""Folding eval-mode BN into the layer before it: same outputs, no BN layer."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tolerance import assert_trees_close

import bnjax
from experiments.lenet_fmnist.models import LeNet, fold_lenet, init_lenet


def random_bn(rng, features, use_scale=True, use_bias=True):
  params = {}
  if use_scale:
    params["scale"] = rng.uniform(0.5, 2, features).astype(np.float32)
  if use_bias:
    params["bias"] = rng.normal(0, 1, features).astype(np.float32)
  stats = {
    "mean": rng.normal(0, 2, features).astype(np.float32),
    "var": rng.uniform(0.1, 5, features).astype(np.float32),
  }
  return params, stats


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


@pytest.mark.parametrize("norm", ["ours", "flax"])
def test_a_folded_lenet_has_the_eval_logits_of_the_bn_lenet(rng, norm):
  model = LeNet(norm=norm)
  variables = init_lenet(model, jax.random.key(1))
  bn_params = {k: dict(v) for k, v in variables["params"].items()}
  stats = {}
  for bn in ("bn1", "bn2", "bn3", "bn4"):  # non-trivial statistics, as after training
    bn_params[bn], stats[bn] = random_bn(rng, variables["batch_stats"][bn]["mean"].shape[0])
  variables = {"params": bn_params, "batch_stats": stats}
  x = rng.uniform(0, 1, (16, 28, 28, 1)).astype(np.float32)
  folded = fold_lenet(variables)
  assert "batch_stats" not in folded
  assert jax.tree.structure(folded["params"]) == jax.tree.structure(
    init_lenet(LeNet(norm="none"), jax.random.key(0))["params"]
  )
  assert_trees_close(LeNet(norm="none").apply(folded, x, train=False), model.apply(variables, x, train=False))


def test_folding_errors_name_the_problem(rng):
  bn_params, bn_stats = random_bn(rng, 4)
  with pytest.raises(ValueError, match=r"BN mean has shape \(4,\), but the kernel \(3, 5\) has 5 output features"):
    bnjax.fold_batch_norm({"kernel": jnp.ones((3, 5)), "bias": jnp.zeros(5)}, bn_params, bn_stats)
  with pytest.raises(KeyError, match=r"`bn_stats` has no 'var'"):
    bnjax.fold_batch_norm({"kernel": jnp.ones((3, 4))}, bn_params, {"mean": bn_stats["mean"]})
  plain = init_lenet(LeNet(norm="none"), jax.random.key(0))
  with pytest.raises(ValueError, match="plain LeNet variables, nothing to fold"):
    fold_lenet(plain)


@pytest.mark.parametrize("epsilon", [-1.0, float("nan"), float("inf"), "1e-5"])
def test_a_bad_epsilon_is_refused_not_folded_into_nan_kernels(epsilon):
  with pytest.raises(ValueError, match=r"`epsilon` is .*, but should be the BN layer's epsilon"):
    bnjax.fold_batch_norm({"kernel": np.ones((2, 3))}, {}, {"mean": np.zeros(3), "var": np.ones(3)}, epsilon)
