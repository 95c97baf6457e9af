"""Fixtures of the experiment's tests (the session setup is tests/conftest.py's)."""

import pytest

from tests.experiments.helpers import make_fmnist_dir


@pytest.fixture
def fmnist_dir(tmp_path):
  """A directory of small synthetic Fashion-MNIST IDX files (gzipped)."""
  return make_fmnist_dir(tmp_path / "fmnist")


@pytest.fixture(scope="module", autouse=True)
def release_programs_compiled_ahead():
  """Frees the programs the training loop compiled ahead, with JAX's own (tests/conftest.py)."""
  yield
  from experiments.lenet_fmnist import train

  train.clear_compiled_ahead()


@pytest.fixture
def pin_cores(monkeypatch):
  """``pin_cores(n)``: the training loop sees ``n`` usable cores (this process has 4 host devices: tests/conftest.py),
  so that the seeds split over as many host devices as on an ``n``-core machine; the host device meshes made under
  the pin are forgotten before and after."""
  from experiments.lenet_fmnist import train

  def pin(n):
    monkeypatch.setattr(train, "usable_cores", lambda: n)
    train.replica_mesh.cache_clear()

  yield pin
  train.replica_mesh.cache_clear()
