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


@pytest.fixture(scope="session", autouse=True)
def shared_compilation_cache(tmp_path_factory):
  """One persistent compilation cache for this run, shared by the xdist workers: a program that
  both workers compile (a module's cached models and warm engines, whose tests are spread over
  the workers) is compiled once and loaded by the other. Fresh for every run (under this run's
  pytest temp folder), so a run never loads an executable compiled by an earlier checkout. Only
  programs taking at least 0.3 s to compile are stored (writing every small eager op costs more
  than it saves). tests/training/conftest.py swaps in its own cache per module."""
  import jax

  base = tmp_path_factory.getbasetemp()
  folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache"
  folder.mkdir(exist_ok=True)
  settings = {"jax_compilation_cache_dir": str(folder),
              "jax_persistent_cache_min_compile_time_secs": 0.3,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  saved = {name: getattr(jax.config, name) for name in settings}
  for name, value in settings.items():
    jax.config.update(name, value)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
