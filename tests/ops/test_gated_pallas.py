"""Tests of the Pallas kernels of `simple_gla` and `gla` (impl="pallas").

On CPU the kernels run in Pallas interpret mode; on a GPU the same tests run the compiled Triton
kernels (float32 through full-precision dots: tolerance 1e-4 there, as the issue allows).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.gla import gla
from jaxchunk.ops.simple_gla import simple_gla
from tests.ops import linear_oracle
from tests.utils import assert_rel_close, randn

F32_TOL = 1e-5 if jax.default_backend() == "cpu" else 1e-4
BF16_TOL = 1e-2
OPS = {"simple_gla": (simple_gla, False), "gla": (gla, True)}


def oracle(q, k, v, gate, scale, initial_state):
  """Token-by-token float64 recurrence; gate [B,T,Hg] or [B,T,Hg,Dk]. Returns (o, final state)."""
  q, k, v, gate, state = (np.asarray(x, np.float64) for x in (q, k, v, gate, initial_state))
  b, t, h, dk = q.shape
  k, v, gate = (np.repeat(x, h // x.shape[2], axis=2) for x in (k, v, gate))
  decay = np.exp(gate)[..., None] if gate.ndim == 4 else np.exp(gate)[..., None, None]
  o = np.zeros((b, t, h, v.shape[-1]))
  for i in range(t):
    state = decay[:, i] * state + k[:, i, :, :, None] * v[:, i, :, None, :]
    o[:, i] = scale * np.einsum("bhd,bhde->bhe", q[:, i], state)
  return o, state


def make_inputs(rng, per_channel, *, b=1, t=80, h=2, hk=2, gate_heads=2, d=64):
  """q, k, v, gate (log-decays in [-1, -0.01)), initial state; fresh random values."""
  q = randn(rng, b, t, h, d)
  k = randn(rng, b, t, hk, d)
  v = randn(rng, b, t, hk, d)
  tail = (d,) if per_channel else ()
  gate = rng.uniform(-1.0, -0.01, size=(b, t, gate_heads, *tail)).astype(np.float32)
  return q, k, v, gate, randn(rng, b, h, d, d)


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("t,h,hk,gate_heads", [
    # T not a multiple of the chunk (64); slow: T = 317 below is ragged too (and spans 5 chunks)
    pytest.param(80, 2, 2, 2, marks=pytest.mark.slow),
    (64, 4, 2, 2),    # GQA, gates on kv heads
    (20, 2, 2, 2),    # T shorter than one chunk
    (317, 2, 1, 1),   # 5 chunks, the last one ragged
])
def test_forward_matches_oracle_and_xla(rng, name, t, h, hk, gate_heads):
  op, per_channel = OPS[name]
  q, k, v, gate, s0 = make_inputs(rng, per_channel, t=t, h=h, hk=hk, gate_heads=gate_heads)
  o, s = op(q, k, v, gate, scale=0.2, initial_state=s0, output_final_state=True, impl="pallas")
  o_ref, s_ref = oracle(q, k, v, gate, 0.2, s0)
  assert o.dtype == jnp.float32 and s.dtype == jnp.float32
  assert_rel_close(o, o_ref, F32_TOL, "o vs oracle")
  assert_rel_close(s, s_ref, F32_TOL, "final state vs oracle")
  o_xla, s_xla = op(q, k, v, gate, scale=0.2, initial_state=s0, output_final_state=True,
                    impl="xla")
  assert_rel_close(o, o_xla, F32_TOL, "o vs xla")
  assert_rel_close(s, s_xla, F32_TOL, "final state vs xla")


@pytest.mark.parametrize("name", OPS)
def test_bf16_matches_oracle(rng, name):
  op, per_channel = OPS[name]
  q, k, v, gate, s0 = make_inputs(rng, per_channel, t=72)
  q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  o, s = op(q16, k16, v16, gate, initial_state=s0, output_final_state=True, impl="pallas")
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  o_ref, s_ref = oracle(*(np.asarray(x, np.float32) for x in (q16, k16, v16)), gate, 64 ** -0.5,
                        s0)
  assert_rel_close(o, o_ref, BF16_TOL, "o")
  assert_rel_close(s, s_ref, BF16_TOL, "final state")


def _loss(op, impl, ct, proj, segment_ids=None):
  """sum(o * ct) + sum(final_state * proj) as a function of every input."""
  def loss(q, k, v, gate, s0):
    o, s = op(q, k, v, gate, scale=0.3, initial_state=s0, output_final_state=True,
              segment_ids=segment_ids, impl=impl)
    return jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(s * proj)
  return loss


def assert_gradients_match_xla(rng, op, q, k, v, gate, s0, segment_ids=None):
  """Gradients of every input (random cotangents of o and the final state), pallas vs xla."""
  ct, proj = randn(rng, *q.shape), randn(rng, *s0.shape)
  grads = jax.grad(_loss(op, "pallas", ct, proj, segment_ids), argnums=range(5))(q, k, v, gate,
                                                                                  s0)
  grads_xla = jax.grad(_loss(op, "xla", ct, proj, segment_ids), argnums=range(5))(q, k, v, gate,
                                                                                   s0)
  for what, g, g_xla in zip(("dq", "dk", "dv", "dgate", "dinitial_state"), grads, grads_xla):
    assert_rel_close(g, g_xla, F32_TOL, what)


def assert_values_and_gradients(rng, op, q, k, v, gate, s0):
  """Output and final state against the float64 oracle, then gradients against xla."""
  o, s = op(q, k, v, gate, scale=0.2, initial_state=s0, output_final_state=True, impl="pallas")
  o_ref, s_ref = oracle(q, k, v, gate, 0.2, s0)
  assert_rel_close(o, o_ref, F32_TOL, "o")
  assert_rel_close(s, s_ref, F32_TOL, "final state")
  assert_gradients_match_xla(rng, op, q, k, v, gate, s0)


@pytest.mark.parametrize("name", OPS)
# T = 70 (ragged, 2 chunks) in the slow run: T = 317 is ragged too, over 5 chunks
@pytest.mark.parametrize("t", [pytest.param(70, marks=pytest.mark.slow), 20, 317])
def test_gradients_match_xla(rng, name, t):
  """Every input, incl. the gate (the dB = q dq - k dk identity, summed across chunks through the
  states) and the initial state; GQA with gates on kv heads; ragged T, shorter than one chunk, and
  5 chunks."""
  op, per_channel = OPS[name]
  assert_gradients_match_xla(rng, op, *make_inputs(rng, per_channel, t=t, h=4, hk=2,
                                                   gate_heads=2))


@pytest.mark.parametrize("name", OPS)
# T = 64 (one chunk) in the slow run: T = 200 runs the same kernels over 4 chunks (bf16 stored
# chunk states between them)
@pytest.mark.parametrize("t", [pytest.param(64, marks=pytest.mark.slow), 200])
def test_bf16_gradients_match_float64(rng, name, t):
  """bf16 operands and bf16 stored chunk states; the decay gradient's cancelling sums stay at the
  other gradients' ~3e-3."""
  op, per_channel = OPS[name]
  q, k, v, gate, s0 = make_inputs(rng, per_channel, t=t)
  q, k, v = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, k, v))
  ct, proj = randn(rng, *q.shape), randn(rng, *s0.shape)
  grads = jax.grad(_loss(op, "pallas", ct, proj), argnums=range(5))(
      *(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), gate, s0)
  with jax.enable_x64(True):
    grads_ref = jax.grad(_loss(op, "reference", ct, proj), argnums=range(5))(
        *(np.asarray(x, np.float64) for x in (q, k, v, gate, s0)))
    grads_ref = [np.asarray(g) for g in grads_ref]
  for what, g, g_ref in zip(("dq", "dk", "dv", "dgate", "dinitial_state"), grads, grads_ref):
    assert_rel_close(np.asarray(g, np.float32), g_ref, BF16_TOL, what)


# simple GLA (one decay per token) in the slow run; GLA's per-channel decays in the default run.
@pytest.mark.parametrize("name", [pytest.param("simple_gla", marks=pytest.mark.slow), "gla"])
def test_strong_decays(rng, name):
  """Log-decays down to -5 per token: the per-channel kernel's off-diagonal blocks of A factor
  e^(b_i - b_j) through the query block's first row (factors <= 1), the diagonal blocks through
  their middle row; values against the oracle, gradients against xla."""
  op, per_channel = OPS[name]
  q, k, v, _, s0 = make_inputs(rng, per_channel, t=150)
  gate = rng.uniform(-5.0, -0.01, size=(1, 150, 2, *((64,) if per_channel else ()))).astype(
      np.float32)
  assert_values_and_gradients(rng, op, q, k, v, gate, s0)


# Packed documents: forced starts per row (chunks of 64, gla sub-chunks of 32) plus one random start
# per row. T = 150 (ragged); starts at a chunk edge (64), a sub-chunk edge (96), three in one chunk
# with a 1-token document (70, 71, 72), one inside the first chunk (5) and a 1-token document at the
# row's end (149). (tests/ops/test_segment_ids_linear.py runs a T shorter than one chunk.)
SEGMENT_T = 150
SEGMENT_STARTS = ({64, 70, 71, 72, 96, 100}, {5, 128, 149})


def packed_segment_ids(rng, t, forced):
  """[2, t] int32 ids: the `forced` starts of each row plus one random start; the ids alternate
  between two values (non-adjacent documents share ids)."""
  starts = np.zeros((2, t), bool)
  for row, positions in enumerate(forced):
    starts[row, sorted(positions)] = True
    starts[row, rng.integers(1, t)] = True
  return (3 + np.cumsum(starts, axis=1) % 2).astype(np.int32)


# simple GLA in the slow run (its kernels with segment_ids: test_segment_ids_linear.py, default run).
@pytest.mark.parametrize("name", ["gla", pytest.param("simple_gla", marks=pytest.mark.slow)])
def test_segment_ids_match_oracle_and_xla(rng, name):
  """segment_ids inside the kernels: o and the final state against the float64 oracle (with
  resets) and the xla path; gradients of every input against xla. GQA, gates on kv heads, an
  initial state."""
  op, per_channel = OPS[name]
  t, forced = SEGMENT_T, SEGMENT_STARTS
  q, k, v, gate, s0 = make_inputs(rng, per_channel, b=2, t=t, h=4, hk=2, gate_heads=2)
  ids = packed_segment_ids(rng, t, forced)
  o, s = op(q, k, v, gate, scale=0.2, initial_state=s0, output_final_state=True, segment_ids=ids,
            impl="pallas")
  o_ref, s_ref = linear_oracle.oracle(q, k, v, gate, None, 0.2, s0, ids)
  assert_rel_close(o, o_ref, F32_TOL, "o vs oracle")
  assert_rel_close(s, s_ref, F32_TOL, "final state vs oracle")
  o_xla, s_xla = op(q, k, v, gate, scale=0.2, initial_state=s0, output_final_state=True,
                    segment_ids=ids, impl="xla")
  assert_rel_close(o, o_xla, F32_TOL, "o vs xla")
  assert_rel_close(s, s_xla, F32_TOL, "final state vs xla")
  assert_gradients_match_xla(rng, op, q, k, v, gate, s0, segment_ids=ids)


# The hand-off between the split kernels differs per decay kind and, in the decay gradient's sums,
# with packed documents: per-channel with documents and scalar without in the default run.
@pytest.mark.parametrize("name,segmented", [
    ("gla", True), ("simple_gla", False),
    pytest.param("gla", False, marks=pytest.mark.slow),
    pytest.param("simple_gla", True, marks=pytest.mark.slow)])
def test_split_gradient_kernels_match_xla(rng, monkeypatch, name, segmented):
  """`split_grad` configs (dq and dv, then dk and the decay gradient, two kernels joined through
  the query part of dB in HBM): gradients of every input against xla; ragged T over 3 chunks,
  GQA, gates on kv heads, with and without packed documents."""
  from pallas_kernels.gpu import gated_linear_attention as kernels
  op, per_channel = OPS[name]
  key = (per_channel, 64)
  monkeypatch.setitem(kernels.CONFIGS, key,
                      dataclasses.replace(kernels.CONFIGS[key], split_grad=True))
  # The ops are jitted and read CONFIGS when traced: a length no other test uses keeps the traces
  # of the two configs apart (clearing JAX's caches instead recompiled every later test).
  t = SEGMENT_T + 1
  q, k, v, gate, s0 = make_inputs(rng, per_channel, b=2, t=t, h=4, hk=2, gate_heads=2)
  ids = packed_segment_ids(rng, t, SEGMENT_STARTS) if segmented else None
  assert_gradients_match_xla(rng, op, q, k, v, gate, s0, segment_ids=ids)


@pytest.mark.slow  # the float32 segment test above runs the same masks in the default run
@pytest.mark.parametrize("name", OPS)
def test_segment_ids_bf16(rng, name):
  """bf16 with packed documents: values against the float64 oracle, gradients against the float64
  reference path."""
  op, per_channel = OPS[name]
  t, forced = SEGMENT_T, SEGMENT_STARTS
  q, k, v, gate, s0 = make_inputs(rng, per_channel, b=2, t=t)
  q, k, v = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, k, v))
  ids = packed_segment_ids(rng, t, forced)
  q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  o, s = op(q16, k16, v16, gate, scale=0.3, initial_state=s0, output_final_state=True,
            segment_ids=ids, impl="pallas")
  assert o.dtype == jnp.bfloat16
  o_ref, s_ref = linear_oracle.oracle(q, k, v, gate, None, 0.3, s0, ids)
  assert_rel_close(o, o_ref, BF16_TOL, "o")
  assert_rel_close(s, s_ref, BF16_TOL, "final state")
  ct, proj = randn(rng, *q.shape), randn(rng, *s0.shape)
  grads = jax.grad(_loss(op, "pallas", ct, proj, ids), argnums=range(5))(q16, k16, v16, gate, s0)
  with jax.enable_x64(True):
    grads_ref = jax.grad(_loss(op, "reference", ct, proj, ids), argnums=range(5))(
        *(np.asarray(x, np.float64) for x in (q, k, v, gate, s0)))
    grads_ref = [np.asarray(g) for g in grads_ref]
  for what, g, g_ref in zip(("dq", "dk", "dv", "dgate", "dinitial_state"), grads, grads_ref):
    assert_rel_close(np.asarray(g, np.float32), g_ref, BF16_TOL, what)


def test_chunked_prefill_continues_state(rng):
  """Two prefills (initial_state = the first's final state) equal one."""
  q, k, v, gate, s0 = make_inputs(rng, True, t=64)
  o, s = gla(q, k, v, gate, initial_state=s0, output_final_state=True, impl="pallas")
  o1, s1 = gla(q[:, :32], k[:, :32], v[:, :32], gate[:, :32], initial_state=s0,
               output_final_state=True, impl="pallas")
  o2, s2 = gla(q[:, 32:], k[:, 32:], v[:, 32:], gate[:, 32:], initial_state=s1,
               output_final_state=True, impl="pallas")
  assert_rel_close(jnp.concatenate([o1, o2], axis=1), o, F32_TOL, "o")
  assert_rel_close(s2, s, F32_TOL, "final state")


def test_jit_and_vmap(rng):
  q, k, v, gate, s0 = make_inputs(rng, False, b=2, t=64)
  def run(q, k, v, gate):
    return simple_gla(q, k, v, gate, impl="pallas")[0]
  expected = simple_gla(q, k, v, gate, impl="xla")[0]
  assert_rel_close(jax.jit(run)(q, k, v, gate), expected, F32_TOL, "jit")
  vmapped = jax.vmap(run)(*(x[:, None] for x in (q, k, v, gate)))
  assert_rel_close(vmapped[:, 0], expected, F32_TOL, "vmap")


def test_unsupported_calls_explain_and_auto_falls_back(rng):
  q, k, v, gate, _ = make_inputs(rng, False, t=16, d=16)
  with pytest.raises(NotImplementedError, match="head dims"):
    simple_gla(q, k, v, gate, impl="pallas")
  with pytest.raises(NotImplementedError, match="one dtype"):
    simple_gla(q, jnp.asarray(k, jnp.bfloat16), v, gate, impl="pallas")
  auto = simple_gla(q, k, v, gate, impl="auto")[0]
  assert_rel_close(auto, simple_gla(q, k, v, gate, impl="xla")[0], F32_TOL, "auto")


def test_bad_arguments_raise_before_the_kernel(rng):
  q, k, v, gate, s0 = make_inputs(rng, True, t=32)
  with pytest.raises(ValueError, match="initial_state must have shape"):
    gla(q, k, v, gate, initial_state=s0[:, :, :32], impl="pallas")
  with pytest.raises(ValueError, match="gk must have shape"):
    gla(q, k, v, gate[..., :8], impl="pallas")
  with pytest.raises(ValueError, match="log-decay"):
    gla(q, k, v, -gate, impl="pallas")


@pytest.mark.slow
@pytest.mark.parametrize("name", OPS)
def test_head_dim_128_and_batch(rng, name):
  op, per_channel = OPS[name]
  assert_values_and_gradients(
      rng, op, *make_inputs(rng, per_channel, b=2, t=200, h=2, hk=1, gate_heads=1, d=128))
