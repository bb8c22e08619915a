"""Fixtures of the trainer tests: a compilation cache, a small corpus, a tiny run config and
launch/compare.py as a module."""

import dataclasses
import importlib.util
import os

import jax
import pytest

from configs import DataConfig, LoopConfig, MeshConfig, OptimConfig, RunConfig
from jaxchunk.config import ModelConfig


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module: the trainers here compile the same steps."""
  saved = {name: getattr(jax.config, name) for name in
           ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
            "jax_persistent_cache_min_entry_size_bytes")}
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  yield
  for name, value in saved.items():
    jax.config.update(name, value)


@pytest.fixture(scope="session")
def compare_module():
  """launch/compare.py, loaded once per process: loading it again would redefine its absl flags."""
  path = os.path.join(os.path.dirname(__file__), "..", "..", "launch", "compare.py")
  spec = importlib.util.spec_from_file_location("compare", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture
def tiny_config(corpus):
  """A factory: the tiny run config, with `section=dict(field=value)` replacements."""
  return lambda **sections: make_tiny_config(corpus, **sections)


def make_tiny_config(corpus, **sections) -> RunConfig:
  config = RunConfig(
      model=ModelConfig(d_model=32, layer_pattern=("rat", "local"), num_heads=2, num_kv_heads=2,
                        head_dim=16, mlp_hidden=64, window=8, rat_chunk_size=8),
      data=DataConfig(source="text", paths=(corpus,), seq_len=32, global_batch_size=8,
                      validation_fraction=0.25),
      optim=OptimConfig(lr=1e-2, warmup_steps=2),
      mesh=MeshConfig(data=1),
      run=LoopConfig(steps=6, eval_every=3, eval_batches=1, checkpoint_every=2, log_every=1,
                     sample_len=8, async_checkpoints=True))
  return dataclasses.replace(config, **{
      name: dataclasses.replace(getattr(config, name), **fields) for name, fields in sections.items()})
