"""Mixture-of-Recursions benchmarks.

CPU comparison (`--mode cpu`): the presets configs/mor_{vanilla,recursive,expert,token}.py train on
the same byte stream (the standard-library corpus of `jaxchunk.training.data`) for the same
training FLOPs (`--flops`, counted by `mor_flops_per_token` / `flops_per_token`), so a model with
fewer FLOPs per token takes more steps. Validation loss (bits per byte) against training FLOPs goes
to bench/results/mor_cpu.{json,png}.

  python bench/mor.py --mode cpu --flops 3e13

GPU timing (`--mode gpu`, e.g. on the H100 machine): for 3 recursions with capacities
(1, f, f/2), f the fraction routed deeper, the analytic forward FLOPs and measured train-step time
vs the full-depth recursive model; then decode throughput (tokens/s, batch 1) of an expert-choice
model with early exit (untrained routers: the tokens each recursion processed are reported) vs the
fixed-depth recursive model. Writes bench/results/mor_gpu-T<seq_len>.json.

  python bench/mor.py --mode gpu
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import configs  # noqa: E402
from jaxchunk.config import ModelConfig  # noqa: E402
from jaxchunk.models.language_model import LanguageModel  # noqa: E402
from jaxchunk.models.mor import MoRConfig, MoRLanguageModel, init_mor_cache  # noqa: E402
from jaxchunk.models.mor import mor_flops_per_token  # noqa: E402
from jaxchunk.training.optimizer import make_optimizer  # noqa: E402
from jaxchunk.training.train_step import flops_per_token  # noqa: E402
from timing import median_seconds  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
PRESETS = ("mor_vanilla", "mor_recursive", "mor_expert", "mor_token")
LN2 = math.log(2.0)


def build(preset: str):
  """(model, forward(params, inputs) -> (logits, router_loss), FLOPs per token fn) of a preset."""
  module = __import__(f"configs.{preset}", fromlist=["MOR"])
  run = configs.load_config(preset)
  if module.MOR is None:
    model = LanguageModel(run.model)
    forward = lambda p, x, **kw: (model.apply({"params": p}, x)[0], 0.0)
    flops = lambda n_params: flops_per_token(run.model, n_params, run.data.seq_len)
  else:
    model = MoRLanguageModel(module.MOR)

    def forward(p, x, inference=False):
      logits, aux = model.apply({"params": p}, x, inference=inference)
      return logits, aux["router_loss"]
    flops = lambda n_params: mor_flops_per_token(module.MOR, run.data.seq_len)
  return run, model, forward, flops


def nll(logits, targets):
  """Mean next-token NLL in nats."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], axis=-1))


def train_preset(preset: str, flops_budget: float, evals: int) -> dict:
  """Trains one preset for `flops_budget` training FLOPs; returns its validation curve."""
  from jaxchunk.training import data as data_lib  # needs grain: CPU comparison only
  run, model, forward, flops_fn = build(preset)
  docs = data_lib.load_documents(run.data.source, run.data.paths, column=run.data.column)
  train_docs, val_docs = data_lib.split_documents(docs, run.data.validation_fraction, run.data.seed)
  train_rows = data_lib.pack_documents(train_docs, seq_len=run.data.seq_len, eos_id=run.data.eos_id,
                                       segment_ids=False)
  val_rows = data_lib.pack_documents(val_docs, seq_len=run.data.seq_len, eos_id=run.data.eos_id,
                                     segment_ids=False)
  batches = iter(data_lib.train_dataset(train_rows, batch_size=run.data.global_batch_size,
                                        seed=run.data.seed))
  val = data_lib.validation_batches(val_rows, batch_size=run.data.global_batch_size,
                                    num_batches=run.run.eval_batches)
  params = nn.unbox(jax.jit(model.init)(jax.random.key(run.run.seed),
                                        jnp.zeros((1, run.data.seq_len), jnp.int32))["params"])
  n_params = sum(x.size for x in jax.tree.leaves(params))
  per_token = flops_fn(n_params)
  tokens_per_step = run.data.global_batch_size * run.data.seq_len
  steps = max(1, int(flops_budget / (per_token * tokens_per_step)))
  tx = make_optimizer(run.optim, steps)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, inputs, targets):
    def loss(p):
      logits, router_loss = forward(p, inputs)
      return nll(logits, targets) + router_loss
    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, value

  @jax.jit
  def eval_nll(params, inputs, targets):
    return nll(forward(params, inputs, inference=True)[0], targets)

  def validate():
    return float(np.mean([eval_nll(params, b["inputs"], b["targets"]) for b in val])) / LN2

  curve, start = [], time.time()
  eval_at = {max(1, round(steps * (i + 1) / evals)) for i in range(evals)}
  for i in range(1, steps + 1):
    batch = next(batches)
    params, opt_state, loss = step(params, opt_state, batch["inputs"], batch["targets"])
    if i in eval_at:
      curve.append({"step": i, "flops": i * tokens_per_step * per_token,
                    "val_bits_per_byte": validate(), "wall_s": time.time() - start})
      print(f"{preset}: step {i}/{steps} train {float(loss) / LN2:.3f} "
            f"val {curve[-1]['val_bits_per_byte']:.3f} bits/byte", flush=True)
  return {"params": n_params, "flops_per_token": per_token, "steps": steps, "curve": curve}


def cpu_comparison(flops_budget: float, evals: int) -> None:
  results = {p: train_preset(p, flops_budget, evals) for p in PRESETS}
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, "mor_cpu.json"), "w") as f:
    json.dump(results, f, indent=1)
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for preset, r in results.items():
    ax.plot([c["flops"] for c in r["curve"]], [c["val_bits_per_byte"] for c in r["curve"]], "o-",
            label=f"{preset} ({r['params'] / 1e6:.2f}M params, {r['steps']} steps)")
  ax.set_xlabel("training FLOPs")
  ax.set_ylabel("validation loss (bits per byte)")
  ax.set_title("MoR vs recursive vs vanilla at equal training FLOPs")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(RESULTS, "mor_cpu.png"), dpi=110)
  print("wrote", os.path.join(RESULTS, "mor_cpu.png"))


def gpu_timing(seq_len: int, batch: int, decode_tokens: int) -> None:
  model_cfg = ModelConfig(vocab_size=256, d_model=1024, layer_pattern=("attention",) * 4,
                          num_heads=16, num_kv_heads=16, head_dim=64, mlp_hidden=2816,
                          dtype="bfloat16")
  tokens = jax.random.randint(jax.random.key(0), (batch, seq_len), 0, 256)
  report = {"device": jax.devices()[0].device_kind, "seq_len": seq_len, "batch": batch,
            "train_step": [], "decode": {}}
  for fraction in (None, 1.0, 0.75, 2 / 3, 0.5, 1 / 3):
    caps = (1.0, 1.0, 1.0) if fraction is None else (1.0, fraction, fraction / 2)
    config = MoRConfig(model=model_cfg, num_recursions=3, router=None if fraction is None
                       else "expert", capacities=caps)
    model = MoRLanguageModel(config)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens[:1])["params"])

    def loss(p):
      logits, aux = model.apply({"params": p}, tokens)
      return nll(logits[:, :-1], tokens[:, 1:]) + aux["router_loss"]
    step = jax.jit(jax.grad(loss))
    seconds = median_seconds(step, params)
    report["train_step"].append({"capacities": caps, "router": config.router,
                                 "train_flops_per_token": mor_flops_per_token(config, seq_len),
                                 "step_s": seconds})
    print(report["train_step"][-1], flush=True)
  full = report["train_step"][0]["step_s"]
  for row in report["train_step"]:
    row["speedup_vs_full_depth"] = full / row["step_s"]

  for router in (None, "expert"):
    config = MoRConfig(model=model_cfg, num_recursions=3, router=router)
    model = MoRLanguageModel(config)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(1), tokens[:1, :8])["params"])
    decode = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c), donate_argnums=2)
    cache = init_mor_cache(config, 1, decode_tokens + 1)
    _, aux = decode(params, tokens[:1, :1], cache)
    cache = aux["cache"]
    start = time.perf_counter()
    for i in range(1, decode_tokens):
      _, aux = decode(params, tokens[:1, i:i + 1], cache)
      cache = aux["cache"]
    jax.block_until_ready(cache)
    seconds = time.perf_counter() - start
    counts = [int(c["count"][0]) for c in cache["recursion"]]
    report["decode"][str(router)] = {"tokens_per_s": (decode_tokens - 1) / seconds,
                                     "tokens_per_recursion": counts}
    print(router, report["decode"][str(router)], flush=True)
  os.makedirs(RESULTS, exist_ok=True)
  with open(os.path.join(RESULTS, f"mor_gpu-T{seq_len}.json"), "w") as f:
    json.dump(report, f, indent=1)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--mode", choices=("cpu", "gpu"), default="cpu")
  parser.add_argument("--flops", type=float, default=3e13, help="cpu: training FLOPs per model")
  parser.add_argument("--evals", type=int, default=5, help="cpu: validation points per model")
  parser.add_argument("--seq-len", type=int, default=2048, help="gpu: tokens per row")
  parser.add_argument("--batch", type=int, default=8, help="gpu: rows per train step")
  parser.add_argument("--decode-tokens", type=int, default=256, help="gpu: decode steps")
  args = parser.parse_args()
  if args.mode == "cpu":
    cpu_comparison(args.flops, args.evals)
  else:
    gpu_timing(args.seq_len, args.batch, args.decode_tokens)


if __name__ == "__main__":
  main()
