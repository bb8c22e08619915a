"""Linear-attention kernels on one GPU: jaxchunk pallas and xla against FLA (PyTorch) and jla.

  python bench/linear_kernels.py                      # everything; writes bench/results/
  python bench/linear_kernels.py --quick              # T = 8K only, 3 timed calls (a smoke run)
  python bench/linear_kernels.py --ops simple_gla gla --lengths 8192
  python bench/linear_kernels.py --quick --ops gated_delta_rule --profile   # + each call's kernels

Ops: simple_gla, gla, gated_delta_rule, kda, mlstm; bf16 q/k/v, float32 gates, H=16, D=128,
B*T = 64K tokens, T in {2K, 8K, 32K}; fwd, and fwd+bwd (value and gradients of sum(o * cotangent)
w.r.t. q, k, v and the gates). Columns:

- jaxchunk pallas (`impl="pallas"`; "n/a" while the op has no kernel) and jaxchunk xla;
- the PyTorch peer: FLA's Triton `chunk_*` ops (pip: flash-linear-attention, fla-core) and, for
  mlstm, mlstm_kernels' chunkwise TFLA kernel `mlstm_chunkwise__xl_chunk` (pip: mlstm_kernels;
  layout [B, H, T, D], bf16 kernels), each op in a subprocess with a time limit, since Triton
  autotuning can hang; timed with `triton.testing.do_bench` (median);
- jla's Mosaic GPU kernels (pip: jax-linear-attention; `jla.ops.linear_attention(kind, q, k, v,
  impl="mosaic_gpu", g=..., beta=...)`).

Triton autotuning (FLA's kernels try dozens of launch configs, each compiled) took longer than
the per-op limit on a fresh machine in every run until 2026-12-06. Triton can keep its choices:
FLA asks it to (`cache_results`), and each tuned kernel then leaves `<hash>/<kernel>.autotune.json`
in TRITON_CACHE_DIR. Each FLA subprocess gets a fresh TRITON_CACHE_DIR seeded from `--fla_autotune`
(default bench/results/fla_autotune: commit what a run saves there), and its new choices are
copied back there, also when the subprocess hits its limit, so a later run on the same GPU
architecture and Triton version (both are in the hash) compiles only the chosen config of every
kernel tuned before. On the device machine, where files come back only from $OUT:

  cp -r bench/results/fla_autotune $OUT/ 2>/dev/null; python bench/linear_kernels.py \
      --out $OUT --fla_autotune $OUT/fla_autotune     # then commit $OUT/fla_autotune here

Missing peers print "n/a (not installed)". JAX times: jitted, `jax.block_until_ready`, 2 warm-up
calls, median of 10 timed calls. Ratios are peer time / jaxchunk pallas time (> 1: we are faster).

TFLOP/s and GB/s: the FLOPs of the chunked algorithm the jaxchunk kernels run and the minimal
bytes, per op (`kernel_counts`), over the jaxchunk pallas time: how far each kernel is from the
H100's ~685 TFLOP/s bf16 matmul and ~2.8 TB/s copy ceilings.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave memory to the torch peers

import jax
import jax.numpy as jnp
import numpy as np

from timing import median_seconds, profile_kernels

HEADS, HEAD_DIM, TOKENS = 16, 128, 65536
LENGTHS = (2048, 8192, 32768)
OPS = ("simple_gla", "gla", "gated_delta_rule", "kda", "mlstm")
MODES = ("fwd", "fwd+bwd")
CHUNKS = {op: 64 for op in OPS}                  # the Pallas kernels' chunk (their CONFIGS tables)
FLA_FUNCTIONS = {"simple_gla": ("fla.ops.simple_gla", "chunk_simple_gla"),
                 "gla": ("fla.ops.gla", "chunk_gla"),
                 "gated_delta_rule": ("fla.ops.gated_delta_rule", "chunk_gated_delta_rule"),
                 "kda": ("fla.ops.kda", "chunk_kda"),
                 "mlstm": ("mlstm_kernels.torch.chunkwise", "mlstm_chunkwise__xl_chunk")}
JLA_KINDS = {"simple_gla": "simple_gla", "gla": "gla", "gated_delta_rule": "gated_deltanet",
             "kda": "kda"}


def inputs(op: str, t: int, seed: int = 0, batch: int | None = None):
  """NumPy inputs (q, k, v, gates...) for `op` at B = batch or TOKENS // t: bf16-representable q,
  k, v (keys L2-normalised for the delta rules), log-decays in [-0.5, -0.01], betas in (0, 1); for
  mlstm input- and forget-gate pre-activations (i, f) [B, T, H]."""
  rng = np.random.default_rng(seed)
  b = batch or TOKENS // t
  shape = (b, t, HEADS, HEAD_DIM)
  q, k, v = (rng.standard_normal(shape, np.float32) for _ in range(3))
  if op == "mlstm":
    return q, k, v, rng.normal(0.0, 1.0, shape[:3]).astype(np.float32), \
        rng.normal(3.0, 1.0, shape[:3]).astype(np.float32)
  per_channel = op in ("gla", "kda")
  g = rng.uniform(-0.5, -0.01, shape if per_channel else shape[:3]).astype(np.float32)
  if op in ("gated_delta_rule", "kda"):
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    return q, k, v, g, rng.uniform(0.1, 0.9, shape[:3]).astype(np.float32)
  return q, k, v, g


def jitted(fn, args, mode: str):
  """`fn(q, k, v, *gates) -> o` jitted as the forward, or as forward + gradients w.r.t. every
  input (of sum(o * a fixed random cotangent))."""
  if mode == "fwd":
    return jax.jit(fn)
  cotangent = jnp.asarray(np.random.default_rng(1).standard_normal(args[0].shape), jnp.bfloat16)
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32) * cotangent)
  return jax.jit(jax.grad(loss, argnums=tuple(range(len(args)))))


def timed_jax(fn, args, mode: str, reps: int) -> float:
  """Milliseconds of `jitted(fn, args, mode)` (median of `reps` calls after 2 warm-up calls)."""
  return 1e3 * median_seconds(jitted(fn, args, mode), *args, repeats=reps, warmup=2)


def profile_pallas(op: str, t: int, mode: str, calls: int = 5) -> dict[str, float]:
  """The costliest GPU kernels (ms per call) of jaxchunk's pallas `op` at length `t`."""
  args = jax_args(op, t)
  call = jitted(jaxchunk_fn(op, "pallas"), args, mode)
  jax.block_until_ready(call(*args))
  return profile_kernels(lambda: call(*args), calls, label=f"{op} T={t} {mode} call", top=12)


def jax_args(op: str, t: int, batch: int | None = None):
  q, k, v, *gates = inputs(op, t, batch=batch)
  return [jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)] + [jnp.asarray(x) for x in gates]


def jaxchunk_fn(op: str, impl: str):
  from jaxchunk.ops.delta_rule import gated_delta_rule
  from jaxchunk.ops.gla import gla
  from jaxchunk.ops.kda import kda
  from jaxchunk.ops.mlstm import mlstm
  from jaxchunk.ops.simple_gla import simple_gla
  fn = {"simple_gla": simple_gla, "gla": gla, "gated_delta_rule": gated_delta_rule, "kda": kda,
        "mlstm": mlstm}[op]
  return lambda *a: fn(*a, impl=impl)[0]


def jla_fn(op: str):
  from jla.ops import linear_attention
  if op not in JLA_KINDS:
    raise NotImplementedError(f"jla has no {op}")
  names = ("g", "beta")
  return lambda q, k, v, *gates: linear_attention(
      JLA_KINDS[op], q, k, v, impl="mosaic_gpu", **dict(zip(names, gates)))[0]


def run_jax(label: str, make_fn, op: str, t: int, mode: str, reps: int) -> str | float:
  """Time in ms, or a short reason why there is none."""
  try:
    return timed_jax(make_fn(), jax_args(op, t), mode, reps)
  except ImportError:
    return "n/a (not installed)"
  except NotImplementedError:
    return "n/a (no kernel)"
  except Exception as err:  # a failing peer must not stop the table
    print(f"{label} {op} T={t} {mode}: {type(err).__name__}: {err}"[:400], file=sys.stderr)
    return f"error ({type(err).__name__})"


# ------------------------------------------------------------------------------------------------
# FLA (PyTorch), in a subprocess per op.


def fla_worker(op: str, lengths, reps: int) -> None:
  """Prints one JSON line {"T mode": ms or reason} for FLA's op (run as a subprocess)."""
  import importlib

  import torch
  import triton
  fn = getattr(importlib.import_module(FLA_FUNCTIONS[op][0]), FLA_FUNCTIONS[op][1])
  if op == "mlstm":  # returns h alone; bf16 kernels, as our inputs are bf16
    xl_chunk = functools.partial(fn, autocast_kernel_dtype=torch.bfloat16)
    fn = lambda *a: (xl_chunk(*a),)
  results = {}
  for t in lengths:
    arrays = inputs(op, t)
    if op == "mlstm":  # mlstm_kernels' layout is [B, H, T, D] (gates [B, H, T])
      arrays = [np.ascontiguousarray(np.swapaxes(x, 1, 2)) for x in arrays]
    q, k, v = (torch.tensor(x, device="cuda", dtype=torch.bfloat16) for x in arrays[:3])
    gates = [torch.tensor(x, device="cuda") for x in arrays[3:]]
    tensors = [q, k, v, *gates]
    cotangent = torch.randn_like(q)
    for mode in MODES:
      key = f"{t} {mode}"
      try:
        if mode == "fwd":
          with torch.no_grad():
            call = lambda: fn(*tensors)[0]
            ms = triton.testing.do_bench(call, warmup=50, rep=200, return_mode="median")
        else:
          for x in tensors:
            x.requires_grad_(True)
          def call():
            for x in tensors:
              x.grad = None
            (fn(*tensors)[0].float() * cotangent).sum().backward()
          ms = triton.testing.do_bench(call, warmup=50, rep=200, return_mode="median")
        results[key] = ms
      except Exception as err:  # e.g. a backward that refuses this triton version
        results[key] = f"error ({type(err).__name__}: {str(err)[:80]})"
      finally:
        for x in tensors:
          x.requires_grad_(False)
  print("FLA_RESULTS " + json.dumps(results), flush=True)


def copy_autotune(src: str, dst: str) -> int:
  """Copies Triton's autotune choices (`<hash>/<kernel>.autotune.json`) from cache folder `src` to
  `dst`, keeping the hash folders; returns how many files were new there."""
  new = 0
  for path in glob.glob(os.path.join(src, "*", "*.autotune.json")):
    target = os.path.join(dst, os.path.relpath(path, src))
    if not os.path.exists(target):
      os.makedirs(os.path.dirname(target), exist_ok=True)
      shutil.copyfile(path, target)
      new += 1
  return new


def run_fla(op: str, lengths, reps: int, timeout_s: int, autotune_dir: str | None = None) -> dict:
  """FLA's times {"T mode": ms or reason} from a subprocess (`fla_worker`) limited to timeout_s,
  with Triton's autotune choices seeded from and saved to `autotune_dir` (see the docstring)."""
  try:
    for module in ("torch", "mlstm_kernels" if op == "mlstm" else "fla"):
      __import__(module)
  except ImportError:
    return {f"{t} {m}": "n/a (not installed)" for t in lengths for m in MODES}
  command = [sys.executable, __file__, "--fla_worker", op, "--lengths", *map(str, lengths),
             "--reps", str(reps)]
  with tempfile.TemporaryDirectory(prefix="triton_cache_") as cache:
    if autotune_dir:
      copy_autotune(autotune_dir, cache)
    env = dict(os.environ, TRITON_CACHE_DIR=cache)
    try:
      done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
      return {f"{t} {m}": f"timeout ({timeout_s} s)" for t in lengths for m in MODES}
    finally:
      if autotune_dir:
        print(f"FLA {op}: {copy_autotune(cache, autotune_dir)} new autotune choices saved in "
              f"{autotune_dir}", flush=True)
  for line in done.stdout.splitlines():
    if line.startswith("FLA_RESULTS "):
      return json.loads(line[len("FLA_RESULTS "):])
  print(f"FLA {op}: {done.stderr[-600:]}", file=sys.stderr)
  return {f"{t} {m}": "error (worker)" for t in lengths for m in MODES}


# ------------------------------------------------------------------------------------------------
# Counts and the table.


def kernel_counts(op: str, t: int, mode: str):
  """(FLOPs, minimal bytes) of the chunked algorithm the jaxchunk kernels run, per (op, mode).

  Per token and head, with chunk C and head dim d (full C x C blocks, as the kernels run them):

  - gla, simple_gla, mlstm (FLA's chunk algorithm; TFLA's for mlstm, whose normaliser adds only
    O(C + d)): forward 4Cd + 4d^2 (the state pass's k^T v 2d^2; the outputs' q S 2d^2, scores
    q k^T 2Cd and their product with v 2Cd); backward 12Cd + 8d^2 (the reverse state pass 2d^2,
    and the gradient kernel 6d^2 + 12Cd: recomputed scores, dA twice, dq, dk, dv).
  - gated_delta_rule, kda (the WY / UT form): forward 10Cd + 6d^2 + 2C^2/3 (k k^T 2Cd, the
    triangular solve 2C^2/3, W and U_v 4Cd; the state pass's W S and k^T U 4d^2; the outputs'
    q S 2d^2 and q k^T, P U 4Cd); fwd + bwd three times the forward (each product's two
    gradient products) plus the recomputed q k^T and k k^T (4Cd).

  Bytes: q, k, v, o (and do, dq, dk, dv) in bf16, the float32 gates (and their gradients), and the
  per-chunk states [d, d] in bf16, written once and read once in the forward; in fwd + bwd also
  read by the gradient kernel, with dS written and read. Returns None for ops without a count.
  """
  if op not in CHUNKS:
    return None
  c, d = CHUNKS[op], HEAD_DIM
  rows = TOKENS * HEADS
  gate_bytes = 4 * {"gla": d, "simple_gla": 1, "mlstm": 2, "gated_delta_rule": 2, "kda": d + 1}[op]
  state_bytes = 2 * d * d / c
  if op in ("gated_delta_rule", "kda"):
    forward = 10 * c * d + 6 * d * d + 2 * c * c / 3
    flops = forward if mode == "fwd" else 3 * forward + 4 * c * d
  else:
    flops = 4 * c * d + 4 * d * d if mode == "fwd" else 16 * c * d + 12 * d * d
  if mode == "fwd":
    return rows * flops, rows * (4 * 2 * d + gate_bytes + 2 * state_bytes)
  return rows * flops, rows * ((4 + 8) * 2 * d + 3 * gate_bytes + 5 * state_bytes)


def fmt(x) -> str:
  return f"{x:.3f}" if isinstance(x, float) else str(x)


def ratio(peer, ours) -> str:
  return f"{peer / ours:.2f}x" if isinstance(peer, float) and isinstance(ours, float) else "-"


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ops", nargs="+", default=list(OPS), choices=OPS)
  parser.add_argument("--lengths", nargs="+", type=int, default=list(LENGTHS))
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--quick", action="store_true", help="T = 8K only, 3 timed calls")
  parser.add_argument("--peer_timeout", type=int, default=300, help="seconds per FLA op")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                    "results"), help="report folder")
  parser.add_argument("--fla_autotune", default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), "results", "fla_autotune"),
      help="folder of Triton autotune choices: seeds each FLA run, receives its new ones ('' off)")
  parser.add_argument("--xla", action=argparse.BooleanOptionalAction, default=True,
                      help="also time the jaxchunk xla path (--no-xla skips its slow compiles)")
  parser.add_argument("--profile", action="store_true",
                      help="also list the costliest GPU kernels of each jaxchunk pallas call")
  parser.add_argument("--fla_worker", choices=OPS, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.quick:
    args.lengths, args.reps = [8192], 3
  if args.fla_worker:
    fla_worker(args.fla_worker, args.lengths, args.reps)
    return

  header = ("| op | T | B | mode | jaxchunk pallas ms | TFLOP/s | GB/s | jaxchunk xla ms | "
            "FLA ms | jla ms | xla/pallas | FLA/pallas | jla/pallas |")
  lines = [header, "|" + "---|" * (header.count("|") - 1)]
  for op in args.ops:
    fla = run_fla(op, args.lengths, args.reps, args.peer_timeout, args.fla_autotune)
    for t in args.lengths:
      for mode in MODES:
        ours = run_jax("pallas", lambda: jaxchunk_fn(op, "pallas"), op, t, mode, args.reps)
        xla = (run_jax("xla", lambda: jaxchunk_fn(op, "xla"), op, t, mode, args.reps)
               if args.xla else "skipped")
        jla = run_jax("jla", lambda: jla_fn(op), op, t, mode, args.reps)
        peer = fla.get(f"{t} {mode}", "-")
        counts = kernel_counts(op, t, mode)
        tflops = gbs = "-"
        if counts and isinstance(ours, float):
          tflops = f"{counts[0] / ours / 1e9:.0f}"
          gbs = f"{counts[1] / ours / 1e6:.0f}"
        line = (f"| {op} | {t} | {TOKENS // t} | {mode} | {fmt(ours)} | {tflops} | {gbs} | "
                f"{fmt(xla)} | {fmt(peer)} | {fmt(jla)} | {ratio(xla, ours)} | "
                f"{ratio(peer, ours)} | {ratio(jla, ours)} |")
        print(line, flush=True)
        lines.append(line)

  profiles = []
  if args.profile:
    for op in args.ops:
      for t in args.lengths:
        for mode in MODES:
          kernels = profile_pallas(op, t, mode)
          profiles += [f"### {op}, T={t}, {mode}: {sum(kernels.values()):.3f} ms in its "
                       f"{len(kernels)} costliest kernels", "", "| kernel | ms per call |",
                       "|---|---:|", *(f"| `{name[:90]}` | {ms:.4f} |"
                                       for name, ms in kernels.items()), ""]
    profiles = ["## GPU kernels of the jaxchunk pallas calls (`--profile`, profiler trace of 5 "
                "calls)", "", *profiles]

  versions = [f"jax {jax.__version__}"]
  for name in ("torch", "triton", "fla", "jla", "mlstm_kernels"):
    try:
      module = __import__(name)
      versions.append(f"{name} {getattr(module, '__version__', '?')}")
    except ImportError:
      versions.append(f"{name} not installed")
  date = datetime.date.today().isoformat()
  device = jax.devices()[0].device_kind
  report = "\n".join([
      f"# Linear-attention kernels, {device}, {date}", "",
      f"H={HEADS}, D={HEAD_DIM}, B*T={TOKENS}, bf16 q/k/v, float32 gates. {', '.join(versions)}.",
      "Ratios: peer time / jaxchunk pallas time (> 1: jaxchunk faster). TFLOP/s and GB/s: the "
      "chunked algorithm's FLOPs and minimal bytes (`kernel_counts` in bench/linear_kernels.py) "
      "over the jaxchunk pallas time.", "",
      *lines, "", *profiles])
  print("\n" + report)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"linear_kernels-{date}{'-quick' if args.quick else ''}.md")
  with open(path, "w") as f:
    f.write(report)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
