"""Tests of `kda` / `kda_step` (per-channel-decay delta rule) against a float64 NumPy oracle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.kda import kda, kda_step
from tests.utils import assert_rel_close, randn


def oracle(q, k, v, gk, beta, scale, initial_state=None):
  """Token-by-token float64 recurrence S_t = (I - b k^T k) diag(exp(gk)) S_{t-1} + b k^T v.

  Returns (o [B,T,H,Dv], final state [B,H,Dk,Dv]).
  """
  q, k, v, gk, beta = (np.asarray(x, np.float64) for x in (q, k, v, gk, beta))
  b, t, h, dk = q.shape
  k, v, gk, beta = (np.repeat(x, h // x.shape[2], axis=2) for x in (k, v, gk, beta))
  state = np.zeros((b, h, dk, v.shape[-1])) if initial_state is None \
      else np.asarray(initial_state, np.float64).copy()
  eye = np.eye(dk)
  o = np.zeros((b, t, h, v.shape[-1]))
  for i in range(t):
    kk = k[:, i, :, :, None] * k[:, i, :, None, :]                          # [B,H,Dk,Dk]
    householder = eye - beta[:, i, :, None, None] * kk
    decayed = np.exp(gk[:, i])[..., None] * state
    write = beta[:, i, :, None, None] * k[:, i, :, :, None] * v[:, i, :, None]
    state = householder @ decayed + write
    o[:, i] = scale * np.einsum("bhd,bhde->bhe", q[:, i], state)
  return o, state


def make_inputs(rng, b=2, t=37, h=4, hk=2, dk=8, dv=6, gate_heads=None, decay=(-1.0, -0.01)):
  """q, k (L2-normalised), v, gk uniform in `decay`, beta = sigmoid(normal), initial_state.

  gk and beta have `gate_heads` heads (default hk).
  """
  q = randn(rng, b, t, h, dk)
  k = randn(rng, b, t, hk, dk)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  v = randn(rng, b, t, hk, dv)
  gk = rng.uniform(*decay, size=(b, t, gate_heads or hk, dk)).astype(np.float32)
  beta = (1 / (1 + np.exp(-rng.standard_normal((b, t, gate_heads or hk))))).astype(np.float32)
  s0 = randn(rng, b, h, dk, dv)
  return q, k, v, gk, beta, s0


def loss_fn(impl, ct, proj, chunk_size=16):
  """sum(o * ct) + sum(final_state * proj) as a function of every input."""
  def loss(q, k, v, gk, beta, s0):
    o, s = kda(q, k, v, gk, beta, initial_state=s0, output_final_state=True,
               chunk_size=chunk_size, impl=impl)
    return jnp.sum(o * ct) + jnp.sum(s * proj)
  return loss


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("t,chunk_size,h,hk,gate_heads,with_state", [
    (64, 16, 2, 2, 2, False),   # T a multiple of the chunk, no GQA
    (37, 16, 4, 2, 2, True),    # T not a multiple, GQA, gates on kv heads, initial state
    (37, 64, 4, 1, 4, True),    # a single padded chunk (default size), gates on q heads
    (37, 24, 2, 1, 2, True),    # chunk not a multiple of the 16-token sub-chunk
])
def test_forward_matches_oracle(rng, impl, t, chunk_size, h, hk, gate_heads, with_state):
  q, k, v, gk, beta, s0 = make_inputs(rng, t=t, h=h, hk=hk, gate_heads=gate_heads)
  s0 = s0[:, :h] if with_state else None
  o, s = kda(q, k, v, gk, beta, scale=0.3, initial_state=s0, output_final_state=True,
             chunk_size=chunk_size, impl=impl)
  o_ref, s_ref = oracle(q, k, v, gk, beta, 0.3, s0)
  assert o.dtype == jnp.float32 and s.dtype == jnp.float32
  assert_rel_close(o, o_ref, 1e-5, "o")
  assert_rel_close(s, s_ref, 1e-5, "final state")


def test_default_scale_and_no_final_state(rng):
  q, k, v, gk, beta, _ = make_inputs(rng)
  o, s = kda(q, k, v, gk, beta)
  assert s is None
  assert_rel_close(o, oracle(q, k, v, gk, beta, q.shape[-1] ** -0.5)[0], 1e-5, "o")


def test_strong_decay_is_stable(rng):
  """Per-channel decays down to exp(-40) per token: exact outputs and finite gradients."""
  q, k, v, gk, beta, s0 = make_inputs(rng, decay=(-40.0, -0.5))
  o, s = kda(q, k, v, gk, beta, initial_state=s0, output_final_state=True, chunk_size=16,
             impl="xla")
  o_ref, s_ref = oracle(q, k, v, gk, beta, q.shape[-1] ** -0.5, s0)
  assert_rel_close(o, o_ref, 1e-5, "o")
  assert_rel_close(s, s_ref, 1e-5, "final state")
  grads = jax.grad(loss_fn("xla", randn(rng, *o.shape), randn(rng, *s.shape)),
                   argnums=tuple(range(6)))(q, k, v, gk, beta, s0)
  assert all(bool(jnp.all(jnp.isfinite(grad))) for grad in grads)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_bf16_inputs(rng, impl):
  q, k, v, gk, beta, s0 = (jnp.asarray(x, jnp.bfloat16) for x in make_inputs(rng))
  o, s = kda(q, k, v, gk, beta, initial_state=s0, output_final_state=True, chunk_size=16,
             impl=impl)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  o_ref, s_ref = oracle(*(np.asarray(x, np.float32) for x in (q, k, v, gk, beta)),
                        q.shape[-1] ** -0.5, np.asarray(s0, np.float32))
  assert_rel_close(o, o_ref, 1e-2, "o")
  assert_rel_close(s, s_ref, 1e-2, "final state")


def test_gradients_xla_match_reference_and_float64(rng):
  q, k, v, gk, beta, s0 = make_inputs(rng, gate_heads=4)
  ct = randn(rng, *q.shape[:3], v.shape[-1])
  proj = randn(rng, *s0.shape)
  inputs = (q, k, v, gk, beta, s0)
  argnums = tuple(range(len(inputs)))
  grads_xla = jax.grad(loss_fn("xla", ct, proj), argnums)(*inputs)
  grads_ref = jax.grad(loss_fn("reference", ct, proj), argnums)(*inputs)
  with jax.enable_x64(True):
    grads_64 = jax.grad(loss_fn("reference", ct.astype(np.float64), proj.astype(np.float64)),
                        argnums)(*(x.astype(np.float64) for x in inputs))
    grads_64 = [np.asarray(grad) for grad in grads_64]
  assert grads_64[0].dtype == np.float64
  for name, x, g_xla, g_ref, g_64 in zip(("q", "k", "v", "gk", "beta", "initial_state"), inputs,
                                         grads_xla, grads_ref, grads_64):
    assert g_xla.shape == g_64.shape == x.shape
    assert_rel_close(g_xla, g_ref, 1e-5, f"d{name} xla vs reference")
    assert_rel_close(g_xla, g_64, 1e-5, f"d{name} xla vs float64")
    assert_rel_close(g_ref, g_64, 1e-5, f"d{name} reference vs float64")


def test_decode_continues_prefill(rng):
  t1, n = 21, 16
  q, k, v, gk, beta, s0 = make_inputs(rng, t=t1 + n)
  o_full, s_full = kda(q, k, v, gk, beta, initial_state=s0, output_final_state=True, chunk_size=16)
  o_pre, state = kda(*(x[:, :t1] for x in (q, k, v, gk, beta)), initial_state=s0,
                     output_final_state=True, chunk_size=16)
  outs = [o_pre]
  for i in range(t1, t1 + n):
    o_i, state = kda_step(q[:, i], k[:, i], v[:, i], gk[:, i], beta[:, i], state)
    outs.append(o_i[:, None])
  assert_rel_close(jnp.concatenate(outs, axis=1), o_full, 1e-5, "prefill + decode o")
  assert_rel_close(state, s_full, 1e-5, "prefill + decode state")


def test_step_from_empty_state(rng):
  q, k, v, gk, beta, _ = make_inputs(rng, t=1)
  o, s = kda_step(q[:, 0], k[:, 0], v[:, 0], gk[:, 0], beta[:, 0], None, scale=0.5)
  o_ref, s_ref = oracle(q, k, v, gk, beta, 0.5)
  assert_rel_close(o, o_ref[:, 0], 1e-5, "o")
  assert_rel_close(s, s_ref, 1e-5, "state")


def test_chunked_prefill_in_two_pieces(rng):
  q, k, v, gk, beta, s0 = make_inputs(rng)
  o_full, s_full = kda(q, k, v, gk, beta, initial_state=s0, output_final_state=True, chunk_size=16)
  split = 21
  o1, s1 = kda(*(x[:, :split] for x in (q, k, v, gk, beta)), initial_state=s0,
               output_final_state=True, chunk_size=16)
  o2, s2 = kda(*(x[:, split:] for x in (q, k, v, gk, beta)), initial_state=s1,
               output_final_state=True, chunk_size=16)
  assert_rel_close(jnp.concatenate([o1, o2], axis=1), o_full, 1e-5, "two-piece o")
  assert_rel_close(s2, s_full, 1e-5, "two-piece state")


def test_jit_and_vmap(rng):
  inputs = make_inputs(rng)
  s0 = inputs[5]
  full = jax.jit(lambda *xs: kda(*xs[:5], initial_state=xs[5], output_final_state=True,
                                 chunk_size=16))
  o_eager, s_eager = kda(*inputs[:5], initial_state=s0, output_final_state=True, chunk_size=16)
  o_jit, s_jit = full(*inputs)
  assert_rel_close(o_jit, o_eager, 1e-6, "jit o")
  assert_rel_close(s_jit, s_eager, 1e-6, "jit state")
  # vmap over an extra leading axis: two independent problems at once.
  stacked = [np.stack([x, x[::-1]]) for x in inputs]
  o_vmap, s_vmap = jax.vmap(full)(*stacked)
  o_rev, s_rev = kda(*(x[::-1] for x in inputs[:5]), initial_state=s0[::-1],
                     output_final_state=True, chunk_size=16)
  assert_rel_close(o_vmap[0], o_eager, 1e-6, "vmap o[0]")
  assert_rel_close(o_vmap[1], o_rev, 1e-6, "vmap o[1]")
  assert_rel_close(s_vmap[1], s_rev, 1e-6, "vmap state[1]")
  step = jax.jit(jax.vmap(kda_step))
  o_step, s_step = step(*(x[:, :, 0] for x in stacked[:5]), stacked[5])
  o_one, s_one = kda_step(*(x[:, 0] for x in inputs[:5]), s0)
  assert_rel_close(o_step[0], o_one, 1e-6, "vmap step o")
  assert_rel_close(s_step[0], s_one, 1e-6, "vmap step state")


def test_bad_arguments(rng):
  q, k, v, gk, beta, s0 = make_inputs(rng, t=8, h=4, hk=2, dk=8, dv=6)
  with pytest.raises(ValueError, match="q must have shape"):
    kda(q[0], k, v, gk, beta)
  with pytest.raises(ValueError, match="k must have shape"):
    kda(q, k[..., :4], v, gk, beta)
  with pytest.raises(ValueError, match="v must have shape"):
    kda(q, k, v[:, :4], gk, beta)
  with pytest.raises(ValueError, match="must divide"):
    kda(q[:, :, :3], k, v, gk, beta)
  with pytest.raises(ValueError, match=r"gk must have shape \[2, 8, 2 or 4, 8\]"):
    kda(q, k, v, gk[..., 0], beta)
  with pytest.raises(ValueError, match=r"gk must have shape \[2, 8, 2 or 4, 8\]"):
    kda(q, k, v, np.concatenate([gk] * 3, axis=2), beta)
  with pytest.raises(ValueError, match=r"beta must have shape \[2, 8, 2 or 4\]"):
    kda(q, k, v, gk, gk[..., 0, None])
  with pytest.raises(ValueError, match="initial_state must have shape"):
    kda(q, k, v, gk, beta, initial_state=s0[..., :3])
  with pytest.raises(ValueError, match="gk is a log-decay and must be <= 0"):
    kda(q, k, v, -gk, beta)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    kda(q, k, v, gk, beta, chunk_size=16.0)
  with pytest.raises(ValueError, match="impl must be one of"):
    kda(q, k, v, gk, beta, impl="cuda")
  with pytest.raises(NotImplementedError):
    kda(q, k, v, gk, beta, impl="pallas")
  with pytest.raises(ValueError, match="q must have shape"):
    kda_step(q, k[:, 0], v[:, 0], gk[:, 0], beta[:, 0], s0)
  with pytest.raises(ValueError, match="k must have shape"):
    kda_step(q[:, 0], k[:, 0, :, :4], v[:, 0], gk[:, 0], beta[:, 0], s0)
  with pytest.raises(ValueError, match="v must have shape"):
    kda_step(q[:, 0], k[:, 0], v[:, 0, :1], gk[:, 0], beta[:, 0], s0)
  with pytest.raises(ValueError, match=r"gk must have shape \[2, 2 or 4, 8\]"):
    kda_step(q[:, 0], k[:, 0], v[:, 0], gk[:, 0, :, :4], beta[:, 0], s0)
  with pytest.raises(ValueError, match=r"beta must have shape \[2, 2 or 4\]"):
    kda_step(q[:, 0], k[:, 0], v[:, 0], gk[:, 0], beta[:, 0, None], s0)
  with pytest.raises(ValueError, match="state must have shape"):
    kda_step(q[:, 0], k[:, 0], v[:, 0], gk[:, 0], beta[:, 0], s0[:, :2])
  with pytest.raises(ValueError, match="gk is a log-decay and must be <= 0"):
    kda_step(q[:, 0], k[:, 0], v[:, 0], -gk[:, 0], beta[:, 0], s0)
