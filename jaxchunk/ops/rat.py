"""RAT: recurrence inside chunks, softmax attention across chunks (Wei et al., 2025).

The sequence is cut into chunks of C = `chunk_size` tokens. Inside a chunk, keys and values are
aggregated by an elementwise gated recurrence that restarts at every chunk start,

  k~_t = f_t * k~_{t-1} + (1 - f_t) * k_t,    v~_t = f_t * v~_{t-1} + (1 - f_t) * v_t,

(k~ = v~ = 0 before a chunk's first token; the same gate f in (0, 1) for keys and values). The
"summary" of chunk c is the aggregate at its last token. Query t of chunk c then attends with one
softmax over c + 1 keys: the summaries of chunks 0..c-1 and its own running aggregate k~_t / v~_t,

  o_t = softmax_j(scale * q_t . K_j) V_j,   K = [summary_0, ..., summary_{c-1}, k~_t] (same for V).

Paths:
- "reference": a token-by-token `lax.scan` of `rat_step` (the definition), O(T * T / C).
- "xla": the aggregates by a `lax.associative_scan` inside each chunk; then blockwise attention of
  query blocks against blocks of chunk summaries with an online softmax (running max / sum), the
  own-chunk running term seeding each query's softmax. The query-block body and the summary-block
  body are `jax.checkpoint`ed, so memory stays O(T) in the forward and backward pass; no [T, T / C]
  array is ever built.
- "pallas": the aggregation by the Pallas kernels of `pallas_kernels.gpu.rat_aggregate` (one pass
  over k, v, f in their own dtype, float32 arithmetic, aggregates written in the attention's operand
  dtype and chunk summaries in float32), then the attention by the flash-attention-style Pallas
  kernel of `pallas_kernels.gpu.rat` (bf16 or float32 operands, head_dim 64 or 128); both have
  forward and backward kernels under a custom VJP. "auto" picks it on GPU; on CPU it runs in
  interpret mode.

Decode / continuation state: `RATState`, holding the summaries of completed chunks in a buffer of
fixed capacity N (static shapes under jit), the running aggregate of the chunk in progress and the
number of tokens seen. A state whose length is not a multiple of C continues the partial chunk (also
for a traced length): internally the new tokens are placed at offset length % C of a chunk-aligned
buffer whose slot just before them re-injects the running aggregate (gate 0, input = aggregate).

Packed documents (`segment_ids`): each document starts with an empty state and its own chunk 0, so
a packed row gives what its documents give alone. The reference path empties a row's state at each
document start; the xla and pallas paths (`_rat_xla_documents`) scan C-token blocks of the row
with restarts at the documents' chunk starts, carry the aggregate into chunks that straddle two
blocks, and mask each query to the summaries of its own document.

Comparison with the public code (CLAIRE-Labo/RAT, `RAT`/`RATSlow` layers and their cache):
- the operation is the same: `pscan(g, (1 - g) * x)` inside chunks, a block-causal mask
  `q_idx // chunk_size > kv_idx` over chunk summaries, and the own running term merged into the same
  softmax by its log-sum-exp (`merge_last_token`).
- there, q and k are shared by `ngroups` head groups while v and the gate have one per head; here
  k, v and f share Hk kv heads (GQA, Hk dividing H). The public layout is Hk = H with k repeated.
- the layer's input norm, projections, sigmoid gate with bias, output gate and inter-chunk RoPE are
  not part of this op. Note that the public code rotates the *aggregated* keys (by chunk index, the
  same rotation for every token of a chunk): since f is per channel, rotating k before this op gives
  the same result only when f is equal on the two channels of every rotary pair.
- the public code stores aggregates in bfloat16 and its training forward needs T % C == 0; here the
  aggregates and states are float32 and any T (and any starting length) is accepted.

Compute dtype: float32, or float64 when an input already is float64 (x64 enabled), so that the
reference path can serve as a float64 oracle.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxchunk.ops._common import (check_qkv, check_rank, check_segment_ids, check_shape,
                                  compute_dtype, default_scale, document_starts, is_traced,
                                  pallas_interpret, reset_state, resolve_impl)
from pallas_kernels.gpu import rat as rat_kernel
from pallas_kernels.gpu import rat_aggregate
from pallas_kernels.gpu import rat_decode as rat_decode_kernel

_HIGHEST = lax.Precision.HIGHEST
_NEVER = np.iinfo(np.int32).max  # chunk index of a summary slot no query may see
_NARROW = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))  # summary storage dtypes kept as is
_SUMMARY_DTYPES = (jnp.dtype(jnp.float32),) + _NARROW


class RATState(NamedTuple):
  """Decode / continuation state of `rat`.

  Attributes:
    k_chunks: [B, N, Hk, D] summaries (final aggregated keys) of completed chunks; slot n holds
      chunk n, slots n >= length // chunk_size are ignored.
    v_chunks: [B, N, Hk, D] the same for values.
    k_run: [B, Hk, D] aggregated key at the last token seen (ignored when length % chunk_size == 0,
      since the next token starts a new chunk).
    v_run: [B, Hk, D] the same for values.
    length: int32 scalar array, the number of tokens seen.
  """
  k_chunks: jax.Array
  v_chunks: jax.Array
  k_run: jax.Array
  v_run: jax.Array
  length: jax.Array


def rat_init_state(batch: int, kv_heads: int, head_dim: int, max_chunks: int,
                   dtype=jnp.float32) -> RATState:
  """An empty `RATState` (no tokens seen) with room for `max_chunks` chunk summaries.

  `dtype` is the storage dtype of the summaries (float32, or bfloat16 / float16 to halve the bytes a
  decode step reads, as the Pallas training path already attends to bf16 summaries); the running
  aggregates stay float32, and every op computes in float32 whatever the storage dtype.
  """
  if max_chunks < 0:
    raise ValueError(f"max_chunks must be >= 0, got {max_chunks}")
  if jnp.dtype(dtype) not in _SUMMARY_DTYPES:
    raise ValueError(f"dtype must be one of {[d.name for d in _SUMMARY_DTYPES]}, got {dtype}")
  chunks = jnp.zeros((batch, max_chunks, kv_heads, head_dim), dtype)
  run = jnp.zeros((batch, kv_heads, head_dim), jnp.float32)
  return RATState(chunks, chunks, run, run, jnp.zeros((), jnp.int32))



def _einsum(spec, *operands):
  return jnp.einsum(spec, *operands, precision=_HIGHEST)


def _check_chunk_size(chunk_size) -> None:
  if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def _check_gate_range(f) -> None:
  """Raises a ValueError if a concrete (non-traced) gate has an entry outside [0, 1]."""
  if is_traced(f):
    return
  f = np.asarray(f, np.float32)
  if f.size and (f.min() < 0 or f.max() > 1):
    raise ValueError(f"f is a forget gate and must lie in [0, 1], got range "
                     f"[{float(f.min())}, {float(f.max())}]")


def _check_state(state, b: int, hk: int, d: int, name: str, per_row: bool = False) -> int:
  """Validates a `RATState` for batch b, Hk kv heads and head_dim d (with `per_row`, its length may
  also be int32 [b], one per row). Returns its capacity N."""
  if not isinstance(state, tuple) or len(state) != len(RATState._fields):
    raise ValueError(f"{name} must be a RATState(k_chunks, v_chunks, k_run, v_run, length), "
                     f"got {type(state).__name__}")
  k_chunks, v_chunks, k_run, v_run, length = state
  check_rank(k_chunks, 4, f"{name}.k_chunks", f"[{b}, max_chunks, {hk}, {d}]")
  n = k_chunks.shape[1]
  layout = "[batch, max_chunks, kv_heads, head_dim]"
  check_shape(k_chunks, (b, n, hk, d), f"{name}.k_chunks", layout)
  check_shape(v_chunks, (b, n, hk, d), f"{name}.v_chunks", layout)
  check_shape(k_run, (b, hk, d), f"{name}.k_run", "[batch, kv_heads, head_dim]")
  check_shape(v_run, (b, hk, d), f"{name}.v_run", "[batch, kv_heads, head_dim]")
  shapes = [()] + ([(b,)] if per_row else [])
  if jnp.shape(length) not in shapes or not jnp.issubdtype(jnp.result_type(length), jnp.integer):
    raise ValueError(f"{name}.length must be an integer array of shape "
                     f"{' or '.join(map(str, shapes))}, got shape {jnp.shape(length)} dtype "
                     f"{jnp.result_type(length)}")
  return n


def _check_capacity(length, new_tokens: int, chunk_size: int, capacity: int, name: str) -> None:
  """When `length` is concrete, raises unless `capacity` summaries fit length + new_tokens tokens."""
  if is_traced(length):
    return
  lengths = np.asarray(length).reshape(-1)
  if not lengths.size:
    return
  low, length = int(lengths.min()), int(lengths.max())
  if low < 0 or length // chunk_size > capacity:
    raise ValueError(f"{name}.length = {low if low < 0 else length} is invalid for a state "
                     f"holding {capacity} chunk summaries of chunk_size {chunk_size}")
  needed = (length + new_tokens) // chunk_size
  if needed > capacity:
    raise ValueError(f"{name} has room for {capacity} chunk summaries but {length} + {new_tokens} "
                     f"tokens complete {needed} chunks; pass a larger max_chunks")


def _cast_state(state: RATState, capacity: int, dtype) -> RATState:
  """Casts `state` to `dtype` (length to int32) and zero-pads its summary buffer to `capacity`.

  Summaries stored in bfloat16 / float16 keep that storage dtype (computations up-cast them).
  """
  k_run, v_run = (jnp.asarray(x, dtype) for x in state[2:4])
  summary_dtype = jnp.result_type(state.k_chunks)
  summary_dtype = summary_dtype if summary_dtype in _NARROW else dtype
  k_chunks, v_chunks = (jnp.asarray(x, summary_dtype) for x in state[:2])
  if capacity > k_chunks.shape[1]:
    pad = [(0, 0), (0, capacity - k_chunks.shape[1]), (0, 0), (0, 0)]
    k_chunks, v_chunks = jnp.pad(k_chunks, pad), jnp.pad(v_chunks, pad)
  return RATState(k_chunks, v_chunks, k_run, v_run, jnp.asarray(state.length, jnp.int32))


def _run_update(k_run, v_run, k, v, f, lengths, chunk_size: int):
  """The running aggregates [B, Hk, D] after one token per row, at lengths [B] tokens seen."""
  starts_chunk = (lengths % chunk_size == 0)[:, None, None]
  return (jnp.where(starts_chunk, 0, f * k_run) + (1 - f) * k,
          jnp.where(starts_chunk, 0, f * v_run) + (1 - f) * v)


def _append(buf, run, lengths, chunk_size: int):
  """Writes run [B, Hk, D] into slot lengths[b] // C of buf [B, N, Hk, D] in the rows whose token
  completes a chunk (a scatter: in place under jit when buf is donated); summaries past the
  capacity are dropped."""
  n = buf.shape[1]
  chunk = lengths // chunk_size
  write = ((lengths + 1) % chunk_size == 0) & (chunk < n)
  slot = jnp.where(write, chunk, n)  # out of bounds: dropped
  rows = jnp.arange(buf.shape[0])
  # One (row, slot) per row: unique and sorted, so XLA stores without atomic updates.
  return buf.at[rows, slot].set(run.astype(buf.dtype), mode="drop", indices_are_sorted=True,
                                unique_indices=True)


def _step(state: RATState, token, *, chunk_size: int, scale: float):
  """One token of RAT: the definition that the reference path scans.

  Args:
    state: `RATState` in the compute dtype, capacity N; its length a scalar or one per row [B].
    token: (q [B, Hk, G, D], k [B, Hk, D], v [B, Hk, D], f [B, Hk, D]).
    chunk_size: tokens per chunk.
    scale: softmax scale.

  Returns:
    (new state, o [B, Hk, G, D]). A summary completed past the capacity is dropped.
  """
  k_chunks, v_chunks, k_run, v_run, length = state
  q, k, v, f = token
  lengths = jnp.broadcast_to(length, q.shape[:1])
  k_run, v_run = _run_update(k_run, v_run, k, v, f, lengths, chunk_size)

  n = k_chunks.shape[1]
  if n:
    # Append first: the append writes slot lengths // C, which this token does not see, so the
    # attention reads the same values; in this order XLA appends in place (to donated buffers),
    # where a read before the write makes it copy each buffer twice per step.
    k_chunks = _append(k_chunks, k_run, lengths, chunk_size)
    v_chunks = _append(v_chunks, v_run, lengths, chunk_size)
  visible = jnp.arange(n)[None, :] < (lengths // chunk_size)[:, None]  # [B, N]
  # Products and sums in the compute dtype, written as fused multiply-reduces over the buffer in its
  # [B, N, Hk, D] layout: a decode step reads each summary once (a batched dot would transpose it).
  wide = lambda x: x.astype(q.dtype)
  s_chunks = jnp.sum(q[:, None] * wide(k_chunks)[:, :, :, None], axis=-1)  # [B, N, Hk, G]
  s_chunks = jnp.where(visible[:, :, None, None], s_chunks * scale, -jnp.inf)
  s_run = jnp.sum(q * k_run[:, :, None], axis=-1) * scale                  # [B, Hk, G]
  p = jax.nn.softmax(jnp.concatenate([s_chunks, s_run[:, None]], axis=1), axis=1)
  o = (jnp.sum(p[:, :n, ..., None] * wide(v_chunks)[:, :, :, None], axis=1)
       + p[:, n, ..., None] * v_run[:, :, None])
  return RATState(k_chunks, v_chunks, k_run, v_run, length + 1), o


def _step_pallas(state: RATState, token, *, chunk_size: int, scale: float):
  """`_step` with the attention in the decode kernel of `pallas_kernels.gpu.rat_decode`.

  The kernel reads only the visible summaries (in their storage dtype) and merges the running
  aggregate into its softmax; the aggregate update and the summary append stay in XLA. Same
  arguments and results as `_step`.
  """
  k_chunks, v_chunks, k_run, v_run, length = state
  q, k, v, f = token
  b, hk, g, d = q.shape
  n = k_chunks.shape[1]
  lengths = jnp.broadcast_to(length, (b,))
  k_run, v_run = _run_update(k_run, v_run, k, v, f, lengths, chunk_size)
  if n:
    # Append first: the kernel reads slots < lengths // C only, and the append writes slot
    # lengths // C, so reading the appended buffers is the same; in this order XLA updates the
    # (donated) buffers in place, where a read by the kernel before the write makes it copy them.
    k_chunks = _append(k_chunks, k_run, lengths, chunk_size)
    v_chunks = _append(v_chunks, v_run, lengths, chunk_size)
    o = rat_decode_kernel.rat_decode_attention(
        q.reshape(b, hk * g, d), k_run, v_run, k_chunks, v_chunks, lengths // chunk_size,
        scale=scale, interpret=pallas_interpret()).reshape(q.shape)
  else:
    o = jnp.broadcast_to(v_run[:, :, None], q.shape)
  return RATState(k_chunks, v_chunks, k_run, v_run, length + 1), o


@functools.partial(jax.jit, static_argnames="chunk_size")
def _rat_reference(q, k, v, f, state: RATState, scale, starts=None, *, chunk_size: int):
  """Token-by-token scan of `_step` from `state`.

  q [B,T,Hk,G,D]; k, v, f [B,T,Hk,D]; scale: softmax scale; starts: None or bool [B,T], the
  document starts (`document_starts`), before which a row's state is emptied (zero buffers, length
  0; the final length is then one per row, [B]). Returns (o like q, final state).
  """
  def step(s, x):
    if starts is None:
      return _step(s, x, chunk_size=chunk_size, scale=scale)
    *token, start = x
    s = RATState(*(reset_state(z, start) for z in s[:4]), jnp.where(start, 0, s.length))
    return _step(s, tuple(token), chunk_size=chunk_size, scale=scale)

  xs = (q, k, v, f)
  if starts is not None:
    xs += (starts,)
    state = state._replace(length=jnp.broadcast_to(state.length, starts.shape[:1]))
  time_major = lambda x: jnp.moveaxis(x, 1, 0)
  state, o = lax.scan(step, state, tuple(map(time_major, xs)))
  return jnp.moveaxis(o, 0, 1), state


def _combine(left, right):
  """Composes x -> a x + b maps (earlier `left`, later `right`), sharing the gate for keys/values."""
  a1, bk1, bv1 = left
  a2, bk2, bv2 = right
  return a1 * a2, a2 * bk1 + bk2, a2 * bv1 + bv2


def _linear_scan(a, bk, bv, axis: int):
  """The sequences x_t = a_t * x_{t-1} + b_t (x = 0 before the first) of keys and values along
  `axis`, by an associative scan: returns (prod_{s <= t} a_s, x_k, x_v), shaped like a, bk, bv."""
  return lax.associative_scan(_combine, (a, bk, bv), axis=axis)


@jax.checkpoint
def _aggregate(gate, k, v):
  """In-chunk running aggregates of k and v [B, N, C, Hk, D] under `gate` (same shape).

  Rematerialised in the backward pass (elementwise work over the chunk axis), so only the inputs
  stay alive between the passes, not the scan's log2(C) levels of intermediates.
  """
  return _linear_scan(gate, (1 - gate) * k, (1 - gate) * v, 2)[1:]


def _carry_in(prod, x, ends, x0):
  """Aggregates x [B, N, C, ...] of rows cut into N blocks of C tokens, each block scanned alone
  with restarts at the documents' chunk starts, corrected for the chunks that straddle two
  blocks: block n's tokens before its first restart take prod (their gate product from the
  block's start) times ends[:, n - 1] (ends [B, N, ...]: each block's aggregate at its end; x0
  [B, ...] before block 0). A chunk of at most C tokens that straddles blocks n - 1 and n starts
  strictly inside block n - 1, so that block's end aggregate is already exact.
  """
  carry = jnp.concatenate([x0[:, None], ends[:, :-1]], axis=1)  # [B, N, ...]
  return x + prod * carry[:, :, None]


def document_aggregates(a, bk, bv, entering, *, chunk_size: int):
  """Running aggregates x_t = a_t * x_{t-1} + b_t of keys and values [B, T, Hk, D] (T a multiple
  of C = chunk_size), where a_t = 0 at every chunk start of the documents: one scan per C-token
  block and `_carry_in`.

  `entering(k_end, v_end)` maps the aggregates [B, Hk, D] at the end of the last block to those
  entering the first block, (k0, v0): `rat` returns its state's running aggregates, the
  sequence-parallel op the end aggregates of the segment before. Returns (k_agg, v_agg [B, T, Hk,
  D], k0, v0).
  """
  b, t, hk, d = bk.shape
  blocks = lambda x: x.reshape(b, t // chunk_size, chunk_size, hk, d)
  prod, xk, xv = _linear_scan(blocks(a), blocks(bk), blocks(bv), 2)
  k0, v0 = entering(xk[:, -1, -1], xv[:, -1, -1])
  rows = lambda x: x.reshape(b, t, hk, d)
  return (rows(_carry_in(prod, xk, xk[:, :, -1], k0)), rows(_carry_in(prod, xv, xv[:, :, -1], v0)),
          k0, v0)


def _aggregate_documents_pallas(gate, k, v, k0, v0, *, chunk_size: int, out_dtype: str):
  """`document_aggregates` with the per-block scans by the kernels of
  `pallas_kernels.gpu.rat_aggregate`.

  gate [B, T, Hk, D] (0 at the documents' chunk starts), k, v [B, T, Hk, D] with (1 - f) already
  applied at those starts (the kernels take x_t = a_t x_{t-1} + (1 - a_t) k_t), in their input
  dtypes; k0, v0 [B, Hk, D] float32. Returns the aggregates (float32 [B, T, Hk, D], the per-block
  part rounded to `out_dtype`) and, in float32, those at the last token [B, Hk, D].
  """
  b, t, hk, d = k.shape
  c = chunk_size
  nc = -(-t // c)
  # Padding: gate 1 and input 0 leave the aggregate alone, so a block's float32 summary from the
  # kernel is the aggregate at its last token, also in the last block.
  pad = lambda x, fill=0: jnp.pad(x, [(0, 0), (0, nc * c - t), (0, 0), (0, 0)],
                                  constant_values=fill)
  gate = pad(gate, 1)
  k_loc, v_loc, k_end, v_end = rat_aggregate.chunk_aggregate(
      gate, pad(k), pad(v), chunk_size=c, out_dtype=out_dtype, interpret=pallas_interpret())
  prod = jnp.cumprod(gate.astype(jnp.float32).reshape(b, nc, c, hk, d), axis=2)
  blocks = lambda x: x.astype(jnp.float32).reshape(b, nc, c, hk, d)
  rows = lambda x: x.reshape(b, nc * c, hk, d)[:, :t]
  k_agg, v_agg = (rows(_carry_in(prod, blocks(x), end, x0))
                  for x, end, x0 in ((k_loc, k_end, k0), (v_loc, v_end, v0)))
  last = lambda end, x0: _carry_in(prod[:, :, -1:], end[:, :, None], end, x0)[:, -1, 0]
  return k_agg, v_agg, last(k_end, k0), last(v_end, v0)


def _attend_blocks(q, k_run, v_run, q_chunk, k_sum, v_sum, sum_chunk, *, scale: float,
                   q_doc=None, sum_doc=None):
  """Online-softmax attention of one query block over all summary blocks.

  Args:
    q: [B, Bq, Hk, G, D] queries; k_run, v_run: [B, Bq, Hk, D] their own running aggregates.
    q_chunk: [R, Bq] int32 chunk index of each query (R = 1: the same for every row, or B).
    k_sum, v_sum: [S, B, Bs, Hk, D] chunk summaries in S blocks; sum_chunk: [S, R, Bs] their chunk
      indices (a summary is visible to a query of a strictly later chunk).
    scale: softmax scale.
    q_doc, sum_doc: None, or [R, Bq] and [S, R, Bs] int32 document indices: a summary is then
      visible only to queries of its own document.

  Returns:
    [B, Bq, Hk, G, D] attention outputs.
  """
  s_run = _einsum("bthgd,bthd->bthg", q, k_run) * scale
  m = lax.stop_gradient(s_run)  # the result does not depend on the running max
  l = jnp.exp(s_run - m)
  acc = l[..., None] * v_run[:, :, :, None]
  docs = q_doc is not None

  @jax.checkpoint
  def body(carry, block):
    m, l, acc = carry
    ks, vs, chunk, *doc = block
    visible = chunk[:, None, :] < q_chunk[:, :, None]  # [R, Bq, Bs]
    if docs:
      visible &= doc[0][:, None, :] == q_doc[:, :, None]
    s = _einsum("bthgd,bshd->bthgs", q, ks) * scale
    s = jnp.where(visible[:, :, None, None, :], s, -jnp.inf)
    m_new = jnp.maximum(m, lax.stop_gradient(jnp.max(s, axis=-1)))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new[..., None])
    l = alpha * l + jnp.sum(p, axis=-1)
    acc = alpha[..., None] * acc + _einsum("bthgs,bshd->bthgd", p, vs)
    return (m_new, l, acc), None

  blocks = (k_sum, v_sum, sum_chunk) + ((sum_doc,) if docs else ())
  (_, l, acc), _ = lax.scan(body, (m, l, acc), blocks)
  return acc / l[..., None]


def _summary_blocks(k_sum, v_sum, *keys, block_size: int):
  """Summaries [B, M, Hk, D] and their index arrays [R, M] (chunk, document...) in blocks of
  min(block_size, M): ([S, B, Bs, Hk, D] x 2, [S, R, Bs] per index array). Padding summaries are
  zero with chunk index _NEVER (no query sees them)."""
  m = k_sum.shape[1]
  size = min(block_size, m)
  pad = -m % size
  widen = lambda x, fill: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2),
                                  constant_values=fill)
  blocks = lambda x: jnp.moveaxis(x.reshape((x.shape[0], -1, size) + x.shape[2:]), 1, 0)
  fills = (_NEVER,) + (-1,) * (len(keys) - 1)
  return (blocks(widen(k_sum, 0)), blocks(widen(v_sum, 0)),
          *(blocks(widen(key, fill)) for key, fill in zip(keys, fills)))


def _summary_slots(old, new, first_chunk, old_chunks: int, dtype):
  """The Pallas kernels' summary buffer [B, old_chunks + M, Hk, D] in `dtype`: the state's first
  `old_chunks` summaries (old [B, N, Hk, D]), overwritten from slot first_chunk by new [B, M, Hk,
  D]; just `new` without old chunks."""
  if not old_chunks:
    return new.astype(dtype)
  widen = [(0, 0), (0, new.shape[1]), (0, 0), (0, 0)]
  return lax.dynamic_update_slice_in_dim(jnp.pad(old[:, :old_chunks].astype(dtype), widen),
                                         new.astype(dtype), first_chunk, axis=1)


def _attend_pallas(q, k_agg, v_agg, k_sum, v_sum, first_chunk, scale, *, chunk_size: int, dtype):
  """The cross-chunk attention by the Pallas kernel (`pallas_kernels.gpu.rat`).

  q [B, P, Hk, G, D]; k_agg, v_agg [B, P, Hk, D] running aggregates; k_sum, v_sum [B, M, Hk, D]
  the summaries, slot j = chunk j, holding every slot a query of chunk first_chunk + t // C sees
  (the kernel visits no slot past M). Operands go to the kernel in `dtype` (q's input dtype); the
  scale is folded into q.
  """
  b, p, hk, g, d = q.shape
  cast = lambda x: x.astype(dtype)
  o = rat_kernel.rat_attention(cast((q * scale).reshape(b, p, hk * g, d)), cast(k_agg),
                               cast(v_agg), cast(k_sum), cast(v_sum), first_chunk,
                               chunk_size=chunk_size, scale=1.0, interpret=pallas_interpret())
  return o.reshape(b, p, hk, g, d).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("chunk_size", "continued", "old_chunks", "block_size",
                                             "kernel_dtype"))
def _rat_xla(q, k, v, f, state: RATState, scale, *, chunk_size: int, continued: bool,
             old_chunks: int, block_size: int, kernel_dtype: str | None = None):
  """Chunk-parallel RAT.

  Args:
    q: [B, T, Hk, G, D]; k, v, f: [B, T, Hk, D] in the compute dtype, or (with `kernel_dtype`) in
      their input dtypes: the kernels read bf16 directly.
    state: `RATState` of the output capacity N; its first `old_chunks` slots are the given ones.
    scale: softmax scale.
    continued: whether `state` may be non-empty (else length is 0 and the summary buffer is unused).
    block_size: query tokens (rounded to whole chunks) and summaries per attention block.
    kernel_dtype: None for the plain-JAX attention, else the operand dtype name of the Pallas
      attention kernel ("pallas" path).

  Returns:
    (o [B, T, Hk, G, D], final state of capacity N).
  """
  b, t, hk, g, d = q.shape
  c = chunk_size
  length = state.length
  offset = length % c if continued else 0  # tokens of the partial chunk seen before
  first_chunk = length // c  # chunk index of the buffer's first chunk
  nc = -(-(t + (c - 1 if continued else 0)) // c)  # chunks touched by the new tokens, at most
  chunks_per_block = max(1, min(block_size // c, nc))
  multiple = chunks_per_block
  if kernel_dtype is not None:  # whole blocks of the aggregation kernels, so they need no padding
    multiple = math.lcm(multiple, rat_aggregate.chunk_multiple(nc))
  nc = -(-nc // multiple) * multiple  # padded chunks are never read back
  p = nc * c

  def place(x, fill):
    """[B, T, ...] -> [B, P, ...] with x at buffer positions [offset, offset + T)."""
    buf = jnp.full((b, p) + x.shape[2:], fill, x.dtype)
    return lax.dynamic_update_slice_in_dim(buf, x, offset, axis=1)

  pos = jnp.arange(p)
  # Padding after the last token has gate 1 and input 0: it leaves the aggregate unchanged.
  gate, k_in, v_in = place(f, 1), place(k, 0), place(v, 0)
  if continued:
    inject = (pos == offset - 1)[None, :, None, None]  # the slot re-creating the running aggregate
    gate = jnp.where((pos < offset)[None, :, None, None], 0, gate)
    k_in = jnp.where(inject, state.k_run[:, None], k_in)
    v_in = jnp.where(inject, state.v_run[:, None], v_in)
  new_chunk = first_chunk + jnp.arange(nc)
  # The final summary buffer: the state's, with the chunks the new tokens complete (slots
  # first_chunk .. end // C - 1) from new [B, nc, Hk, D].
  end = length + t
  slots = jnp.arange(state.k_chunks.shape[1])
  fresh = ((slots >= first_chunk) & (slots < end // c))[None, :, None, None]
  src = jnp.clip(slots - first_chunk, 0, nc - 1)
  merge = lambda old, new: jnp.where(fresh, jnp.take(new, src, axis=1).astype(old.dtype), old)

  if kernel_dtype is not None:
    # Aggregates in the kernel dtype, summaries [B, nc, Hk, D] in float32. By the gate-1 padding the
    # running aggregate at the last token is its chunk's summary, so the state stays float32.
    k_agg, v_agg, k_new, v_new = rat_aggregate.chunk_aggregate(
        gate, k_in, v_in, chunk_size=c, out_dtype=kernel_dtype, interpret=pallas_interpret())
    k_chunks, v_chunks = merge(state.k_chunks, k_new), merge(state.v_chunks, v_new)
    # A query of chunk j sees slots < j: the state's below first_chunk, then complete new chunks,
    # all in the final buffer (summaries in the state's dtype, as decode steps keep them). Queries
    # of padding chunks may see fewer slots; their outputs are dropped.
    k_sum, v_sum = (k_chunks, v_chunks) if continued and old_chunks else (k_new, v_new)
    o = _attend_pallas(place(q, 0), k_agg, v_agg, k_sum, v_sum, first_chunk, scale,
                       chunk_size=c, dtype=kernel_dtype)
    k_last, v_last = (lax.dynamic_index_in_dim(x, (offset + t - 1) // c, axis=1, keepdims=False)
                      for x in (k_new, v_new))
  else:
    k_agg, v_agg = _aggregate(gate.reshape(b, nc, c, hk, d), k_in.reshape(b, nc, c, hk, d),
                              v_in.reshape(b, nc, c, hk, d))
    k_new, v_new = k_agg[:, :, -1], v_agg[:, :, -1]  # [B, nc, Hk, D] summaries of the chunks
    last = lambda x: lax.dynamic_index_in_dim(x.reshape(b, p, hk, d), offset + t - 1, axis=1,
                                              keepdims=False)
    k_last, v_last = last(k_agg), last(v_agg)
    if continued and old_chunks:
      k_sum = jnp.concatenate([state.k_chunks[:, :old_chunks], k_new], axis=1)
      v_sum = jnp.concatenate([state.v_chunks[:, :old_chunks], v_new], axis=1)
      old = jnp.arange(old_chunks)
      sum_chunk = jnp.concatenate([jnp.where(old < first_chunk, old, _NEVER), new_chunk])
    else:
      k_sum, v_sum, sum_chunk = k_new, v_new, new_chunk
    k_sum, v_sum, sum_chunk = _summary_blocks(k_sum, v_sum, sum_chunk[None],
                                              block_size=block_size)

    q_len = chunks_per_block * c
    q_blocks = lambda x: jnp.moveaxis(x.reshape((b, -1, q_len) + x.shape[2:]), 1, 0)
    q_chunk = (first_chunk + pos // c).reshape(-1, 1, q_len)
    attend = jax.checkpoint(lambda xs: _attend_blocks(*xs, k_sum, v_sum, sum_chunk, scale=scale))
    o = lax.map(attend, (q_blocks(place(q, 0)), q_blocks(k_agg.reshape(b, p, hk, d)),
                         q_blocks(v_agg.reshape(b, p, hk, d)), q_chunk))
    o = jnp.moveaxis(o, 0, 1).reshape(b, p, hk, g, d)
    k_chunks, v_chunks = merge(state.k_chunks, k_new), merge(state.v_chunks, v_new)
  o = lax.dynamic_slice_in_dim(o, offset, t, axis=1)
  return o, RATState(k_chunks, v_chunks, k_last, v_last, end)


def scatter_slots(x, slot, size: int, fill):
  """x [B, T, ...] written into a new [B, size, ...] buffer of `fill` at slot [B, T] int (slots
  >= size are dropped): e.g. the aggregates at the tokens that end a chunk, in token order."""
  rows = jnp.arange(x.shape[0])[:, None]
  return jnp.full((x.shape[0], size) + x.shape[2:], fill, x.dtype).at[rows, slot].set(
      x, mode="drop")


def _document_positions(starts, length):
  """Each token's document, that document's first token and the token's position in it.

  starts [B, T] bool (`document_starts`), length: the tokens seen before (scalar). Returns (doc
  [B, T] int32: 0 for the document that continues the state, then 1, 2, ... after each start;
  start [B, T] int32: the index of the document's first token in the row; pos [B, T] int32: the
  position in the document, the first one counting on from `length`).
  """
  index = jnp.arange(starts.shape[1], dtype=jnp.int32)
  doc = jnp.cumsum(starts, axis=1, dtype=jnp.int32)
  start = lax.cummax(jnp.where(starts, index, 0), axis=1)
  return doc, start, jnp.where(doc == 0, length + index, index - start)


@functools.partial(jax.jit, static_argnames=("chunk_size", "continued", "old_chunks", "block_size",
                                             "kernel_dtype"))
def _rat_xla_documents(q, k, v, f, state: RATState, starts, scale, *, chunk_size: int,
                       continued: bool, old_chunks: int, block_size: int,
                       kernel_dtype: str | None = None):
  """Chunk-parallel RAT over packed documents (`rat`'s segment_ids), exactly `_rat_reference`.

  Chunks start at every document start (each document is chunked as if it ran alone), so they do
  not line up with the row's C-token blocks: the aggregates come from a scan per block that
  restarts at every chunk start, plus the carry into chunks that straddle two blocks
  (`_carry_in`); the summaries (the aggregates at tokens ending a chunk, at most ceil(T / C) of
  them) are gathered in order; a query attends to the summaries of earlier chunks of its own
  document and to its running aggregate. With `kernel_dtype` the block scans and the attention
  run in the Pallas kernels (`_aggregate_documents_pallas`, `rat_kernel.rat_attention_ranges`:
  the summaries a query sees are one range of slots, since they are stored in token order).

  Args: as `_rat_xla` (state of the output capacity N, its first `old_chunks` slots the given
    ones; a scalar length), plus starts [B, T] bool (`document_starts`).

  Returns:
    (o [B, T, Hk, G, D], final state of capacity N: each row's last document, length [B]; its
    summary slots past that document's chunks hold the given state's where the row has a single
    document, zeros elsewhere).
  """
  b, t, hk, g, d = q.shape
  c = chunk_size
  doc, start, pos = _document_positions(starts, state.length)
  chunk = pos // c
  restart = (pos % c == 0)[..., None, None]  # the aggregate restarts at every chunk start
  gate = jnp.where(restart, 0, f)
  # The first token continues the state's running aggregate (its gate is 0 at a chunk start, so
  # an empty state or one at a chunk's end adds nothing).
  if kernel_dtype is None:
    pad = lambda x: jnp.pad(x, [(0, 0), (0, -t % c), (0, 0), (0, 0)])
    # Rematerialised in the backward pass, as `_aggregate`: only the inputs stay alive.
    aggregate = jax.checkpoint(lambda a, bk, bv, k0, v0: document_aggregates(
        a, bk, bv, lambda *_: (k0, v0), chunk_size=c)[:2])
    k_agg, v_agg = (x[:, :t] for x in aggregate(pad(gate), pad((1 - f) * k), pad((1 - f) * v),
                                                state.k_run, state.v_run))
    k_last, v_last = k_agg[:, -1], v_agg[:, -1]
  else:
    at_restart = lambda x: jnp.where(
        restart, ((1 - f.astype(jnp.float32)) * x.astype(jnp.float32)).astype(x.dtype), x)
    # Rematerialised in the backward pass (one bandwidth-bound kernel pass), as `_aggregate`:
    # only the inputs stay alive, not the float32 aggregates and gate products.
    aggregate = jax.checkpoint(functools.partial(_aggregate_documents_pallas, chunk_size=c,
                                                 out_dtype=kernel_dtype))
    k_agg, v_agg, k_last, v_last = aggregate(gate, at_restart(k), at_restart(v), state.k_run,
                                             state.v_run)

  m = -(-t // c)  # chunks completed by the new tokens, at most
  ends = (pos + 1) % c == 0  # the token completes chunk `chunk` of its document
  before = jnp.cumsum(ends, axis=1, dtype=jnp.int32) - ends  # summaries before each token
  gather = functools.partial(scatter_slots, slot=jnp.where(ends, before, m), size=m)
  k_new, v_new = gather(k_agg, fill=0), gather(v_agg, fill=0)  # [B, M, Hk, D]
  new_chunk, new_doc = gather(chunk, fill=_NEVER), gather(doc, fill=-1)  # [B, M]

  if kernel_dtype is None:
    k_sum, v_sum, sum_chunk, sum_doc = k_new, v_new, new_chunk, new_doc
    if continued and old_chunks:  # the state's summaries, seen by the first document
      old = jnp.arange(old_chunks, dtype=jnp.int32)
      old_chunk = jnp.broadcast_to(jnp.where(old < state.length // c, old, _NEVER),
                                   (b, old_chunks))
      k_sum = jnp.concatenate([state.k_chunks[:, :old_chunks].astype(k_new.dtype), k_new], 1)
      v_sum = jnp.concatenate([state.v_chunks[:, :old_chunks].astype(v_new.dtype), v_new], 1)
      sum_chunk = jnp.concatenate([old_chunk, new_chunk], axis=1)
      sum_doc = jnp.concatenate([jnp.zeros((b, old_chunks), jnp.int32), new_doc], axis=1)
    sums = _summary_blocks(k_sum, v_sum, sum_chunk, sum_doc, block_size=block_size)
    q_len = min(block_size, t)
    p = -(-t // q_len) * q_len
    pad = lambda x: jnp.pad(x, [(0, 0), (0, p - t)] + [(0, 0)] * (x.ndim - 2))
    q_blocks = lambda x: jnp.moveaxis(pad(x).reshape((b, -1, q_len) + x.shape[2:]), 1, 0)
    attend = jax.checkpoint(lambda xs: _attend_blocks(*xs[:4], *sums[:3], scale=scale,
                                                      q_doc=xs[4], sum_doc=sums[3]))
    o = lax.map(attend, tuple(map(q_blocks, (q, k_agg, v_agg, chunk, doc))))
    o = jnp.moveaxis(o, 0, 1).reshape(b, p, hk, g, d)[:, :t]
  else:
    # Slots: the state's visible summaries (0 .. length // C - 1), then the new ones in order.
    first = state.length // c if continued else 0
    put = lambda old, new: _summary_slots(old, new, first, old_chunks if continued else 0,
                                          new.dtype)
    k_sum, v_sum = put(state.k_chunks, k_new), put(state.v_chunks, v_new)
    hi = first + before
    lo = jnp.where(doc == 0, 0, first + jnp.take_along_axis(before, start, axis=1))
    cast = lambda x: x.astype(kernel_dtype)
    o = rat_kernel.rat_attention_ranges(
        cast((q * scale).reshape(b, t, hk * g, d)), cast(k_agg), cast(v_agg), cast(k_sum),
        cast(v_sum), lo, hi, scale=1.0, interpret=pallas_interpret())
    o = o.reshape(b, t, hk, g, d)

  # The final state: the last document's summaries in slots 0 .. of a buffer that starts from the
  # given one where the row has a single document and from zeros where a document started.
  last_doc = doc[:, -1:]
  n = state.k_chunks.shape[1]
  dst = jnp.where(new_doc == last_doc, new_chunk, n)  # out of bounds: dropped
  restarted = (last_doc > 0)[:, :, None, None]
  rows = jnp.arange(b)[:, None]
  put = lambda old, new: jnp.where(restarted, 0, old).at[rows, dst].set(new.astype(old.dtype),
                                                                        mode="drop")
  final = RATState(put(state.k_chunks, k_new), put(state.v_chunks, v_new), k_last, v_last,
                   pos[:, -1] + 1)
  return o, final


def rat(q, k, v, f, *, chunk_size=16, scale=None, initial_state=None, output_final_state=False,
        max_chunks=None, segment_ids=None, block_size=128, impl="auto"):
  """RAT attention: gated recurrence inside chunks, softmax attention over chunk summaries.

  Args:
    q: [B, T, H, D] queries.
    k: [B, T, Hk, D] keys, Hk dividing H (GQA).
    v: [B, T, Hk, D] values.
    f: [B, T, Hk, D] forget gates in (0, 1), shared by keys and values.
    chunk_size: tokens per chunk C (a model hyper-parameter, not a tuning knob).
    scale: softmax scale; defaults to D ** -0.5.
    initial_state: a `RATState` to continue from (any length, also traced), or None.
    output_final_state: whether to return the state after the last token.
    max_chunks: minimum summary capacity N of the final state (size it for later `rat_step`s).
      Without `initial_state` the capacity is max(T // C, max_chunks). With one of capacity N0 it is
      max(N0, max_chunks) when max_chunks is given (a ValueError is raised when the state's length
      is concrete and that is too small; with a traced length, summaries past it are dropped), else
      N0 + ceil(T / C), enough for any valid state.
    segment_ids: None or int [B, T], packed documents: a change of id between t - 1 and t starts
      a new document at t, which begins with an empty state (no summaries, chunk 0 starting at
      t), so each document gives what it gives alone; `initial_state` applies to the row's first
      document only. The final state is then each row's last document's, with length int32 [B].
      The "pallas" path runs the kernels on these calls too.
    block_size: query tokens (rounded to whole chunks) and summaries per attention block of the
      "xla" path; the scores of one block pair take [B, block_size, H, block_size] memory.
    impl: "auto", "reference" (token-by-token scan), "xla" (chunked) or "pallas".

  Returns:
    (o [B, T, H, D] in q's dtype, final `RATState` (float32) or None).
  """
  b, t, h, hk, d, dv = check_qkv(q, k, v)
  if dv != d:
    raise ValueError(f"v must have shape [{b}, {t}, {hk}, {d}] (the head_dim of k, since f gates "
                     f"both), got {v.shape}")
  check_shape(f, (b, t, hk, d), "f", "[batch, seq, kv_heads, head_dim]")
  _check_chunk_size(chunk_size)
  if not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block_size must be a positive int, got {block_size!r}")
  if max_chunks is not None and (not isinstance(max_chunks, (int, np.integer)) or max_chunks < 0):
    raise ValueError(f"max_chunks must be a non-negative int or None, got {max_chunks!r}")
  _check_gate_range(f)
  check_segment_ids(segment_ids, b, t)
  c = chunk_size
  if initial_state is None:
    capacity = max(t // c, max_chunks or 0)
    old_chunks = 0
  else:
    old_chunks = _check_state(initial_state, b, hk, d, "initial_state")
    _check_capacity(initial_state.length, 0, c, old_chunks, "initial_state")
    if max_chunks is None:
      capacity = old_chunks + math.ceil(t / c)
    else:
      capacity = max(old_chunks, max_chunks)
      _check_capacity(initial_state.length, t, c, capacity, "initial_state")

  state = rat_init_state(b, hk, d, 0) if initial_state is None else initial_state
  dtype = compute_dtype(q, k, v, f, *state[:4])
  impl = resolve_impl(impl, "rat", pallas_unsupported=(
      rat_kernel.unsupported_reason(d, q.dtype) if dtype == jnp.float32
      else f"compute dtype {jnp.dtype(dtype).name}; the kernel computes in float32"))
  state = _cast_state(state, capacity, dtype)
  scale = default_scale(scale, d)
  out_dtype = jnp.result_type(q)
  # The pallas path's kernels read bf16 inputs directly; the other paths compute in `dtype`.
  q, k, v, f = (jnp.asarray(x, None if impl == "pallas" else dtype) for x in (q, k, v, f))
  qg = q.reshape(b, t, hk, h // hk, d)
  starts = None if segment_ids is None else document_starts(jnp.asarray(segment_ids))
  if t == 0:
    o, final = qg, state
    if starts is not None:
      final = final._replace(length=jnp.broadcast_to(final.length, (b,)))
  elif impl == "reference":
    o, final = _rat_reference(qg, k, v, f, state, scale, starts, chunk_size=c)
  elif starts is not None:
    o, final = _rat_xla_documents(qg, k, v, f, state, starts, scale, chunk_size=c,
                                  continued=initial_state is not None, old_chunks=old_chunks,
                                  block_size=block_size,
                                  kernel_dtype=out_dtype.name if impl == "pallas" else None)
  else:
    o, final = _rat_xla(qg, k, v, f, state, scale, chunk_size=c,
                        continued=initial_state is not None, old_chunks=old_chunks,
                        block_size=block_size,
                        kernel_dtype=out_dtype.name if impl == "pallas" else None)
  o = o.reshape(b, t, h, d).astype(out_dtype)
  return o, (final if output_final_state else None)


def rat_step(q, k, v, f, state, *, chunk_size=16, scale=None, impl="auto"):
  """One decode token of `rat`, continuing exactly from `state` (a prefill's final state).

  Appends the chunk summary when the token completes a chunk (a `dynamic_update_slice` into the
  fixed-capacity buffer, so shapes never change under jit).

  Args:
    q: [B, H, D]; k, v, f: [B, Hk, D] with Hk dividing H; f in (0, 1).
    state: a `RATState` with room for the summary this token may complete (a ValueError says so
      when its length is concrete; with a traced length a summary past the capacity is dropped), or
      None: no tokens seen, capacity 1 // chunk_size. Its length may be a scalar or int32 [B], one
      per row (rows at different positions, as the serving engine's slots are).
    chunk_size: tokens per chunk C, as in the prefill.
    scale: softmax scale; defaults to D ** -0.5 (a Python number on the "pallas" path).
    impl: "auto", "reference"/"xla" (the same plain-JAX step) or "pallas" (the attention over
      the visible summaries by the decode kernel of `pallas_kernels.gpu.rat_decode`; "auto" picks
      it on GPU).

  Returns:
    (o [B, H, D] in q's dtype, new `RATState`).
  """
  check_rank(q, 3, "q", "[batch, heads, head_dim]")
  b, h, d = q.shape
  check_rank(k, 3, "k", f"[{b}, kv_heads, {d}]")
  hk = k.shape[1]
  check_shape(k, (b, hk, d), "k", "[batch, kv_heads, head_dim]")
  if h % hk:
    raise ValueError(f"the heads of k/v ({hk}) must divide the heads of q ({h})")
  check_shape(v, (b, hk, d), "v", "[batch, kv_heads, head_dim]")
  check_shape(f, (b, hk, d), "f", "[batch, kv_heads, head_dim]")
  _check_chunk_size(chunk_size)
  _check_gate_range(f)
  if state is None:
    state = rat_init_state(b, hk, d, 1 // chunk_size)
  capacity = _check_state(state, b, hk, d, "state", per_row=True)
  _check_capacity(state.length, 1, chunk_size, capacity, "state")

  dtype = compute_dtype(q, k, v, f, *state[:4])
  impl = resolve_impl(impl, "rat_step", pallas_unsupported=(
      rat_decode_kernel.unsupported_reason(d, q.dtype, jnp.result_type(state.k_chunks))
      if dtype == jnp.float32 else
      f"compute dtype {jnp.dtype(dtype).name}; the kernel computes in float32"))
  state = _cast_state(state, capacity, dtype)
  qg = jnp.asarray(q, dtype).reshape(b, hk, h // hk, d)
  k, v, f = (jnp.asarray(x, dtype) for x in (k, v, f))
  step = _step_pallas if impl == "pallas" else _step
  state, o = step(state, (qg, k, v, f), chunk_size=chunk_size, scale=default_scale(scale, d))
  return o.reshape(b, h, d).astype(q.dtype), state
