"""Load generator for the serving engine: Poisson arrivals, prompt/output length distributions.

Reports TTFT (arrival -> first token), TBT (gap between consecutive tokens of a request) p50/p99,
and output-token throughput, for the chunked-prefill scheduler and (--baseline) the prefill-first
one run on the same trace. Runs the engine in-process (no HTTP), on a random-init model.

  python bench/serve_load.py --smoke                      # tiny model on CPU, seconds
  python bench/serve_load.py --pattern rat,local --d-model 1024 --layers 24 --rate 4 \
      --prompt-mean 2048 --output-mean 128 --requests 64 --baseline --out bench/results/x.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.config import ModelConfig
from jaxchunk.models.language_model import LanguageModel
from jaxchunk.serving import Engine, EngineConfig, SamplingParams


def make_trace(rng, args):
  """(arrival offsets in s, prompt token lists, output lengths) of a Poisson trace."""
  gaps = rng.exponential(1.0 / args.rate, size=args.requests)
  prompt_lens = np.clip(rng.exponential(args.prompt_mean, size=args.requests).astype(int), 1,
                        args.max_len // 2)
  output_lens = np.clip(rng.exponential(args.output_mean, size=args.requests).astype(int), 1,
                        args.max_len // 2)
  prompts = [list(rng.integers(0, args.vocab, size=n)) for n in prompt_lens]
  return np.cumsum(gaps), prompts, output_lens


def run(engine: Engine, trace) -> dict:
  """Replays `trace` against the engine in real time; returns the latency statistics."""
  arrivals, prompts, output_lens = trace
  start = time.perf_counter()
  ids, next_request = [], 0
  while next_request < len(prompts) or engine.has_work():
    now = time.perf_counter() - start
    while next_request < len(prompts) and arrivals[next_request] <= now:
      ids.append(engine.submit(prompts[next_request],
                               SamplingParams(max_tokens=int(output_lens[next_request]))))
      next_request += 1
    if engine.has_work():
      engine.step()
    else:
      time.sleep(min(1e-3, max(0.0, arrivals[next_request] - now)))
  elapsed = time.perf_counter() - start
  outputs = [engine.pop_output(i) for i in ids]
  ttft = [o.first_token_time - o.arrival_time for o in outputs]
  tbt = np.concatenate([np.diff(o.token_times) for o in outputs if len(o.token_times) > 1] or [[0]])
  tokens = sum(len(o.tokens) for o in outputs)
  return {"requests": len(outputs), "output_tokens": tokens, "seconds": elapsed,
          "throughput_tok_s": tokens / elapsed,
          "ttft_p50_s": float(np.percentile(ttft, 50)), "ttft_p99_s": float(np.percentile(ttft, 99)),
          "tbt_p50_s": float(np.percentile(tbt, 50)), "tbt_p99_s": float(np.percentile(tbt, 99))}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny model and trace (CPU)")
  parser.add_argument("--pattern", default="rat,local")
  parser.add_argument("--d-model", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=24, help="repeats of the pattern / its length")
  parser.add_argument("--heads", type=int, default=16)
  parser.add_argument("--vocab", type=int, default=256)
  parser.add_argument("--dtype", default="bfloat16")
  parser.add_argument("--slots", type=int, default=16)
  parser.add_argument("--max-len", type=int, default=4096)
  parser.add_argument("--page-size", type=int, default=64)
  parser.add_argument("--chunk-size", type=int, default=256)
  parser.add_argument("--requests", type=int, default=64)
  parser.add_argument("--rate", type=float, default=2.0, help="mean arrivals per second")
  parser.add_argument("--prompt-mean", type=float, default=1024)
  parser.add_argument("--output-mean", type=float, default=128)
  parser.add_argument("--baseline", action="store_true", help="also run prefill-first")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", help="write the results as JSON here")
  args = parser.parse_args()
  if args.smoke:
    args.d_model, args.layers, args.heads, args.dtype = 64, 2, 2, "float32"
    args.slots, args.max_len, args.page_size, args.chunk_size = 4, 128, 8, 16
    args.requests, args.rate, args.prompt_mean, args.output_mean = 16, 50.0, 24, 8

  pattern = tuple(args.pattern.split(","))
  pattern = pattern * max(1, args.layers // len(pattern))
  config = ModelConfig(vocab_size=args.vocab, d_model=args.d_model, layer_pattern=pattern,
                       num_heads=args.heads, num_kv_heads=args.heads,
                       head_dim=args.d_model // args.heads, mlp_hidden=args.d_model * 8 // 3,
                       dtype=args.dtype)
  model = LanguageModel(config)
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))()
  trace = make_trace(np.random.default_rng(args.seed), args)
  results = {"args": vars(args), "device": str(jax.devices()[0])}
  for name, prefill_first in [("chunked", False)] + [("prefill_first", True)] * args.baseline:
    engine = Engine(model, variables, EngineConfig(
        num_slots=args.slots, max_len=args.max_len, page_size=args.page_size,
        chunk_size=args.chunk_size, prefill_first=prefill_first))
    engine.warmup()
    results[name] = run(engine, trace)
    print(name, json.dumps(results[name]), flush=True)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)


if __name__ == "__main__":
  main()
