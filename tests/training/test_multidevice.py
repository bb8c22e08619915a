"""Gradient accumulation and the 8-CPU-device mesh (data=2, fsdp=2, tensor=2) against one device."""

import dataclasses

import jax
import numpy as np
import pytest

from configs import MeshConfig
from jaxchunk.training.trainer import Trainer


def params_of(trainer):
  return jax.tree.map(np.asarray, jax.device_get(trainer.state["params"]))


@pytest.mark.slow
def test_gradient_accumulation_matches_one_batch(tiny_config, tmp_path):
  runs = []
  for accum in (1, 2):
    config = tiny_config(optim=dict(grad_accum_steps=accum), run=dict(steps=2))
    trainer = Trainer(config, str(tmp_path / f"accum{accum}"), devices=jax.devices()[:1])
    trainer.train()
    runs.append(params_of(trainer))
    trainer.close()
  for a, b in zip(jax.tree.leaves(runs[0]), jax.tree.leaves(runs[1])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# One local-attention layer in the default run; RAT's layer compiles for twice as long on CPU.
@pytest.mark.parametrize("pattern", [("local",),
                                     pytest.param(("rat", "local"), marks=pytest.mark.slow)])
def test_eight_devices_match_one(tiny_config, tmp_path, pattern):
  assert jax.device_count() >= 8, "tests/conftest.py forces 8 host devices"
  config = tiny_config(model=dict(layer_pattern=pattern),
                       run=dict(steps=3, eval_every=3, checkpoint_every=3))
  single = Trainer(config, str(tmp_path / "one"), devices=jax.devices()[:1])
  single.train()
  sharded_config = dataclasses.replace(config, mesh=MeshConfig(data=2, fsdp=2, tensor=2))
  sharded = Trainer(sharded_config, str(tmp_path / "eight"), devices=jax.devices()[:8])
  assert dict(sharded.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
  mlp_kernel = sharded.state["params"]["block_0"]["mlp"]
  specs = [leaf.sharding.spec for leaf in jax.tree.leaves(mlp_kernel)]
  assert any(any(axis is not None for axis in spec) for spec in specs), specs
  sharded.train()
  for a, b in zip(single._records, sharded._records):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
  for a, b in zip(jax.tree.leaves(params_of(single)), jax.tree.leaves(params_of(sharded))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  single.close()
  sharded.close()
