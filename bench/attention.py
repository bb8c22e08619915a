"""Softmax attention training kernels on one GPU: jaxchunk pallas/auto vs cuDNN, tokamax, XLA.

  python bench/attention.py            # every case below; writes bench/results/attention-<date>.md
  python bench/attention.py --quick    # the T=2K dense case only, 3 repeats (a smoke run)
  python bench/attention.py --cases window --passes fwd  # a subset (the results file says which)

Cases (H=16, D=128, bf16, B*T = 64K tokens):
  dense causal   T = 2K (B=32), 8K (B=8), 32K (B=2)
  packed         T = 8K (B=8), 16 documents per row (random boundaries), causal within documents
  window         T = 32K (B=2), causal sliding window of 1024

Methods, each jitted, forward and forward+backward (gradients of sum(o * cotangent) w.r.t. q, k, v):
  pallas    jaxchunk.ops.attention(impl="pallas"): pallas_kernels/gpu/flash_attention.py
  auto      jaxchunk.ops.attention(impl="auto"): cuDNN for the dense cases, the kernel otherwise
  cudnn     jax.nn.dot_product_attention(implementation="cudnn"): is_causal for dense, an explicit
            [B, 1, T, T] boolean mask (built outside the timed call) for packed and window
  tokamax   tokamax.dot_product_attention(implementation="mosaic") when tokamax is installed
            (is_causal; the explicit mask for packed; local_window_size=(1023, 0) for window)
  xla       jax.nn.dot_product_attention(implementation="xla"); materialises the scores, so it runs
            only where they take at most 16 GiB in float32 (T=2K; nan elsewhere)

FLOPs counted: 4 * D per visible (query, key) pair and head forward (two matmuls), 2.5x that
backward; TFLOP/s use the visible pairs only (causal/document/window structure), so a method that
computes masked pairs shows a lower rate. Before timing, each method's forward output is compared
with the pallas one (relative error printed; bf16 rounding gives ~3e-3).
Times: device time per call. All methods of a case are compiled and warmed up, then timed in
interleaved rounds; in each round every method runs a jitted loop of about 30 ms of calls (1 to 50
calls; `timing.call_loop`), so the ~50 us host dispatch of a standalone call and its jitter
stay out of short kernels' figures. A method's figure is its median over 9 rounds (3 with
--quick), so that drift of the GPU's clocks hits every method alike (wall-clock medians of single
calls taken back to back differed by up to 14% between two methods running the same kernel).
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
import types

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.ops.attention import attention
from report import versions, write_report
from timing import call_loop, wall_seconds

HEADS, HEAD_DIM, TOKENS = 16, 128, 65536
WINDOW, DOCS_PER_ROW = 1024, 16
METHODS = ("pallas", "auto", "cudnn", "tokamax", "xla")
PASSES = ("fwd", "fwd+bwd")
CASES = {"dense": (2048, 8192, 32768), "packed": (8192,), "window": (32768,)}  # case -> T values
XLA_MAX_SCORE_BYTES = 16 << 30  # xla runs where its float32 [B, H, T, T] scores fit in this
LOOP_SECONDS, LOOP_MAX_CALLS = 0.03, 50  # calls per timed loop: about 30 ms of them, at most 50


def packed_segment_ids(batch: int, t: int, seed: int) -> np.ndarray:
  """[batch, t] int32 ids of DOCS_PER_ROW contiguous documents with random boundaries per row."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, t), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, t), DOCS_PER_ROW - 1, replace=False))
    ids[row] = np.searchsorted(cuts, np.arange(t), side="right")
  return ids


def visible_pairs(case: str, t: int, segment_ids) -> float:
  """Visible (query, key) pairs summed over the batch."""
  if case == "packed":
    return float(sum((n * (n + 1) // 2) for row in segment_ids
                     for n in np.bincount(row).astype(np.int64)))
  pos = np.arange(t, dtype=np.float64)
  per_row = np.minimum(pos + 1, WINDOW).sum() if case == "window" else (pos + 1).sum()
  return float(per_row * (TOKENS // t))


def explicit_mask(case: str, t: int, segment_ids):
  """[B or 1, 1, T, T] boolean mask of the packed / window cases (for cuDNN, tokamax, xla)."""
  pos = jnp.arange(t)
  causal = pos[None, :] <= pos[:, None]
  if case == "window":
    return (causal & (pos[:, None] - pos[None, :] < WINDOW))[None, None]
  seg = jnp.asarray(segment_ids)
  return causal[None, None] & (seg[:, None, :, None] == seg[:, None, None, :])


def make_forward(method: str, case: str, segment_ids):
  """A function (q, k, v, mask) -> o for one method and case; None if the method is unavailable."""
  kwargs = dict(causal=True)
  if case == "packed":
    kwargs["segment_ids"] = jnp.asarray(segment_ids)
  if case == "window":
    kwargs["window"] = WINDOW
  if method in ("pallas", "auto"):
    return lambda q, k, v, mask: attention(q, k, v, impl=method, **kwargs)
  if method in ("cudnn", "xla"):
    if case == "dense":
      return lambda q, k, v, mask: jax.nn.dot_product_attention(
          q, k, v, is_causal=True, implementation=method)
    return lambda q, k, v, mask: jax.nn.dot_product_attention(q, k, v, mask=mask,
                                                              implementation=method)
  tokamax = import_tokamax()
  if tokamax is None:
    return None
  extra = dict(is_causal=True) if case == "dense" else (
      dict(is_causal=True, local_window_size=(WINDOW - 1, 0)) if case == "window" else {})
  return lambda q, k, v, mask: tokamax.dot_product_attention(
      q, k, v, mask=None if case != "packed" else mask, implementation="mosaic", **extra)


def import_tokamax():
  """tokamax, or None when it is not installed. tokamax 0.0.17 imports `xprof` at import time (for
  its own profiling helpers, unused here), and the GPU machine has no xprof: an empty stand-in
  module is registered when the real one is missing."""
  try:
    import xprof.cli.tools  # noqa: F401
  except ImportError:
    for name in ("xprof", "xprof.cli", "xprof.cli.tools"):
      sys.modules.setdefault(name, types.ModuleType(name))
    sys.modules["xprof.cli.tools"].get_kernel_stats_tool = None
  try:
    import tokamax
  except ImportError:
    return None
  return tokamax


def inputs(batch: int, t: int, key):
  """q, k, v [B, T, H, D] bf16 and a float32 output cotangent."""
  kq, kk, kv, kc = jax.random.split(key, 4)
  shape = (batch, t, HEADS, HEAD_DIM)
  q, k, v = (jax.random.normal(x, shape, jnp.bfloat16) for x in (kq, kk, kv))
  return (q, k, v), jax.random.normal(kc, shape, jnp.float32)


def rel_err(out, ref) -> float:
  out, ref = (jnp.asarray(x, jnp.float32) for x in (out, ref))
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def bench_case(case: str, t: int, rounds: int, passes=PASSES):
  """Times every method on one case. Returns {(method, pass): ms} and the forward FLOPs.

  Every (method, pass) is compiled and warmed up first; then `rounds` rounds each time every one
  of them in turn (`timing.call_loop`: a jitted loop of about LOOP_SECONDS of calls), and a method's
  figure is the median over the rounds, so that clock or thermal drift falls on all methods alike.
  """
  batch = TOKENS // t
  segment_ids = packed_segment_ids(batch, t, seed=t) if case == "packed" else None
  (q, k, v), ct = inputs(batch, t, jax.random.key(t + len(case)))
  mask = None if case == "dense" else explicit_mask(case, t, segment_ids)
  flops = 4.0 * HEAD_DIM * HEADS * visible_pairs(case, t, segment_ids)
  args = (q, k, v, mask, ct)
  times, fns, reference = {}, {}, None
  for method in METHODS:
    if method == "xla" and batch * HEADS * t * t * 4 > XLA_MAX_SCORE_BYTES:
      times[(method, "fwd")] = times[(method, "fwd+bwd")] = float("nan")
      print(f"{case} T={t} xla: skipped (float32 scores over {XLA_MAX_SCORE_BYTES >> 30} GiB)")
      continue
    out = make_forward(method, case, segment_ids)
    if out is None:
      times[(method, "fwd")] = times[(method, "fwd+bwd")] = None
      print(f"{case} T={t} {method}: n/a (not installed)", flush=True)
      continue
    loss = lambda q, k, v, mask, ct, out=out: jnp.sum(out(q, k, v, mask).astype(jnp.float32) * ct)
    modes = {"fwd": jax.jit(lambda q, k, v, mask, ct, out=out: out(q, k, v, mask)),
             "fwd+bwd": jax.jit(jax.grad(loss, (0, 1, 2)))}
    for mode, fn in modes.items():
      if mode not in passes:
        times[(method, mode)] = float("nan")
        continue
      started = time.perf_counter()
      try:
        result = fn(*args)
        if mode == "fwd":
          reference = result if reference is None else reference
          print(f"{case} T={t} {method}: forward rel. error vs pallas "
                f"{rel_err(result, reference):.2e}", flush=True)
        del result
        calls = int(min(LOOP_MAX_CALLS, max(1, LOOP_SECONDS // wall_seconds(fn, *args))))
        loop = call_loop(fn, calls)
        jax.block_until_ready(loop(*args))
        fns[(method, mode)] = (loop, calls)
        print(f"{case} T={t} {method} {mode}: compiled and warmed up in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
      except Exception as e:  # e.g. out of memory, unsupported by cuDNN: report and go on
        print(f"{case} T={t} {method} {mode}: failed: {type(e).__name__}: {str(e)[:200]}",
              flush=True)
        times[(method, mode)] = float("nan")
  samples = {key: [] for key in fns}
  for _ in range(rounds):
    for key, (loop, calls) in fns.items():
      samples[key].append(wall_seconds(loop, *args) / calls)
  for (method, mode), seconds in samples.items():
    ms = times[(method, mode)] = 1e3 * statistics.median(seconds)
    rate = flops * (1.0 if mode == "fwd" else 3.5) / ms / 1e9
    print(f"{case:6s} T={t:6d} {method:8s} {mode:7s} {ms:9.3f} ms  {rate:7.1f} TFLOP/s",
          flush=True)
  return times, flops


def cell(ms) -> str:
  return "n/a (not installed)" if ms is None else f"{ms:.3f}"


def ratio(num, den) -> str:
  return "n/a" if num is None or den is None else f"{num / den:.2f}x"


def table(rows) -> str:
  header = ("| case | T | B | pass | pallas ms | auto ms | cuDNN ms | tokamax ms | XLA ms "
            "| cuDNN / pallas | cuDNN / auto | tokamax / pallas | pallas TFLOP/s |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|")
  lines = []
  for case, t, mode, times, flops in rows:
    ms = {m: times[(m, mode)] for m in METHODS}
    rate = flops * (1.0 if mode == "fwd" else 3.5) / ms["pallas"] / 1e9
    lines.append(
        f"| {case} | {t} | {TOKENS // t} | {mode} | "
        + " | ".join(cell(ms[m]) for m in METHODS)
        + f" | {ratio(ms['cudnn'], ms['pallas'])} | {ratio(ms['cudnn'], ms['auto'])} "
        f"| {ratio(ms['tokamax'], ms['pallas'])} | {rate:.1f} |")
  return "\n".join([header] + lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="dense T=2K only, 3 repeats")
  parser.add_argument("--passes", default=",".join(PASSES),
                      help="fwd and/or fwd+bwd (rows of the other are left out)")
  parser.add_argument("--cases", default=",".join(CASES),
                      help=f"comma-separated subset of {', '.join(CASES)}")
  args = parser.parse_args()
  names = args.cases.split(",")
  unknown = sorted(set(names) - set(CASES))
  if unknown:
    parser.error(f"--cases: unknown {', '.join(unknown)}; choose from {', '.join(CASES)}")
  passes = args.passes.split(",")
  if set(passes) - set(PASSES):
    parser.error(f"--passes: choose from {', '.join(PASSES)}")
  cases = [("dense", 2048)] if args.quick else [
      (case, t) for case in CASES if case in names for t in CASES[case]]
  rounds = 3 if args.quick else 9
  date = datetime.date.today().isoformat()
  subset = "" if args.quick or set(names) == set(CASES) else "-" + "-".join(
      case for case in CASES if case in names)
  subset += "" if set(passes) == set(PASSES) else "-" + "-".join(passes).replace("+", "")
  rows = []
  for case, t in cases:
    times, flops = bench_case(case, t, rounds, passes)
    rows.extend((case, t, mode, times, flops) for mode in PASSES if mode in passes)
  report = (f"# Attention training kernels, H={HEADS} D={HEAD_DIM} bf16, B*T={TOKENS}\n\n"
            f"{date}; {versions('jax', 'jaxlib', 'torch', 'tokamax')}\n\n{table(rows)}\n\n"
            f"packed: {DOCS_PER_ROW} documents per row; window: causal, {WINDOW} keys. "
            "cuDNN/XLA get an explicit mask for packed and window.\n")
  print("\n" + report)
  write_report(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
               f"attention-{date}{'-quick' if args.quick else ''}{subset}", report)


if __name__ == "__main__":
  main()
