"""The delta rules' pallas path with its chunk-local factors from XLA or from the fused factor
kernels (`jaxchunk.ops.delta_rule.FUSED_FACTORS`, per decay kind), KDA's XLA factors with
blockwise pair matrices (`BLOCKWISE_PAIRS`), and state-pass tiles, against jla, on one GPU: the
A/B that decides the defaults.

  python bench/delta_factors.py                       # gated_delta_rule and kda
  python bench/delta_factors.py kda --profile         # + the GPU kernels of each op's fwd+bwd

B = 8, T = 8K, H = 16, D = 128, bf16 q/k/v, float32 gates (bench/linear_kernels.py's inputs and
timing: jitted, 2 warm-up calls, median of 10). Prints one table; ratios are left to the reader.
"""

from __future__ import annotations

import dataclasses
import importlib
import sys

import jax

import linear_kernels as lk
from jaxchunk.ops import _gated_chunk
from pallas_kernels.gpu import delta_rule as delta_kernel
from report import versions

delta_module = importlib.import_module("jaxchunk.ops.delta_rule")  # the op shadows the module
T = 8192
# (Dv columns per state-pass program, warps, stages) tried with the fused factors.
STATE_TILES = {"gated_delta_rule": ((64, 8, 2), (32, 8, 2), (64, 8, 1)),
               "kda": ((64, 8, 2), (32, 8, 2))}


def use_fused(fused: bool) -> None:
  """Every decay kind takes its factors from the fused kernels (True) or from XLA (False)."""
  for kind in delta_module.FUSED_FACTORS:
    delta_module.FUSED_FACTORS[kind] = fused


def timed(op: str, args) -> dict[str, float]:
  """fwd and fwd+bwd ms of jaxchunk's pallas `op` as the module is patched now (re-traced)."""
  jax.clear_caches()
  out = {}
  for mode in lk.MODES:
    try:
      out[mode] = lk.timed_jax(lk.jaxchunk_fn(op, "pallas"), args, mode, 10)
    except Exception as error:  # a failing variant should not end the run
      print(op, mode, "error", repr(error)[:300], flush=True)
      out[mode] = float("nan")
  return out


def main() -> None:
  ops = [a for a in sys.argv[1:] if not a.startswith("-")] or list(STATE_TILES)
  base = delta_kernel.CONFIGS[128]
  rows = []
  for op in ops:
    args = lk.jax_args(op, T)
    use_fused(False)
    default_pairs = _gated_chunk.BLOCKWISE_PAIRS
    _gated_chunk.BLOCKWISE_PAIRS = False
    rows.append((op, "XLA factors; state passes as CONFIGS", timed(op, args)))
    if op == "kda":
      _gated_chunk.BLOCKWISE_PAIRS = True
      rows.append((op, "XLA factors, blockwise pairs (`BLOCKWISE_PAIRS`)", timed(op, args)))
    _gated_chunk.BLOCKWISE_PAIRS = default_pairs
    for block_v, warps, stages in STATE_TILES[op]:
      delta_kernel.CONFIGS[128] = dataclasses.replace(base, block_v=block_v, num_warps=warps,
                                                      num_stages=stages)
      use_fused(True)
      rows.append((op, f"fused factors; state passes {block_v} cols, {warps} warps, "
                       f"{stages} stages", timed(op, args)))
    delta_kernel.CONFIGS[128] = base
    try:
      rows.append((op, "jla", {m: lk.timed_jax(lk.jla_fn(op), args, m, 10) for m in lk.MODES}))
    except Exception as error:
      print(op, "jla error", repr(error)[:300], flush=True)
    for row in rows[-len(STATE_TILES[op]) - 2 - (op == "kda"):]:
      print(row, flush=True)
  print("\n" + versions("jax", "jax-linear-attention"))
  print("| op | variant | fwd ms | fwd+bwd ms |\n|---|---|---:|---:|")
  for op, name, ms in rows:
    print(f"| {op} | {name} | {ms['fwd']:.3f} | {ms['fwd+bwd']:.3f} |")
  if "--profile" in sys.argv:
    for fused in (False, True):
      use_fused(fused)
      for op in ops:
        jax.clear_caches()
        print(f"{op}, fused factors {fused}:", lk.profile_pallas(op, T, "fwd+bwd"))


if __name__ == "__main__":
  main()
