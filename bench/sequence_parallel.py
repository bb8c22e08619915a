"""Sequence-parallel benchmarks for a multi-GPU machine (issue 8).

1. Ring attention: the step time (forward + backward) of `ring_attention` on n devices against the
   compute-only time of the same per-device blocks (the identical program with every `ppermute`
   replaced by the identity, so each device attends to its own block with the same masks and loop
   bounds). A ratio <= 1.15 means the communication is hidden behind the compute.
2. Weak scaling of the linear scans (`sequence_parallel_linear`) and RAT (`sequence_parallel_rat`)
   from 1 to N devices at a fixed number of tokens per device: efficiency = t(1) / t(n).
3. The longest sequence (tokens) each op can train (forward + backward of one layer, batch 1) at
   1, 2, 4, ... devices: the sequence doubles until compilation or execution runs out of memory.

  python bench/sequence_parallel.py                 # on the GPUs of this host
  python bench/sequence_parallel.py --smoke         # tiny sizes on 8 virtual CPU devices (a check)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

if "--smoke" in sys.argv:
  os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp

from jaxchunk.parallel import ring as ring_module
from jaxchunk.parallel.linear_scan import sequence_parallel_linear
from jaxchunk.parallel.mesh import sequence_mesh
from jaxchunk.parallel.rat import sequence_parallel_rat
from timing import median_seconds


def grad_step(loss):
  """jit of the gradient of `loss` w.r.t. all its array arguments."""
  return jax.jit(lambda *xs: jax.grad(loss, argnums=tuple(range(len(xs))))(*xs))


def inputs(op: str, t: int, heads: int, dim: int, key):
  """Random bf16 inputs [1, T, heads, dim] of `op` ("attention", "rat" or a linear op)."""
  keys = jax.random.split(key, 6)
  normal = lambda k, *s: jax.random.normal(k, (1, t) + s, jnp.bfloat16)
  q, k, v = (normal(keys[i], heads, dim) for i in range(3))
  if op in ("attention",):
    return q, k, v
  if op == "rat":
    return q, k, v, jax.nn.sigmoid(normal(keys[3], heads, dim))
  k = k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True).astype(k.dtype)
  log_decay = -jax.nn.softplus(normal(keys[3], heads))
  beta = jax.nn.sigmoid(normal(keys[4], heads))
  return {"simple_gla": (q, k, v, log_decay), "gated_delta_rule": (q, k, v, log_decay, beta),
          "mlstm": (q, k, v, normal(keys[4], heads), normal(keys[5], heads) + 3)}[op]


def layer_loss(op: str, mesh, args):
  """The scalar loss sum(o) of one sequence-parallel layer of `op` on `mesh`."""
  if op == "attention":
    run = lambda *xs: ring_module.ring_attention(*xs, mesh=mesh, layout="zigzag",
                                                 block_q=args.block, block_k=args.block)
  elif op == "rat":
    run = lambda *xs: sequence_parallel_rat(*xs, mesh=mesh, chunk_size=args.rat_chunk)
  else:
    run = lambda *xs: sequence_parallel_linear(op, *xs, mesh=mesh, chunk_size=args.chunk)[0]
  return lambda *xs: jnp.sum(run(*xs).astype(jnp.float32))


@contextlib.contextmanager
def without_communication():
  """Replaces the ring's sends by the identity: the same blocks, masks and loops, no traffic."""
  rotate = ring_module._rotate
  ring_module._rotate = lambda tree, cfg, shift: tree
  try:
    yield
  finally:
    ring_module._rotate = rotate


def ring_overlap(args, counts):
  rows = []
  for n in counts:
    if n < 2:
      continue
    mesh = sequence_mesh(n)
    xs = inputs("attention", n * args.tokens_per_device, args.heads, args.dim, jax.random.key(0))
    ring = median_seconds(grad_step(layer_loss("attention", mesh, args)), *xs, repeats=args.repeats)
    with without_communication():
      compute = median_seconds(grad_step(layer_loss("attention", mesh, args)), *xs, repeats=args.repeats)
    rows.append({"bench": "ring_overlap", "devices": n, "tokens": n * args.tokens_per_device,
                 "ring_s": ring, "compute_only_s": compute, "ratio": ring / compute})
  return rows


def weak_scaling(args, counts):
  rows = []
  for op in args.scan_ops:
    base = None
    for n in counts:
      mesh = sequence_mesh(n)
      xs = inputs(op, n * args.tokens_per_device, args.heads, args.dim, jax.random.key(1))
      seconds = median_seconds(grad_step(layer_loss(op, mesh, args)), *xs, repeats=args.repeats)
      base = seconds if base is None else base
      rows.append({"bench": "weak_scaling", "op": op, "devices": n,
                   "tokens": n * args.tokens_per_device, "step_s": seconds,
                   "efficiency": base / seconds})
  return rows


def longest_sequence(args, counts):
  rows = []
  for op in ("attention",) + tuple(args.scan_ops):
    for n in counts:
      mesh = sequence_mesh(n)
      t, best = args.min_tokens * n, 0
      while t <= args.max_tokens:
        try:
          xs = inputs(op, t, args.heads, args.dim, jax.random.key(2))
          jax.block_until_ready(grad_step(layer_loss(op, mesh, args))(*xs))
          best, t = t, 2 * t
        except (jax.errors.JaxRuntimeError, MemoryError) as err:
          if "RESOURCE_EXHAUSTED" not in str(err) and not isinstance(err, MemoryError):
            raise
          break
      rows.append({"bench": "longest_sequence", "op": op, "devices": n, "tokens": best,
                   "capped": best * 2 > args.max_tokens})
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes on 8 virtual CPU devices")
  parser.add_argument("--tokens_per_device", type=int, default=32768)
  parser.add_argument("--heads", type=int, default=8)
  parser.add_argument("--dim", type=int, default=128)
  parser.add_argument("--block", type=int, default=512)
  parser.add_argument("--chunk", type=int, default=64)
  parser.add_argument("--rat_chunk", type=int, default=64)
  parser.add_argument("--scan_ops", nargs="+", default=["simple_gla", "gated_delta_rule", "mlstm",
                                                        "rat"])
  parser.add_argument("--min_tokens", type=int, default=65536)
  parser.add_argument("--max_tokens", type=int, default=1 << 24)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--out", default=None, help="also write the rows as JSON lines here")
  args = parser.parse_args()
  if args.smoke:
    args.tokens_per_device, args.heads, args.dim, args.block = 64, 2, 16, 16
    args.chunk, args.rat_chunk, args.min_tokens, args.max_tokens = 16, 16, 128, 1024
    args.repeats = 1
  counts = [n for n in (1, 2, 4, 8) if n <= jax.device_count()]
  print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
  rows = []
  for bench in (ring_overlap, weak_scaling, longest_sequence):
    for row in bench(args, counts):
      print(json.dumps(row), flush=True)
      rows.append(row)
  if args.out:
    with open(args.out, "w") as f:
      f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
  main()
