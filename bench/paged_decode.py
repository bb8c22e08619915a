"""Paged decode attention on one GPU: achieved HBM bandwidth of jaxchunk's kernel vs the copy rate.

  python bench/paged_decode.py                 # contexts 4K/32K/128K x batch 1/16/64
  python bench/paged_decode.py --quick         # 32K context, batch 16 only
  python bench/paged_decode.py --out DIR       # report folder (default bench/results)
  python bench/paged_decode.py --heads 16,16,64 --window 512 --cases 4096x16,4096x64
      # the local layers of rat_local_350m (window-512 MHA, D=64) at 4K context

One decode token per row attends to its whole context (or, with --window W, its last W tokens) in
a paged KV pool (default H=32 query heads, Hk=8 kv heads, D=128; bf16, pages of 64 tokens, each
row's pages scattered over the pool in random order). Methods, jitted:

  pallas  jaxchunk.ops.paged_decode_attention(impl="pallas"): pallas_kernels/gpu/paged_attention.py
  xla     the same op with impl="xla" (gathers the pages into a contiguous copy, then attends);
          only where that copy fits comfortably (batch * context <= 1M tokens)
  cudnn   jax.nn.dot_product_attention(implementation="cudnn") on a contiguous (not paged) cache
          of the same size: the dense reference a paged kernel is measured against

Bytes: the keys and values each row must read (batch * min(context, window) * Hk * D * 2 bytes
* 2); the query and output are negligible. With a window, cuDNN attends to the same number of
keys (a dense cache of the window's length). The copy rate is the measured bandwidth of a 4 GiB device-to-device
`x + 1` (read + write) on the same GPU; the kernel's share of it is the headline figure (the issue's
target: >= 70% at 32K context).

Times: pallas and cuDNN are device time per call: 40 calls in one jitted loop, each call's query
nudged by the previous output (a decode step runs the op inside its jitted step, so a standalone
call's launch and host dispatch, ~50 us, are not the kernel's), median of 5 loops. Caches that fit
the 50 MB L2 (4K context, batch 1: 16 MiB) stay there between the loop's calls, so that row reads
faster than HBM. xla is the wall time of one call, median of 20 (a loop could hoist its gather).
"""

from __future__ import annotations

import argparse
import datetime
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.ops.paged_attention import paged_decode_attention
from report import versions, write_report
from timing import median_seconds

PAGE = 64
CASES = tuple((b, c) for c in (4096, 32768, 131072) for b in (1, 16, 64))
XLA_MAX_TOKENS = 1 << 20
LOOP_CALLS = 40


def copy_bandwidth() -> float:
  """Bytes/s of a jitted elementwise pass over a 4 GiB bf16 array (read + write)."""
  x = jnp.ones((1 << 31,), jnp.bfloat16)
  seconds = median_seconds(jax.jit(lambda a: a + 1), x, repeats=10, warmup=2)
  return 2 * x.nbytes / seconds


def paged_inputs(batch: int, context: int, heads: int, kv_heads: int, head_dim: int,
                 seed: int = 0):
  """q [B, H, D], pools [P, PAGE, Hk, D], page_table [B, W] (a random permutation), lengths [B]."""
  key = jax.random.PRNGKey(seed)
  kq, kk, kv = jax.random.split(key, 3)
  pages_per_row = context // PAGE
  num_pages = batch * pages_per_row
  pool_shape = (num_pages, PAGE, kv_heads, head_dim)
  k_pages = jax.random.normal(kk, pool_shape, jnp.bfloat16)
  v_pages = jax.random.normal(kv, pool_shape, jnp.bfloat16)
  table = np.random.default_rng(seed).permutation(num_pages).reshape(batch, pages_per_row)
  q = jax.random.normal(kq, (batch, heads, head_dim), jnp.bfloat16)
  lengths = jnp.full((batch,), context, jnp.int32)
  return q, k_pages, v_pages, jnp.asarray(table, jnp.int32), lengths


def time_ms(fn, *args) -> float:
  """Wall ms of one jitted call `fn(*args)`: 2 warm-up calls, median of 20."""
  return 1e3 * median_seconds(jax.jit(fn), *args, repeats=20, warmup=2)


def device_ms(fn, q, *rest) -> float:
  """Device ms per call of `fn(q, *rest)` (o like q): LOOP_CALLS calls in one jitted loop, each
  call's query nudged by the previous output (the calls stay serial and none can be hoisted);
  median of 5 timed loops after a warm-up one."""
  @jax.jit
  def loop(q, *rest):
    return jax.lax.fori_loop(
        0, LOOP_CALLS, lambda i, q: q + (1e-3 * fn(q, *rest)).astype(q.dtype), q)
  return 1e3 * median_seconds(loop, q, *rest, repeats=5, warmup=1) / LOOP_CALLS


def bench_case(batch: int, context: int, heads: int, kv_heads: int, head_dim: int,
               window: int | None) -> dict:
  q, k_pages, v_pages, table, lengths = paged_inputs(batch, context, heads, kv_heads, head_dim)
  times = {}
  times["pallas"] = device_ms(
      lambda q, *a: paged_decode_attention(q, *a, window=window, impl="pallas"),
      q, k_pages, v_pages, table, lengths)
  times["xla"] = None if batch * context > XLA_MAX_TOKENS else time_ms(
      lambda *a: paged_decode_attention(*a, window=window, impl="xla"),
      q, k_pages, v_pages, table, lengths)
  # The dense reference reads the same bytes from a contiguous cache (here: the pool itself,
  # viewed as [B, context, Hk, D], its last `window` keys with a window; the pool's order does
  # not matter for the timing).
  seen = context if window is None else min(window, context)
  k = k_pages.reshape(batch, context, kv_heads, head_dim)[:, context - seen:]
  v = v_pages.reshape(batch, context, kv_heads, head_dim)[:, context - seen:]
  dense = lambda q, k, v: jax.nn.dot_product_attention(q[:, None], k, v,
                                                       implementation="cudnn")[:, 0]
  try:
    times["cudnn"] = device_ms(dense, q, k, v)
  except Exception as err:  # cuDNN may refuse a shape; the table says so
    print(f"cudnn B={batch} ctx={context}: {type(err).__name__}: {str(err)[:200]}")
    times["cudnn"] = None
  return times


def fmt(ms) -> str:
  return "n/a" if ms is None else f"{ms:.3f}"


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="32K context, batch 16 only")
  parser.add_argument("--heads", default="32,8,128", help="query heads, kv heads, head dim")
  parser.add_argument("--window", type=int, default=None, help="sliding window (keys per query)")
  parser.add_argument("--cases", default=None,
                      help="CONTEXTxBATCH,... (default: 4K/32K/128K x batch 1/16/64)")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results"))
  args = parser.parse_args()
  heads, kv_heads, head_dim = (int(n) for n in args.heads.split(","))
  cases = [(16, 32768)] if args.quick else CASES
  if args.cases:
    cases = [tuple(int(n) for n in case.split("x"))[::-1] for case in args.cases.split(",")]
  peak = copy_bandwidth()
  print(f"copy bandwidth: {peak / 1e12:.2f} TB/s", flush=True)
  header = ("| context | batch | KV MiB | pallas ms | xla ms | cuDNN (dense) ms | pallas TB/s "
            "| pallas % of copy rate | cuDNN TB/s |\n|---|---|---|---|---|---|---|---|---|")
  lines = []
  for batch, context in cases:
    times = bench_case(batch, context, heads, kv_heads, head_dim, args.window)
    seen = context if args.window is None else min(args.window, context)
    kv_bytes = batch * seen * kv_heads * head_dim * 2 * 2
    rate = lambda ms: None if ms is None else kv_bytes / (ms * 1e-3)
    pallas_rate, cudnn_rate = rate(times["pallas"]), rate(times["cudnn"])
    line = (f"| {context} | {batch} | {kv_bytes / 2**20:.0f} | {fmt(times['pallas'])} "
            f"| {fmt(times['xla'])} | {fmt(times['cudnn'])} | {pallas_rate / 1e12:.2f} "
            f"| {100 * pallas_rate / peak:.0f}% "
            f"| {'n/a' if cudnn_rate is None else f'{cudnn_rate / 1e12:.2f}'} |")
    print(line, flush=True)
    lines.append(line)
  date = datetime.date.today().isoformat()
  window = "" if args.window is None else f", window {args.window}"
  report = (f"# Paged decode attention, H={heads} Hk={kv_heads} D={head_dim}{window} bf16, "
            f"pages of {PAGE}"
            f"\n\n{date}; {versions('jax', 'jaxlib')}; "
            f"measured copy rate {peak / 1e12:.2f} TB/s\n\n" + "\n".join([header] + lines) + "\n")
  print("\n" + report)
  suffix = ("-quick" if args.quick else "") + ("" if args.window is None else f"-w{args.window}")
  write_report(args.out, f"paged_decode-{date}{suffix}", report)


if __name__ == "__main__":
  main()
