"""Lowers a function's Pallas Triton kernels for an H100 on any machine (no GPU needed).

`lower_for_h100(fn, *args)` is `jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))`
with Pallas told that it targets an H100 (compute capability 9.0) and `jax.default_backend()`
saying "gpu" meanwhile, so that jaxchunk's ops take their Pallas paths with interpret mode off.
Each `pallas_call` becomes a `__gpu$xla.gpu.triton` custom call holding its Triton IR; nothing is
compiled or run. The CPU tests use it to catch lowering errors (unsupported ops, dtype mismatches
in the Triton IR) that interpret mode cannot see, and `bench/kernel_resources.py` to compile the
kernels for sm_90 and read their registers and spills. It patches two attributes of the pinned
jax version (0.11.2) for the duration of the call (`targeting_h100`, also used by
`bench/step_kernels.py`); never imported by the kernels themselves.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import jax


@contextlib.contextmanager
def targeting_h100():
  """Within it, Pallas Triton kernels target an H100 and `jax.default_backend()` says "gpu" (so
  jaxchunk's ops take their Pallas paths, interpret mode off). JAX's trace caches are cleared on
  entry and exit: a trace made for the CPU (interpret mode) must not be reused here, nor one made
  here (real kernels) on the CPU later."""
  from jax._src.pallas.triton import gpu_info, pallas_call_registration  # noqa: PLC0415

  h100 = gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100)
  jax.clear_caches()
  try:
    with mock.patch.object(pallas_call_registration.gpu_info_lib, "get_gpu_info", lambda: h100), \
         mock.patch.object(jax, "default_backend", lambda: "gpu"):
      yield
  finally:
    jax.clear_caches()


def lower_for_h100(fn, *args) -> jax.stages.Lowered:
  """jax.jit(fn) on `args` (arrays or ShapeDtypeStructs) lowered for CUDA, Pallas Triton kernels
  for an H100 (`targeting_h100`)."""
  with targeting_h100():
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
