"""The chapter's LeNet: layers, shapes, parameter counts, selectable normalization."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import new_state
from tolerance import assert_trees_close

from experiments.lenet_fmnist.conv import Conv, conv2d_valid
from experiments.lenet_fmnist.models import LeNet, init_lenet


def count(tree):
  return sum(int(np.prod(a.shape)) for a in jax.tree_util.tree_leaves(tree))


# Layer sizes of the chapter's LeNet: (weights + biases) per conv/dense, 2 per feature per BN.
CONV_DENSE = (6 * 1 * 25 + 6) + (16 * 6 * 25 + 16) + (256 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
BN_FEATURES = 6 + 16 + 120 + 84


@pytest.mark.parametrize("norm", ["ours", "flax"])
def test_lenet_with_batch_norm_shapes_and_counts(norm):
  variables = init_lenet(LeNet(norm=norm), jax.random.key(0))
  assert count(variables["params"]) == CONV_DENSE + 2 * BN_FEATURES
  assert count(variables["batch_stats"]) == 2 * BN_FEATURES
  shapes = jax.tree_util.tree_map(jnp.shape, variables["params"])
  assert shapes["conv1"]["kernel"] == (5, 5, 1, 6) and shapes["conv2"]["kernel"] == (5, 5, 6, 16)
  assert shapes["fc1"]["kernel"] == (256, 120) and shapes["bn3"]["scale"] == (120,)
  logits = LeNet(norm=norm).apply(variables, jnp.zeros((3, 28, 28, 1)), train=False)
  assert logits.shape == (3, 10)


def test_ours_and_flax_share_one_variable_layout():
  ours = init_lenet(LeNet(norm="ours"), jax.random.key(0))
  theirs = init_lenet(LeNet(norm="flax"), jax.random.key(0))
  assert jax.tree_util.tree_structure(ours) == jax.tree_util.tree_structure(theirs)
  x = np.random.default_rng(0).uniform(0, 1, (32, 28, 28, 1)).astype(np.float32)
  assert_trees_close(LeNet(norm="ours").apply(ours, x, train=False), LeNet(norm="flax").apply(ours, x, train=False))


def test_plain_lenet_has_no_batch_stats():
  variables = init_lenet(LeNet(norm="none"), jax.random.key(0))
  assert "batch_stats" not in variables and count(variables["params"]) == CONV_DENSE


def test_xavier_uniform_weights_and_zero_biases():
  params = init_lenet(LeNet(), jax.random.key(0))["params"]
  k = np.asarray(params["fc1"]["kernel"])
  limit = np.sqrt(6.0 / (256 + 120))
  assert np.abs(k).max() <= limit and np.abs(k).max() > 0.9 * limit
  np.testing.assert_array_equal(params["fc1"]["bias"], 0.0)


def test_conv_implementations_agree_with_flax_conv(rng):
  x = rng.standard_normal((4, 12, 12, 6)).astype(np.float32)
  flax_conv = nn.Conv(16, (5, 5), padding="VALID")
  variables = flax_conv.init(jax.random.key(0), x)
  expected = flax_conv.apply(variables, x)
  for impl in ("xla", "im2col", "auto"):
    assert_trees_close(Conv(16, (5, 5), impl=impl).apply(variables, x), expected, "framework")
  grads = [
    jax.grad(lambda k, impl=impl: jnp.sum(conv2d_valid(x, k, impl) ** 2))(variables["params"]["kernel"])
    for impl in ("xla", "im2col")
  ]
  assert_trees_close(grads[1], grads[0], "framework")


@pytest.mark.parametrize(
  "make,pattern",
  [
    (lambda: init_lenet(LeNet(norm="batch"), jax.random.key(0)), r"`norm` is 'batch'"),
    (lambda: init_lenet(LeNet(norm="flax", unbiased_running_var=True), jax.random.key(0)), r"needs norm='ours'"),
    (lambda: LeNet().init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False), r"\(N, 28, 28, 1\)"),
    (lambda: conv2d_valid(jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 3, 1, 1)), "fft"), r"`impl` is 'fft'"),
  ],
)
def test_bad_configuration_is_rejected_clearly(make, pattern):
  with pytest.raises(ValueError, match=pattern):
    make()


# --- the NNX twin ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["ours", "flax", "none"])
def test_nnx_lenet_has_linen_lenets_variables_and_logits(rng, norm):
  from flax import nnx

  from experiments.lenet_fmnist.models import NNXLeNet, lenet_from_nnx, lenet_to_nnx

  linen_vars = init_lenet(LeNet(norm=norm), jax.random.key(0))
  model = NNXLeNet(norm, rngs=nnx.Rngs(1))
  assert jax.tree.map(jnp.shape, lenet_from_nnx(model)) == jax.tree.map(jnp.shape, linen_vars)
  lenet_to_nnx(model, linen_vars)
  assert_trees_close(lenet_from_nnx(model), linen_vars)
  x = jnp.asarray(rng.random((8, 28, 28, 1), np.float32))
  model.eval()
  assert_trees_close(model(x), LeNet(norm=norm).apply(linen_vars, x, train=False))
  model.train()
  want, _ = LeNet(norm=norm).apply(linen_vars, x, train=True, mutable=["batch_stats"])
  assert_trees_close(model(x), want)


def test_nnx_lenet_trained_by_nnx_optimizer_follows_the_linen_run(rng):
  import optax
  from flax import nnx

  from experiments.lenet_fmnist import train
  from experiments.lenet_fmnist.models import NNXLeNet, lenet_from_nnx, lenet_to_nnx

  state = new_state(LeNet(), jax.random.key(0), 1.0)
  model = lenet_to_nnx(NNXLeNet(rngs=nnx.Rngs(0)), {"params": state.params, "batch_stats": state.batch_stats})
  optimizer = nnx.Optimizer(model, optax.sgd(1.0), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer, x, y):
    def loss_fn(model):
      return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  linen_step = jax.jit(train.train_step)
  for _ in range(5):  # the parity suite's trajectory: 5 SGD steps at the chapter's lr 1.0
    x = jnp.asarray(rng.random((32, 28, 28, 1), np.float32))
    y = jnp.asarray(rng.integers(0, 10, 32).astype(np.int32))
    loss = nnx_step(model, optimizer, x, y)
    state, metrics = linen_step(state, x, y)
    assert_trees_close(loss, metrics["loss_sum"] / 32, "trajectory")
  assert_trees_close(lenet_from_nnx(model), {"params": state.params, "batch_stats": state.batch_stats}, "trajectory")
