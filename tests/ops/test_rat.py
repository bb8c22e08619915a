"""Tests for jaxchunk.ops.rat against a float64 NumPy oracle written token by token."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.rat import RATState, rat, rat_init_state, rat_step
from jaxchunk.ops._common import pallas_interpret
from pallas_kernels.gpu import rat_decode as rat_decode_kernel
from pallas_kernels.gpu.h100_lowering import lower_for_h100
from tests.utils import assert_rel_close, randn


def oracle(q, k, v, f, chunk_size, *, scale=None, state=None):
  """Float64 RAT, one token at a time.

  `state` is None or (k_chunks [B,N,Hk,D], v_chunks, k_run [B,Hk,D], v_run, length).
  Returns (o [B,T,H,D], (k_summaries [B,n,Hk,D], v_summaries, k_run, v_run, length)) where n is the
  number of completed chunks.
  """
  q, k, v, f = (np.asarray(x, np.float64) for x in (q, k, v, f))
  b, t, h, d = q.shape
  hk = k.shape[2]
  scale = d ** -0.5 if scale is None else scale
  if state is None:
    k_sums, v_sums, k_run, v_run, length = [], [], np.zeros((b, hk, d)), np.zeros((b, hk, d)), 0
  else:
    k_chunks, v_chunks, k_run, v_run, length = (np.asarray(x, np.float64) for x in state)
    length = int(length)
    k_sums = [k_chunks[:, j] for j in range(length // chunk_size)]
    v_sums = [v_chunks[:, j] for j in range(length // chunk_size)]
  o = np.zeros((b, t, h, d))
  for i in range(t):
    keep = 0.0 if length % chunk_size == 0 else 1.0
    k_run = keep * f[:, i] * k_run + (1 - f[:, i]) * k[:, i]
    v_run = keep * f[:, i] * v_run + (1 - f[:, i]) * v[:, i]
    keys = np.repeat(np.stack(k_sums + [k_run], 1), h // hk, axis=2)  # [B, n + 1, H, D]
    values = np.repeat(np.stack(v_sums + [v_run], 1), h // hk, axis=2)
    s = np.einsum("bhd,bnhd->bhn", q[:, i], keys) * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    o[:, i] = np.einsum("bhn,bnhd->bhd", p / p.sum(-1, keepdims=True), values)
    length += 1
    if length % chunk_size == 0:
      k_sums.append(k_run)
      v_sums.append(v_run)
  stack = lambda xs: np.stack(xs, 1) if xs else np.zeros((b, 0, hk, d))
  return o, (stack(k_sums), stack(v_sums), k_run, v_run, length)


def inputs(rng, b, t, h, hk, d):
  """Random q, k, v [B,T,*,D] and gates f in [0.05, 0.95]."""
  f = rng.uniform(0.05, 0.95, (b, t, hk, d)).astype(np.float32)
  return randn(rng, b, t, h, d), randn(rng, b, t, hk, d), randn(rng, b, t, hk, d), f


def random_state(rng, b, hk, d, capacity, length):
  """A RATState with random summaries and running aggregates (slots past the length are random)."""
  return RATState(randn(rng, b, capacity, hk, d), randn(rng, b, capacity, hk, d),
                  randn(rng, b, hk, d), randn(rng, b, hk, d), jnp.asarray(length, jnp.int32))


def assert_state_close(state, ref, tol, what):
  """Compares a RATState with an oracle state (only the completed summaries are meaningful)."""
  n = ref[0].shape[1]
  assert int(state.length) == ref[4], f"{what}: length {int(state.length)} != {ref[4]}"
  assert state.k_chunks.shape[1] >= n, f"{what}: capacity {state.k_chunks.shape[1]} < {n}"
  if n:
    assert_rel_close(state.k_chunks[:, :n], ref[0], tol, f"{what} k_chunks")
    assert_rel_close(state.v_chunks[:, :n], ref[1], tol, f"{what} v_chunks")
  assert_rel_close(state.k_run, ref[2], tol, f"{what} k_run")
  assert_rel_close(state.v_run, ref[3], tol, f"{what} v_run")


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("chunk_size,t,h,hk,block_size", [
    (4, 37, 2, 2, 8),     # several query and summary blocks, T not a multiple of the chunk
    (8, 64, 4, 2, 128),   # GQA, T a multiple of the chunk, one block
    (16, 45, 4, 1, 16),   # multi-query, one chunk per query block
    (16, 11, 2, 2, 128),  # shorter than one chunk
])
def test_matches_oracle(rng, impl, chunk_size, t, h, hk, block_size):
  q, k, v, f = inputs(rng, 2, t, h, hk, 8)
  o, state = rat(q, k, v, f, chunk_size=chunk_size, output_final_state=True, block_size=block_size,
                 impl=impl)
  ref_o, ref_state = oracle(q, k, v, f, chunk_size)
  assert o.dtype == jnp.float32 and state.k_chunks.dtype == jnp.float32
  assert state.k_chunks.shape == (2, t // chunk_size, hk, 8)
  assert_rel_close(o, ref_o, 1e-5, f"{impl} o")
  assert_state_close(state, ref_state, 1e-5, impl)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("length", [13, 16])
def test_initial_state_matches_oracle(rng, impl, length):
  chunk_size, capacity = 8, 3
  q, k, v, f = inputs(rng, 2, 30, 4, 2, 8)
  init = random_state(rng, 2, 2, 8, capacity, length)
  o, state = rat(q, k, v, f, chunk_size=chunk_size, initial_state=init, output_final_state=True,
                 scale=0.3, block_size=16, impl=impl)
  ref_o, ref_state = oracle(q, k, v, f, chunk_size, scale=0.3, state=init)
  assert state.k_chunks.shape[1] == capacity + 4  # N0 + ceil(T / C) without max_chunks
  assert_rel_close(o, ref_o, 1e-5, f"{impl} o")
  assert_state_close(state, ref_state, 1e-5, impl)


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_bfloat16_inputs(rng, impl):
  q, k, v, f = inputs(rng, 2, 27, 4, 2, 16)
  q, k, v, f = (jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, f))
  o, state = rat(q, k, v, f, chunk_size=4, output_final_state=True, impl=impl)
  assert o.dtype == jnp.bfloat16 and state.k_run.dtype == jnp.float32
  assert_rel_close(o, oracle(q, k, v, f, 4)[0], 1e-2, f"{impl} bf16")


def loss_fn(impl, chunk_size, cotangent, projections, *, length, block_size):
  """sum(o * cotangent) + <final state, projections> as a function of every differentiable input.

  The initial state holds `length` tokens; its arrays are the loss's last four arguments.
  """
  def loss(q, k, v, f, k_chunks, v_chunks, k_run, v_run):
    init = RATState(k_chunks, v_chunks, k_run, v_run, jnp.asarray(length, jnp.int32))
    o, state = rat(q, k, v, f, chunk_size=chunk_size, initial_state=init, output_final_state=True,
                   block_size=block_size, impl=impl)
    total = jnp.sum(o * cotangent)
    for x, p in zip(state[:4], projections):
      total += jnp.sum(x * p)
    return total
  return loss


def test_gradients(rng):
  chunk_size, capacity = 4, 2
  q, k, v, f = inputs(rng, 1, 21, 4, 2, 8)
  init = random_state(rng, 1, 2, 8, capacity, 11)
  args = (q, k, v, f) + tuple(init[:4])
  cotangent = randn(rng, *q.shape)
  final_capacity = capacity + 6
  projections = (randn(rng, 1, final_capacity, 2, 8), randn(rng, 1, final_capacity, 2, 8),
                 randn(rng, 1, 2, 8), randn(rng, 1, 2, 8))
  argnums = tuple(range(len(args)))
  grads = {impl: jax.jit(jax.grad(loss_fn(impl, chunk_size, cotangent, projections, length=11,
                                          block_size=8), argnums))(*args)
           for impl in ("reference", "xla")}
  with jax.enable_x64(True):
    to64 = lambda x: jnp.asarray(x, jnp.float64)
    loss64 = loss_fn("reference", chunk_size, to64(cotangent), tuple(map(to64, projections)),
                     length=11, block_size=8)
    grads64 = jax.jit(jax.grad(loss64, argnums))(*map(to64, args))
  assert grads64[0].dtype == np.float64
  names = ("q", "k", "v", "f", "k_chunks", "v_chunks", "k_run", "v_run")
  for name, g_ref, g_xla, g_64 in zip(names, grads["reference"], grads["xla"], grads64):
    assert np.linalg.norm(g_64) > 0, f"d{name} is zero"
    assert_rel_close(g_xla, g_ref, 1e-5, f"d{name} xla vs reference")
    assert_rel_close(g_ref, g_64, 1e-5, f"d{name} reference vs float64")
    assert_rel_close(g_xla, g_64, 1e-5, f"d{name} xla vs float64")


def test_float64_reference_matches_oracle(rng):
  q, k, v, f = inputs(rng, 1, 19, 2, 1, 8)
  with jax.enable_x64(True):
    o = rat(*(jnp.asarray(x, jnp.float64) for x in (q, k, v, f)), chunk_size=4,
            impl="reference")[0]
    assert o.dtype == jnp.float64
  assert_rel_close(o, oracle(q, k, v, f, 4)[0], 1e-12, "float64 reference")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_prefill_then_decode(rng, impl):
  chunk_size, t1, t = 4, 6, 15
  q, k, v, f = inputs(rng, 2, t, 4, 2, 8)
  full = rat(q, k, v, f, chunk_size=chunk_size, impl="reference")[0]
  o1, state = rat(q[:, :t1], k[:, :t1], v[:, :t1], f[:, :t1], chunk_size=chunk_size,
                  output_final_state=True, max_chunks=t // chunk_size, impl=impl)
  step = jax.jit(rat_step, static_argnames="chunk_size")
  outs = [o1]
  for i in range(t1, t):
    o, state = step(q[:, i], k[:, i], v[:, i], f[:, i], state, chunk_size=chunk_size)
    outs.append(o[:, None])
  assert_rel_close(jnp.concatenate(outs, 1), full, 1e-5, f"{impl} prefill + steps")
  assert_state_close(state, oracle(q, k, v, f, chunk_size)[1], 1e-5, "decoded state")


def test_decode_from_empty_state(rng):
  q, k, v, f = inputs(rng, 2, 9, 2, 2, 8)
  ref = oracle(q, k, v, f, 3)[0]
  o, state = rat_step(q[:, 0], k[:, 0], v[:, 0], f[:, 0], None, chunk_size=3)
  assert state.k_chunks.shape == (2, 0, 2, 8) and int(state.length) == 1
  assert_rel_close(o, ref[:, 0], 1e-5, "first step from None")
  step = jax.jit(rat_step, static_argnames="chunk_size")
  state, outs = rat_init_state(2, 2, 8, 3), []
  for i in range(9):
    o, state = step(q[:, i], k[:, i], v[:, i], f[:, i], state, chunk_size=3)
    outs.append(o)
  assert_rel_close(jnp.stack(outs, 1), ref, 1e-5, "steps from rat_init_state")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_bfloat16_summary_storage(rng, impl):
  """A state whose summaries are stored in bf16 keeps that dtype through prefill and decode, and
  the outputs match the float32 oracle to bf16 rounding of the summaries."""
  chunk_size, t1, t = 4, 6, 15
  q, k, v, f = inputs(rng, 2, t, 4, 2, 64)  # head dim 64: the smallest the kernel takes
  state = rat_init_state(2, 2, 64, t // chunk_size, dtype=jnp.bfloat16)
  o1, state = rat(q[:, :t1], k[:, :t1], v[:, :t1], f[:, :t1], chunk_size=chunk_size,
                  initial_state=state, output_final_state=True, impl=impl)
  assert state.k_chunks.dtype == jnp.bfloat16 and state.k_run.dtype == jnp.float32
  step = jax.jit(rat_step, static_argnames="chunk_size")
  outs = [o1]
  for i in range(t1, t):
    o, state = step(q[:, i], k[:, i], v[:, i], f[:, i], state, chunk_size=chunk_size)
    outs.append(o[:, None])
  assert state.k_chunks.dtype == jnp.bfloat16 and state.v_chunks.dtype == jnp.bfloat16
  assert_rel_close(jnp.concatenate(outs, 1), oracle(q, k, v, f, chunk_size)[0], 1e-2,
                   f"{impl} with bf16 summaries")
  with pytest.raises(ValueError, match="dtype"):
    rat_init_state(1, 1, 8, 2, dtype=jnp.int32)


@pytest.mark.parametrize("summary_dtype", [jnp.float32, jnp.bfloat16])
def test_pallas_decode_steps_match_xla(rng, summary_dtype):
  """rat_step(impl="pallas") (the decode kernel over the visible summaries, its softmax seeded
  with the running aggregate) equals the plain step from an empty state on, with GQA."""
  chunk_size, t = 4, 11
  q, k, v, f = inputs(rng, 2, t, 4, 2, 64)
  states = {impl: rat_init_state(2, 2, 64, 3, dtype=summary_dtype) for impl in ("xla", "pallas")}
  step = jax.jit(rat_step, static_argnames=("chunk_size", "impl"))
  for i in range(t):
    outs = {}
    for impl in states:
      outs[impl], states[impl] = step(q[:, i], k[:, i], v[:, i], f[:, i], states[impl],
                                      chunk_size=chunk_size, impl=impl)
    assert_rel_close(outs["pallas"], outs["xla"], 1e-5, f"step {i}")
  for a, b in zip(states["pallas"], states["xla"]):
    assert a.dtype == b.dtype
    assert_rel_close(a, b, 1e-6, "state")


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_decode_with_per_row_lengths(rng, impl):
  """A state with one length per row (rows at different positions, some completing a chunk during
  the steps) decodes each row as the oracle continues that row alone."""
  chunk_size, steps, capacity = 4, 3, 6
  lengths = [0, 3, 7, 13, 21]  # empty, chunk completions at steps 1 and 2, the last chunk
  b, h, hk, d = len(lengths), 4, 2, 64
  q, k, v, f = inputs(rng, b, steps, h, hk, d)
  init = random_state(rng, b, hk, d, capacity, lengths)
  state, outs = init, []
  step = jax.jit(rat_step, static_argnames=("chunk_size", "impl"))
  for i in range(steps):
    o, state = step(q[:, i], k[:, i], v[:, i], f[:, i], state, chunk_size=chunk_size, impl=impl)
    outs.append(o)
  outs = jnp.stack(outs, 1)
  np.testing.assert_array_equal(state.length, np.asarray(lengths) + steps)
  for row, length in enumerate(lengths):
    one = lambda x: np.asarray(x)[row:row + 1]
    ref_o, ref_state = oracle(*(one(x) for x in (q, k, v, f)), chunk_size,
                              state=tuple(one(x) for x in init[:4]) + (length,))
    assert_rel_close(outs[row:row + 1], ref_o, 1e-5, f"{impl} row {row} outputs")
    row_state = RATState(*(one(x) for x in state[:4]), state.length[row])
    assert_state_close(row_state, ref_state, 1e-6, f"{impl} row {row} state")


def test_decode_kernel_splits(rng):
  """The decode kernel's split-K (several programs per head, merged by log-sum-exp) and small
  summary blocks give the plain step's outputs, for rows with 0 .. N visible summaries."""
  b, h, hk, d, n = 4, 4, 2, 64, 37
  q = randn(rng, b, h, d)
  k_run, v_run = randn(rng, b, hk, d), randn(rng, b, hk, d)
  k_chunks, v_chunks = randn(rng, b, n, hk, d), randn(rng, b, n, hk, d)
  num_chunks = jnp.asarray([0, 5, 36, 40], jnp.int32)  # 40 > N: clipped to all 37
  ref = []
  for row in range(b):
    m = min(int(num_chunks[row]), n)
    keys = np.concatenate([np.asarray(k_chunks[row, :m]), np.asarray(k_run[row])[None]], 0)
    values = np.concatenate([np.asarray(v_chunks[row, :m]), np.asarray(v_run[row])[None]], 0)
    keys, values = (np.repeat(x, h // hk, axis=1).astype(np.float64) for x in (keys, values))
    s = np.einsum("hd,nhd->hn", np.asarray(q[row], np.float64), keys) / 8.0
    p = np.exp(s - s.max(-1, keepdims=True))
    ref.append(np.einsum("hn,nhd->hd", p / p.sum(-1, keepdims=True), values))
  for num_splits, block_n in ((1, 16), (3, 16), (8, 16), (2, 64)):
    o = rat_decode_kernel.rat_decode_attention(q, k_run, v_run, k_chunks, v_chunks, num_chunks,
                                               scale=1 / 8.0, num_splits=num_splits,
                                               block_n=block_n, interpret=pallas_interpret())
    assert_rel_close(o, np.stack(ref), 1e-5, f"splits {num_splits} block {block_n}")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_two_piece_prefill(rng, impl):
  chunk_size, split = 8, 13
  q, k, v, f = inputs(rng, 2, 30, 4, 2, 8)
  whole, whole_state = rat(q, k, v, f, chunk_size=chunk_size, output_final_state=True, impl=impl)
  o1, state = rat(q[:, :split], k[:, :split], v[:, :split], f[:, :split], chunk_size=chunk_size,
                  output_final_state=True, impl=impl)
  o2, state = rat(q[:, split:], k[:, split:], v[:, split:], f[:, split:], chunk_size=chunk_size,
                  initial_state=state, output_final_state=True, impl=impl)
  assert_rel_close(jnp.concatenate([o1, o2], 1), whole, 1e-5, f"{impl} two pieces")
  n = whole_state.k_chunks.shape[1]
  assert int(state.length) == 30
  assert_rel_close(state.k_chunks[:, :n], whole_state.k_chunks, 1e-5, "k_chunks")
  assert_rel_close(state.v_run, whole_state.v_run, 1e-5, "v_run")


def test_jit_with_traced_length(rng):
  chunk_size = 4
  q, k, v, f = inputs(rng, 2, 18, 2, 2, 8)

  @jax.jit
  def continue_from(state):
    return rat(q, k, v, f, chunk_size=chunk_size, initial_state=state, output_final_state=True,
               max_chunks=8, block_size=8)

  for length in (5, 8):  # one compilation serves both lengths
    init = random_state(rng, 2, 2, 8, 3, length)
    o, state = continue_from(init)
    ref_o, ref_state = oracle(q, k, v, f, chunk_size, state=init)
    assert_rel_close(o, ref_o, 1e-5, f"jit o (length {length})")
    assert_state_close(state, ref_state, 1e-5, f"jit state (length {length})")
  assert continue_from._cache_size() == 1


def test_decode_loop_in_scan(rng):
  chunk_size, t1, t = 4, 5, 14
  q, k, v, f = inputs(rng, 1, t, 2, 1, 8)
  _, state = rat(q[:, :t1], k[:, :t1], v[:, :t1], f[:, :t1], chunk_size=chunk_size,
                 output_final_state=True, max_chunks=4)

  @jax.jit
  def decode(state, tokens):
    step = lambda s, x: rat_step(*x, s, chunk_size=chunk_size)[::-1]
    return jax.lax.scan(step, state, tokens)

  tokens = tuple(jnp.moveaxis(x[:, t1:], 1, 0) for x in (q, k, v, f))
  state, outs = decode(state, tokens)
  assert_rel_close(jnp.moveaxis(outs, 0, 1), oracle(q, k, v, f, chunk_size)[0][:, t1:], 1e-5,
                   "scanned decode")


def test_vmap(rng):
  q, k, v, f = inputs(rng, 3, 10, 2, 2, 8)
  batched = jax.vmap(lambda *x: rat(*(y[None] for y in x), chunk_size=4)[0][0])(q, k, v, f)
  assert_rel_close(batched, oracle(q, k, v, f, 4)[0], 1e-5, "vmap")


def test_bad_arguments(rng):
  q, k, v, f = inputs(rng, 1, 8, 4, 2, 8)
  with pytest.raises(ValueError, match="q must have shape"):
    rat(q[0], k, v, f)
  with pytest.raises(ValueError, match="must divide the heads of q"):
    rat(q[:, :, :3], k, v, f)
  with pytest.raises(ValueError, match="v must have shape"):
    rat(q, k, v[..., :4], f)
  with pytest.raises(ValueError, match="f must have shape"):
    rat(q, k, v, f[:, :, :1])
  with pytest.raises(ValueError, match="f is a forget gate"):
    rat(q, k, v, f + 1)
  with pytest.raises(ValueError, match="chunk_size must be a positive int"):
    rat(q, k, v, f, chunk_size=0)
  bad_state = rat_init_state(1, 4, 8, 2)
  with pytest.raises(ValueError, match=r"initial_state.k_chunks must have shape"):
    rat(q, k, v, f, initial_state=bad_state)
  full = rat_init_state(1, 2, 8, 2)._replace(length=jnp.asarray(11, jnp.int32))
  with pytest.raises(ValueError, match="pass a larger max_chunks"):
    rat(q, k, v, f, chunk_size=4, initial_state=full, max_chunks=2)
  with pytest.raises(ValueError, match="pass a larger max_chunks"):
    rat_step(q[:, 0], k[:, 0], v[:, 0], f[:, 0], full, chunk_size=4)
  with pytest.raises(ValueError, match=r"state.k_run must have shape"):
    rat_step(q[:, 0], k[:, 0], v[:, 0], f[:, 0], full._replace(k_run=jnp.zeros((1, 2, 4))))
  with pytest.raises(ValueError, match="k must have shape"):
    rat_step(q[:, 0], k[:, 0, :, :4], v[:, 0], f[:, 0], None)
  with pytest.raises(NotImplementedError):
    rat(q, k, v, f, impl="pallas")


@pytest.mark.parametrize("d,q_dtype,summary_dtype,num_splits", [
    (64, jnp.float32, jnp.bfloat16, 1), (128, jnp.bfloat16, jnp.float32, 3),
    (256, jnp.float16, jnp.float16, 2)])
def test_decode_kernel_lowers_for_gpu(d, q_dtype, summary_dtype, num_splits):
  """The decode kernel lowers through Triton for an H100 (run on CPU: IR generation only)."""
  q = jnp.zeros((2, 4, d), q_dtype)
  run = jnp.zeros((2, 2, d), jnp.float32)
  chunks = jnp.zeros((2, 37, 2, d), summary_dtype)
  text = lower_for_h100(lambda *xs: rat_decode_kernel.rat_decode_attention(
      *xs, scale=0.1, num_splits=num_splits), q, run, run, chunks, chunks,
      jnp.zeros((2,), jnp.int32)).as_text()
  assert "rat_decode_attention" in text
