"""bnjax.sync: the mesh and the helpers of a data-parallel step (host CPU devices, whatever the backend)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from bnjax import sync
from tests.helpers import CPU_DEVICES


def test_a_mesh_of_groups_and_its_errors():
  mesh = sync.make_mesh(4, bn_group_size=2, devices=CPU_DEVICES)
  assert mesh.shape == {"group": 2, "data": 2} and mesh.size == 4
  with pytest.raises(ValueError, match=r"`bn_group_size` is 3, but it should divide the number of devices, 4"):
    sync.make_mesh(4, 3, devices=CPU_DEVICES)
  with pytest.raises(ValueError, match=r"the global batch size 6 is not divisible by the 4 devices; use a multiple"):
    sync.check_divisible(mesh, 6)


def test_averaging_over_groups_keeps_integer_counters_integer():
  mesh = sync.make_mesh(4, bn_group_size=2, devices=CPU_DEVICES)

  def local(mean, count):  # the counter arrives replicated, as a train state's does
    return sync.average_over_groups({"mean": mean[0], "num_batches_tracked": count + 1})

  out = jax.shard_map(local, mesh=mesh, in_specs=(P("group"), P()), out_specs=P())(
    jnp.array([[1.0], [3.0]]), jnp.array(4, jnp.int32)
  )
  assert out["num_batches_tracked"].dtype == jnp.int32 and int(out["num_batches_tracked"]) == 5
  np.testing.assert_allclose(out["mean"], [2.0])


def test_replicate_and_back_to_the_host():
  mesh = sync.make_mesh(2, devices=CPU_DEVICES)
  tree = {"a": np.arange(3.0), "b": np.int32(7)}
  back = sync.to_host(sync.replicate(tree, mesh))
  np.testing.assert_equal(back, tree)


def test_an_array_split_over_this_process_s_devices_comes_back_whole():
  mesh = sync.make_mesh(2, devices=CPU_DEVICES)
  split = jax.device_put(np.arange(6.0).reshape(2, 3), jax.sharding.NamedSharding(mesh, P(sync.DATA)))
  assert len(split.addressable_shards) == 2
  np.testing.assert_equal(sync.to_host({"a": split})["a"], np.arange(6.0).reshape(2, 3))
