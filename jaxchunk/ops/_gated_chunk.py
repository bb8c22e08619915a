"""Shared machinery of the gated linear attention family (`simple_gla`, `gla`).

Both ops run the recurrence S_t = diag(exp(a_t)) S_{t-1} + k_t^T v_t, o_t = scale q_t S_t with a
[Dk, Dv] state S and a log-decay a_t <= 0 that is one scalar per head (`simple_gla`, stored here
with a trailing axis of size 1) or one value per key channel (`gla`, trailing axis Dk).

Chunked ("xla") form, following the GLA paper / FLA. Inside a chunk of C tokens let b_i be the
cumulative log-decay from the chunk start up to token i (inclusive; b is non-increasing). Then

  o_i = scale * [(q_i * exp(b_i)) S_0 + sum_{j <= i} (sum_d q_id k_jd exp(b_id - b_jd)) v_j]
  S_C = diag(exp(b_C)) S_0 + sum_j (k_j * exp(b_C - b_j))^T v_j

Every exponent above is <= 0 except in the intra-chunk attention matrix, where b_i - b_j <= 0 only
for i >= j. Numerical safety of that matrix:

- scalar decay: exp(b_i - b_j) is a [C, C] factor whose exponent is masked to -inf above the
  diagonal *before* `exp`, so nothing overflows and the gradient through the mask is exactly 0.
- per-channel decay, where C is a multiple of BLOCKWISE_ROWS (8; the default chunk sizes):
  `_blockwise_decay_attention` forms the matrix from products only. Query rows go in blocks of 8.
  For keys before a block the reference r = b at the block's first row lies between every such
  key j and query i, so exp(b_i - b_j) = exp(b_i - r) * exp(r - b_j) with both factors in (0, 1]:
  one matmul of q * exp(b - r) and k * exp(r - b) per block, and nothing can overflow (an
  underflowing factor means the true product underflows too). Keys inside the block go through
  its middle row with the log-decays floored at BLOCKWISE_DECAY_FLOOR (-16), so each factor stays
  within e^(+-64); that changes only pair weights already below e^-16. Against the exact form
  below it halves the xla path's fwd+bwd on the CPU backend (BLOCKWISE_PAIRS). Memory is
  O(T * C * Dk / 8) for the decayed keys.
- per-channel decay, other C (secondary chunking, as FLA's `chunk_gla`): the chunk is split into
  sub-chunks of c = gcd(C, `_SUB_CHUNK`) tokens; an earlier key sub-chunk factors through the
  query sub-chunk's first row as above, and diagonal blocks (I == J) are exact, with a [c, c, Dk]
  decay tensor per sub-chunk masked before `exp`. Memory is O(T * C * Dk / c) for the decayed
  keys and O(T * c * Dk) for the diagonal blocks: linear in T, never T x T.

The inter-chunk state pass is a `lax.scan` over chunks carrying S; the per-chunk contributions
sum_j (k_j exp(b_C - b_j))^T v_j are computed for all chunks in parallel beforehand.

Packed documents (`segment_ids`): the state is reset to zero where a document starts. Inside a chunk
this is exact masking, with no change to the decays (a decay inside one document never crosses a
start): the attention matrix keeps only pairs (i, j) of one document, the carried-in S_0 reaches
only the queries of the chunk's first document (the one that continues it), and S_C keeps
diag(exp(b_C)) S_0 only when no document starts inside the chunk and sums only the keys of the
chunk's last document (`_document_masks`).

The "pallas" path (GPU, or interpret mode on CPU) runs `pallas_kernels.gpu.gated_linear_attention`
with the chunk of its config table (`chunk_size` sets the xla path's chunk only); q, k, v stay in
their dtype (bf16 or float32), head dims 64 and 128, with or without `segment_ids` (the kernels
apply the same document masks).

Compute dtype: float32, or float64 when x64 is enabled and an input already is float64, so that
the reference path can serve as a float64 oracle in tests.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from jaxchunk.ops._common import (check_gate, check_step_qkv,
                                  check_nonpositive, check_qkv, check_segment_ids, check_shape,
                                  chunk_documents, compute_dtype, default_scale, document_starts,
                                  pad_seq, pallas_interpret, repeat_heads, reset_state,
                                  resolve_impl, same_document)
from pallas_kernels.gpu import chunk_common
from pallas_kernels.gpu import gated_linear_attention as gla_kernel

_HIGHEST = lax.Precision.HIGHEST
_SUB_CHUNK = 16


def _einsum(spec, *operands):
  return jnp.einsum(spec, *operands, precision=_HIGHEST)


def _check_state(state, shape: tuple, name: str) -> None:
  check_shape(state, shape, name, "[batch, heads, head_dim, head_dim_v]")


# ------------------------------------------------------------------------------------------------
# Recurrent definition.


def _recurrent_step(state, q, k, v, log_decay):
  """One token of the recurrence.

  Args: state [B,H,Dk,Dv]; q (already scaled) and k [B,H,Dk]; v [B,H,Dv]; log_decay [B,H,Dk or 1].
  Returns (o [B,H,Dv], new_state [B,H,Dk,Dv]).
  """
  state = jnp.exp(log_decay)[..., None] * state + k[..., :, None] * v[..., None, :]
  return _einsum("bhd,bhde->bhe", q, state), state


def _reference(q, k, v, log_decay, state, starts):
  """Token-by-token `lax.scan`. q,k [B,T,H,Dk]; v [B,T,H,Dv]; log_decay [B,T,H,Dk or 1];
  starts [B,T] bool, where the state is reset to zero before the token (`document_starts`).

  Returns (o [B,T,H,Dv], final_state [B,H,Dk,Dv]).
  """
  def step(s, xs):
    *token, start = xs
    o, s = _recurrent_step(reset_state(s, start), *token)
    return s, o

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_decay, starts))
  state, o = lax.scan(step, state, xs)
  return jnp.moveaxis(o, 0, 1), state


# ------------------------------------------------------------------------------------------------
# Chunked form.


def _scalar_decay_attention(q, k, b, einsum=_einsum):
  """Intra-chunk attention with one log-decay per token.

  q, k [..., C, Dk]; b [..., C, 1] cumulative log-decay; `einsum` forms the products (default:
  float32 at full precision). Returns A [..., C, C] with A_ij = (q_i . k_j) exp(b_i - b_j) for
  i >= j and 0 above the diagonal.
  """
  c = q.shape[-2]
  causal = jnp.tril(jnp.ones((c, c), bool))
  exponent = jnp.where(causal, b[..., :, 0][..., :, None] - b[..., :, 0][..., None, :], -jnp.inf)
  return einsum("...id,...jd->...ij", q, k) * jnp.exp(exponent)


def _channel_decay_attention(q, k, b, sub_chunk: int, einsum=_einsum):
  """Intra-chunk attention with per-channel log-decays, by secondary chunking (module docstring).

  q, k, b [..., C, Dk] with b the cumulative log-decay; C a multiple of `sub_chunk`; `einsum` as
  in `_scalar_decay_attention`. Returns
  A [..., C, C] with A_ij = sum_d q_id k_jd exp(b_id - b_jd) for i >= j and 0 above the diagonal.
  """
  *lead, c, dk = q.shape
  n = c // sub_chunk
  q, k, b = (x.reshape(*lead, n, sub_chunk, dk) for x in (q, k, b))
  ref = b[..., :, 0, :]                                                      # [..., n, Dk]
  earlier = jnp.tril(jnp.ones((n, n), bool), -1)[:, :, None, None]           # J < I
  q_rel = q * jnp.exp(b - ref[..., :, None, :])                              # [..., n, c, Dk]
  k_exponent = jnp.where(earlier, ref[..., :, None, None, :] - b[..., None, :, :, :], -jnp.inf)
  k_rel = k[..., None, :, :, :] * jnp.exp(k_exponent)                        # [..., I, J, c, Dk]
  off_diagonal = einsum("...Iid,...IJjd->...IiJj", q_rel, k_rel)

  causal = jnp.tril(jnp.ones((sub_chunk, sub_chunk), bool))[:, :, None]
  diag_exponent = jnp.where(causal, b[..., :, :, None, :] - b[..., :, None, :, :], -jnp.inf)
  diagonal = einsum("...Iid,...Ijd,...Iijd->...Iij", q, k, jnp.exp(diag_exponent))

  same_block = jnp.eye(n, dtype=bool)[:, None, :, None]
  a = jnp.where(same_block, diagonal[..., :, :, None, :], off_diagonal)
  return a.reshape(*lead, c, c)


# `_blockwise_decay_attention`: query rows per block, and the floor of the log-decays inside a
# block's pair weights (4 tokens * 16 = 64: every factor stays within float32's normal range).
BLOCKWISE_ROWS = 8
BLOCKWISE_DECAY_FLOOR = -16.0
# Whether per-channel pair matrices (GLA's and KDA's xla paths, KDA's pallas path with XLA factors)
# are formed by `_blockwise_decay_attention` where the chunk allows it, rather than by the exact
# secondary chunking, whose diagonal blocks are [C, 16, Dk] elementwise products. Read when an op
# is called and passed on as a static argument. Blockwise was faster everywhere it was timed: on
# the CPU backend (`bench/pair_matrices.py`, T=2K, H=4, D=128, float32;
# bench/results/pair_matrices-2026-12-07-cpu.md) GLA's xla fwd+bwd 251 -> 130 ms and KDA's 368 ->
# 205 ms, the forwards unchanged; on an H100 (B=8, T=8K, H=16, D=128, bf16;
# `bench/delta_factors.py`, bench/results/linear_kernels-2026-12-07-bf16-states.md) KDA's pallas
# fwd 12.58 -> 10.61 ms and fwd+bwd 68.45 -> 42.14 ms.
BLOCKWISE_PAIRS = True


def _blockwise_decay_attention(q, k, log_decay, einsum=_einsum):
  """A [..., C, C] of `_channel_decay_attention` from products only (no [.., C, C, Dk] array).

  q, k, log_decay [..., C, Dk] (per-token log-decays, not their cumulative sum b); C a multiple of
  BLOCKWISE_ROWS (r). Query rows go in blocks of r. Keys before a block factor e^(b_i - b_j)
  through its first row f: (q_i e^(b_i - f)) . (k_j e^(f - b_j)), both factors <= 1, exact. Keys
  inside it factor through its middle row m, with b taken from log-decays floored at
  BLOCKWISE_DECAY_FLOOR: each factor within e^(+-64), so the products are exact to float32
  rounding while the log-decays stay above the floor; below it, only pairs inside a block
  separated by such a token change, from one weight under e^-16 (1.1e-7) to another.
  """
  *lead, c, dk = q.shape
  rows = BLOCKWISE_ROWS
  n = c // rows
  b = jnp.cumsum(log_decay, axis=-2)
  q_blocks, b_blocks = (x.reshape(*lead, n, rows, dk) for x in (q, b))
  first = b_blocks[..., 0, :]                                                # [..., n, Dk]
  earlier = jnp.arange(c)[None, :] < rows * jnp.arange(n)[:, None]           # [n, C]
  k_first = k[..., None, :, :] * jnp.exp(
      jnp.where(earlier[:, :, None], first[..., :, None, :] - b[..., None, :, :], -jnp.inf))
  before = einsum("...Iid,...Ijd->...Iij", q_blocks * jnp.exp(b_blocks - first[..., None, :]),
                  k_first)                                                   # [..., n, r, C]

  floored = jnp.cumsum(jnp.maximum(log_decay, BLOCKWISE_DECAY_FLOOR), axis=-2)
  floored = floored.reshape(*lead, n, rows, dk)
  mid = floored[..., rows // 2 : rows // 2 + 1, :]                          # [..., n, 1, Dk]
  inside = einsum("...Iid,...Ijd->...Iij", q_blocks * jnp.exp(floored - mid),
                  k.reshape(*lead, n, rows, dk) * jnp.exp(mid - floored))   # [..., n, r, r]
  inside = jnp.where(jnp.tril(jnp.ones((rows, rows), bool)), inside, 0.0)
  same_block = (jnp.arange(c) // rows)[None, :] == jnp.arange(n)[:, None]   # [n, C]
  a = jnp.where(same_block[:, None, :], jnp.tile(inside, (n,)), before)
  return a.reshape(*lead, c, c)


def _channel_pair_attention(q, k, log_decay, b, einsum=_einsum, *, blockwise: bool):
  """The per-channel intra-chunk attention A [..., C, C] of q, k [..., C, Dk] with per-token
  log-decays `log_decay` and their cumulative sum `b` (both [..., C, Dk]): with `blockwise` and C
  a multiple of BLOCKWISE_ROWS by `_blockwise_decay_attention`, else by the exact secondary
  chunking of `_channel_decay_attention` (module docstring)."""
  c = q.shape[-2]
  if blockwise and c % BLOCKWISE_ROWS == 0:
    return _blockwise_decay_attention(q, k, log_decay, einsum)
  return _channel_decay_attention(q, k, b, math.gcd(c, _SUB_CHUNK), einsum)


def _document_masks(starts, chunk_size: int):
  """The masks of packed documents (module docstring) for chunks laid out [B, N, H, C, *].

  starts [B,T] bool (`document_starts`). Returns (same [B,N,1,C,C]: pairs in one document,
  first [B,N,1,C,1]: tokens of the document carried into the chunk, last [B,N,1,C,1]: tokens of
  the chunk's last document, carry [B,N,1,1,1]: no document starts inside the chunk).
  """
  doc = chunk_documents(starts, chunk_size)[:, :, None, :, None]             # [B,N,1,C,1]
  return same_document(doc[..., 0]), doc == 0, doc == doc[..., -1:, :], doc[..., -1:, :] == 0


def _chunked(q, k, v, log_decay, state, starts, *, chunk_size: int, blockwise: bool):
  """Chunkwise-parallel form. Shapes as `_reference`, starts [B,T] bool or None (one document);
  T is padded to a multiple of `chunk_size`; `blockwise`: see BLOCKWISE_PAIRS.

  Padding uses k = v = 0, log-decay 0 and no document start, which leaves the state unchanged.
  """
  b_, t, h, dk = q.shape
  dv = v.shape[-1]
  per_channel = log_decay.shape[-1] != 1
  padded = [pad_seq(x, chunk_size)[0] for x in (q, k, v, log_decay)]
  n = padded[0].shape[1] // chunk_size

  def to_chunks(x):                                                          # -> [B,N,H,C,D]
    return x.reshape(b_, n, chunk_size, h, x.shape[-1]).transpose(0, 1, 3, 2, 4)

  q, k, v, log_decay = map(to_chunks, padded)
  b = jnp.cumsum(log_decay, axis=-2)
  if per_channel:
    a = _channel_pair_attention(q, k, log_decay, b, blockwise=blockwise)
  else:
    a = _scalar_decay_attention(q, k, b)

  b_last = b[..., -1:, :]
  q_decayed = q * jnp.exp(b)
  k_to_end = k * jnp.exp(b_last - b)
  chunk_decays = jnp.exp(b_last[..., 0, :])[..., None]                       # [B,N,H,Dk or 1,1]
  if starts is not None:
    same, first, last, carry = _document_masks(starts, chunk_size)
    a = jnp.where(same, a, 0)
    q_decayed = jnp.where(first, q_decayed, 0)
    k_to_end = jnp.where(last, k_to_end, 0)
    chunk_decays = jnp.where(carry, chunk_decays, 0)
  chunk_updates = _einsum("bnhcd,bnhce->bnhde", k_to_end, v)

  def pass_chunk(s, xs):
    decay, update = xs
    return decay * s + update, s

  xs = (jnp.moveaxis(chunk_decays, 1, 0), jnp.moveaxis(chunk_updates, 1, 0))
  state, chunk_states = lax.scan(pass_chunk, state, xs)
  chunk_states = jnp.moveaxis(chunk_states, 0, 1)                            # [B,N,H,Dk,Dv]
  o = (_einsum("bnhij,bnhje->bnhie", a, v)
       + _einsum("bnhcd,bnhde->bnhce", q_decayed, chunk_states))
  o = o.transpose(0, 1, 3, 2, 4).reshape(b_, n * chunk_size, h, dv)
  return o[:, :t], state


# ------------------------------------------------------------------------------------------------
# Jitted bodies: casting, GQA head broadcast and dispatch.


def _prepare(q, k, v, log_decay, state, scale, dtype, head_axis):
  """Casts to `dtype`, scales q, repeats kv/gate heads to q's; zero state if `state` is None.

  A scalar-per-head `log_decay` (one axis fewer than k) gets a trailing axis of size 1.
  """
  h = q.shape[head_axis]
  if log_decay.ndim < k.ndim:
    log_decay = log_decay[..., None]
  q = q.astype(dtype) * scale
  k, v, log_decay = (repeat_heads(x.astype(dtype), h, head_axis) for x in (k, v, log_decay))
  if state is None:
    state = jnp.zeros((q.shape[0], h, q.shape[-1], v.shape[-1]), dtype)
  return q, k, v, log_decay, state.astype(dtype)


@functools.partial(jax.jit, static_argnames=("path", "chunk_size", "dtype", "blockwise"))
def _forward(q, k, v, log_decay, state, segment_ids, scale, *, path: str, chunk_size: int, dtype,
             blockwise: bool):
  """q [B,T,H,Dk]; k [B,T,Hk,Dk]; v [B,T,Hk,Dv]; log_decay [B,T,H or Hk(,Dk)];
  state [B,H,Dk,Dv] or None; segment_ids [B,T] int or None.
  Returns (o [B,T,H,Dv] in q's dtype, final state [B,H,Dk,Dv])."""
  out_dtype = q.dtype
  q, k, v, log_decay, state = _prepare(q, k, v, log_decay, state, scale, dtype, head_axis=2)
  starts = None if segment_ids is None else document_starts(segment_ids)
  if path == "reference":
    if starts is None:
      starts = jnp.zeros(q.shape[:2], bool)
    o, state = _reference(q, k, v, log_decay, state, starts)
  else:
    o, state = _chunked(q, k, v, log_decay, state, starts, chunk_size=chunk_size,
                        blockwise=blockwise)
  return o.astype(out_dtype), state


def _pallas_unsupported(q, k, v) -> str | None:
  """None when the Pallas kernel supports this call (with or without segment_ids), else the
  reason."""
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dtypes) != 1 or dtypes.pop() not in (jnp.bfloat16, jnp.float32):
    return f"q, k, v must share one dtype of bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}"
  return chunk_common.unsupported_reason(q.shape[-1], v.shape[-1])


@functools.partial(jax.jit, static_argnames="scale")
def _forward_pallas(q, k, v, log_decay, state, segment_ids, scale):
  """As `_forward`, through the Pallas kernel; q, k, v keep their (shared) dtype."""
  b, _, h, dk = q.shape
  k, v, log_decay = (repeat_heads(x, h) for x in (k, v, log_decay))
  if state is None:
    state = jnp.zeros((b, h, dk, v.shape[-1]), jnp.float32)
  return gla_kernel.gated_linear_attention(q, k, v, log_decay, state, scale=scale,
                                           segment_ids=segment_ids, interpret=pallas_interpret())


@functools.partial(jax.jit, static_argnames="dtype")
def _step(q, k, v, log_decay, state, scale, *, dtype):
  """q [B,H,Dk]; k [B,Hk,Dk]; v [B,Hk,Dv]; log_decay [B,H or Hk(,Dk)]; state [B,H,Dk,Dv] or
  None. Returns (o [B,H,Dv] in q's dtype, new state [B,H,Dk,Dv])."""
  out_dtype = q.dtype
  q, k, v, log_decay, state = _prepare(q, k, v, log_decay, state, scale, dtype, head_axis=1)
  o, state = _recurrent_step(state, q, k, v, log_decay)
  return o.astype(out_dtype), state


# ------------------------------------------------------------------------------------------------
# Public entry points used by `simple_gla` and `gla`.


def gated_linear_attention(op_name: str, q, k, v, gate, gate_name: str, *, per_channel: bool,
                           scale, initial_state, output_final_state: bool, segment_ids,
                           chunk_size: int, impl: str):
  """Full-sequence op: validates, dispatches to the reference or chunked path.

  q [B,T,H,Dk]; k [B,T,Hk,Dk]; v [B,T,Hk,Dv]; gate [B,T,H or Hk] (scalar decay) or
  [B,T,H or Hk,Dk] (`per_channel`); initial_state [B,H,Dk,Dv] or None; segment_ids [B,T] int
  or None (packed documents, `jaxchunk.ops._common.document_starts`).
  Returns (o [B,T,H,Dv] in q's dtype, final_state [B,H,Dk,Dv] or None).
  """
  b, t, h, hk, dk, dv = check_qkv(q, k, v)
  check_gate(gate, gate_name, b, t, (h, hk), (dk,) if per_channel else ())
  if initial_state is not None:
    _check_state(initial_state, (b, h, dk, dv), "initial_state")
  check_segment_ids(segment_ids, b, t)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"{op_name}: chunk_size must be a positive int, got {chunk_size!r}")
  path = resolve_impl(impl, op_name,
                      pallas_unsupported=_pallas_unsupported(q, k, v))
  check_nonpositive(gate, gate_name)

  if path == "pallas":
    o, state = _forward_pallas(q, k, v, gate, initial_state, segment_ids, default_scale(scale, dk))
  else:
    o, state = _forward(q, k, v, gate, initial_state, segment_ids, default_scale(scale, dk),
                        path=path, chunk_size=chunk_size,
                        dtype=compute_dtype(q, k, v, gate, initial_state),
                        blockwise=BLOCKWISE_PAIRS)
  return o, (state if output_final_state else None)


def gated_linear_attention_step(op_name: str, q, k, v, gate, gate_name: str, state, *,
                                per_channel: bool, scale):
  """One decode token, continuing exactly from a prefill's final state.

  q [B,H,Dk]; k [B,Hk,Dk]; v [B,Hk,Dv]; gate [B,H or Hk] (scalar decay) or [B,H or Hk,Dk]
  (`per_channel`); state [B,H,Dk,Dv] or None (zeros).
  Returns (o [B,H,Dv] in q's dtype, new_state [B,H,Dk,Dv]).
  """
  b, h, hk, dk, dv = check_step_qkv(q, k, v, op_name)
  tail = (dk,) if per_channel else ()
  if jnp.ndim(gate) != 2 + len(tail) or gate.shape[0] != b or gate.shape[1] not in (h, hk) \
      or tuple(gate.shape[2:]) != tail:
    heads = " or ".join(map(str, sorted({h, hk})))
    raise ValueError(f"{gate_name} must have shape [{b}, {heads}{''.join(f', {d}' for d in tail)}]"
                     f", got {jnp.shape(gate)}")
  if state is not None:
    _check_state(state, (b, h, dk, dv), "state")
  check_nonpositive(gate, gate_name)

  return _step(q, k, v, gate, state, default_scale(scale, dk),
               dtype=compute_dtype(q, k, v, gate, state))
