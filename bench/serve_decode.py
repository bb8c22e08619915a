"""Serving decode throughput: RAT+local vs attention at 4K context, the engine vs HF generate.

The engine's decode tokens/s for two presets at equal batch, and for a Llama-style Hugging Face
checkpoint served by the engine against transformers' `generate` on the same weights.

  python bench/serve_decode.py --out bench/results          # GPU: both parts
  python bench/serve_decode.py --smoke --out /tmp/bench      # tiny configs on CPU, seconds
  python bench/serve_decode.py --parts presets --batches 64  # one part, one batch

Presets (issue 7: RAT+local decode throughput at 4K context >= 5x attention's at equal batch). For
each preset of `--presets` (random weights, bf16 parameters and compute, impl "auto") and each
batch of `--batches`, an `Engine` with `num_slots` = batch gets `batch` requests of `--context`
random prompt tokens. They are prefilled together (`prefill_first`; untimed, compilation included),
then `--warmup-steps` engine steps run untimed and `--steps` are timed. Each timed `engine.step()`
must decode `--decode-steps` tokens for every slot (`EngineConfig.decode_steps`: that many decode
steps in one jitted call; else the run stops with an error). tokens/s = batch * decode_steps *
steps / their wall time: whole engine steps (host scheduling, the jitted decode over paged KV / RAT states,
on-device greedy sampling, fetching the tokens). The ratio column divides by the first preset's
tokens/s at the same batch. "jitted decode ms" is the device's share: the same decode step
dispatched `--steps` times back to back without fetching tokens, per decode token.

Llama (issue 7: the engine serving a Llama checkpoint decodes >= 5x faster than transformers'
`generate` on the same weights and batch). A random-init `transformers.LlamaForCausalLM` in bf16
(`LLAMA`: hidden 1024, 16 layers, 16 heads, vocab 32000) is saved with `save_pretrained` into a
temporary folder and loaded with `jaxchunk.serving.hf.load_llama` (bf16 parameters and compute).
Both generate greedily for the same `--llama-batch` random prompts of `--llama-prompt` tokens
exactly n = `--llama-new` new tokens: HF `generate` (torch, default dynamic cache,
min_new_tokens = max_new_tokens = n) and `Engine.generate` (num_slots = batch, `prefill_first`, so
both prefill the whole batch and then decode it together). Each is timed for n and for 1 new
tokens (`timing.median_seconds`: median of `--repeats` calls after a warm-up call); decode
tokens/s = batch * (n - 1) / (t_n - t_1), end-to-end tokens/s = batch * n / t_n. This part is
skipped, with the reason in the report, when torch or transformers is missing or torch sees no
CUDA device (in --smoke, torch runs on the CPU). Each part can run alone (`--parts`).

Writes serve_decode-<date>.md and serve_decode-<date>.json (`-smoke` added in smoke mode) to
`--out`, printing each result as it comes.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import importlib.util
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import configs  # noqa: E402
from jaxchunk.models import LanguageModel  # noqa: E402
from jaxchunk.serving import Engine, EngineConfig, SamplingParams  # noqa: E402
from jaxchunk.serving.hf import load_llama  # noqa: E402
from jaxchunk.serving.scheduler import Status  # noqa: E402
from report import versions, write_report  # noqa: E402
from timing import median_seconds, profile_kernels  # noqa: E402

PRESETS = ("attention_350m", "rat_local_350m")
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
VERSIONED = ("jax", "jaxlib", "flax", "torch", "transformers")  # packages named in the reports
# Smoke mode: each preset's mixers (one block of each kind) at a tiny width.
SMOKE_OVERRIDES = ("model.d_model=32", "model.num_heads=2", "model.num_kv_heads=2",
                   "model.head_dim=16", "model.mlp_hidden=64", "model.window=16")
# transformers.LlamaConfig fields of the Llama-style model (full and smoke).
LLAMA = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
             num_attention_heads=16, num_key_value_heads=16, tie_word_embeddings=False)
SMOKE_LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
# Sizes that --smoke replaces (argument name -> smoke value).
SMOKE_ARGS = dict(batches="2", context=64, steps=4, warmup_steps=1, decode_steps=2, chunk_size=32, page_size=16,
                  llama_batch=2, llama_prompt=8, llama_new=6, repeats=1)


def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def preset_config(preset: str, *, smoke: bool):
  """The preset's ModelConfig with bf16 parameters and compute; tiny in smoke mode."""
  overrides = ["model.dtype=bfloat16", "model.param_dtype=bfloat16"]
  if smoke:
    kinds = ",".join(dict.fromkeys(configs.load_config(preset).model.layer_pattern))
    overrides += list(SMOKE_OVERRIDES) + [f"model.layer_pattern={kinds}"]
  return configs.load_config(preset, overrides).model


def count_params(variables) -> int:
  return sum(x.size for x in jax.tree.leaves(variables))


def step_tokens(engine: Engine) -> int:
  """Runs one engine step; returns how many tokens it produced."""
  return sum(event.token is not None for event in engine.step())


def dispatch_decode(engine: Engine, running, many: bool) -> None:
  """Dispatches the engine's jitted decode (`many`: its multi-step decode) for the `running`
  requests without recording anything (their positions do not advance)."""
  decode = engine._decode_many if many else engine._decode
  engine._run(decode, engine._decode_args(running))


def decode_throughput(model: LanguageModel, variables, *, batch: int, context: int, steps: int,
                      warmup_steps: int, chunk_size: int, page_size: int, seed: int,
                      decode_steps: int = 1, profile: bool = False,
                      pack_projections: bool = True) -> dict:
  """Fills `batch` slots with prefilled `context`-token prompts, then times `steps` engine steps
  of `decode_steps` decode tokens each."""
  # the prefill's token, the steps, a burst to spare
  max_tokens = 1 + (warmup_steps + steps + 1) * decode_steps
  engine = Engine(model, variables, EngineConfig(
      num_slots=batch, max_len=round_up(context + max_tokens, page_size), page_size=page_size,
      chunk_size=chunk_size, prefill_first=True, decode_steps=decode_steps,
      pack_projections=pack_projections))
  rng = np.random.default_rng(seed)
  vocab = model.config.vocab_size
  ids = [engine.submit(list(rng.integers(0, vocab, size=context)),
                       SamplingParams(max_tokens=max_tokens)) for _ in range(batch)]
  start = time.perf_counter()
  produced = 0
  while produced < batch:  # prefill: one token per request
    produced += step_tokens(engine)
  fill_s = time.perf_counter() - start
  for _ in range(warmup_steps):
    step_tokens(engine)
  traces, times = engine.num_traces, []
  for _ in range(steps):
    start = time.perf_counter()
    tokens = step_tokens(engine)
    times.append(time.perf_counter() - start)
    if tokens != batch * decode_steps:
      raise RuntimeError(f"a timed step decoded {tokens} tokens, expected {decode_steps} per slot "
                         f"({batch} slots)")
  if engine.num_traces != traces:
    raise RuntimeError("the engine compiled during the timed steps")
  # The jitted decode alone: the same step dispatched `steps` times without fetching its tokens
  # (each rewrites the same positions), so host work hides behind the device.
  running = [r for r in engine._requests.values() if r.status is Status.DECODE]
  jax.block_until_ready(engine.cache)
  start = time.perf_counter()
  many = decode_steps > 1
  for _ in range(steps):
    dispatch_decode(engine, running, many)
  jax.block_until_ready(engine.cache)
  device_ms = 1e3 * (time.perf_counter() - start) / (steps * decode_steps)
  kernels = (profile_kernels(lambda: dispatch_decode(engine, running, many), steps,
                             wait=lambda: engine.cache, per_call=decode_steps,
                             label="decode token") if profile else None)
  cache_bytes = sum(x.nbytes for x in jax.tree.leaves(engine.cache))
  for request_id in ids:
    engine.cancel(request_id)
    engine.pop_output(request_id)
  del engine
  gc.collect()  # the engine's jitted methods hold it in a cycle: free its cache now
  return {"batch": batch, "context": context, "steps": steps, "decode_steps": decode_steps,
          "fill_s": fill_s,
          "step_ms_p50": 1e3 * float(np.percentile(times, 50)),
          "step_ms_p99": 1e3 * float(np.percentile(times, 99)), "device_step_ms": device_ms,
          "tokens_per_s": batch * decode_steps * steps / sum(times),
          "cache_gb": cache_bytes / 1e9,
          **({"kernels_ms_per_token": kernels} if kernels else {})}


def bench_presets(args) -> list[dict]:
  """One row per (preset, batch), with tokens/s relative to the first preset at the same batch."""
  rows = []
  for preset in args.presets.split(","):
    config = preset_config(preset, smoke=args.smoke)
    model = LanguageModel(config)
    variables = jax.jit(lambda: model.init(jax.random.key(args.seed),
                                           jnp.zeros((1, 1), jnp.int32)))()
    for batch in (int(b) for b in args.batches.split(",")):
      row = {"preset": preset, "params_m": count_params(variables) / 1e6, "batch": batch,
             "context": args.context}
      try:
        row.update(decode_throughput(model, variables, batch=batch, context=args.context,
                                     steps=args.steps, warmup_steps=args.warmup_steps,
                                     chunk_size=args.chunk_size, page_size=args.page_size,
                                     seed=args.seed, decode_steps=args.decode_steps,
                                     profile=args.profile,
                                     pack_projections=args.pack_projections))
      except jax.errors.JaxRuntimeError as err:  # the row says OOM; the other batches still run
        if "RESOURCE_EXHAUSTED" not in str(err):
          raise
        row["oom"] = True
        gc.collect()  # frees the failed engine's buffers (its frames held them in a cycle)
      base = next(r for r in rows + [row] if r["batch"] == batch)
      row["vs_first"] = (None if "oom" in row or "oom" in base
                         else row["tokens_per_s"] / base["tokens_per_s"])
      rows.append(row)
      print(f"{preset} batch={batch}: {json.dumps(row)}", flush=True)
    del variables
    gc.collect()
  return rows


def render_presets(rows: list[dict], args) -> str:
  first = args.presets.split(",")[0]
  lines = [f"| preset | params (M) | batch | context | fill s | step ms p50 | step ms p99 | "
           f"jitted decode ms | tokens/s | vs {first} | cache GB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
  for r in rows:
    if "oom" in r:
      lines.append(f"| {r['preset']} | {r['params_m']:.4g} | {r['batch']} | {r['context']} | "
                   "OOM | | | | | | |")
      continue
    ratio = "-" if r["vs_first"] is None else f"{r['vs_first']:.2f}x"
    lines.append(f"| {r['preset']} | {r['params_m']:.4g} | {r['batch']} | {r['context']} | "
                 f"{r['fill_s']:.1f} | {r['step_ms_p50']:.2f} | {r['step_ms_p99']:.2f} | "
                 f"{r['device_step_ms']:.2f} | "
                 f"{r['tokens_per_s']:,.0f} | {ratio} | {r['cache_gb']:.4g} |")
  ratios = ", ".join(f"{r['preset']} {r['vs_first']:.3f}x at batch {r['batch']}"
                     for r in rows if r["preset"] != first and r["vs_first"] is not None)
  lines.append(f"\ntokens/s relative to {first} at equal batch: {ratios} (issue 7 target for "
               "RAT+local: >= 5x).")
  return "\n".join(lines)


def hf_unavailable(smoke: bool) -> str | None:
  """Why the Hugging Face comparison cannot run here, or None."""
  for package in ("torch", "transformers"):
    if importlib.util.find_spec(package) is None:
      return f"skipped: {package} is not installed (pip install torch transformers)"
  import torch
  if not (smoke or torch.cuda.is_available()):
    return "skipped: torch sees no CUDA device"
  return None


def generate_rates(fn, *, batch: int, new: int, repeats: int) -> dict:
  """Rates of `fn(n)` (generates n tokens for each of `batch` prompts), timed for n = new and 1."""
  t_new = median_seconds(fn, new, repeats=repeats)
  t_one = median_seconds(fn, 1, repeats=repeats)
  return {"t_new_s": t_new, "t_one_s": t_one, "end_to_end_tokens_per_s": batch * new / t_new,
          "decode_tokens_per_s": batch * (new - 1) / (t_new - t_one)}


def hf_rates(hf_model, prompts: np.ndarray, *, new: int, repeats: int) -> dict:
  """`generate_rates` of HF `generate` (greedy, exactly n new tokens) on prompts [batch, len]."""
  import torch

  device = hf_model.device
  input_ids = torch.as_tensor(prompts, device=device)
  expected = lambda n: (prompts.shape[0], prompts.shape[1] + n)

  def hf_generate(n: int) -> None:
    with torch.inference_mode():
      out = hf_model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                              max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    if device.type == "cuda":
      torch.cuda.synchronize()
    if tuple(out.shape) != expected(n):
      raise RuntimeError(f"HF generate returned {tuple(out.shape)}, expected {expected(n)}")

  return generate_rates(hf_generate, batch=prompts.shape[0], new=new, repeats=repeats)


def engine_rates(folder: str, prompts: np.ndarray, *, new: int, repeats: int, page_size: int,
                 chunk_size: int, decode_steps: int, pack_projections: bool = True) -> dict:
  """`generate_rates` of `Engine.generate` (prefill-first, one slot per prompt) on the checkpoint."""
  config, variables = load_llama(folder, dtype="bfloat16", param_dtype="bfloat16")
  batch, prompt_len = prompts.shape
  engine = Engine(LanguageModel(config), jax.device_put(variables), EngineConfig(
      num_slots=batch, max_len=round_up(prompt_len + new, page_size), page_size=page_size,
      chunk_size=chunk_size, prefill_first=True, decode_steps=decode_steps,
      pack_projections=pack_projections))
  prompt_lists = [list(p) for p in prompts]

  def engine_generate(n: int) -> None:
    outputs = engine.generate(prompt_lists, SamplingParams(max_tokens=n))
    if any(len(o.tokens) != n for o in outputs):
      raise RuntimeError(f"the engine generated {[len(o.tokens) for o in outputs]} tokens, not {n}")

  return generate_rates(engine_generate, batch=batch, new=new, repeats=repeats)


def bench_llama(args) -> dict:
  """Our engine vs transformers' generate on one random-init Llama checkpoint."""
  import torch
  import transformers

  shape = SMOKE_LLAMA if args.smoke else LLAMA
  device = "cuda" if torch.cuda.is_available() else "cpu"
  prompt_len, new = args.llama_prompt, args.llama_new
  torch.manual_seed(args.seed)
  hf_config = transformers.LlamaConfig(**shape, max_position_embeddings=prompt_len + new)
  with torch.device(device):
    hf_model = transformers.LlamaForCausalLM(hf_config)
  hf_model = hf_model.to(torch.bfloat16).eval()
  prompts = np.random.default_rng(args.seed).integers(0, shape["vocab_size"],
                                                      size=(args.llama_batch, prompt_len))
  result = {"model": shape, "batch": args.llama_batch, "prompt": prompt_len, "new_tokens": new,
            "torch_device": device}
  with tempfile.TemporaryDirectory() as folder:
    hf_model.save_pretrained(folder)
    result["hf"] = hf_rates(hf_model, prompts, new=new, repeats=args.repeats)
    print(f"HF generate: {json.dumps(result['hf'])}", flush=True)
    del hf_model
    if device == "cuda":
      torch.cuda.empty_cache()
    result["jaxchunk"] = engine_rates(folder, prompts, new=new, repeats=args.repeats,
                                      page_size=args.page_size, chunk_size=args.chunk_size,
                                      decode_steps=args.decode_steps,
                                      pack_projections=args.pack_projections)
  print(f"jaxchunk Engine: {json.dumps(result['jaxchunk'])}", flush=True)
  gc.collect()  # free the engine's cache (its jitted methods hold it in a cycle)
  for rate in ("decode_tokens_per_s", "end_to_end_tokens_per_s"):
    result[f"{rate}_ratio"] = result["jaxchunk"][rate] / result["hf"][rate]
  return result


def render_llama(result: dict) -> str:
  if "skipped" in result:
    return result["skipped"]
  lines = ["| engine | batch | prompt | new tokens | t(new) s | t(1) s | decode tokens/s | "
           "end-to-end tokens/s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name, key in (("jaxchunk Engine", "jaxchunk"), ("HF generate", "hf")):
    r = result[key]
    lines.append(f"| {name} | {result['batch']} | {result['prompt']} | {result['new_tokens']} | "
                 f"{r['t_new_s']:.3f} | {r['t_one_s']:.3f} | {r['decode_tokens_per_s']:,.0f} | "
                 f"{r['end_to_end_tokens_per_s']:,.0f} |")
  lines.append(f"\njaxchunk / HF: decode {result['decode_tokens_per_s_ratio']:.2f}x, end-to-end "
               f"{result['end_to_end_tokens_per_s_ratio']:.2f}x (target >= 5x); torch device "
               f"{result['torch_device']}; model {result['model']}.")
  return "\n".join(lines)


def main(argv=None) -> str:
  """Runs the benchmark; returns the path of the written markdown report."""
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true",
                      help=f"tiny configs on CPU; sets {', '.join(SMOKE_ARGS)}")
  parser.add_argument("--parts", default="presets,llama", help="presets and/or llama")
  parser.add_argument("--presets", default=",".join(PRESETS), help="first one is the baseline")
  parser.add_argument("--batches", default="16,64")
  parser.add_argument("--context", type=int, default=4096, help="prompt tokens before decoding")
  parser.add_argument("--steps", type=int, default=128, help="timed engine steps")
  parser.add_argument("--decode-steps", type=int, default=8,
                      help="decode tokens per slot per engine step (EngineConfig.decode_steps)")
  parser.add_argument("--warmup-steps", type=int, default=2)
  parser.add_argument("--chunk-size", type=int, default=1024, help="largest prefill piece")
  parser.add_argument("--page-size", type=int, default=64)
  parser.add_argument("--llama-batch", type=int, default=16)
  parser.add_argument("--llama-prompt", type=int, default=128)
  parser.add_argument("--llama-new", type=int, default=256)
  parser.add_argument("--repeats", type=int, default=3, help="timed generate calls (median)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--unpacked", dest="pack_projections", action="store_false",
                      help="EngineConfig(pack_projections=False): one kernel per projection")
  parser.add_argument("--profile", action="store_true",
                      help="print the costliest GPU kernels of the jitted decode (profiler trace)")
  parser.add_argument("--out", default=RESULTS, help="folder of the report")
  args = parser.parse_args(argv)
  if args.smoke:
    for name, value in SMOKE_ARGS.items():
      setattr(args, name, value)
  parts = set(args.parts.split(","))
  if not parts or parts - {"presets", "llama"}:
    parser.error(f"--parts must name presets and/or llama, got {args.parts!r}")

  results = {"args": vars(args), "date": datetime.date.today().isoformat(),
             "versions": versions(*VERSIONED)}
  print(results["versions"], flush=True)
  sections = []
  if "presets" in parts:
    rows = bench_presets(args)
    results["presets"] = rows
    sections.append(
        f"## Decode at {args.context} tokens of context\n\n"
        f"Each slot holds a prefilled {args.context}-token prompt; {args.steps} timed engine steps "
        f"after {args.warmup_steps} untimed ones, each decoding {args.decode_steps} tokens per slot "
        f"in one jitted call (`decode_steps`; "
        f"{'packed' if args.pack_projections else 'unpacked'} projections; page size "
        f"{args.page_size}; bf16 parameters, compute and caches; random weights). fill s = "
        f"prefill of all slots incl. compilation (not in tokens/s).\n\n"
        f"{render_presets(rows, args)}")
  if "llama" in parts:
    reason = hf_unavailable(args.smoke)
    results["llama"] = {"skipped": reason} if reason else bench_llama(args)
    if reason:
      print(f"Llama vs HF generate: {reason}", flush=True)
    sections.append("## Llama-style checkpoint: jaxchunk Engine vs transformers generate\n\n"
                    + render_llama(results["llama"]))

  report = (f"# Serving decode throughput{' (smoke: tiny configs)' if args.smoke else ''}\n\n"
            f"date {results['date']}; {results['versions']}\n\n"
            f"`bench/serve_decode.py {' '.join(sys.argv[1:] if argv is None else argv)}`\n\n"
            + "\n\n".join(sections) + "\n")
  print("\n" + report, flush=True)
  return write_report(args.out, f"serve_decode-{results['date']}{'-smoke' if args.smoke else ''}",
                      report, results)


if __name__ == "__main__":
  main()
