"""`bnjax.precise_batch_stats`: population statistics of every BN layer's input, checked against NumPy."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bnjax
from tests.helpers import CNN_IMAGE, TinyCNN, channel_axis, init_cnn
from tests.tolerance import assert_trees_close, max_abs_diff


class TwoLayer(nn.Module):
  """Dense -> bnjax.BatchNorm -> relu -> Dense -> flax.linen.BatchNorm (nested in a block), the second BN shared."""

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    h1 = nn.Dense(5, name="fc1")(x)
    y = nn.relu(bnjax.BatchNorm(use_running_average=not train, momentum=0.9, name="bn1")(h1, mask=mask))
    return Block(name="block")(y, train, mask)


class Block(nn.Module):
  @nn.compact
  def __call__(self, y, train, mask):
    h2 = nn.Dense(3, name="fc2")(y)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, name="bn2")(h2, mask=mask)


def numpy_reference(variables, batches, masks):
  """The two layers' inputs, batch by batch (training-mode forward), then their population mean/var."""
  p = jax.tree.map(np.asarray, variables["params"])
  h1s, h2s = [], []
  for x, m in zip(batches, masks, strict=True):
    x = np.asarray(x, np.float64)
    h1 = x @ p["fc1"]["kernel"] + p["fc1"]["bias"]
    valid = h1[m]
    y = (h1 - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-5) * p["bn1"]["scale"] + p["bn1"]["bias"]
    h2 = np.maximum(y, 0) @ p["block"]["fc2"]["kernel"] + p["block"]["fc2"]["bias"]
    h1s.append(h1[m])
    h2s.append(h2[m])
  h1, h2 = np.concatenate(h1s), np.concatenate(h2s)
  return {"bn1": {"mean": h1.mean(0), "var": h1.var(0)}, "block": {"bn2": {"mean": h2.mean(0), "var": h2.var(0)}}}


def two_layer_case(rng, n_batches=4, batch=16):
  model = TwoLayer()
  variables = model.init(jax.random.key(0), jnp.zeros((2, 7)), train=False)
  batches = [(3.0 + 2.0 * rng.standard_normal((batch, 7))).astype(np.float32) for _ in range(n_batches)]
  return model, variables, batches


def test_two_layer_model_matches_numpy(rng):
  model, variables, batches = two_layer_case(rng)
  out = bnjax.precise_batch_stats(model.apply, variables, batches, model_kwargs={"train": True})
  expected = numpy_reference(variables, batches, [np.ones(16, bool)] * 4)
  assert_trees_close(out["batch_stats"], expected, "framework")
  assert_trees_close(out["params"], variables["params"])  # the weights are frozen


def test_an_array_of_batches_and_a_batch_count(rng):
  model, variables, batches = two_layer_case(rng, n_batches=5)
  stacked = jnp.stack(batches)
  out = bnjax.precise_batch_stats(model.apply, variables, stacked, num_batches=3, model_kwargs={"train": True})
  expected = numpy_reference(variables, batches[:3], [np.ones(16, bool)] * 3)
  assert_trees_close(out["batch_stats"], expected, "framework")


def test_masked_examples_are_left_out(rng):
  model, variables, batches = two_layer_case(rng, n_batches=3)
  masks = [rng.random(16) < 0.6 for _ in batches]
  pairs = [(x, jnp.asarray(m)[:, None]) for x, m in zip(batches, masks, strict=True)]
  out = bnjax.precise_batch_stats(model.apply, variables, pairs, model_kwargs={"train": True})
  assert_trees_close(out["batch_stats"], numpy_reference(variables, batches, masks), "framework")


class ChannelsFirstBN(nn.Module):
  """One bnjax.BatchNorm over CHWN activations (features first, examples last), as LeNet's lanes layout has them."""

  @nn.compact
  def __call__(self, x, train: bool, mask=None):
    return bnjax.BatchNorm(use_running_average=not train, axis=0, name="bn")(x, mask=mask)


def test_a_per_example_mask_of_chwn_inputs_needs_no_check_and_gives_the_full_masks_moments(rng):
  """As in training (tests/test_functional.py), a per-example mask of CHWN inputs cannot vary along H, where the
  shift is sampled: the moments' program carries no check (no ``cond``), where the same mask at full size does,
  and both give the valid examples' moments."""
  x = (3.0 + rng.standard_normal((6, 24, 24, 32))).astype(np.float32)
  keep = np.arange(32) < 20
  x[..., ~keep] = np.inf  # padding, which must reach nothing
  model = ChannelsFirstBN()
  variables = model.init(jax.random.key(0), x, train=False)

  def moments(mask):
    return bnjax.precise.batch_moments_by_layer(model.apply, variables, x, mask, train=True)["bn"]

  def conds(mask):
    return str(jax.make_jaxpr(moments)(mask)).count("cond[")

  given, full = keep[None, None, None, :], np.broadcast_to(keep, x.shape)
  assert conds(given) == 0 and conds(full) > 0
  got, expected = moments(given), moments(full)
  assert_trees_close((got.count, got.mean, got.m2), (expected.count, expected.mean, expected.m2))
  valid = x[..., keep].astype(np.float64)
  mean = valid.mean(axis=(1, 2, 3))
  assert_trees_close((got.mean, got.m2 / got.count), (mean, valid.var(axis=(1, 2, 3))), "framework")


def test_a_shared_layer_pools_all_its_calls(rng):
  class Shared(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      bn = bnjax.BatchNorm(use_running_average=not train, name="bn")
      return bn(bn(x) * 3.0 + 1.0)

  x = (1.0 + rng.standard_normal((32, 4))).astype(np.float32)
  variables = Shared().init(jax.random.key(0), x, train=False)
  out = bnjax.precise_batch_stats(Shared().apply, variables, [x], model_kwargs={"train": True})
  first = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5) * 3.0 + 1.0
  both = np.concatenate([x, first]).astype(np.float64)
  assert_trees_close(out["batch_stats"]["bn"], {"mean": both.mean(0), "var": both.var(0)}, "framework")


@pytest.mark.parametrize("norm", ["ours", pytest.param("flax", marks=pytest.mark.slow)])
@pytest.mark.parametrize("layout", ["NHWC", "CHWN"])  # features last, or first (LeNet's conv_impl="lanes")
def test_cnn_statistics_are_the_population_statistics_of_each_layer_input(rng, norm, layout):
  model = TinyCNN(norm=norm, layout=layout)
  variables = init_cnn(model, jax.random.key(0))
  batches = [jnp.asarray(rng.random((32, *CNN_IMAGE), np.float32)) for _ in range(3)]
  out = bnjax.precise_batch_stats(model.apply, variables, batches, model_kwargs={"train": True})
  # Each BN layer's input is the output of the layer before it, captured in the same training-mode pass.
  inputs = {"bn1": "conv1", "bn2": "conv2", "bn3": "fc1", "bn4": "fc2"}
  captured = {bn: [] for bn in inputs}
  for x in batches:
    _, state = model.apply(
      variables, x, train=True, mutable=["batch_stats", "intermediates"], capture_intermediates=True
    )
    for bn, layer in inputs.items():
      h = np.asarray(state["intermediates"][layer]["__call__"][0], np.float64)
      h = np.moveaxis(h, channel_axis(layout), -1) if h.ndim == 4 else h
      captured[bn].append(h.reshape(-1, h.shape[-1]))
  for bn, hs in captured.items():
    h = np.concatenate(hs)
    assert_trees_close(out["batch_stats"][bn], {"mean": h.mean(0), "var": h.var(0)}, "framework")


def test_clear_errors(rng):
  model, variables, batches = two_layer_case(rng)
  with pytest.raises(ValueError, match=r"`batches` yielded no batch"):
    bnjax.precise_batch_stats(model.apply, variables, [], model_kwargs={"train": True})
  plain = nn.Dense(3)
  with pytest.raises(ValueError, match=r"called no bnjax.BatchNorm or flax.linen.BatchNorm layer"):
    bnjax.precise_batch_stats(plain.apply, plain.init(jax.random.key(0), batches[0]), batches)
  with pytest.raises(ValueError, match=r"a batch is an array or a pair \(inputs, mask\)"):
    bnjax.precise_batch_stats(model.apply, variables, [(batches[0], None, 1)], model_kwargs={"train": True})


def test_a_ghost_bn_layer_gets_the_pooled_within_group_variance_it_trains_with(rng):
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=True):
      return bnjax.BatchNorm(use_running_average=not train, virtual_batch_size=4)(x)

  net = Net()
  batches = rng.normal(size=(3, 16, 5)).astype(np.float32) + np.arange(4).repeat(4)[None, :, None]
  variables = net.init(jax.random.key(0), batches[0])
  stats = bnjax.precise_batch_stats(net.apply, variables, batches, model_kwargs={"train": True})["batch_stats"]
  groups = batches.reshape(-1, 4, 5).astype(np.float64)  # every group of 4 of every batch
  pooled = ((groups - groups.mean(1, keepdims=True)) ** 2).sum((0, 1)) / (groups.shape[0] * 4)
  key = next(iter(stats))
  assert_trees_close((stats[key]["mean"], stats[key]["var"]), (batches.reshape(-1, 5).mean(0), pooled))


@pytest.mark.parametrize("num_batches", [-3, 0, 1.5, True])
def test_num_batches_must_be_a_positive_int(num_batches):
  model = TinyCNN("ours")
  variables = init_cnn(model, jax.random.key(0))
  with pytest.raises(ValueError, match=r"`num_batches` is .*, but should be a positive int"):
    bnjax.precise_batch_stats(model.apply, variables, jnp.zeros((2, 4, *CNN_IMAGE)), num_batches)


# --- models beyond a plain stack of layers: frozen layers, lifted transforms, dropout (issue 26) ----------


FROZEN_LAYERS = {
  "bnjax_use_running_average": lambda: bnjax.BatchNorm(use_running_average=True, name="frozen"),
  "flax_use_running_average": lambda: nn.BatchNorm(use_running_average=True, name="frozen"),
  "bnjax_update_stats_false": lambda: bnjax.BatchNorm(use_running_average=False, update_stats=False, name="frozen"),
}


@pytest.mark.parametrize("frozen", list(FROZEN_LAYERS))
def test_a_frozen_layer_keeps_its_statistics_and_the_next_layer_gets_those_of_its_output(rng, frozen):
  class FineTuned(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
      h = FROZEN_LAYERS[frozen]()(x)
      return bnjax.BatchNorm(use_running_average=not train, name="trained")(nn.Dense(3, name="fc")(h))

  model = FineTuned()
  variables = model.init(jax.random.key(0), jnp.zeros((2, 4)), train=False)
  frozen_stats = {"mean": jnp.array([1.0, -2.0, 0.5, 3.0]), "var": jnp.array([4.0, 1.0, 9.0, 0.25])}
  variables = {**variables, "batch_stats": {**variables["batch_stats"], "frozen": frozen_stats}}
  batches = (3.0 + 2.0 * rng.standard_normal((3, 16, 4))).astype(np.float32)
  out = bnjax.precise_batch_stats(model.apply, variables, batches, model_kwargs={"train": True})
  assert_trees_close(out["batch_stats"]["frozen"], frozen_stats)
  if frozen == "bnjax_update_stats_false":  # normalizes by each batch's own statistics, as in training
    x = batches.astype(np.float64)
    h = (x - x.mean(1, keepdims=True)) / np.sqrt(x.var(1, keepdims=True) + 1e-5)
  else:  # normalizes by the statistics it keeps
    h = (batches - np.asarray(frozen_stats["mean"])) / np.sqrt(np.asarray(frozen_stats["var"]) + 1e-5)
  fc = jax.tree.map(np.asarray, variables["params"]["fc"])
  fc_out = (h @ fc["kernel"] + fc["bias"]).reshape(-1, 3)
  assert_trees_close(out["batch_stats"]["trained"], {"mean": fc_out.mean(0), "var": fc_out.var(0)}, "framework")


def test_a_layer_in_training_mode_only_through_a_traced_flag_is_recomputed_only_when_training(rng):
  class Traced(nn.Module):
    @nn.compact
    def __call__(self, x, train: jax.Array):
      return bnjax.BatchNorm(name="bn")(x, use_running_average=jnp.logical_not(train))

  model = Traced()
  x = (3.0 + 2.0 * rng.standard_normal((16, 4))).astype(np.float32)
  variables = model.init(jax.random.key(0), x, train=jnp.array(False))
  training = bnjax.precise_batch_stats(model.apply, variables, [x], model_kwargs={"train": jnp.array(True)})
  assert_trees_close(training["batch_stats"]["bn"], {"mean": x.mean(0), "var": x.var(0)}, "framework")
  evaluating = bnjax.precise_batch_stats(model.apply, variables, [x], model_kwargs={"train": jnp.array(False)})
  assert_trees_close(evaluating["batch_stats"], variables["batch_stats"])


def test_a_model_without_a_layer_in_training_mode_is_an_error_that_names_model_kwargs(rng):
  model, variables, batches = two_layer_case(rng)
  with pytest.raises(
    ValueError, match=r"no bnjax.BatchNorm or flax.linen.BatchNorm layer in training mode.*`model_kwargs`"
  ):
    bnjax.precise_batch_stats(model.apply, variables, batches, model_kwargs={"train": False})


class DenseBlock(nn.Module):
  """Dense -> bnjax.BatchNorm -> relu, in the (carry, x) form nn.scan wants."""

  @nn.compact
  def __call__(self, h, _=None):
    return nn.relu(bnjax.BatchNorm(use_running_average=False, name="bn")(nn.Dense(4, name="fc")(h))), None


class Unrolled(nn.Module):
  """Three blocks one after the other, or (`parallel`) each on the input."""

  parallel: bool = False

  @nn.compact
  def __call__(self, x):
    outputs = [x]
    for i in range(3):
      outputs.append(DenseBlock(name=f"block{i}")(outputs[0 if self.parallel else -1])[0])
    return outputs[-1]


class Lifted(nn.Module):
  transform: str

  @nn.compact
  def __call__(self, x):
    if self.transform == "remat":
      for i in range(3):
        x, _ = nn.remat(DenseBlock)(name=f"block{i}")(x)
      return x
    if self.transform == "vmap":
      vmap = nn.vmap(
        DenseBlock,
        variable_axes={"params": 0, "batch_stats": 0},
        split_rngs={"params": True},
        in_axes=(None, None),
        axis_size=3,
      )
      return vmap(name="blocks")(x, None)[0]
    block = nn.remat(DenseBlock) if self.transform == "scan_of_remat" else DenseBlock
    scan = nn.scan(block, variable_axes={"params": 0, "batch_stats": 0}, split_rngs={"params": True}, length=3)
    return scan(name="blocks")(x, None)[0]


def unrolled_variables(lifted_variables, transform):
  """The same weights and statistics as an `Unrolled` model's: scanned or mapped leaves split along their first axis."""
  if transform == "remat":
    return lifted_variables
  return {
    col: {f"block{i}": jax.tree.map(lambda a, i=i: a[i], tree["blocks"]) for i in range(3)}
    for col, tree in lifted_variables.items()
  }


@pytest.mark.parametrize("transform", ["remat", "scan", "scan_of_remat", "vmap"])
def test_layers_under_remat_scan_and_vmap_get_the_statistics_of_the_unrolled_model(rng, transform):
  model = Lifted(transform)
  variables = model.init(jax.random.key(0), jnp.zeros((2, 4)))
  batches = (1.0 + rng.standard_normal((3, 16, 4))).astype(np.float32)
  out = bnjax.precise_batch_stats(model.apply, variables, batches)
  unrolled_model = Unrolled(parallel=transform == "vmap")
  unrolled = bnjax.precise_batch_stats(unrolled_model.apply, unrolled_variables(variables, transform), batches)
  assert_trees_close(unrolled_variables(out, transform), unrolled)
  assert max_abs_diff(out["batch_stats"], variables["batch_stats"]) > 0.1  # recomputed, not left at 0 and 1


class Dropped(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    h = nn.Dropout(0.5, deterministic=not train)(x)
    return bnjax.BatchNorm(use_running_average=not train, name="bn")(h)


def test_rngs_in_model_kwargs_give_batch_i_the_streams_folded_with_i(rng):
  model = Dropped()
  batches = (2.0 + rng.standard_normal((3, 32, 4))).astype(np.float32)
  variables = model.init(jax.random.key(0), batches[0], train=False)
  key = jax.random.key(7)
  kwargs = {"train": True, "rngs": {"dropout": key}}
  from_iterable = bnjax.precise_batch_stats(model.apply, variables, list(batches), model_kwargs=kwargs)
  from_array = bnjax.precise_batch_stats(model.apply, variables, batches, model_kwargs=kwargs)
  inputs = []
  for i, x in enumerate(batches):  # the BN layer's input: the model's dropout output with fold_in(key, i)
    rngs = {"dropout": jax.random.fold_in(key, i)}
    _, state = model.apply(
      variables, x, True, rngs=rngs, mutable=["batch_stats", "intermediates"], capture_intermediates=True
    )
    inputs.append(np.asarray(state["intermediates"]["Dropout_0"]["__call__"][0], np.float64))
  h = np.concatenate(inputs)
  assert (h == 0).mean() > 0.3  # dropout did run
  expected = {"bn": {"mean": h.mean(0), "var": h.var(0)}}
  assert_trees_close(from_iterable["batch_stats"], expected, "framework")
  assert_trees_close(from_array["batch_stats"], expected, "framework")


def test_a_model_kwarg_that_is_neither_hashable_nor_arrays_is_named(rng):
  model, variables, batches = two_layer_case(rng)
  with pytest.raises(TypeError, match=r"`model_kwargs\['train'\]` is a list"):
    bnjax.precise_batch_stats(model.apply, variables, batches, model_kwargs={"train": [True]})
