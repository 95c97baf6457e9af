"""The jitted training loop: learning, determinism, loop drivers, evaluation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_fmnist_dir
from tolerance import assert_trees_close

from bnjax import data, train
from bnjax.models import LeNet


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  ds = data.load_idx_dir(make_fmnist_dir(tmp_path_factory.mktemp("d"), n_train=640, n_test=160), expect_full=False)
  return tuple(jnp.asarray(a) for a in ds[:4])


def run(small, loop, epochs=2, norm="ours", seed=0, lr=0.5):
  train_x, train_y, test_x, test_y = small
  state = train.create_train_state(LeNet(norm=norm), jax.random.key(seed), lr)
  history = []
  for epoch in range(epochs):
    state, m = train.train_epoch(state, train_x, train_y, jax.random.key(100 + epoch), 64, loop=loop, scan_chunk=3)
    history.append(train.summarize(m))
  return state, history, train.summarize(train.evaluate(state, test_x, test_y, batch_size=64))


# The plain sigmoid LeNet needs many epochs before its loss moves at all (the chapter's point), so only
# the batch-normalized variants are held to learning within a few dozen steps.
@pytest.mark.parametrize("norm", ["ours", "flax"])
def test_loss_falls_and_the_model_learns(small, norm):
  _, history, test = run(small, "auto", epochs=3, norm=norm)
  assert history[-1]["loss"] < 0.7 * history[0]["loss"], history
  assert test["acc"] > 0.5, test


def test_step_and_scan_loops_give_the_same_state(small):
  state_step, hist_step, _ = run(small, "step")
  state_scan, hist_scan, _ = run(small, "scan")
  assert_trees_close(
    (state_scan.params, state_scan.batch_stats), (state_step.params, state_step.batch_stats), "framework"
  )
  assert_trees_close([h["loss"] for h in hist_scan], [h["loss"] for h in hist_step], "framework")


def test_same_seed_same_result_other_seed_other_result(small):
  a, _, _ = run(small, "auto", epochs=1)
  b, _, _ = run(small, "auto", epochs=1)
  c, _, _ = run(small, "auto", epochs=1, seed=1)
  assert_trees_close(a.params, b.params)
  assert not np.allclose(a.params["fc3"]["kernel"], c.params["fc3"]["kernel"])


def test_epoch_plan_keeps_the_remainder_like_pytorch():
  assert train.epoch_plan(10, 4) == [(0, 4), (4, 4), (8, 2)]
  assert train.epoch_plan(8, 4) == [(0, 4), (4, 4)]
  assert len(train.epoch_plan(60000, 256)) == train.steps_per_epoch(60000, 256) == 235


def test_every_example_is_seen_once_per_epoch(small):
  train_x, train_y, _, _ = small
  seen = []
  state = train.create_train_state(LeNet(), jax.random.key(0), 0.1)
  _, m = train.train_epoch(state, train_x, train_y, jax.random.key(0), 100, on_progress=seen.append)
  assert int(m["count"]) == 640 and sum(seen) == len(train.epoch_plan(640, 100))


def test_training_updates_running_statistics_and_eval_uses_them(small):
  train_x, train_y, test_x, test_y = small
  state = train.create_train_state(LeNet(), jax.random.key(0), 0.1)
  new, _ = train.train_epoch(state, train_x, train_y, jax.random.key(0), 64)
  assert not np.allclose(new.batch_stats["bn1"]["mean"], 0.0)
  shifted = new.replace(batch_stats=jax.tree_util.tree_map(lambda v: v + 1.0, new.batch_stats))
  assert train.summarize(train.evaluate(new, test_x, test_y))["loss"] != pytest.approx(
    train.summarize(train.evaluate(shifted, test_x, test_y))["loss"]
  )


def test_bad_arguments(small):
  train_x, train_y, _, _ = small
  state = train.create_train_state(LeNet(), jax.random.key(0), 0.1)
  with pytest.raises(ValueError, match=r"`loop` is 'while'"):
    train.train_epoch(state, train_x, train_y, jax.random.key(0), 64, loop="while")
  with pytest.raises(ValueError, match=r"`batch_size` is 0"):
    train.train_epoch(state, train_x, train_y, jax.random.key(0), 0)


def test_brief_training_on_the_real_fashion_mnist():
  """Runs in CI on the Debian package's data (installed by .ci/setup): one epoch at the chapter's settings.

  The chapter's first epoch ends near loss 0.75 / train acc 0.73; test accuracy after one epoch at lr 1.0
  still swings between seeds (0.64..0.74 seen), so the bound is well above chance (0.1), not tight.
  """
  ds = data.load_fashion_mnist(data.DEBIAN_DIR, source="idx")
  state = train.create_train_state(LeNet(), jax.random.key(0), 1.0)
  state, m = train.train_epoch(
    state, jnp.asarray(ds.train_images), jnp.asarray(ds.train_labels), jax.random.key(1), 256
  )
  tr = train.summarize(m)
  test = train.summarize(train.evaluate(state, jnp.asarray(ds.test_images), jnp.asarray(ds.test_labels)))
  assert tr["loss"] < 1.0 and tr["acc"] > 0.65 and test["acc"] > 0.55, (tr, test)
