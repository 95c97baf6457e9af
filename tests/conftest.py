"""Shared test setup.

Several host CPU devices let the pmap/shard_map tests run on a CPU-only machine; the flag must be set
before jax is first imported, which is why it lives here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
  """A fresh, seeded NumPy generator per test."""
  return np.random.default_rng(0)


def pytest_terminal_summary(terminalreporter):
  """Reports the largest difference observed per parity check (tests/test_torch_parity.py)."""
  from tolerance import MAX_DIFFS

  if MAX_DIFFS:
    terminalreporter.section("largest observed differences (max |a - b|)")
    for check, diff in sorted(MAX_DIFFS.items()):
      terminalreporter.write_line(f"{check:<60} {diff:.3e}")
