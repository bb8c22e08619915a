"""The xla paths of the per-channel-decay ops (gla, kda) with their intra-chunk pair matrices
formed blockwise from products (`jaxchunk.ops._gated_chunk.BLOCKWISE_PAIRS`, the default) or by
the exact secondary chunking, on the default backend: the A/B behind that default off the GPU.

  python bench/pair_matrices.py                      # B=1, T=2K, H=4, D=128, float32
  python bench/pair_matrices.py --length 8192 --heads 16 --dtype bfloat16

Times: jitted forward, and forward plus the gradients of every input, median of 5 calls after a
warm-up (bench/timing.py). Writes pair_matrices-<date>-<platform>.md to --out.
"""

from __future__ import annotations

import argparse
import datetime

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.ops import _gated_chunk, gla, kda
from report import versions, write_report
from timing import median_seconds

OPS = {"gla": lambda q, k, v, g, beta: gla(q, k, v, g, impl="xla")[0],
       "kda": lambda q, k, v, g, beta: kda(q, k, v, g, beta, impl="xla")[0]}


def inputs(length: int, heads: int, dim: int, dtype):
  """q, k, v [1, T, H, D] in `dtype`; per-channel log-decays in [-0.5, -0.01] and beta in
  [0.1, 0.9], float32."""
  rng = np.random.default_rng(0)
  q, k, v = (jnp.asarray(0.3 * rng.standard_normal((1, length, heads, dim)), dtype)
             for _ in range(3))
  g = jnp.asarray(-rng.uniform(0.01, 0.5, (1, length, heads, dim)), jnp.float32)
  beta = jnp.asarray(rng.uniform(0.1, 0.9, (1, length, heads)), jnp.float32)
  return q, k, v, g, beta


def timed(op: str, args) -> dict[str, float]:
  """fwd and fwd+bwd ms of the xla path of `op` as `BLOCKWISE_PAIRS` is set now."""
  fn = OPS[op]
  loss = lambda *a: jnp.sum(jnp.sin(fn(*a).astype(jnp.float32)))
  calls = {"fwd": jax.jit(fn), "fwd+bwd": jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))}
  return {mode: 1e3 * median_seconds(call, *args, repeats=5) for mode, call in calls.items()}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--length", type=int, default=2048)
  parser.add_argument("--heads", type=int, default=4)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--out", default="bench/results")
  args = parser.parse_args()
  data = inputs(args.length, args.heads, args.dim, jnp.dtype(args.dtype))
  default = _gated_chunk.BLOCKWISE_PAIRS
  rows = []
  for op in OPS:
    ms = {}
    for blockwise in (False, True):
      _gated_chunk.BLOCKWISE_PAIRS = blockwise
      ms[blockwise] = timed(op, data)
      print(op, "blockwise" if blockwise else "exact", ms[blockwise], flush=True)
    rows.append((op, ms))
  _gated_chunk.BLOCKWISE_PAIRS = default
  lines = [f"# Per-channel pair matrices of the xla paths: exact secondary chunking against "
           f"blockwise products, {jax.default_backend()}", "",
           f"{datetime.date.today()}; {versions('jax')}; `python bench/pair_matrices.py "
           f"--length {args.length} --heads {args.heads} --dim {args.dim} --dtype {args.dtype}` "
           f"(B = 1; median of 5 calls after a warm-up).", "",
           "| op | mode | exact ms | blockwise ms | exact / blockwise |",
           "|---|---|---:|---:|---:|"]
  for op, ms in rows:
    for mode in ("fwd", "fwd+bwd"):
      lines.append(f"| {op} | {mode} | {ms[False][mode]:.1f} | {ms[True][mode]:.1f} | "
                   f"{ms[False][mode] / ms[True][mode]:.2f}x |")
  markdown = "\n".join(lines) + "\n"
  print(markdown)
  write_report(args.out, f"pair_matrices-{datetime.date.today()}-{jax.default_backend()}",
               markdown)


if __name__ == "__main__":
  main()
