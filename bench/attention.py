"""Softmax attention training kernels on one GPU: jaxchunk pallas/auto vs cuDNN, tokamax, XLA.

  python bench/attention.py            # every case below; writes bench/results/attention-<date>.md
  python bench/attention.py --quick    # the T=2K dense case only, 3 repeats (a smoke run)

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
            out of memory at long T (reported as failed)

FLOPs counted: 4 * D per visible (query, key) pair and head forward (two matmuls), 2.5x that
backward; TFLOP/s use the visible pairs only (causal/document/window structure), so a method that
computes masked pairs shows a lower rate. Before timing, each method's forward output is compared
with the pallas one (relative error printed; bf16 rounding gives ~3e-3).
Times: `jax.block_until_ready`, 2 warm-up calls, median of 10 timed calls (3 when a call exceeds
2 s).
"""

from __future__ import annotations

import argparse
import datetime
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.ops.attention import attention
from report import versions, write_report
from timing import median_seconds

HEADS, HEAD_DIM, TOKENS = 16, 128, 65536
WINDOW, DOCS_PER_ROW = 1024, 16
METHODS = ("pallas", "auto", "cudnn", "tokamax", "xla")


def median_ms(fn, *args, reps: int = 10) -> float:
  """Median wall time of `fn(*args)` in ms after two warm-up calls (3 reps for calls over 2 s)."""
  return 1e3 * median_seconds(fn, *args, repeats=reps, warmup=2, slow_call_s=2.0)


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
  try:
    import tokamax
  except ImportError:
    return None
  extra = dict(is_causal=True) if case == "dense" else (
      dict(is_causal=True, local_window_size=(WINDOW - 1, 0)) if case == "window" else {})
  return lambda q, k, v, mask: tokamax.dot_product_attention(
      q, k, v, mask=None if case != "packed" else mask, implementation="mosaic", **extra)


def inputs(batch: int, t: int, key):
  """q, k, v [B, T, H, D] bf16 and a float32 output cotangent."""
  kq, kk, kv, kc = jax.random.split(key, 4)
  shape = (batch, t, HEADS, HEAD_DIM)
  q, k, v = (jax.random.normal(x, shape, jnp.bfloat16) for x in (kq, kk, kv))
  return (q, k, v), jax.random.normal(kc, shape, jnp.float32)


def rel_err(out, ref) -> float:
  out, ref = (jnp.asarray(x, jnp.float32) for x in (out, ref))
  return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def bench_case(case: str, t: int, reps: int):
  """Times every method on one case. Returns {(method, pass): ms} and the forward FLOPs."""
  batch = TOKENS // t
  segment_ids = packed_segment_ids(batch, t, seed=t) if case == "packed" else None
  (q, k, v), ct = inputs(batch, t, jax.random.key(t + len(case)))
  mask = None if case == "dense" else explicit_mask(case, t, segment_ids)
  flops = 4.0 * HEAD_DIM * HEADS * visible_pairs(case, t, segment_ids)
  times, reference = {}, None
  for method in METHODS:
    out = make_forward(method, case, segment_ids)
    if out is None:
      times[(method, "fwd")] = times[(method, "fwd+bwd")] = None
      print(f"{case} T={t} {method}: n/a (not installed)", flush=True)
      continue
    loss = lambda q, k, v, mask, ct, out=out: jnp.sum(out(q, k, v, mask).astype(jnp.float32) * ct)
    fns = {"fwd": jax.jit(lambda q, k, v, mask, ct, out=out: out(q, k, v, mask)),
           "fwd+bwd": jax.jit(jax.grad(loss, (0, 1, 2)))}
    for mode, fn in fns.items():
      try:
        if mode == "fwd":
          o = fn(q, k, v, mask, ct)
          reference = o if reference is None else reference
          print(f"{case} T={t} {method}: forward rel. error vs pallas "
                f"{rel_err(o, reference):.2e}", flush=True)
          del o
        ms = median_ms(fn, q, k, v, mask, ct, reps=reps)
      except Exception as e:  # e.g. out of memory, unsupported by cuDNN: report and go on
        print(f"{case} T={t} {method} {mode}: failed: {type(e).__name__}: {str(e)[:200]}",
              flush=True)
        ms = float("nan")
      times[(method, mode)] = ms
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
  args = parser.parse_args()
  cases = [("dense", 2048)] if args.quick else [
      ("dense", 2048), ("dense", 8192), ("dense", 32768), ("packed", 8192), ("window", 32768)]
  reps = 3 if args.quick else 10
  date = datetime.date.today().isoformat()
  rows = []
  for case, t in cases:
    times, flops = bench_case(case, t, reps)
    rows.extend((case, t, mode, times, flops) for mode in ("fwd", "fwd+bwd"))
  report = (f"# Attention training kernels, H={HEADS} D={HEAD_DIM} bf16, B*T={TOKENS}\n\n"
            f"{date}; {versions('jax', 'jaxlib', 'torch', 'tokamax')}\n\n{table(rows)}\n\n"
            f"packed: {DOCS_PER_ROW} documents per row; window: causal, {WINDOW} keys. "
            "cuDNN/XLA get an explicit mask for packed and window.\n")
  print("\n" + report)
  write_report(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
               f"attention-{date}{'-quick' if args.quick else ''}", report)


if __name__ == "__main__":
  main()
