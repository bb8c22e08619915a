"""Tests for jaxchunk.ops.attention: reference and blockwise paths vs a float64 NumPy oracle."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.attention import attention
from tests.utils import assert_rel_close, randn

IMPLS = ("reference", "xla")
BLOCKS = dict(block_q=16, block_k=8)  # several, ragged tiles at the test lengths
# Jitted once per configuration (cheaper than eager dispatch); arrays stay traced arguments.
attention_jit = jax.jit(attention, static_argnames=(
    "causal", "window", "softcap", "scale", "block_q", "block_k", "impl"))


def oracle(q, k, v, *, causal=True, segment_ids=None, window=None, softcap=None, scale=None,
           q_offset=0, kv_length=None):
  """Softmax attention in float64, one query row at a time."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, tq, h, d = q.shape
  tk, hk = k.shape[1], k.shape[2]
  group = h // hk
  scale = d ** -0.5 if scale is None else scale
  q_offset = np.broadcast_to(q_offset, (b,))
  kv_length = np.broadcast_to(tk if kv_length is None else kv_length, (b,))
  if segment_ids is None:
    q_seg = kv_seg = None
  elif isinstance(segment_ids, tuple):
    q_seg, kv_seg = segment_ids
  else:
    q_seg = kv_seg = segment_ids
  k = np.repeat(k, group, axis=2)
  v = np.repeat(v, group, axis=2)
  o = np.zeros((b, tq, h, v.shape[3]))
  keys = np.arange(tk)
  for bi in range(b):
    for i in range(tq):
      pos = q_offset[bi] + i
      valid = keys < kv_length[bi]
      if causal:
        valid &= keys <= pos
      if window is not None:
        valid &= pos - keys < window
        if not causal:
          valid &= keys - pos < window
      if q_seg is not None:
        valid &= kv_seg[bi] == q_seg[bi, i]
      if not valid.any():
        continue
      s = scale * np.einsum("hd,khd->hk", q[bi, i], k[bi, valid])
      if softcap is not None:
        s = softcap * np.tanh(s / softcap)
      p = np.exp(s - s.max(axis=1, keepdims=True))
      p /= p.sum(axis=1, keepdims=True)
      o[bi, i] = np.einsum("hk,khd->hd", p, v[bi, valid])
  return o


def make_qkv(rng, b=2, tq=37, tk=None, h=4, hk=2, d=8, dv=None):
  tk = tq if tk is None else tk
  return (randn(rng, b, tq, h, d), randn(rng, b, tk, hk, d), randn(rng, b, tk, hk, dv or d))


def segments(rng, b, t, n):
  """Sorted (packed-document) segment ids [b, t] with about n documents per row."""
  return np.sort(rng.integers(0, n, size=(b, t)), axis=1).astype(np.int32)


# Each case: (make_qkv shape kwargs, attention kwargs built from rng).
CASES = {
    "causal": (dict(), lambda rng: dict()),
    "noncausal": (dict(), lambda rng: dict(causal=False)),
    "mha": (dict(hk=4), lambda rng: dict()),
    "mqa_dv": (dict(hk=1, dv=12), lambda rng: dict(causal=False)),
    "window": (dict(), lambda rng: dict(window=6)),
    "window_noncausal": (dict(), lambda rng: dict(window=6, causal=False)),
    "softcap_scale": (dict(), lambda rng: dict(softcap=3.0, scale=0.7)),
    "segments": (dict(), lambda rng: dict(segment_ids=segments(rng, 2, 37, 4))),
    "segment_pair": (dict(tq=13, tk=37), lambda rng: dict(
        segment_ids=(segments(rng, 2, 13, 3), segments(rng, 2, 37, 3)), causal=False)),
    "offset_length": (dict(tq=11, tk=45), lambda rng: dict(
        q_offset=np.array([20, 29], np.int32), kv_length=np.array([33, 41], np.int32))),
    "offset_window": (dict(tq=11, tk=45), lambda rng: dict(
        q_offset=np.array([3, 30], np.int32), kv_length=np.array([45, 40], np.int32), window=9)),
}


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_oracle(rng, case, impl):
  shape, make_kwargs = CASES[case]
  q, k, v = make_qkv(rng, **shape)
  kwargs = make_kwargs(rng)
  out = attention_jit(q, k, v, impl=impl, **BLOCKS, **kwargs)
  assert out.dtype == jnp.float32
  assert_rel_close(out, oracle(q, k, v, **kwargs), 1e-5, f"{case}/{impl}")


@pytest.mark.parametrize("block_q,block_k,causal", [
    (1, 1, True), (1, 1, False), (5, 7, True), (64, 64, False)])
def test_block_sizes(rng, block_q, block_k, causal):
  """Output and gradients do not depend on the tiling (block-skipping bounds are exact)."""
  q, k, v = make_qkv(rng, tq=19, tk=27)
  cot = randn(rng, *q.shape)
  kwargs = dict(q_offset=np.array([8, 2], np.int32), kv_length=np.array([27, 21], np.int32),
                window=11, causal=causal)
  out = attention(q, k, v, impl="xla", block_q=block_q, block_k=block_k, **kwargs)
  assert_rel_close(out, oracle(q, k, v, **kwargs), 1e-5, f"blocks {block_q}x{block_k}")

  def grads(impl, **blocks):
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl, **blocks, **kwargs) * cot)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

  for name, g, g_ref in zip(("dq", "dk", "dv"), grads("xla", block_q=block_q, block_k=block_k),
                            grads("reference")):
    assert_rel_close(g, g_ref, 1e-5, f"{name} blocks {block_q}x{block_k}")


@pytest.mark.parametrize("impl", IMPLS)
def test_bf16(rng, impl):
  q, k, v = (jnp.asarray(x, jnp.bfloat16) for x in make_qkv(rng))
  out = attention_jit(q, k, v, impl=impl, softcap=5.0, **BLOCKS)
  assert out.dtype == jnp.bfloat16
  ref = oracle(*(np.asarray(x, np.float32) for x in (q, k, v)), softcap=5.0)
  assert_rel_close(np.asarray(out, np.float32), ref, 1e-2, f"bf16/{impl}")


@pytest.mark.parametrize("impl", IMPLS)
def test_rows_without_keys_are_zero(rng, impl):
  q, k, v = make_qkv(rng, tq=12, tk=20)
  q_seg = np.array([[0] * 6 + [7] * 6, [1] * 12], np.int32)  # id 7 has no keys
  kv_seg = np.array([[0] * 20, [1] * 20], np.int32)
  kwargs = dict(segment_ids=(q_seg, kv_seg), kv_length=np.array([20, 0], np.int32),
                q_offset=np.array([8, 8], np.int32))
  cot = randn(rng, 2, 12, 4, 8)

  def loss(q, k, v):
    return jnp.sum(attention(q, k, v, impl=impl, **BLOCKS, **kwargs) * cot)

  out = attention_jit(q, k, v, impl=impl, **BLOCKS, **kwargs)
  np.testing.assert_array_equal(out[0, 6:], 0.0)
  np.testing.assert_array_equal(out[1], 0.0)
  assert np.abs(np.asarray(out[0, :6])).min() > 0
  assert_rel_close(out, oracle(q, k, v, **kwargs), 1e-5, "partly masked")
  dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
  for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
    assert np.isfinite(np.asarray(g)).all(), name
  np.testing.assert_array_equal(dq[0, 6:], 0.0)
  np.testing.assert_array_equal(dq[1], 0.0)
  np.testing.assert_array_equal(dk[1], 0.0)
  np.testing.assert_array_equal(dv[1], 0.0)


GRAD_CASES = {
    "causal_softcap": (dict(tq=37, hk=2), dict(softcap=4.0)),
    "window_segments": (dict(tq=37, hk=1), dict(window=7, segment_ids=np.array(
        [[0] * 15 + [1] * 22, [2] * 30 + [5] * 7], np.int32))),
    "offset_noncausal": (dict(tq=9, tk=30, hk=4), dict(
        causal=False, window=12, q_offset=np.array([5, 17], np.int32),
        kv_length=np.array([30, 24], np.int32))),
}


@pytest.mark.parametrize("case", sorted(GRAD_CASES))
def test_gradients(rng, case):
  shape, kwargs = GRAD_CASES[case]
  q, k, v = make_qkv(rng, **shape)
  cot = randn(rng, *q.shape[:3], v.shape[3])

  def loss(impl, q, k, v):
    return jnp.sum(attention(q, k, v, impl=impl, **BLOCKS, **kwargs) * cot)

  grads = {impl: jax.jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2)))(q, k, v)
           for impl in IMPLS}
  with jax.enable_x64(True):
    grads64 = jax.jit(jax.grad(functools.partial(loss, "reference"), argnums=(0, 1, 2)))(
        *(jnp.asarray(x, jnp.float64) for x in (q, k, v)))
    grads64 = [np.asarray(g) for g in grads64]
  assert grads64[0].dtype == np.float64
  for name, g_xla, g_ref, g64 in zip(("dq", "dk", "dv"), grads["xla"], grads["reference"],
                                     grads64):
    assert_rel_close(g_xla, g_ref, 1e-5, f"{case} {name} xla vs reference")
    assert_rel_close(g_xla, g64, 1e-5, f"{case} {name} xla vs float64")
    assert_rel_close(g_ref, g64, 1e-5, f"{case} {name} reference vs float64")


@pytest.mark.parametrize("impl", IMPLS)
def test_kv_cache_decode(rng, impl):
  """Prefill into a KV-cache buffer (per-batch lengths), then decode token by token."""
  b, t, h, hk, d, capacity, steps = 2, 20, 4, 2, 8, 24, 8
  q, k, v = make_qkv(rng, b=b, tq=t, h=h, hk=hk, d=d)
  full = np.asarray(attention_jit(q, k, v, impl="reference"))
  lengths = np.array([5, 9], np.int32)
  prefill = int(lengths.max())
  # Unwritten cache slots hold junk that must stay masked.
  k_cache = randn(rng, b, capacity, hk, d).copy()
  v_cache = randn(rng, b, capacity, hk, d).copy()
  k_cache[:, :prefill], v_cache[:, :prefill] = k[:, :prefill], v[:, :prefill]
  out = attention_jit(q[:, :prefill], k_cache, v_cache, kv_length=lengths, impl=impl, **BLOCKS)
  for bi in range(b):
    assert_rel_close(out[bi, :lengths[bi]], full[bi, :lengths[bi]], 1e-5, f"prefill row {bi}")

  @jax.jit
  def decode(q_t, k_cache, v_cache, k_t, v_t, pos):
    rows = jnp.arange(b)
    k_cache = k_cache.at[rows, pos].set(k_t)
    v_cache = v_cache.at[rows, pos].set(v_t)
    o = attention(q_t[:, None], k_cache, v_cache, q_offset=pos, kv_length=pos + 1, impl=impl,
                  **BLOCKS)
    return o[:, 0], k_cache, v_cache

  rows = np.arange(b)
  k_cache, v_cache = jnp.asarray(k_cache), jnp.asarray(v_cache)
  for n in range(steps):
    pos = lengths + n
    o_t, k_cache, v_cache = decode(q[rows, pos], k_cache, v_cache, k[rows, pos], v[rows, pos],
                                   jnp.asarray(pos))
    assert_rel_close(o_t, full[rows, pos], 1e-5, f"decode step {n}")


@pytest.mark.parametrize("impl", IMPLS)
def test_chunked_prefill(rng, impl):
  q, k, v = make_qkv(rng, tq=40)
  kwargs = dict(window=15, impl=impl, **BLOCKS)
  full = attention_jit(q, k, v, **kwargs)
  first = attention_jit(q[:, :17], k[:, :17], v[:, :17], **kwargs)
  second = attention_jit(q[:, 17:], k, v, q_offset=17, **kwargs)
  assert_rel_close(jnp.concatenate([first, second], axis=1), full, 1e-5, "two-piece prefill")


def test_jit_and_vmap(rng):
  q, k, v = (np.stack(x) for x in zip(make_qkv(rng, tq=21), make_qkv(rng, tq=21)))
  kwargs = dict(window=9, softcap=2.5, **BLOCKS)
  fn = functools.partial(attention, impl="xla", **kwargs)
  batched = jax.jit(jax.vmap(fn))(q, k, v)
  for i in range(2):
    assert_rel_close(batched[i], oracle(q[i], k[i], v[i], window=9, softcap=2.5), 1e-5,
                     f"vmap slice {i}")
  offsets = jnp.array([3, 6], jnp.int32)
  jitted = jax.jit(lambda q, k, v, off: fn(q, k, v, q_offset=off))(q[0], k[0], v[0], offsets)
  assert_rel_close(jitted, oracle(q[0], k[0], v[0], window=9, softcap=2.5, q_offset=offsets),
                   1e-5, "jit with traced q_offset")


def _largest_intermediate(jaxpr) -> int:
  """Size of the largest value produced anywhere in a jaxpr (sub-jaxprs included)."""
  largest = 0
  for eqn in jaxpr.eqns:
    for var in eqn.outvars:
      largest = max(largest, math.prod(getattr(var.aval, "shape", ())))
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        sub = getattr(sub, "jaxpr", sub)
        if hasattr(sub, "eqns"):
          largest = max(largest, _largest_intermediate(sub))
  return largest


def test_blockwise_memory_is_linear_in_length(rng):
  t, h = 256, 2
  q, k, v = make_qkv(rng, b=1, tq=t, h=h, hk=1, d=8)

  def largest(impl):
    loss = lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl, block_q=32, block_k=32) ** 2)
    return _largest_intermediate(jax.make_jaxpr(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v).jaxpr)

  assert largest("reference") >= h * t * t  # the dense path materialises the scores
  assert largest("xla") < t * t


@pytest.mark.parametrize("make_args,match", [
    (lambda q, k, v: ((q[0], k, v), {}), r"q must have shape"),
    (lambda q, k, v: ((q, k[..., :4], v), {}), r"k must have shape"),
    (lambda q, k, v: ((q, k[:1], v), {}), r"k must have shape"),
    (lambda q, k, v: ((q, k, v[:, :5]), {}), r"v must have shape"),
    (lambda q, k, v: ((q[:, :, :3], k, v), {}), r"must divide the heads of q"),
    (lambda q, k, v: ((q, k, v), dict(segment_ids=np.zeros((2, 11), np.int32))),
     r"segment_ids must be an integer array of shape \[2, 12\]"),
    (lambda q, k, v: ((q, k, v), dict(segment_ids=np.zeros((2, 12), np.float32))),
     r"segment_ids must be an integer array"),
    (lambda q, k, v: ((q[:, :4], k, v), dict(segment_ids=np.zeros((2, 12), np.int32))),
     r"requires Tq == Tk"),
    (lambda q, k, v: ((q[:, :4], k, v), dict(segment_ids=(np.zeros((2, 12), np.int32),
                                                          np.zeros((2, 12), np.int32)))),
     r"q_segment_ids .* shape \[2, 4\]"),
    (lambda q, k, v: ((q, k, v), dict(q_offset=np.zeros(3, np.int32))),
     r"q_offset must be an integer array of shape \[2\]"),
    (lambda q, k, v: ((q, k, v), dict(q_offset=1.5)), r"q_offset must be an int"),
    (lambda q, k, v: ((q, k, v), dict(kv_length=np.ones((2, 1), np.int32))),
     r"kv_length must be an integer array of shape \[2\]"),
    (lambda q, k, v: ((q, k, v), dict(window=0)), r"window must be >= 1"),
    (lambda q, k, v: ((q, k, v), dict(window=2.5)), r"window must be a Python int"),
    (lambda q, k, v: ((q, k, v), dict(softcap=-1.0)), r"softcap must be > 0"),
    (lambda q, k, v: ((q, k, v), dict(block_q=0)), r"block_q must be a positive int"),
    (lambda q, k, v: ((q, k, v), dict(block_k=None)), r"block_k must be a positive int"),
    (lambda q, k, v: ((q, k, v), dict(impl="triton")), r"impl must be one of"),
])
def test_bad_arguments(rng, make_args, match):
  args, kwargs = make_args(*make_qkv(rng, tq=12))
  with pytest.raises(ValueError, match=match):
    attention(*args, **kwargs)


def test_pallas_not_available(rng):
  with pytest.raises(NotImplementedError):
    attention(*make_qkv(rng, tq=4), impl="pallas")
