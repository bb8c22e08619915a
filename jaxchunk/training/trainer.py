"""The training loop: data, sharded state, checkpoints, evaluation, logging, plots and sampling.

`Trainer(config, workdir).train()` trains `LanguageModel(config.model)` on byte-level data for
`config.run.steps` steps, resuming from the newest checkpoint under `workdir/checkpoints` if there
is one. With `mor=` (a `MoRConfig`, e.g. a preset's `MOR`: `configs.load_mor`) it trains
`MoRLanguageModel` with `config.model` as the shared stack, adds the router loss to the training
loss, logs it as "router_loss" and counts FLOPs with `mor_flops_per_token`. It writes into
`workdir`: config.json (the resolved config), mor.json (the MoR config, if any), metrics.jsonl
(one JSON record per log/eval point), tensorboard/ (event files), loss.png (train and validation
loss in bits per byte against the unigram byte entropy) and checkpoints/.

With `mesh.sequence > 1` the run is sequence-parallel: each host lays its rows out in zig-zag order
(`SequenceParallel.layout_batch`) before they are placed on the mesh, so every device receives only
its own segments of each row, and the train and eval steps run the sequence-parallel mixers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time

import jax
import tqdm
from matplotlib.figure import Figure

from configs import RunConfig, save_config
from jaxchunk.models import LanguageModel
from jaxchunk.models.mor import MoRConfig, MoRLanguageModel, mor_flops_per_token
from jaxchunk.training import data as data_lib
from jaxchunk.training import train_step as step_lib
from jaxchunk.training.checkpoint import Checkpointer, StopSignal
from jaxchunk.training.optimizer import make_optimizer
from jaxchunk.training.sampling import generate

LN2 = math.log(2.0)


class Trainer:
  """Owns one run: see the module docstring. `devices` defaults to all devices.

  `mor`: a `MoRConfig` whose shared stack is replaced by `config.model` (so `--set model.*`
  overrides reach it), or None for a `LanguageModel`.
  """

  def __init__(self, config: RunConfig, workdir: str, *, devices=None,
               mor: MoRConfig | None = None):
    self.config = config
    self.workdir = workdir
    self.mor = None if mor is None else dataclasses.replace(mor, model=config.model)
    self.is_main = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    if self.is_main:
      save_config(config, os.path.join(workdir, "config.json"))
      if self.mor is not None:
        with open(os.path.join(workdir, "mor.json"), "w") as f:
          json.dump(dataclasses.asdict(self.mor), f, indent=2)
          f.write("\n")
    self.mesh = step_lib.make_mesh(config.mesh, devices)
    self.sequence_parallel = step_lib.sequence_parallel(self.mesh)
    self.model = LanguageModel(config.model) if self.mor is None else MoRLanguageModel(self.mor)
    step_lib.check_sequence_parallel(self.model, self.sequence_parallel)
    self._init_data()
    self.tx = make_optimizer(config.optim, config.run.steps)
    self.state, self.state_shardings = step_lib.init_train_state(
        self.model, self.tx, self.mesh, seed=config.run.seed, seq_len=config.data.seq_len)
    self.num_params = step_lib.count_params(self.state["params"])
    use_segment_ids = config.data.model_segment_ids
    self._train_step = step_lib.make_train_step(
        self.model, self.tx, self.state_shardings, self.mesh, use_segment_ids=use_segment_ids,
        grad_accum_steps=config.optim.grad_accum_steps, remat=config.run.remat,
        sp=self.sequence_parallel)
    self._eval_step = step_lib.make_eval_step(self.model, self.state_shardings, self.mesh,
                                              use_segment_ids=use_segment_ids,
                                              sp=self.sequence_parallel)
    self.checkpointer = Checkpointer(os.path.join(workdir, "checkpoints"),
                                     keep=config.run.keep_checkpoints,
                                     async_save=config.run.async_checkpoints)
    latest = self.checkpointer.latest_step()
    if latest is not None:
      self.state = self.checkpointer.restore(latest, step_lib.abstract_state(self.state),
                                             self.train_iterator)
    self._records = self._load_records(self.step)

  # ----------------------------------------------------------------------------------- data
  def _init_data(self) -> None:
    cfg = self.config.data
    count, index = jax.process_count(), jax.process_index()
    if cfg.global_batch_size % count:
      raise ValueError(f"data.global_batch_size ({cfg.global_batch_size}) must be divisible by "
                       f"the number of hosts ({count})")
    batch_shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
    if cfg.global_batch_size % batch_shards:
      raise ValueError(f"data.global_batch_size ({cfg.global_batch_size}) must be divisible by "
                       f"mesh data x fsdp = {batch_shards}")
    local_batch = cfg.global_batch_size // count
    documents = data_lib.load_documents(cfg.source, cfg.paths, column=cfg.column)
    train_docs, val_docs = data_lib.split_documents(documents, cfg.validation_fraction, cfg.seed)
    pack = dict(seq_len=cfg.seq_len, eos_id=cfg.eos_id, segment_ids=cfg.model_segment_ids)
    self.train_rows = data_lib.pack_documents(train_docs, **pack)
    self.val_rows = data_lib.pack_documents(val_docs, **pack)
    self.unigram_entropy_bits = data_lib.unigram_entropy_bits(self.train_rows.tokens)
    self.train_iterator = iter(data_lib.train_dataset(
        self.train_rows, batch_size=local_batch, seed=cfg.seed, process_index=index,
        process_count=count))
    self._batch_sharding = step_lib.batch_sharding(self.mesh)
    self.val_batches = [self._to_global(b) for b in data_lib.validation_batches(
        self.val_rows, batch_size=local_batch, num_batches=self.config.run.eval_batches,
        process_index=index, process_count=count)]

  def _to_global(self, local_batch: dict) -> dict:
    """This host's rows [B_local, T] -> global arrays sharded over (data, fsdp) x sequence; in
    zig-zag layout order (permuted per row on the host) when sequence-parallel."""
    if self.sequence_parallel is not None:
      local_batch = self.sequence_parallel.layout_batch(local_batch)
    return {key: jax.make_array_from_process_local_data(self._batch_sharding, value)
            for key, value in local_batch.items()}

  # ------------------------------------------------------------------------------- metrics
  @property
  def step(self) -> int:
    return int(jax.device_get(self.state["step"]))

  @property
  def metrics_path(self) -> str:
    return os.path.join(self.workdir, "metrics.jsonl")

  def _load_records(self, upto_step: int) -> list[dict]:
    """Records of earlier sessions up to the restored step (later ones were not checkpointed)."""
    if not os.path.exists(self.metrics_path):
      return []
    with open(self.metrics_path) as f:
      records = [json.loads(line) for line in f if line.strip()]
    records = [r for r in records if r["step"] <= upto_step]
    if self.is_main:
      with open(self.metrics_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    return records

  def _log(self, record: dict, writer) -> None:
    self._records.append(record)
    if not self.is_main:
      return
    with open(self.metrics_path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for key, value in record.items():
      if key != "step" and value is not None:
        writer.add_scalar(key, value, record["step"])
    writer.flush()

  def evaluate(self) -> float:
    """Mean next-token NLL (nats) over the validation batches."""
    total, count = 0.0, 0.0
    for batch in self.val_batches:
      nll, n = self._eval_step(self.state["params"], batch)
      total += float(nll)
      count += float(n)
    return total / max(count, 1.0)

  # ---------------------------------------------------------------------------------- loop
  def train(self, *, stop_after: int | None = None) -> dict:
    """Trains up to `config.run.steps`; returns a summary (see `summary`).

    `stop_after` ends the loop once that step is reached without a final checkpoint, like a
    crash (for resume tests). SIGTERM saves a checkpoint and returns early.
    """
    from tensorboardX import SummaryWriter

    run = self.config.run
    total = run.steps
    tokens_per_step = self.config.data.global_batch_size * self.config.data.seq_len
    seq_len = self.config.data.seq_len
    flops_per_token = (step_lib.flops_per_token(self.config.model, self.num_params, seq_len)
                       if self.mor is None else mor_flops_per_token(self.mor, seq_len))
    peak = step_lib.peak_flops_per_device(jax.devices()[0], run.peak_flops_per_device)
    wall_offset = self._records[-1]["wall_s"] if self._records else 0.0
    start_time = time.perf_counter()
    writer = SummaryWriter(os.path.join(self.workdir, "tensorboard")) if self.is_main else None
    step = self.step
    window_start, window_steps = None, 0
    bar = tqdm.tqdm(total=total, initial=step, disable=not self.is_main, desc="train",
                    dynamic_ncols=True)
    with StopSignal() as stop:
      while step < total:
        batch = self._to_global(next(self.train_iterator))
        self.state, metrics = self._train_step(self.state, batch)
        step += 1
        window_steps += 1
        bar.update(1)
        if window_start is None:  # the first step includes compilation: time from its end
          jax.block_until_ready(metrics)
          window_start, window_steps = time.perf_counter(), 0
        last = step == total
        evaluate_now = step % run.eval_every == 0 or last
        if step % run.log_every == 0 or evaluate_now:
          metrics = jax.device_get(metrics)
          now = time.perf_counter()
          tokens_per_s = (window_steps * tokens_per_step / (now - window_start)
                          if window_steps else None)
          mfu = (flops_per_token * tokens_per_s / (peak * jax.device_count())
                 if peak and tokens_per_s else None)
          record = {"step": step, "tokens": step * tokens_per_step,
                    "wall_s": wall_offset + now - start_time,
                    "loss": float(metrics["loss"]), "bits_per_byte": float(metrics["loss"]) / LN2,
                    "grad_norm": float(metrics["grad_norm"]), "tokens_per_s": tokens_per_s,
                    "mfu": mfu}
          if self.mor is not None:
            record["router_loss"] = float(metrics["router_loss"])
          if evaluate_now:
            val_loss = self.evaluate()
            record.update(val_loss=val_loss, val_bits_per_byte=val_loss / LN2)
            bar.write(f"step {step}: val {val_loss / LN2:.3f} bits/byte "
                      f"(unigram entropy {self.unigram_entropy_bits:.3f})")
          self._log(record, writer)
          bar.set_postfix(loss=f"{record['loss']:.3f}",
                          tok_s=f"{tokens_per_s:.0f}" if tokens_per_s else "-",
                          mfu=f"{mfu:.1%}" if mfu else "n/a")
          window_start, window_steps = time.perf_counter(), 0
        if stop_after is not None and step >= stop_after:
          break
        preempted = stop.received or self.checkpointer.reached_preemption(step)
        if step % run.checkpoint_every == 0 or last or preempted:
          self.checkpointer.save(step, self.state, self.train_iterator, force=True)
        if preempted:
          bar.write(f"stop requested: saved step {step}")
          break
    bar.close()
    self.checkpointer.wait()
    if writer is not None:
      writer.close()
    if self.is_main:
      plot_loss_curves(self._records, os.path.join(self.workdir, "loss.png"),
                       entropy_bits=self.unigram_entropy_bits)
    return self.summary()

  def summary(self) -> dict:
    """step, num_params, last train/validation loss (bits per byte), unigram entropy."""
    train = [r for r in self._records if "loss" in r]
    val = [r for r in self._records if "val_loss" in r]
    return {"step": self.step, "num_params": self.num_params,
            "train_bits_per_byte": train[-1]["bits_per_byte"] if train else None,
            "val_bits_per_byte": val[-1]["val_bits_per_byte"] if val else None,
            "unigram_entropy_bits": self.unigram_entropy_bits}

  def sample(self, prompt: str | bytes | None = None, *, max_new_tokens: int | None = None,
             temperature: float | None = None, seed: int = 0) -> str:
    """Text continuing `prompt` (default `run.sample_prompt`), decoded from bytes as UTF-8."""
    run = self.config.run
    prompt = run.sample_prompt if prompt is None else prompt
    prompt_bytes = prompt.encode() if isinstance(prompt, str) else prompt
    new = generate(self.model, self.state["params"], prompt_bytes,
                   max_new_tokens=run.sample_len if max_new_tokens is None else max_new_tokens,
                   temperature=run.sample_temperature if temperature is None else temperature,
                   seed=seed)
    return (prompt_bytes + new).decode("utf-8", errors="replace")

  def close(self) -> None:
    self.checkpointer.close()


def plot_loss_curves(records: list[dict], path: str, *, entropy_bits: float | None = None) -> None:
  """Train and validation loss (bits per byte) against step into a PNG at `path`."""
  fig = Figure(figsize=(7, 4.5))
  ax = fig.subplots()
  train = [r for r in records if "bits_per_byte" in r]
  val = [r for r in records if "val_bits_per_byte" in r]
  ax.plot([r["step"] for r in train], [r["bits_per_byte"] for r in train], label="train")
  ax.plot([r["step"] for r in val], [r["val_bits_per_byte"] for r in val], "o-", label="validation")
  if entropy_bits is not None:
    ax.axhline(entropy_bits, color="gray", linestyle="--", label="unigram byte entropy")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (bits per byte)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
