"""Pallas (Triton) GPU kernels for gated linear attention: scalar decay (simple GLA) and per-channel
decay (GLA), forward and backward, wired with `jax.custom_vjp`.

Recurrence, per batch and head, with a [Dk, Dv] float32 state S and log-decays a_t <= 0 (one per
token, or one per key channel):

  S_t = diag(exp(a_t)) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t.

Design (FLA's `chunk` algorithm): the sequence is cut into chunks of C tokens; only the pass that
carries the state from chunk to chunk is sequential, and it does one small matmul per chunk. With b
the cumulative log-decay from the chunk start (inclusive; each kernel sums the raw log-decays of its
chunk), b_C its last row and h the state at the chunk start:

  state pass (grid: batch, head, Dk block, Dv block; walks the chunks in order):
      stores h_c for every chunk, then h <- e^(b_C) h + (k * e^(b_C - b))^T v;
  output (grid: batch, head, chunk, Dv block; fully parallel):
      o = (q * e^b) h + mask(A) v,    A_ij = sum_d q_id k_jd e^(b_id - b_jd).

The states h_c [B, H, NC, Dk, Dv] are stored in the input dtype (as FLA does) and kept for the
backward. Scalar decay: A = (q k^T) * e^(b_i - b_j) with the exponent masked to -inf above the
diagonal before `exp` (exact, never overflows). Per-channel decay: A is built from blocks of
`sub_chunk` rows. An off-diagonal block (query rows I after key rows J) is one matmul of
q_I e^(b_I - r) and k_J e^(r - b_J) with r the decay at the first row of I: both factors are <= 1,
nothing overflows. A diagonal block uses r at its middle row; its factors stay finite while the
decay over half a block is above -88 (mean log-decay above -88 / (sub_chunk / 2) per token: -5.5
for the 32-row blocks of the table below), as in FLA's fused-chunk GLA.

Backward: a reverse state pass (same grid and code as the forward one) stores dh_c, the gradient of
the state at each chunk's end, dh <- e^(b_C) dh + (q e^b)^T do, starting from the final state's
gradient and ending at the initial state's. Then one fully parallel kernel per (batch, head, chunk)
with dA_ij = (do_i . v_j) masked (and times e^(b_i - b_j) for a scalar decay):

  dq = (dA (k e^(r - b))) e^(b - r) + e^b (do h^T),
  dk = (dA^T (q e^(b - r))) e^(r - b) + e^(b_C - b) (v dh^T),
  dv = mask(A)^T do + (k e^(b_C - b)) dh.

The decay gradient comes out of the same kernel: o and the final state depend on the global
cumulative log-decay B only through differences between a query (or the final state) and a key, so
dB_t = q_t * dq_t - k_t * dk_t and da_t = sum_{s >= t} dB_s. The part of that sum after the chunk
equals sum_e h_{c+1} * dh_c (shifting every later B by the same amount scales the state at the
chunk end), which expands to e^(b_C) sum_e h * dh plus the column sums of k * e^(b_C - b) (v dh^T),
both at hand; the kernel adds the reverse cumulative sum inside the chunk (summed over the key
channels for a scalar decay). With `Config.split_grad` two kernels share that work: one writes dq,
dv and the query part of dB (q dq, float32) to HBM, the other reads it and writes dk and the decay
gradient. Each then keeps fewer values live: compiled for sm_90 (`bench/kernel_resources.py`) the
GLA head-dim-128 gradient kernel spills 496 bytes per thread, the two split kernels 24 and 32,
for one more read and write of a float32 [B, T, H, Dk] array.

Packed documents (segment_ids): the kernels get each token's document index within its chunk
(int32; 0 for the document running at the chunk start, +1 after each start) and mask, leaving the
decays as they are. A keeps pairs of one document; h reaches the queries of document 0 only; the
state pass carries e^(b_C) h only through a chunk with no start (its last document is 0) and adds
only the keys of the chunk's last document. Mirrored in the backward: the reverse pass adds only
the queries of document 0 and carries dh only through a chunk with no start; in the gradient
kernel dA keeps pairs of one document, the h terms of dq reach document 0 and the dh terms of dk
and dv the last document. The decay gradient stays exact: dB of one document sums to zero over
that document (each pair's query and key terms cancel), so da_t = sum of dB_s over s >= t in t's
document only, plus the part after the chunk (which the carried state sees) for the last document
only, its e^(b_C) sum_e h dh term zeroed when a document starts in the chunk. With no segment ids
(a static flag) none of these masks is traced.

Operands of the matmuls are in the input dtype (bf16 or float32; float32 with full-precision IEEE
dots, not tf32), accumulation and the carried states in float32. With bf16, the in-chunk part of
dB (q dq - k dk cancels: the pairs of tokens both after t add nothing to da_t) is formed from the
same rounded operands as the dq and dk matmuls, which keeps the decay gradient as close to float64
as dq and dk (~3e-3; 1.2e-2 otherwise), and the in-chunk reverse cumulative sum is a matmul with a
triangular 0/1 matrix whose float32 operand is split into three bf16 terms (exact to float32
rounding). This module never imports jaxchunk.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu.chunk_common import (Launch, causal_mask, chunk_documents, chunk_spec,
                                             compiler_params, doc_specs, dot, fit_launches,
                                             round_mantissa, row, triangular_mask)


@dataclasses.dataclass(frozen=True)
class Config:
  chunk: int        # tokens per chunk: states are stored at chunk starts
  sub_chunk: int    # rows per block of the in-chunk matrix A (per-channel; = chunk for scalar)
  state: Launch     # forward and reverse state passes (grid: batch, head, Dk block, Dv block)
  output: Launch    # forward output (grid: batch, head, chunk, Dv block)
  grad: Launch      # dq, dk, dv and the decay gradient (grid: batch, head, chunk)
  split_grad: bool = False  # two gradient kernels: dq and dv; dk and the decay gradient


# Per (per-channel decay, head_dim_k); `fit_launches` clips the blocks to the head dims and narrows
# the state pass's blocks for small grids. The head_dim 128 launches won H100 sweeps at B=8, T=8K,
# H=16 (bench/results/linear_kernels-2026-11-24.md): state 64x128 blocks beat 64x64 (simple GLA
# fwd + rev 0.98 vs 1.70 ms), output Dv blocks of 128 beat 64 and 8 warps, and the gradient kernel
# with 8 warps over whole head dims beat 4 warps and splitting it over 64-column blocks. Split
# gradient kernels (bench/results/linear_kernels-2026-12-07-delta-defaults.md, fwd+bwd): GLA
# 14.30 -> 8.46 ms, simple GLA 3.91 -> 4.63 ms (only the per-channel decay splits; head dim 64
# not timed).
CONFIGS = {
    (False, 64): Config(chunk=64, sub_chunk=64, state=Launch(4, 3, 64, 64),
                        output=Launch(4, 1, block_v=64), grad=Launch(4)),
    (False, 128): Config(chunk=64, sub_chunk=64, state=Launch(4, 3, 64, 128),
                         output=Launch(4, 1, block_v=128), grad=Launch(8)),
    (True, 64): Config(chunk=64, sub_chunk=32, state=Launch(4, 3, 64, 64),
                       output=Launch(4, 1, block_v=64), grad=Launch(4)),
    (True, 128): Config(chunk=64, sub_chunk=32, state=Launch(4, 3, 64, 128),
                        output=Launch(4, 1, block_v=128), grad=Launch(8), split_grad=True),
}


# ------------------------------------------------------------------------------------------------
# In-kernel helpers (values, not refs). b is a block of cumulative log-decays: [n] for a scalar
# decay, [n, Dk] per channel; `_col` makes it a factor of [n, Dk] rows.


def _col(x, per_channel: bool):
  return x if per_channel else x[:, None]


def _last(b, per_channel: bool):
  """(b's last row as a row factor [1, Dk] or scalar, e^(last row) as a state-row factor)."""
  b_last = row(b, b.shape[0] - 1)
  if per_channel:
    return b_last[None, :], jnp.exp(b_last)[:, None]
  return b_last, jnp.exp(b_last)


def _intra_factors(b_i, b_j, diagonal: bool, per_channel: bool, same=None):
  """Factors of the block A_IJ (query rows b_i, key rows b_j) of the in-chunk matrix:
  A_IJ = weight(q_I qf (k_J kf)^T), returned as (qf, kf, weight). `same` ([rows I, rows J] bool,
  packed documents): the pairs of one document, the others masked to 0."""
  if not per_channel:  # one block per chunk: exact masked pair factor
    rows = b_i.shape[0]
    keep = causal_mask(rows) if same is None else causal_mask(rows) & same
    pair = jnp.exp(jnp.where(keep, b_i[:, None] - b_j[None, :], -jnp.inf))
    return 1.0, 1.0, lambda x: x * pair
  ref = row(b_i, b_i.shape[0] // 2 if diagonal else 0)[None, :]
  def keep():  # built where the weight is applied
    causal = causal_mask(b_i.shape[0]) if diagonal else None
    return same if causal is None else causal if same is None else causal & same
  weight = ((lambda x: x) if same is None and not diagonal else
            (lambda x: jnp.where(keep(), x, 0.0)))
  return jnp.exp(b_i - ref), jnp.exp(ref - b_j), weight


def _same(doc_i, doc_j):
  """[rows I, rows J] bool: pairs of one document (None without segment ids)."""
  return None if doc_i is None else doc_i[:, None] == doc_j[None, :]


def _keep_rows(x, keep):
  """x [n] or [n, D] with the rows where `keep` [n] (bool; None: all) is False zeroed."""
  if keep is None:
    return x
  return jnp.where(keep if x.ndim == 1 else keep[:, None], x, 0.0)


def _rounded(x, dtype):
  """float32 x rounded to bf16 when `dtype` is bf16 (`round_mantissa`), kept in float32: the
  operand a bf16 dot sees."""
  return x if dtype == jnp.float32 else round_mantissa(x, 7)


def _triangular_sum(x, dtype, *, reverse: bool):
  """Inclusive cumulative sum of float32 x along its rows ([n] or [n, D]), from the first row or
  (reverse) from the last. [n]: a masked [n, n] sum; [n, D]: a matmul by a triangular 0/1 matrix,
  x split into three bf16 terms with bf16 inputs (exact to float32 rounding)."""
  return _masked_sum(triangular_mask(x.shape[0], reverse=reverse), x, dtype)


def _masked_sum(mask, x, dtype):
  """sum_j mask_ij x_j for float32 x [m] or [m, D] and a [n, m] bool mask (see `_triangular_sum`).
  """
  if x.ndim == 1:
    return jnp.sum(jnp.where(mask, x[None, :], 0.0), axis=1)
  tri = jnp.where(mask, 1.0, 0.0)
  if dtype == jnp.float32:
    return dot(tri, x, dtype)
  total = 0.0
  for _ in range(3):
    part = _rounded(x, dtype)
    total = total + dot(tri, part, dtype)
    x = x - part
  return total


def _decay_loader(g_ref, sub: int, dtype):
  """load(i) -> b for rows [i * sub, (i + 1) * sub) of the chunk in g_ref ([C] or [C, D] raw
  log-decays): their cumulative sum from the chunk start, in float32, computed once per loader."""
  def raw(j):
    return g_ref[pl.ds(j * sub, sub), ...].astype(jnp.float32)

  @functools.cache
  def load(i):
    b = _triangular_sum(raw(i), dtype, reverse=False)
    for j in range(i):
      before = jnp.sum(raw(j), axis=0)
      b = b + (before if g_ref.ndim == 1 else before[None, :])
    return b
  return load


# ------------------------------------------------------------------------------------------------
# Kernels.


def _state_pass_kernel(*refs, chunk, num_chunks, reverse, scale, per_channel, dtype, segmented):
  """Per (batch, head, Dk block, Dv block): x [T, BK], y [T, BV], g [T] or [T, BK] (log-decays),
  doc [T] int32 (only if `segmented`); init, last [BK, BV] float32; states [NC, BK, BV].

  Forward (x = k, y = v): stores the state at each chunk start, then h <- e^(b_C) h +
  (k e^(b_C - b))^T v. Reverse (x = q, y = do): walks the chunks backwards storing the gradient of
  the state at each chunk end, then dh <- e^(b_C) dh + (scale q e^b)^T do. Segmented: the carry
  survives only a chunk with no document start, and only the keys of the chunk's last document
  (forward) or the queries of its first (reverse) enter it.
  """
  x_ref, y_ref, g_ref, *doc_ref, init_ref, states_ref, last_ref = refs

  def body(i, carry):
    c = num_chunks - 1 - i if reverse else i
    states_ref[c] = carry.astype(states_ref.dtype)
    rows = pl.ds(c * chunk, chunk)
    b = _triangular_sum(g_ref[rows, ...].astype(jnp.float32), dtype, reverse=False)
    b_last, decay = _last(b, per_channel)
    factor = scale * jnp.exp(b) if reverse else jnp.exp(b_last - b)
    x = x_ref[rows, :].astype(jnp.float32) * _col(factor, per_channel)
    if segmented:
      doc = doc_ref[0][rows]
      last_doc = jnp.max(doc)
      x = _keep_rows(x, doc == 0 if reverse else doc == last_doc)
      decay = jnp.where(last_doc == 0, decay, 0.0)
    return decay * carry + dot(x, y_ref[rows, :], dtype, trans_a=True)

  last_ref[...] = lax.fori_loop(0, num_chunks, body, init_ref[...].astype(jnp.float32))


def _doc_loader(doc_ref, sub: int):
  """load(i) -> the chunk-local document ids [sub] int32 of rows [i * sub, (i + 1) * sub), or None
  without segment ids."""
  if doc_ref is None:
    return lambda i: None
  return lambda i: doc_ref[pl.ds(i * sub, sub)]


def _output_kernel(*refs, sub, scale, per_channel, dtype, segmented):
  """Per (batch, head, chunk, Dv block): q, k [C, Dk], v, o [C, BV], g [C] or [C, Dk], doc [C]
  int32 (only if `segmented`), h [Dk, BV]: o = (q e^b) h + mask(A) v, by blocks of `sub` query
  rows. Segmented: h reaches the chunk's first document only, A keeps pairs of one document."""
  q_ref, k_ref, v_ref, g_ref, *doc_ref, h_ref, o_ref = refs
  load_doc = _doc_loader(doc_ref[0] if segmented else None, sub)
  load_b = _decay_loader(g_ref, sub, dtype)
  for i in range(q_ref.shape[0] // sub):
    rows_i = pl.ds(i * sub, sub)
    q_i, b_i, doc_i = q_ref[rows_i, :].astype(jnp.float32) * scale, load_b(i), load_doc(i)
    first = None if doc_i is None else doc_i == 0
    o = dot(_keep_rows(q_i * jnp.exp(_col(b_i, per_channel)), first), h_ref[...], dtype)
    for j in range(i + 1):
      rows_j = pl.ds(j * sub, sub)
      qf, kf, weight = _intra_factors(b_i, load_b(j), j == i, per_channel,
                                      _same(doc_i, load_doc(j)))
      a = weight(dot(q_i * qf, k_ref[rows_j, :].astype(jnp.float32) * kf, dtype, trans_b=True))
      o = o + dot(a, v_ref[rows_j, :], dtype)
    o_ref[rows_i, :] = o.astype(o_ref.dtype)


class _GradChunk:
  """One chunk's operands in the gradient kernels, loaded block by block (operands are re-read,
  not kept live): rows of `sub` tokens, q scaled, decays (`decays()` makes a loader; the dv phase
  gets its own, so its decays are not kept live after it) and the packed-document masks (None
  without segment ids)."""

  def __init__(self, q_ref, k_ref, g_ref, doc_ref, *, sub, scale, dtype, per_channel):
    self.n = q_ref.shape[0] // sub
    self.rows = [pl.ds(i * sub, sub) for i in range(self.n)]
    self.q_ref, self.k_ref, self.g_ref = q_ref, k_ref, g_ref
    self.sub, self.scale, self.dtype, self.per_channel = sub, scale, dtype, per_channel
    self.load_doc = _doc_loader(doc_ref, sub)
    self.last_doc = None if doc_ref is None else jnp.max(doc_ref[...])

  def load_q(self, i):
    return self.q_ref[self.rows[i], :].astype(jnp.float32) * self.scale

  def load_k(self, i):
    return self.k_ref[self.rows[i], :].astype(jnp.float32)

  def decays(self):
    return _decay_loader(self.g_ref, self.sub, self.dtype)

  def in_last(self, i):
    return None if self.last_doc is None else self.load_doc(i) == self.last_doc

  def in_first(self, i):
    return None if self.last_doc is None else self.load_doc(i) == 0

  def same(self, i, j):
    return _same(self.load_doc(i), self.load_doc(j))

  def factors(self, load_b, i, j):
    """(qf, kf, weight) of the block pair (query rows i, key rows j), see `_intra_factors`."""
    return _intra_factors(load_b(i), load_b(j), i == j, self.per_channel, self.same(i, j))


def _dv_phase(c: _GradChunk, do_ref, dh_ref, dv_ref):
  """dv = mask(A)^T do + (k e^(b_C - b)) dh, per key block j."""
  load_b, dtype, per_channel = c.decays(), c.dtype, c.per_channel
  b_last, _ = _last(load_b(c.n - 1), per_channel)
  for j in range(c.n):
    b_j, k_j = load_b(j), c.load_k(j)
    dv = dot(_keep_rows(k_j * jnp.exp(_col(b_last - b_j, per_channel)), c.in_last(j)),
             dh_ref[...], dtype)
    for i in range(j, c.n):
      qf, kf, weight = c.factors(load_b, i, j)
      a = weight(dot(c.load_q(i) * qf, k_j * kf, dtype, trans_b=True))
      dv = dv + dot(a, do_ref[c.rows[i], :], dtype, trans_a=True)
    dv_ref[c.rows[j], :] = dv.astype(dv_ref.dtype)


def _per_token(c: _GradChunk, x):
  """A [sub, Dk] part of dB as the decay gradient's shape: itself per channel, else its row sums."""
  return x if c.per_channel else jnp.sum(x, axis=1)


def _dq_phase(c: _GradChunk, v_ref, do_ref, h_ref, dq_ref, load_b):
  """dq = e^b (do h^T) + (dA k e^(r - b)) e^(b - r), per query block i; returns dB's query part
  per block (q * dq, the in-chunk products from the dot's rounded operands; float32 [sub, Dk] per
  channel, [sub] for a scalar decay)."""
  dtype, per_channel = c.dtype, c.per_channel
  db = []
  for i in range(c.n):
    b_i, q_i = load_b(i), c.load_q(i)
    dq = jnp.exp(_col(b_i, per_channel)) * dot(do_ref[c.rows[i], :], h_ref[...], dtype,
                                               trans_b=True)
    dq = _keep_rows(dq, c.in_first(i))
    db_i = q_i * dq
    for j in range(i + 1):
      qf, kf, weight = c.factors(load_b, i, j)
      da = weight(dot(do_ref[c.rows[i], :], v_ref[c.rows[j], :], dtype, trans_b=True))
      q_op, k_op = (_rounded(x, dtype) for x in (q_i * qf, c.load_k(j) * kf))
      part = dot(_rounded(da, dtype), k_op, dtype)
      dq = dq + part * qf
      db_i = db_i + q_op * part
    dq_ref[c.rows[i], :] = (dq * c.scale).astype(dq_ref.dtype)
    db.append(_per_token(c, db_i))
  return db


def _dk_phase(c: _GradChunk, v_ref, do_ref, h_ref, dh_ref, dk_ref, db_ref, db, load_b):
  """dk = e^(b_C - b) (v dh^T) + (dA^T q e^(b - r)) e^(r - b), per key block j, subtracting dB's
  key part from `db` (the query part per block); then the decay gradient into db_ref: da_t =
  sum_{s >= t} dB_s, the in-chunk reverse cumulative sum plus the part after the chunk,
  sum_e h_{c+1} dh = e^(b_C) sum_e h dh + column sums of k e^(b_C - b) (v dh^T)."""
  dtype, per_channel, n = c.dtype, c.per_channel, c.n
  b_last, s_decay = _last(load_b(n - 1), per_channel)
  hdh = h_ref[...].astype(jnp.float32) * dh_ref[...].astype(jnp.float32)
  after = (jnp.sum(hdh, axis=1)[None, :] * jnp.exp(b_last) if per_channel else
           s_decay * jnp.sum(hdh))
  if c.last_doc is not None:  # h reaches h_{c+1} only through a chunk with no document start
    after = jnp.where(c.last_doc == 0, after, 0.0)
  db = list(db)
  for j in range(n):
    b_j, k_j = load_b(j), c.load_k(j)
    dk = jnp.exp(_col(b_last - b_j, per_channel)) * dot(v_ref[c.rows[j], :], dh_ref[...], dtype,
                                                         trans_b=True)
    dk = _keep_rows(dk, c.in_last(j))
    after = after + (jnp.sum(k_j * dk, axis=0)[None, :] if per_channel else jnp.sum(k_j * dk))
    db[j] = db[j] - _per_token(c, k_j * dk)
    for i in range(j, n):
      qf, kf, weight = c.factors(load_b, i, j)
      da = weight(dot(do_ref[c.rows[i], :], v_ref[c.rows[j], :], dtype, trans_b=True))
      q_op, k_op = (_rounded(x, dtype) for x in (c.load_q(i) * qf, k_j * kf))
      part = dot(_rounded(da, dtype), q_op, dtype, trans_a=True)
      dk = dk + part * kf
      db[j] = db[j] - _per_token(c, k_op * part)
    dk_ref[c.rows[j], :] = dk.astype(dk_ref.dtype)

  if c.last_doc is not None:  # sums restart at each document start; `after` reaches the last one
    for i in range(n):
      total = _keep_rows(jnp.zeros_like(db[i]) + after, c.in_last(i))
      total = total + _masked_sum(triangular_mask(c.sub, reverse=True) & c.same(i, i), db[i], dtype)
      for j in range(i + 1, n):
        total = total + _masked_sum(c.same(i, j), db[j], dtype)
      db_ref[c.rows[i], ...] = total
    return
  for i in reversed(range(n)):
    db_ref[c.rows[i], ...] = _triangular_sum(db[i], dtype, reverse=True) + after
    after = after + (jnp.sum(db[i], axis=0)[None, :] if per_channel else jnp.sum(db[i]))


def _grad_kernel(*refs, sub, scale, per_channel, dtype, segmented, part):
  """Per (batch, head, chunk): q, k, dq, dk [C, Dk]; v, do, dv [C, Dv]; g, db [C] or [C, Dk]; doc
  [C] int32 (only if `segmented`); h (state at the chunk start), dh (gradient of the state at its
  end) [Dk, Dv].

  dq, dk, dv of the chunk and the gradient of the per-token log-decays (see the module docstring),
  by blocks of `sub` rows. dq and dk in the phases are the gradients w.r.t. scale * q and k.
  Segmented: the masks of the forward mirrored (h and dq's state term: the chunk's first document;
  dh and the k, v state terms: its last), and the decay gradient's sums stay inside each document.

  `part` "all" runs every phase in one kernel. "dq_dv" and "dk" split them over two kernels (fewer
  live values: no register spills) joined through HBM: "dq_dv" writes dq, dv and dB's query part
  (float32, the decay gradient's shape) into its `dbq` output; "dk" reads that as `dbq` and writes
  dk and the decay gradient.
  """
  if part == "all":
    (q_ref, k_ref, v_ref, do_ref, g_ref, *doc_ref, h_ref, dh_ref,
     dq_ref, dk_ref, dv_ref, db_ref) = refs
  elif part == "dq_dv":
    q_ref, k_ref, v_ref, do_ref, g_ref, *doc_ref, h_ref, dh_ref, dq_ref, dv_ref, dbq_ref = refs
  else:
    q_ref, k_ref, v_ref, do_ref, g_ref, *doc_ref, h_ref, dh_ref, dbq_ref, dk_ref, db_ref = refs
  c = _GradChunk(q_ref, k_ref, g_ref, doc_ref[0] if segmented else None, sub=sub, scale=scale,
                 dtype=dtype, per_channel=per_channel)
  load_b = None
  if part in ("all", "dq_dv"):
    _dv_phase(c, do_ref, dh_ref, dv_ref)
    load_b = c.decays()  # one kernel: the dk phase reuses the dq phase's decays
    db = _dq_phase(c, v_ref, do_ref, h_ref, dq_ref, load_b)
    if part == "dq_dv":
      for i in range(c.n):
        dbq_ref[c.rows[i], ...] = db[i]
      return
  else:
    db = [dbq_ref[c.rows[i], ...] for i in range(c.n)]
  _dk_phase(c, v_ref, do_ref, h_ref, dh_ref, dk_ref, db_ref, db, load_b or c.decays())


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays: q, k [B,T,H,Dk]; v, o [B,T,H,Dv]; g [B,T,H] or [B,T,H,Dk] (log-
# decays); states [B,H,NC,Dk,Dv]; a state [B,H,Dk,Dv] float32. T is a multiple of the chunk.


def _state_pass(x, y, g, init, doc, config, interpret, *, reverse, scale, states_dtype):
  """(states [B,H,NC,Dk,Dv] in states_dtype, last carry [B,H,Dk,Dv] float32); see the kernel."""
  batch, t, heads, dk = x.shape
  dv = y.shape[-1]
  bk, bv, chunk = config.state.block_k, config.state.block_v, config.chunk
  num_chunks = t // chunk
  per_channel = g.ndim == 4
  g_spec = (pl.BlockSpec((None, t, None, bk), lambda i, h, kk, vv: (i, 0, h, kk)) if per_channel
            else pl.BlockSpec((None, t, None), lambda i, h, kk, vv: (i, 0, h)))
  doc_spec, docs = doc_specs(doc, (t, lambda i, h, kk, vv: (i, 0)))
  state_spec = pl.BlockSpec((None, None, bk, bv), lambda i, h, kk, vv: (i, h, kk, vv))
  return pl.pallas_call(
      functools.partial(_state_pass_kernel, chunk=chunk, num_chunks=num_chunks, reverse=reverse,
                        scale=scale, per_channel=per_channel, dtype=x.dtype,
                        segmented=doc is not None),
      grid=(batch, heads, dk // bk, dv // bv),
      in_specs=(pl.BlockSpec((None, t, None, bk), lambda i, h, kk, vv: (i, 0, h, kk)),
                pl.BlockSpec((None, t, None, bv), lambda i, h, kk, vv: (i, 0, h, vv)),
                g_spec, *doc_spec, state_spec),
      out_specs=(pl.BlockSpec((None, None, num_chunks, bk, bv),
                              lambda i, h, kk, vv: (i, h, 0, kk, vv)), state_spec),
      out_shape=(jax.ShapeDtypeStruct((batch, heads, num_chunks, dk, dv), states_dtype),
                 jax.ShapeDtypeStruct((batch, heads, dk, dv), jnp.float32)),
      compiler_params=compiler_params(config.state),
      interpret=interpret,
  )(x, y, g, *docs, init)


def _output(q, k, v, g, doc, states, config, interpret, *, scale):
  batch, t, heads, dk = q.shape
  dv = v.shape[-1]
  bv, chunk = config.output.block_v, config.chunk
  per_channel = g.ndim == 4
  v_spec = chunk_spec(chunk, bv, blocked=True)
  doc_spec, docs = doc_specs(doc, (chunk, lambda i, h, c, j: (i, c)))
  return pl.pallas_call(
      functools.partial(_output_kernel, sub=config.sub_chunk, scale=scale,
                        per_channel=per_channel, dtype=q.dtype, segmented=doc is not None),
      grid=(batch, heads, t // chunk, dv // bv),
      in_specs=(chunk_spec(chunk, dk), chunk_spec(chunk, dk), v_spec,
                chunk_spec(chunk, dk if per_channel else None), *doc_spec,
                pl.BlockSpec((None, None, None, dk, bv), lambda i, h, c, j: (i, h, c, 0, j))),
      out_specs=v_spec,
      out_shape=jax.ShapeDtypeStruct((batch, t, heads, dv), q.dtype),
      compiler_params=compiler_params(config.output),
      interpret=interpret,
  )(q, k, v, g, *docs, states)


def _grads(q, k, v, do, g, doc, states, dstates, config, interpret, *, scale):
  """(dq, dk, dv, d log-decay float32) from one gradient kernel, or two with `config.split_grad`."""
  batch, t, heads, dk = q.shape
  dv = v.shape[-1]
  chunk = config.chunk
  per_channel = g.ndim == 4
  state_spec = pl.BlockSpec((None, None, None, dk, dv), lambda i, h, c: (i, h, c, 0, 0))
  g_spec = chunk_spec(chunk, dk if per_channel else None)
  doc_spec, docs = doc_specs(doc, (chunk, lambda i, h, c: (i, c)))
  in_specs = (chunk_spec(chunk, dk), chunk_spec(chunk, dk), chunk_spec(chunk, dv),
              chunk_spec(chunk, dv), g_spec, *doc_spec, state_spec, state_spec)
  shapes = dict(dq=jax.ShapeDtypeStruct(q.shape, q.dtype),
                dk=jax.ShapeDtypeStruct(k.shape, k.dtype),
                dv=jax.ShapeDtypeStruct(v.shape, v.dtype),
                db=jax.ShapeDtypeStruct(g.shape, jnp.float32))
  specs = dict(dq=chunk_spec(chunk, dk), dk=chunk_spec(chunk, dk), dv=chunk_spec(chunk, dv),
               db=g_spec)
  operands = (q, k, v, do, g, *docs, states, dstates)

  def call(part, outputs, extra=()):
    return pl.pallas_call(
        functools.partial(_grad_kernel, sub=config.sub_chunk, scale=scale,
                          per_channel=per_channel, dtype=q.dtype, segmented=doc is not None,
                          part=part),
        grid=(batch, heads, t // chunk),
        in_specs=in_specs + (g_spec,) * len(extra),
        out_specs=tuple(specs[name] for name in outputs),
        out_shape=tuple(shapes[name] for name in outputs),
        compiler_params=compiler_params(config.grad),
        interpret=interpret,
    )(*operands, *extra)

  if not config.split_grad:
    return call("all", ("dq", "dk", "dv", "db"))
  dq, dv, dbq = call("dq_dv", ("dq", "dv", "db"))
  dk, db = call("dk", ("dk", "db"), extra=(dbq,))
  return dq, dk, dv, db


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _gla(q, k, v, log_decay, initial_state, doc, scale, config, interpret):
  return _gla_forward(q, k, v, log_decay, initial_state, doc, scale, config, interpret)[0]


def _gla_forward(q, k, v, log_decay, initial_state, doc, scale, config, interpret):
  states, final_state = _state_pass(k, v, log_decay, initial_state, doc, config, interpret,
                                    reverse=False, scale=1.0, states_dtype=q.dtype)
  o = _output(q, k, v, log_decay, doc, states, config, interpret, scale=scale)
  return (o, final_state), (q, k, v, log_decay, doc, states)


def _gla_backward(scale, config, interpret, residuals, cotangents):
  q, k, v, log_decay, doc, states = residuals
  do, dfinal = cotangents
  do = do.astype(q.dtype)
  dstates, dinitial = _state_pass(q, do, log_decay, dfinal, doc, config, interpret, reverse=True,
                                  scale=scale, states_dtype=q.dtype)
  dq, dk, dv, dlog_decay = _grads(q, k, v, do, log_decay, doc, states, dstates, config, interpret,
                                  scale=scale)
  return dq, dk, dv, dlog_decay.astype(log_decay.dtype), dinitial, None


_gla.defvjp(_gla_forward, _gla_backward)


def gated_linear_attention(q, k, v, log_decay, initial_state, *, scale: float,
                           segment_ids=None, interpret: bool = False):
  """Chunked gated linear attention on GPU (or in interpret mode), differentiable in every input.

  Args:
    q, k: [B, T, H, Dk] (k already broadcast to q's heads); v: [B, T, H, Dv]; bf16 or float32,
      one dtype. Dk, Dv in `chunk_common.HEAD_DIMS`.
    log_decay: [B, T, H] (scalar decay per head) or [B, T, H, Dk] (per key channel), <= 0.
    initial_state: [B, H, Dk, Dv] float32.
    scale: multiplies q.
    segment_ids: [B, T] int packed-document ids, or None: a change of id between tokens t - 1 and t
      resets the state to zero before t (initial_state reaches the row's first document only; the
      final state is the last document's). None compiles the kernels without any document mask.
    interpret: run the kernels in Pallas interpret mode (CPU tests).

  Returns:
    (o [B, T, H, Dv] in q's dtype, final state [B, H, Dk, Dv] float32). T need not be a multiple of
    the chunk: the sequence is padded with k = v = 0 and log-decay 0, which leave the state as is.
  """
  batch, t, heads, dk = q.shape
  dv = v.shape[-1]
  config = fit_launches(CONFIGS[(log_decay.ndim == 4, dk)], batch, heads, dk, dv)
  doc = None if segment_ids is None else chunk_documents(segment_ids, config.chunk)
  pad = (-t) % config.chunk
  if pad:
    q, k, v, log_decay = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
                          for x in (q, k, v, log_decay))
  o, final_state = _gla(q, k, v, log_decay, initial_state.astype(jnp.float32), doc, float(scale),
                        config, interpret)
  return o[:, :t], final_state
