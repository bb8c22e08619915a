"""Time and peak memory of the xla paths against sequence length, on CPU.

Shows that the chunked plain-JAX paths cost O(T) memory (and, for the linear ops, O(T) time) for
`simple_gla`, `rat` and `attention` (attention's time is O(T^2) by nature; its memory stays O(T)
because the xla path is a blockwise online softmax).

Peak memory is XLA's own accounting of the compiled program (arguments + outputs + temporaries,
`compiled.memory_analysis()`), for the forward pass and for forward+backward (value and gradients of
all inputs). Time is the median wall time of the jitted forward.

  python bench/xla_scaling.py                       # T = 1K..64K, writes bench/results/
  python bench/xla_scaling.py --max_log2_t 13       # a quicker run
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from jaxchunk.ops.attention import attention
from jaxchunk.ops.rat import rat
from jaxchunk.ops.simple_gla import simple_gla
from timing import median_seconds

BATCH, HEADS, HEAD_DIM = 1, 2, 64


def make_inputs(op: str, t: int, key):
  """Random inputs [B, T, H, D] for `op` (float32)."""
  kq, kk, kv, kg = jax.random.split(key, 4)
  shape = (BATCH, t, HEADS, HEAD_DIM)
  q, k, v = (jax.random.normal(x, shape) for x in (kq, kk, kv))
  if op == "simple_gla":
    return q, k, v, -jax.nn.softplus(jax.random.normal(kg, (BATCH, t, HEADS)))
  if op == "rat":
    return q, k, v, jax.nn.sigmoid(jax.random.normal(kg, shape))
  return q, k, v


def forward(op: str):
  """The xla forward of `op` as a function of its inputs, returning one array."""
  if op == "simple_gla":
    return lambda *xs: simple_gla(*xs, impl="xla")[0]
  if op == "rat":
    return lambda *xs: rat(*xs, chunk_size=16, impl="xla")[0]
  return lambda *xs: attention(*xs, causal=True, impl="xla")


def peak_bytes(fn, args) -> int:
  """XLA's peak memory estimate for `fn(*args)`: arguments + outputs + temporaries."""
  stats = jax.jit(fn).lower(*args).compile().memory_analysis()
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
          - stats.alias_size_in_bytes)


def measure(op: str, t: int, repeats: int) -> dict:
  args = make_inputs(op, t, jax.random.key(t))
  fwd = forward(op)
  loss = lambda *xs: jnp.sum(fwd(*xs) ** 2)
  fwd_bwd = jax.grad(loss, argnums=tuple(range(len(args))))
  return {
      "op": op, "T": t,
      "fwd_ms": 1e3 * median_seconds(jax.jit(fwd), *args, repeats=repeats),
      "fwd_mib": peak_bytes(fwd, args) / 2**20,
      "fwd_bwd_mib": peak_bytes(fwd_bwd, args) / 2**20,
  }


def render(rows: list[dict]) -> str:
  lines = ["| op | T | fwd ms | ms per 1K tokens | fwd peak MiB | fwd+bwd peak MiB |",
           "|---|---:|---:|---:|---:|---:|"]
  for r in rows:
    lines.append(f"| {r['op']} | {r['T']} | {r['fwd_ms']:.1f} | {1e3 * r['fwd_ms'] / r['T']:.2f} | "
                 f"{r['fwd_mib']:.1f} | {r['fwd_bwd_mib']:.1f} |")
  return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
  """Log-log plot of forward time and peak memory against T, one line per op."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for op in dict.fromkeys(r["op"] for r in rows):
    mine = [r for r in rows if r["op"] == op]
    ts = [r["T"] for r in mine]
    axes[0].loglog(ts, [r["fwd_ms"] for r in mine], "o-", label=op)
    axes[1].loglog(ts, [r["fwd_bwd_mib"] for r in mine], "o-", label=f"{op} fwd+bwd")
  axes[0].set(xlabel="T (tokens)", ylabel="forward ms", title="time (CPU)")
  axes[1].set(xlabel="T (tokens)", ylabel="peak MiB", title="peak memory (XLA accounting)")
  for ax in axes:
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--min_log2_t", type=int, default=10)
  parser.add_argument("--max_log2_t", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--ops", default="simple_gla,rat,attention")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
  args = parser.parse_args()

  lengths = [2**e for e in range(args.min_log2_t, args.max_log2_t + 1)]
  cases = [(op, t) for op in args.ops.split(",") for t in lengths]
  rows = [measure(op, t, args.repeats) for op, t in tqdm(cases, desc="xla scaling")]
  table = render(rows)
  header = (f"# xla paths: time and peak memory against T\n\n"
            f"date {datetime.date.today()}, device {jax.devices()[0].device_kind} "
            f"({os.cpu_count()} cores, {platform.processor() or platform.machine()}), "
            f"jax {jax.__version__}, numpy {np.__version__}; B={BATCH}, H={HEADS}, D={HEAD_DIM}, "
            f"float32, rat chunk 16, simple_gla chunk 64.\n\n")
  print(table)
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, f"xla_scaling-{datetime.date.today()}.md")
  with open(path, "w") as f:
    f.write(header + table + "\n")
  plot(rows, path.replace(".md", ".png"))
  print(f"wrote {path} and its plot")


if __name__ == "__main__":
  main()
