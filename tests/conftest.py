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


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
  """A folder of small random-ish text documents (fresh bytes, fixed seed), for trainer tests."""
  folder = tmp_path_factory.mktemp("corpus")
  rng = np.random.default_rng(0)
  words = [b"def", b"return", b"self", b"x", b"=", b"(", b")", b":", b"\n", b"    ", b"import"]
  for i in range(40):
    picks = rng.integers(0, len(words), size=int(rng.integers(20, 80)))
    (folder / f"doc{i}.py").write_bytes(b" ".join(words[j] for j in picks))
  return str(folder)
