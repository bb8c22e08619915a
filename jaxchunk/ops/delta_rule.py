"""Delta-rule linear attention: `delta_rule` (DeltaNet) and `gated_delta_rule` (Gated DeltaNet).

Both ops, and `jaxchunk.ops.kda`, run one recurrence on a [Dk, Dv] float32 state per head:

  S_t = (I - beta_t k_t^T k_t) diag(exp(a_t)) S_{t-1} + beta_t k_t^T v_t,    o_t = scale * q_t S_t,

with the log-decay a_t <= 0 equal to 0 (`delta_rule`), one scalar per head (`gated_delta_rule`,
stored here with a trailing axis of size 1) or one value per key channel (`kda`, trailing axis Dk).
A scalar decay commutes with the Householder-like factor, so then S_t = exp(g_t) (I - ...) S_{t-1}.

Chunked ("xla") form: the WY / UT transform of DeltaNet, Gated DeltaNet and FLA's chunk kernels.
Inside a chunk of C tokens starting from state S_0 let b_i be the cumulative log-decay up to token i
(inclusive) and write each step as S_i = diag(exp(a_i)) S_{i-1} + k_i^T u_i with the "pseudo-value"
u_i = beta_i (v_i - k_i diag(exp(a_i)) S_{i-1}). Unrolling,

  S_i = diag(exp(b_i)) S_0 + sum_{j <= i} diag(exp(b_i - b_j)) k_j^T u_j,

and substituting into u gives the unit lower-triangular system

  (I + M) U = diag(beta) (V - (K * exp(b)) S_0),
  M_ij = beta_i sum_d k_id k_jd exp(b_id - b_jd) for j < i, else 0.

So U = U_v - W S_0 with U_v = A V, W = A (K * exp(b)) and A = (I + M)^{-1} diag(beta): one inverse of
a unit lower-triangular matrix per chunk (`_unit_lower_inverse`, in matmuls), for all chunks in
parallel. The state pass is a `lax.scan` over chunks:

  U = U_v - W S_0,    S_C = diag(exp(b_C)) S_0 + (K * exp(b_C - b))^T U,

and the outputs follow in parallel from each chunk's starting state:

  O = (Q * exp(b)) S_0 + P U,  P_ij = sum_d q_id k_jd exp(b_id - b_jd) for j <= i, else 0.

Every exponent outside M and P is <= 0. M and P use the overflow-free decayed attention matrices of
`jaxchunk.ops._gated_chunk` (exponents masked before `exp` for a scalar decay; for a per-channel
decay, products through in-between reference points, with log-decays floored at -16 inside 8-row
blocks, or the exact secondary chunking for chunk sizes not a multiple of 8).

Packed documents (`segment_ids`, the state reset to zero where a document starts): a token's
S_{i-1} then unrolls only over the keys of its own document, plus S_0 for the chunk's first
document. Everything is linear in S_0, so masking is exact: M and P keep only pairs of one
document, the S_0 terms of W (K * exp(b)) and of O (Q * exp(b)) only the rows of the first
document, and S_C keeps diag(exp(b_C)) S_0 only without a start inside the chunk and sums
K * exp(b_C - b) over the chunk's last document only (`_gated_chunk._document_masks`).

The "pallas" path (GPU, or interpret mode on CPU) runs the state pass and the outputs in
`pallas_kernels.gpu.delta_rule`, at the chunk size of the kernel's config table (`chunk_size`
sets the xla path's chunk only), head dims 64 and 128, operands in q's dtype (bf16 or float32).
XLA forms the chunk-local factors (W, U_v, Q * exp(b), K * exp(b_C - b), P) here, their products
(the decayed attention matrices, W and U_v) with operands in that dtype and float32
accumulation, as FLA's kernels do (the inverse stays float32), and JAX differentiates them; the
kernel has its own backward for the state pass. Packed documents take the same masked factors,
and a chunk where a document starts passes b_C = -inf, so that the kernel's decay e^(b_C) of the
carried state is 0. Without segment ids, for the decay kinds `FUSED_FACTORS` names (scalar, by
default), the factors and their gradients come from fused kernels instead (`fused_delta_rule`).

Compute dtype: float32, or float64 when an input already is float64 (possible only with x64
enabled), so the reference path can serve as a float64 oracle.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxchunk.ops._common import (check_gate, check_nonpositive, check_qkv, check_segment_ids,
                                  check_step_qkv, compute_dtype,
                                  default_scale, document_starts, pad_seq, pallas_interpret,
                                  repeat_heads, reset_state, resolve_impl)
from jaxchunk.ops import _gated_chunk
from jaxchunk.ops._gated_chunk import (_channel_pair_attention, _check_state,
                                       _document_masks, _scalar_decay_attention)
from pallas_kernels.gpu import chunk_common
from pallas_kernels.gpu import delta_rule as delta_kernel

_HIGHEST = lax.Precision.HIGHEST


def _einsum(spec, *operands):
  return jnp.einsum(spec, *operands, precision=_HIGHEST)


# ------------------------------------------------------------------------------------------------
# Recurrent definition.


@jax.jit
def _recurrent_step(state, q, k, v, beta, log_decay):
  """One token of the recurrence.

  Args: state [B,H,Dk,Dv]; q (already scaled) and k [B,H,Dk]; v [B,H,Dv]; beta [B,H];
    log_decay [B,H,Dk or 1].
  Returns (o [B,H,Dv], new_state [B,H,Dk,Dv]).
  """
  state = jnp.exp(log_decay)[..., None] * state
  error = v - _einsum("bhd,bhde->bhe", k, state)
  state = state + beta[..., None, None] * k[..., :, None] * error[..., None, :]
  return _einsum("bhd,bhde->bhe", q, state), state


@jax.jit
def _reference(q, k, v, beta, log_decay, state, starts):
  """Token-by-token `lax.scan`. q, k [B,T,H,Dk]; v [B,T,H,Dv]; beta [B,T,H];
  log_decay [B,T,H,Dk or 1]; state [B,H,Dk,Dv]; starts [B,T] bool, where the state is reset to
  zero before the token (`document_starts`).

  Returns (o [B,T,H,Dv], final_state [B,H,Dk,Dv]).
  """
  def step(s, xs):
    *token, start = xs
    o, s = _recurrent_step(reset_state(s, start), *token)
    return s, o

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, beta, log_decay, starts))
  state, o = lax.scan(step, state, xs)
  return jnp.moveaxis(o, 0, 1), state


# ------------------------------------------------------------------------------------------------
# Chunked (WY / UT transform) form.


@jax.custom_vjp
def _unit_lower_inverse(strict):
  """(I + L)^-1 for strictly lower-triangular L [..., C, C], in batched matmuls only.

  Inverts the diagonal blocks by doubling, [[A, 0], [M, B]]^-1 = [[A^-1, 0], [-B^-1 M A^-1, B^-1]],
  from 1 x 1 blocks to the whole (padded to a power of two with an identity block): log2(C)
  levels of two small matmuls per block, block forward substitution in effect. It replaces a
  batched `solve_triangular`, which XLA hands to cuBLAS trsm on GPUs, one small system at a time
  on the CUDA cores (with it, gated_delta_rule's forward took 14 ms on an H100 against jla's
  0.76 ms: bench/results/linear_kernels-2026-12-06-gdn.md). Only the strictly lower part of
  `strict` is read. Gradient: d strict = tril(-X^T dX X^T, -1) with X the inverse (two matmuls).
  """
  c = strict.shape[-1]
  size = 1 << (c - 1).bit_length()
  lead = strict.shape[:-2]
  strict = jnp.pad(strict, [(0, 0)] * len(lead) + [(0, size - c)] * 2)
  inverse = jnp.ones((*lead, size, 1, 1), strict.dtype)          # the inverted diagonal blocks
  block = 1
  while block < size:
    pairs = size // (2 * block)
    tiles = strict.reshape(*lead, pairs, 2 * block, pairs, 2 * block)
    lower = jnp.moveaxis(jnp.diagonal(tiles, axis1=-4, axis2=-2), -1, -3)[..., block:, :block]
    upper_inv, lower_inv = inverse[..., 0::2, :, :], inverse[..., 1::2, :, :]
    corner = -_einsum("...ij,...jk,...kl->...il", lower_inv, lower, upper_inv)
    inverse = jnp.concatenate([
        jnp.concatenate([upper_inv, jnp.zeros_like(upper_inv)], axis=-1),
        jnp.concatenate([corner, lower_inv], axis=-1)], axis=-2)
    block *= 2
  return inverse[..., 0, :c, :c]


def _unit_lower_inverse_fwd(strict):
  inverse = _unit_lower_inverse(strict)
  return inverse, inverse


def _unit_lower_inverse_bwd(inverse, d_inverse):
  transposed = jnp.swapaxes(inverse, -1, -2)
  return (jnp.tril(-_einsum("...ij,...jk,...kl->...il", transposed, d_inverse, transposed), -1),)


_unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def _operand_einsum(dtype):
  """An einsum with operands cast to `dtype` and float32 results (full precision for float32)."""
  if dtype is None or jnp.dtype(dtype) == jnp.float32:
    return _einsum
  return lambda spec, *operands: jnp.einsum(spec, *(x.astype(dtype) for x in operands),
                                            preferred_element_type=jnp.float32)


def _chunk_factors(q, k, v, beta, log_decay, chunk_size: int, masks=None, matmul_dtype=None, *,
                   blockwise: bool):
  """The chunk-local factors of the chunked form (module docstring), for all chunks in parallel.

  Shapes as `_reference`; masks None (one document) or the packed-document masks of
  `_document_masks`. `matmul_dtype` (None: float32) is the operand dtype of the products forming
  the attention matrices and W, U_v (bf16 for bf16 inputs, as FLA's kernels; the inverse stays
  float32); `blockwise`: per-channel pair matrices from products only, log-decays floored, where
  the chunk is a multiple of 8 rows (`_channel_pair_attention`). T is padded to a multiple of
  `chunk_size` with q = k = v = beta = 0 and log-decay 0, which leaves the state unchanged.
  Returns, with N chunks of C tokens, arrays laid out [B, N, H, C, *]: w [..,Dk], u_v [..,Dv],
  q_decayed = q e^b [..,Dk], k_to_end = k e^(b_C - b) [..,Dk], attention P [..,C] and the
  cumulative log-decay b [..,Dk or 1].
  """
  bsz, t, h, dk = q.shape
  dv = v.shape[-1]
  per_channel = log_decay.shape[-1] != 1
  padded = [pad_seq(x, chunk_size)[0] for x in (q, k, v, beta[..., None], log_decay)]
  n = padded[0].shape[1] // chunk_size

  def to_chunks(x):                                                          # -> [B,N,H,C,D]
    return x.reshape(bsz, n, chunk_size, h, x.shape[-1]).transpose(0, 1, 3, 2, 4)

  q, k, v, beta, log_decay = map(to_chunks, padded)
  b = jnp.cumsum(log_decay, axis=-2)
  einsum = _operand_einsum(matmul_dtype)
  if per_channel:
    gram = _channel_pair_attention(k, k, log_decay, b, einsum, blockwise=blockwise)
    attention = _channel_pair_attention(q, k, log_decay, b, einsum, blockwise=blockwise)
  else:
    gram = _scalar_decay_attention(k, k, b, einsum)
    attention = _scalar_decay_attention(q, k, b, einsum)

  q_decayed, k_decayed, k_to_end = q * jnp.exp(b), k * jnp.exp(b), k * jnp.exp(b[..., -1:, :] - b)
  strictly_lower = jnp.tril(jnp.ones((chunk_size, chunk_size), bool), -1)
  if masks is not None:
    same, first, last, _ = masks
    strictly_lower, attention = strictly_lower & same, jnp.where(same, attention, 0)
    q_decayed, k_decayed = jnp.where(first, q_decayed, 0), jnp.where(first, k_decayed, 0)
    k_to_end = jnp.where(last, k_to_end, 0)
  inverse = _unit_lower_inverse(jnp.where(strictly_lower, beta * gram, 0))
  solved = einsum("...ij,...jd->...id", inverse, beta * jnp.concatenate([v, k_decayed], axis=-1))
  u_v, w = solved[..., :dv], solved[..., dv:]
  return w, u_v, q_decayed, k_to_end, attention, b


def _from_chunks(x):
  """[B, N, H, C, D] chunks -> [B, N * C, H, D]."""
  bsz, n, h, c, d = x.shape
  return x.transpose(0, 1, 3, 2, 4).reshape(bsz, n * c, h, d)


@functools.partial(jax.jit, static_argnames=("chunk_size", "blockwise"))
def _chunked(q, k, v, beta, log_decay, state, starts, *, chunk_size: int, blockwise: bool):
  """Chunkwise-parallel form (module docstring): the factors of `_chunk_factors`, then a
  `lax.scan` over chunks for the state. Shapes as `_reference`, starts [B,T] bool or None (one
  document); `blockwise`: `_gated_chunk.BLOCKWISE_PAIRS`."""
  masks = None if starts is None else _document_masks(starts, chunk_size)
  w, u_v, q_decayed, k_to_end, attention, b = _chunk_factors(q, k, v, beta, log_decay, chunk_size,
                                                             masks, blockwise=blockwise)
  chunk_decays = jnp.exp(b[..., -1, :])[..., None]                           # [B,N,H,Dk or 1,1]
  if masks is not None:
    chunk_decays = jnp.where(masks[3], chunk_decays, 0)

  def pass_chunk(s, xs):
    w_c, u_v_c, k_to_end_c, decay_c = xs
    u = u_v_c - _einsum("bhcd,bhde->bhce", w_c, s)
    return decay_c * s + _einsum("bhcd,bhce->bhde", k_to_end_c, u), (s, u)

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (w, u_v, k_to_end, chunk_decays))
  state, (chunk_states, u) = lax.scan(pass_chunk, state, xs)
  chunk_states, u = jnp.moveaxis(chunk_states, 0, 1), jnp.moveaxis(u, 0, 1)
  o = (_einsum("bnhij,bnhje->bnhie", attention, u)
       + _einsum("bnhcd,bnhde->bnhce", q_decayed, chunk_states))
  return _from_chunks(o)[:, :q.shape[1]], state


def _pallas_unsupported(q, k, v) -> str | None:
  """None when the Pallas kernel supports this call, else the reason."""
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dtypes) != 1 or dtypes.pop() not in (jnp.bfloat16, jnp.float32):
    return f"q, k, v must share one dtype of bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}"
  return chunk_common.unsupported_reason(q.shape[-1], v.shape[-1])


# Per decay kind, whether the "pallas" path takes its chunk-local factors from the fused factor
# kernels (`fused_delta_rule`) for one document per row, or from XLA. On an H100 (B=8, T=8K,
# H=16, D=128, bf16; bench/results/linear_kernels-2026-12-07-delta-defaults.md) the fused kernels
# took Gated DeltaNet fwd 4.80 -> 3.77 ms and fwd+bwd 14.53 -> 10.92 ms, but KDA's per-channel
# ones were slower (fwd 12.55 -> 19.25, fwd+bwd 68.44 -> 71.67 ms).
FUSED_FACTORS = {"scalar": True, "per_channel": False}


@functools.partial(jax.jit,
                   static_argnames=("operand_dtype", "fused_factors", "blockwise"))
def _chunked_pallas(q, k, v, beta, log_decay, state, starts, *, operand_dtype,
                    fused_factors: bool, blockwise: bool):
  """As `_chunked` with the state pass and outputs in the Pallas kernels
  (`pallas_kernels.gpu.delta_rule`), at the kernel's chunk size, in `operand_dtype` (q's dtype
  before casting; o comes back in it). With `fused_factors` and one document per row (starts
  None) the factors come from kernels too (`fused_delta_rule`). Otherwise XLA forms them here,
  their products with `operand_dtype` operands and float32 accumulation; packed documents (starts
  [B,T] bool) carry their masks, and a chunk where a document starts gets b_C = -inf, so the
  kernel's state decay e^(b_C) drops the state carried into it. `blockwise`:
  `_gated_chunk.BLOCKWISE_PAIRS`."""
  t = q.shape[1]
  chunk = delta_kernel.chunk_size(q.shape[-1])
  if fused_factors and starts is None:
    if log_decay.shape[-1] == 1:
      log_decay = log_decay[..., 0]
    q, k, v, beta, log_decay = (pad_seq(x, chunk)[0] for x in (q, k, v, beta, log_decay))
    o, state = delta_kernel.fused_delta_rule(
        *(x.astype(operand_dtype) for x in (q, k, v)), beta, log_decay, state,
        interpret=pallas_interpret())
    return o[:, :t], state
  masks = None if starts is None else _document_masks(starts, chunk)
  *factors, b = _chunk_factors(q, k, v, beta, log_decay, chunk, masks, operand_dtype,
                               blockwise=blockwise)
  if masks is not None:
    b = b.at[..., -1:, :].set(jnp.where(masks[3], b[..., -1:, :], -jnp.inf))
  w, u_v, q_decayed, k_to_end, attention, b = map(_from_chunks, (*factors, b))
  if b.shape[-1] == 1:
    b = b[..., 0]
  o, state = delta_kernel.delta_rule_chunks(
      *(x.astype(operand_dtype) for x in (w, u_v, q_decayed, k_to_end, attention)), b, state,
      interpret=pallas_interpret())
  return o[:, :t], state


# ------------------------------------------------------------------------------------------------
# Entry points shared by `delta_rule`, `gated_delta_rule` and `kda`.


def _delta_family(op_name: str, q, k, v, beta, gate, gate_name: str, *, per_channel: bool, scale,
                  initial_state, output_final_state: bool, segment_ids, chunk_size: int,
                  impl: str):
  """Full-sequence op: validates, dispatches to the reference or chunked path.

  q [B,T,H,Dk]; k [B,T,Hk,Dk]; v [B,T,Hk,Dv]; beta [B,T,H or Hk]; gate None (no decay),
  [B,T,H or Hk] (scalar decay) or [B,T,H or Hk,Dk] (`per_channel`);
  initial_state [B,H,Dk,Dv] or None; segment_ids [B,T] int or None (packed documents,
  `jaxchunk.ops._common.document_starts`).
  Returns (o [B,T,H,Dv] in q's dtype, final_state [B,H,Dk,Dv] or None).
  """
  b, t, h, hk, dk, dv = check_qkv(q, k, v)
  check_gate(beta, "beta", b, t, (h, hk))
  if gate is not None:
    check_gate(gate, gate_name, b, t, (h, hk), (dk,) if per_channel else ())
  if initial_state is not None:
    _check_state(initial_state, (b, h, dk, dv), "initial_state")
  check_segment_ids(segment_ids, b, t)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"{op_name}: chunk_size must be a positive int, got {chunk_size!r}")
  path = resolve_impl(impl, op_name,
                      pallas_unsupported=_pallas_unsupported(q, k, v))
  if gate is not None:
    check_nonpositive(gate, gate_name)

  out_dtype = q.dtype
  dtype = compute_dtype(q, k, v, beta, gate, initial_state)
  q, k, v, beta = (jnp.asarray(x, dtype) for x in (q, k, v, beta))
  q = q * default_scale(scale, dk)
  k, v, beta = (repeat_heads(x, h) for x in (k, v, beta))
  if gate is None:
    log_decay = jnp.zeros((b, t, h, 1), dtype)
  else:
    gate = repeat_heads(jnp.asarray(gate, dtype), h)
    log_decay = gate if per_channel else gate[..., None]
  state = (jnp.zeros((b, h, dk, dv), dtype) if initial_state is None
           else jnp.asarray(initial_state, dtype))
  starts = None if segment_ids is None else document_starts(jnp.asarray(segment_ids))
  if path == "reference":
    if starts is None:
      starts = jnp.zeros((b, t), bool)
    o, state = _reference(q, k, v, beta, log_decay, state, starts)
  elif path == "pallas":
    o, state = _chunked_pallas(q, k, v, beta, log_decay, state, starts, operand_dtype=out_dtype,
                               fused_factors=FUSED_FACTORS["per_channel" if per_channel
                                                           else "scalar"],
                               blockwise=_gated_chunk.BLOCKWISE_PAIRS)
  else:
    o, state = _chunked(q, k, v, beta, log_decay, state, starts, chunk_size=chunk_size,
                        blockwise=_gated_chunk.BLOCKWISE_PAIRS)
  return o.astype(out_dtype), (state if output_final_state else None)


def _delta_family_step(op_name: str, q, k, v, beta, gate, gate_name: str, state, *,
                       per_channel: bool, scale):
  """One decode token, continuing exactly from a prefill's final state.

  q [B,H,Dk]; k [B,Hk,Dk]; v [B,Hk,Dv]; beta [B,H or Hk]; gate None, [B,H or Hk] or
  [B,H or Hk,Dk] (`per_channel`); state [B,H,Dk,Dv] or None (zeros).
  Returns (o [B,H,Dv] in q's dtype, new_state [B,H,Dk,Dv]).
  """
  b, h, hk, dk, dv = check_step_qkv(q, k, v, op_name)
  heads = " or ".join(map(str, sorted({h, hk})))
  if jnp.ndim(beta) != 2 or beta.shape[0] != b or beta.shape[1] not in (h, hk):
    raise ValueError(f"beta must have shape [{b}, {heads}], got {jnp.shape(beta)}")
  if gate is not None:
    tail = (dk,) if per_channel else ()
    if jnp.ndim(gate) != 2 + len(tail) or gate.shape[0] != b or gate.shape[1] not in (h, hk) \
        or tuple(gate.shape[2:]) != tail:
      raise ValueError(f"{gate_name} must have shape [{b}, {heads}"
                       f"{''.join(f', {d}' for d in tail)}], got {jnp.shape(gate)}")
  if state is not None:
    _check_state(state, (b, h, dk, dv), "state")
  if gate is not None:
    check_nonpositive(gate, gate_name)

  out_dtype = q.dtype
  dtype = compute_dtype(q, k, v, beta, gate, state)
  q, k, v, beta = (jnp.asarray(x, dtype) for x in (q, k, v, beta))
  q = q * default_scale(scale, dk)
  k, v, beta = (repeat_heads(x, h, axis=1) for x in (k, v, beta))
  if gate is None:
    log_decay = jnp.zeros((b, h, 1), dtype)
  else:
    gate = repeat_heads(jnp.asarray(gate, dtype), h, axis=1)
    log_decay = gate if per_channel else gate[..., None]
  state = jnp.zeros((b, h, dk, dv), dtype) if state is None else jnp.asarray(state, dtype)
  o, state = _recurrent_step(state, q, k, v, beta, log_decay)
  return o.astype(out_dtype), state


# ------------------------------------------------------------------------------------------------
# Public ops.


def delta_rule(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False,
               segment_ids=None, chunk_size=64, impl="auto"):
  """DeltaNet: S_t = (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t, o_t = scale * q_t S_t.

  Args:
    q: [B, T, H, Dk] queries.
    k: [B, T, Hk, Dk] keys (usually L2-normalised), Hk dividing H (GQA).
    v: [B, T, Hk, Dv] values.
    beta: [B, T, H] or [B, T, Hk] write strengths, usually in (0, 1).
    scale: multiplies q; defaults to Dk ** -0.5.
    initial_state: [B, H, Dk, Dv] float32 state before the first token, or None (zeros).
    output_final_state: whether to return the state after the last token.
    segment_ids: [B, T] int packed-document ids, or None (one document per row). A change of id
      between tokens t - 1 and t starts a document at t: the state is reset to zero before t, so
      initial_state applies to the row's first document only and the final state is that of the
      last document. impl="pallas" does not support it ("auto" picks "xla").
    chunk_size: tokens per chunk of the "xla" path; T need not be a multiple of it.
    impl: "auto", "reference" (token-by-token scan), "xla" (chunked) or "pallas".

  Returns:
    (o [B, T, H, Dv] in q's dtype, final state [B, H, Dk, Dv] float32 or None).
  """
  return _delta_family("delta_rule", q, k, v, beta, None, "", per_channel=False, scale=scale,
                       initial_state=initial_state, output_final_state=output_final_state,
                       segment_ids=segment_ids, chunk_size=chunk_size, impl=impl)


def delta_rule_step(q, k, v, beta, state, *, scale=None):
  """One decode token of `delta_rule`, continuing from `state` (a prefill's final state).

  Args:
    q: [B, H, Dk]; k: [B, Hk, Dk]; v: [B, Hk, Dv]; beta: [B, H] or [B, Hk].
    state: [B, H, Dk, Dv] float32, or None (zeros).
    scale: multiplies q; defaults to Dk ** -0.5.

  Returns:
    (o [B, H, Dv] in q's dtype, new state [B, H, Dk, Dv] float32).
  """
  return _delta_family_step("delta_rule_step", q, k, v, beta, None, "", state, per_channel=False,
                            scale=scale)


def gated_delta_rule(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False,
                     segment_ids=None, chunk_size=64, impl="auto"):
  """Gated DeltaNet: S_t = exp(g_t) (I - beta_t k_t^T k_t) S_{t-1} + beta_t k_t^T v_t.

  Outputs o_t = scale * q_t S_t.

  Args:
    q: [B, T, H, Dk] queries.
    k: [B, T, Hk, Dk] keys (usually L2-normalised), Hk dividing H (GQA).
    v: [B, T, Hk, Dv] values.
    g: [B, T, H] or [B, T, Hk] per-head log-decays, <= 0.
    beta: [B, T, H] or [B, T, Hk] write strengths, usually in (0, 1).
    scale: multiplies q; defaults to Dk ** -0.5.
    initial_state: [B, H, Dk, Dv] float32 state before the first token, or None (zeros).
    output_final_state: whether to return the state after the last token.
    segment_ids: [B, T] int packed-document ids, or None (one document per row). A change of id
      between tokens t - 1 and t starts a document at t: the state is reset to zero before t, so
      initial_state applies to the row's first document only and the final state is that of the
      last document. impl="pallas" does not support it ("auto" picks "xla").
    chunk_size: tokens per chunk of the "xla" path; T need not be a multiple of it.
    impl: "auto", "reference" (token-by-token scan), "xla" (chunked) or "pallas".

  Returns:
    (o [B, T, H, Dv] in q's dtype, final state [B, H, Dk, Dv] float32 or None).
  """
  return _delta_family("gated_delta_rule", q, k, v, beta, g, "g", per_channel=False, scale=scale,
                       initial_state=initial_state, output_final_state=output_final_state,
                       segment_ids=segment_ids, chunk_size=chunk_size, impl=impl)


def gated_delta_rule_step(q, k, v, g, beta, state, *, scale=None):
  """One decode token of `gated_delta_rule`, continuing from `state` (a prefill's final state).

  Args:
    q: [B, H, Dk]; k: [B, Hk, Dk]; v: [B, Hk, Dv]; g: [B, H] or [B, Hk] log-decays <= 0;
    beta: [B, H] or [B, Hk].
    state: [B, H, Dk, Dv] float32, or None (zeros).
    scale: multiplies q; defaults to Dk ** -0.5.

  Returns:
    (o [B, H, Dv] in q's dtype, new state [B, H, Dk, Dv] float32).
  """
  return _delta_family_step("gated_delta_rule_step", q, k, v, beta, g, "g", state,
                            per_channel=False, scale=scale)
