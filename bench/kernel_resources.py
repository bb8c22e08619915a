"""Registers, spills and instruction mix of the linear ops' Pallas (Triton) kernels, without a GPU.

  python bench/kernel_resources.py                          # every op of linear_kernels, fwd+bwd
  python bench/kernel_resources.py --ops gla --out /tmp/kr  # also keeps each kernel's TTIR / SASS

GPU time is scarce; a kernel that spills registers or misses Hopper's wgmma shows it before any
timing. This script lowers an op's forward and backward for an H100 on any machine
(`pallas_kernels.gpu.h100_lowering`: `impl="pallas"` emits real Triton kernels, not interpret
mode). Each `pallas_call` becomes a custom call holding its Triton IR (TTIR), warps and stages;
the `triton` package compiles that TTIR for sm_90 (it bundles ptxas; no driver needed) and its
`cuobjdump` reads the cubin. Use the GPU image's Triton (3.6.0: `pip install triton==3.6.0`).

Columns, per distinct kernel: warps / stages, registers per thread (255 is the cap), spill stack
bytes per thread, shared memory (an H100 SM has 227 KiB: more does not launch), the local loads
/ stores that move the spills (through L1/L2), SASS
instructions, wgmma (HGMMA) and mma.sync (HMMA) instructions (Triton uses wgmma only for dots of
at least 64 rows per warpgroup), exp2 (MUFU.EX2) and barriers. XLA compiles the same TTIR with
its own bundled Triton, so the counts are a close proxy for the binary that runs, not that binary.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

import linear_kernels
from pallas_kernels.gpu.h100_lowering import lower_for_h100

SASS_COUNTS = ("LDL", "STL", "HGMMA", "HMMA", "MUFU.EX2", "BAR")
# The table's columns after op, kernel, warps and stages: (heading, `compile_sm90` key).
COLUMNS = (("regs", "regs"), ("spill bytes", "stack"), ("shared KiB", "shared_kib"),
           ("LDL", "LDL"), ("STL", "STL"), ("instructions", "instructions"), ("HGMMA", "HGMMA"),
           ("HMMA", "HMMA"), ("MUFU.EX2", "MUFU.EX2"), ("BAR", "BAR"))


def triton_kernels(fn, *args) -> list[dict]:
  """The Triton kernels of `jit(fn)(*args)` lowered for an H100 (`lower_for_h100`), in program
  order, each once: dicts of name, num_warps, num_stages and ttir (text). `args` may be
  ShapeDtypeStructs."""
  from jax._src.lib.mlir import ir
  from jax._src.lib.triton import dialect as tt_dialect

  module = lower_for_h100(fn, *args).compiler_ir("stablehlo")
  kernels, seen = [], set()
  with module.context as ctx:
    tt_dialect.register_dialect(ctx)

    def walk(op):
      for region in op.regions:
        for block in region.blocks:
          for child in block.operations:
            child = child.operation
            if (child.name == "stablehlo.custom_call"
                and ir.StringAttr(child.attributes["call_target_name"]).value
                == "__gpu$xla.gpu.triton"):
              config = child.attributes["mhlo.backend_config"]
              ttir = ir.Module.parse(config["ir"].value_bytes).operation.get_asm(
                  enable_debug_info=False)
              key = (ir.StringAttr(config["name"]).value, ttir)
              if key not in seen:
                seen.add(key)
                kernels.append(dict(name=key[0], ttir=ttir,
                                    num_warps=ir.IntegerAttr(config["num_warps"]).value,
                                    num_stages=ir.IntegerAttr(config["num_stages"]).value))
            walk(child)

    walk(module.operation)
  return kernels


def compile_sm90(kernel: dict, stem: str) -> dict:
  """Compiles `kernel` (see `triton_kernels`) for sm_90 with the triton package, keeping its TTIR,
  cubin and SASS as `stem`.ttir / .cubin / .sass; returns its registers, spill stack bytes, shared
  memory (KiB), SASS instruction count and SASS_COUNTS."""
  import triton
  from triton.backends.compiler import GPUTarget

  with open(stem + ".ttir", "w") as f:
    f.write(kernel["ttir"])
  compiled = triton.compile(stem + ".ttir", target=GPUTarget("cuda", 90, 32),
                            options=dict(num_warps=kernel["num_warps"],
                                         num_stages=kernel["num_stages"]))
  with open(stem + ".cubin", "wb") as f:
    f.write(compiled.asm["cubin"])
  cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                           "cuobjdump")
  usage = subprocess.run([cuobjdump, "--dump-resource-usage", stem + ".cubin"], check=True,
                         capture_output=True, text=True).stdout
  sass = subprocess.run([cuobjdump, "-sass", stem + ".cubin"], check=True, capture_output=True,
                        text=True).stdout
  with open(stem + ".sass", "w") as f:
    f.write(sass)
  fields = dict(part.split(":", 1) for part in usage.split() if part.split(":")[0] in
                ("REG", "STACK"))
  lines = [line for line in sass.splitlines() if line.strip().startswith("/*") and ";" in line]
  counts = {op: sum(op in line for line in lines) for op in SASS_COUNTS}
  return dict(regs=int(fields["REG"]), stack=int(fields["STACK"]),
              shared_kib=round(compiled.metadata.shared / 1024), instructions=len(lines), **counts)


def op_kernels(op: str, t: int, mode: str) -> list[dict]:
  """The Triton kernels of jaxchunk's `impl="pallas"` `op` (linear_kernels' inputs at length t:
  B = 64K / t, H = 16, D = 128, bf16 q/k/v), forward or forward and gradients."""
  batch = linear_kernels.TOKENS // t
  args = [jax.ShapeDtypeStruct((batch, t) + x.shape[2:], x.dtype)
          for x in linear_kernels.jax_args(op, 8, batch=1)]
  fn = linear_kernels.jaxchunk_fn(op, "pallas")
  if mode == "fwd":
    return triton_kernels(fn, *args)
  loss = lambda *a: jnp.sum(fn(*a).astype(jnp.float32))
  return triton_kernels(jax.grad(loss, argnums=tuple(range(len(args)))), *args)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--ops", nargs="+", default=list(linear_kernels.OPS),
                      choices=linear_kernels.OPS)
  parser.add_argument("--length", type=int, default=8192, help="T (B = 64K / T)")
  parser.add_argument("--mode", choices=linear_kernels.MODES, default="fwd+bwd")
  parser.add_argument("--out", default=None, help="keep each kernel's TTIR, cubin and SASS here")
  args = parser.parse_args()
  workdir = args.out or tempfile.mkdtemp(prefix="kernel_resources_")
  headings = ("op", "kernel", "warps", "stages") + tuple(heading for heading, _ in COLUMNS)
  print("| " + " | ".join(headings) + " |\n|" + "---|" * len(headings))
  for op in args.ops:
    folder = os.path.join(workdir, op)
    os.makedirs(folder, exist_ok=True)
    for i, kernel in enumerate(op_kernels(op, args.length, args.mode)):
      result = compile_sm90(kernel, os.path.join(folder, f"{i:02d}_{kernel['name']}"))
      cells = (op, kernel["name"], kernel["num_warps"], kernel["num_stages"],
               *(result[key] for _, key in COLUMNS))
      print("| " + " | ".join(map(str, cells)) + " |", flush=True)
  if args.out:
    print(f"TTIR, cubin and SASS of each kernel under {workdir}", file=sys.stderr)


if __name__ == "__main__":
  main()
