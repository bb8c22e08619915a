"""Lowers Pallas Triton kernels to Triton IR on a machine without a GPU.

`lower_for_gpu(fn, *args)` runs the Pallas Triton lowering of every `pallas_call` in
`jax.jit(fn)` for an sm_90 GPU while the backend is the CPU, so that lowering errors (unsupported
ops, dtype mismatches in the Triton IR) show up in CPU tests instead of on the GPU machine. Nothing
is compiled or run. For the duration of the call it patches private JAX modules of the pinned jax
version (0.11.2) and makes `jax.default_backend()` say "gpu", so that jaxchunk's ops pick their
Pallas paths with interpret mode off (`JAXCHUNK_FLASH_KERNEL=triton` keeps dense attention on the
Triton kernel: Mosaic GPU kernels do not lower here).
"""

from __future__ import annotations

import contextlib
import types

import jax
from jax._src.interpreters import mlir
from jax._src.pallas import pallas_call as pallas_call_module
from jax._src.pallas.triton import pallas_call_registration as registration

_H100 = types.SimpleNamespace(get_gpu_info=lambda: types.SimpleNamespace(compute_capability=90))


@contextlib.contextmanager
def _triton_lowering_on_cpu():
  lower_module = registration.lowering.lower_jaxpr_to_triton_module
  gpu_info = registration.gpu_info_lib
  default_backend = jax.default_backend
  jax.default_backend = lambda: "gpu"
  registration.gpu_info_lib = _H100
  registration.lowering.lower_jaxpr_to_triton_module = (
      lambda jaxpr, grid_mapping, platform, capability, mlir_ctx: lower_module(
          jaxpr, grid_mapping, "cuda", capability, mlir_ctx=mlir_ctx))
  mlir.register_lowering(pallas_call_module.pallas_call_p, registration.pallas_call_lowering,
                         platform="cpu")
  try:
    yield
  finally:
    # Functions jitted at module level (e.g. an op's kernel wrapper) cached their GPU-path traces
    # (interpret mode off) under the patched backend: drop them before CPU tests call them again.
    jax.clear_caches()
    jax.default_backend = default_backend
    registration.gpu_info_lib = gpu_info
    registration.lowering.lower_jaxpr_to_triton_module = lower_module
    mlir.register_lowering(pallas_call_module.pallas_call_p,
                           pallas_call_module._pallas_call_lowering, platform="cpu")


def lower_for_gpu(fn, *args) -> str:
  """The StableHLO text of jax.jit(fn) on args, its Pallas calls lowered through Triton."""
  with _triton_lowering_on_cpu():
    return jax.jit(fn).lower(*args).as_text()
