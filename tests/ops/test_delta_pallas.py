"""Tests of the Pallas kernel of `delta_rule`, `gated_delta_rule` and `kda` (impl="pallas").

On CPU the kernel runs in Pallas interpret mode; on a GPU the same tests run the compiled Triton
kernel (float32 through full-precision dots: tolerance 1e-4 there, as the issue allows). The oracle
is the float64 token-by-token recurrence of linear_oracle.py.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops import _gated_chunk
from jaxchunk.ops.delta_rule import delta_rule, gated_delta_rule, gated_delta_rule_step
from jaxchunk.ops.kda import kda
from pallas_kernels.gpu import delta_rule as delta_kernel
from tests.ops import linear_oracle
from tests.utils import assert_rel_close, randn

delta_module = importlib.import_module("jaxchunk.ops.delta_rule")  # the op shadows the module

F32_TOL = 1e-5 if jax.default_backend() == "cpu" else 1e-4
BF16_TOL = 1e-2
OPS = ("delta_rule", "gated_delta_rule", "kda")
NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def make_inputs(rng, name, *, b=1, t=80, h=2, hk=2, gate_heads=2, d=64):
  """q, k (L2-normalised), v, g (log-decays in [-1, -0.01), per key channel for kda), beta,
  initial state; fresh random values."""
  return linear_oracle.make_inputs(rng, b=b, t=t, h=h, hk=hk, dk=d, dv=d, gate_heads=gate_heads,
                                   per_channel=name == "kda", delta=True)


def run(name, q, k, v, g, beta, **kwargs):
  """Calls the op `name`; `delta_rule` ignores g."""
  if name == "delta_rule":
    return delta_rule(q, k, v, beta, **kwargs)
  return (kda if name == "kda" else gated_delta_rule)(q, k, v, g, beta, **kwargs)


def oracle(name, q, k, v, g, beta, scale, initial_state):
  return linear_oracle.oracle(q, k, v, None if name == "delta_rule" else g, beta, scale,
                              initial_state)


def _loss(name, impl, ct, proj):
  """sum(o * ct) + sum(final_state * proj) as a function of q, k, v, g, beta, initial_state."""
  def loss(q, k, v, g, beta, s0):
    o, s = run(name, q, k, v, g, beta, scale=0.3, initial_state=s0, output_final_state=True,
               impl=impl)
    return jnp.sum(o.astype(jnp.float32) * ct) + jnp.sum(s * proj)
  return loss


def _argnums(name):
  """The inputs `name` depends on: all but g for `delta_rule`."""
  return (0, 1, 2, 4, 5) if name == "delta_rule" else tuple(range(6))


@pytest.mark.parametrize("name", OPS)
def test_forward_matches_oracle_and_xla(rng, name):
  """T = 80 (not a multiple of the chunk, 64), GQA with gates and beta on the kv heads."""
  q, k, v, g, beta, s0 = make_inputs(rng, name, t=80, h=4, hk=2, gate_heads=2)
  o, s = run(name, q, k, v, g, beta, scale=0.2, initial_state=s0, output_final_state=True,
             impl="pallas")
  o_ref, s_ref = oracle(name, q, k, v, g, beta, 0.2, s0)
  assert o.dtype == jnp.float32 and s.dtype == jnp.float32
  assert_rel_close(o, o_ref, F32_TOL, "o vs oracle")
  assert_rel_close(s, s_ref, F32_TOL, "final state vs oracle")
  o_xla, s_xla = run(name, q, k, v, g, beta, scale=0.2, initial_state=s0, output_final_state=True,
                     impl="xla")
  assert_rel_close(o, o_xla, F32_TOL, "o vs xla")
  assert_rel_close(s, s_xla, F32_TOL, "final state vs xla")


@pytest.mark.parametrize("name", OPS)
def test_bf16_matches_oracle(rng, name):
  q, k, v, g, beta, s0 = make_inputs(rng, name, t=72)
  q16, k16, v16 = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v))
  o, s = run(name, q16, k16, v16, g, beta, initial_state=s0, output_final_state=True,
             impl="pallas")
  assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
  o_ref, s_ref = oracle(name, *(np.asarray(x, np.float32) for x in (q16, k16, v16)), g, beta,
                        64 ** -0.5, s0)
  assert_rel_close(o, o_ref, BF16_TOL, "o")
  assert_rel_close(s, s_ref, BF16_TOL, "final state")


@pytest.mark.parametrize("name", OPS)
def test_gradients_match_xla(rng, name):
  """Every input (beta, the gates and the initial state included); GQA with gates and beta on the
  q heads, ragged T."""
  q, k, v, g, beta, s0 = make_inputs(rng, name, t=70, h=2, hk=1, gate_heads=2)
  ct, proj = randn(rng, *q.shape), randn(rng, *s0.shape)
  argnums = _argnums(name)
  grads = jax.grad(_loss(name, "pallas", ct, proj), argnums)(q, k, v, g, beta, s0)
  grads_xla = jax.grad(_loss(name, "xla", ct, proj), argnums)(q, k, v, g, beta, s0)
  for i, grad, grad_xla in zip(argnums, grads, grads_xla):
    assert_rel_close(grad, grad_xla, F32_TOL, f"d{NAMES[i]}")


@pytest.mark.parametrize("name", [pytest.param("delta_rule", marks=pytest.mark.slow),
                                  "gated_delta_rule", pytest.param("kda", marks=pytest.mark.slow)])
def test_packed_documents_match_xla(rng, name):
  """segment_ids over T = 150 (three kernel chunks of 64): documents starting mid-chunk, at a
  chunk's first token (64) and spanning chunk boundaries; values and every gradient against the
  xla path, values against the float64 oracle run per document."""
  q, k, v, g, beta, s0 = make_inputs(rng, name, t=150, h=2, hk=1, gate_heads=2)
  starts = (0, 30, 64, 100, 101)
  ids = np.cumsum(np.isin(np.arange(150), starts[1:]))[None].astype(np.int32)
  ct, proj = randn(rng, *q.shape), randn(rng, *s0.shape)

  def loss(impl):
    def f(q, k, v, g, beta, s0):
      o, s = run(name, q, k, v, g, beta, scale=0.3, initial_state=s0, output_final_state=True,
                 segment_ids=ids, impl=impl)
      return jnp.sum(o * ct) + jnp.sum(s * proj), (o, s)
    return f

  argnums = _argnums(name)
  (_, (o, s)), grads = jax.value_and_grad(loss("pallas"), argnums, has_aux=True)(
      q, k, v, g, beta, s0)
  (_, (o_xla, s_xla)), grads_xla = jax.value_and_grad(loss("xla"), argnums, has_aux=True)(
      q, k, v, g, beta, s0)
  assert_rel_close(o, o_xla, F32_TOL, "packed o vs xla")
  assert_rel_close(s, s_xla, F32_TOL, "packed final state vs xla")
  for i, grad, grad_xla in zip(argnums, grads, grads_xla):
    assert_rel_close(grad, grad_xla, F32_TOL, f"packed d{NAMES[i]}")
  bounds = (*starts, 150)
  for first, end in zip(bounds[:-1], bounds[1:]):
    piece = lambda x: np.asarray(x)[:, first:end]
    state = s0 if first == 0 else np.zeros_like(s0)
    o_ref, s_ref = oracle(name, *map(piece, (q, k, v, g, beta)), 0.3, state)
    assert_rel_close(o[:, first:end], o_ref, F32_TOL, f"document [{first}, {end}) vs oracle")
  assert_rel_close(s, s_ref, F32_TOL, "final state vs the last document's oracle")


def _bf16_gradients_match_float64(rng, name):
  q, k, v, g, beta, s0 = make_inputs(rng, name, t=64)
  q, k, v = (np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32) for x in (q, k, v))
  ct, proj = randn(rng, *q.shape), randn(rng, *s0.shape)
  argnums = _argnums(name)
  grads = jax.grad(_loss(name, "pallas", ct, proj), argnums)(
      *(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), g, beta, s0)
  with jax.enable_x64(True):
    grads_ref = jax.grad(_loss(name, "reference", ct, proj), argnums)(
        *(np.asarray(x, np.float64) for x in (q, k, v, g, beta, s0)))
    grads_ref = [np.asarray(grad) for grad in grads_ref]
  assert grads_ref[0].dtype == np.float64
  for i, grad, grad_ref in zip(argnums, grads, grads_ref):
    assert_rel_close(np.asarray(grad, np.float32), grad_ref, BF16_TOL, f"d{NAMES[i]}")


def test_bf16_gradients_match_float64(rng):
  _bf16_gradients_match_float64(rng, "gated_delta_rule")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["delta_rule", "kda"])
def test_bf16_gradients_match_float64_other_ops(rng, name):
  _bf16_gradients_match_float64(rng, name)


def test_prefill_in_two_pieces_then_decode(rng):
  """Two pallas prefills (initial_state = the first's final state) equal one; decode steps continue
  from the pallas state exactly."""
  q, k, v, g, beta, s0 = make_inputs(rng, "gated_delta_rule", t=68)
  inputs = (q, k, v, g, beta)

  def prefill(start, stop, state):
    return gated_delta_rule(*(x[:, start:stop] for x in inputs), initial_state=state,
                            output_final_state=True, impl="pallas")

  o, s = prefill(0, 64, s0)
  o1, s1 = prefill(0, 32, s0)
  o2, s2 = prefill(32, 64, s1)
  assert_rel_close(jnp.concatenate([o1, o2], axis=1), o, F32_TOL, "o")
  assert_rel_close(s2, s, F32_TOL, "final state")
  o_ref, s_ref = oracle("gated_delta_rule", q, k, v, g, beta, 64 ** -0.5, s0)
  for i in range(64, 68):
    o_step, s = gated_delta_rule_step(*(x[:, i] for x in inputs), s)
    assert_rel_close(o_step, o_ref[:, i], F32_TOL, f"decode step {i}")
  assert_rel_close(s, s_ref, F32_TOL, "state after decoding")


def test_jit_and_vmap(rng):
  q, k, v, g, beta, _ = make_inputs(rng, "gated_delta_rule", b=2, t=64)

  def fn(q, k, v, g, beta):
    return gated_delta_rule(q, k, v, g, beta, impl="pallas")[0]

  expected = gated_delta_rule(q, k, v, g, beta, impl="xla")[0]
  assert_rel_close(jax.jit(fn)(q, k, v, g, beta), expected, F32_TOL, "jit")
  vmapped = jax.vmap(fn)(*(x[:, None] for x in (q, k, v, g, beta)))
  assert_rel_close(vmapped[:, 0], expected, F32_TOL, "vmap")


def test_unsupported_calls_explain_and_auto_falls_back(rng):
  q, k, v, g, beta, _ = make_inputs(rng, "gated_delta_rule", t=16, d=16)
  with pytest.raises(NotImplementedError, match="head dims"):
    gated_delta_rule(q, k, v, g, beta, impl="pallas")
  with pytest.raises(NotImplementedError, match="one dtype"):
    delta_rule(q, jnp.asarray(k, jnp.bfloat16), v, beta, impl="pallas")
  auto = gated_delta_rule(q, k, v, g, beta, impl="auto")[0]
  assert_rel_close(auto, gated_delta_rule(q, k, v, g, beta, impl="xla")[0], F32_TOL, "auto")


def test_bad_arguments_raise_before_the_kernel(rng):
  q, k, v, g, beta, s0 = make_inputs(rng, "kda", t=32)
  with pytest.raises(ValueError, match="initial_state must have shape"):
    kda(q, k, v, g, beta, initial_state=s0[:, :, :32], impl="pallas")
  with pytest.raises(ValueError, match="gk must have shape"):
    kda(q, k, v, g[..., :8], beta, impl="pallas")
  with pytest.raises(ValueError, match="beta must have shape"):
    kda(q, k, v, g, beta[:, :16], impl="pallas")
  with pytest.raises(ValueError, match="log-decay"):
    kda(q, k, v, -g, beta, impl="pallas")


def _check_against_oracle_and_xla(rng, name, inputs):
  """The pallas op's values (scale 0.3) against the oracle and every gradient against xla."""
  q, k, v, g, beta, s0 = inputs
  o, s = run(name, q, k, v, g, beta, scale=0.3, initial_state=s0, output_final_state=True,
             impl="pallas")
  o_ref, s_ref = oracle(name, q, k, v, g, beta, 0.3, s0)
  assert_rel_close(o, o_ref, F32_TOL, "o vs oracle")
  assert_rel_close(s, s_ref, F32_TOL, "final state vs oracle")
  ct, proj = randn(rng, *q.shape), randn(rng, *s0.shape)
  argnums = _argnums(name)
  grads = jax.grad(_loss(name, "pallas", ct, proj), argnums)(q, k, v, g, beta, s0)
  grads_xla = jax.grad(_loss(name, "xla", ct, proj), argnums)(q, k, v, g, beta, s0)
  for i, grad, grad_xla in zip(argnums, grads, grads_xla):
    assert_rel_close(grad, grad_xla, F32_TOL, f"d{NAMES[i]}")


@pytest.mark.slow
@pytest.mark.parametrize("name", OPS)
def test_head_dim_128_and_batch(rng, name):
  _check_against_oracle_and_xla(
      rng, name, make_inputs(rng, name, b=2, t=200, h=2, hk=1, gate_heads=1, d=128))


@pytest.mark.parametrize("name", ["gated_delta_rule", "kda"])
def test_fused_factors_match_xla_factors(rng, name):
  """The fused factor kernels (scalar and per-channel decays) against the XLA factors of the xla
  path, every factor over two chunks (their gradients: the default path's gradient tests for the
  scalar decays, `test_swapped_factor_path_matches_xla` for kda)."""
  q, k, v, g, beta, _ = make_inputs(rng, name, t=128, h=2, hk=2, gate_heads=2)
  gate = g if name == "kda" else g[..., None]
  *expected, b = delta_module._chunk_factors(q, k, v, beta, gate, 64, blockwise=False)
  b = delta_module._from_chunks(b)
  expected = (*map(delta_module._from_chunks, expected), b if name == "kda" else b[..., 0])
  fused = delta_kernel._factors(q, k, v, beta, g, jax.default_backend() == "cpu",
                                save_inverse=False)
  for factor, out, ref in zip(("w", "u_v", "qd", "kd", "P", "b"), fused, expected):
    assert_rel_close(out, ref, F32_TOL, f"{name} {factor}")


@pytest.fixture
def swapped_factors(monkeypatch):
  """The pallas path with the other source of chunk-local factors than its default, per decay
  kind: the XLA factors for delta_rule and gated_delta_rule, the fused kernels for kda."""
  for kind, fused in delta_module.FUSED_FACTORS.items():
    monkeypatch.setitem(delta_module.FUSED_FACTORS, kind, not fused)


@pytest.mark.parametrize("name", [pytest.param("delta_rule", marks=pytest.mark.slow),
                                  "gated_delta_rule", pytest.param("kda", marks=pytest.mark.slow)])
def test_swapped_factor_path_matches_xla(rng, name, swapped_factors):
  """Values against the oracle and every gradient against the xla path, with the factors from
  the source the op does not take by default; GQA, ragged T over two kernel chunks."""
  _check_against_oracle_and_xla(
      rng, name, make_inputs(rng, name, t=100, h=2, hk=1, gate_heads=2))


@pytest.mark.parametrize("name", ["gated_delta_rule", pytest.param("kda", marks=pytest.mark.slow)])
def test_swapped_factor_path_bf16_gradients_match_float64(rng, name, swapped_factors):
  """bf16 on the non-default factors: for kda the fused kernels' TF32 products in the inverse
  (rounded alike in interpret mode) stay within 1e-2."""
  _bf16_gradients_match_float64(rng, name)


@pytest.mark.parametrize("log_decay_range", [(-1.0, -0.01), (-40.0, -0.01)])
def test_blockwise_pairs_match_exact_pairs(rng, log_decay_range):
  """`_blockwise_decay_attention` (products only) against the exact secondary chunking: equal
  while the log-decays stay above the floor (-16); with log-decays down to -40 every pair weight
  it changes is below e^-16, and everything stays finite."""
  c, d = 64, 32
  q, k = randn(rng, 3, c, d), randn(rng, 3, c, d)
  log_decay = jnp.asarray(rng.uniform(*log_decay_range, (3, c, d)), jnp.float32)
  exact = _gated_chunk._channel_decay_attention(q, k, jnp.cumsum(log_decay, axis=-2), 16)
  blockwise = _gated_chunk._blockwise_decay_attention(q, k, log_decay)
  assert bool(jnp.all(jnp.isfinite(blockwise)))
  if log_decay_range[0] > _gated_chunk.BLOCKWISE_DECAY_FLOOR:
    assert_rel_close(blockwise, exact, F32_TOL, "blockwise pairs")
  else:
    assert_rel_close(blockwise, exact, 1e-5, "blockwise pairs, floored decays")


@pytest.mark.slow  # off by default; the pair matrices themselves are tested in the default run
@pytest.mark.parametrize("name", ["kda", "gated_delta_rule"])
def test_blockwise_pair_factor_path_matches_xla(rng, name, monkeypatch):
  """The pallas path with `BLOCKWISE_PAIRS` swapped from its default (per-channel XLA factors
  from the exact secondary chunking or from products only; the scalar decay ignores it): values
  against the oracle, every gradient against xla."""
  monkeypatch.setattr(_gated_chunk, "BLOCKWISE_PAIRS", not _gated_chunk.BLOCKWISE_PAIRS)
  _check_against_oracle_and_xla(
      rng, name, make_inputs(rng, name, t=100, h=2, hk=1, gate_heads=2))
