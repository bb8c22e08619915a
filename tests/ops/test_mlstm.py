"""Tests for jaxchunk.ops.mlstm against a float64 NumPy oracle of the stabilised recurrence."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.mlstm import mlstm, mlstm_step
from tests.utils import assert_rel_close, randn

EPS = 1e-6


def oracle(q, k, v, i, f, *, scale=None, state=None, eps=EPS):
  """Token-by-token float64 mLSTM. Returns (h [B,T,H,Dv], (C, n, m))."""
  q, k, v, i, f = (np.asarray(x, np.float64) for x in (q, k, v, i, f))
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  scale = dk ** -0.5 if scale is None else scale
  k, v = (np.repeat(x, h // x.shape[2], axis=2) for x in (k, v))
  i, f = (np.repeat(x, h // x.shape[2], axis=2) for x in (i, f))
  log_f = -np.logaddexp(0.0, -f)
  if state is None:
    c, n, m = np.zeros((b, h, dk, dv)), np.zeros((b, h, dk)), np.zeros((b, h))
  else:
    c, n, m = (np.asarray(x, np.float64) for x in state)
  out = np.zeros((b, t, h, dv))
  for s in range(t):
    m_new = np.maximum(log_f[:, s] + m, i[:, s])
    decay = np.exp(log_f[:, s] + m - m_new)
    gain = np.exp(i[:, s] - m_new)
    kv = k[:, s, :, :, None] * v[:, s, :, None, :]
    c = decay[..., None, None] * c + gain[..., None, None] * kv
    n = decay[..., None] * n + gain[..., None] * k[:, s]
    m = m_new
    qs = scale * q[:, s]
    num = np.einsum("bhk,bhkv->bhv", qs, c)
    den = np.maximum(np.abs(np.einsum("bhk,bhk->bh", qs, n)), np.exp(-m)) + eps
    out[:, s] = num / den[..., None]
  return out, (c, n, m)


def make_inputs(rng, b=2, t=37, h=2, hk=None, dk=8, dv=8, gate_heads=None):
  """Random q, k, v and gate pre-activations (log f in about [-1.3, -0.02])."""
  hk = h if hk is None else hk
  gate_heads = h if gate_heads is None else gate_heads
  q, k = randn(rng, b, t, h, dk), randn(rng, b, t, hk, dk)
  v = randn(rng, b, t, hk, dv)
  i = randn(rng, b, t, gate_heads)
  f = rng.uniform(-1.0, 4.0, (b, t, gate_heads)).astype(np.float32)
  return q, k, v, i, f


def make_state(rng, b, h, dk, dv):
  return (randn(rng, b, h, dk, dv), randn(rng, b, h, dk), randn(rng, b, h, scale=0.5))


CASES = {
    # name: (make_inputs kwargs, chunk_size, with initial state)
    "chunk_multiple": (dict(t=64), 16, False),
    "ragged": (dict(t=37), 16, False),
    "shorter_than_chunk": (dict(t=20), 64, False),
    "gqa_kv_gates": (dict(t=45, h=4, hk=2, gate_heads=2), 16, False),
    "gqa_q_gates": (dict(t=30, h=4, hk=1, dv=12), 8, False),
    "initial_state": (dict(t=50, dk=16, dv=8), 16, True),
}


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_oracle(rng, impl, case):
  kwargs, chunk_size, with_state = CASES[case]
  q, k, v, i, f = make_inputs(rng, **kwargs)
  b, _, h, dk = q.shape
  state = make_state(rng, b, h, dk, v.shape[-1]) if with_state else None
  out, final = mlstm(q, k, v, i, f, initial_state=state, output_final_state=True,
                     chunk_size=chunk_size, impl=impl)
  ref, ref_final = oracle(q, k, v, i, f, state=state)
  assert out.dtype == jnp.float32
  assert_rel_close(out, ref, 1e-5, f"{impl} output")
  for x, r, name in zip(final, ref_final, "Cnm"):
    assert x.dtype == jnp.float32
    assert_rel_close(x, r, 1e-5, f"{impl} final {name}")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_explicit_scale_and_eps(rng, impl):
  q, k, v, i, f = make_inputs(rng, t=24)
  out = mlstm(q, k, v, i, f, scale=0.7, eps=1e-2, chunk_size=8, impl=impl)[0]
  assert_rel_close(out, oracle(q, k, v, i, f, scale=0.7, eps=1e-2)[0], 1e-5, f"{impl} output")


def test_auto_is_xla_and_no_final_state(rng):
  q, k, v, i, f = make_inputs(rng, t=20)
  out, final = mlstm(q, k, v, i, f)
  assert final is None
  np.testing.assert_array_equal(out, mlstm(q, k, v, i, f, impl="xla")[0])


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_bf16_inputs(rng, impl):
  q, k, v, i, f = (jnp.asarray(x, jnp.bfloat16) for x in make_inputs(rng, t=40, h=4, hk=2))
  state = make_state(rng, 2, 4, 8, 8)
  out, final = mlstm(q, k, v, i, f, initial_state=state, output_final_state=True, chunk_size=16,
                     impl=impl)
  ref, ref_final = oracle(*(np.asarray(x.astype(jnp.float32)) for x in (q, k, v, i, f)),
                          state=state)
  assert out.dtype == jnp.bfloat16
  assert all(x.dtype == jnp.float32 for x in final)
  assert_rel_close(out.astype(jnp.float32), ref, 1e-2, f"{impl} bf16 output")
  for x, r, name in zip(final, ref_final, "Cnm"):
    assert_rel_close(x, r, 1e-2, f"{impl} bf16 final {name}")


def _loss_grads(inputs, cotangents, impl, chunk_size=16):
  """Gradients of sum(h * ct) + <final state, random projection> w.r.t. all inputs and the state."""
  ct_out, ct_state = cotangents

  def loss(q, k, v, i, f, state):
    out, final = mlstm(q, k, v, i, f, initial_state=state, output_final_state=True,
                       chunk_size=chunk_size, impl=impl)
    return jnp.sum(out * ct_out) + sum(jnp.sum(x * c) for x, c in zip(final, ct_state))

  return jax.grad(loss, argnums=tuple(range(6)))(*inputs)


GRAD_NAMES = ("q", "k", "v", "i", "f", "C0", "n0", "m0")


def _flatten(grads):
  return (*grads[:5], *grads[5])


def test_gradients(rng):
  q, k, v, i, f = make_inputs(rng, t=37, h=4, hk=2, gate_heads=2)
  state = make_state(rng, 2, 4, 8, 8)
  ct_state = tuple(randn(rng, *x.shape) for x in state)
  cotangents = (randn(rng, *q.shape[:3], v.shape[-1]), ct_state)
  inputs = (q, k, v, i, f, state)
  grads_ref = _flatten(_loss_grads(inputs, cotangents, "reference"))
  grads_xla = _flatten(_loss_grads(inputs, cotangents, "xla"))
  with jax.enable_x64(True):
    to64 = lambda x: jnp.asarray(x, jnp.float64)
    grads_64 = _flatten(_loss_grads(jax.tree.map(to64, inputs), jax.tree.map(to64, cotangents),
                                    "reference"))
    grads_64 = [np.asarray(g) for g in grads_64]
  assert grads_64[0].dtype == np.float64
  for name, g_ref, g_xla, g_64 in zip(GRAD_NAMES, grads_ref, grads_xla, grads_64):
    assert g_xla.dtype == jnp.float32
    assert_rel_close(g_xla, g_ref, 1e-5, f"d{name} xla vs reference")
    assert_rel_close(g_ref, g_64, 1e-5, f"d{name} reference vs float64")
    assert_rel_close(g_xla, g_64, 1e-5, f"d{name} xla vs float64")


def test_float64_reference_matches_oracle(rng):
  q, k, v, i, f = make_inputs(rng, t=30)
  with jax.enable_x64(True):
    out = mlstm(*(jnp.asarray(x, jnp.float64) for x in (q, k, v, i, f)), impl="reference")[0]
    assert out.dtype == jnp.float64
    out = np.asarray(out)
  assert_rel_close(out, oracle(q, k, v, i, f)[0], 1e-12, "float64 reference")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_prefill_then_decode(rng, impl):
  q, k, v, i, f = make_inputs(rng, t=29, h=4, hk=2, gate_heads=2)
  full = mlstm(q, k, v, i, f, chunk_size=8, impl=impl)[0]
  prefill = 21
  out, state = mlstm(q[:, :prefill], k[:, :prefill], v[:, :prefill], i[:, :prefill],
                     f[:, :prefill], output_final_state=True, chunk_size=8, impl=impl)
  steps = [out]
  for s in range(prefill, q.shape[1]):
    h_s, state = mlstm_step(q[:, s], k[:, s], v[:, s], i[:, s], f[:, s], state)
    steps.append(h_s[:, None])
  assert_rel_close(jnp.concatenate(steps, axis=1), full, 1e-5, "prefill + decode")


def test_step_from_none_state(rng):
  q, k, v, i, f = make_inputs(rng, t=1)
  h_s, state = mlstm_step(q[:, 0], k[:, 0], v[:, 0], i[:, 0], f[:, 0], None)
  ref, ref_state = oracle(q, k, v, i, f)
  assert_rel_close(h_s, ref[:, 0], 1e-5, "step output")
  for x, r, name in zip(state, ref_state, "Cnm"):
    assert_rel_close(x, r, 1e-5, f"step state {name}")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_two_piece_prefill(rng, impl):
  q, k, v, i, f = make_inputs(rng, t=45)
  state0 = make_state(rng, 2, 2, 8, 8)
  full, full_final = mlstm(q, k, v, i, f, initial_state=state0, output_final_state=True,
                           chunk_size=16, impl=impl)
  cut = 19
  first, mid = mlstm(*(x[:, :cut] for x in (q, k, v, i, f)), initial_state=state0,
                     output_final_state=True, chunk_size=16, impl=impl)
  second, final = mlstm(*(x[:, cut:] for x in (q, k, v, i, f)), initial_state=mid,
                        output_final_state=True, chunk_size=16, impl=impl)
  assert_rel_close(jnp.concatenate([first, second], axis=1), full, 1e-5, "two-piece output")
  for x, r, name in zip(final, full_final, "Cnm"):
    assert_rel_close(x, r, 1e-5, f"two-piece final {name}")


def test_jit_and_vmap(rng):
  q, k, v, i, f = make_inputs(rng, t=24)
  fn = jax.jit(lambda *xs: mlstm(*xs, chunk_size=8, output_final_state=True))
  out, final = fn(q, k, v, i, f)
  ref, ref_final = oracle(q, k, v, i, f)
  assert_rel_close(out, ref, 1e-5, "jit output")
  assert_rel_close(final[0], ref_final[0], 1e-5, "jit final C")

  stacked = [np.stack([x, x[::-1]]) for x in (q, k, v, i, f)]  # a leading vmapped axis of 2
  out_v = jax.vmap(lambda *xs: mlstm(*xs, chunk_size=8)[0])(*stacked)
  for j in range(2):
    assert_rel_close(out_v[j], oracle(*(x[j] for x in stacked))[0], 1e-5, f"vmap member {j}")

  step = jax.jit(mlstm_step)
  h_s, _ = step(q[:, 0], k[:, 0], v[:, 0], i[:, 0], f[:, 0], None)
  assert_rel_close(h_s, ref[:, 0], 1e-5, "jit step")


def test_bad_arguments(rng):
  q, k, v, i, f = make_inputs(rng, t=12, h=4, hk=2)
  with pytest.raises(ValueError, match=r"q must have shape"):
    mlstm(q[0], k, v, i, f)
  with pytest.raises(ValueError, match=r"heads of k/v \(3\) must divide"):
    mlstm(q, *(np.concatenate([x, x[:, :, :1]], axis=2) for x in (k, v)), i, f)
  with pytest.raises(ValueError, match=r"v must have shape"):
    mlstm(q, k, v[:, :, :1], i, f)
  with pytest.raises(ValueError, match=r"i must have shape \[2, 12, 2 or 4\]"):
    mlstm(q, k, v, i[:, :, :3], f)
  with pytest.raises(ValueError, match=r"f must have shape"):
    mlstm(q, k, v, i, f[:, :5])
  good_state = make_state(rng, 2, 4, 8, 8)
  with pytest.raises(ValueError, match=r"initial_state must be a tuple \(C \[B,H,Dk,Dv\]"):
    mlstm(q, k, v, i, f, initial_state=good_state[0])
  with pytest.raises(ValueError, match=r"initial_state must be .*\[2, 4, 8, 8\]"):
    mlstm(q, k, v, i, f, initial_state=(good_state[0][:, :2], *good_state[1:]))
  with pytest.raises(ValueError, match=r"initial_state must be"):
    mlstm(q, k, v, i, f, initial_state=(*good_state[:2], good_state[2][..., None]))
  with pytest.raises(ValueError, match=r"chunk_size must be a positive int"):
    mlstm(q, k, v, i, f, chunk_size=0)
  with pytest.raises(ValueError, match=r"impl must be one of"):
    mlstm(q, k, v, i, f, impl="cuda")
  with pytest.raises(NotImplementedError):
    mlstm(q, k, v, i, f, impl="pallas")

  q1, k1, v1, i1, f1 = (x[:, 0] for x in (q, k, v, i, f))
  with pytest.raises(ValueError, match=r"q must have shape \[batch, heads, head_dim\]"):
    mlstm_step(q, k1, v1, i1, f1, None)
  with pytest.raises(ValueError, match=r"k must have shape \[2, kv_heads, 8\]"):
    mlstm_step(q1, k1[..., :4], v1, i1, f1, None)
  with pytest.raises(ValueError, match=r"v must have shape \[2, 2, head_dim_v\]"):
    mlstm_step(q1, k1, v1[:, :1], i1, f1, None)
  with pytest.raises(ValueError, match=r"f must have shape \[2, 2 or 4\]"):
    mlstm_step(q1, k1, v1, i1, f1[:, :3], None)
  with pytest.raises(ValueError, match=r"state must be .*\[2, 4\]\)"):
    mlstm_step(q1, k1, v1, i1, f1, (*good_state[:2], good_state[2][:1]))
