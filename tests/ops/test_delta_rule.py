"""Tests of `delta_rule`, `gated_delta_rule` and decode steps against the float64 NumPy oracle of
linear_oracle.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.delta_rule import (_unit_lower_inverse, delta_rule, delta_rule_step,
                                     gated_delta_rule, gated_delta_rule_step)
from tests.ops import linear_oracle
from tests.ops.linear_oracle import assert_gradients_match, loss_fn, oracle
from tests.utils import assert_rel_close, randn

OPS = ("delta_rule", "gated_delta_rule")


def make_inputs(rng, **kwargs):
  """q, k (L2-normalised), v, g [B,T,G], beta [B,T,G], initial_state; see linear_oracle."""
  return linear_oracle.make_inputs(rng, delta=True, **kwargs)


def run(op, q, k, v, g, beta, **kwargs):
  """Calls `op` by name; `delta_rule` ignores g."""
  if op == "delta_rule":
    return delta_rule(q, k, v, beta, **kwargs)
  return gated_delta_rule(q, k, v, g, beta, **kwargs)


def run_step(op, q, k, v, g, beta, state, **kwargs):
  if op == "delta_rule":
    return delta_rule_step(q, k, v, beta, state, **kwargs)
  return gated_delta_rule_step(q, k, v, g, beta, state, **kwargs)


def oracle_for(op, q, k, v, g, beta, scale, initial_state=None):
  return oracle(q, k, v, None if op == "delta_rule" else g, beta, scale, initial_state)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("t,chunk_size,h,hk,gate_heads,with_state", [
    (64, 16, 2, 2, 2, False),   # T a multiple of the chunk, no GQA
    (37, 16, 4, 2, 2, True),    # T not a multiple, GQA, gates on kv heads, initial state
    (37, 64, 4, 1, 4, True),    # a single padded chunk (default size), gates on q heads
])
def test_forward_matches_oracle(rng, op, impl, t, chunk_size, h, hk, gate_heads, with_state):
  q, k, v, g, beta, s0 = make_inputs(rng, t=t, h=h, hk=hk, gate_heads=gate_heads)
  s0 = s0[:, :h] if with_state else None
  o, s = run(op, q, k, v, g, beta, scale=0.3, initial_state=s0, output_final_state=True,
             chunk_size=chunk_size, impl=impl)
  o_ref, s_ref = oracle_for(op, q, k, v, g, beta, 0.3, s0)
  assert o.dtype == jnp.float32 and s.dtype == jnp.float32
  assert_rel_close(o, o_ref, 1e-5, "o")
  assert_rel_close(s, s_ref, 1e-5, "final state")


@pytest.mark.parametrize("c", [1, 5, 16, 48, 64])
def test_unit_lower_inverse_matches_float64(rng, c):
  """The chunked form's (I + L)^-1 (matmuls by block doubling; C padded to a power of two) against
  NumPy's float64 inverse, and its custom gradient against autodiff of a triangular solve, on
  strictly lower-triangular L scaled like beta * K K^T."""
  strict = np.tril(rng.standard_normal((3, 2, c, c)), -1) * 0.3
  strict = jnp.asarray(strict, jnp.float32)
  assert_rel_close(_unit_lower_inverse(strict), np.linalg.inv(np.eye(c) + np.asarray(strict)),
                   1e-5, f"inverse C={c}")
  cotangent = randn(rng, *strict.shape)
  loss = lambda inverse: lambda s: jnp.sum(inverse(s) * cotangent)
  by_solve = lambda s: jax.scipy.linalg.solve_triangular(
      jnp.eye(c) + jnp.tril(s, -1), jnp.broadcast_to(jnp.eye(c), s.shape), lower=True)
  assert_rel_close(jax.grad(loss(_unit_lower_inverse))(strict), jax.grad(loss(by_solve))(strict),
                   1e-5, f"inverse gradient C={c}")


@pytest.mark.parametrize("op", OPS)
def test_default_scale_and_no_final_state(rng, op):
  q, k, v, g, beta, _ = make_inputs(rng)
  o, s = run(op, q, k, v, g, beta)
  assert s is None
  assert_rel_close(o, oracle_for(op, q, k, v, g, beta, q.shape[-1] ** -0.5)[0], 1e-5, "o")


def test_gated_strong_decay_is_stable(rng):
  """Decays down to exp(-40) per token: the chunked form must not overflow, nor its gradient."""
  q, k, v, _, beta, s0 = make_inputs(rng, gate_heads=4)
  g = rng.uniform(-40.0, -0.5, size=beta.shape).astype(np.float32)
  o, s = gated_delta_rule(q, k, v, g, beta, initial_state=s0, output_final_state=True,
                          chunk_size=16, impl="xla")
  o_ref, s_ref = oracle(q, k, v, g, beta, q.shape[-1] ** -0.5, s0)
  assert_rel_close(o, o_ref, 1e-5, "o")
  assert_rel_close(s, s_ref, 1e-5, "final state")
  grads = jax.grad(loss_fn(gated_delta_rule, "xla", randn(rng, *o.shape), randn(rng, *s.shape)),
                   argnums=tuple(range(6)))(q, k, v, g, beta, s0)
  assert all(bool(jnp.all(jnp.isfinite(grad))) for grad in grads)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_bf16_inputs(rng, op, impl):
  q, k, v, g, beta, s0 = (jnp.asarray(x, jnp.bfloat16) for x in make_inputs(rng))
  o, s = run(op, q, k, v, g, beta, initial_state=s0, output_final_state=True, chunk_size=16,
             impl=impl)
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  o_ref, s_ref = oracle_for(op, *(np.asarray(x, np.float32) for x in (q, k, v, g, beta)),
                            q.shape[-1] ** -0.5, np.asarray(s0, np.float32))
  assert_rel_close(o, o_ref, 1e-2, "o")
  assert_rel_close(s, s_ref, 1e-2, "final state")


@pytest.mark.parametrize("op", OPS)
def test_gradients_xla_match_reference_and_float64(rng, op):
  q, k, v, g, beta, s0 = make_inputs(rng, gate_heads=4)
  ct = randn(rng, *q.shape[:3], v.shape[-1])
  proj = randn(rng, *s0.shape)
  argnums = tuple(range(6)) if op == "gated_delta_rule" else (0, 1, 2, 4, 5)
  assert_gradients_match(functools.partial(run, op), (q, k, v, g, beta, s0),
                         ("q", "k", "v", "g", "beta", "initial_state"), ct, proj, argnums)


@pytest.mark.parametrize("op", OPS)
def test_decode_continues_prefill(rng, op):
  t1, n = 21, 16
  q, k, v, g, beta, s0 = make_inputs(rng, t=t1 + n)
  o_full, s_full = run(op, q, k, v, g, beta, initial_state=s0, output_final_state=True,
                       chunk_size=16)
  o_pre, state = run(op, q[:, :t1], k[:, :t1], v[:, :t1], g[:, :t1], beta[:, :t1],
                     initial_state=s0, output_final_state=True, chunk_size=16)
  outs = [o_pre]
  for i in range(t1, t1 + n):
    o_i, state = run_step(op, q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], state)
    outs.append(o_i[:, None])
  assert_rel_close(jnp.concatenate(outs, axis=1), o_full, 1e-5, "prefill + decode o")
  assert_rel_close(state, s_full, 1e-5, "prefill + decode state")


@pytest.mark.parametrize("op", OPS)
def test_step_from_empty_state(rng, op):
  q, k, v, g, beta, _ = make_inputs(rng, t=1)
  o, s = run_step(op, q[:, 0], k[:, 0], v[:, 0], g[:, 0], beta[:, 0], None, scale=0.5)
  o_ref, s_ref = oracle_for(op, q, k, v, g, beta, 0.5)
  assert_rel_close(o, o_ref[:, 0], 1e-5, "o")
  assert_rel_close(s, s_ref, 1e-5, "state")


@pytest.mark.parametrize("op", OPS)
def test_chunked_prefill_in_two_pieces(rng, op):
  q, k, v, g, beta, s0 = make_inputs(rng)
  o_full, s_full = run(op, q, k, v, g, beta, initial_state=s0, output_final_state=True,
                       chunk_size=16)
  split = 21
  o1, s1 = run(op, *(x[:, :split] for x in (q, k, v, g, beta)), initial_state=s0,
               output_final_state=True, chunk_size=16)
  o2, s2 = run(op, *(x[:, split:] for x in (q, k, v, g, beta)), initial_state=s1,
               output_final_state=True, chunk_size=16)
  assert_rel_close(jnp.concatenate([o1, o2], axis=1), o_full, 1e-5, "two-piece o")
  assert_rel_close(s2, s_full, 1e-5, "two-piece state")


@pytest.mark.parametrize("op", OPS)
def test_jit_and_vmap(rng, op):
  q, k, v, g, beta, s0 = make_inputs(rng)
  inputs = (q, k, v, g, beta, s0)
  full = jax.jit(lambda *xs: run(op, *xs[:5], initial_state=xs[5], output_final_state=True,
                                 chunk_size=16))
  o_eager, s_eager = run(op, *inputs[:5], initial_state=s0, output_final_state=True, chunk_size=16)
  o_jit, s_jit = full(*inputs)
  assert_rel_close(o_jit, o_eager, 1e-6, "jit o")
  assert_rel_close(s_jit, s_eager, 1e-6, "jit state")
  # vmap over an extra leading axis: two independent problems at once.
  stacked = [np.stack([x, x[::-1]]) for x in inputs]
  o_vmap, s_vmap = jax.vmap(full)(*stacked)
  o_rev, s_rev = run(op, *(x[::-1] for x in inputs[:5]), initial_state=s0[::-1],
                     output_final_state=True, chunk_size=16)
  assert_rel_close(o_vmap[0], o_eager, 1e-6, "vmap o[0]")
  assert_rel_close(o_vmap[1], o_rev, 1e-6, "vmap o[1]")
  assert_rel_close(s_vmap[1], s_rev, 1e-6, "vmap state[1]")
  step = jax.jit(jax.vmap(lambda *xs: run_step(op, *xs)))
  o_step, s_step = step(*(x[:, :, 0] for x in stacked[:5]), stacked[5])
  o_one, s_one = run_step(op, *(x[:, 0] for x in inputs[:5]), s0)
  assert_rel_close(o_step[0], o_one, 1e-6, "vmap step o")
  assert_rel_close(s_step[0], s_one, 1e-6, "vmap step state")


def test_bad_arguments(rng):
  q, k, v, g, beta, s0 = make_inputs(rng, t=8, h=4, hk=2, dk=8, dv=6)
  with pytest.raises(ValueError, match="q must have shape"):
    delta_rule(q[0], k, v, beta)
  with pytest.raises(ValueError, match="k must have shape"):
    delta_rule(q, k[..., :4], v, beta)
  with pytest.raises(ValueError, match="v must have shape"):
    gated_delta_rule(q, k, v[:, :4], g, beta)
  with pytest.raises(ValueError, match="must divide"):
    delta_rule(q[:, :, :3], k, v, beta)
  with pytest.raises(ValueError, match=r"beta must have shape \[2, 8, 2 or 4\]"):
    delta_rule(q, k, v, beta[..., None])
  with pytest.raises(ValueError, match=r"beta must have shape \[2, 8, 2 or 4\]"):
    gated_delta_rule(q, k, v, g, np.concatenate([beta] * 3, axis=2))
  with pytest.raises(ValueError, match=r"g must have shape \[2, 8, 2 or 4\]"):
    gated_delta_rule(q, k, v, g[:, :5], beta)
  with pytest.raises(ValueError, match="initial_state must have shape"):
    gated_delta_rule(q, k, v, g, beta, initial_state=s0[:, :2])
  with pytest.raises(ValueError, match="g is a log-decay and must be <= 0"):
    gated_delta_rule(q, k, v, -g, beta)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    delta_rule(q, k, v, beta, chunk_size=0)
  with pytest.raises(ValueError, match="impl must be one of"):
    delta_rule(q, k, v, beta, impl="cuda")
  with pytest.raises(NotImplementedError):
    gated_delta_rule(q, k, v, g, beta, impl="pallas")
  with pytest.raises(ValueError, match="q must have shape"):
    delta_rule_step(q, k[:, 0], v[:, 0], beta[:, 0], s0)
  with pytest.raises(ValueError, match="k must have shape"):
    delta_rule_step(q[:, 0], k[:, 0, :, :4], v[:, 0], beta[:, 0], s0)
  with pytest.raises(ValueError, match="v must have shape"):
    gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0, :1], g[:, 0], beta[:, 0], s0)
  with pytest.raises(ValueError, match=r"beta must have shape \[2, 2 or 4\]"):
    delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, :2], s0)
  with pytest.raises(ValueError, match=r"g must have shape \[2, 2 or 4\]"):
    gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], g[:, :2], beta[:, 0], s0)
  with pytest.raises(ValueError, match="state must have shape"):
    delta_rule_step(q[:, 0], k[:, 0], v[:, 0], beta[:, 0], s0[..., :3])
  with pytest.raises(ValueError, match="g is a log-decay and must be <= 0"):
    gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], -g[:, 0], beta[:, 0], s0)
