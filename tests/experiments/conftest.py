"""Fixtures of the experiment's tests (the session setup is tests/conftest.py's)."""

import pytest

from tests.experiments.helpers import make_fmnist_dir


@pytest.fixture
def fmnist_dir(tmp_path):
  """A directory of small synthetic Fashion-MNIST IDX files (gzipped)."""
  return make_fmnist_dir(tmp_path / "fmnist")
