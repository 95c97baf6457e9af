"""The chapter's LeNet: layers, shapes, parameter counts, selectable normalization."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.lenet_fmnist.conv import IMPLS, LAYOUTS, Conv, conv2d_valid, native_layout, resolve_impl
from experiments.lenet_fmnist.models import LeNet, fold_lenet, init_lenet
from tests.experiments.helpers import new_state
from tests.helpers import random_bn
from tests.tolerance import assert_trees_close


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


@pytest.mark.parametrize("cin,cout", [(1, 6), (6, 16)])  # LeNet's conv1 and conv2
@pytest.mark.parametrize("impl", [pytest.param(i, marks=() if i == "lanes" else pytest.mark.slow) for i in IMPLS])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_conv_implementation_in_either_layout_is_flax_conv_with_its_gradients(rng, impl, layout, cin, cout):
  x = rng.standard_normal((4, 12, 12, cin)).astype(np.float32)
  dy = rng.standard_normal((4, 8, 8, cout)).astype(np.float32)
  flax_conv = nn.Conv(cout, (5, 5), padding="VALID")
  variables = flax_conv.init(jax.random.key(0), x)
  expected, flax_vjp = jax.vjp(lambda v, x: flax_conv.apply(v, x), variables, x)
  to = (lambda a: np.transpose(a, (3, 1, 2, 0))) if layout == "CHWN" else (lambda a: a)
  ours = Conv(cout, (5, 5), impl=impl, layout=layout)
  got, our_vjp = jax.vjp(lambda v, x: ours.apply(v, x), variables, jnp.asarray(to(x)))
  assert_trees_close(to(np.asarray(got)), expected, "framework")
  (grads, dx), (want_grads, want_dx) = our_vjp(jnp.asarray(to(dy))), flax_vjp(jnp.asarray(dy))
  assert_trees_close(grads, want_grads, "framework")
  assert_trees_close(to(np.asarray(dx)), want_dx, "framework")


@pytest.mark.parametrize("cin", [1, 3])
@pytest.mark.parametrize("kernel_size,image,cout", [((5, 5), (28, 28), 6), ((3, 2), (7, 9), 4)])
def test_lanes_conv_is_xla_conv_with_its_gradients_under_jit_and_vmap(rng, kernel_size, image, cout, cin):
  """The "lanes" convolution has VJPs of its own (one input channel: the direct sum, a row-by-row kernel
  gradient; more: the planes' product, an input gradient by kernel rows): values and both gradients are
  XLA's convolution's, jitted and mapped over a leading axis."""
  kh, kw = kernel_size
  x = jnp.asarray(rng.standard_normal((3, cin, *image, 8)).astype(np.float32))  # 3 CHWN batches of 8
  kernel = jnp.asarray(rng.standard_normal((kh, kw, cin, cout)).astype(np.float32))
  # Cotangents of a mean loss's size: the kernel gradient sums ~5000 of their products, O(1) in the end.
  dy = jnp.asarray(0.01 * rng.standard_normal((3, cout, image[0] - kh + 1, image[1] - kw + 1, 8)).astype(np.float32))

  def vjp(impl):
    def one(x, dy):
      y, pullback = jax.vjp(lambda x, k: conv2d_valid(x, k, impl, "highest", "CHWN"), x, kernel)
      return y, pullback(dy)

    return jax.jit(jax.vmap(one))(x, dy)

  assert_trees_close(vjp("lanes"), vjp("xla"), "framework")


@pytest.mark.parametrize("cin", [1, 2])
@pytest.mark.parametrize("x_dtype", [jnp.float32, jnp.bfloat16])
def test_lanes_conv_gradients_eagerly_and_in_mixed_precision(rng, x_dtype, cin):
  """Not jitted, batch 1, one output channel; a bfloat16 input with a float32 kernel gets float32
  gradients computed from the float32 cotangent, as JAX's autodiff of XLA's convolution gives them."""
  x = jnp.asarray(rng.uniform(0, 1, (cin, 6, 7, 1)), x_dtype)
  kernel = jnp.asarray(rng.standard_normal((5, 3, cin, 1)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((1, 2, 5, 1)), jnp.float32)

  def vjp(impl, cast):  # XLA's convolution takes one dtype: the reference casts the input to float32 first
    y, pullback = jax.vjp(lambda x, k: conv2d_valid(cast(x), k, impl, "highest", "CHWN"), x, kernel)
    return y, pullback(dy)

  got, want = vjp("lanes", lambda x: x), vjp("xla", lambda x: x.astype(jnp.float32))
  assert jax.tree.map(lambda a: a.dtype, got) == jax.tree.map(lambda a: a.dtype, want)
  assert_trees_close(got, want, "framework" if x_dtype == jnp.float32 else "half")
  assert_trees_close(got[1][1], want[1][1], "framework")  # the kernel's gradient: float32 either way


@pytest.mark.parametrize("cin", [1, 2])
def test_lanes_conv_gradient_inside_shard_map(rng, cin):
  """A kernel replicated over a mesh, the batch split: the custom VJPs' kernel gradients are summed over
  the shards (taken outside ``shard_map``, as the training step does, and inside it)."""
  from jax.sharding import PartitionSpec as P

  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices("cpu")[:2])
  x = jnp.asarray(rng.uniform(0, 1, (cin, 12, 12, 8)), jnp.float32)  # CHWN, the batch split in two
  kernel = jnp.asarray(rng.standard_normal((5, 5, cin, 3)), jnp.float32)
  dy = jnp.asarray(rng.standard_normal((3, 8, 8, 8)), jnp.float32)
  split = P(None, None, None, "data")
  x, dy = (jax.device_put(a, jax.sharding.NamedSharding(mesh, split)) for a in (x, dy))
  kernel = jax.device_put(kernel, jax.sharding.NamedSharding(mesh, P()))

  def outside(impl):
    def local(kernel, x, dy):
      return jax.lax.psum(jnp.vdot(conv2d_valid(x, kernel, impl, "highest", "CHWN"), dy), "data")

    loss = jax.shard_map(local, mesh=mesh, in_specs=(P(), split, split), out_specs=P())
    return jax.jit(jax.grad(loss, argnums=(0, 1)))(kernel, x, dy)

  def inside(impl):
    def local(kernel, x, dy):
      grad = jax.grad(lambda k: jnp.vdot(conv2d_valid(x, k, impl, "highest", "CHWN"), dy))(kernel)
      return jax.lax.psum(grad, "data")

    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), split, split), out_specs=P()))(kernel, x, dy)

  assert_trees_close(outside("lanes"), outside("xla"), "framework")
  assert_trees_close(inside("lanes"), inside("xla"), "framework")


def test_one_input_channel_lanes_conv_accumulates_half_precision_in_float32(rng):
  x = rng.uniform(0, 1, (1, 28, 28, 16)).astype(np.float32)  # CHWN
  kernel = rng.standard_normal((5, 5, 1, 6)).astype(np.float32)
  half = conv2d_valid(jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16), "lanes", layout="CHWN")
  exact = conv2d_valid(
    jnp.asarray(x, jnp.bfloat16).astype(jnp.float32),
    jnp.asarray(kernel, jnp.bfloat16).astype(jnp.float32),
    "xla",
    "highest",
    "CHWN",
  )
  assert half.dtype == jnp.bfloat16
  # One rounding of a float32 sum to bfloat16 (within one bfloat16 unit), not 25 roundings of partial sums.
  np.testing.assert_allclose(np.asarray(half, np.float32), np.asarray(exact, np.float32), rtol=2**-7, atol=1e-6)


def test_auto_is_lanes_on_cpu_and_xla_elsewhere():
  assert resolve_impl("auto") == ("lanes" if jax.default_backend() == "cpu" else "xla")
  assert native_layout("lanes") == "CHWN" and native_layout("im2col") == native_layout("xla") == "NHWC"


@pytest.mark.slow
@pytest.mark.parametrize("norm", ["ours", "flax", "none"])
def test_lenet_computes_the_same_in_every_conv_implementation(rng, norm):
  """Logits, gradients and new running statistics, in training mode with padded (masked) examples."""
  x = jnp.asarray(rng.random((16, 28, 28, 1), np.float32))
  y = jnp.asarray(rng.integers(0, 10, 16).astype(np.int32))
  mask = jnp.arange(16) < 13
  variables = init_lenet(LeNet(norm=norm), jax.random.key(0))

  def loss(params, impl):
    model = LeNet(norm=norm, conv_impl=impl)
    logits, stats = model.apply(
      {**variables, "params": params}, x, train=True, mask=None if norm == "none" else mask, mutable=["batch_stats"]
    )
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
    return jnp.sum(jnp.where(mask, losses, 0.0)) / jnp.sum(mask), (logits, stats)  # the training loss

  results = {impl: jax.grad(loss, has_aux=True)(variables["params"], impl) for impl in ("xla", "im2col", "lanes")}
  for impl in ("im2col", "lanes"):
    assert_trees_close(results[impl], results["xla"], "framework")
    evaluated = LeNet(norm=norm, conv_impl=impl).apply(variables, x, train=False)
    assert_trees_close(evaluated, LeNet(norm=norm, conv_impl="xla").apply(variables, x, train=False), "framework")


@pytest.mark.parametrize(
  "make,pattern",
  [
    (lambda: init_lenet(LeNet(norm="batch"), jax.random.key(0)), r"`norm` is 'batch'"),
    (lambda: init_lenet(LeNet(norm="flax", unbiased_running_var=True), jax.random.key(0)), r"needs norm='ours'"),
    (lambda: LeNet().init(jax.random.key(0), jnp.zeros((2, 32, 32, 3)), train=False), r"\(N, 28, 28, 1\)"),
    (lambda: conv2d_valid(jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 3, 1, 1)), "fft"), r"`impl` is 'fft'"),
    (lambda: conv2d_valid(jnp.zeros((1, 8, 8, 1)), jnp.zeros((3, 3, 1, 1)), layout="NCHW"), r"`layout` is 'NCHW'"),
    (
      lambda: conv2d_valid(jnp.zeros((3, 8, 8, 2)), jnp.zeros((3, 3, 1, 4)), "lanes", layout="CHWN"),
      r"has 3 channels.*expects 1",
    ),
    (lambda: conv2d_valid(jnp.zeros((1, 4, 8, 1)), jnp.zeros((5, 5, 1, 6)), "lanes"), r"5x5, larger than the 4x8"),
  ],
)
def test_bad_configuration_is_rejected_clearly(make, pattern):
  with pytest.raises(ValueError, match=pattern):
    make()


# --- the NNX twin ----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["ours", "flax", "none"])
def test_nnx_lenet_has_linen_lenets_variables_and_logits(rng, norm):
  from flax import nnx

  from experiments.lenet_fmnist.models_nnx import NNXLeNet, lenet_from_nnx, lenet_to_nnx

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


@pytest.mark.slow
def test_nnx_lenet_trained_by_nnx_optimizer_follows_the_linen_run(rng):
  import optax
  from flax import nnx

  from experiments.lenet_fmnist import train
  from experiments.lenet_fmnist.models_nnx import NNXLeNet, lenet_from_nnx, lenet_to_nnx

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


# --- folding BN LeNet (models.fold_lenet, over bnjax.fold_batch_norm) -----------------------------------


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


def test_folding_plain_lenet_variables_is_refused():
  plain = init_lenet(LeNet(norm="none"), jax.random.key(0))
  with pytest.raises(ValueError, match="plain LeNet variables, nothing to fold"):
    fold_lenet(plain)
