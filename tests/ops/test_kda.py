"""Tests of `kda` / `kda_step` (per-channel-decay delta rule) against the float64 NumPy oracle of
linear_oracle.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.kda import kda, kda_step
from tests.ops import linear_oracle
from tests.ops.linear_oracle import assert_gradients_match, loss_fn, oracle
from tests.utils import assert_rel_close, randn


def make_inputs(rng, **kwargs):
  """q, k (L2-normalised), v, gk [B,T,G,Dk], beta [B,T,G], initial_state; see linear_oracle."""
  return linear_oracle.make_inputs(rng, per_channel=True, delta=True, **kwargs)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("t,chunk_size,h,hk,gate_heads,with_state", [
    (64, 16, 2, 2, 2, False),   # T a multiple of the chunk, no GQA
    (37, 16, 4, 2, 2, True),    # T not a multiple, GQA, gates on kv heads, initial state
    (37, 64, 4, 1, 4, True),    # a single padded chunk (default size), gates on q heads
    (37, 24, 2, 1, 2, True),    # chunk not a multiple of the 16-token sub-chunk
    (37, 20, 2, 1, 2, True),    # not a multiple of 8 rows: the exact secondary chunking
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
  grads = jax.grad(loss_fn(kda, "xla", randn(rng, *o.shape), randn(rng, *s.shape)),
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


@pytest.mark.parametrize("chunk_size", [16, 20])  # 20: the exact secondary chunking
def test_gradients_xla_match_reference_and_float64(rng, chunk_size):
  q, k, v, gk, beta, s0 = make_inputs(rng, gate_heads=4)
  ct = randn(rng, *q.shape[:3], v.shape[-1])
  proj = randn(rng, *s0.shape)
  assert_gradients_match(kda, (q, k, v, gk, beta, s0),
                         ("q", "k", "v", "gk", "beta", "initial_state"), ct, proj,
                         chunk_size=chunk_size)


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
