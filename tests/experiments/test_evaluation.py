"""What a variant is evaluated with (evaluation.py): precise BN's statistics for several seeds at once."""

import jax
import numpy as np
import pytest

from experiments.lenet_fmnist import evaluation, train
from experiments.lenet_fmnist import input_pipeline as data
from experiments.lenet_fmnist.config import RunConfig
from experiments.lenet_fmnist.variant import build_model
from tests.experiments.helpers import make_fmnist_dir
from tests.tolerance import assert_trees_close


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  return data.load_idx_dir(make_fmnist_dir(tmp_path_factory.mktemp("d"), n_train=320, n_test=32), expect_full=False)[0]


@pytest.mark.slow
@pytest.mark.parametrize(
  "backend, cores, devices",
  [("cpu", 1, 1), ("cpu", 2, 2), ("gpu", 1, 1)],
  ids=["one after the other on one device", "split over two host devices", "side by side (vmap), as on a GPU"],
)
def test_precise_bn_of_several_seeds_in_one_program_gives_each_seed_its_own_statistics(
  images, monkeypatch, pin_cores, backend, cores, devices
):
  pin_cores(cores)
  model = build_model("ours", RunConfig(), None)  # (a model of its own: its compiled programs are traced here)
  seeds = [0, 5]
  variables, keys = train.init_run(model.init, seeds)
  with monkeypatch.context() as m:
    if backend != "cpu":  # (over_replicas reads the backend when it traces: vmap, as on an accelerator)
      m.setattr(jax, "default_backend", lambda: backend)
    stats = evaluation.precise_stats(model.precise_apply, variables, images, 3, 64, keys, epoch=1, seeds=2)
  assert len(jax.tree.leaves(stats)[0].sharding.device_set) == devices
  for i in range(len(seeds)):
    own = evaluation.precise_stats(model.precise_apply, train.replica(variables, i), images, 3, 64, keys[i], epoch=1)
    assert_trees_close(train.replica(stats, i), own)  # its own batches, its own weights
  first, second = (np.asarray(jax.tree.leaves(stats)[0][i]) for i in range(2))
  assert not np.allclose(first, second)  # (two seeds, two sets of statistics)
