"""Trains a language model from a config preset.

  python launch/train.py --config quickstart --set model.d_model=128 --workdir runs/x

A preset that defines `MOR` (configs/mor_*.py) trains a Mixture-of-Recursions model around its
`model` stack.

Runs on one CPU, one accelerator or a pod slice alike: on several hosts (TPU pod workers, SLURM
tasks, or JAX_COORDINATOR_ADDRESS set) it first calls `jax.distributed.initialize()`. The mesh
comes from the config's `mesh` section; a rerun with the same --workdir resumes from the newest
checkpoint there.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configs  # noqa: E402  (after making the repository importable)

CONFIG = flags.DEFINE_string("config", "quickstart", "config preset: a module of configs/")
SET = flags.DEFINE_multi_string("set", [], "override a config field: section.field=value")
WORKDIR = flags.DEFINE_string("workdir", None, "run folder (checkpoints, logs, plots)",
                              required=True)
DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "auto", ["auto", "on", "off"],
    "call jax.distributed.initialize(): auto = when the environment names several processes")
SAMPLE = flags.DEFINE_boolean("sample", True, "print a sample from the model after training")


def started_on_several_hosts() -> bool:
  """Whether the environment describes a multi-process job (TPU pod, SLURM, explicit coordinator)."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1


def main(argv) -> None:
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save step at INFO
  import jax

  if DISTRIBUTED.value == "on" or (DISTRIBUTED.value == "auto" and started_on_several_hosts()):
    jax.distributed.initialize()
  from jaxchunk.training.trainer import Trainer

  config = configs.load_config(CONFIG.value, SET.value)
  trainer = Trainer(config, WORKDIR.value, mor=configs.load_mor(CONFIG.value))
  main_process = jax.process_index() == 0
  if main_process:
    print(f"{CONFIG.value}: {trainer.num_params / 1e6:.2f}M params, {len(jax.devices())} "
          f"{jax.devices()[0].platform} device(s), mesh {dict(trainer.mesh.shape)}, "
          f"resuming at step {trainer.step}", flush=True)
  summary = trainer.train()
  if main_process:
    val = summary["val_bits_per_byte"]
    if val is not None:
      print(f"step {summary['step']}: validation loss {val:.3f} bits/byte vs unigram byte entropy "
            f"{summary['unigram_entropy_bits']:.3f} bits/byte of the corpus", flush=True)
    print(f"logs, loss curve and checkpoints in {WORKDIR.value}", flush=True)
  if SAMPLE.value:
    text = trainer.sample()  # every process joins the (sharded) decode computation
    if main_process:
      print("sample:\n" + text, flush=True)
  trainer.close()


if __name__ == "__main__":
  app.run(main)
