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


def lse_oracle(q, k, *, causal: bool, scale: float, window=None):
  """Natural log-sum-exp [B, H, T] of the scaled logits, float64."""
  q, k = (np.asarray(x, np.float64) for x in (q, k))
  k = np.repeat(k, q.shape[2] // k.shape[2], axis=2)
  s = scale * np.einsum("bqhd,bkhd->bhqk", q, k)
  if causal:
    t = q.shape[1]
    back = np.arange(t)[:, None] - np.arange(t)[None, :]  # query position - key position
    visible = (back >= 0) if window is None else (back >= 0) & (back < window)
    s = np.where(visible, s, -np.inf)
  m = s.max(-1)
  return m + np.log(np.exp(s - m[..., None]).sum(-1))


def check_against_xla(rng, q, k, v, *, causal: bool, scale=None, window=None, what=""):
  """Runs the kernel forward (o and lse) and backward once and compares with the xla path."""
  t, d = q.shape[1], q.shape[3]
  scale_value = d ** -0.5 if scale is None else scale
  kernel = jax.jit(lambda q, k, v: mgpu.flash_attention(q, k, v, causal=causal, window=window,
                                                        scale=scale, interpret=INTERPRET))
  o, vjp = jax.vjp(kernel, q, k, v)
  cot = jnp.asarray(randn(rng, *o.shape), q.dtype)
  grads = vjp(cot)
  up = tuple(x.astype(jnp.float32) for x in (q, k, v))
  reference = lambda q, k, v: attention(q, k, v, causal=causal, window=window, scale=scale_value,
                                        impl="xla")
  o_ref, vjp_ref = jax.vjp(reference, *up)
  grads_ref = vjp_ref(cot.astype(jnp.float32))
  assert o.dtype == q.dtype and o.shape == q.shape
  assert_rel_close(o.astype(jnp.float32), o_ref, TOL16, f"{what} o")
  for name, g, g_ref, x in zip("qkv", grads, grads_ref, (q, k, v)):
    assert g.dtype == x.dtype and g.shape == x.shape
    assert_rel_close(g.astype(jnp.float32), g_ref, TOL16, f"{what} d{name}")
  _, lse = mgpu.flash_attention_forward(q, k, v, causal=causal, window=window, scale=scale,
                                        interpret=INTERPRET)
  assert lse.shape == (q.shape[0], q.shape[2], t)
  assert_rel_close(lse, lse_oracle(q, k, causal=causal, scale=scale_value, window=window), 1e-4,
                   f"{what} lse")


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
@pytest.mark.parametrize("t, window", [(256, None), (384, 130), (384, 20)])
def test_small_key_blocks(rng, monkeypatch, t, window):
  """64-row key blocks: a causal forward program's first warpgroup stops one block before the
  second (it releases the producer's last block unread), with a window the second warpgroup
  starts one block after the first (it releases the first ones), and 3-slot rings wrap around."""
  blocks = dict(mgpu.BLOCKS[64], fwd=mgpu.MgpuBlocks(64, 64, 3), dkv=mgpu.MgpuBlocks(64, 64, 3))
  monkeypatch.setitem(mgpu.BLOCKS, 64, blocks)
  q, k, v = qkv(rng, t=t)
  check_against_xla(rng, q, k, v, causal=True, window=window,
                    what=f"64-row key blocks, window {window}")


@pytest.mark.parametrize("programs, scale", [(1, None),
                                             pytest.param(3, -0.2, marks=pytest.mark.slow)])
def test_persistent_window_forward(rng, monkeypatch, programs, scale):
  """Windowed forwards run persistent: with fewer programs than the 6 tiles, a program walks
  several tiles (the key ring, the next tile's Q load and the output stores carry across tiles;
  3 programs: 2 tiles each; 1 program: all six, the ring wrapping between tiles). A negative
  scale takes the pre-scaled logits."""
  monkeypatch.setattr(mgpu, "_persistent_programs", lambda num_tiles: min(programs, num_tiles))
  q, k, v = qkv(rng, t=384)
  check_against_xla(rng, q, k, v, causal=True, window=150, scale=scale,
                    what=f"{programs} persistent programs, scale {scale}")


def test_window_gqa_values_and_grads(rng):
  """Window 40 (smaller than a block) over T = 256: in the second forward program the second
  warpgroup starts a key block after the first (it releases that block unread)."""
  q, k, v = qkv(rng, t=256)
  check_against_xla(rng, q, k, v, causal=True, window=40, what="window 40 gqa")


@pytest.mark.slow
@pytest.mark.parametrize("t, window, h, hk, d, dtype", [
    (256, 16, 2, 1, 64, jnp.bfloat16),    # smaller than any block: one or two masked blocks a row
    (384, 150, 2, 1, 64, jnp.bfloat16),   # the forward's second warpgroup skips a block
    (384, 200, 4, 2, 64, jnp.bfloat16),   # fully visible blocks between the window edge and diagonal
    (384, 70, 2, 2, 128, jnp.bfloat16),
    (200, 50, 2, 1, 64, jnp.float16),     # ragged T (padded)
    (256, 1000, 2, 1, 64, jnp.bfloat16),  # larger than T: plain causal
])
def test_window_values_and_grads(rng, t, window, h, hk, d, dtype):
  q, k, v = qkv(rng, t=t, h=h, hk=hk, d=d, dtype=dtype)
  check_against_xla(rng, q, k, v, causal=True, window=window, scale=0.1,
                    what=f"window {window} T={t} h={h} hk={hk} d={d}")


@pytest.mark.slow
def test_attention_dispatch_forced(rng, monkeypatch):
  monkeypatch.setenv(attention_module.FLASH_KERNEL_ENV, "mosaic")
  q, k, v = qkv(rng, t=128, h=4, hk=2)
  o = attention(q, k, v, causal=False, impl="pallas")
  o_ref = attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=False, impl="xla")
  assert_rel_close(o.astype(jnp.float32), o_ref, TOL16, "dispatch")


@pytest.mark.slow
def test_attention_dispatch_forced_window(rng, monkeypatch):
  monkeypatch.setenv(attention_module.FLASH_KERNEL_ENV, "mosaic")
  q, k, v = qkv(rng, t=256, h=4, hk=2)
  o = attention(q, k, v, causal=True, window=90, impl="pallas")
  o_ref = attention(*(x.astype(jnp.float32) for x in (q, k, v)), causal=True, window=90,
                    impl="xla")
  assert_rel_close(o.astype(jnp.float32), o_ref, TOL16, "window dispatch")


@pytest.mark.parametrize("kwargs, kernel", [
    (dict(causal=True), "mosaic"),
    (dict(causal=False), "mosaic"),
    (dict(causal=True, window=64), "mosaic"),
    (dict(causal=False, window=64), "triton"),
    (dict(causal=True, window=64, softcap=30.0), "triton"),
    (dict(causal=True, segment_ids=np.zeros((1, 128), np.int32)), "triton"),
])
def test_window_dispatch(monkeypatch, kwargs, kernel):
  """Under JAXCHUNK_FLASH_KERNEL=mosaic, impl="pallas" sends dense and causal-window calls to the
  Mosaic GPU kernel (with the window), segment ids, soft-cap and non-causal windows to Triton."""
  calls = []
  record = lambda name: lambda q, *args, **kw: calls.append((name, kw.get("window"))) or q
  monkeypatch.setattr(attention_module.mgpu_kernel, "flash_attention", record("mosaic"))
  monkeypatch.setattr(attention_module.flash_kernel, "flash_attention", record("triton"))
  monkeypatch.setenv(attention_module.FLASH_KERNEL_ENV, "mosaic")
  q, k, v = (jnp.zeros((1, 128, 2, 64), jnp.bfloat16),) * 3
  attention(q, k, v, impl="pallas", **kwargs)
  assert calls == [(kernel, kwargs.get("window"))]


def test_dispatch_rule(monkeypatch):
  q, k, v = (jnp.zeros((1, 128, 2, 64), jnp.bfloat16),) * 3
  monkeypatch.setenv(attention_module.FLASH_KERNEL_ENV, "triton")
  assert not attention_module._use_mosaic_kernel(q, k, v, True)
  monkeypatch.setenv(attention_module.FLASH_KERNEL_ENV, "auto")
  assert attention_module._use_mosaic_kernel(q, k, v, True) == attention_module._is_hopper()
  assert attention_module._use_mosaic_kernel(q, k, v, True, 64) == attention_module._is_hopper()
  monkeypatch.setenv(attention_module.FLASH_KERNEL_ENV, "mosaic")
  assert attention_module._use_mosaic_kernel(q, k, v, True)
  assert attention_module._use_mosaic_kernel(q, k, v, True, 64)
  with pytest.raises(NotImplementedError, match="causal"):
    attention_module._use_mosaic_kernel(q, k, v, False, 64)
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


@pytest.mark.parametrize("causal, window, match", [
    (False, 64, "causal"), (True, 0, "window"), (True, 1.5, "window"), (True, True, "window")])
def test_unsupported_windows_raise(causal, window, match):
  q = jnp.zeros((1, 128, 2, 64), jnp.bfloat16)
  assert mgpu.unsupported_reason(q.shape, q.shape, q.shape, q.dtype, causal=causal,
                                 window=window) is not None
  with pytest.raises(ValueError, match=match):
    mgpu.flash_attention(q, q, q, causal=causal, window=window, interpret=INTERPRET)


@pytest.mark.parametrize("window", [None, 1024])
def test_kernels_lower_for_cuda(window):
  """The forward, dq and dkv kernels (causal, GQA, D = 128) go through the Pallas Mosaic GPU
  lowering for a CUDA device, also on a machine without one (compiling the module for sm_90 and
  running it needs the GPU)."""
  b, t, h, hk, d = 2, 4096, 4, 2, 128
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, hk, d), jnp.bfloat16)
  stats = jax.ShapeDtypeStruct((b, h, t), jnp.float32)
  options = dict(causal=True, window=window, scale=d ** -0.5, interpret=False)
  kernels = [
      (lambda q, k, v: mgpu._forward(q, k, v, **options), (q, kv, kv)),
      (lambda *args: mgpu._backward_dq(*args, **options), (q, kv, kv, q, stats, stats)),
      (lambda *args: mgpu._backward_dkv(*args, **options), (q, kv, kv, q, stats, stats)),
  ]
  for kernel, args in kernels:
    text = jax.jit(kernel).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text


def test_supported_calls():
  for d in mgpu.HEAD_DIMS:
    assert mgpu.unsupported_reason((1, 100, 4, d), (1, 100, 2, d), (1, 100, 2, d), jnp.float16,
                                   causal=True) is None
    assert mgpu.unsupported_reason((1, 100, 4, d), (1, 100, 2, d), (1, 100, 2, d), jnp.float16,
                                   causal=True, window=np.int64(33)) is None
