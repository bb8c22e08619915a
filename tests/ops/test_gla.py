"""Tests of `simple_gla` (a log-decay per head), `gla` (per key channel) and their decode steps
against the float64 NumPy oracle of linear_oracle.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.gla import gla, gla_step
from jaxchunk.ops.simple_gla import simple_gla, simple_gla_step
from tests.ops.linear_oracle import assert_gradients_match, loss_fn, make_inputs, oracle
from tests.utils import assert_rel_close, randn

OPS = {"simple_gla": (simple_gla, simple_gla_step), "gla": (gla, gla_step)}
GATE_NAMES = {"simple_gla": "g", "gla": "gk"}


def op_inputs(rng, op, **kwargs):
  """q, k, v, g, initial_state for `op`: g [B,T,G] for simple_gla, [B,T,G,Dk] for gla."""
  return make_inputs(rng, per_channel=op == "gla", **kwargs)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("t,chunk_size,h,hk,gate_heads,with_state", [
    (64, 16, 2, 2, 2, False),   # T a multiple of the chunk, no GQA
    (45, 16, 4, 2, 2, True),    # T not a multiple, GQA, gates on kv heads, initial state
    (37, 64, 4, 1, 4, True),    # a single padded chunk, gates on q heads
    (50, 24, 2, 1, 2, True),    # a chunk size that is not a power of two (nor a multiple of
                                # gla's sub-chunk)
    (50, 20, 2, 1, 2, True),    # not a multiple of 8 rows: gla's exact secondary chunking
])
def test_forward_matches_oracle(rng, op, impl, t, chunk_size, h, hk, gate_heads, with_state):
  fn, _ = OPS[op]
  q, k, v, g, s0 = op_inputs(rng, op, t=t, h=h, hk=hk, gate_heads=gate_heads)
  s0 = s0[:, :h] if with_state else None
  o, s = fn(q, k, v, g, scale=0.3, initial_state=s0, output_final_state=True,
            chunk_size=chunk_size, impl=impl)
  o_ref, s_ref = oracle(q, k, v, g, None, 0.3, s0)
  assert o.dtype == jnp.float32 and s.dtype == jnp.float32
  assert_rel_close(o, o_ref, 1e-5, "o")
  assert_rel_close(s, s_ref, 1e-5, "final state")


@pytest.mark.parametrize("op", OPS)
def test_default_scale_and_no_final_state(rng, op):
  fn, _ = OPS[op]
  q, k, v, g, _ = op_inputs(rng, op, t=20)
  o, s = fn(q, k, v, g)
  assert s is None
  assert_rel_close(o, oracle(q, k, v, g, None, q.shape[-1] ** -0.5)[0], 1e-5, "o")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_strong_decay_is_stable(rng, op, impl):
  """Decays down to exp(-40) per token: the chunked form must not overflow, nor its gradient."""
  fn, _ = OPS[op]
  q, k, v, g, s0 = op_inputs(rng, op, t=37, decay=(-40.0, -0.5))
  o, s = fn(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=16, impl=impl)
  o_ref, s_ref = oracle(q, k, v, g, None, q.shape[-1] ** -0.5, s0)
  assert_rel_close(o, o_ref, 1e-5, "o")
  assert_rel_close(s, s_ref, 1e-5, "final state")
  grads = jax.grad(loss_fn(fn, impl, randn(rng, *o.shape), randn(rng, *s.shape)),
                   argnums=(0, 1, 2, 3, 4))(q, k, v, g, s0)
  assert all(bool(jnp.all(jnp.isfinite(grad))) for grad in grads)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_bf16_inputs(rng, op, impl):
  fn, _ = OPS[op]
  q, k, v, g, s0 = (jnp.asarray(x, jnp.bfloat16) for x in op_inputs(rng, op, t=40))
  o, s = fn(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=16, impl=impl)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  o_ref, s_ref = oracle(*(np.asarray(x, np.float32) for x in (q, k, v, g)), None,
                        q.shape[-1] ** -0.5, np.asarray(s0, np.float32))
  assert_rel_close(o, o_ref, 1e-2, "o")
  assert_rel_close(s, s_ref, 1e-2, "final state")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("chunk_size", [16, 20])  # 20: gla's exact secondary chunking
def test_gradients_xla_match_reference_and_float64(rng, op, chunk_size):
  fn, _ = OPS[op]
  q, k, v, g, s0 = op_inputs(rng, op, t=37)
  ct = randn(rng, *q.shape[:3], v.shape[-1])
  proj = randn(rng, *s0.shape)
  assert_gradients_match(fn, (q, k, v, g, s0), ("q", "k", "v", GATE_NAMES[op], "initial_state"),
                         ct, proj, chunk_size=chunk_size)


@pytest.mark.parametrize("op", OPS)
def test_decode_continues_prefill(rng, op):
  fn, step = OPS[op]
  t1, n = 21, 5
  q, k, v, g, s0 = op_inputs(rng, op, t=t1 + n)
  o_full, s_full = fn(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=16)
  o_pre, state = fn(q[:, :t1], k[:, :t1], v[:, :t1], g[:, :t1], initial_state=s0,
                    output_final_state=True, chunk_size=16)
  outs = [o_pre]
  for i in range(t1, t1 + n):
    o_i, state = step(q[:, i], k[:, i], v[:, i], g[:, i], state)
    outs.append(o_i[:, None])
  assert_rel_close(jnp.concatenate(outs, axis=1), o_full, 1e-5, "prefill + decode o")
  assert_rel_close(state, s_full, 1e-5, "prefill + decode state")


@pytest.mark.parametrize("op", OPS)
def test_step_from_empty_state(rng, op):
  _, step = OPS[op]
  q, k, v, g, _ = op_inputs(rng, op, t=1)
  o, s = step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], None, scale=0.5)
  o_ref, s_ref = oracle(q, k, v, g, None, 0.5)
  assert_rel_close(o, o_ref[:, 0], 1e-5, "o")
  assert_rel_close(s, s_ref, 1e-5, "state")


@pytest.mark.parametrize("op", OPS)
def test_chunked_prefill_in_two_pieces(rng, op):
  fn, _ = OPS[op]
  q, k, v, g, s0 = op_inputs(rng, op, t=53)
  o_full, s_full = fn(q, k, v, g, initial_state=s0, output_final_state=True, chunk_size=16)
  split = 19
  o1, s1 = fn(q[:, :split], k[:, :split], v[:, :split], g[:, :split], initial_state=s0,
              output_final_state=True, chunk_size=16)
  o2, s2 = fn(q[:, split:], k[:, split:], v[:, split:], g[:, split:], initial_state=s1,
              output_final_state=True, chunk_size=16)
  assert_rel_close(jnp.concatenate([o1, o2], axis=1), o_full, 1e-5, "two-piece o")
  assert_rel_close(s2, s_full, 1e-5, "two-piece state")


@pytest.mark.parametrize("op", OPS)
def test_jit_and_vmap(rng, op):
  fn, step = OPS[op]
  q, k, v, g, s0 = op_inputs(rng, op, t=24)
  o_ref, s_ref = oracle(q, k, v, g, None, q.shape[-1] ** -0.5, s0)
  run = jax.jit(lambda *xs: fn(*xs[:4], initial_state=xs[4], output_final_state=True,
                               chunk_size=16))
  o_jit, s_jit = run(q, k, v, g, s0)
  assert_rel_close(o_jit, o_ref, 1e-5, "jit o")
  assert_rel_close(s_jit, s_ref, 1e-5, "jit state")
  # vmap over an extra leading axis: two independent problems at once.
  stacked = [np.stack([x, x[::-1]]) for x in (q, k, v, g, s0)]
  o_vmap, s_vmap = jax.vmap(run)(*stacked)
  o_rev, s_rev = run(*(x[::-1] for x in (q, k, v, g, s0)))
  assert_rel_close(o_vmap[0], o_ref, 1e-5, "vmap o[0]")
  assert_rel_close(o_vmap[1], o_rev, 1e-6, "vmap o[1]")
  assert_rel_close(s_vmap[1], s_rev, 1e-6, "vmap state[1]")
  o_step, _ = jax.jit(jax.vmap(step))(*(x[:, :, 0] for x in stacked[:4]), stacked[4])
  assert_rel_close(o_step[0], step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], s0)[0], 1e-6, "vmap step")


@pytest.mark.parametrize("op", OPS)
def test_bad_arguments(rng, op):
  fn, step = OPS[op]
  name = GATE_NAMES[op]
  q, k, v, g, s0 = op_inputs(rng, op, t=8, h=4, hk=2, dk=8, dv=6)
  with pytest.raises(ValueError, match="q must have shape"):
    fn(q[0], k, v, g)
  with pytest.raises(ValueError, match="k must have shape"):
    fn(q, k[..., :4], v, g)
  with pytest.raises(ValueError, match="v must have shape"):
    fn(q, k, v[:, :4], g)
  with pytest.raises(ValueError, match="must divide"):
    fn(q[:, :, :3], k, v, g)
  with pytest.raises(ValueError, match=f"{name} must have shape"):
    fn(q, k, v, np.concatenate([g] * 3, axis=2))
  with pytest.raises(ValueError, match=r"initial_state must have shape"):
    fn(q, k, v, g, initial_state=s0[:, :2])
  with pytest.raises(ValueError, match=f"{name} is a log-decay and must be <= 0"):
    fn(q, k, v, -g)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    fn(q, k, v, g, chunk_size=0)
  with pytest.raises(ValueError, match="impl must be one of"):
    fn(q, k, v, g, impl="cuda")
  with pytest.raises(NotImplementedError):
    fn(q, k, v, g, impl="pallas")
  with pytest.raises(ValueError, match="q must have shape"):
    step(q, k[:, 0], v[:, 0], g[:, 0], s0)
  with pytest.raises(ValueError, match="k must have shape"):
    step(q[:, 0], k[:, 0, :, :4], v[:, 0], g[:, 0], s0)
  with pytest.raises(ValueError, match="state must have shape"):
    step(q[:, 0], k[:, 0], v[:, 0], g[:, 0], s0[..., :3])
  with pytest.raises(ValueError, match=f"{name} is a log-decay and must be <= 0"):
    step(q[:, 0], k[:, 0], v[:, 0], -g[:, 0], s0)


def test_simple_gla_bad_gate_shapes(rng):
  q, k, v, g, s0 = op_inputs(rng, "simple_gla", t=8, h=4, hk=2, dk=8, dv=6)
  with pytest.raises(ValueError, match=r"g must have shape \[2, 8, 2 or 4\]"):
    simple_gla(q, k, v, g[..., None])
  with pytest.raises(ValueError, match=r"g must have shape \[2, 2 or 4\]"):
    simple_gla_step(q[:, 0], k[:, 0], v[:, 0], g[:, 0, :, None], s0)


def test_gla_bad_gate_shapes(rng):
  q, k, v, gk, s0 = op_inputs(rng, "gla", t=8, h=4, hk=2, dk=8, dv=6)
  with pytest.raises(ValueError, match=r"gk must have shape \[2, 8, 2 or 4, 8\]"):
    gla(q, k, v, gk[..., 0])
  with pytest.raises(ValueError, match=r"gk must have shape \[2, 2 or 4, 8\]"):
    gla_step(q[:, 0], k[:, 0], v[:, 0], gk[:, 0, :, :4], s0)
