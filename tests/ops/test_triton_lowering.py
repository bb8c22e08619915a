"""Every Triton (pl.pallas_call) kernel, forward and backward, lowers to Triton IR for an H100.

Runs on CPU (`pallas_kernels.gpu.h100_lowering`): catches lowering errors that interpret mode
cannot see before the code reaches the GPU machine. Small shapes, bf16 where the kernels take it.
"""

import importlib

import jax
import jax.numpy as jnp
import pytest

from jaxchunk import ops
from jaxchunk.ops.paged_attention import chunked_prefill_attention, paged_decode_attention
from jaxchunk.ops.rat import rat, rat_init_state, rat_step
from pallas_kernels.gpu.h100_lowering import lower_for_h100

B, T, H, HK, D = 1, 64, 2, 1, 64
TRITON_CALL = "__gpu$xla.gpu.triton"  # the custom call of a lowered Triton kernel


def x(*shape, dtype=jnp.bfloat16):
  return jnp.zeros(shape, dtype)


def gate(*shape):
  return jnp.full(shape, 0.5, jnp.bfloat16)


def loss_and_grads(op, *args):
  """The forward op and the gradient of sum(op(...)[0]) w.r.t. every float input."""
  def loss(*args):
    out = op(*args)
    out = out[0] if isinstance(out, tuple) else out
    return jnp.sum(out.astype(jnp.float32))
  return lambda *args: (loss(*args), jax.grad(loss, argnums=tuple(range(len(args))))(*args))


q, k, v = x(B, T, H, D), x(B, T, HK, D), x(B, T, HK, D)
SEGMENT_IDS = (jnp.arange(T, dtype=jnp.int32)[None] >= 40).astype(jnp.int32)  # a start at t = 40
CASES = {
    "simple_gla": (lambda q, k, v, g: ops.simple_gla(q, k, v, g, impl="pallas"),
                   (q, k, v, jnp.full((B, T, HK), -0.1, jnp.float32))),
    "gla": (lambda q, k, v, g: ops.gla(q, k, v, g, impl="pallas"),
            (q, k, v, jnp.full((B, T, HK, D), -0.1, jnp.float32))),
    "simple_gla_segments": (
        lambda q, k, v, g: ops.simple_gla(q, k, v, g, segment_ids=SEGMENT_IDS, impl="pallas"),
        (q, k, v, jnp.full((B, T, HK), -0.1, jnp.float32))),
    "gla_segments": (
        lambda q, k, v, g: ops.gla(q, k, v, g, segment_ids=SEGMENT_IDS, impl="pallas"),
        (q, k, v, jnp.full((B, T, HK, D), -0.1, jnp.float32))),
    "delta_rule": (lambda q, k, v, b: ops.delta_rule(q, k, v, b, impl="pallas"),
                   (q, k, v, gate(B, T, HK))),
    "gated_delta_rule": (lambda q, k, v, g, b: ops.gated_delta_rule(q, k, v, g, b, impl="pallas"),
                         (q, k, v, jnp.full((B, T, HK), -0.1, jnp.float32), gate(B, T, HK))),
    "kda": (lambda q, k, v, g, b: ops.kda(q, k, v, g, b, impl="pallas"),
            (q, k, v, jnp.full((B, T, HK, D), -0.1, jnp.float32), gate(B, T, HK))),
    "mlstm": (lambda q, k, v, i, f: ops.mlstm(q, k, v, i, f, impl="pallas"),
              (q, k, v, x(B, T, HK, dtype=jnp.float32), x(B, T, HK, dtype=jnp.float32))),
    "rat": (lambda q, k, v, f: rat(q, k, v, f, chunk_size=16, impl="pallas"),
            (q, k, v, gate(B, T, HK, D))),
    "rat_segments": (
        lambda q, k, v, f: rat(q, k, v, f, chunk_size=16, segment_ids=SEGMENT_IDS, impl="pallas"),
        (q, k, v, gate(B, T, HK, D))),
    "attention_packed_window": (
        lambda q, k, v: ops.attention(q, k, v, segment_ids=jnp.zeros((B, T), jnp.int32),
                                      window=16, impl="pallas"), (q, k, v)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_forward_and_backward_lower(name, monkeypatch):
  monkeypatch.setenv("JAXCHUNK_FLASH_KERNEL", "triton")
  op, args = CASES[name]
  text = lower_for_h100(loss_and_grads(op, *args), *args).as_text()
  assert text.count(TRITON_CALL) >= 2, "expected forward and backward Triton kernels"


@pytest.mark.parametrize("name, kernels", [
    ("gated_delta_rule", ("_factor_kernel", "_scalar_grad_kernel")),
    ("kda", ("_channel_factor_kernel", "_channel_grad_kernel"))])
def test_fused_delta_factor_kernels_lower(name, kernels, monkeypatch):
  """The delta rules' fused factor kernels and their gradient kernels (on for every decay kind)."""
  fused_factors = importlib.import_module("jaxchunk.ops.delta_rule").FUSED_FACTORS
  for kind in fused_factors:
    monkeypatch.setitem(fused_factors, kind, True)
  op, args = CASES[name]
  text = lower_for_h100(loss_and_grads(op, *args), *args).as_text()
  for kernel in kernels:
    assert kernel in text, f"{kernel} was not lowered"


def test_serving_kernels_lower():
  pages = x(8, 16, HK, D)
  table = jnp.arange(4, dtype=jnp.int32)[None]
  lengths = jnp.array([40], jnp.int32)
  decode = lambda q: paged_decode_attention(q, pages, pages, table, lengths, impl="pallas")
  prefill = lambda q: chunked_prefill_attention(q, pages, pages, table, lengths - 8,
                                                impl="pallas")
  assert TRITON_CALL in lower_for_h100(decode, x(1, H, D)).as_text()
  assert TRITON_CALL in lower_for_h100(prefill, x(1, 8, H, D)).as_text()
  state = rat_init_state(1, HK, D, 4, dtype=jnp.bfloat16)
  step = lambda q, k, v, f: rat_step(q, k, v, f, state, chunk_size=16, impl="pallas")[0]
  assert TRITON_CALL in lower_for_h100(step, x(1, H, D), x(1, HK, D), x(1, HK, D),
                                        gate(1, HK, D)).as_text()
