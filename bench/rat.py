"""RAT (chunk 16) against causal softmax attention on one GPU: training and decode.

  python bench/rat.py             # T = 4K, 16K, 100K and decode; writes bench/results/rat-<date>.md
  python bench/rat.py --quick     # T = 4K only, fewer repeats (a smoke run)
  python bench/rat.py --decode-only  # decode only; writes bench/results/rat-decode-<date>.md
  python bench/rat.py --packed-only  # packed documents only; bench/results/rat-packed-<date>.md

Training: B=1, H=16, D=128, bf16; forward, and forward+backward (gradients of sum(o * cotangent)
w.r.t. every input), for RAT pallas, RAT xla and cuDNN causal attention
(`jax.nn.dot_product_attention(..., is_causal=True, implementation="cudnn")`).

Packed documents: B=8, T=8K (64K tokens), 16 documents of random lengths per row
(`segment_ids`, each document chunked from its own start), forward and forward+backward: RAT
pallas and xla with the ids, RAT pallas on the same rows without them (the cost of packing), and
causal attention with the ids (`jaxchunk.ops.attention`, impl "auto").

Decode: one new token with 4K tokens of context, batch 1 and 64, H=16, D=128: `rat_step` (the
whole step: running-aggregate update, attention, summary append in place; summaries stored in bf16
as a bf16 model's cache holds them; impl "pallas" = the decode kernel of
`pallas_kernels.gpu.rat_decode`, and "xla") against one query over a bf16 4K KV cache via
`jax.nn.dot_product_attention` (cudnn and xla) and jaxchunk's `paged_decode_attention` kernel
(pages of 64). Each is timed as DECODE_STEPS steps inside one jitted `fori_loop` (the output
feeding the next query), so a step's time is its device time, as in a serving loop, not the
~0.1 ms of one Python dispatch and sync. The headline ratio is the fastest attention decode over
the fastest RAT step.

FLOPs counted (matmul FLOPs, 2 per multiply-add): attention over n key positions costs 4 * n * D per
query and head forward, 2.5x that backward (5 matmuls instead of 2). RAT's query t sees t // C
summaries + its own running aggregate; causal attention's query t sees t + 1 keys. Bytes for decode:
the state / cache read once (bf16 summaries and KV cache).
Times: jitted, `jax.block_until_ready`, 2 warm-up calls, median of 10 timed calls (3 when one call
exceeds 2 s).
"""

from __future__ import annotations

import argparse
import datetime
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.ops.attention import attention
from jaxchunk.ops.paged_attention import paged_decode_attention
from jaxchunk.ops.rat import RATState, rat, rat_step
from report import versions, write_report
from timing import median_seconds

HEADS, HEAD_DIM, CHUNK = 16, 128, 16
TRAIN_LENGTHS = (4096, 16384, 102400)
DECODE_CONTEXT, DECODE_BATCHES, DECODE_STEPS = 4096, (1, 64), 64


def median_ms(fn, *args, reps: int = 10) -> float:
  """Median wall time of `fn(*args)` in ms after two warm-up calls (3 reps for calls over 2 s)."""
  return 1e3 * median_seconds(fn, *args, repeats=reps, warmup=2, slow_call_s=2.0)


def train_inputs(t: int, key, batch: int = 1):
  """q, k, v [B, T, H, D] bf16, gates f in (0, 1) bf16, and a float32 output cotangent."""
  kq, kk, kv, kf, kc = jax.random.split(key, 5)
  shape = (batch, t, HEADS, HEAD_DIM)
  q, k, v = (jax.random.normal(x, shape, jnp.bfloat16) for x in (kq, kk, kv))
  f = jax.nn.sigmoid(jax.random.normal(kf, shape) + 2.0).astype(jnp.bfloat16)
  return (q, k, v, f), jax.random.normal(kc, shape, jnp.float32)


def train_fns(name: str, segment_ids=None):
  """(forward, forward+backward) jitted functions of (q, k, v, f, cotangent) for a method:
  "rat-<impl>", "cudnn" or (with segment_ids) "attention"."""
  if name.startswith("rat"):
    impl = name.split("-")[1]
    out = lambda q, k, v, f: rat(q, k, v, f, chunk_size=CHUNK, segment_ids=segment_ids,
                                 impl=impl)[0]
    argnums = (0, 1, 2, 3)
  elif name == "attention":
    out = lambda q, k, v, f: attention(q, k, v, causal=True, segment_ids=segment_ids)
    argnums = (0, 1, 2)
  else:
    out = lambda q, k, v, f: jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                                          implementation="cudnn")
    argnums = (0, 1, 2)
  loss = lambda q, k, v, f, ct: jnp.sum(out(q, k, v, f).astype(jnp.float32) * ct)
  fwd = jax.jit(lambda q, k, v, f, ct: out(q, k, v, f))
  fwd_bwd = jax.jit(jax.grad(loss, argnums))
  return fwd, fwd_bwd


def train_flops(name: str, t: int) -> float:
  """Forward matmul FLOPs (B=1)."""
  pos = np.arange(t, dtype=np.float64)
  keys = (pos // CHUNK + 1).sum() if name.startswith("rat") else (pos + 1).sum()
  return 4.0 * HEAD_DIM * HEADS * keys


def time_passes(label: str, fns, args, ct, reps: int, flops=None) -> tuple[float, float]:
  """Median ms of (forward, forward+backward), printed as they come (with TFLOP/s when `flops`,
  the two passes' matmul FLOPs, is given); NaN (printed) where a call fails."""
  times = []
  for i, (mode, fn) in enumerate(zip(("fwd", "fwd+bwd"), fns)):
    try:
      times.append(median_ms(fn, *args, ct, reps=reps))
    except Exception as e:  # e.g. out of memory or no cuDNN: report and go on
      print(f"{label} {mode}: failed: {type(e).__name__}: {str(e)[:200]}")
      times.append(float("nan"))
    rate = "" if flops is None else f"  {flops[i] / times[-1] / 1e9:7.1f} TFLOP/s"
    print(f"{label:28s} {mode:7s} {times[-1]:9.3f} ms{rate}", flush=True)
  return tuple(times)


def bench_training(lengths, reps: int):
  rows = []
  for t in lengths:
    args, ct = train_inputs(t, jax.random.key(t))
    times = {}
    for name in ("rat-pallas", "rat-xla", "cudnn"):
      flops = (train_flops(name, t), 3.5 * train_flops(name, t))
      passes = time_passes(f"T={t:6d} {name}", train_fns(name), args, ct, reps, flops=flops)
      times.update({(name, mode): ms for mode, ms in zip(("fwd", "fwd+bwd"), passes)})
    for mode in ("fwd", "fwd+bwd"):
      cudnn, pallas, xla = (times[(n, mode)] for n in ("cudnn", "rat-pallas", "rat-xla"))
      rows.append((t, mode, pallas, xla, cudnn, cudnn / pallas, cudnn / xla,
                   train_flops("rat", t) * (1.0 if mode == "fwd" else 3.5) / pallas / 1e9))
  header = ("| T | pass | RAT pallas ms | RAT xla ms | cuDNN attn ms | cuDNN / RAT pallas "
            "| cuDNN / RAT xla | RAT pallas TFLOP/s |\n|---|---|---|---|---|---|---|---|")
  lines = [f"| {t} | {m} | {p:.3f} | {x:.3f} | {c:.3f} | {rp:.2f}x | {rx:.2f}x | {tf:.1f} |"
           for t, m, p, x, c, rp, rx, tf in rows]
  return "\n".join([header] + lines)


def bench_packed(reps: int, batch: int = 8, t: int = 8192, documents: int = 16):
  """Packed documents: RAT with segment_ids (pallas, xla), RAT pallas without them, attention
  with them. Returns the markdown table."""
  args, ct = train_inputs(t, jax.random.key(1), batch)
  rng = np.random.default_rng(0)
  starts = np.stack([np.sort(rng.choice(np.arange(1, t), documents - 1, replace=False))
                     for _ in range(batch)])
  segment_ids = jnp.asarray((np.arange(t)[None, :, None] >= starts[:, None, :]).sum(-1),
                            jnp.int32)
  methods = [("RAT pallas, segment_ids", train_fns("rat-pallas", segment_ids)),
             ("RAT xla, segment_ids", train_fns("rat-xla", segment_ids)),
             ("RAT pallas, one stream", train_fns("rat-pallas")),
             ("attention, segment_ids", train_fns("attention", segment_ids))]
  rows = [(label, *time_passes(label, fns, args, ct, reps)) for label, fns in methods]
  base = rows[0]
  header = (f"B={batch}, T={t}, {documents} documents per row\n\n| method | fwd ms | fwd+bwd ms "
            "| fwd / RAT pallas packed | fwd+bwd / RAT pallas packed |\n|---|---|---|---|---|")
  lines = [f"| {label} | {f:.3f} | {fb:.3f} | {f / base[1]:.2f}x | {fb / base[2]:.2f}x |"
           for label, f, fb in rows]
  return "\n".join([header] + lines)


def decode_state(batch: int, key) -> RATState:
  """A RATState holding DECODE_CONTEXT tokens, room for 64 more chunks (bf16 summaries)."""
  n = DECODE_CONTEXT // CHUNK + 512  # room for the timed loops' tokens
  k1, k2, k3, k4 = jax.random.split(key, 4)
  shape = (batch, n, HEADS, HEAD_DIM)
  summaries = lambda key: jax.random.normal(key, shape, jnp.bfloat16)
  return RATState(summaries(k1), summaries(k2),
                  jax.random.normal(k3, shape[:1] + shape[2:]),
                  jax.random.normal(k4, shape[:1] + shape[2:]),
                  jnp.asarray(DECODE_CONTEXT, jnp.int32))


def per_step_ms(step, carry, *args, reps: int) -> float:
  """Device time of one decode step in ms: DECODE_STEPS steps of `carry = step(carry, *args)` in one
  jitted loop (carry donated), median over `reps` timed loops / DECODE_STEPS. Dispatch and host
  sync are paid once per loop, as in a serving loop that keeps the device busy."""
  loop = jax.jit(lambda carry, *args: jax.lax.fori_loop(
      0, DECODE_STEPS, lambda i, c: step(c, *args), carry), donate_argnums=0)
  holder = [jax.tree.map(jnp.copy, carry)]  # the caller keeps its arrays

  def call():
    holder[0] = loop(holder[0], *args)
    return holder[0]
  return median_ms(call, reps=reps) / DECODE_STEPS


def bench_decode(reps: int, impls=("pallas", "xla")):
  rows = []
  for batch in DECODE_BATCHES:
    key = jax.random.key(batch)
    kq, kk, kv, kf, kc, ks = jax.random.split(key, 6)
    tok = (batch, HEADS, HEAD_DIM)
    q, k, v = (jax.random.normal(x, tok, jnp.bfloat16) for x in (kq, kk, kv))
    f = jax.nn.sigmoid(jax.random.normal(kf, tok)).astype(jnp.bfloat16)
    state_bytes = 2 * batch * (DECODE_CONTEXT // CHUNK) * HEADS * HEAD_DIM * 2
    cache_bytes = 2 * batch * DECODE_CONTEXT * HEADS * HEAD_DIM * 2

    rat_times = {}
    for impl in impls:
      def rat_loop_step(carry, k, v, f, impl=impl):
        state, q = carry
        o, state = rat_step(q, k, v, f, state, chunk_size=CHUNK, impl=impl)
        return state, o.astype(q.dtype)  # the next query: the loop cannot be hoisted
      # Each loop call starts from the state the last one left: 4096 + i * DECODE_STEPS tokens.
      try:
        rat_times[impl] = per_step_ms(rat_loop_step, (decode_state(batch, ks), q), k, v, f,
                                      reps=max(reps, 10))
      except Exception as e:
        print(f"decode B={batch} rat_step {impl}: failed: {type(e).__name__}: {str(e)[:300]}")
        continue
      print(f"decode B={batch} rat_step {impl} {rat_times[impl]:.4f} ms "
            f"({state_bytes / rat_times[impl] / 1e6:.0f} GB/s)", flush=True)

    cache_shape = (batch, DECODE_CONTEXT, HEADS, HEAD_DIM)
    k_cache, v_cache = (jax.random.normal(x, cache_shape, jnp.bfloat16)
                        for x in jax.random.split(kc))
    page = 64
    pages = lambda x: x.reshape(batch * DECODE_CONTEXT // page, page, HEADS, HEAD_DIM)
    table = jnp.arange(batch * DECODE_CONTEXT // page, dtype=jnp.int32).reshape(batch, -1)
    lengths = jnp.full((batch,), DECODE_CONTEXT, jnp.int32)
    methods = {
        "cudnn": lambda q, k, v: jax.nn.dot_product_attention(
            q[:, None], k, v, implementation="cudnn")[:, 0],
        "xla": lambda q, k, v: jax.nn.dot_product_attention(
            q[:, None], k, v, implementation="xla")[:, 0],
        "jaxchunk paged": lambda q, k, v: paged_decode_attention(
            q, pages(k), pages(v), table, lengths, impl="pallas"),
    }
    attention_times = {}
    for name, attend in methods.items():
      try:
        attention_times[name] = per_step_ms(lambda q, k, v, attend=attend: attend(q, k, v),
                                            q, k_cache, v_cache, reps=max(reps, 10))
      except Exception as e:
        print(f"decode B={batch} {name}: failed: {type(e).__name__}: {str(e)[:200]}")
        continue
      print(f"decode B={batch} attention-{name} {attention_times[name]:.4f} ms "
            f"({cache_bytes / attention_times[name] / 1e6:.0f} GB/s)", flush=True)
    rows.append((batch, rat_times, attention_times, state_bytes, cache_bytes))
  header = ("| batch | RAT step pallas ms | RAT step xla ms | attention cuDNN ms "
            "| attention XLA ms | attention jaxchunk paged ms | best attention / best RAT "
            "| RAT state MB | KV cache MB |"
            "\n|---|---|---|---|---|---|---|---|---|")
  cell = lambda times, name: f"{times[name]:.4f}" if name in times else "failed"
  lines = [f"| {b} | {cell(r, 'pallas')} | {cell(r, 'xla')} | {cell(a, 'cudnn')} "
           f"| {cell(a, 'xla')} | {cell(a, 'jaxchunk paged')} "
           f"| {min(a.values()) / min(r.values()):.2f}x "
           f"| {sb / 2**20:.0f} | {cb / 2**20:.0f} |" for b, r, a, sb, cb in rows]
  return "\n".join([header] + lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--quick", action="store_true", help="T = 4K only, 3 repeats")
  parser.add_argument("--decode-only", action="store_true",
                      help="only the decode part (report rat-decode-<date>.md)")
  parser.add_argument("--packed-only", action="store_true",
                      help="only the packed-documents part (report rat-packed-<date>.md)")
  args = parser.parse_args()
  lengths = TRAIN_LENGTHS[:1] if args.quick else TRAIN_LENGTHS
  reps = 3 if args.quick else 10
  date = datetime.date.today().isoformat()
  title = (f"# RAT (chunk {CHUNK}) vs causal attention, H={HEADS} D={HEAD_DIM} bf16\n\n"
           f"{date}; {versions('jax', 'jaxlib', 'torch')}\n\n")
  sections = []
  if not (args.decode_only or args.packed_only):
    sections.append(f"## Training (B=1)\n\n{bench_training(lengths, reps)}\n")
  if not args.decode_only:
    sections.append(f"## Packed documents\n\n{bench_packed(reps)}\n")
  if not args.packed_only:
    sections.append(f"## Decode, {DECODE_CONTEXT} tokens of context\n\n{bench_decode(reps)}\n")
  report = title + "\n".join(sections)
  print("\n" + report)
  name = "rat-decode" if args.decode_only else "rat-packed" if args.packed_only else "rat"
  write_report(os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"),
               f"{name}-{date}{'-quick' if args.quick else ''}", report)

if __name__ == "__main__":
  main()
