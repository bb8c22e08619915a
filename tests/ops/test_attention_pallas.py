"""Tests for the Pallas flash-attention kernel (`impl="pallas"` of jaxchunk.ops.attention).

On CPU the kernels run in Pallas interpret mode; on a GPU backend (run with JAX_PLATFORMS=cuda) the
same tests run the compiled Triton kernels. Values are checked against the float64 oracle of
test_attention.py, gradients against the xla path and the float64 reference path.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.attention import attention
from pallas_kernels.gpu import flash_attention as flash_kernel
from tests.ops.test_attention import make_qkv, oracle, segments
from tests.utils import assert_rel_close, randn

ON_CPU = jax.default_backend() == "cpu"
TOL32 = 1e-5 if ON_CPU else 1e-4  # float32 on GPU: the bound (kernel dots are IEEE)
TOL16 = 1e-2
D = 64  # the smallest head dim the kernel supports
SMALL = (flash_kernel.BlockConfig(16, 16, 4, 1),) * 3  # many blocks at test lengths

attention_jit = jax.jit(attention, static_argnames=("causal", "window", "softcap", "scale", "impl"))


def qkv(rng, t=80, h=4, hk=2, d=D, b=2, dtype=jnp.float32):
  return tuple(jnp.asarray(x, dtype) for x in make_qkv(rng, b=b, tq=t, h=h, hk=hk, d=d))


# Each case: (qkv kwargs, attention kwargs built from rng). T=80: 2 x 3 forward blocks (float32).
CASES = {
    "causal_gqa": (dict(), lambda rng: dict()),
    "noncausal_mqa": (dict(t=37, hk=1), lambda rng: dict(causal=False)),
    "window": (dict(), lambda rng: dict(window=21)),
    "window_noncausal_softcap": (dict(hk=4), lambda rng: dict(window=21, causal=False,
                                                              softcap=2.0, scale=0.2)),
    "packed": (dict(), lambda rng: dict(segment_ids=segments(rng, 2, 80, 5))),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_oracle(rng, case):
  shape, make_kwargs = CASES[case]
  q, k, v = qkv(rng, **shape)
  kwargs = make_kwargs(rng)
  out = attention_jit(q, k, v, impl="pallas", **kwargs)
  assert out.dtype == jnp.float32
  assert_rel_close(out, oracle(q, k, v, **kwargs), TOL32, case)


def _grads(impl, q, k, v, cot, kwargs):
  loss = lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl, **kwargs).astype(cot.dtype) * cot)
  return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)


GRAD_CASES = {
    "causal_softcap_ragged": (dict(t=45), dict(softcap=3.0)),
    "window_segments": (dict(hk=1), dict(window=19, segment_ids=np.array(
        [[0] * 30 + [1] * 50, [2] * 64 + [5] * 16], np.int32))),
}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_gradients(rng, case):
  """Gradients w.r.t. q, k, v: pallas vs xla vs the float64 reference path."""
  shape, kwargs = GRAD_CASES[case]
  q, k, v = qkv(rng, **shape)
  cot = jnp.asarray(randn(rng, *q.shape))
  grads = {impl: _grads(impl, q, k, v, cot, kwargs) for impl in ("pallas", "xla")}
  with jax.enable_x64(True):
    to64 = lambda x: jnp.asarray(x, jnp.float64)
    grads64 = [np.asarray(g) for g in _grads("reference", *map(to64, (q, k, v, cot)), kwargs)]
  for name, g, g_xla, g64 in zip(("dq", "dk", "dv"), grads["pallas"], grads["xla"], grads64):
    assert g.dtype == jnp.float32
    assert_rel_close(g, g_xla, TOL32, f"{case} {name} pallas vs xla")
    assert_rel_close(g, g64, TOL32, f"{case} {name} pallas vs float64")


@pytest.mark.parametrize("dtype", [jnp.bfloat16,
                                   pytest.param(jnp.float16, marks=pytest.mark.slow)])
def test_16bit_inputs(rng, dtype):
  """16-bit values and gradients (window, GQA, ragged T) vs float64."""
  kwargs = dict(window=24)
  q, k, v = qkv(rng, t=50, dtype=dtype)
  out = attention_jit(q, k, v, impl="pallas", **kwargs)
  assert out.dtype == dtype
  assert_rel_close(out, oracle(q, k, v, **kwargs), TOL16, "o")
  cot = jnp.asarray(randn(rng, *q.shape))
  grads = _grads("pallas", q, k, v, cot, kwargs)
  with jax.enable_x64(True):
    to64 = lambda x: jnp.asarray(x, jnp.float64)
    grads64 = [np.asarray(g) for g in _grads("reference", *map(to64, (q, k, v, cot)), kwargs)]
  for name, g, g64 in zip(("dq", "dk", "dv"), grads, grads64):
    assert g.dtype == dtype
    assert_rel_close(g, g64, TOL16, name)


def _unsorted_ids(rng, b, t):
  """Segment ids [b, t]: row 0 a sorted run (skippable blocks) and a shuffled tail, row 1 random."""
  ids = rng.integers(0, 3, size=(b, t)).astype(np.int32)
  ids[0, :40] = np.sort(ids[0, :40])
  return ids


@pytest.mark.parametrize("causal,window,segmented", [
    (True, 40, False), (False, 40, False), (False, 30, True)])
def test_small_blocks(rng, causal, window, segmented):
  """16-token blocks (many masked, unmasked and skipped blocks; unsorted segment ids stay exact):
  values vs float64 and gradients vs xla."""
  q, k, v = qkv(rng, t=70)
  kwargs = dict(causal=causal, window=window)
  seg = None
  if segmented:
    kwargs["segment_ids"] = _unsorted_ids(rng, 2, 70)
    seg = (jnp.asarray(kwargs["segment_ids"]),) * 2
  cot = jnp.asarray(randn(rng, *q.shape))
  kernel = functools.partial(flash_kernel.flash_attention, segment_ids=seg, causal=causal,
                             window=window, scale=D ** -0.5, interpret=ON_CPU, configs=SMALL)
  out = jax.jit(kernel)(q, k, v)
  assert_rel_close(out, oracle(q, k, v, **kwargs), TOL32, "o")
  loss = lambda q, k, v: jnp.sum(kernel(q, k, v) * cot)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for name, g, g_xla in zip(("dq", "dk", "dv"), grads, _grads("xla", q, k, v, cot, kwargs)):
    assert_rel_close(g, g_xla, TOL32, name)


def test_rows_without_keys(rng):
  """Queries whose segment has no keys output zeros and get zero, finite gradients."""
  q, k, v = qkv(rng, t=20, b=1)
  q_seg = np.array([[0] * 12 + [7] * 8], np.int32)  # id 7 has no keys
  kv_seg = np.zeros((1, 20), np.int32)
  kwargs = dict(segment_ids=(q_seg, kv_seg))
  out = attention_jit(q, k, v, impl="pallas", **kwargs)
  np.testing.assert_array_equal(out[0, 12:], 0.0)
  assert_rel_close(out, oracle(q, k, v, **kwargs), TOL32, "o")
  dq, dk, dv = _grads("pallas", q, k, v, jnp.asarray(randn(rng, *q.shape)), kwargs)
  assert all(np.isfinite(np.asarray(g)).all() for g in (dq, dk, dv))
  np.testing.assert_array_equal(dq[0, 12:], 0.0)


def test_jit_and_vmap(rng):
  q, k, v = qkv(rng, t=24, b=2)
  one = lambda q, k, v: attention(q[None], k[None], v[None], window=9, impl="pallas")[0]
  batched = jax.jit(jax.vmap(one))(q, k, v)
  assert_rel_close(batched, oracle(q, k, v, window=9), TOL32, "vmap")


def test_unsupported_calls(rng):
  q, k, v = qkv(rng, t=12, d=16)
  with pytest.raises(NotImplementedError, match="head_dim 16"):
    attention(q, k, v, impl="pallas")
  q, k, v = qkv(rng, t=12)
  with pytest.raises(NotImplementedError, match="q_offset"):
    attention(q, k, v, q_offset=3, impl="pallas")
  with pytest.raises(NotImplementedError, match="kv_length"):
    attention(q, k, v, kv_length=5, impl="pallas")
  with pytest.raises(NotImplementedError, match="Tq"):
    attention(q[:, :4], k, v, impl="pallas")
  with pytest.raises(NotImplementedError, match="dtypes differ"):
    attention(q.astype(jnp.bfloat16), k, v, impl="pallas")
  auto = attention(q, k, v, q_offset=3, impl="auto")  # falls back to xla
  assert_rel_close(auto, oracle(q, k, v, q_offset=3), TOL32, "auto fallback")
  assert flash_kernel.unsupported_reason(64, 32, jnp.float32) == "head_dim_v 32 != head_dim 64"
  assert flash_kernel.unsupported_reason(128, 128, jnp.int8) is not None
  with pytest.raises(ValueError, match="head_dim 16"):
    flash_kernel.flash_attention(*qkv(rng, t=12, d=16), scale=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("d,dtype,tol", [(128, jnp.float32, TOL32), (128, jnp.bfloat16, TOL16),
                                         (256, jnp.float32, TOL32), (256, jnp.float16, TOL16)])
def test_large_head_dims(rng, d, dtype, tol):
  """D = 128 and 256 over several blocks of the full-size configs: values and gradients."""
  kwargs = dict(window=100, segment_ids=segments(rng, 1, 300, 3), softcap=5.0)
  q, k, v = qkv(rng, t=300, b=1, h=2, hk=1, d=d, dtype=dtype)
  out = attention_jit(q, k, v, impl="pallas", **kwargs)
  assert_rel_close(out, oracle(q, k, v, **kwargs), tol, "o")
  cot = jnp.asarray(randn(rng, *q.shape))
  grads = _grads("pallas", q, k, v, cot, kwargs)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  for name, g, g_xla in zip(("dq", "dk", "dv"), grads,
                            _grads("xla", f32(q), f32(k), f32(v), cot, kwargs)):
    assert_rel_close(g, g_xla, tol, name)


def test_cudnn_rule_skips_odd_lengths():
  """auto's cuDNN branch takes only shapes cuDNN trains on: 16-bit, head dim 64/128, even T."""
  from jaxchunk.ops.attention import _cudnn_supports
  shape = lambda t, d=64, dtype=jnp.bfloat16: jnp.zeros((1, t, 2, d), dtype)
  assert _cudnn_supports(shape(2048), shape(2048), shape(2048))
  assert not _cudnn_supports(shape(1365), shape(1365), shape(1365))
  assert not _cudnn_supports(shape(64, dtype=jnp.float32), shape(64), shape(64))
  assert not _cudnn_supports(shape(64, 96), shape(64, 96), shape(64, 96))
