"""Load generator for the serving engine: Poisson arrivals, prompt/output length distributions.

Reports TTFT (arrival -> first token), TBT (gap between consecutive tokens of a request) p50/p99,
and output-token throughput, for the chunked-prefill scheduler and (unless --no-baseline) the
prefill-first one run on the same trace, against a steady state without arrivals. Runs the engine
in-process (no HTTP), on a random-init model.

  python bench/serve_load.py --out bench/results           # rat_local_350m, GPU
  python bench/serve_load.py --smoke --out /tmp/bench       # tiny model on CPU, seconds
  python bench/serve_load.py --preset attention_350m --rate 4 --prompt-mean 2048 --requests 64

The model is a preset of configs/ (`--preset`, default rat_local_350m) with random weights, bf16
parameters and compute (`serve_decode.preset_config`; in --smoke one tiny block per mixer kind).

Steady state (issue 7: "TBT p99 while long prompts keep arriving <= 1.5x steady-state decode TBT
with chunked prefill"): before the trace, the chunked engine gets `--slots` requests at once, each
with a prompt of `--prompt-mean` tokens (the trace's typical context, at most max_len / 2); once
all are prefilled and one step has decoded every slot, `--steady-steps` steps are timed, each
decoding one token for every slot and nothing else (no arrivals, no prefill). Its TBT p50 is the
steady-state decode TBT, the time per token of a full decode batch, and the base of the ratio
column (a steady state has one step time, so p50 is its typical value; its p99 is in the table).
TBT ratio = a run's TBT p99 / steady TBT p50.

The default trace keeps the decode batch busy while long prompts arrive: 8 arrivals a second of
prompts of mean 1024 tokens and outputs of mean 512, about 11 requests decoding at once (Little's
law at ~2.7 ms a step), so a prompt prefilled in one go (prefill-first) stalls about a dozen
requests each time. Until 2026-12-06 it was 64 requests at 2/s with outputs of mean 128: one or two
requests decoding, so the baseline's stalls touched ~1% of the gaps and barely reached its p99
(`bench/results/serve_load-2026-12-06-seed1-baseline.md`).

Where a tail comes from: the report counts each run's steps by kind (decodes only, decodes with
one prefill piece in one call, pieces only) with their wall-time percentiles and the p50 / p99 of
each part of a step's host time (schedule, dispatch, fetch, record: `Engine.last_step_times`), and
lists the slowest steps that decoded; `--call-times REPS` also times each jitted call shape alone
on the idle engine (the host's dispatch, and until its results are ready). `--calls-only` times
just the decode and the longest mixed call that way, with no warm-up of the other shapes and no
trace (serve_load-<date>-calls.md, XLA_FLAGS in its header): one process per setting of XLA's
flags, to see where a call's dispatch goes:

  i=0; for f in "" --xla_gpu_enable_command_buffer=; do
    XLA_FLAGS="$f" python bench/serve_load.py --calls-only --out /tmp/calls/$((i++)); done

Python's cyclic garbage collector is off while a run or the steady state is timed (collected and
frozen before): its pauses land on random steps, as in any serving process that does not tune it,
and would show in the p99 of both schedulers alike.

The chunked engine runs first unless `--baseline-first` (to check that the order does not change
the comparison). Both engines compile every step shape (`Engine.warmup`) before their run; a persistent
compilation cache in a temporary folder lets the second engine reuse the first one's executables
(unless JAX_COMPILATION_CACHE_DIR names another folder). Writes serve_load-<date>.md and
serve_load-<date>.json (`-smoke` added in smoke mode) to `--out`.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.models.language_model import LanguageModel
from jaxchunk.serving import Engine, EngineConfig, SamplingParams
from report import versions, write_report
from serve_decode import RESULTS, VERSIONED, preset_config
from timing import profile_host, profile_kernels, profile_launches

# Calls of a shape before `call_times` times it: on a GPU the first runs XLA's executable op by op
# and the second records its CUDA graphs (docs/serving.md).
UNTIMED_CALLS = 2
# Sizes that --smoke replaces (argument name -> smoke value).
SMOKE_ARGS = dict(slots=4, max_len=128, page_size=8, chunk_size=4, requests=16, rate=50.0,
                  prompt_mean=24, output_mean=8, steady_steps=8, call_times=2)


def make_trace(rng, args, vocab: int):
  """(arrival offsets in s, prompts (int arrays: the engine checks an array of a thousand tokens
  in ~0.05 ms, a list of NumPy scalars in ~0.2), output lengths) of a Poisson trace."""
  gaps = rng.exponential(1.0 / args.rate, size=args.requests)
  prompt_lens = np.clip(rng.exponential(args.prompt_mean, size=args.requests).astype(int), 1,
                        args.max_len // 2)
  output_lens = np.clip(rng.exponential(args.output_mean, size=args.requests).astype(int), 1,
                        args.max_len // 2)
  prompts = [rng.integers(0, vocab, size=n) for n in prompt_lens]
  return np.cumsum(gaps), prompts, output_lens


def percentiles_ms(seconds) -> tuple[float, float]:
  """(p50, p99) of `seconds`, in ms."""
  return 1e3 * float(np.percentile(seconds, 50)), 1e3 * float(np.percentile(seconds, 99))


@contextlib.contextmanager
def gc_paused():
  """Collects, freezes and disables Python's cyclic GC for the block (see the module docstring)."""
  gc.collect()
  gc.freeze()
  gc.disable()
  try:
    yield
  finally:
    gc.enable()
    gc.unfreeze()


STEP_KINDS = ("decode", "mixed", "prefill")  # decodes only / decodes + one piece / pieces only


def step_kind(schedule) -> str | None:
  """The kind of an engine step from its `Schedule` (None: it ran nothing)."""
  if schedule.decodes:
    return "mixed" if schedule.prefills else "decode"
  return "prefill" if schedule.prefills else None


def step_summary(steps: list[dict], slowest: int = 8) -> dict:
  """Per step kind: count, wall-time p50/p90/p99 (ms) and the p50 and p99 of each part of the
  step (`Engine.last_step_times`), decode steps also split by the kind of the step before them
  (a step fetches the previous step's tokens, so it waits for that step's device work); and the
  `slowest` steps that decoded."""
  groups = {kind: [s for s in steps if s["kind"] == kind] for kind in STEP_KINDS}
  decodes = [(prev, s) for prev, s in zip([None] + steps[:-1], steps) if s["kind"] == "decode"]
  groups["decode after decode"] = [s for prev, s in decodes if prev and prev["kind"] == "decode"]
  groups["decode after mixed/prefill"] = [s for prev, s in decodes
                                          if prev and prev["kind"] != "decode"]
  kinds = {}
  for kind, group in groups.items():
    walls = [s["wall_ms"] for s in group]
    if walls:
      p50, p90, p99 = np.percentile(walls, [50, 90, 99])
      parts = {part: [float(x) for x in np.percentile([s["parts_ms"][part] for s in group],
                                                      [50, 99])]
               for part in group[0]["parts_ms"]}
      kinds[kind] = {"steps": len(walls), "p50_ms": p50, "p90_ms": p90, "p99_ms": p99,
                     "parts_p50_p99_ms": parts}
  decoding = sorted((s for s in steps if s["kind"] != "prefill"), key=lambda s: -s["wall_ms"])
  return {"kinds": kinds, "slowest": decoding[:slowest]}


def run(engine: Engine, trace) -> dict:
  """Replays `trace` against the engine in real time; returns the latency statistics and a
  summary of the steps (`step_summary`: wall time by kind, scheduling and token fetch included)."""
  arrivals, prompts, output_lens = trace
  start = time.perf_counter()
  ids, next_request = [], 0
  steps = []  # one record per step that ran something
  while next_request < len(prompts) or engine.has_work():
    now = time.perf_counter() - start
    while next_request < len(prompts) and arrivals[next_request] <= now:
      ids.append(engine.submit(prompts[next_request],
                               SamplingParams(max_tokens=int(output_lens[next_request]))))
      next_request += 1
    if engine.has_work():
      step_start = time.perf_counter()
      engine.step()
      wall = time.perf_counter() - step_start
      schedule = engine.last_schedule
      kind = step_kind(schedule)
      if kind:
        steps.append({"kind": kind, "wall_ms": 1e3 * wall,
                      "parts_ms": {k: 1e3 * v for k, v in engine.last_step_times.items()},
                      "decodes": len(schedule.decodes),
                      "pieces": [[p.start, p.length] for p in schedule.prefills]})
    else:
      time.sleep(min(1e-3, max(0.0, arrivals[next_request] - now)))
  elapsed = time.perf_counter() - start
  outputs = [engine.pop_output(i) for i in ids]
  ttft = [o.first_token_time - o.arrival_time for o in outputs]
  tbt = np.concatenate([np.diff(o.token_times) for o in outputs if len(o.token_times) > 1] or [[0]])
  tokens = sum(len(o.tokens) for o in outputs)
  (ttft_p50, ttft_p99), (tbt_p50, tbt_p99) = percentiles_ms(ttft), percentiles_ms(tbt)
  return {"requests": len(outputs), "output_tokens": tokens, "seconds": elapsed,
          "throughput_tok_s": tokens / elapsed, "ttft_p50_ms": ttft_p50, "ttft_p99_ms": ttft_p99,
          "tbt_p50_ms": tbt_p50, "tbt_p99_ms": tbt_p99, "steps": step_summary(steps)}


def full_step(engine: Engine) -> None:
  """One engine step that must decode one token for every slot."""
  slots = engine.config.num_slots
  tokens = sum(e.token is not None for e in engine.step())
  if tokens != slots:
    raise RuntimeError(f"a steady-state step decoded {tokens} tokens, expected {slots} (a "
                       "request finished early: raise --max-len or lower --steady-steps)")


def steady_state(engine: Engine, rng, *, prompt_len: int, steps: int, vocab: int) -> dict:
  """TBT of full decode batches: every slot decoding, no arrivals and no prefill."""
  slots, max_len = engine.config.num_slots, engine.config.max_len
  ids = [engine.submit(list(rng.integers(0, vocab, size=prompt_len)),
                       SamplingParams(max_tokens=max_len - prompt_len)) for _ in range(slots)]
  # Prefill (chunked, interleaved with the first decodes) with pieces of up to chunk_size even
  # where `mixed_step_limit` capped them: at a cap of 1 the first slots would finish decoding
  # before the last prompts are in.
  cap = engine.scheduler.mixed_chunk_size
  engine.scheduler.mixed_chunk_size = engine.config.chunk_size
  started = set()
  try:
    while len(started) < slots:
      started.update(e.request_id for e in engine.step() if e.token is not None)
  finally:
    engine.scheduler.mixed_chunk_size = cap
  full_step(engine)  # untimed: the timed gaps start at its tokens
  start = time.perf_counter()
  for _ in range(steps):
    full_step(engine)
  elapsed = time.perf_counter() - start
  outputs = []
  for request_id in ids:
    engine.cancel(request_id)
    outputs.append(engine.pop_output(request_id))
  tbt = np.concatenate([np.diff(o.token_times[-(steps + 1):]) for o in outputs])
  tbt_p50, tbt_p99 = percentiles_ms(tbt)
  return {"slots": slots, "prompt": prompt_len, "steps": steps, "tbt_p50_ms": tbt_p50,
          "tbt_p99_ms": tbt_p99, "throughput_tok_s": slots * steps / elapsed}


def call_shapes(engine: Engine, *, position: int) -> dict[str, Callable[[], object]]:
  """Zero-argument dispatchers of each jitted call shape on an idle engine: a decode of every slot
  at `position` ("decode"), and each prefill piece length at `position` alone ("prefill L") and
  with that decode ("mixed L"). They run on the scratch page and slot 1 (whose row its next
  request's first prefill piece clears)."""
  decode_args = engine._idle_decode_args(position=position)
  prefill_args = functools.partial(engine._idle_prefill_args,
                                   slot=min(1, engine.config.num_slots - 1), start=position)

  shapes = {"decode": functools.partial(engine._run, engine._decode, decode_args)}
  for length in engine.piece_lengths:
    shapes[f"prefill {length}"] = functools.partial(engine._run, engine._prefill,
                                                    prefill_args(length))
    shapes[f"mixed {length}"] = functools.partial(engine._run, engine._mixed, decode_args,
                                                  prefill_args(length))
  return shapes


def call_times(engine: Engine, *, position: int, reps: int, names=None) -> dict[str, dict]:
  """Host and total time of each jitted call shape alone (`call_shapes`, or those of them in
  `names`), on an idle engine.

  dispatch ms: until the call returns (the host's part: argument transfers and kernel launches);
  total ms: until its results are ready (medians of `reps`, after UNTIMED_CALLS calls);
  back-to-back ms: per call of `reps` calls issued without waiting for any (as the engine issues
  a step before fetching the previous one's samples): the host's dispatch or the device's work,
  whichever is longer.
  """
  times = {}
  for name, call in call_shapes(engine, position=position).items():
    if names is not None and name not in names:
      continue
    dispatch, total = [], []
    for _ in range(UNTIMED_CALLS + reps):
      jax.block_until_ready(engine.last_tokens)
      start = time.perf_counter()
      call()
      returned = time.perf_counter()
      jax.block_until_ready(engine.last_tokens)
      dispatch.append(returned - start)
      total.append(time.perf_counter() - start)
    jax.block_until_ready(engine.last_tokens)
    start = time.perf_counter()
    for _ in range(reps):
      call()
    jax.block_until_ready(engine.last_tokens)
    times[name] = {"dispatch_ms": 1e3 * float(np.median(dispatch[UNTIMED_CALLS:])),
                   "total_ms": 1e3 * float(np.median(total[UNTIMED_CALLS:])),
                   "back_to_back_ms": 1e3 * (time.perf_counter() - start) / reps}
  return times


def profile_calls(engine: Engine, *, position: int, calls: int, names=None) -> tuple[dict, dict]:
  """GPU profiles of the decode, the longest prefill piece and the mixed call with it
  (`call_shapes`, or those of them in `names`), each over `calls` calls (profiler traces):
  ({name: {kernel: ms per call}} of the costliest kernels, {name: `profile_launches`})."""
  shapes = call_shapes(engine, position=position)
  longest = max(engine.piece_lengths)
  names = names or ("decode", f"prefill {longest}", f"mixed {longest}")
  kernels = {name: profile_kernels(shapes[name], calls, wait=lambda: engine.cache,
                                   label=f"{name} call") for name in names}
  launches = {name: profile_launches(shapes[name], calls, wait=lambda: engine.cache)
              for name in names}
  return kernels, launches


def measure(args) -> dict:
  """Builds the model and the trace; runs the steady state and each scheduler on the trace."""
  config = preset_config(args.preset, smoke=args.smoke)
  model = LanguageModel(config)
  variables = jax.jit(lambda: model.init(jax.random.key(args.seed), jnp.zeros((1, 1), jnp.int32)))()
  rng = np.random.default_rng(args.seed)
  trace = make_trace(rng, args, config.vocab_size)
  results = {"args": vars(args), "date": datetime.date.today().isoformat(),
             "versions": versions(*VERSIONED), "layer_pattern": ",".join(config.layer_pattern)}
  print(results["versions"], flush=True)
  # The trace's typical context: the call shapes' position, the steady state's prompts.
  context = min(int(args.prompt_mean), args.max_len // 2)
  if args.calls_only:
    engine = Engine(model, variables, EngineConfig(
        num_slots=args.slots, max_len=args.max_len, page_size=args.page_size,
        chunk_size=args.chunk_size))
    names = ("decode", f"mixed {max(engine.piece_lengths)}")
    results["calls"] = call_times(engine, position=context, reps=args.call_times or 20,
                                  names=names)
    if args.profile:
      results["profile"], results["launches"] = profile_calls(
          engine, position=context, calls=args.profile, names=names)
    if args.host_profile:
      shapes = call_shapes(engine, position=context)
      results["host_profile"] = {
          name: profile_host(shapes[name], args.host_profile, wait=lambda: engine.cache,
                             label=f"{name} call") for name in names}
    return results
  runs = [("chunked", False)] + [("prefill_first", True)] * args.baseline
  for name, prefill_first in (runs[::-1] if args.baseline_first else runs):
    engine = Engine(model, variables, EngineConfig(
        num_slots=args.slots, max_len=args.max_len, page_size=args.page_size,
        chunk_size=args.chunk_size, prefill_first=prefill_first,
        mixed_step_limit=None if prefill_first else args.mixed_step_limit))
    start = time.perf_counter()
    engine.warmup()
    print(f"{name}: warm-up (compilation) {time.perf_counter() - start:.1f} s", flush=True)
    if engine.step_times:
      results["step_times_ms"] = {k: 1e3 * v for k, v in engine.step_times.items()}
      results["mixed_chunk_size"] = engine.scheduler.mixed_chunk_size
      print("step times", json.dumps(results["step_times_ms"]), "-> pieces of steps that decode "
            f"<= {engine.scheduler.mixed_chunk_size}", flush=True)
    traces = engine.num_traces
    if name == "chunked" and args.call_times:
      results["calls"] = call_times(engine, position=context, reps=args.call_times)
    if name == "chunked" and args.profile:
      results["profile"], results["launches"] = profile_calls(engine, position=context,
                                                               calls=args.profile)
    if name == "chunked":
      with gc_paused():
        results["steady"] = steady_state(
            engine, rng, prompt_len=context, steps=args.steady_steps, vocab=config.vocab_size)
      print("steady", json.dumps(results["steady"]), flush=True)
    with gc_paused():
      results[name] = run(engine, trace)
    results[name]["traces_after_warmup"] = engine.num_traces - traces  # 0: nothing recompiled
    print(name, json.dumps(results[name]), flush=True)
  return results


def calls_table(calls: dict) -> str:
  """The markdown table of `call_times`."""
  lines = ["Each jitted call alone on an idle engine (`--call-times`; medians): dispatch = until "
           "the call returns, total = until its results are ready; back to back = per call of "
           "calls issued without waiting (the longer of the host's and the device's part).", "",
           "| call | dispatch ms | total ms | back to back ms |", "|---|---:|---:|---:|"]
  lines += [f"| {name} | {t['dispatch_ms']:.3f} | {t['total_ms']:.3f} | "
            f"{t['back_to_back_ms']:.3f} |" for name, t in calls.items()]
  return "\n".join(lines)


def profile_tables(results: dict) -> str:
  """The markdown tables of `--profile` (empty without it): each call's GPU launches, busy time
  and span, and its costliest kernels."""
  lines = []
  if "launches" in results:
    lines += ["", "Each call on the GPU (`--profile`; calls one at a time on an idle device): "
              "kernel launches (and copies), their summed time, and the span from the first "
              "kernel's start to the last one's end (median).", "",
              "| call | launches | busy ms | span ms |", "|---|---:|---:|---:|"]
    lines += [f"| {name} | {g['launches']:.0f} | {g['busy_ms']:.3f} | {g['span_ms']:.3f} |"
              for name, g in results["launches"].items()]
  for name, kernels in results.get("profile", {}).items():
    lines += ["", f"Costliest GPU kernels of the {name} call (`--profile`; ms per call, "
              f"{sum(kernels.values()):.3f} ms in these):", "", "| kernel | ms |", "|---|---:|"]
    lines += [f"| `{kernel[:90]}` | {ms:.4f} |" for kernel, ms in kernels.items()]
  return "\n".join(lines)


def host_tables(results: dict) -> str:
  """The markdown tables of `--host-profile` (empty without it)."""
  lines = []
  for name, events in results.get("host_profile", {}).items():
    lines += ["", f"Costliest host trace events of the {name} call (`--host-profile`; inclusive "
              "ms and events per call, each call dispatched on an idle device):", "",
              "| event | ms | events |", "|---|---:|---:|"]
    lines += [f"| `{event[:90]}` | {ms:.4f} | {count:.1f} |"
              for event, (ms, count) in events.items()]
  return "\n".join(lines)


def render(results: dict) -> str:
  """The markdown tables: steady state and each trace run (TBT p99 relative to steady TBT p50, the
  target's ratio, and to steady TBT p99, which leaves out the host's jitter without arrivals);
  the steps of each run by kind, the slowest decoding steps of the chunked run, and the call
  times when measured."""
  steady = results["steady"]
  base = steady["tbt_p50_ms"]
  runs = [name for name in ("chunked", "prefill_first") if name in results]
  tail = steady["tbt_p99_ms"]
  lines = ["| run | TTFT p50 ms | TTFT p99 ms | TBT p50 ms | TBT p99 ms | TBT p99 / steady p50 | "
           "TBT p99 / steady p99 | output tokens/s |",
           "|---|---:|---:|---:|---:|---:|---:|---:|",
           f"| steady decode ({steady['slots']} slots, {steady['prompt']}-token prompts) | | | "
           f"{steady['tbt_p50_ms']:.2f} | {steady['tbt_p99_ms']:.2f} | "
           f"{steady['tbt_p99_ms'] / base:.2f}x | 1.00x | {steady['throughput_tok_s']:,.0f} |"]
  for name in runs:
    r = results[name]
    lines.append(f"| {name.replace('_', '-')} | {r['ttft_p50_ms']:.1f} | {r['ttft_p99_ms']:.1f} | "
                 f"{r['tbt_p50_ms']:.2f} | {r['tbt_p99_ms']:.2f} | {r['tbt_p99_ms'] / base:.2f}x | "
                 f"{r['tbt_p99_ms'] / tail:.2f}x | {r['throughput_tok_s']:,.0f} |")
  lines += ["", "Steps by kind (decode: decodes only, also split by the step before it; mixed: "
            "decodes and one prefill piece in one call; prefill: pieces only); wall time per "
            "step, scheduling and token fetch included:",
            "", "| run | kind | steps | ms p50 | ms p90 | ms p99 |",
            "|---|---|---:|---:|---:|---:|"]
  for name in runs:
    for kind, k in results[name]["steps"]["kinds"].items():
      lines.append(f"| {name.replace('_', '-')} | {kind} | {k['steps']} | {k['p50_ms']:.2f} | "
                   f"{k['p90_ms']:.2f} | {k['p99_ms']:.2f} |")
  parts = list(next(iter(results[runs[0]]["steps"]["kinds"].values()))["parts_p50_p99_ms"])
  lines += ["", "The host's time in each part of a step (`Engine.last_step_times`; ms, p50 / p99): "
            "schedule; dispatch (the jitted calls until they return); fetch (waiting for the "
            "previous step's samples, so the device's time shows here); record.", "",
            "| run | kind | " + " | ".join(parts) + " |", "|---|---|" + "---:|" * len(parts)]
  for name in runs:
    for kind, k in results[name]["steps"]["kinds"].items():
      lines.append(f"| {name.replace('_', '-')} | {kind} | " + " | ".join(
          f"{p50:.2f} / {p99:.2f}" for p50, p99 in k["parts_p50_p99_ms"].values()) + " |")
  if "chunked" in results:
    lines += ["", "Slowest steps that decoded (chunked): " + "; ".join(
        f"{s['wall_ms']:.2f} ms ({s['decodes']} decodes, pieces (start, length) "
        f"{[tuple(p) for p in s['pieces']]})" for s in results["chunked"]["steps"]["slowest"])]
  if "calls" in results:
    lines += ["", calls_table(results["calls"])]
  if "step_times_ms" in results:
    lines += ["", f"`--mixed-step-limit {results['args']['mixed_step_limit']:g}`: the chunked "
              "engine's warm-up timed each step shape back to back (ms per call: " + ", ".join(
                  f"{name} {ms:.2f}" for name, ms in results["step_times_ms"].items())
              + f") and capped the piece of a step that decodes at {results['mixed_chunk_size']} "
              "tokens."]
  return "\n".join(lines) + profile_tables(results)


def main(argv=None) -> str:
  """Runs the benchmark; returns the path of the written markdown report."""
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true",
                      help=f"tiny model and trace (CPU); sets {', '.join(SMOKE_ARGS)}")
  parser.add_argument("--preset", default="rat_local_350m", help="a model preset of configs/")
  parser.add_argument("--slots", type=int, default=16)
  parser.add_argument("--max-len", type=int, default=4096)
  parser.add_argument("--page-size", type=int, default=64)
  parser.add_argument("--chunk-size", type=int, default=128)
  parser.add_argument("--mixed-step-limit", type=float, default=None, metavar="RATIO",
                      help="the chunked engine's EngineConfig.mixed_step_limit: pieces of steps "
                           "that decode are capped so that such a step takes at most RATIO times "
                           "a decode step (timed at warm-up); default none")
  parser.add_argument("--requests", type=int, default=128)
  parser.add_argument("--rate", type=float, default=8.0, help="mean arrivals per second")
  parser.add_argument("--prompt-mean", type=float, default=1024)
  parser.add_argument("--output-mean", type=float, default=512)
  parser.add_argument("--steady-steps", type=int, default=128, help="timed steady-state steps")
  parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                      help="also run the prefill-first scheduler on the same trace")
  parser.add_argument("--baseline-first", action="store_true",
                      help="run the prefill-first engine before the chunked one (order effects)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--call-times", type=int, default=0, metavar="REPS",
                      help="also time each jitted call shape alone, REPS times (0: skip)")
  parser.add_argument("--calls-only", action="store_true",
                      help="only time the decode and the longest mixed call (--call-times reps, "
                           "20 if 0), no trace")
  parser.add_argument("--profile", type=int, default=0, metavar="CALLS",
                      help="also print the costliest GPU kernels and the launches, busy time "
                           "and GPU span of the decode, prefill and mixed calls (with "
                           "--calls-only: of its two calls), over CALLS calls each (0: skip)")
  parser.add_argument("--host-profile", type=int, default=0, metavar="CALLS",
                      help="with --calls-only, also print the costliest host trace events of "
                           "each call over CALLS calls (0: skip)")
  parser.add_argument("--out", default=RESULTS, help="folder of the report")
  args = parser.parse_args(argv)
  if args.smoke:
    for name, value in SMOKE_ARGS.items():
      setattr(args, name, value)

  with tempfile.TemporaryDirectory() as cache_dir:
    if jax.config.jax_compilation_cache_dir is None:  # must be set before the first compilation
      jax.config.update("jax_compilation_cache_dir", cache_dir)
      jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    results = measure(args)
  command = f"`bench/serve_load.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
  smoke = "-smoke" if args.smoke else ""
  if args.calls_only:
    report = (f"# Serving: the dispatch of single calls\n\ndate {results['date']}; "
              f"{results['versions']}; XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}\n\n"
              f"{command}: {args.preset} (bf16, random weights), {args.slots} slots, chunk "
              f"{args.chunk_size}, page {args.page_size}, every slot at position "
              f"{min(int(args.prompt_mean), args.max_len // 2)}.\n\n"
              f"{calls_table(results['calls'])}\n{profile_tables(results)}"
              f"{host_tables(results)}")
    print("\n" + report, flush=True)
    return write_report(args.out, f"serve_load-{results['date']}{smoke}-calls", report, results)
  base = results["steady"]["tbt_p50_ms"]
  ratios = ", ".join(f"{name.replace('_', '-')} {results[name]['tbt_p99_ms'] / base:.2f}x"
                     for name in ("chunked", "prefill_first") if name in results)
  report = (f"# Serving under load{' (smoke: tiny model)' if args.smoke else ''}\n\n"
            f"date {results['date']}; {results['versions']}\n\n"
            f"{command}: {args.preset} (layers {results['layer_pattern']}; bf16, random weights), "
            f"{args.slots} slots, chunk {args.chunk_size}, page "
            f"{args.page_size}; {args.requests} requests, Poisson {args.rate:g}/s, exponential "
            f"prompt (mean {args.prompt_mean:g}) and output (mean {args.output_mean:g}) lengths. "
            f"Steady decode: all slots decoding, no arrivals (its TBT p50 is the base of the "
            f"ratio).\n\n{render(results)}\n\n"
            f"TBT p99 under arrivals / steady TBT p50: {ratios} (target for chunked <= 1.5x).\n")
  print("\n" + report, flush=True)
  return write_report(args.out, f"serve_load-{results['date']}{smoke}", report, results)


if __name__ == "__main__":
  main()
