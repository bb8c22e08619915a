"""Kernels per serving-engine call on an H100, counted without a GPU.

  pip install "jax[cuda13]==0.11.2" -e .  # a separate venv: the CUDA plugin has XLA's GPU compiler
  python bench/step_kernels.py                            # rat_local_350m, 16 slots, pieces of 128
  python bench/step_kernels.py --pieces 1,16,128 --blocks # per piece length; blocks 0-1 listed

On a GPU host a step's time is often its dispatch, and a CUDA graph's launch grows with its kernels
(docs/serving.md, "Measured"). This script compiles the engine's decode, mixed and prefill calls
for an H100 on any machine: XLA's deviceless (ahead-of-time) compilation, given the H100's
description (`H100_TARGET`), with jaxchunk's Pallas kernels real (`targeting_h100`). It counts the
ops of each optimized program's entry computation that launch work (fusions, Pallas/Triton and
other custom calls, copies...): about the kernels of the call's CUDA graph.
Without a device XLA does not autotune, so its GEMM choices (split-K and their reduction
kernels) can differ from a GPU's compile; on 2026-12-07 the counts were within 1% of the profiled
launches (decode 351 vs 354, mixed 128 451 vs 452, prefill 128 414 vs 416).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import re
import sys

os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")  # no driver here: no version check
os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the engine's own arrays live on the CPU

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import topologies  # noqa: E402

from jaxchunk.models.language_model import LanguageModel  # noqa: E402
from jaxchunk.serving import Engine, EngineConfig  # noqa: E402
from jaxchunk.serving.engine import _pack  # noqa: E402
from pallas_kernels.gpu.h100_lowering import targeting_h100  # noqa: E402
from report import versions, write_report  # noqa: E402
from serve_decode import preset_config  # noqa: E402

RESULTS = os.path.join(os.path.dirname(__file__), "results")
# NVIDIA H100 80GB HBM3 (SXM) as XLA's GpuTargetConfig describes a device.
H100_TARGET = """
gpu_device_info {
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132 fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000 l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: 84978434048 shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 } registers_per_core_limit: 65536
  registers_per_block_limit: 65536
}
platform_name: "CUDA"
device_description_str: "NVIDIA H100 80GB HBM3"
"""
# Entry-computation ops that launch nothing.
NO_LAUNCH = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all",
             "opt-barrier", "add-dependency"}


def h100_device():
  """A compile-only H100 device (deviceless AOT): arrays placed on it can be compiled for, not
  run. Needs the CUDA plugin (`jax[cuda13]`)."""
  try:
    topology = topologies.get_topology_desc("", "cuda", target_config=H100_TARGET,
                                            topology="1x1x1")
  except Exception as error:  # noqa: BLE001 - the plugin's errors are plain runtime errors
    sys.exit(f"cannot compile for an H100 here ({error}); this needs jax[cuda13]==0.11.2 "
             "installed (its CUDA plugin holds XLA's GPU compiler)")
  return topology.devices[0]


def launches(hlo_text: str) -> list[tuple[str, str]]:
  """(kind, source) of each op of the optimized HLO's entry computation that launches work, in
  program order: kind is the opcode, a fusion's kind (kLoop, kInput, kCustom: GEMMs and Triton
  fusions) or a custom call's target; source the op's `op_name` (the jaxpr path)."""
  entry = hlo_text[hlo_text.index("\nENTRY "):]
  entry = entry[:entry.index("\n}\n")]
  ops = []
  for line in entry.splitlines()[1:]:
    match = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = .*? ([\w\-]+)\(", line)
    if not match or match.group(1) in NO_LAUNCH:
      continue
    kind = match.group(1)
    if kind == "fusion":
      kind = "fusion " + re.search(r"kind=(\w+)", line).group(1)
    elif kind == "custom-call":
      kind = re.search(r'custom_call_target="([^"]+)"', line).group(1)
    source = re.search(r'op_name="([^"]*)"', line)
    ops.append((kind, re.sub(r"^jit\([^)]*\)/", "", source.group(1)) if source else ""))
  return ops


def engine_calls(args) -> tuple[Engine, dict[str, tuple]]:
  """The engine (zero weights: only their shapes matter) and its calls to count, as
  {name: (jitted step, argument groups)}."""
  config = preset_config(args.preset, smoke=args.smoke)
  model = LanguageModel(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(1), jnp.zeros((1, 1), jnp.int32)))
  variables = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes)
  engine = Engine(model, variables, EngineConfig(
      num_slots=args.slots, max_len=args.max_len, page_size=args.page_size,
      chunk_size=max(args.pieces)))
  position = args.max_len // 4
  decode = engine._idle_decode_args(position=position)
  calls = {"decode": (engine._decode, (decode,))}
  for length in args.pieces:
    piece = engine._idle_prefill_args(length, slot=1, start=position)
    calls[f"mixed {length}"] = (engine._mixed, (decode, piece))
    calls[f"prefill {length}"] = (engine._prefill, (piece,))
  return engine, calls


def measure(args, device) -> dict:
  on_h100 = lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype,
                                            sharding=jax.sharding.SingleDeviceSharding(device))
  results = {}
  with targeting_h100():
    engine, calls = engine_calls(args)
    state = [jax.tree.map(on_h100, x) for x in (engine.variables, engine.cache,
                                                engine.last_tokens)]
    for name, (step, groups) in calls.items():
      packed, layout = _pack(groups)
      text = step.trace(*state, on_h100(packed), layout).lower().compile().as_text()
      if args.dump:
        os.makedirs(args.dump, exist_ok=True)
        with open(os.path.join(args.dump, name.replace(" ", "_") + ".hlo"), "w") as f:
          f.write(text)
      results[name] = launches(text)
      print(f"{name}: {len(results[name])} kernels", flush=True)
  return results


def render(results: dict, blocks: bool) -> str:
  kinds = sorted({kind for ops in results.values() for kind, _ in ops})
  lines = ["| call | kernels | " + " | ".join(kinds) + " |",
           "|---|---:|" + "---:|" * len(kinds)]
  for name, ops in results.items():
    counts = collections.Counter(kind for kind, _ in ops)
    lines.append(f"| {name} | {len(ops)} | " + " | ".join(str(counts[k]) for k in kinds) + " |")
  if blocks:
    for name, ops in results.items():
      for block in ("block_0/", "block_1/"):
        mine = [f"{kind} `{source.split(block, 1)[1]}`" for kind, source in ops if block in source]
        lines += ["", f"{name}, {block[:-1]} ({len(mine)} kernels): " + "; ".join(mine)]
      outside = [f"{kind} `{source}`" for kind, source in ops if "/block_" not in source]
      lines += ["", f"{name}, outside the blocks ({len(outside)}): " + "; ".join(outside)]
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--preset", default="rat_local_350m")
  parser.add_argument("--slots", type=int, default=16)
  parser.add_argument("--max-len", type=int, default=4096)
  parser.add_argument("--page-size", type=int, default=64)
  parser.add_argument("--pieces", type=lambda s: [int(x) for x in s.split(",")], default=[128],
                      help="prefill piece lengths (comma-separated; the longest is chunk_size)")
  parser.add_argument("--blocks", action="store_true",
                      help="also list the kernels of the first two blocks and outside the blocks")
  parser.add_argument("--dump", metavar="DIR", help="write each call's optimized HLO there")
  parser.add_argument("--smoke", action="store_true", help="the preset's tiny smoke variant")
  parser.add_argument("--out", default=RESULTS, help="folder of the report")
  args = parser.parse_args(argv)
  device = h100_device()
  results = measure(args, device)
  date = datetime.date.today().isoformat()
  command = f"`bench/step_kernels.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
  report = (f"# Kernels per engine call on an H100, compiled without a GPU\n\ndate {date}; "
            f"compiled for {device.device_kind} on a machine without one; jax {jax.__version__}, "
            f"{versions('jaxlib', 'jax-cuda13-plugin').split('; ', 1)[1]}\n\n"
            f"{command}: {args.preset} (bf16), {args.slots} slots, max_len "
            f"{args.max_len}, page {args.page_size}; XLA's deviceless compile for an H100 (no "
            f"autotuning: GEMM choices may differ from a GPU's compile).\n\n"
            f"{render(results, args.blocks)}\n")
  print("\n" + report)
  smoke = "-smoke" if args.smoke else ""
  write_report(args.out, f"step_kernels-{date}{smoke}", report,
               {name: {"kernels": len(ops), "by_kind": collections.Counter(k for k, _ in ops)}
                for name, ops in results.items()})


if __name__ == "__main__":
  main()
