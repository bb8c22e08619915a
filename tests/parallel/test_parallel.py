"""Sequence-parallel ops on 8 virtual CPU devices equal the single-device ops (values, grads)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.attention import attention
from jaxchunk.ops.delta_rule import delta_rule, gated_delta_rule
from jaxchunk.ops.gla import gla
from jaxchunk.ops.kda import kda
from jaxchunk.ops.mlstm import mlstm
from jaxchunk.ops.rat import rat
from jaxchunk.ops.simple_gla import simple_gla
from jaxchunk.parallel.api import SequenceParallel, choose_strategy, sequence_parallel_attention
from jaxchunk.parallel.linear_scan import sequence_parallel_linear
from jaxchunk.parallel.mesh import from_layout, layout_permutation, sequence_mesh, to_layout
from jaxchunk.parallel.rat import sequence_parallel_rat
from jaxchunk.parallel.ring import needed_shifts, ring_attention
from jaxchunk.parallel.ulysses import ulysses_attention
from tests.utils import alternating_segment_ids, assert_rel_close, randn

B, T, H, HK, D = 2, 64, 4, 2, 8
TOL = 1e-5
slow = pytest.mark.slow


def _fast_or_slow(params, fast):
  """pytest params, those not in `fast` marked slow (each case compiles several shard_maps)."""
  return [p if p in fast else pytest.param(*p, marks=slow) for p in params]


def _inputs(rng, heads=H, kv_heads=HK):
  q = randn(rng, B, T, heads, D)
  k = randn(rng, B, T, kv_heads, D)
  v = randn(rng, B, T, kv_heads, D)
  return q, k, v


def _segments(rng):
  """Packed documents: sorted random segment ids [B, T]."""
  return np.sort(rng.integers(0, 4, (B, T)), axis=1).astype(np.int32)


def _check_values_and_grads(single, parallel, args, rng, what):
  """single / parallel map args (natural order) to an output pytree; compares values and the
  gradients of a random projection of every output w.r.t. every arg."""
  out_ref = single(*args)
  out = jax.jit(parallel)(*args)
  for got, want in zip(jax.tree.leaves(out), jax.tree.leaves(out_ref)):
    assert_rel_close(got, want, TOL, f"{what} value")
  cts = [randn(rng, *x.shape) for x in jax.tree.leaves(out_ref)]
  loss = lambda fn: lambda *a: sum(jnp.sum(x * c) for x, c in zip(jax.tree.leaves(fn(*a)), cts))
  argnums = tuple(range(len(args)))
  grads_ref = jax.grad(loss(single), argnums)(*args)
  grads = jax.jit(jax.grad(loss(parallel), argnums))(*args)
  for i, (got, want) in enumerate(zip(jax.tree.leaves(grads), jax.tree.leaves(grads_ref))):
    assert_rel_close(got, want, TOL, f"{what} grad of arg {i}")


# ------------------------------------------------------------------------------------------------
# Layouts.


def test_layout_roundtrip_and_zigzag_placement(rng):
  x = jnp.asarray(randn(rng, B, 16, 3))
  z = to_layout(x, 4, "zigzag")
  np.testing.assert_array_equal(from_layout(z, 4, "zigzag"), x)
  # device 1 of 4 holds segments 1 and 6 (of 8 segments of 2 tokens)
  np.testing.assert_array_equal(layout_permutation(16, 4, "zigzag")[4:8], [2, 3, 12, 13])
  np.testing.assert_array_equal(layout_permutation(16, 4, "contiguous"), np.arange(16))


def test_layout_batch_permutes_rows_and_adds_positions(rng):
  sp = SequenceParallel(sequence_mesh(4))
  batch = {"inputs": rng.integers(0, 100, (2, 16)), "targets": rng.integers(0, 100, (2, 16))}
  out = sp.layout_batch(batch)
  perm = layout_permutation(16, 4, "zigzag")
  np.testing.assert_array_equal(out["inputs"], batch["inputs"][:, perm])
  np.testing.assert_array_equal(out["positions"][1], perm)


def test_layout_errors():
  with pytest.raises(ValueError, match="layout must be one of"):
    layout_permutation(16, 4, "striped")
  with pytest.raises(ValueError, match="multiple of 8"):
    layout_permutation(20, 4, "zigzag")


# ------------------------------------------------------------------------------------------------
# Attention.

ATTENTION_CASES = {
    "causal": dict(causal=True),
    "packed": dict(causal=True, segments=True),
    "window": dict(causal=True, window=9),
    "bidirectional_window": dict(causal=False, window=5),
}


def _attention_pair(run, n, layout, case, seg):
  opts = {key: val for key, val in case.items() if key != "segments"}
  single = lambda q, k, v: attention(q, k, v, segment_ids=seg, impl="xla", **opts)
  mesh = sequence_mesh(n)
  lay = functools.partial(to_layout, num_devices=n, layout=layout)

  def parallel(q, k, v):
    o = run(lay(q), lay(k), lay(v), mesh=mesh, layout=layout,
            segment_ids=None if seg is None else lay(seg), **opts)
    return from_layout(o, n, layout)

  return single, parallel


@pytest.mark.parametrize("layout,case", _fast_or_slow(
    [(lay, case) for lay in ("zigzag", "contiguous") for case in ATTENTION_CASES],
    fast=[("zigzag", "causal"), ("contiguous", "packed"), ("zigzag", "window")]))
def test_ring_attention_matches_single_device(rng, layout, case):
  q, k, v = _inputs(rng)
  seg = _segments(rng) if ATTENTION_CASES[case].get("segments") else None
  run = functools.partial(ring_attention, block_q=4, block_k=4)
  single, parallel = _attention_pair(run, 4, layout, ATTENTION_CASES[case], seg)
  _check_values_and_grads(single, parallel, (q, k, v), rng, f"ring {layout} {case}")


@slow
def test_ring_attention_eight_devices_causal_mha(rng):
  q, k, v = _inputs(rng, kv_heads=H)
  single, parallel = _attention_pair(ring_attention, 8, "zigzag", dict(causal=True), None)
  _check_values_and_grads(single, parallel, (q, k, v), rng, "ring n=8")


def test_ring_steps_skipped_for_windows():
  assert needed_shifts(8, "contiguous", 16, causal=True, window=None) == tuple(range(8))
  assert needed_shifts(8, "contiguous", 16, causal=True, window=17) == (0, 1)
  assert needed_shifts(8, "contiguous", 16, causal=True, window=18) == (0, 1, 2)
  assert needed_shifts(8, "zigzag", 16, causal=True, window=4) == (0, 1, 7)


@pytest.mark.parametrize("layout,case", _fast_or_slow(
    [("zigzag", "causal"), ("contiguous", "packed"), ("zigzag", "window")],
    fast=[("contiguous", "packed")]))
def test_ulysses_attention_matches_single_device(rng, layout, case):
  q, k, v = _inputs(rng)
  seg = _segments(rng) if ATTENTION_CASES[case].get("segments") else None
  single, parallel = _attention_pair(ulysses_attention, 4, layout, ATTENTION_CASES[case], seg)
  _check_values_and_grads(single, parallel, (q, k, v), rng, f"ulysses {layout} {case}")


@slow
def test_ulysses_repeats_kv_heads_not_divisible(rng):
  q, k, v = _inputs(rng, kv_heads=1)
  single, parallel = _attention_pair(ulysses_attention, 4, "zigzag", dict(causal=True), None)
  _check_values_and_grads(single, parallel, (q, k, v), rng, "ulysses kv_heads=1")


def test_strategy_choice_and_errors(rng):
  q, k, v = (jnp.asarray(x) for x in _inputs(rng))
  mesh = sequence_mesh(8)
  ref = attention(q, k, v, window=9, impl="xla")
  lay = lambda x: to_layout(x, 8, "zigzag")
  run = jax.jit(lambda q, k, v: sequence_parallel_attention(q, k, v, mesh=mesh, window=9))
  o = run(lay(q), lay(k), lay(v))  # auto -> ring: a windowed layer, and H=4 does not split over 8
  assert_rel_close(from_layout(o, 8, "zigzag"), ref, TOL, "auto")
  assert choose_strategy("auto", heads=8, num_devices=4, window=None) == "ulysses"
  assert choose_strategy("auto", heads=8, num_devices=4, window=128) == "ring"
  with pytest.raises(ValueError, match="divisible by the sequence axis size"):
    sequence_parallel_attention(q, k, v, mesh=mesh, strategy="ulysses")
  with pytest.raises(ValueError, match="strategy must be one of"):
    sequence_parallel_attention(q, k, v, mesh=mesh, strategy="tree")
  with pytest.raises(ValueError, match="multiple of 16"):
    ring_attention(q[:, :40], k[:, :40], v[:, :40], mesh=mesh)
  with pytest.raises(ValueError, match="heads of k/v"):
    ring_attention(q, randn(rng, B, T, 3, D), randn(rng, B, T, 3, D), mesh=mesh)


# ------------------------------------------------------------------------------------------------
# Linear ops.


def _linear_inputs(rng, op):
  q, k, v = _inputs(rng)
  k = k / np.linalg.norm(k, axis=-1, keepdims=True)
  log_decay = lambda *shape: -rng.uniform(0.02, 0.5, shape).astype(np.float32)
  beta = rng.uniform(0.1, 0.9, (B, T, H)).astype(np.float32)
  gates = {
      "simple_gla": (log_decay(B, T, H),),
      "gla": (log_decay(B, T, HK, D),),
      "delta_rule": (beta,),
      "gated_delta_rule": (log_decay(B, T, HK), beta),
      "kda": (log_decay(B, T, H, D), beta),
      "mlstm": (randn(rng, B, T, H), randn(rng, B, T, HK) + 2.0),
  }[op]
  if op == "mlstm":
    state = (randn(rng, B, H, D, D), randn(rng, B, H, D), randn(rng, B, H))
  else:
    state = randn(rng, B, H, D, D)
  return (q, k, v) + gates, state


SINGLE_OPS = {"simple_gla": simple_gla, "gla": gla, "delta_rule": delta_rule,
              "gated_delta_rule": gated_delta_rule, "kda": kda, "mlstm": mlstm}


@pytest.mark.parametrize("op,layout", _fast_or_slow(
    [(op, "contiguous") for op in SINGLE_OPS]
    + [("gla", "zigzag"), ("gated_delta_rule", "zigzag"), ("mlstm", "zigzag")],
    fast=[("simple_gla", "contiguous"), ("kda", "contiguous"), ("mlstm", "zigzag")]))
def test_linear_ops_match_single_device(rng, op, layout):
  inputs, state = _linear_inputs(rng, op)
  n = 4
  mesh = sequence_mesh(n)
  lay = functools.partial(to_layout, num_devices=n, layout=layout)

  def single(state, *xs):
    return SINGLE_OPS[op](*xs, initial_state=state, output_final_state=True, chunk_size=8,
                          impl="xla")

  def parallel(state, *xs):
    o, final = sequence_parallel_linear(op, *map(lay, xs), mesh=mesh, layout=layout,
                                        initial_state=state, output_final_state=True,
                                        chunk_size=8, impl="xla")
    return from_layout(o, n, layout), final

  _check_values_and_grads(single, parallel, (state,) + inputs, rng, f"{op} {layout}")


# Document starts (rows 0 and 1) at segment edges of both layouts on 4 devices (every 8 tokens),
# inside segments, at two neighbouring tokens and at the last token; ids repeat on documents that
# are not neighbours.
DOCUMENT_STARTS = ({8, 16, 17, 40, 63}, {5, 32, 48, 49})


@pytest.mark.parametrize("op,layout", _fast_or_slow(
    [(op, layout) for op in SINGLE_OPS for layout in ("contiguous", "zigzag")],
    fast=[("simple_gla", "contiguous"), ("gated_delta_rule", "zigzag"), ("mlstm", "contiguous")]))
def test_linear_ops_with_segment_ids_match_single_device(rng, op, layout):
  """Packed documents: a segment where a document starts (inside it or at its first token) drops
  the entering state, which corrects only the segment's first document."""
  inputs, state = _linear_inputs(rng, op)
  ids = alternating_segment_ids(DOCUMENT_STARTS, T)
  n = 4
  mesh = sequence_mesh(n)
  lay = functools.partial(to_layout, num_devices=n, layout=layout)

  def single(state, *xs):
    return SINGLE_OPS[op](*xs, initial_state=state, output_final_state=True, chunk_size=8,
                          segment_ids=ids, impl="xla")

  def parallel(state, *xs):
    o, final = sequence_parallel_linear(op, *map(lay, xs), mesh=mesh, layout=layout,
                                        initial_state=state, output_final_state=True,
                                        chunk_size=8, segment_ids=lay(ids), impl="xla")
    return from_layout(o, n, layout), final

  _check_values_and_grads(single, parallel, (state,) + inputs, rng, f"{op} {layout} documents")


def test_linear_without_initial_state_and_errors(rng):
  inputs, _ = _linear_inputs(rng, "simple_gla")
  mesh = sequence_mesh(8)
  o_ref, _ = simple_gla(*inputs, chunk_size=8, impl="xla")
  o, final = jax.jit(lambda *xs: sequence_parallel_linear("simple_gla", *xs, mesh=mesh,
                                                          chunk_size=8))(*inputs)
  assert final is None
  assert_rel_close(o, o_ref, TOL, "simple_gla n=8")
  with pytest.raises(ValueError, match="op must be one of"):
    sequence_parallel_linear("rwkv", *inputs, mesh=mesh)
  with pytest.raises(ValueError, match="log-decay"):
    sequence_parallel_linear("simple_gla", *inputs[:3], -inputs[3], mesh=mesh)
  with pytest.raises(ValueError, match="initial_state must have shape"):
    sequence_parallel_linear("simple_gla", *inputs, mesh=mesh, initial_state=randn(rng, B, H, D))


# ------------------------------------------------------------------------------------------------
# RAT.


@pytest.mark.parametrize("layout", ["zigzag", pytest.param("contiguous", marks=slow)])
def test_rat_matches_single_device(rng, layout):
  q, k, v = _inputs(rng)
  f = rng.uniform(0.1, 0.95, (B, T, HK, D)).astype(np.float32)
  n = 4
  mesh = sequence_mesh(n)
  lay = functools.partial(to_layout, num_devices=n, layout=layout)
  single = lambda q, k, v, f: rat(q, k, v, f, chunk_size=4, block_size=8, impl="xla")[0]

  def parallel(q, k, v, f):
    o = sequence_parallel_rat(lay(q), lay(k), lay(v), lay(f), mesh=mesh, layout=layout,
                              chunk_size=4, block_size=8, impl="xla")
    return from_layout(o, n, layout)

  _check_values_and_grads(single, parallel, (q, k, v, f), rng, f"rat {layout}")


@pytest.mark.parametrize("layout", ["zigzag", pytest.param("contiguous", marks=slow)])
def test_rat_with_segment_ids_matches_single_device(rng, layout):
  """Packed documents: each chunked from its own start, chunks straddling segment edges (a
  document starting at token 5 spans 5..8 across the edge at 8), starts at segment edges."""
  q, k, v = _inputs(rng)
  f = rng.uniform(0.1, 0.95, (B, T, HK, D)).astype(np.float32)
  ids = alternating_segment_ids(DOCUMENT_STARTS, T)
  n = 4
  mesh = sequence_mesh(n)
  lay = functools.partial(to_layout, num_devices=n, layout=layout)
  single = lambda q, k, v, f: rat(q, k, v, f, chunk_size=4, block_size=8, segment_ids=ids,
                                  impl="xla")[0]

  def parallel(q, k, v, f):
    o = sequence_parallel_rat(lay(q), lay(k), lay(v), lay(f), mesh=mesh, layout=layout,
                              chunk_size=4, block_size=8, segment_ids=lay(ids), impl="xla")
    return from_layout(o, n, layout)

  _check_values_and_grads(single, parallel, (q, k, v, f), rng, f"rat {layout} documents")


def test_rat_segments_must_be_whole_chunks(rng):
  q, k, v = _inputs(rng)
  f = rng.uniform(0.1, 0.95, (B, T, HK, D)).astype(np.float32)
  with pytest.raises(ValueError, match="multiple of 128"):
    sequence_parallel_rat(q, k, v, f, mesh=sequence_mesh(8), layout="zigzag", chunk_size=8)


# ------------------------------------------------------------------------------------------------
# A short training run.


@slow  # ~24 s on 2 cores; tests/parallel/test_sp_training.py runs the Trainer sequence-parallel
def test_sequence_parallel_training_run_matches_single_device(rng):
  """Three SGD steps of a tiny attention + gated-DeltaNet mixer on zig-zag sharded rows."""
  d_model = 16
  params = {name: jnp.asarray(randn(rng, d_model, H * D, scale=0.25))
            for name in ("wq", "wk", "wv", "wo", "wa")}
  params["wg"] = jnp.asarray(randn(rng, d_model, H, scale=0.25))
  x = jnp.asarray(randn(rng, B, T, d_model))
  target = jnp.asarray(randn(rng, B, T, d_model))
  n = 4
  sp = SequenceParallel(sequence_mesh(n), layout="zigzag", strategy="ring")

  def loss(params, x, target, parallel: bool):
    heads = lambda w: (x @ w).reshape(B, T, H, D)
    q, k, v = heads(params["wq"]), heads(params["wk"]), heads(params["wv"])
    k_unit = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    g = -jax.nn.softplus(x @ params["wg"])
    beta = jax.nn.sigmoid(x @ params["wg"])
    if parallel:
      a = sp.attention(q, k, v)
      r, _ = sp.linear("gated_delta_rule", q, k_unit, v, g, beta, chunk_size=8)
    else:
      a = attention(q, k, v, impl="xla")
      r, _ = gated_delta_rule(q, k_unit, v, g, beta, chunk_size=8, impl="xla")
    y = (a + r).reshape(B, T, H * D) @ params["wo"].T
    return jnp.mean((y - target) ** 2)

  def train(params, x, target, parallel):
    step = jax.jit(lambda p: jax.tree.map(lambda w, g: w - 0.1 * g, p,
                                          jax.grad(loss)(p, x, target, parallel)))
    for _ in range(3):
      params = step(params)
    return params

  single = train(params, x, target, False)
  lay = lambda a: to_layout(a, n, "zigzag")
  parallel = train(params, lay(x), lay(target), True)
  for name in params:
    assert_rel_close(parallel[name], single[name], TOL, name)
