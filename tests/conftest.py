import os

# Multi-device tests run on 8 virtual CPU devices; must be set before jax is imported.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request) -> np.random.Generator:
  """A NumPy generator seeded from the test's name: fresh inputs per test, reproducible runs."""
  seed = zlib.crc32(request.node.nodeid.encode())
  return np.random.default_rng(seed)
