"""Tests of `segment_ids` (packed documents) on jaxchunk.ops.rat: every document starts with an empty
state and its own chunk 0, so a packed row gives what its documents give alone.

One packed batch of T = 37 tokens in chunks of 4, GQA (4 query heads, 2 kv heads), with document
starts inside a chunk, at a chunk edge, a 1-token document inside a row and one at its end, equal
ids on non-adjacent documents, with and without an initial state (whose length ends mid-chunk).
The reference and xla paths meet a float64 oracle run on each document alone; the Pallas path
(interpret mode on CPU) meets the xla path.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.rat import rat
from tests.ops.test_rat import inputs, oracle, random_state
from tests.ops.test_segment_ids_linear import documents
from tests.utils import alternating_segment_ids, assert_rel_close, randn

B, T, H, HK, D, C = 2, 37, 4, 2, 8, 4
CAPACITY = 5  # of the initial state
STARTS = ({5, 8, 9, 21, 30}, {1, 17, 36})  # document starts of rows 0 and 1


def segment_ids():
  """int32 [B, T]: ids 0 1 0 1 ... (equal ids on non-adjacent documents) changing at STARTS."""
  return alternating_segment_ids(STARTS, T)


def oracle_documents(q, k, v, f, ids, state):
  """The float64 oracle of test_rat run on each document alone (the initial state on a row's first
  document). Returns (o [B, T, H, D], per row the oracle state of its last document)."""
  o, finals = np.zeros(q.shape), []
  for row, docs in enumerate(documents(ids)):
    for start, end in docs:
      first = None if state is None or start else (
          tuple(np.asarray(x)[row:row + 1] for x in state[:4]) + (state.length,))
      piece = (np.asarray(x)[row:row + 1, start:end] for x in (q, k, v, f))
      o[row:row + 1, start:end], final = oracle(*piece, C, state=first)
    finals.append(final)
  return o, finals


@functools.partial(jax.jit, static_argnames="impl")
def run(q, k, v, f, ids, state, impl):
  """The packed call, jitted: segment_ids and the state's length traced."""
  return rat(q, k, v, f, chunk_size=C, initial_state=state, output_final_state=True,
             segment_ids=ids, block_size=8, impl=impl)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("length", [None, 6])
def test_match_documents_alone(rng, impl, length):
  q, k, v, f = inputs(rng, B, T, H, HK, D)
  state = None if length is None else random_state(rng, B, HK, D, CAPACITY, length)
  ids = segment_ids()
  o, final = run(q, k, v, f, ids, state, impl)
  o_ref, finals = oracle_documents(q, k, v, f, ids, state)
  assert_rel_close(o, o_ref, 1e-5, f"{impl} o")
  assert final.length.shape == (B,)
  for row, (k_sums, v_sums, k_run, v_run, doc_length) in enumerate(finals):
    assert int(final.length[row]) == doc_length
    n = k_sums.shape[1]
    assert_rel_close(final.k_chunks[row, :n], k_sums[0], 1e-5, f"{impl} row {row} k_chunks")
    assert_rel_close(final.v_chunks[row, :n], v_sums[0], 1e-5, f"{impl} row {row} v_chunks")
    np.testing.assert_array_equal(final.k_chunks[row, n:], 0)  # a document started in the row
    assert_rel_close(final.k_run[row], k_run[0], 1e-5, f"{impl} row {row} k_run")
    assert_rel_close(final.v_run[row], v_run[0], 1e-5, f"{impl} row {row} v_run")


def test_gradients_match_reference(rng):
  q, k, v, f = inputs(rng, B, T, H, HK, D)
  state = random_state(rng, B, HK, D, CAPACITY, 6)
  ids = segment_ids()
  cotangent = randn(rng, B, T, H, D)
  capacity = CAPACITY + -(-T // C)
  projections = (randn(rng, B, capacity, HK, D), randn(rng, B, capacity, HK, D),
                 randn(rng, B, HK, D), randn(rng, B, HK, D))

  def loss(impl):
    def fn(q, k, v, f, *state_arrays):
      o, final = run(q, k, v, f, ids, state._replace(
          **dict(zip(("k_chunks", "v_chunks", "k_run", "v_run"), state_arrays))), impl)
      return jnp.sum(o * cotangent) + sum(jnp.sum(x * p) for x, p in zip(final[:4], projections))
    return fn

  args = (q, k, v, f) + tuple(state[:4])
  argnums = tuple(range(len(args)))
  grads = {impl: jax.jit(jax.grad(loss(impl), argnums))(*args) for impl in ("reference", "xla")}
  names = ("q", "k", "v", "f", "k_chunks", "v_chunks", "k_run", "v_run")
  for name, g_ref, g_xla in zip(names, grads["reference"], grads["xla"]):
    assert np.linalg.norm(g_ref) > 0, f"d{name} is zero"
    assert_rel_close(g_xla, g_ref, 1e-5, f"d{name} xla vs reference")


@pytest.mark.parametrize("dtype,tol", [
    (jnp.float32, 1e-5), pytest.param(jnp.bfloat16, 1e-2, marks=pytest.mark.slow)])
def test_pallas_matches_xla(rng, dtype, tol):
  """The Pallas path (per-block aggregation kernels, the block carry in XLA, the attention kernel
  over each query's range of summary slots) against the xla path: outputs, final state and the
  gradients of all inputs and state arrays, at head_dim 64 (the kernels' smallest)."""
  d = 64
  q, k, v, f = inputs(rng, B, T, H, HK, d)
  state = random_state(rng, B, HK, d, CAPACITY, 6)
  ids = segment_ids()
  cotangent = randn(rng, B, T, H, d)

  def loss(impl):
    def fn(q, k, v, f, *state_arrays):
      given = state._replace(**dict(zip(("k_chunks", "v_chunks", "k_run", "v_run"), state_arrays)))
      o, final = run(*(x.astype(dtype) for x in (q, k, v, f)), ids, given, impl)
      value = jnp.sum(o.astype(jnp.float32) * cotangent) + sum(
          jnp.sum(jnp.sin(x)) for x in final[:4])
      return value, (o, final)
    return fn

  args = (q, k, v, f) + tuple(state[:4])
  argnums = tuple(range(len(args)))
  (_, (o, final)), grads = jax.value_and_grad(loss("pallas"), argnums, has_aux=True)(*args)
  (_, (o_ref, ref)), grads_ref = jax.value_and_grad(loss("xla"), argnums, has_aux=True)(*args)
  assert o.dtype == dtype
  assert_rel_close(o, o_ref, tol, "o")
  np.testing.assert_array_equal(final.length, ref.length)
  for name in ("k_chunks", "v_chunks", "k_run", "v_run"):
    assert_rel_close(getattr(final, name), getattr(ref, name), tol, name)
  names = ("q", "k", "v", "f", "k_chunks", "v_chunks", "k_run", "v_run")
  for name, g, g_ref in zip(names, grads, grads_ref):
    assert np.linalg.norm(g_ref) > 0, f"d{name} is zero"
    assert_rel_close(g, g_ref, tol, f"d{name}")


def test_one_document_per_row_equals_no_segment_ids(rng):
  q, k, v, f = inputs(rng, B, T, H, HK, D)
  state = random_state(rng, B, HK, D, CAPACITY, 6)
  o, final = run(q, k, v, f, np.full((B, T), 7, np.int32), state, "xla")
  o_ref, ref = rat(q, k, v, f, chunk_size=C, initial_state=state, output_final_state=True,
                   impl="xla")
  assert_rel_close(o, o_ref, 1e-6, "o")
  np.testing.assert_array_equal(final.length, [int(ref.length)] * B)
  for name in ("k_chunks", "v_chunks", "k_run", "v_run"):
    assert_rel_close(getattr(final, name), getattr(ref, name), 1e-6, name)


def test_rejects_bad_segment_ids(rng):
  q, k, v, f = inputs(rng, 1, 8, 4, 2, 8)
  ids = np.zeros((1, 8), np.int32)
  with pytest.raises(ValueError, match="segment_ids must have shape"):
    rat(q, k, v, f, segment_ids=ids[:, :7])
  with pytest.raises(ValueError, match="segment_ids must be an integer array"):
    rat(q, k, v, f, segment_ids=ids.astype(np.float32))
