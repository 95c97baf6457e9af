"""`bnjax.nnx.BatchNorm` is a drop-in for `flax.nnx.BatchNorm`, and computes what the linen module computes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bnjax
from bnjax.nnx import BatchNorm
from tests.tolerance import assert_trees_close


def test_state_graphdef_and_parameter_count_look_like_flax():
  ours, theirs = BatchNorm(6, rngs=nnx.Rngs(0)), nnx.BatchNorm(6, rngs=nnx.Rngs(0))
  shapes = lambda m: jax.tree.map(lambda v: (v.shape, v.dtype), nnx.state(m))  # noqa: E731
  assert shapes(ours) == shapes(theirs)
  for cls in (nnx.Param, nnx.BatchStat):
    assert set(nnx.state(ours, cls).keys()) == set(nnx.state(theirs, cls).keys())
  assert nnx.state(ours, nnx.BatchStat)["mean"][...].dtype == jnp.float32
  # initializers are used, not stored: two layers with different ones share a graphdef
  other = BatchNorm(6, scale_init=nnx.initializers.constant(2.0), rngs=nnx.Rngs(1))
  assert nnx.graphdef(other) == nnx.graphdef(ours)
  np.testing.assert_array_equal(other.scale[...], 2.0)


def test_a_flax_nnx_checkpoint_loads_unchanged_and_gives_flax_numbers(rng):
  x = (3.0 + 2.0 * rng.standard_normal((16, 5))).astype(np.float32)
  theirs = nnx.BatchNorm(5, momentum=0.9, use_fast_variance=False, rngs=nnx.Rngs(0))
  theirs.scale[...] = jnp.linspace(0.5, 1.5, 5)
  theirs(x)  # one training step so the statistics are not the initial ones
  ours = BatchNorm(5, momentum=0.9, rngs=nnx.Rngs(1))
  nnx.update(ours, nnx.state(theirs))
  for _ in range(3):
    assert_trees_close(ours(x), theirs(x))
    assert_trees_close(nnx.state(ours), nnx.state(theirs))
    x = x * 1.1 + 0.2
  ours.eval(), theirs.eval()
  assert_trees_close(ours(x), theirs(x))


def test_train_eval_and_view_toggle_the_mode(rng):
  x = rng.standard_normal((8, 3)).astype(np.float32)
  layer = BatchNorm(3, rngs=nnx.Rngs(0))
  before = nnx.clone(nnx.state(layer, nnx.BatchStat))
  layer(x)  # default: training, like Flax's
  after = nnx.state(layer, nnx.BatchStat)
  assert not np.allclose(after["mean"][...], before["mean"][...])
  frozen = nnx.view(layer, use_running_average=True)
  frozen(x)
  assert_trees_close(nnx.state(layer, nnx.BatchStat), after)
  layer.eval()
  assert layer.use_running_average is True
  layer(x)
  assert_trees_close(nnx.state(layer, nnx.BatchStat), after)
  layer.train()
  assert layer.use_running_average is False
  with pytest.raises(TypeError, match=r"`use_running_average` is 'yes' \(str\)"):
    layer(x, use_running_average="yes")
  with pytest.raises(ValueError, match=r"No `use_running_average`.*model.train\(\)"):
    BatchNorm(3, use_running_average=None, rngs=nnx.Rngs(0))(x)
  with pytest.raises(ValueError, match=r"3 features on axis -1, but .*num_features=4"):
    BatchNorm(4, rngs=nnx.Rngs(0))(x)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float16])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("fast", [False, True])
def test_linen_and_nnx_modules_agree_bit_for_bit(rng, dtype, masked, fast):
  x = jnp.asarray((1.0 + 2.0 * rng.standard_normal((12, 4, 4, 3))).astype(np.float32), dtype)
  mask = jnp.asarray(rng.random((12, 1, 1, 1)) < 0.7) if masked else None
  linen = bnjax.BatchNorm(momentum=0.8, use_fast_variance=fast)
  variables = linen.init(jax.random.key(0), x, use_running_average=False)
  layer = BatchNorm(3, momentum=0.8, use_fast_variance=fast, rngs=nnx.Rngs(0))
  for _ in range(2):
    y_l, upd = linen.apply(variables, x, use_running_average=False, mask=mask, mutable=["batch_stats"])
    variables = {**variables, **upd}
    y_n = layer(x, mask=mask)
    assert y_l.dtype == y_n.dtype
    np.testing.assert_array_equal(np.asarray(y_n), np.asarray(y_l))
    np.testing.assert_array_equal(layer.mean[...], variables["batch_stats"]["mean"])
    np.testing.assert_array_equal(layer.var[...], variables["batch_stats"]["var"])
  np.testing.assert_array_equal(
    np.asarray(layer(x, use_running_average=True)), np.asarray(linen.apply(variables, x, use_running_average=True))
  )


class MLP(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(4, 8, rngs=rngs)
    self.bn = BatchNorm(8, momentum=0.9, rngs=rngs)
    self.out = nnx.Linear(8, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.bn(self.dense(x))))


def test_an_optimizer_step_under_nnx_jit_updates_statistics_in_place(rng):
  model = MLP(nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
  x, y = rng.standard_normal((32, 4)).astype(np.float32), rng.standard_normal((32, 1)).astype(np.float32)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
    optimizer.update(model, grads)
    return loss

  stats0 = nnx.clone(nnx.state(model, nnx.BatchStat))
  losses = [float(step(model, optimizer, x, y)) for _ in range(5)]
  assert losses[-1] < losses[0]
  assert not np.allclose(nnx.state(model, nnx.BatchStat)["bn"]["mean"][...], stats0["bn"]["mean"][...])


def test_nnx_vmap_with_axis_name_equals_the_whole_batch(rng):
  x = (2.0 + rng.standard_normal((4, 8, 3))).astype(np.float32)  # 4 "devices" x 8 examples
  layer = BatchNorm(3, momentum=0.0, axis_name="batch", rngs=nnx.Rngs(0))

  @nnx.vmap(in_axes=(None, 0), out_axes=0, axis_name="batch")
  def forward(layer, x):
    return layer(x)

  y = forward(layer, x)
  whole = BatchNorm(3, momentum=0.0, rngs=nnx.Rngs(0))
  assert_trees_close(y.reshape(32, 3), whole(x.reshape(32, 3)))
  assert_trees_close(nnx.state(layer, nnx.BatchStat), nnx.state(whole, nnx.BatchStat))


def test_orbax_checkpoint_round_trip(tmp_path, rng):
  import orbax.checkpoint as ocp

  layer = BatchNorm(5, rngs=nnx.Rngs(0))
  layer(rng.standard_normal((16, 5)).astype(np.float32))
  _, state = nnx.split(layer)
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(tmp_path / "ckpt", state)
  checkpointer.wait_until_finished()
  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: BatchNorm(5, rngs=nnx.Rngs(1))))
  restored = checkpointer.restore(tmp_path / "ckpt", abstract)
  fresh = nnx.merge(graphdef, restored)
  assert_trees_close(nnx.state(fresh), nnx.state(layer))


def test_set_attributes_and_tabulate_work_as_for_flax(rng):
  x = jnp.asarray(rng.standard_normal((4, 6)).astype(np.float32))
  ours, theirs = BatchNorm(6, rngs=nnx.Rngs(0)), nnx.BatchNorm(6, rngs=nnx.Rngs(0))
  for layer in (ours, theirs):
    layer.set_attributes(use_running_average=True)
  assert ours.use_running_average is True
  assert nnx.tabulate(ours, x) == nnx.tabulate(theirs, x)  # same rows, shapes, counts and bytes


def test_inside_bridge_to_linen_statistics_land_in_batch_stats(rng):
  from flax.nnx import bridge

  x = jnp.asarray((1.0 + rng.standard_normal((8, 3))).astype(np.float32))
  bridged = bridge.to_linen(BatchNorm, 3, momentum=0.9)
  variables = bridged.init(jax.random.key(0), x)
  assert set(variables) == {"params", "batch_stats"} and set(variables["batch_stats"]) == {"mean", "var"}
  y, updates = bridged.apply(variables, x, mutable=["batch_stats"])
  linen = bnjax.BatchNorm(use_running_average=False, momentum=0.9)
  assert_trees_close((y, updates), linen.apply(variables, x, mutable=["batch_stats"]))


def test_nnx_scan_over_stacked_layers_with_split_rngs_and_state_axes(rng):
  x = jnp.asarray((2.0 + rng.standard_normal((8, 3))).astype(np.float32))

  @nnx.split_rngs(splits=3)
  @nnx.vmap(in_axes=(0,), out_axes=0)
  def make(rngs):
    return BatchNorm(3, momentum=0.9, rngs=rngs)

  stack = make(nnx.Rngs(0))
  layers = [BatchNorm(3, momentum=0.9, rngs=nnx.Rngs(i)) for i in range(3)]
  for i, layer in enumerate(layers):  # the same weights, one layer at a time
    nnx.update(layer, jax.tree.map(lambda v, i=i: v[i], nnx.state(stack)))

  @nnx.scan(in_axes=(nnx.StateAxes({(nnx.Param, nnx.BatchStat): 0, ...: None}), nnx.Carry), out_axes=nnx.Carry)
  def forward(layer, x):
    return layer(x) * 2.0 + 1.0

  y = forward(stack, x)
  want = x
  for layer in layers:
    want = layer(want) * 2.0 + 1.0
  assert_trees_close(y, want)
  for i, layer in enumerate(layers):
    assert_trees_close(
      jax.tree.map(lambda v, i=i: v[i], nnx.state(stack, nnx.BatchStat)), nnx.state(layer, nnx.BatchStat)
    )


def test_parameter_metadata_is_passed_through_like_flax():
  kwargs = dict(scale_metadata={"tag": "gamma"}, bias_metadata={"tag": "beta"})
  ours, theirs = BatchNorm(3, **kwargs, rngs=nnx.Rngs(0)), nnx.BatchNorm(3, **kwargs, rngs=nnx.Rngs(0))
  assert ours.scale.get_metadata() == theirs.scale.get_metadata() and ours.scale.get_metadata()["tag"] == "gamma"
  assert ours.bias.get_metadata() == theirs.bias.get_metadata()
  no_params = BatchNorm(3, use_scale=False, use_bias=False, rngs=nnx.Rngs(0))
  assert no_params.scale is None and set(nnx.state(no_params).keys()) == {"mean", "var"}


@pytest.mark.parametrize(
  "options",
  [
    dict(update_stats=False),
    dict(virtual_batch_size=4),
    dict(renorm=True, renorm_clipping=(2.0, 1.0)),
    dict(momentum=None),
    bnjax.pytorch_preset(0.1),
  ],
)
def test_variants_give_the_linen_module_numbers(rng, options):
  options = {"momentum": 0.9, **options}
  x = (rng.standard_normal((8, 3, 3, 5)) * 2 + 1).astype(np.float32)
  layer = BatchNorm(5, rngs=nnx.Rngs(0), **options)
  linen = bnjax.BatchNorm(**options)
  variables = linen.init(jax.random.key(0), x, use_running_average=False)
  for _ in range(2):
    y_linen, updates = linen.apply(variables, x, use_running_average=False, mutable=["batch_stats"])
    variables = {**variables, **updates}
    assert_trees_close(layer(x), y_linen)
  stats = {k: v[...] for k, v in nnx.state(layer, nnx.BatchStat).items()}
  assert_trees_close(stats, dict(variables["batch_stats"]))
  y_eval = layer(x, use_running_average=True)
  assert_trees_close(y_eval, linen.apply(variables, x, use_running_average=True))


def test_default_nnx_state_has_no_extra_statistics():
  assert set(nnx.state(BatchNorm(3, rngs=nnx.Rngs(0)), nnx.BatchStat).keys()) == {"mean", "var"}


def test_float16_evaluation_keeps_the_running_variance_in_float32():
  # A running variance near 9e4 overflows float16 (max 65504): cast, it would turn every output into 0.
  layer = BatchNorm(4, dtype=jnp.float16, use_running_average=True, rngs=nnx.Rngs(0))
  layer.mean[...] = jnp.full(4, 100.0)
  layer.var[...] = jnp.full(4, 9e4)
  x = (100.0 + 300.0 * jax.random.normal(jax.random.key(0), (64, 4))).astype(jnp.float16)
  y = layer(x)
  assert y.dtype == jnp.float16 and 0.9 < float(jnp.std(y.astype(jnp.float32))) < 1.1


def test_view_info_describes_the_mode_switch():
  text = nnx.view_info(BatchNorm(3, rngs=nnx.Rngs(0)))
  assert "use_running_average" in text and "stored batch statistics" in text
