"""Pallas (Triton) GPU kernels for the mLSTM (xLSTM matrix memory), forward and backward, wired
with `jax.custom_vjp`.

Recurrence per batch and head (jaxchunk.ops.mlstm), with log gates log i_t (the input-gate
pre-activation) and log f_t <= 0, and the stabilised state (C [Dk, Dv], n [Dk], m):

  m_t = max(log f_t + m_{t-1}, log i_t)
  C_t = exp(log f_t + m_{t-1} - m_t) C_{t-1} + exp(log i_t - m_t) k_t^T v_t   (n_t likewise, k_t)
  h_t = (q_t C_t) / (max(|q_t . n_t|, exp(-m_t)) + eps)                        (q already scaled)

Chunked form (TFLA). In a chunk of L tokens entered with (C_0, n_0, m_0), let b be the chunk-local
inclusive cumulative log forget gate, r_j = log i_j - b_j the log weight of key j, and
M_i = max(m_0, max_{j <= i} r_j) the query's stabiliser relative to b_i, so that m_i = b_i + M_i.
Then, with W_ij = exp(r_j - M_i) for j <= i (0 above the diagonal), g_i = exp(m_0 - M_i),
u_j = exp(r_j - M_L) and gamma = g_L (every exponent <= 0: nothing overflows),

  P     = (q k^T) * W,
  num_i = g_i q_i C_0 + (P v)_i,     qn_i = g_i q_i . n_0 + sum_j P_ij,
  h_i   = num_i / (max(|qn_i|, exp(-m_i)) + eps),
  C_L   = gamma C_0 + (k u)^T v,     n_L = gamma n_0 + sum_j u_j k_j,     m_L = b_L + M_L.

The stabilisers (r, M, m_0 and m per token) are O(T) scalar work done in plain JAX by
`_stabilisers` (the chunk-to-chunk m_0 by an associative max-plus scan, no sequential loop) and
differentiated by autodiff; the kernels take them as inputs and return their gradients. The grid
is (batch, heads, Dv blocks); each program walks the chunks with its [Dk, BV] slice of C and the
whole n in registers (n and qn are recomputed by every Dv block; contributions that would be
counted once per block carry the factor `first`, 1 in block 0 and 0 elsewhere).

Backward. From dh: dnum = dh / den, dden = -(dh . h) / den, and the max sends dden either to qn
(dqn = dden sign(qn)) or to the floor exp(-m) (in XLA, O(T Dv)). With dP = dnum v^T + dqn 1^T,

  dq = (dP * W) k + g (dnum C_0^T + dqn n_0^T),
  dk = (dP * W)^T q + u (v dC_L^T + dn_L),     dv = P^T dnum + (k u) dC_L,
  dC_0 = gamma dC_L + (q g)^T dnum,            dn_0 = gamma dn_L + (q g)^T dqn,
  dr_j = sum_i (dP * P)_ij + B_j,              B_j = u_j k_j . (dC_L v_j + dn_L),

from a kernel walking the chunks forward (dq, and A_i = g_i q_i . (dnum_i C_0^T + dqn_i n_0), the
gradient of the log inter weight m_0 - M_i) and one walking them in reverse carrying (dC, dn)
(the rest). num and qn scale as exp(-M_i), so dM_i = -(A_i + sum_j (dP * P)_ij) (this equals
-(dh_i . h_i + dqn_i qn_i), but taken from the kernels' own dP and P it cancels consistently
against dr: with bf16 inputs the forget-gate gradient error drops from about 1.3e-2 to 4e-3).
The state term of chunk k goes through X_k = <dC_k, C_k> + <dn_k, n_k> at the chunk's entering
state, which obeys X_k = X_{k+1} + sum_k A - sum_k B (X at the end from the final state and its
cotangent): dm_0 of chunk k gains X_{k+1} - sum_k B and dM at its last token loses X_{k+1}. No
[Dk, Dv] state per chunk is ever stored.

Packed documents (segment_ids): a document start resets (C, n, m) to (0, 0, 0) before the token.
The kernels then also take each token's document index within its chunk (int32, 0 for the document
running at the chunk start, +1 after each start; a static flag: without ids they compile exactly as
before). `_stabilisers` gives a token of a document d > 0 starting at s the lower bound -b_{s-1}
(the empty state's m = 0) in place of m_0 in M, and m_0 = -inf, so g = 0 there: the carried-in
state reaches the chunk's first document only, and gamma = g_L = 0 when a document starts in the
chunk. In the kernels W keeps the pairs of one document and u the keys of the chunk's last
document. Every backward term then follows from the same masked W, g, u, gamma: A and the dq, dC_0
state terms vanish outside the first document, B and the dk, dv state terms outside the last, and
X_k = X_{k+1} + sum A - sum B still holds (the dm_0 rows of tokens with m_0 = -inf are dropped by
autodiff: a chunk's m_0 then gets the first document's A, plus X_{k+1} - sum B if no document
starts in it).

Operands of the matmuls are in the input dtype (bf16 or float32; float32 with full-precision
IEEE dots), accumulation and states in float32; with bf16 inputs the dots with the state and
those giving dq, dk keep float32 operands (tf32 on the GPU; see `_dot`). This module never
imports jaxchunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu.chunk_common import (Config, causal_mask, chunk_documents, dot, fit_block_v,
                                             row)


# Block sizes per head_dim_k (`fit_block_v` narrows block_v for small grids).
CONFIGS = {
    64: Config(chunk=64, block_v=64, num_warps=4, num_stages=2),
    128: Config(chunk=64, block_v=64, num_warps=4, num_stages=2),
}
def _config(batch: int, heads: int, dk: int, dv: int) -> Config:
  return fit_block_v(CONFIGS[dk], batch, heads, dv)


# ------------------------------------------------------------------------------------------------
# In-kernel helpers (values, not refs).


def _chunk_weights(r, big_m, m0, causal, doc):
  """Weights of one chunk from r, M, m_0 [L] and doc [L] int32 or None (module docstring).

  Returns (W [L, L] masked above the diagonal, g [L], u [L], gamma scalar). With documents, W keeps
  the pairs of one document and u the keys of the chunk's last document (g and gamma need no mask:
  m_0 is -inf outside the chunk's first document).
  """
  mask = causal if doc is None else causal & (doc[:, None] == doc[None, :])
  w = jnp.exp(jnp.where(mask, r[None, :] - big_m[:, None], -jnp.inf))
  g = jnp.exp(m0 - big_m)
  u = jnp.exp(r - row(big_m, big_m.shape[0] - 1))
  if doc is not None:
    u = jnp.where(doc == jnp.max(doc), u, 0.0)
  return w, g, u, row(g, g.shape[0] - 1)


def _split(refs, segmented: bool, num_in: int):
  """Kernel refs -> (q, k, v, r, M, m_0 and doc refs (doc None without documents), the other
  inputs and the outputs), for `num_in` inputs after the first six (doc not counted)."""
  load = tuple(refs[:6]) + ((refs[6],) if segmented else (None,))
  rest = refs[6 + segmented:]
  return load, rest[:num_in], rest[num_in:]


def _load(refs, rows):
  """q, k (float32, q scaled later), v, the per-token r, M, m_0 and the document indices (None
  without documents) of the chunk at `rows`."""
  q_ref, k_ref, v_ref, r_ref, big_m_ref, m0_ref, doc_ref = refs
  return (q_ref[rows, :].astype(jnp.float32), k_ref[rows, :].astype(jnp.float32), v_ref[rows, :],
          r_ref[rows], big_m_ref[rows], m0_ref[rows], None if doc_ref is None else doc_ref[rows])


# ------------------------------------------------------------------------------------------------
# Kernels. Refs are one (batch, head, Dv block): q, k [T, Dk]; v, h, dh [T, BV]; per-token
# scalars [T]; C and dC [Dk, BV]; n and dn [Dk].


def _forward_kernel(*refs, chunk, num_chunks, scale, eps, dtype, segmented):
  causal = causal_mask(chunk)
  refs, (m_ref, c0_ref, n0_ref), (h_ref, qn_ref, c_ref, n_ref) = _split(refs, segmented, 3)

  def body(c, carry):
    state, norm = carry
    rows = pl.ds(c * chunk, chunk)
    q, k, v, r, big_m, m0, doc = _load(refs, rows)
    q = q * scale
    w, g, u, gamma = _chunk_weights(r, big_m, m0, causal, doc)
    p = dot(q, k, dtype, trans_b=True) * w
    num = dot(p, v, dtype) + g[:, None] * dot(q, state, dtype, wide=True)
    qn = jnp.sum(p, axis=1) + g * jnp.sum(q * norm[None, :], axis=1)
    den = jnp.maximum(jnp.abs(qn), jnp.exp(-m_ref[rows])) + eps
    h_ref[rows, :] = (num / den[:, None]).astype(h_ref.dtype)
    qn_ref[rows] = qn
    k_u = k * u[:, None]
    return (gamma * state + dot(k_u, v, dtype, wide=True, trans_a=True),
            gamma * norm + jnp.sum(k_u, axis=0))

  state, norm = lax.fori_loop(0, num_chunks, body, (c0_ref[...], n0_ref[...]))
  c_ref[...] = state
  n_ref[...] = norm


def _backward_dq_kernel(*refs, chunk, num_chunks, scale, dtype, segmented):
  causal = causal_mask(chunk)
  first = (pl.program_id(2) == 0).astype(jnp.float32)
  refs, (dh_ref, inv_den_ref, dqn_ref, c0_ref, n0_ref), (dq_ref, a_ref) = _split(
      refs, segmented, 5)

  def body(c, carry):
    state, norm = carry
    rows = pl.ds(c * chunk, chunk)
    q, k, v, r, big_m, m0, doc = _load(refs, rows)
    q = q * scale
    dnum = dh_ref[rows, :].astype(jnp.float32) * inv_den_ref[rows][:, None]
    dqn = first * dqn_ref[rows]
    w, g, u, gamma = _chunk_weights(r, big_m, m0, causal, doc)
    dp = dot(dnum, v, dtype, trans_b=True) + dqn[:, None]
    dq_inter = dot(dnum, state, dtype, wide=True, trans_b=True) + dqn[:, None] * norm[None, :]
    dq_ref[rows, :] = (dot(dp * w, k, dtype, wide=True) + g[:, None] * dq_inter) * scale
    a_ref[rows] = g * jnp.sum(q * dq_inter, axis=1)
    k_u = k * u[:, None]
    return (gamma * state + dot(k_u, v, dtype, wide=True, trans_a=True),
            gamma * norm + jnp.sum(k_u, axis=0))

  lax.fori_loop(0, num_chunks, body, (c0_ref[...], n0_ref[...]))


def _backward_dkv_kernel(*refs, chunk, num_chunks, scale, dtype, segmented):
  causal = causal_mask(chunk)
  first = (pl.program_id(2) == 0).astype(jnp.float32)
  refs, (dh_ref, inv_den_ref, dqn_ref, dc_ref, dn_ref), outs = _split(refs, segmented, 5)
  dk_ref, dv_ref, dr_ref, b_ref, pull_ref, dc0_ref, dn0_ref = outs

  def body(i, carry):
    dstate, dnorm = carry
    rows = pl.ds((num_chunks - 1 - i) * chunk, chunk)
    q, k, v, r, big_m, m0, doc = _load(refs, rows)
    q = q * scale
    dnum = dh_ref[rows, :].astype(jnp.float32) * inv_den_ref[rows][:, None]
    dqn = dqn_ref[rows]
    w, g, u, gamma = _chunk_weights(r, big_m, m0, causal, doc)
    p = dot(q, k, dtype, trans_b=True) * w
    dp = dot(dnum, v, dtype, trans_b=True) + first * dqn[:, None]
    dk_state = dot(v, dstate, dtype, wide=True, trans_b=True) + first * dnorm[None, :]
    dk_ref[rows, :] = dot(dp * w, q, dtype, wide=True, trans_a=True) + u[:, None] * dk_state
    k_u = k * u[:, None]
    dv = dot(p, dnum, dtype, trans_a=True) + dot(k_u, dstate, dtype, wide=True)
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    state_term = jnp.sum(k_u * dk_state, axis=1)
    dp_p = dp * p
    dr_ref[rows] = jnp.sum(dp_p, axis=0) + state_term
    b_ref[rows] = state_term
    pull_ref[rows] = jnp.sum(dp_p, axis=1)
    q_g = q * g[:, None]
    return (gamma * dstate + dot(q_g, dnum, dtype, wide=True, trans_a=True),
            gamma * dnorm + jnp.sum(q_g * dqn[:, None], axis=0))

  dstate, dnorm = lax.fori_loop(0, num_chunks, body, (dc_ref[...], dn_ref[...]))
  dc0_ref[...] = dstate
  dn0_ref[...] = dnorm


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays: q, k [B,T,H,Dk]; v, h [B,T,H,Dv]; per-token scalars [B,T,H]
# float32; doc [B,T] int32 (packed documents only); C [B,H,Dk,Dv] and n [B,H,Dk] float32.
# "partial" outputs have a leading Dv-block axis (summed, or read at block 0 for values every block
# computes alike). T is a multiple of the chunk.


def _specs(shapes: dict, names, block_v: int):
  """BlockSpecs over the grid (batch, head, Dv block) for the named operands."""
  t, dk = shapes["t"], shapes["dk"]
  table = {
      "qk": pl.BlockSpec((None, t, None, dk), lambda b, h, j: (b, 0, h, 0)),
      "v": pl.BlockSpec((None, t, None, block_v), lambda b, h, j: (b, 0, h, j)),
      "token": pl.BlockSpec((None, t, None), lambda b, h, j: (b, 0, h)),
      "doc": pl.BlockSpec((None, t), lambda b, h, j: (b, 0)),
      "state": pl.BlockSpec((None, None, dk, block_v), lambda b, h, j: (b, h, 0, j)),
      "norm": pl.BlockSpec((None, None, dk), lambda b, h, j: (b, h, 0)),
      "qk_partial": pl.BlockSpec((None, None, t, None, dk), lambda b, h, j: (j, b, 0, h, 0)),
      "token_partial": pl.BlockSpec((None, None, t, None), lambda b, h, j: (j, b, 0, h)),
      "norm_partial": pl.BlockSpec((None, None, None, dk), lambda b, h, j: (j, b, h, 0)),
  }
  return tuple(table[n] for n in names)


def _out_shapes(names, q, v, num_v: int):
  """ShapeDtypeStructs of the named outputs (float32 except "v", in v's dtype)."""
  batch, t, heads, dk = q.shape
  dv = v.shape[-1]
  table = {
      "v": ((batch, t, heads, dv), v.dtype),
      "state": ((batch, heads, dk, dv), jnp.float32),
      "qk_partial": ((num_v, batch, t, heads, dk), jnp.float32),
      "token_partial": ((num_v, batch, t, heads), jnp.float32),
      "norm_partial": ((num_v, batch, heads, dk), jnp.float32),
  }
  return tuple(jax.ShapeDtypeStruct(*table[n]) for n in names)


def _call(kernel, in_names, out_names, q, v, doc, config, interpret, *args, **kw):
  """Runs `kernel` on q, k, v, r, M, m_0, then doc if given (static: without it the kernels
  compile with no document mask), then the rest of `args`."""
  batch, t, heads, dk = q.shape
  num_v = v.shape[-1] // config.block_v
  shapes = dict(t=t, dk=dk)
  segmented = doc is not None
  if segmented:
    in_names = in_names[:6] + ("doc",) + in_names[6:]
    args = args[:6] + (doc,) + args[6:]
  return pl.pallas_call(
      functools.partial(kernel, chunk=config.chunk, num_chunks=t // config.chunk, dtype=q.dtype,
                        segmented=segmented, **kw),
      grid=(batch, heads, num_v),
      in_specs=_specs(shapes, in_names, config.block_v),
      out_specs=_specs(shapes, out_names, config.block_v),
      out_shape=_out_shapes(out_names, q, v, num_v),
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
  )(*args)


_IN = ("qk", "qk", "v", "token", "token", "token")   # q, k, v, r, M, m_0


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13))
def _mlstm_chunks(q, k, v, r, big_m, m0, m, c0, n0, doc, scale, eps, config, interpret):
  """(h [B,T,H,Dv] in v's dtype, C_T [B,H,Dk,Dv], n_T [B,H,Dk]) from the kernel inputs (doc: the
  per-token document index within its chunk [B,T] int32, or None)."""
  return _mlstm_chunks_forward(q, k, v, r, big_m, m0, m, c0, n0, doc, scale, eps, config,
                               interpret)[0]


def _mlstm_chunks_forward(q, k, v, r, big_m, m0, m, c0, n0, doc, scale, eps, config, interpret):
  h, qn, c, n = _call(
      _forward_kernel, _IN + ("token", "state", "norm"),
      ("v", "token_partial", "state", "norm_partial"), q, v, doc, config, interpret,
      q, k, v, r, big_m, m0, m, c0, n0, scale=scale, eps=eps)
  qn, n = qn[0], n[0]
  return (h, c, n), (q, k, v, r, big_m, m0, m, c0, n0, doc, h, qn, c, n)


def _mlstm_chunks_backward(scale, eps, config, interpret, residuals, cotangents):
  q, k, v, r, big_m, m0, m, c0, n0, doc, h, qn, c, n = residuals
  dh, dc, dn = cotangents
  batch, t, heads, _ = q.shape
  chunk, num_chunks = config.chunk, t // config.chunk
  floor = jnp.exp(-m)
  den = jnp.maximum(jnp.abs(qn), floor) + eps
  dh_h = jnp.sum(dh.astype(jnp.float32) * h.astype(jnp.float32), axis=-1)
  dden = -dh_h / den
  to_qn = jnp.abs(qn) > floor
  dqn = jnp.where(to_qn, dden * jnp.sign(qn), 0.0)
  dm = jnp.where(to_qn, 0.0, -dden * floor)
  inv_den = 1.0 / den

  dq, a = _call(_backward_dq_kernel, _IN + ("v", "token", "token", "state", "norm"),
                ("qk_partial", "token_partial"), q, v, doc, config, interpret,
                q, k, v, r, big_m, m0, dh, inv_den, dqn, c0, n0, scale=scale)
  dk, dv, dr, b, pull, dc0, dn0 = _call(
      _backward_dkv_kernel, _IN + ("v", "token", "token", "state", "norm"),
      ("qk_partial", "v", "token_partial", "token_partial", "token_partial", "state",
       "norm_partial"), q, v, doc, config, interpret,
      q, k, v, r, big_m, m0, dh, inv_den, dqn, dc, dn, scale=scale)
  dq, dk, dr, a, b, pull, dn0 = (dq.sum(0), dk.sum(0), dr.sum(0), a.sum(0), b.sum(0), pull.sum(0),
                                 dn0[0])

  # X_{k+1} = <dC, C> + <dn, n> at the end of each chunk: X_T plus the later chunks' sum A - sum B.
  x_end = jnp.sum(dc * c, axis=(-2, -1)) + jnp.sum(dn * n, axis=-1)              # [B,H]
  delta = (a - b).reshape(batch, num_chunks, chunk, heads).sum(2)                # [B,N,H]
  later = jnp.flip(jnp.cumsum(jnp.flip(delta, 1), axis=1), 1) - delta
  x_after = x_end[:, None] + later                                               # [B,N,H]
  at_last = (jnp.arange(chunk) == chunk - 1)[None, None, :, None]
  x_last = jnp.where(at_last, x_after[:, :, None], 0.0).reshape(batch, t, heads)
  dm0 = a - b + x_last
  dbig_m = -(a + pull) - x_last
  return (dq.astype(q.dtype), dk.astype(k.dtype), dv, dr, dbig_m, dm0, dm, dc0, dn0, None)


_mlstm_chunks.defvjp(_mlstm_chunks_forward, _mlstm_chunks_backward)


def _segmented(combine, flags, values, axis):
  """Inclusive scan of `combine` over `axis` restarting where `flags` is True."""
  def op(x, y):
    (f1, v1), (f2, v2) = x, y
    return f1 | f2, jnp.where(f2, v2, combine(v1, v2))
  return lax.associative_scan(op, (flags, values), axis=axis)[1]


def _stabilisers(log_i, log_f, m_init, chunk: int, doc=None):
  """Per-token r, M, m_0 and m (module docstring), and the final m, by differentiable O(T) work.

  The stabiliser entering each chunk follows m_{k+1} = s_k + max(m_k, top_k) (s_k: the chunk's
  total log forget gate, top_k: its largest r), a max-plus linear recurrence evaluated by an
  associative scan (O(log N) depth, no sequential loop over chunks). At each chunk's last token,
  M is set to m_{k+1} - s_k (equal up to rounding), so that the state a chunk hands on is
  stabilised by exactly the m_0 the next chunk reads.

  Packed documents (doc [B,T] int32, each token's document within its chunk; see `mlstm`): a
  document d > 0 starting at s in the chunk starts from the empty state (m = 0 before s, i.e.
  -b_{s-1} relative to b), so its tokens take M_i = max(-b_{s-1}, max of r over [s, i]) and the
  kernel's m_0 input is -inf there (g = 0: no carried-in state). A chunk whose last document is not
  0 hands on m_{k+1} = s_k + M_L whatever m_k (the scan's maps become constants there).

  log_i, log_f [B,T,H] float32 with T a multiple of `chunk`; m_init [B,H].
  Returns (r, M, m_0, m), each [B,T,H], and m_T [B,H].
  """
  batch, t, heads = log_i.shape
  num_chunks = t // chunk
  shape = (batch, num_chunks, chunk, heads)
  cum_f = jnp.cumsum(log_f.reshape(shape), axis=2)
  r = log_i.reshape(shape) - cum_f
  total_f = cum_f[:, :, -1]                                                      # [B,N,H]
  at_last = (jnp.arange(chunk) == chunk - 1)[:, None]
  if doc is None:
    running = lax.cummax(r, axis=2)

    def compose(first, second):  # maps x -> max(x + a, c), applied in order
      (a1, c1), (a2, c2) = first, second
      return a1 + a2, jnp.maximum(c1 + a2, c2)

    shift, peak = lax.associative_scan(compose, (total_f, total_f + running[:, :, -1]), axis=1)
    m_next = jnp.maximum(m_init[:, None] + shift, peak)                         # [B,N,H]
    m0 = jnp.concatenate([m_init[:, None], m_next[:, :-1]], axis=1)[:, :, None]  # [B,N,1,H]
    big_m = jnp.where(at_last, (m_next - total_f)[:, :, None], jnp.maximum(m0, running))
    per_token = (r, big_m, jnp.broadcast_to(m0, shape), cum_f + big_m)
    return tuple(x.reshape(batch, t, heads) for x in per_token), m_next[:, -1]

  doc = doc.reshape(batch, num_chunks, chunk)[..., None]                        # [B,N,L,1]
  first = doc == 0
  starts = jnp.diff(doc, axis=2, prepend=doc[:, :, :1]) != 0
  running = _segmented(jnp.maximum, jnp.broadcast_to(starts, shape), r, axis=2)
  # -b_{s-1} (the empty state's m = 0 relative to b) at each token of a document d > 0, as the xla
  # path computes it (log f summed from the document's start: b_i - (b - log f)_s).
  positions = jnp.arange(chunk)[:, None]
  doc_start = lax.cummax(jnp.where(starts, positions, 0), axis=2)
  empty = -jnp.take_along_axis(cum_f - log_f.reshape(shape), jnp.broadcast_to(doc_start, shape),
                               axis=2)
  reset = jnp.broadcast_to(doc[:, :, -1] != 0, total_f.shape)                     # [B,N,H]
  top = jnp.where(reset, jnp.maximum(empty[:, :, -1], running[:, :, -1]), running[:, :, -1])

  def compose(first, second):  # maps x -> c if z else max(x + a, c), applied in order
    (a1, c1, z1), (a2, c2, z2) = first, second
    return a1 + a2, jnp.where(z2, c2, jnp.maximum(c1 + a2, c2)), z1 | z2

  shift, peak, fixed = lax.associative_scan(compose, (total_f, total_f + top, reset), axis=1)
  m_next = jnp.where(fixed, peak, jnp.maximum(m_init[:, None] + shift, peak))   # [B,N,H]
  m0 = jnp.concatenate([m_init[:, None], m_next[:, :-1]], axis=1)[:, :, None]    # [B,N,1,H]
  base = jnp.where(first, m0, empty)
  big_m = jnp.where(at_last, (m_next - total_f)[:, :, None], jnp.maximum(base, running))
  per_token = (r, big_m, jnp.where(first, m0, -jnp.inf), cum_f + big_m)
  return tuple(x.reshape(batch, t, heads) for x in per_token), m_next[:, -1]


def mlstm(q, k, v, log_i, log_f, initial_state, *, scale: float, eps: float,
          segment_ids=None, interpret: bool = False):
  """Chunked mLSTM on GPU (or in interpret mode), differentiable in every input.

  Args:
    q, k: [B, T, H, Dk] (k already broadcast to q's heads); v: [B, T, H, Dv]; bf16 or float32,
      one dtype. Dk, Dv in `chunk_common.HEAD_DIMS`.
    log_i: log input gate [B, T, H] (the pre-activation); log_f: log forget gate [B, T, H] (<= 0).
    initial_state: (C [B, H, Dk, Dv], n [B, H, Dk], m [B, H]), float32.
    scale: multiplies q.
    eps: added to the normaliser's denominator.
    segment_ids: [B, T] int packed-document ids, or None: a change of id between tokens t - 1 and t
      resets the state (C, n, m) to (0, 0, 0) before t (initial_state reaches the row's first
      document only; the final state is the last document's). None compiles the kernels without
      any document mask.
    interpret: run the kernels in Pallas interpret mode (CPU tests).

  Returns:
    (h [B, T, H, Dv] in q's dtype, final state (C, n, m) float32). T need not be a multiple of the
    chunk: the sequence is padded with k = v = 0, log f = 0 and log i = -inf, which leave the
    state as is.
  """
  batch, t, heads, dk = q.shape
  config = _config(batch, heads, dk, v.shape[-1])
  pad = (-t) % config.chunk
  doc = None if segment_ids is None else chunk_documents(segment_ids, config.chunk)
  log_i, log_f = (x.astype(jnp.float32) for x in (log_i, log_f))
  if pad:
    widths = ((0, 0), (0, pad), (0, 0))
    q, k, v = (jnp.pad(x, widths + ((0, 0),)) for x in (q, k, v))
    log_i = jnp.pad(log_i, widths, constant_values=-jnp.inf)
    log_f = jnp.pad(log_f, widths)
  c0, n0, m_init = (x.astype(jnp.float32) for x in initial_state)
  (r, big_m, m0, m), m_final = _stabilisers(log_i, log_f, m_init, config.chunk, doc)
  h, c, n = _mlstm_chunks(q, k, v, r, big_m, m0, m, c0, n0, doc, float(scale), float(eps), config,
                          interpret)
  return h[:, :t].astype(q.dtype), (c, n, m_final)
