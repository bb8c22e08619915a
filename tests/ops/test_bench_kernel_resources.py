"""bench/kernel_resources.py: the Triton kernels of an op lowered for an H100 on a CPU machine
(compiling them needs the `triton` package, which the test environment does not install)."""

import dataclasses
import os

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


def test_gla_lowers_to_triton_kernels_for_an_h100(monkeypatch):
  """GLA's forward and backward: the state pass (forward, then reverse), the output kernel and one
  gradient kernel, or two with `split_grad`; each once, with its launch and its Triton IR."""
  monkeypatch.syspath_prepend(BENCH)
  import kernel_resources  # noqa: PLC0415 (bench/ is not a package)
  from pallas_kernels.gpu import gated_linear_attention as kernels

  key = (True, 128)
  base = kernels.CONFIGS[key]
  monkeypatch.setitem(kernels.CONFIGS, key, dataclasses.replace(base, split_grad=False))
  found = kernel_resources.op_kernels("gla", 2048, "fwd+bwd")
  assert [k["name"] for k in found] == ["_state_pass_kernel", "_output_kernel",
                                        "_state_pass_kernel", "_grad_kernel"]
  assert found[0]["ttir"] != found[2]["ttir"]  # forward and reverse passes differ
  assert [(k["num_warps"], k["num_stages"]) for k in found] == [(4, 3), (4, 1), (4, 3), (8, 1)]
  assert all("tt.func" in k["ttir"] and "tt.dot" in k["ttir"] for k in found)
  assert [k["name"] for k in kernel_resources.op_kernels("gla", 2048, "fwd")] == [
      "_state_pass_kernel", "_output_kernel"]

  monkeypatch.setitem(kernels.CONFIGS, key, dataclasses.replace(base, split_grad=True))
  split = kernel_resources.op_kernels("gla", 2048, "fwd+bwd")
  assert [k["name"] for k in split][3:] == ["_grad_kernel", "_grad_kernel"]
  assert split[3]["ttir"] != split[4]["ttir"]
