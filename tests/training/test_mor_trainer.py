"""Mixture-of-Recursions presets in the trainer: the training objective, a tiny run through
launch/compare.py, resume and sampling."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs
from jaxchunk.models.mor import MoRConfig, MoRLanguageModel
from jaxchunk.training import train_step as step_lib
from jaxchunk.training.trainer import Trainer
from tests.utils import assert_rel_close


def tiny_overrides(corpus: str, steps: int = 6) -> list[str]:
  """Shrinks a mor_* preset (its shared stack to one block, data and loop) to a few CPU seconds."""
  return ["model.layer_pattern=attention", "model.d_model=32", "model.num_heads=2",
          "model.num_kv_heads=2", "model.head_dim=16", "model.mlp_hidden=64", "data.source=text",
          f"data.paths=[{corpus!r}]", "data.seq_len=32", "data.global_batch_size=8",
          "data.validation_fraction=0.25", "optim.lr=1e-2", "optim.warmup_steps=2",
          f"run.steps={steps}", "run.eval_every=3", "run.eval_batches=1",
          f"run.checkpoint_every={steps}", "run.log_every=1", "run.sample_len=8"]


def test_presets_define_mor_configs():
  assert configs.load_mor("quickstart") is None
  assert configs.load_mor("mor_vanilla") is None
  mor = configs.load_mor("mor_expert")
  assert isinstance(mor, MoRConfig) and mor.router == "expert"
  assert mor.model == configs.load_config("mor_expert").model
  with pytest.raises(ValueError, match="unknown config preset"):
    configs.load_mor("no_such_preset")


@pytest.mark.slow
def test_train_step_descends_mean_nll_plus_router_loss(rng):
  """With SGD the update is -lr * gradient: the gradient must be that of NLL + router loss."""
  stack = configs.load_config("mor_expert", ["model.layer_pattern=attention", "model.d_model=32",
                                             "model.num_heads=2", "model.num_kv_heads=2",
                                             "model.head_dim=16", "model.mlp_hidden=64"]).model
  mor = MoRConfig(model=stack, num_recursions=2, router="expert", capacities=(1.0, 0.5),
                  router_loss_weight=0.5)
  model = MoRLanguageModel(mor)
  mesh = step_lib.make_mesh(configs.MeshConfig(data=1), jax.devices()[:1])
  lr = 1e3   # large, so that (old - new) / lr loses few digits to cancellation
  tx = optax.sgd(lr)
  state, shardings = step_lib.init_train_state(model, tx, mesh, seed=0, seq_len=16)
  params = jax.device_get(state["params"])
  tokens = rng.integers(0, 256, size=(2, 17)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
           "segment_ids": np.ones((2, 16), np.int32),
           "loss_mask": (rng.random((2, 16)) < 0.8).astype(np.float32)}

  def objective(p):
    logits, aux = model.apply({"params": p}, batch["inputs"])
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][..., None], -1)[..., 0]
    mean_nll = jnp.sum(nll * batch["loss_mask"]) / jnp.sum(batch["loss_mask"])
    return mean_nll + aux["router_loss"], (mean_nll, aux["router_loss"])

  value_and_grad = jax.jit(jax.value_and_grad(objective, has_aux=True))
  (_, (mean_nll, router_loss)), grads = value_and_grad(params)
  assert float(router_loss) > 1e-3
  train_step = step_lib.make_train_step(model, tx, shardings, mesh, use_segment_ids=False)
  new_state, metrics = train_step(state, batch)
  np.testing.assert_allclose(metrics["loss"], mean_nll, rtol=1e-5)
  np.testing.assert_allclose(metrics["router_loss"], router_loss, rtol=1e-5)
  updates = jax.tree.map(lambda new, old: (old - new) / lr, jax.device_get(new_state["params"]),
                         params)
  for update, grad in zip(jax.tree.leaves(updates), jax.tree.leaves(grads)):
    assert_rel_close(update, grad, 1e-5, "SGD update vs gradient")
  router_grads = jax.tree.leaves(grads["recursion"]["router_0"])
  assert max(float(jnp.abs(g).max()) for g in router_grads) > 0


def test_compare_trains_a_mor_preset_then_it_resumes_and_samples(compare_module, corpus,
                                                                 tmp_path):
  overrides = tiny_overrides(corpus)
  one_device = jax.devices()[:1]
  summaries = compare_module.compare(["mor_expert"], overrides, str(tmp_path), devices=one_device)
  assert os.path.getsize(tmp_path / "compare.png") > 1000
  workdir = tmp_path / "mor_expert"
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[-1]["loss"] < records[0]["loss"]
  assert all(np.isfinite(r["router_loss"]) and r["router_loss"] > 0 for r in records)
  assert summaries["mor_expert"]["val_bits_per_byte"] == records[-1]["val_bits_per_byte"]
  saved = json.load(open(workdir / "mor.json"))
  assert saved["router"] == "expert" and saved["model"]["d_model"] == 32   # overrides reach it
  trainer = Trainer(configs.load_config("mor_expert", overrides), str(workdir),
                    devices=one_device, mor=configs.load_mor("mor_expert"))
  assert isinstance(trainer.model, MoRLanguageModel) and trainer.step == 6
  text = trainer.sample("def ", max_new_tokens=8, temperature=0.0)
  assert text.startswith("def ") and len(text.encode()) >= 4
  trainer.close()
