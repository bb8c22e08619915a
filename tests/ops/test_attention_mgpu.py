"""Tests for the Mosaic GPU (Hopper) flash-attention kernels, `pallas_kernels.gpu.flash_attention_mgpu`.

On CPU the kernels run in Mosaic GPU interpret mode (slow: one case runs by default, the rest are
marked slow); on a Hopper GPU (JAX_PLATFORMS=cuda) the same tests run the compiled kernels. Outputs
and gradients are checked against the xla path of `jaxchunk.ops.attention` on the same (16-bit)
inputs upcast to float32, the log-sum-exp against a float64 NumPy oracle.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.attention import attention
from pallas_kernels.gpu import flash_attention_mgpu as mgpu
from tests.utils import assert_rel_close, randn

# The module, not the function `jaxchunk.ops.attention` re-exported under the same name.
attention_module = importlib.import_module("jaxchunk.ops.attention")
INTERPRET = jax.default_backend() != "gpu"
TOL16 = 1e-2


def qkv(rng, *, t, h=2, hk=1, d=64, dtype=jnp.bfloat16):
  return tuple(jnp.asarray(randn(rng, 1, t, n, d), dtype) for n in (h, hk, hk))


def lse_oracle(q, k, *, causal: bool, scale: float):
  """Natural log-sum-exp [B, H, T] of the scaled logits, float64."""
  q, k = (np.asarray(x, np.float64) for x in (q, k))
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  s = scale * np.einsum("bqhd,bkhd->bhqk", q, k)
  if causal:
    t = q.shape[1]
    s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
  m = s.max(-1)
  return m + np.log(np.exp(s - m[..., None]).sum(-1))


def check_against_xla(rng, q, k, v, *, causal: bool, scale=None, what=""):
  """Runs the kernel forward (o and lse) and backward once and compares with the xla path."""
  t, d = q.shape[1], q.shape[3]
  scale_value = d ** -0.5 if scale is None else scale
  kernel = jax.jit(lambda q, k, v: mgpu.flash_attention(q, k, v, causal=causal, scale=scale,
                                                        interpret=INTERPRET))
  o, vjp = jax.vjp(kernel, q, k, v)
  cot = jnp.asarray(randn(rng, *o.shape), q.dtype)
  grads = vjp(cot)
  up = tuple(x.astype(jnp.float32) for x in (q, k, v))
  reference = lambda q, k, v: attention(q, k, v, causal=causal, scale=scale_value, impl="xla")
  o_ref, vjp_ref = jax.vjp(reference, *up)
  grads_ref = vjp_ref(cot.astype(jnp.float32))
  assert o.dtype == q.dtype and o.shape == q.shape
  assert_rel_close(o.astype(jnp.float32), o_ref, TOL16, f"{what} o")
  for name, g, g_ref, x in zip("qkv", grads, grads_ref, (q, k, v)):
    assert g.dtype == x.dtype and g.shape == x.shape
    assert_rel_close(g.astype(jnp.float32), g_ref, TOL16, f"{what} d{name}")
  _, lse = mgpu.flash_attention_forward(q, k, v, causal=causal, scale=scale, interpret=INTERPRET)
  assert lse.shape == (q.shape[0], q.shape[2], t)
  assert_rel_close(lse, lse_oracle(q, k, causal=causal, scale=scale_value), 1e-4, f"{what} lse")


def test_causal_gqa_values_and_grads(rng):
  q, k, v = qkv(rng, t=128)
  check_against_xla(rng, q, k, v, causal=True, what="causal gqa")


@pytest.mark.slow
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_values_and_grads(rng, causal, d):
  q, k, v = qkv(rng, t=256, h=2, hk=2, d=d)
  check_against_xla(rng, q, k, v, causal=causal, scale=0.1, what=f"causal={causal} d={d}")


@pytest.mark.slow
def test_ragged_causal_float16(rng):
  q, k, v = qkv(rng, t=200, dtype=jnp.float16)
  check_against_xla(rng, q, k, v, causal=True, what="ragged float16")


@pytest.mark.slow
def test_small_key_blocks(rng, monkeypatch):
  """64-row key blocks: a causal forward program's first warpgroup stops one block before the
  second (it releases the producer's last block unread), and 3-slot rings wrap around."""
  blocks = dict(mgpu.BLOCKS[64], fwd=mgpu.MgpuBlocks(64, 64, 3), dkv=mgpu.MgpuBlocks(64, 64, 3))
  monkeypatch.setitem(mgpu.BLOCKS, 64, blocks)
  q, k, v = qkv(rng, t=256)
  check_against_xla(rng, q, k, v, causal=True, what="64-row key blocks")


@pytest.mark.slow
def test_attention_dispatch_forced(rng, monkeypatch):
  monkeypatch.setenv(attention_module.FLASH_KERNEL_ENV, "mosaic")
  q, k, v = qkv(rng, t=128, h=4, hk=2)
  o = attention(q, k, v, causal=False, impl="pallas")
  o_ref = attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=False, impl="xla")
  assert_rel_close(o.astype(jnp.float32), o_ref, TOL16, "dispatch")


def test_dispatch_rule(monkeypatch):
  q, k, v = (jnp.zeros((1, 128, 2, 64), jnp.bfloat16),) * 3
  monkeypatch.setenv(attention_module.FLASH_KERNEL_ENV, "triton")
  assert not attention_module._use_mosaic_kernel(q, k, v, True)
  monkeypatch.setenv(attention_module.FLASH_KERNEL_ENV, "auto")
  assert attention_module._use_mosaic_kernel(q, k, v, True) == attention_module._is_hopper()
  monkeypatch.setenv(attention_module.FLASH_KERNEL_ENV, "mosaic")
  assert attention_module._use_mosaic_kernel(q, k, v, True)
  with pytest.raises(NotImplementedError, match="float32"):
    attention_module._use_mosaic_kernel(*(x.astype(jnp.float32) for x in (q, k, v)), True)
  monkeypatch.setenv(attention_module.FLASH_KERNEL_ENV, "cudnn")
  with pytest.raises(ValueError, match="JAXCHUNK_FLASH_KERNEL"):
    attention_module._use_mosaic_kernel(q, k, v, True)


@pytest.mark.parametrize("shapes, dtype, causal, match", [
    (((1, 128, 2, 32),) * 3, jnp.bfloat16, True, "head_dim 32"),
    (((1, 128, 2, 64), (1, 128, 2, 64), (1, 128, 2, 128)), jnp.bfloat16, True, "head_dim_v"),
    (((1, 128, 3, 64), (1, 128, 2, 64), (1, 128, 2, 64)), jnp.bfloat16, True, "divide"),
    (((1, 128, 2, 64), (1, 256, 2, 64), (1, 256, 2, 64)), jnp.bfloat16, True, "Tk"),
    (((1, 128, 2, 64),) * 3, jnp.float32, True, "float32"),
    (((1, 100, 2, 64),) * 3, jnp.bfloat16, False, "multiple of 128"),
])
def test_unsupported_calls_raise(shapes, dtype, causal, match):
  q, k, v = (jnp.zeros(s, dtype) for s in shapes)
  assert mgpu.unsupported_reason(q.shape, k.shape, v.shape, dtype, causal=causal) is not None
  with pytest.raises(ValueError, match=match):
    mgpu.flash_attention(q, k, v, causal=causal, interpret=INTERPRET)


def test_supported_calls():
  for d in mgpu.HEAD_DIMS:
    assert mgpu.unsupported_reason((1, 100, 4, d), (1, 100, 2, d), (1, 100, 2, d), jnp.float16,
                                   causal=True) is None
