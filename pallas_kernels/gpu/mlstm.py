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
differentiated by autodiff; the kernels take them as inputs and return their gradients. As FLA's
`chunk` algorithm does for gated linear attention, the sequential part is only the state pass: a
kernel per (batch, head, Dk block, Dv block) walks the chunks with its block of C (and n) in
registers and stores (C, n) at every chunk start (C [B, H, T/L, Dk, Dv] in the operand dtype, n
float32); then a fully parallel kernel per (batch, head, chunk, Dv block) forms h from q, k, v and
the chunk's entering state (qn is recomputed by every Dv block).

Backward. From dh: dnum = dh / den, dden = -(dh . h) / den, and the max sends dden either to qn
(dqn = dden sign(qn)) or to the floor exp(-m) (in XLA, O(T Dv)). With dP = dnum v^T + dqn 1^T,

  dq = (dP * W) k + g (dnum C_0^T + dqn n_0^T),
  dk = (dP * W)^T q + u (v dC_L^T + dn_L),     dv = P^T dnum + (k u) dC_L,
  dC_0 = gamma dC_L + (q g)^T dnum,            dn_0 = gamma dn_L + (q g)^T dqn,
  dr_j = sum_i (dP * P)_ij + B_j,              B_j = u_j k_j . (dC_L v_j + dn_L),

from a reverse state pass, which stores (dC, dn) at every chunk end, then two parallel kernels
per (batch, head, chunk), one with C for dq and A_i = g_i q_i . (dnum_i C_0^T + dqn_i n_0) (the
gradient of the log inter weight m_0 - M_i), one with dC for dk, dv and dr. num and qn scale as
exp(-M_i), so dM_i = -(A_i + sum_j (dP * P)_ij) (this equals -(dh_i . h_i + dqn_i qn_i), but taken
from the kernels' own dP and P it cancels consistently against dr: with bf16 inputs the
forget-gate gradient error drops from about 1.3e-2 to 4e-3). The state term of chunk k goes
through X_{k+1} = <dC_{k+1}, C_{k+1}> + <dn_{k+1}, n_{k+1}> at its end (the next chunk's stored
state and the stored gradient; the final state and its cotangent for the last chunk): dm_0 of
chunk k gains X_{k+1} - sum_k B and dM at its last token loses X_{k+1}. (X also obeys X_k =
X_{k+1} + sum_k A - sum_k B, but summed that way over chunks from the carried states it mixes the
stored, rounded C and dC of A and B with the exact carries: with bf16 states the bf16 gradient of
the initial m was 9e-2 from float64, 4e-3 from the stored states directly.)

Packed documents (segment_ids): a document start resets (C, n, m) to (0, 0, 0) before the token.
The kernels then also take each token's document index within its chunk (int32, 0 for the document
running at the chunk start, +1 after each start; a static flag: without ids they compile exactly as
before). `_stabilisers` gives a token of a document d > 0 starting at s the lower bound -b_{s-1}
(the empty state's m = 0) in place of m_0 in M, and m_0 = -inf, so g = 0 there: the carried-in
state reaches the chunk's first document only, and gamma = g_L = 0 when a document starts in the
chunk. In the kernels W keeps the pairs of one document and u the keys of the chunk's last
document. Every backward term then follows from the same masked W, g, u, gamma: A and the dq, dC_0
state terms vanish outside the first document, B and the dk, dv state terms outside the last, and
the same X_{k+1} holds (the dm_0 rows of tokens with m_0 = -inf are dropped by autodiff: a
chunk's m_0 then gets the first document's A, plus X_{k+1} - sum B if no document starts in it).

Operands of the matmuls are in the input dtype (bf16 or float32; float32 with full-precision
IEEE dots), accumulation and carried states in float32, stored chunk states (C, dC) in the input
dtype, as FLA's kernels do. Scores multiply the unscaled q (scale applied after the dot): q * scale
rounded to bf16 as an operand put bf16 dq at 1.8e-2 from float64 (3e-3 so; 5e-3 at T = 256). This
module never imports jaxchunk.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.gpu.chunk_common import (Launch, causal_mask, chunk_documents, chunk_spec,
                                             compiler_params, doc_specs, dot, fit_launches, row)


@dataclasses.dataclass(frozen=True)
class Config:
  chunk: int      # tokens per chunk: (C, n) are stored at chunk starts, their gradients at ends
  state: Launch   # forward and reverse state passes (grid: batch, head, Dk block, Dv block)
  output: Launch  # h and q.n (grid: batch, head, chunk, Dv block)
  grad: Launch    # dq, dk, dv and the stabiliser terms (grid: batch, head, chunk; block_v: the
                  # Dv columns per step of the sums over Dv inside the kernel)


# Per head_dim_k; `fit_launches` clips the blocks to the head dims and narrows the state pass's
# blocks for small grids. At head dim 128, compiled for sm_90 (`bench/kernel_resources.py`), with
# 8 warps: the state passes (64x128 blocks) and the output kernel over all 128 Dv columns do not
# spill; the gradient kernels' sums over Dv in one step spill 0 (dq) and 40 (dkv) bytes per
# thread, in 64-column steps 16 and 144, in 32-column steps 8 and 72; with 4 warps 328 and 976.
CONFIGS = {
    64: Config(chunk=64, state=Launch(4, 3, 64, 64), output=Launch(4, 1, block_v=64),
               grad=Launch(4, 1, block_v=64)),
    128: Config(chunk=64, state=Launch(8, 3, 64, 128), output=Launch(8, 1, block_v=128),
                grad=Launch(8, 1, block_v=128)),
}


# ------------------------------------------------------------------------------------------------
# In-kernel helpers (values, not refs).


def _carry_weights(r, big_m, m0, doc):
  """The weights of the carried states in one chunk from r, M, m_0 [L] and doc [L] int32 (None
  without documents; module docstring): (g [L], u [L], gamma scalar). g_i = exp(m_0 - M_i) weighs
  the entering state for query i, u_j = exp(r_j - M_L) key j in the state handed on (0 outside the
  chunk's last document), gamma = g_L the entering state in it. g and gamma need no mask: m_0 is
  -inf outside the chunk's first document."""
  last = big_m.shape[0] - 1
  g = jnp.exp(m0 - big_m)
  u = jnp.exp(r - row(big_m, last))
  if doc is not None:
    u = jnp.where(doc == jnp.max(doc), u, 0.0)
  return g, u, row(g, last)


def _pair_weights(r, big_m, doc):
  """W [L, L]: exp(r_j - M_i) for keys j <= i of query i's document, 0 elsewhere."""
  mask = causal_mask(r.shape[0])
  if doc is not None:
    mask = mask & (doc[:, None] == doc[None, :])
  return jnp.exp(jnp.where(mask, r[None, :] - big_m[:, None], -jnp.inf))


# ------------------------------------------------------------------------------------------------
# Kernels.


def _state_pass_kernel(*refs, chunk, num_chunks, reverse, scale, dtype, segmented):
  """Per (batch, head, Dk block, Dv block): x [T, BK], y [T, BV]; r, M, m_0 [T]; C-like carry
  init [BK, BV] and n-like carry norm_init [BK] float32; with `reverse` inv_den and dqn [T]; doc
  [T] int32 (only if `segmented`). Outputs: states [NC, BK, BV] in the operand dtype, norms
  [NC, BK] float32, the carries after the walk [BK, BV] and [BK] float32.

  Forward (x = k, y = v): stores (C, n) at each chunk start, then C <- gamma C + (k u)^T v and
  n <- gamma n + sum_j u_j k_j. Reverse (x = q, y = dh): walks the chunks backwards storing (dC,
  dn) at each chunk end, then dC <- gamma dC + (scale q g)^T dnum and dn <- gamma dn +
  (scale q g)^T dqn, with dnum = dh * inv_den. Packed documents need no mask beyond the weights'.
  """
  x_ref, y_ref, r_ref, big_m_ref, m0_ref, init_ref, norm_init_ref, *rest = refs
  states_ref, norms_ref, last_ref, norm_last_ref = rest[-4:]
  rest = rest[:-4]
  doc_ref = rest.pop() if segmented else None
  inv_den_ref, dqn_ref = rest if reverse else (None, None)

  def body(i, carry):
    state, norm = carry
    c = num_chunks - 1 - i if reverse else i
    states_ref[c] = state.astype(states_ref.dtype)
    norms_ref[c] = norm
    rows = pl.ds(c * chunk, chunk)
    g, u, gamma = _carry_weights(r_ref[rows], big_m_ref[rows], m0_ref[rows],
                                 None if doc_ref is None else doc_ref[rows])
    x = x_ref[rows, :].astype(jnp.float32)
    if reverse:
      x = x * (scale * g)[:, None]
      y = y_ref[rows, :].astype(jnp.float32) * inv_den_ref[rows][:, None]
      x_sum = jnp.sum(x * dqn_ref[rows][:, None], axis=0)
    else:
      x = x * u[:, None]
      y = y_ref[rows, :]
      x_sum = jnp.sum(x, axis=0)
    return (gamma * state + dot(x, y, dtype, trans_a=True), gamma * norm + x_sum)

  last_ref[...], norm_last_ref[...] = lax.fori_loop(
      0, num_chunks, body, (init_ref[...], norm_init_ref[...]))


def _output_kernel(*refs, scale, eps, dtype, segmented):
  """Per (batch, head, chunk, Dv block): q, k [L, Dk], v, h [L, BV]; r, M, m_0, m, qn [L]; doc
  [L] int32 (only if `segmented`); the chunk's entering C [Dk, BV] and n [Dk].
  h = (g q C + P v) / (max(|qn|, exp(-m)) + eps) with qn = g q.n + sum_j P_ij, P = (q k^T) W."""
  q_ref, k_ref, v_ref, r_ref, big_m_ref, m0_ref, m_ref, *doc_ref, c_ref, n_ref, h_ref, qn_ref = refs
  doc = doc_ref[0][...] if segmented else None
  r, big_m = r_ref[...], big_m_ref[...]
  g, _, _ = _carry_weights(r, big_m, m0_ref[...], doc)
  # scaled after the dot: q * scale rounded to bf16 as an operand puts bf16 gradients at 2e-2
  p = dot(q_ref[...], k_ref[...], dtype, trans_b=True) * (scale * _pair_weights(r, big_m, doc))
  q = q_ref[...].astype(jnp.float32) * scale
  num = dot(p, v_ref[...], dtype) + (scale * g)[:, None] * dot(q_ref[...], c_ref[...], dtype)
  qn = jnp.sum(p, axis=1) + g * jnp.sum(q * n_ref[...][None, :], axis=1)
  den = jnp.maximum(jnp.abs(qn), jnp.exp(-m_ref[...])) + eps
  h_ref[...] = (num / den[:, None]).astype(h_ref.dtype)
  qn_ref[...] = qn


def _grad_kernel(*refs, scale, dtype, segmented, part, block_v):
  """Per (batch, head, chunk): q, k [L, Dk]; v, dh [L, Dv]; r, M, m_0, inv_den, dqn [L]; doc [L]
  int32 (only if `segmented`); then, for `part` "dq", the chunk's entering C [Dk, Dv] and n [Dk]
  and the outputs dq [L, Dk], A and pull = sum_j (dP * P)_ij [L]; for "dkv", the gradients dC
  [Dk, Dv] and dn [Dk] at its end and the outputs dk [L, Dk], dv [L, Dv], dr and B [L] (the
  module docstring's backward). Each part recomputes P and dP, so that each reads one [Dk, Dv]
  state and they need no hand-off; the sums over Dv (dP, and dnum C^T or v dC^T) go by blocks of
  `block_v` columns, so that only a [Dk, block_v] slice of the stored state is live."""
  q_ref, k_ref, v_ref, dh_ref, r_ref, big_m_ref, m0_ref, inv_den_ref, dqn_ref, *refs = refs
  doc = refs.pop(0)[...] if segmented else None
  state_ref, norm_ref, *outs = refs
  r, big_m = r_ref[...], big_m_ref[...]
  g, u, _ = _carry_weights(r, big_m, m0_ref[...], doc)
  w = _pair_weights(r, big_m, doc)
  # q and k are loaded where used, not kept live across the blocks
  load_q = lambda: q_ref[...].astype(jnp.float32) * scale  # noqa: E731
  load_k = lambda: k_ref[...].astype(jnp.float32)  # noqa: E731
  inv_den, dqn = inv_den_ref[...], dqn_ref[...]
  p = dot(q_ref[...], k_ref[...], dtype, trans_b=True) * (scale * w)  # see `_output_kernel`
  dp = dqn[:, None]
  # sum_j dnum_j C_j^T (dq) or v_j dC_j^T (dkv) over Dv blocks j, plus the norm term
  state_sum = dqn[:, None] * norm_ref[...] if part == "dq" else norm_ref[...][None, :]
  for j in range(v_ref.shape[1] // block_v):
    cols = pl.ds(j * block_v, block_v)
    v = v_ref[:, cols]
    dnum = dh_ref[:, cols].astype(jnp.float32) * inv_den[:, None]
    dp = dp + dot(dnum, v, dtype, trans_b=True)
    state = state_ref[:, cols]
    if part == "dq":
      state_sum = state_sum + dot(dnum, state, dtype, trans_b=True)
    else:
      state_sum = state_sum + dot(v, state, dtype, trans_b=True)
      dv = dot(p, dnum, dtype, trans_a=True) + dot(load_k() * u[:, None], state, dtype)
      outs[1][:, cols] = dv.astype(outs[1].dtype)
  dp_p = dp * p
  if part == "dq":
    dq_ref, a_ref, pull_ref = outs
    dq = dot(dp * w, load_k(), dtype) + g[:, None] * state_sum
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)
    a_ref[...] = g * jnp.sum(load_q() * state_sum, axis=1)
    pull_ref[...] = jnp.sum(dp_p, axis=1)
    return
  dk_ref, _, dr_ref, b_ref = outs
  dk = scale * dot(dp * w, q_ref[...], dtype, trans_a=True) + u[:, None] * state_sum
  dk_ref[...] = dk.astype(dk_ref.dtype)
  b = u * jnp.sum(load_k() * state_sum, axis=1)
  dr_ref[...] = jnp.sum(dp_p, axis=0) + b
  b_ref[...] = b


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays: q, k [B,T,H,Dk]; v, h [B,T,H,Dv]; per-token scalars [B,T,H]
# float32; doc [B,T] int32 (packed documents only); states [B,H,NC,Dk,Dv], norms [B,H,NC,Dk];
# C [B,H,Dk,Dv] and n [B,H,Dk] float32. Outputs that every Dv block computes alike have a leading
# Dv-block axis and are read at block 0. T is a multiple of the chunk.


def _state_pass(x, y, tokens, init, norm_init, doc, config, interpret, *, reverse, scale):
  """(states [B,H,NC,Dk,Dv] in x's dtype, then float32 norms [B,H,NC,Dk], last [B,H,Dk,Dv] and
  norm_last [B,H,Dk]) of `_state_pass_kernel`; tokens: (r, M, m_0) or, reversed, (r, M, m_0,
  inv_den, dqn)."""
  batch, t, heads, dk = x.shape
  dv = y.shape[-1]
  bk, bv, chunk = config.state.block_k, config.state.block_v, config.chunk
  num_chunks, num_v = t // chunk, dv // bv
  token = pl.BlockSpec((None, t, None), lambda i, h, kk, vv: (i, 0, h))
  norm = pl.BlockSpec((None, None, bk), lambda i, h, kk, vv: (i, h, kk))
  state = pl.BlockSpec((None, None, bk, bv), lambda i, h, kk, vv: (i, h, kk, vv))
  doc_spec, docs = doc_specs(doc, (t, lambda i, h, kk, vv: (i, 0)))
  extra, extra_specs = tuple(tokens[3:]) + docs, [token] * len(tokens[3:]) + doc_spec
  states, norms, last, norm_last = pl.pallas_call(
      functools.partial(_state_pass_kernel, chunk=chunk, num_chunks=num_chunks, reverse=reverse,
                        scale=scale, dtype=x.dtype, segmented=doc is not None),
      grid=(batch, heads, dk // bk, num_v),
      in_specs=(pl.BlockSpec((None, t, None, bk), lambda i, h, kk, vv: (i, 0, h, kk)),
                pl.BlockSpec((None, t, None, bv), lambda i, h, kk, vv: (i, 0, h, vv)),
                token, token, token, state, norm, *extra_specs),
      out_specs=(pl.BlockSpec((None, None, num_chunks, bk, bv),
                              lambda i, h, kk, vv: (i, h, 0, kk, vv)),
                 pl.BlockSpec((None, None, None, num_chunks, bk),
                              lambda i, h, kk, vv: (vv, i, h, 0, kk)),
                 state,
                 pl.BlockSpec((None, None, None, bk), lambda i, h, kk, vv: (vv, i, h, kk))),
      out_shape=(jax.ShapeDtypeStruct((batch, heads, num_chunks, dk, dv), x.dtype),
                 jax.ShapeDtypeStruct((num_v, batch, heads, num_chunks, dk), jnp.float32),
                 jax.ShapeDtypeStruct((batch, heads, dk, dv), jnp.float32),
                 jax.ShapeDtypeStruct((num_v, batch, heads, dk), jnp.float32)),
      compiler_params=compiler_params(config.state),
      interpret=interpret,
  )(x, y, *tokens[:3], init, norm_init, *extra)
  return states, norms[0], last, norm_last[0]


def _output(q, k, v, tokens, doc, states, norms, config, interpret, *, scale, eps):
  """(h [B,T,H,Dv] in v's dtype, qn [B,T,H] float32); tokens: (r, M, m_0, m)."""
  batch, t, heads, dk = q.shape
  dv = v.shape[-1]
  bv, chunk = config.output.block_v, config.chunk
  num_v = dv // bv
  v_spec = chunk_spec(chunk, bv, blocked=True)
  doc_spec, docs = doc_specs(doc, (chunk, lambda i, h, c, *j: (i, c)))
  h, qn = pl.pallas_call(
      functools.partial(_output_kernel, scale=scale, eps=eps, dtype=q.dtype,
                        segmented=doc is not None),
      grid=(batch, heads, t // chunk, num_v),
      in_specs=(chunk_spec(chunk, dk), chunk_spec(chunk, dk), v_spec,
                *[chunk_spec(chunk)] * 4, *doc_spec,
                pl.BlockSpec((None, None, None, dk, bv), lambda i, h, c, j: (i, h, c, 0, j)),
                pl.BlockSpec((None, None, None, dk), lambda i, h, c, j: (i, h, c, 0))),
      out_specs=(v_spec, pl.BlockSpec((None, None, chunk, None), lambda i, h, c, j: (j, i, c, h))),
      out_shape=(jax.ShapeDtypeStruct((batch, t, heads, dv), v.dtype),
                 jax.ShapeDtypeStruct((num_v, batch, t, heads), jnp.float32)),
      compiler_params=compiler_params(config.output),
      interpret=interpret,
  )(q, k, v, *tokens, *docs, states, norms)
  return h, qn[0]


def _grads(q, k, v, dh, tokens, doc, states, norms, dstates, dnorms, config, interpret, *,
           scale):
  """(dq, dk in q's dtype, dv in v's dtype, dr, A, B, pull [B,T,H] float32) of the two parts of
  `_grad_kernel`; tokens: (r, M, m_0, inv_den, dqn)."""
  batch, t, heads, dk = q.shape
  dv = v.shape[-1]
  chunk = config.chunk
  doc_spec, docs = doc_specs(doc, (chunk, lambda i, h, c, *j: (i, c)))
  state = pl.BlockSpec((None, None, None, dk, dv), lambda i, h, c: (i, h, c, 0, 0))
  norm = pl.BlockSpec((None, None, None, dk), lambda i, h, c: (i, h, c, 0))
  token = jax.ShapeDtypeStruct((batch, t, heads), jnp.float32)
  in_specs = (chunk_spec(chunk, dk), chunk_spec(chunk, dk), chunk_spec(chunk, dv),
              chunk_spec(chunk, dv), *[chunk_spec(chunk)] * 5, *doc_spec, state, norm)

  def call(part, carried, out_specs, out_shape):
    return pl.pallas_call(
        functools.partial(_grad_kernel, scale=scale, dtype=q.dtype, segmented=doc is not None,
                          part=part, block_v=min(config.grad.block_v, dv)),
        grid=(batch, heads, t // chunk),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=compiler_params(config.grad),
        interpret=interpret,
    )(q, k, v, dh, *tokens, *docs, *carried)

  dq, a, pull = call("dq", (states, norms), (chunk_spec(chunk, dk), *[chunk_spec(chunk)] * 2),
                     (jax.ShapeDtypeStruct(q.shape, q.dtype), token, token))
  dk, dv, dr, b = call("dkv", (dstates, dnorms),
                       (chunk_spec(chunk, dk), chunk_spec(chunk, dv), *[chunk_spec(chunk)] * 2),
                       (jax.ShapeDtypeStruct(k.shape, k.dtype),
                        jax.ShapeDtypeStruct(v.shape, v.dtype), token, token))
  return dq, dk, dv, dr, a, b, pull


@functools.partial(jax.custom_vjp, nondiff_argnums=(10, 11, 12, 13))
def _mlstm_chunks(q, k, v, r, big_m, m0, m, c0, n0, doc, scale, eps, config, interpret):
  """(h [B,T,H,Dv] in v's dtype, C_T [B,H,Dk,Dv], n_T [B,H,Dk]) from the kernel inputs (doc: the
  per-token document index within its chunk [B,T] int32, or None)."""
  return _mlstm_chunks_forward(q, k, v, r, big_m, m0, m, c0, n0, doc, scale, eps, config,
                               interpret)[0]


def _mlstm_chunks_forward(q, k, v, r, big_m, m0, m, c0, n0, doc, scale, eps, config, interpret):
  states, norms, c, n = _state_pass(k, v, (r, big_m, m0), c0, n0, doc, config, interpret,
                                    reverse=False, scale=1.0)
  h, qn = _output(q, k, v, (r, big_m, m0, m), doc, states, norms, config, interpret, scale=scale,
                  eps=eps)
  return (h, c, n), (q, k, v, r, big_m, m0, m, doc, h, qn, c, n, states, norms)


def _mlstm_chunks_backward(scale, eps, config, interpret, residuals, cotangents):
  q, k, v, r, big_m, m0, m, doc, h, qn, c, n, states, norms = residuals
  dh, dc, dn = cotangents
  batch, t, heads, _ = q.shape
  chunk = config.chunk
  floor = jnp.exp(-m)
  den = jnp.maximum(jnp.abs(qn), floor) + eps
  dh_h = jnp.sum(dh.astype(jnp.float32) * h.astype(jnp.float32), axis=-1)
  dden = -dh_h / den
  to_qn = jnp.abs(qn) > floor
  dqn = jnp.where(to_qn, dden * jnp.sign(qn), 0.0)
  dm = jnp.where(to_qn, 0.0, -dden * floor)
  inv_den = 1.0 / den
  dh = dh.astype(v.dtype)

  dstates, dnorms, dc0, dn0 = _state_pass(q, dh, (r, big_m, m0, inv_den, dqn), dc, dn, doc,
                                          config, interpret, reverse=True, scale=scale)
  dq, dk, dv, dr, a, b, pull = _grads(q, k, v, dh, (r, big_m, m0, inv_den, dqn), doc, states,
                                      norms, dstates, dnorms, config, interpret, scale=scale)

  # X_{k+1} = <dC, C> + <dn, n> at the end of each chunk k, from the stored states (the next
  # chunk's) and their gradients, the final state's for the last chunk.
  x_end = jnp.sum(dc * c, axis=(-2, -1)) + jnp.sum(dn * n, axis=-1)              # [B,H]
  x_inner = (jnp.sum(dstates[:, :, :-1].astype(jnp.float32)
                     * states[:, :, 1:].astype(jnp.float32), axis=(-2, -1))
             + jnp.sum(dnorms[:, :, :-1] * norms[:, :, 1:], axis=-1))            # [B,H,N-1]
  x_after = jnp.concatenate([x_inner, x_end[..., None]], axis=-1).transpose(0, 2, 1)  # [B,N,H]
  at_last = (jnp.arange(chunk) == chunk - 1)[None, None, :, None]
  x_last = jnp.where(at_last, x_after[:, :, None], 0.0).reshape(batch, t, heads)
  dm0 = a - b + x_last
  dbig_m = -(a + pull) - x_last
  return (dq, dk, dv, dr, dbig_m, dm0, dm, dc0, dn0, None)


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
  config = fit_launches(CONFIGS[dk], batch, heads, dk, v.shape[-1])
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
