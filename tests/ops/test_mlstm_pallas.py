"""Tests of the Pallas kernel of `mlstm` (impl="pallas").

On CPU the kernels run in Pallas interpret mode; on a GPU the same tests run the compiled Triton
kernels (float32 through full-precision dots: tolerance 1e-4 there, as the issue allows).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.mlstm import mlstm
from tests.utils import assert_rel_close, randn

F32_TOL = 1e-5 if jax.default_backend() == "cpu" else 1e-4
BF16_TOL = 1e-2
EPS = 1e-6
NAMES = ("dq", "dk", "dv", "di", "df", "dC0", "dn0", "dm0")


def oracle(q, k, v, i, f, scale, state):
  """Token-by-token float64 stabilised mLSTM; gates [B,T,Hg]. Returns (h, (C, n, m))."""
  q, k, v, i, f = (np.asarray(x, np.float64) for x in (q, k, v, i, f))
  c, n, m = (np.asarray(x, np.float64) for x in state)
  b, t, h, _ = q.shape
  k, v, i, f = (np.repeat(x, h // x.shape[2], axis=2) for x in (k, v, i, f))
  log_f = -np.logaddexp(0.0, -f)
  out = np.zeros((b, t, h, v.shape[-1]))
  for s in range(t):
    m_new = np.maximum(log_f[:, s] + m, i[:, s])
    decay, gain = np.exp(log_f[:, s] + m - m_new), np.exp(i[:, s] - m_new)
    c = decay[..., None, None] * c + gain[..., None, None] * k[:, s, :, :, None] * v[:, s, :, None]
    n = decay[..., None] * n + gain[..., None] * k[:, s]
    m = m_new
    qs = scale * q[:, s]
    den = np.maximum(np.abs(np.einsum("bhk,bhk->bh", qs, n)), np.exp(-m)) + EPS
    out[:, s] = np.einsum("bhk,bhkv->bhv", qs, c) / den[..., None]
  return out, (c, n, m)


def make_inputs(rng, *, b=1, t=80, h=2, hk=2, gate_heads=2, d=64):
  """q, k, v, gate pre-activations (log f in about [-1.3, -0.02]) and an initial (C, n, m)."""
  q, k, v = randn(rng, b, t, h, d), randn(rng, b, t, hk, d), randn(rng, b, t, hk, d)
  i = randn(rng, b, t, gate_heads)
  f = rng.uniform(-1.0, 4.0, (b, t, gate_heads)).astype(np.float32)
  state = (randn(rng, b, h, d, d), randn(rng, b, h, d), randn(rng, b, h, scale=0.5))
  return q, k, v, i, f, state


def _grads(impl, inputs, ct, proj, scale=0.2):
  """Gradients of sum(h * ct) + <final state, proj> w.r.t. q, k, v, i, f, C0, n0, m0."""
  def loss(q, k, v, i, f, c0, n0, m0):
    h, state = mlstm(q, k, v, i, f, scale=scale, initial_state=(c0, n0, m0),
                     output_final_state=True, impl=impl)
    return jnp.sum(h.astype(jnp.float32) * ct) + sum(jnp.sum(s * p) for s, p in zip(state, proj))

  q, k, v, i, f, state = inputs
  return jax.grad(loss, argnums=range(8))(q, k, v, i, f, *state)


@pytest.mark.parametrize("t,h,hk,gate_heads,with_state", [
    (80, 2, 2, 2, True),     # T not a multiple of the chunk (64), initial state
    (64, 2, 1, 1, False),    # GQA with gates on kv heads, zero state
])
def test_forward_matches_oracle_and_xla(rng, t, h, hk, gate_heads, with_state):
  q, k, v, i, f, s0 = make_inputs(rng, t=t, h=h, hk=hk, gate_heads=gate_heads)
  s0 = s0 if with_state else None
  o, s = mlstm(q, k, v, i, f, scale=0.2, initial_state=s0, output_final_state=True,
               impl="pallas")
  o_ref, s_ref = oracle(q, k, v, i, f, 0.2,
                        s0 or (np.zeros((1, h, 64, 64)), np.zeros((1, h, 64)), np.zeros((1, h))))
  assert o.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in s)
  assert_rel_close(o, o_ref, F32_TOL, "h vs oracle")
  o_xla, s_xla = mlstm(q, k, v, i, f, scale=0.2, initial_state=s0, output_final_state=True,
                       impl="xla")
  assert_rel_close(o, o_xla, F32_TOL, "h vs xla")
  for what, x, x_ref, x_xla in zip("Cnm", s, s_ref, s_xla):
    assert_rel_close(x, x_ref, F32_TOL, f"final {what} vs oracle")
    assert_rel_close(x, x_xla, F32_TOL, f"final {what} vs xla")


def test_bf16_matches_oracle(rng):
  q, k, v, i, f, s0 = make_inputs(rng, t=72)
  q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  o, s = mlstm(q16, k16, v16, i, f, initial_state=s0, output_final_state=True, impl="pallas")
  assert o.dtype == jnp.bfloat16 and all(x.dtype == jnp.float32 for x in s)
  o_ref, s_ref = oracle(*(np.asarray(x, np.float32) for x in (q16, k16, v16)), i, f, 64 ** -0.5,
                        s0)
  assert_rel_close(o, o_ref, BF16_TOL, "h")
  for what, x, x_ref in zip("Cnm", s, s_ref):
    assert_rel_close(x, x_ref, BF16_TOL, f"final {what}")


def test_gradients_match_xla(rng):
  """Every input, incl. both gates and the whole initial state (C, n, m); GQA with gates on kv
  heads, ragged T."""
  inputs = make_inputs(rng, t=70, h=2, hk=1, gate_heads=1)
  ct = randn(rng, *inputs[0].shape)
  proj = tuple(randn(rng, *x.shape) for x in inputs[-1])
  grads = _grads("pallas", inputs, ct, proj)
  grads_xla = _grads("xla", inputs, ct, proj)
  for what, g, g_xla in zip(NAMES, grads, grads_xla):
    assert_rel_close(g, g_xla, F32_TOL, what)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)])
def test_gradients_match_float64(rng, dtype, tol):
  """Against the float64 reference path (jax.enable_x64), on the inputs rounded to `dtype`; two
  kernel chunks (with q * scale rounded to bf16 as the score's operand, bf16 dq was 1.8e-2 off)."""
  q, k, v, i, f, s0 = make_inputs(rng, t=128)
  q, k, v = (np.asarray(jnp.asarray(x, dtype), np.float32) for x in (q, k, v))
  ct = randn(rng, *q.shape)
  proj = tuple(randn(rng, *x.shape) for x in s0)
  grads = _grads("pallas", (*(jnp.asarray(x, dtype) for x in (q, k, v)), i, f, s0), ct, proj)
  with jax.enable_x64(True):
    to64 = lambda xs: tuple(np.asarray(x, np.float64) for x in xs)  # noqa: E731
    grads_ref = [np.asarray(g) for g in _grads("reference", (*to64((q, k, v, i, f)), to64(s0)),
                                               ct, proj)]
  for what, g, g_ref in zip(NAMES, grads, grads_ref):
    assert_rel_close(np.asarray(g, np.float32), g_ref, tol, what)


def test_chunked_prefill_continues_state(rng):
  """Two prefills (initial_state = the first's final state) equal one."""
  q, k, v, i, f, s0 = make_inputs(rng, t=64)
  o, s = mlstm(q, k, v, i, f, initial_state=s0, output_final_state=True, impl="pallas")
  o1, s1 = mlstm(q[:, :24], k[:, :24], v[:, :24], i[:, :24], f[:, :24], initial_state=s0,
                 output_final_state=True, impl="pallas")
  o2, s2 = mlstm(q[:, 24:], k[:, 24:], v[:, 24:], i[:, 24:], f[:, 24:], initial_state=s1,
                 output_final_state=True, impl="pallas")
  assert_rel_close(jnp.concatenate([o1, o2], axis=1), o, F32_TOL, "h")
  for what, x, x_ref in zip("Cnm", s2, s):
    assert_rel_close(x, x_ref, F32_TOL, f"final {what}")


@pytest.mark.slow  # the xla path's jit / vmap test runs in the default run
def test_jit_and_vmap(rng):
  """jit of the forward; vmap of the gradient (the kernels' per-Dv-block terms under batching)."""
  q, k, v, i, f, _ = make_inputs(rng, b=2, t=64, h=1, hk=1, gate_heads=1)
  ct = randn(rng, *q.shape)

  def loss(impl):
    return lambda q, k, v, i, f, ct: jnp.sum(mlstm(q, k, v, i, f, impl=impl)[0] * ct)

  expected = mlstm(q, k, v, i, f, impl="xla")[0]
  assert_rel_close(jax.jit(lambda *xs: mlstm(*xs, impl="pallas")[0])(q, k, v, i, f), expected,
                   F32_TOL, "jit")
  grads = jax.vmap(jax.grad(loss("pallas"), argnums=range(5)))(
      *(x[:, None] for x in (q, k, v, i, f, ct)))
  grads_xla = jax.grad(loss("xla"), argnums=range(5))(q, k, v, i, f, ct)
  for what, g, g_xla in zip(NAMES, grads, grads_xla):
    assert_rel_close(g[:, 0], g_xla, F32_TOL, f"vmap {what}")


def test_unsupported_calls_explain_and_auto_falls_back(rng):
  q, k, v, i, f, _ = make_inputs(rng, t=16, d=16)
  with pytest.raises(NotImplementedError, match="head dims"):
    mlstm(q, k, v, i, f, impl="pallas")
  with pytest.raises(NotImplementedError, match="one dtype"):
    mlstm(q, jnp.asarray(k, jnp.bfloat16), v, i, f, impl="pallas")
  auto = mlstm(q, k, v, i, f, impl="auto")[0]
  assert_rel_close(auto, mlstm(q, k, v, i, f, impl="xla")[0], F32_TOL, "auto")


def test_bad_arguments_raise_before_the_kernel(rng):
  q, k, v, i, f, s0 = make_inputs(rng, t=32)
  with pytest.raises(ValueError, match="initial_state must be"):
    mlstm(q, k, v, i, f, initial_state=(s0[0][:, :, :32], *s0[1:]), impl="pallas")
  with pytest.raises(ValueError, match="f must have shape"):
    mlstm(q, k, v, i, f[:, :16], impl="pallas")
  with pytest.raises(ValueError, match="v must have shape"):
    mlstm(q, k, v[:, :, :1], i, f, impl="pallas")


@pytest.mark.slow
def test_head_dim_128_and_batch(rng):
  q, k, v, i, f, s0 = make_inputs(rng, b=2, t=200, h=2, hk=1, gate_heads=1, d=128)
  o, s = mlstm(q, k, v, i, f, initial_state=s0, output_final_state=True, impl="pallas")
  o_ref, s_ref = oracle(q, k, v, i, f, 128 ** -0.5, s0)
  assert_rel_close(o, o_ref, F32_TOL, "h")
  for what, x, x_ref in zip("Cnm", s, s_ref):
    assert_rel_close(x, x_ref, F32_TOL, f"final {what}")
  inputs = (q, k, v, i, f, s0)
  ct = randn(rng, *q.shape)
  proj = tuple(randn(rng, *x.shape) for x in s0)
  grads = _grads("pallas", inputs, ct, proj, scale=None)
  grads_xla = _grads("xla", inputs, ct, proj, scale=None)
  for what, g, g_xla in zip(NAMES, grads, grads_xla):
    assert_rel_close(g, g_xla, F32_TOL, what)


def test_packed_documents_match_xla(rng):
  """segment_ids over T = 150 (three kernel chunks of 64): documents starting mid-chunk, at a
  chunk's first token (64), spanning chunk boundaries and a 1-token one (100); values, final state
  and every gradient (incl. the whole initial state) against the xla path, values against the
  float64 oracle run per document. GQA with gates on the query heads, ragged T. Weak forgetting
  (log f in about [-0.13, -0.0025]), so that anything leaking across a document start shows."""
  q, k, v, i, f, s0 = make_inputs(rng, t=150, h=2, hk=1, gate_heads=2)
  f = rng.uniform(2.0, 6.0, f.shape).astype(np.float32)
  starts = (0, 30, 64, 100, 101)
  ids = np.cumsum(np.isin(np.arange(150), starts[1:]))[None].astype(np.int32)
  ct = randn(rng, *q.shape)
  proj = tuple(randn(rng, *x.shape) for x in s0)

  def loss(impl):
    def fn(q, k, v, i, f, c0, n0, m0):
      h, s = mlstm(q, k, v, i, f, scale=0.2, initial_state=(c0, n0, m0), output_final_state=True,
                   segment_ids=ids, impl=impl)
      return jnp.sum(h * ct) + sum(jnp.sum(x * p) for x, p in zip(s, proj)), (h, s)
    return fn

  (_, (o, s)), grads = jax.value_and_grad(loss("pallas"), range(8), has_aux=True)(
      q, k, v, i, f, *s0)
  (_, (o_xla, s_xla)), grads_xla = jax.value_and_grad(loss("xla"), range(8), has_aux=True)(
      q, k, v, i, f, *s0)
  assert_rel_close(o, o_xla, F32_TOL, "packed h vs xla")
  for what, x, x_xla in zip("Cnm", s, s_xla):
    assert_rel_close(x, x_xla, F32_TOL, f"packed final {what} vs xla")
  for what, g, g_xla in zip(NAMES, grads, grads_xla):
    assert_rel_close(g, g_xla, F32_TOL, f"packed {what}")
  bounds = (*starts, 150)
  for first, end in zip(bounds[:-1], bounds[1:]):
    piece = lambda x: np.asarray(x)[:, first:end]  # noqa: E731
    state = s0 if first == 0 else tuple(np.zeros_like(x) for x in s0)
    o_ref, s_ref = oracle(*map(piece, (q, k, v, i, f)), 0.2, state)
    assert_rel_close(o[:, first:end], o_ref, F32_TOL, f"document [{first}, {end}) vs oracle")
  for what, x, x_ref in zip("Cnm", s, s_ref):
    assert_rel_close(x, x_ref, F32_TOL, f"final {what} vs the last document's oracle")


@pytest.mark.parametrize("segmented", [False, True])
def test_kernels_lower_for_cuda(segmented, monkeypatch):
  """The five kernels (state pass and output; reverse state pass and the two gradient kernels)
  lower to Triton IR for an H100 (on CPU), with and without segment_ids (the document mask is a
  static flag: two kernel variants)."""
  from pallas_kernels.gpu.h100_lowering import lower_for_h100
  b, t, h, d = 1, 128, 2, 64
  qkv = tuple(jnp.zeros((b, t, h, d), jnp.bfloat16) for _ in range(3))
  gates = (jnp.zeros((b, t, h), jnp.float32), jnp.full((b, t, h), 2.0, jnp.float32))
  ids = (jnp.arange(t, dtype=jnp.int32)[None] >= 40).astype(jnp.int32) if segmented else None

  def loss(*args):
    return jnp.sum(mlstm(*args, segment_ids=ids, impl="pallas")[0].astype(jnp.float32))

  text = lower_for_h100(lambda *args: (loss(*args), jax.grad(loss, argnums=range(5))(*args)),
                        *qkv, *gates).as_text()
  assert text.count("__gpu$xla.gpu.triton") >= 5, "expected 2 forward and 3 backward kernels"
