"""Training throughput of the 350M presets: tokens/s and MFU of the trainer's step, vs attention.

  python bench/train_throughput.py            # attention/rat/rat_local 350M at T = 4K and 16K
  python bench/train_throughput.py --smoke    # tiny configs at T = 64, 128 on CPU in seconds
  python bench/train_throughput.py --presets rat_350m --lengths 4096,32768 --batch_tokens 32768

Each preset's model, sharded train state and jitted train step come from the trainer's own
functions (`make_mesh`, `init_train_state`, `make_train_step`, `make_optimizer`) with the preset's
bf16 compute, remat policy and mesh over all devices; only `data.seq_len` changes per length. A
step takes `--batch_tokens` random tokens (rows = batch_tokens // T, rounded up to a multiple of the
mesh's batch shards); no data pipeline is involved (grain is not imported). Times: `--warmup`
calls (the first compiles), then the median of `--repeats` calls, each ended by
`jax.block_until_ready`. MFU = flops_per_token * tokens/s / (peak FLOP/s per device * devices), with
the trainer's `flops_per_token` and `peak_flops_per_device` (n/a where the peak is unknown, e.g.
CPU). A configuration that runs out of device memory is reported as OOM. Writes the markdown table
to `--out`/train_throughput-<date>.md (`-smoke` added in smoke mode).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import configs  # noqa: E402
from jaxchunk.models import LanguageModel  # noqa: E402
from jaxchunk.training import train_step as step_lib  # noqa: E402
from jaxchunk.training.optimizer import make_optimizer  # noqa: E402

PRESETS = ("attention_350m", "rat_350m", "rat_local_350m")
BASELINE = "attention_350m"
LENGTHS = (4096, 16384)
SMOKE_LENGTHS = (64, 128)
# Smoke mode: each preset's mixers (one block of each kind) at a tiny width.
SMOKE_OVERRIDES = ("model.d_model=32", "model.num_heads=2", "model.num_kv_heads=2",
                   "model.head_dim=16", "model.mlp_hidden=64", "model.window=16")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def preset_config(preset: str, *, smoke: bool) -> configs.RunConfig:
  """The preset's RunConfig with bf16 compute; in smoke mode tiny, one block per mixer kind."""
  config = configs.load_config(preset, ["model.dtype=bfloat16"])
  if not smoke:
    return config
  kinds = ",".join(dict.fromkeys(config.model.layer_pattern))
  return configs.apply_overrides(config, SMOKE_OVERRIDES + (f"model.layer_pattern={kinds}",))


def random_batch(key, rows: int, seq_len: int, vocab_size: int) -> dict:
  """A batch of uniform random tokens laid out like the trainer's (one stream per row)."""
  window = jax.random.randint(key, (rows, seq_len + 1), 0, vocab_size, jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (rows, seq_len))
  return {"inputs": window[:, :-1], "targets": window[:, 1:], "positions": positions,
          "segment_ids": jnp.ones((rows, seq_len), jnp.int32),
          "loss_mask": jnp.ones((rows, seq_len), jnp.float32)}


def measure(config: configs.RunConfig, seq_len: int, *, batch_tokens: int, warmup: int,
            repeats: int) -> dict:
  """Times the train step of `config` at `seq_len`; returns a row of the results table."""
  config = dataclasses.replace(config, data=dataclasses.replace(config.data, seq_len=seq_len))
  mesh = step_lib.make_mesh(config.mesh)
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  rows = math.ceil(max(1, batch_tokens // seq_len) / shards) * shards
  model = LanguageModel(config.model)
  tx = make_optimizer(config.optim, config.run.steps)
  state, shardings = step_lib.init_train_state(model, tx, mesh, seed=config.run.seed,
                                               seq_len=seq_len)
  num_params = step_lib.count_params(state["params"])
  train_step = step_lib.make_train_step(model, tx, shardings, mesh, use_segment_ids=False,
                                        remat=config.run.remat)
  batch = jax.device_put(random_batch(jax.random.key(1), rows, seq_len, config.model.vocab_size),
                         step_lib.batch_sharding(mesh))
  times = []
  for call in range(warmup + repeats):
    start = time.perf_counter()
    state, metrics = jax.block_until_ready(train_step(state, batch))
    if call >= warmup:
      times.append(time.perf_counter() - start)
  loss = float(metrics["loss"])
  if not math.isfinite(loss):
    raise FloatingPointError(f"train step loss is {loss} at T={seq_len}")
  seconds = statistics.median(times)
  tokens_per_s = rows * seq_len / seconds
  peak = step_lib.peak_flops_per_device(jax.devices()[0], config.run.peak_flops_per_device)
  flops = step_lib.flops_per_token(config.model, num_params, seq_len)
  mfu = flops * tokens_per_s / (peak * jax.device_count()) if peak else None
  return {"rows": rows, "params": num_params, "step_s": seconds, "tokens_per_s": tokens_per_s,
          "mfu": mfu}


def measure_or_oom(config, seq_len: int, **kwargs) -> dict | None:
  """`measure`, or None when the device runs out of memory."""
  try:
    return measure(config, seq_len, **kwargs)
  except jax.errors.JaxRuntimeError as err:
    if "RESOURCE_EXHAUSTED" not in str(err):
      raise
    return None


def render(results: dict[tuple[str, int], dict | None], presets, lengths) -> str:
  """The markdown table: one row per (preset, T), tokens/s relative to BASELINE at the same T."""
  lines = ["| preset | T | rows | params (M) | step ms | tokens/s | MFU | tokens/s vs attention |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for seq_len in lengths:
    baseline = results.get((BASELINE, seq_len))
    for preset in presets:
      row = results[(preset, seq_len)]
      if row is None:
        lines.append(f"| {preset} | {seq_len} | | | OOM | | | |")
        continue
      mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "n/a"
      ratio = f"{row['tokens_per_s'] / baseline['tokens_per_s']:.2f}x" if baseline else "n/a"
      lines.append(f"| {preset} | {seq_len} | {row['rows']} | {row['params'] / 1e6:.2f} | "
                   f"{1e3 * row['step_s']:.1f} | {row['tokens_per_s']:,.0f} | {mfu} | {ratio} |")
  return "\n".join(lines)


def versions() -> str:
  device = jax.devices()[0]
  return (f"device: {jax.device_count()} x {device.device_kind} ({device.platform}); "
          f"jax {jax.__version__}, flax {flax.__version__}, optax {optax.__version__}, "
          f"numpy {np.__version__}")


def main(argv=None) -> str:
  """Runs the benchmark; returns the path of the written report."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true",
                      help=f"tiny configs at T = {SMOKE_LENGTHS}, 1 warm-up, 2 repeats")
  parser.add_argument("--presets", default=",".join(PRESETS))
  parser.add_argument("--lengths", default=None,
                      help=f"sequence lengths, comma-separated (default {LENGTHS}, smoke "
                           f"{SMOKE_LENGTHS})")
  parser.add_argument("--batch_tokens", type=int, default=65536, help="tokens per train step")
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default=RESULTS, help="folder of the report")
  args = parser.parse_args(argv)
  presets = tuple(args.presets.split(","))
  if args.lengths:
    lengths = tuple(int(t) for t in args.lengths.split(","))
  else:
    lengths = SMOKE_LENGTHS if args.smoke else LENGTHS
  batch_tokens = 256 if args.smoke else args.batch_tokens
  warmup, repeats = (1, 2) if args.smoke else (args.warmup, args.repeats)
  results = {}
  for preset in presets:
    config = preset_config(preset, smoke=args.smoke)
    for seq_len in lengths:
      results[(preset, seq_len)] = measure_or_oom(config, seq_len, batch_tokens=batch_tokens,
                                                  warmup=warmup, repeats=repeats)
      print(f"{preset} T={seq_len}: {results[(preset, seq_len)]}", flush=True)
  date = datetime.date.today().isoformat()
  first = preset_config(presets[0], smoke=args.smoke)
  mesh = dict(step_lib.make_mesh(first.mesh).shape)
  report = (f"# Train-step throughput{' (smoke: tiny configs)' if args.smoke else ''}\n\n"
            f"date {date}; {versions()}\n\n"
            f"`bench/train_throughput.py {' '.join(sys.argv[1:] if argv is None else argv)}`: "
            f"the trainer's jitted train step (AdamW, {first.model.dtype} compute, model.remat "
            f"{first.model.remat!r}, run.remat {first.run.remat!r}, mesh {mesh}, impl={first.model.impl!r}), about {batch_tokens} "
            f"random tokens per step, median of {repeats} steps after {warmup} warm-up.\n\n"
            f"{render(results, presets, lengths)}\n")
  print("\n" + report)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"train_throughput-{date}{'-smoke' if args.smoke else ''}.md")
  with open(path, "w") as f:
    f.write(report)
  print(f"wrote {path}")
  return path


if __name__ == "__main__":
  main()
