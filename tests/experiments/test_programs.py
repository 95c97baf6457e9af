"""Compiled programs kept on disk (programs.ProgramStore): what names a program, loading instead of compiling,
the same numbers either way, and nothing stored that would not run."""

import logging
import os
import re
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import lenet_fmnist
from experiments.lenet_fmnist import input_pipeline as data
from experiments.lenet_fmnist import programs, train
from experiments.lenet_fmnist.programs import ProgramStore
from experiments.lenet_fmnist.train import Data
from tests.experiments.helpers import cli, cli_command, lenet_compiled_ahead, make_fmnist_dir
from tests.helpers import ROOT


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  ds = data.load_idx_dir(make_fmnist_dir(tmp_path_factory.mktemp("d"), n_train=320, n_test=96), expect_full=False)
  return Data.put(*ds[:2]), Data.put(*ds[2:4])


def test_a_programs_key_names_its_context_name_static_arguments_and_argument_types(tmp_path):
  store = ProgramStore(tmp_path, "lenet ours")
  x = jnp.zeros((3, 2), jnp.float32)
  key = store.key("step", {"n": 2}, (x, 1))
  assert key == store.key("step", {"n": 2}, (jax.ShapeDtypeStruct((3, 2), jnp.float32), 5))  # shapes, not values
  others = [
    ProgramStore(tmp_path, "lenet flax").key("step", {"n": 2}, (x, 1)),
    store.key("evaluate", {"n": 2}, (x, 1)),
    store.key("step", {"n": 3}, (x, 1)),
    store.key("step", {"n": 2}, (jnp.zeros((4, 2)), 1)),
    store.key("step", {"n": 2}, (x.astype(jnp.bfloat16), 1)),
    store.key("step", {"n": 2}, (x, np.int32(1))),  # a Python int is weakly typed, np.int32 is not
    store.key("step", {"n": 2}, ((x,), 1)),  # another structure
  ]
  assert len({key, *others}) == len(others) + 1


def test_a_programs_key_follows_jaxs_configuration(tmp_path):
  store = ProgramStore(tmp_path, "lenet")
  args = (jnp.zeros(2),)
  with jax.default_matmul_precision("bfloat16"):
    low = store.key("step", {}, args)
  with jax.default_matmul_precision("float32"):
    assert store.key("step", {}, args) != low


def lenet_programs(small, store):
  return lenet_compiled_ahead(*small, 0.5, store=store, scan_chunk=2)


def epoch_and_evaluation(state, key, small):
  train_data, test_data = small
  state, metrics = train.train_epoch(state, train_data, key, 64, epoch=0, scan_chunk=2)
  return state, train.summarize(metrics), train.summarize(train.evaluate(state, test_data))


@pytest.mark.slow
def test_stored_programs_load_without_compiling_and_give_the_compiled_programs_numbers(
  small, tmp_path, caplog, monkeypatch
):
  train.clear_compiled_ahead()
  state, key, futures = lenet_programs(small, ProgramStore(tmp_path, "lenet ours"))
  [f.result() for f in futures]
  stored = sorted(p.name for p in tmp_path.iterdir())
  assert len(stored) == len(futures) + 1  # the epoch start, the scans, the padded batch, the evaluation; init
  compiled = epoch_and_evaluation(state, key, small)

  train.clear_compiled_ahead()  # as a new run starts: nothing prepared in memory
  compiled_again = []
  monkeypatch.setattr(ProgramStore, "compile", lambda self, *a, **k: compiled_again.append(a))
  with jax.log_compiles(True), caplog.at_level(logging.WARNING):  # (log_compiles: this thread's compilations)
    state, key, futures = lenet_programs(small, ProgramStore(tmp_path, "lenet ours"))
    [f.result() for f in futures]
    loaded = epoch_and_evaluation(state, key, small)
  assert compiled_again == []  # every program of the store loaded, none traced and compiled again
  assert not [r for r in caplog.records if "Finished XLA compilation of jit(_" in r.getMessage()]
  assert sorted(p.name for p in tmp_path.iterdir()) == stored

  train.clear_compiled_ahead()  # and the plain jitted functions, nothing prepared
  state, key = lenet_programs(small, None)[:2]
  train.clear_compiled_ahead()
  plain = epoch_and_evaluation(state, key, small)
  for got in (loaded, compiled):
    jax.tree.map(np.testing.assert_array_equal, got[0].params, plain[0].params)
    assert got[1:] == plain[1:]


@pytest.mark.slow
def test_a_stored_program_that_cannot_be_loaded_is_compiled_again_and_replaced(small, tmp_path, capsys):
  train.clear_compiled_ahead()
  [f.result() for f in lenet_programs(small, ProgramStore(tmp_path, "lenet ours"))[2]]
  broken = sorted(tmp_path.iterdir())[0]
  broken.write_bytes(b"not a program")
  train.clear_compiled_ahead()
  state, key, futures = lenet_programs(small, ProgramStore(tmp_path, "lenet ours"))
  [f.result() for f in futures]
  assert "could not be loaded" in capsys.readouterr().err
  assert broken.read_bytes() != b"not a program"  # compiled again and stored again
  assert epoch_and_evaluation(state, key, small)[1]["acc"] > 0


class FakeLowered:
  """A lowered program whose compilation JAX reports as a persistent cache hit (``hit``) or not."""

  def __init__(self, hit):
    self.hit = hit

  def compile(self, compiler_options=None):
    if self.hit:
      jax.monitoring.record_event("/jax/compilation_cache/cache_hits")
    return ("compiled", compiler_options)


def test_a_program_jax_loaded_from_its_own_cache_is_used_but_not_stored(tmp_path, monkeypatch):
  # (Such an executable serializes without its kernels and would fail when loaded: "Function ... not found".)
  saved = []
  store = ProgramStore(tmp_path, "lenet")
  monkeypatch.setattr(store, "save", lambda key, compiled: saved.append(key))
  compiled = store.compile("hit", FakeLowered(hit=True))
  assert compiled[0] == "compiled" and saved == []
  compiled = store.compile("fresh", FakeLowered(hit=False), {"xla_backend_optimization_level": 0})
  assert saved == ["fresh"]
  assert compiled[1] == {**programs.APART, "xla_backend_optimization_level": 0}  # its own persistent-cache key


@pytest.mark.slow
@pytest.mark.parametrize("seeds", [(), ("--seeds", "0,3")], ids=["one seed", "two seeds over two host devices"])
def test_a_second_run_loads_its_programs_and_prints_the_same_lines(fmnist_dir, tmp_path, seeds):
  # Two runs, each a process of its own (as a user's): a key that differed from one process to the next would
  # store the programs anew. (Not main() in this process: the suite's own JAX settings are in the key.) Two seeds:
  # without the host device count conftest.py gives the processes, the run asks JAX for one device per seed
  # (on two cores or more), before JAX starts; programs run and loaded on both.
  cache = tmp_path / "cache"
  args = cli(fmnist_dir, tmp_path / "run", "--epochs", "1", "--overwrite", "--compile-cache", str(cache), *seeds)

  def run():
    env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"} if seeds else None
    done = subprocess.run(cli_command(*args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return [line for line in done.stdout.splitlines() if "loss" in line or "seeds split" in line]

  first = run()
  assert ("2 seeds split over 2 host CPU devices" in "\n".join(first)) == bool(seeds) or train.usable_cores() < 2
  stored = sorted(p.name for p in (cache / "programs").iterdir())
  second = run()
  assert sorted(p.name for p in (cache / "programs").iterdir()) == stored and len(stored) == 4  # init, epoch start,
  # the training steps' scan, the evaluation
  timings = re.compile(r"[\d,.]+ ex/s.*")
  assert [timings.sub("", line) for line in first] == [timings.sub("", line) for line in second] and first


@pytest.mark.slow
def test_no_compile_cache_stores_no_programs(fmnist_dir, tmp_path):
  cache = tmp_path / "cache"
  lenet_fmnist.main(
    cli(fmnist_dir, tmp_path / "run", "--epochs", "1", "--compile-cache", str(cache), "--no-compile-cache")
  )
  assert not (cache / "programs").exists()


def test_a_call_under_other_jax_settings_does_not_take_the_prepared_program():
  args = (jnp.zeros(2),)
  plain = train._program_key(train._evaluate, {"batch_size": 2}, args)
  with jax.default_matmul_precision("bfloat16"):
    assert train._program_key(train._evaluate, {"batch_size": 2}, args) != plain
  assert train._program_key(train._evaluate, {"batch_size": 2}, args) == plain


def test_programs_in_a_folder_others_can_write_are_not_loaded(tmp_path, capsys):
  store = ProgramStore(tmp_path / "programs", "lenet")
  store.save("k" + programs.SUFFIX, None)  # (not a program: nothing is written, but the folder is made)
  folder = tmp_path / "programs"
  assert folder.is_dir() and not folder.stat().st_mode & 0o077  # made for this user alone
  (folder / ("k" + programs.SUFFIX)).write_bytes(b"anything")
  os.chmod(folder, 0o777)
  assert ProgramStore(folder, "lenet").load("k" + programs.SUFFIX, (), None) is None
  assert "is not this user's alone" in capsys.readouterr().err
  assert (folder / ("k" + programs.SUFFIX)).read_bytes() == b"anything"  # left alone, not loaded or removed
