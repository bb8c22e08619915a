"""The trainer end to end on a tiny model: outputs, exact resume after a crash, SIGTERM."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import configs
from jaxchunk.training.trainer import Trainer
from tests.training.conftest import make_tiny_config


def one_device():
  return jax.devices()[:1]


def params_of(trainer):
  return jax.tree.map(np.asarray, jax.device_get(trainer.state["params"]))


def assert_trees_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
  """(trainer, workdir, summary) of one uninterrupted 6-step run of the tiny config, shared by the
  output test and the resume test (which compares a crashed-and-resumed run against it)."""
  workdir = str(tmp_path_factory.mktemp("straight") / "run")
  trainer = Trainer(make_tiny_config(corpus), workdir, devices=one_device())
  summary = trainer.train()
  yield trainer, workdir, summary
  trainer.close()


def test_train_writes_logs_plot_checkpoints_and_samples(straight_run):
  trainer, workdir, summary = straight_run
  records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
  assert records[-1]["loss"] < records[0]["loss"]
  assert {"val_loss", "tokens_per_s", "mfu", "wall_s"} <= set(records[2])
  assert summary["step"] == 6 and summary["val_bits_per_byte"] == records[-1]["val_bits_per_byte"]
  assert os.path.getsize(os.path.join(workdir, "loss.png")) > 1000
  assert any(name.startswith("events") for name in os.listdir(os.path.join(workdir, "tensorboard")))
  assert trainer.checkpointer.all_steps() == [4, 6]   # keep_checkpoints=2
  assert json.load(open(os.path.join(workdir, "config.json")))["model"]["d_model"] == 32
  text = trainer.sample("def ", max_new_tokens=8, temperature=0.0)
  assert text.startswith("def ") and len(text.encode()) >= 4


def test_resume_after_crash_is_bit_exact(straight_run, tiny_config, tmp_path):
  config = tiny_config()
  straight, _, _ = straight_run
  assert straight.config == config
  crashed = Trainer(config, str(tmp_path / "crashed"), devices=one_device())
  crashed.train(stop_after=5)               # checkpoints at 2 and 4; step 5 is lost
  crashed.close()
  resumed = Trainer(config, str(tmp_path / "crashed"), devices=one_device())
  assert resumed.step == 4
  resumed.train()
  assert resumed.step == 6
  assert_trees_equal(params_of(resumed), params_of(straight))
  losses = lambda t: [(r["step"], r["loss"]) for r in t._records]
  assert losses(resumed) == losses(straight)
  resumed.close()


def test_sigterm_saves_and_stops(tiny_config, tmp_path):
  trainer = Trainer(tiny_config(run=dict(checkpoint_every=100)), str(tmp_path / "run"),
                    devices=one_device())
  step_fn = trainer._train_step

  def step_then_terminate(state, batch):
    out = step_fn(state, batch)
    if int(out[0]["step"]) == 3:
      os.kill(os.getpid(), signal.SIGTERM)
    return out

  trainer._train_step = step_then_terminate
  summary = trainer.train()
  assert summary["step"] == 3
  assert trainer.checkpointer.all_steps() == [3]
  trainer.close()


RUN_FROM_JSON = """
import sys
import jax, numpy as np
from configs import config_from_json
from jaxchunk.training.trainer import Trainer
trainer = Trainer(config_from_json(sys.argv[1]), sys.argv[2])
trainer.train()
leaves = jax.tree.leaves(jax.device_get(trainer.state["params"]))
np.savez(sys.argv[2] + "/params.npz", *leaves)
trainer.close()
"""


@pytest.mark.slow
def test_sigkill_mid_run_then_restart_matches_uninterrupted(tiny_config, tmp_path):
  config = tiny_config(run=dict(steps=30, checkpoint_every=5, eval_every=10, log_every=5))
  config_path = str(tmp_path / "config.json")
  configs.save_config(config, config_path)
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  command = lambda workdir: [sys.executable, "-c", RUN_FROM_JSON, config_path, workdir]
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  subprocess.run(command(straight), env=env, check=True, capture_output=True)
  process = subprocess.Popen(command(killed), env=env, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
  checkpoints = os.path.join(killed, "checkpoints")
  deadline = time.time() + 300
  while not (os.path.isdir(checkpoints) and "10" in os.listdir(checkpoints)):
    assert process.poll() is None and time.time() < deadline, "no checkpoint 10 before the kill"
    time.sleep(0.05)
  process.kill()                             # SIGKILL: no final save, possibly mid-save
  process.wait()
  assert not os.path.exists(os.path.join(killed, "params.npz"))
  subprocess.run(command(killed), env=env, check=True, capture_output=True)
  expected, resumed = np.load(straight + "/params.npz"), np.load(killed + "/params.npz")
  assert len(expected.files) == len(resumed.files) > 0
  for name in expected.files:
    np.testing.assert_array_equal(resumed[name], expected[name])
