"""Pallas (Triton) GPU kernels for the delta-rule family (DeltaNet, Gated DeltaNet, KDA): the
sequential state pass and the outputs of the chunked WY / UT form, forward and backward, wired
with `jax.custom_vjp`.

`delta_rule_chunks` takes the chunk-local, fully parallel factors from its caller
(`jaxchunk.ops.delta_rule` forms them in XLA for packed documents); `fused_delta_rule` (one
document per row: DeltaNet, Gated DeltaNet, KDA) forms them in a fused kernel of its own and
carries their gradients back in the backward's per-chunk kernel (the section "One document per
row" below). For a chunk of C tokens with the cumulative log-decay b from the chunk start
(inclusive) and its last row b_C:

  W   [C, Dk]  and  U_v [C, Dv]   from the per-chunk (I + M)^-1 (W holds its factor e^b),
  Qd = q * e^b  [C, Dk],   Kd = k * e^(b_C - b)  [C, Dk],
  P   [C, C]   the causal decayed scores, P_ij = sum_d q_id k_jd e^(b_id - b_jd) for j <= i,
  g  = e^(b_C)  one scalar, or one factor per key channel (a state row).

The kernel walks the chunks in order, per (batch, head, Dv block), with the [Dk, BV] float32 state
slice S in registers (the state's columns are independent):

  U = U_v - W S,    O = Qd S + P U,    S <- diag(g) S + Kd^T U.

Backward, in two kernels. The first walks the chunks in reverse per (batch, head, Dv block),
carrying dS (the gradient of the state after the chunk); it stores dS per chunk ([Dk, Dv], like
the forward's chunk start states S) and dU:

  dU = P^T dO + Kd dS,    dS <- diag(g) dS + Qd^T dO - W^T dU.

The second is fully parallel, one program per (batch, head, chunk) over the whole Dv (in blocks of
`CHUNK_GRAD_LAUNCH` columns, summed in registers), with U as the forward stored it (kept for the
backward with the chunk start states; recomputing U = U_v - W S there doubled the kernel's
instructions and spills on sm_90):

  dP = mask(dO U^T),  dQd = dO S^T,  dKd = U dS^T,  dW = -dU S^T,  dU_v = dU,
  db_C = g * rowsum(S * dS)  (summed over rows for a scalar g).

dP, dQd, dKd, dW and db_C are sums over Dv; the second kernel forms them whole, so no float32 part
per Dv block goes through HBM (at B=8, T=8K, H=16, D=128 with 32-column blocks those parts were
7.5 GB for Gated DeltaNet and 9.7 GB for KDA, written and read back, against 2.1 GB for U, dS
and dU). Everything upstream of the factors (solve, decays, beta, GQA) is differentiated by JAX
through the caller's XLA code.

Operands are stored in the input dtype (bf16 or float32), and so are the backward's residuals
(chunk start states S, U, dS per chunk, dU: bf16 halves their traffic, as FLA stores h); the carried
state, dS and all accumulation are float32. Float32 operands use full-precision (IEEE) dots; bf16
operands use bf16 dots throughout, the state and its gradient rounded to bf16 as dot operands.
Unlike GLA (`gated_linear_attention`, whose decay gradient q dq - k dk cancels), the delta rule's
decay gradient comes from g * rowsum(S * dS), summed in float32 from the stored S and dS, and the
float64 errors of every output and gradient of gated_delta_rule, delta_rule and kda at T = 256
stay within 5.7e-3 (2.6e-3 to 4.8e-3 with tf32 state dots and float32 residuals and factors;
H100: Gated DeltaNet fwd+bwd 28.5 -> 16.2 ms with all three, including the caller's bf16 factor
products: bench/results/linear_kernels-2026-12-06-gdn-precision.md). This module never imports
jaxchunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu.chunk_common import (Config, causal_mask, dot, fit_block_v,
                                             round_mantissa, row, triangular_mask)


# Block sizes of the sequential kernels per head_dim_k (`fit_block_v` narrows block_v for small
# grids). With Dk = 128 each program reads W, Qd, Kd and P once per chunk, so Dv / block_v times
# over: 64-column state slices over 8 warps took Gated DeltaNet fwd+bwd from 18.6 to 17.0 ms on an
# H100 against 32 columns (fwd 9.7 -> 9.0; bench/results/linear_kernels-2026-12-07-fused-factors.md,
# the same state-pass kernels with the fused factors), and compiled for sm_90
# (`bench/kernel_resources.py`) neither state pass spills at 64 columns, for Gated DeltaNet or
# KDA (192-222 registers; 4 warps at 32 columns: the backward spills 640 bytes per thread).
CONFIGS = {
    64: Config(chunk=64, block_v=64, num_warps=4, num_stages=2),
    128: Config(chunk=64, block_v=64, num_warps=8, num_stages=2),
}
# The backward's per-chunk kernel, per head_dim_k: (Dv columns per step of its loop over the
# whole Dv, num_warps, num_stages).
CHUNK_GRAD_LAUNCH = {64: (64, 4, 1), 128: (64, 8, 1)}


def chunk_size(head_dim_k: int) -> int:
  """Tokens per chunk of the kernels for this key head dim (the caller's factors use it)."""
  return CONFIGS[head_dim_k].chunk


def _config(batch: int, heads: int, dk: int, dv: int) -> Config:
  return fit_block_v(CONFIGS[dk], batch, heads, dv)


def _chunk_decay(b, per_channel: bool):
  """e^(b_C) from a chunk's cumulative log-decay b ([C] or [C, Dk]): a scalar, or [Dk, 1] to scale
  the state's rows. Also returns e^(b_C) unshaped (a scalar or [Dk])."""
  decay = jnp.exp(row(b, b.shape[0] - 1))
  return (decay[:, None] if per_channel else decay), decay


# ------------------------------------------------------------------------------------------------
# Kernels. Refs are one (batch, head, Dv block): w, qd, kd [T, Dk]; u_v, o, do [T, BV]; p [T, C];
# b [T] or [T, Dk]; states [Dk, BV]; chunk start states [N * Dk, BV].


def _forward_kernel(w_ref, u_v_ref, qd_ref, kd_ref, p_ref, b_ref, s0_ref, o_ref, st_ref,
                    *saved_refs, chunk, num_chunks, per_channel, dtype):
  """Walks the chunks in order; with `saved_refs` (states, u) it also stores each chunk's start
  state and U (in the refs' dtype, the operand dtype) for the backward."""
  dk = w_ref.shape[-1]

  def body(c, state):
    rows = pl.ds(c * chunk, chunk)
    decay, _ = _chunk_decay(b_ref[rows, ...], per_channel)
    u = u_v_ref[rows, :].astype(jnp.float32) - dot(w_ref[rows, :], state, dtype)
    if saved_refs:
      saved_refs[0][pl.ds(c * dk, dk), :] = state.astype(saved_refs[0].dtype)
      saved_refs[1][rows, :] = u.astype(saved_refs[1].dtype)
    o = dot(qd_ref[rows, :], state, dtype) + dot(p_ref[rows, :], u, dtype)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    return decay * state + dot(kd_ref[rows, :], u, dtype, trans_a=True)

  st_ref[...] = lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def _backward_state_kernel(qd_ref, kd_ref, w_ref, p_ref, b_ref, do_ref, dst_ref, dstates_ref,
                           du_ref, ds0_ref, *, chunk, num_chunks, per_channel, dtype):
  """Walks the chunks in reverse carrying dS, the gradient of the state after the chunk: stores
  it per chunk and dU = P^T dO + Kd dS (in the operand dtype; dS is carried in float32), then
  dS <- diag(g) dS + Qd^T dO - W^T dU."""
  dk = w_ref.shape[-1]

  def body(i, dstate):
    c = num_chunks - 1 - i
    rows = pl.ds(c * chunk, chunk)
    dstates_ref[pl.ds(c * dk, dk), :] = dstate.astype(dstates_ref.dtype)
    do = do_ref[rows, :]
    decay, _ = _chunk_decay(b_ref[rows, ...], per_channel)
    du = dot(p_ref[rows, :], do, dtype, trans_a=True) + dot(kd_ref[rows, :], dstate, dtype)
    du_ref[rows, :] = du.astype(du_ref.dtype)
    return (decay * dstate + dot(qd_ref[rows, :], do, dtype, trans_a=True)
            - dot(w_ref[rows, :], du, dtype, trans_a=True))

  ds0_ref[...] = lax.fori_loop(0, num_chunks, body, dst_ref[...].astype(jnp.float32))


def _chunk_cotangents(u_ref, state_ref, dstate_ref, do_ref, du_ref, *, block_v, dtype):
  """The cotangents of one chunk's factors, summed over all of Dv in blocks of `block_v` columns:
  with its start state S, dS (after it) and the forward's U, (dW = -dU S^T, dQd = dO S^T,
  dKd = U dS^T [C, Dk], dP = mask(dO U^T) [C, C], rowsum(S * dS) [Dk]), float32. dU_v is dU."""
  chunk, dk = u_ref.shape[0], state_ref.shape[0]
  dp = jnp.zeros((chunk, chunk), jnp.float32)
  dqd = dkd = dw = jnp.zeros((chunk, dk), jnp.float32)
  s_ds = jnp.zeros((dk,), jnp.float32)
  for j in range(u_ref.shape[-1] // block_v):
    cols = pl.ds(j * block_v, block_v)
    state, dstate = state_ref[:, cols], dstate_ref[:, cols]
    do, du, u = do_ref[:, cols], du_ref[:, cols], u_ref[:, cols]
    dp = dp + dot(do, u, dtype, trans_b=True)
    dqd = dqd + dot(do, state, dtype, trans_b=True)
    dkd = dkd + dot(u, dstate, dtype, trans_b=True)
    dw = dw - dot(du, state, dtype, trans_b=True)
    s_ds = s_ds + jnp.sum(state.astype(jnp.float32) * dstate.astype(jnp.float32), axis=1)
  return dw, dqd, dkd, jnp.where(causal_mask(chunk), dp, 0.0), s_ds


def _backward_chunk_kernel(u_ref, b_ref, state_ref, dstate_ref, do_ref, du_ref, dw_ref, du_v_ref,
                           dqd_ref, dkd_ref, dp_ref, db_ref, *, block_v, per_channel, dtype):
  """One chunk, all of Dv: writes the cotangents of `_chunk_cotangents`, dU_v = dU, and
  db_C = g * rowsum(S * dS) on the chunk's last row (0 on the others)."""
  chunk, dk = dw_ref.shape
  dw, dqd, dkd, dp, s_ds = _chunk_cotangents(u_ref, state_ref, dstate_ref, do_ref, du_ref,
                                             block_v=block_v, dtype=dtype)
  du_v_ref[...] = du_ref[...]
  dp_ref[...] = dp.astype(dp_ref.dtype)
  dqd_ref[...] = dqd.astype(dqd_ref.dtype)
  dkd_ref[...] = dkd.astype(dkd_ref.dtype)
  dw_ref[...] = dw.astype(dw_ref.dtype)
  _, decay = _chunk_decay(b_ref[...], per_channel)
  rows_shape = (chunk, dk) if per_channel else (chunk,)
  last_row = lax.broadcasted_iota(jnp.int32, rows_shape, 0) == chunk - 1
  db_ref[...] = jnp.where(last_row, (decay * s_ds)[None, :] if per_channel else
                          decay * jnp.sum(s_ds), 0.0)


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays: w, qd, kd [B,T,H,Dk]; u_v, o [B,T,H,Dv]; p [B,T,H,C]; b [B,T,H] or
# [B,T,H,Dk] float32; states [B,H,Dk,Dv] float32; chunk start states [B,H,N*Dk,Dv] in the operand
# dtype.
# T is a multiple of the chunk C.


def _specs(shapes: dict, names, block_v: int):
  """BlockSpecs over the grid (batch, head, Dv block) for the named operands."""
  t, dk, chunk = shapes["t"], shapes["dk"], shapes["chunk"]

  def seq(last, v_blocked):
    return pl.BlockSpec((None, t, None, last), lambda b, h, j: (b, 0, h, j if v_blocked else 0))

  per_channel = shapes["per_channel"]
  table = {
      "k": seq(dk, False),
      "v": seq(block_v, True),
      "p": seq(chunk, False),
      "b": (pl.BlockSpec((None, t, None, dk), lambda b, h, j: (b, 0, h, 0)) if per_channel else
            pl.BlockSpec((None, t, None), lambda b, h, j: (b, 0, h))),
      "state": pl.BlockSpec((None, None, dk, block_v), lambda b, h, j: (b, h, 0, j)),
      "states": pl.BlockSpec((None, None, (t // chunk) * dk, block_v),
                             lambda b, h, j: (b, h, 0, j)),
  }
  return tuple(table[n] for n in names)


def _call(kernel, in_names, out_names, out_shape, w, u_v, p, b, config, interpret, **kw):
  batch, t, heads, dk = w.shape
  dv = u_v.shape[-1]
  per_channel = b.ndim == 4
  shapes = dict(t=t, dk=dk, chunk=config.chunk, per_channel=per_channel)
  return pl.pallas_call(
      functools.partial(kernel, chunk=config.chunk, num_chunks=t // config.chunk,
                        per_channel=per_channel, dtype=w.dtype, **kw),
      grid=(batch, heads, dv // config.block_v),
      in_specs=_specs(shapes, in_names, config.block_v),
      out_specs=_specs(shapes, out_names, config.block_v),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
  )


_FACTORS = ("k", "v", "k", "k", "p", "b")        # w, u_v, qd, kd, p, b


def _forward(w, u_v, qd, kd, p, b, initial_state, config, interpret, *, save_residuals: bool):
  """Runs the forward kernel. Returns (o, final state, (chunk start states, U) in the operand
  dtype, or None)."""
  batch, t, heads, dk = w.shape
  dv = u_v.shape[-1]
  out_names = ("v", "state") + (("states", "v") if save_residuals else ())
  out_shape = (jax.ShapeDtypeStruct((batch, t, heads, dv), w.dtype),
               jax.ShapeDtypeStruct((batch, heads, dk, dv), jnp.float32))
  if save_residuals:
    out_shape += (jax.ShapeDtypeStruct((batch, heads, (t // config.chunk) * dk, dv), w.dtype),
                  jax.ShapeDtypeStruct((batch, t, heads, dv), w.dtype))
  o, final_state, *saved = _call(_forward_kernel, _FACTORS + ("state",), out_names, out_shape, w,
                                 u_v, p, b, config, interpret)(w, u_v, qd, kd, p, b, initial_state)
  return o, final_state, (tuple(saved) if save_residuals else None)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _state_pass(w, u_v, qd, kd, p, b, initial_state, config, interpret):
  return _forward(w, u_v, qd, kd, p, b, initial_state, config, interpret,
                  save_residuals=False)[:2]


def _state_pass_forward(w, u_v, qd, kd, p, b, initial_state, config, interpret):
  o, final_state, (states, u) = _forward(w, u_v, qd, kd, p, b, initial_state, config, interpret,
                                         save_residuals=True)
  return (o, final_state), (w, qd, kd, p, b, states, u)


def _chunk_grads(u, b, states, dstates, do, du, config, interpret):
  """The fully parallel part of the backward (`_backward_chunk_kernel`, grid: batch, head, chunk):
  (dw, du_v, dqd, dkd in do's dtype (the operand dtype), dp likewise, db float32)."""
  batch, t, heads, dv = u.shape
  chunk = config.chunk
  dk = states.shape[-2] // (t // chunk)
  per_channel = b.ndim == 4
  block_v, num_warps, num_stages = CHUNK_GRAD_LAUNCH[dk]
  rows = lambda last: pl.BlockSpec((None, chunk, None, last), lambda i, h, c: (i, c, h, 0))
  b_spec = (rows(dk) if per_channel else
            pl.BlockSpec((None, chunk, None), lambda i, h, c: (i, c, h)))
  state = pl.BlockSpec((None, None, dk, dv), lambda i, h, c: (i, h, c, 0))
  shape = lambda last, dtype=do.dtype: jax.ShapeDtypeStruct((batch, t, heads, last), dtype)
  return pl.pallas_call(
      functools.partial(_backward_chunk_kernel, block_v=min(block_v, dv), per_channel=per_channel,
                        dtype=do.dtype),
      grid=(batch, heads, t // chunk),
      in_specs=(rows(dv), b_spec, state, state, rows(dv), rows(dv)),
      out_specs=(rows(dk), rows(dv), rows(dk), rows(dk), rows(chunk), b_spec),
      out_shape=(shape(dk), shape(dv), shape(dk), shape(dk), shape(chunk),
                 jax.ShapeDtypeStruct(b.shape, jnp.float32)),
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
  )(u, b, states, dstates, do, du)


def _reverse_state_pass(w, qd, kd, p, b, u, do, dfinal, config, interpret):
  """`_backward_state_kernel` over every (batch, head, Dv block): (dS per chunk [B,H,N*Dk,Dv] and
  dU [B,T,H,Dv] in the operand dtype, the initial state's gradient [B,H,Dk,Dv] float32)."""
  batch, t, heads, dk = w.shape
  dv = u.shape[-1]
  operand = lambda shape: jax.ShapeDtypeStruct(shape, w.dtype)
  return _call(
      _backward_state_kernel, ("k", "k", "k", "p", "b", "v", "state"), ("states", "v", "state"),
      (operand((batch, heads, (t // config.chunk) * dk, dv)), operand(u.shape),
       jax.ShapeDtypeStruct((batch, heads, dk, dv), jnp.float32)),
      w, u, p, b, config, interpret)(qd, kd, w, p, b, do, dfinal)


def _state_pass_backward(config, interpret, residuals, cotangents):
  w, qd, kd, p, b, states, u = residuals
  do, dfinal = cotangents
  do = do.astype(w.dtype)
  dstates, du, dinitial = _reverse_state_pass(w, qd, kd, p, b, u, do, dfinal, config, interpret)
  dw, du_v, dqd, dkd, dp, db = _chunk_grads(u, b, states, dstates, do, du, config, interpret)
  return dw, du_v, dqd, dkd, dp, db, dinitial


_state_pass.defvjp(_state_pass_forward, _state_pass_backward)


def delta_rule_chunks(w, u_v, q_decayed, k_to_end, attention, log_decay_cumsum, initial_state, *,
                      interpret: bool = False):
  """The state pass and outputs of the chunked delta rule (module docstring), differentiable in
  every input.

  Args:
    w: [B, T, H, Dk] W of each chunk (already including e^b), in the operand dtype (bf16 or
      float32; all of w, u_v, q_decayed, k_to_end, attention share it). Dk, Dv in `chunk_common.HEAD_DIMS`.
    u_v: [B, T, H, Dv] U_v of each chunk.
    q_decayed: [B, T, H, Dk] q * e^b (q already scaled).
    k_to_end: [B, T, H, Dk] k * e^(b_C - b).
    attention: [B, T, H, C] P: row i of a chunk holds P_ij for the chunk's tokens j (0 for j > i).
    log_decay_cumsum: [B, T, H] (scalar decay per head) or [B, T, H, Dk] (per key channel) float32
      chunk-local cumulative log-decay b; only each chunk's last row b_C is read.
    initial_state: [B, H, Dk, Dv] float32.
    interpret: run the kernels in Pallas interpret mode (CPU tests).
  T must be a multiple of C = `chunk_size(Dk)`, chunks laid out consecutively along T.

  Returns:
    (o [B, T, H, Dv] in the operand dtype, final state [B, H, Dk, Dv] float32).
  """
  batch, t, heads, dk = w.shape
  dv = u_v.shape[-1]
  config = _config(batch, heads, dk, dv)
  if attention.shape[-1] != config.chunk or t % config.chunk:
    raise ValueError(f"delta_rule_chunks: attention must have shape [{batch}, T, {heads}, "
                     f"{config.chunk}] with T a multiple of {config.chunk}, got {attention.shape}")
  return _state_pass(w, u_v, q_decayed, k_to_end, attention,
                     log_decay_cumsum.astype(jnp.float32), initial_state.astype(jnp.float32),
                     config, interpret)


# ------------------------------------------------------------------------------------------------
# One document per row (`fused_delta_rule`): the chunk-local factors come from a fused kernel
# too, one program per (batch, head, chunk) that reads q, k, v, beta and the log-decays once.
# With b the chunk's cumulative log-decay, E_ij = e^(b_i - b_j) (j < i: "strict"; j <= i:
# "causal"; 0 elsewhere, the exponent masked before `exp`), G = (k k^T) * E_strict,
# A = (I + diag(beta) G)^-1, X_v = diag(beta) v and X_k = diag(beta) e^b k (a scalar decay; per
# key channel, G_ij = sum_d k_id k_jd e^(b_id - b_jd) and likewise P, see `_channel_decay`):
#
#   w = A X_k,  u_v = A X_v,  qd = q e^b,  kd = k e^(b_C - b),  P = (q k^T) * E_causal.
#
# The backward runs the reverse state pass, then one kernel per (batch, head, chunk) that forms
# the factors' cotangents from the stored states, U, dS and dU (as `_chunk_cotangents` does, but
# in registers instead of through HBM) and carries them back to the inputs:
#
#   dA = du_v X_v^T + dw X_k^T,  dX = A^T [du_v | dw],  dM = -A^T dA A^T (strictly lower),
#   dG = diag(beta) dM,  dbeta = rowsum(dX_v v + dX_k k e^b + dM G),
#   dk = beta e^b dX_k + (dG E) k + (dG E)^T k + (dP E)^T q + dkd e^(b_C - b),
#   dq = (dP E) k + dqd e^b,  dv = beta dX_v,
#
# and the gradient of b collects every e^(...) factor: for a pair matrix x_ij = sum_d x_id y_jd
# e^(b_id - b_jd) with cotangent d, x * dx - y * dy (dx, dy its gradients w.r.t. x and y; for a
# scalar decay the row sums minus the column sums of the matrix times d), x * dx for the row
# factors e^b, minus kd * dkd with its column sums and e^(b_C) rowsum(S * dS) on b_C; the
# log-decays' gradient is its reverse cumulative sum. The inverse A is kept for the backward
# ([C, C] float32 per chunk). Products with a [C, D] operand take operands in the input dtype
# (bf16 or float32), as the XLA factors do. The inverse and its gradient multiply float32 [C, C]
# matrices in TF32 for bf16 inputs and at float32 accuracy (TF32x3) for float32 ones
# (`_inverse_dot`), the per-channel cumulative sums at float32 accuracy (`_matrix_dot`).


def _iota(n: int, axis: int):
  return lax.broadcasted_iota(jnp.int32, (n, n), axis)


def _cumsum(x, *, reverse: bool = False):
  """Inclusive cumulative sum of x [n] (from the last entry with `reverse`), by a masked sum."""
  return jnp.sum(jnp.where(triangular_mask(x.shape[0], reverse=reverse), x[None, :], 0.0), axis=1)


def _pair_decay(b, *, strict: bool):
  """E [n, n]: e^(b_i - b_j) for j < i (`strict`) or j <= i, else 0 (masked before `exp`)."""
  n = b.shape[0]
  rows, cols = _iota(n, 0), _iota(n, 1)
  keep = rows > cols if strict else rows >= cols
  return jnp.exp(jnp.where(keep, b[:, None] - b[None, :], -jnp.inf))


def _matrix_dot(interpret: bool):
  """a @ b for float32 matrices at float32 accuracy: TF32x3 tensor-core dots compiled,
  full-precision dots in interpret mode (XLA on CPU has no TF32 algorithm)."""
  precision = (lax.Precision.HIGHEST if interpret else
               lax.DotAlgorithmPreset.TF32_TF32_F32_X3)
  return lambda a, b, **kw: plgpu.dot(a, b, precision=precision, **kw)


def _inverse_dot(interpret: bool, dtype):
  """a @ b for the float32 [C, C] products of the inverse and its gradient: at float32 accuracy
  (`_matrix_dot`) for float32 inputs; TF32 for bf16 inputs (one tensor-core pass: on an H100 the
  Gated DeltaNet factor kernel took 7.6 ms with TF32x3, 2.3 ms with TF32), its operand rounding
  reproduced in interpret mode so that CPU tests see the GPU's numerics."""
  if dtype == jnp.float32:
    return _matrix_dot(interpret)
  if interpret:
    return lambda a, b, **kw: plgpu.dot(round_mantissa(a, 10), round_mantissa(b, 10),
                                        precision=lax.Precision.HIGHEST, **kw)
  return lambda a, b, **kw: plgpu.dot(a, b, precision=lax.Precision.DEFAULT, **kw)


def _unit_lower_inverse(strict, matrix_dot):
  """(I + L)^-1 [n, n] float32 for the strictly lower-triangular L = `strict` (n a power of two),
  by doubling: with D the inverses of the diagonal blocks of size s, those of size 2s are
  D - D L_s D, where L_s keeps L's lower-left s x s block of each 2s x 2s diagonal block (block
  forward substitution, two matmuls per level)."""
  n = strict.shape[0]
  rows, cols = _iota(n, 0), _iota(n, 1)
  inverse = None
  size = 1
  while size < n:
    lower_left = ((rows // (2 * size) == cols // (2 * size)) & ((rows // size) % 2 == 1)
                  & ((cols // size) % 2 == 0))
    part = jnp.where(lower_left, strict, 0.0)
    if inverse is None:  # D = I
      inverse = jnp.where(rows == cols, 1.0, 0.0) - part
    else:
      inverse = inverse - matrix_dot(inverse, matrix_dot(part, inverse))
    size *= 2
  return inverse


class _FactorChunk:
  """One chunk's scalar decays: b [C], beta [C], and e^b, e^(b_C - b) [C, 1], E_strict, E_causal
  and G = (k k^T) E_strict [C, C], formed where used (not kept live)."""

  def __init__(self, k_ref, beta_ref, a_ref, dtype):
    self.k_ref, self.dtype = k_ref, dtype
    self.b = _cumsum(a_ref[...].astype(jnp.float32))
    self.beta = beta_ref[...].astype(jnp.float32)

  def eb(self):
    return jnp.exp(self.b)[:, None]

  def to_end(self):
    return jnp.exp(row(self.b, self.b.shape[0] - 1) - self.b)[:, None]

  def strict(self):
    return _pair_decay(self.b, strict=True)

  def causal(self):
    return _pair_decay(self.b, strict=False)

  def gram(self):
    return dot(self.k_ref[...], self.k_ref[...], self.dtype, trans_b=True) * self.strict()


def _factor_kernel(q_ref, k_ref, v_ref, beta_ref, a_ref, w_ref, u_v_ref, qd_ref, kd_ref, p_ref,
                   b_ref, *inverse_ref, dtype, interpret):
  """Per (batch, head, chunk), scalar decay: q (scaled), k [C, Dk]; v [C, Dv]; beta, a
  (log-decays) [C]. Writes w, qd, kd [C, Dk], u_v [C, Dv], P [C, C] in the operand dtype, b [C]
  and, given its ref (for the backward), A [C, C] float32."""
  c = _FactorChunk(k_ref, beta_ref, a_ref, dtype)
  inverse = _unit_lower_inverse(c.beta[:, None] * c.gram(), _inverse_dot(interpret, dtype))
  k = k_ref[...].astype(jnp.float32)
  w_ref[...] = dot(inverse, c.beta[:, None] * c.eb() * k, dtype).astype(w_ref.dtype)
  u_v_ref[...] = dot(inverse, c.beta[:, None] * v_ref[...].astype(jnp.float32),
                     dtype).astype(u_v_ref.dtype)
  qd_ref[...] = (q_ref[...].astype(jnp.float32) * c.eb()).astype(qd_ref.dtype)
  kd_ref[...] = (k * c.to_end()).astype(kd_ref.dtype)
  p_ref[...] = (dot(q_ref[...], k_ref[...], dtype, trans_b=True) * c.causal()).astype(
      p_ref.dtype)
  b_ref[...] = c.b
  if inverse_ref:
    inverse_ref[0][...] = inverse


def _pair_grad(x, dx):
  """The gradient of b through a scalar-decay pair matrix x_ij ~ e^(b_i - b_j) with cotangent dx:
  [n]."""
  xdx = x * dx
  return jnp.sum(xdx, axis=1) - jnp.sum(xdx, axis=0)


def _v_sum(product, refs, block_v: int, rows=None):
  """sum over the Dv blocks j of `product(*(ref[rows_i, block j] for ref_i in refs))`: the refs'
  last dim is Dv, read `block_v` columns at a time; `rows`: one pl.ds of rows per ref (None: all
  rows of every ref; an entry None: all rows of that ref)."""
  rows = rows or (None,) * len(refs)
  total = None
  for j in range(refs[0].shape[-1] // block_v):
    cols = pl.ds(j * block_v, block_v)
    part = product(*(ref[slice(None) if r is None else r, cols] for ref, r in zip(refs, rows)))
    total = part if total is None else total + part
  return total


def _scalar_grad_kernel(q_ref, k_ref, v_ref, beta_ref, a_ref, inverse_ref, u_ref, state_ref,
                        dstate_ref, do_ref, du_ref, dq_ref, dk_ref, dv_ref, dbeta_ref, da_ref, *,
                        block_v, dtype, interpret):
  """Per (batch, head, chunk), scalar decay: the forward's inputs (q, k [C, Dk], v [C, Dv], beta,
  a [C]), its inverse A [C, C] and U [C, Dv], the chunk's start state S and the gradient dS of the
  state after it [Dk, Dv], dO and dU [C, Dv]. Writes dq, dk [C, Dk] and dv [C, Dv] in the operand
  dtype, dbeta and da [C] float32 (see above).

  Each factor's cotangent is formed (a sum over Dv blocks) where it is used and dropped after, so
  that few [C, D] float32 values are live at once (register spills)."""
  v_sum = functools.partial(_v_sum, block_v=block_v)
  f32 = lambda ref: ref[...].astype(jnp.float32)
  c = _FactorChunk(k_ref, beta_ref, a_ref, dtype)
  n = c.b.shape[0]
  inverse = inverse_ref[...]

  # w = A X_k, u_v = A X_v: dX = A^T [dw | du_v], dA = dw X_k^T + du_v X_v^T.
  dw = -v_sum(lambda du, s: dot(du, s, dtype, trans_b=True), (du_ref, state_ref))
  d_inverse = dot(dw, c.beta[:, None] * c.eb() * f32(k_ref), dtype, trans_b=True)
  dx_k = dot(inverse, dw, dtype, trans_a=True)
  dxk_k = jnp.sum(dx_k * c.eb() * f32(k_ref), axis=1)
  dbeta = dxk_k
  db = c.beta * dxk_k
  dk = c.beta[:, None] * c.eb() * dx_k
  d_inverse = d_inverse + dot(du_ref[...], c.beta[:, None] * f32(v_ref), dtype, trans_b=True)
  dx_v = dot(inverse, du_ref[...], dtype, trans_a=True)
  dv_ref[...] = (c.beta[:, None] * dx_v).astype(dv_ref.dtype)
  dbeta = dbeta + jnp.sum(dx_v * f32(v_ref), axis=1)

  # A = (I + M)^-1, M = diag(beta) G.
  inverse_dot = _inverse_dot(interpret, dtype)
  d_m = -inverse_dot(inverse, inverse_dot(d_inverse, inverse, trans_b=True), trans_a=True)
  d_m = jnp.where(_iota(n, 0) > _iota(n, 1), d_m, 0.0)
  gram = c.gram()
  dbeta = dbeta + jnp.sum(d_m * gram, axis=1)
  d_gram = c.beta[:, None] * d_m
  db = db + _pair_grad(gram, d_gram)
  d_kk = d_gram * c.strict()
  dk = dk + dot(d_kk, k_ref[...], dtype) + dot(d_kk, k_ref[...], dtype, trans_a=True)

  # P and qd: dP = mask(dO U^T), dQd = dO S^T.
  dp = v_sum(lambda do, u: dot(do, u, dtype, trans_b=True), (do_ref, u_ref))
  dp = jnp.where(causal_mask(n), dp, 0.0)
  causal = c.causal()
  db = db + _pair_grad(dot(q_ref[...], k_ref[...], dtype, trans_b=True) * causal, dp)
  d_qk = dp * causal
  dk = dk + dot(d_qk, q_ref[...], dtype, trans_a=True)
  dq = dot(d_qk, k_ref[...], dtype)
  dqd = v_sum(lambda do, s: dot(do, s, dtype, trans_b=True), (do_ref, state_ref))
  dq_ref[...] = (dq + dqd * c.eb()).astype(dq_ref.dtype)
  db = db + jnp.sum(dqd * f32(q_ref) * c.eb(), axis=1)

  # kd, and b_C through the carried state: dKd = U dS^T, e^(b_C) rowsum(S * dS).
  dkd = v_sum(lambda u, ds: dot(u, ds, dtype, trans_b=True), (u_ref, dstate_ref))
  dk_ref[...] = (dk + dkd * c.to_end()).astype(dk_ref.dtype)
  to_end = jnp.sum(dkd * f32(k_ref) * c.to_end(), axis=1)
  s_ds = v_sum(lambda s, ds: jnp.sum(s.astype(jnp.float32) * ds.astype(jnp.float32)),
               (state_ref, dstate_ref))
  last = lax.broadcasted_iota(jnp.int32, (n,), 0) == n - 1
  db = db - to_end + jnp.where(last, jnp.sum(to_end) + jnp.exp(row(c.b, n - 1)) * s_ds, 0.0)

  dbeta_ref[...] = dbeta
  da_ref[...] = _cumsum(db, reverse=True)


# Per key channel (KDA): b, e^b and the pair matrices x_ij = sum_d x_id y_jd e^(b_id - b_jd) are
# [C, Dk]-wide, so the kernels work through Dk in blocks of `CHANNEL_BLOCK` columns (fewer live
# float32 values: no [C, Dk] value is kept across blocks; the pair matrices sum over them). A
# pair matrix's block of columns is a sum over row blocks of `PAIR_SUB`: block (I, J), J <= I, is
# (x e^(b - r)) (y e^(r - b))^T restricted to rows I and J, with r the decay at the first row of
# I (J < I: both factors <= 1) or at its middle row (J = I: finite while the decay over half a
# block is above -88), as the GLA kernels' per-channel blocks; each is one [C, C] matmul of
# operands zeroed outside its rows (the exponent masked to -inf before `exp`).


def _channel_decay(a_ref, cols, matrix_dot):
  """b [C, BK] float32: the cumulative log-decays of the columns `cols` of a_ref [C, Dk]."""
  a = a_ref[:, cols].astype(jnp.float32)
  return matrix_dot(jnp.where(triangular_mask(a.shape[0], reverse=False), 1.0, 0.0), a)


def _channel_blocks(b):
  """(left, right) [C, BK] factor pairs of the row blocks of a pair matrix (see above)."""
  n, width = b.shape
  blocks = lax.broadcasted_iota(jnp.int32, (n, width), 0) // PAIR_SUB
  for i in range(n // PAIR_SUB):
    for j in range(i + 1):
      r = row(b, i * PAIR_SUB + (PAIR_SUB // 2 if i == j else 0))[None, :]
      yield (jnp.exp(jnp.where(blocks == i, b - r, -jnp.inf)),
             jnp.exp(jnp.where(blocks == j, r - b, -jnp.inf)))


def _channel_pair(x, y, b, dtype):
  """One column block's part of the pair matrix of x, y [C, BK] (float32) with decays b: [C, C],
  unmasked (the caller masks the sum over blocks)."""
  return sum(dot(x * left, y * right, dtype, trans_b=True) for left, right in _channel_blocks(b))


def _channel_pair_grads(d_pair, x, y, b, dtype):
  """(dx, dy) [C, BK] of one column block of the pair matrix of x, y for its cotangent `d_pair`
  [C, C] (masked like the matrix)."""
  dx = dy = 0.0
  for left, right in _channel_blocks(b):
    dx = dx + dot(d_pair, y * right, dtype) * left
    dy = dy + dot(d_pair, x * left, dtype, trans_a=True) * right
  return dx, dy


def _column_blocks(width: int):
  return [pl.ds(j * CHANNEL_BLOCK, CHANNEL_BLOCK) for j in range(width // CHANNEL_BLOCK)]


def _channel_factor_kernel(q_ref, k_ref, v_ref, beta_ref, a_ref, w_ref, u_v_ref, qd_ref, kd_ref,
                           p_ref, b_ref, *inverse_ref, dtype, interpret):
  """As `_factor_kernel` with per-channel log-decays a [C, Dk] (b [C, Dk])."""
  matrix_dot = _matrix_dot(interpret)
  n = q_ref.shape[0]
  beta = beta_ref[...].astype(jnp.float32)[:, None]
  gram = p = 0.0
  for cols in _column_blocks(k_ref.shape[-1]):
    b = _channel_decay(a_ref, cols, matrix_dot)
    q, k = q_ref[:, cols].astype(jnp.float32), k_ref[:, cols].astype(jnp.float32)
    gram = gram + _channel_pair(k, k, b, dtype)
    p = p + _channel_pair(q, k, b, dtype)
    qd_ref[:, cols] = (q * jnp.exp(b)).astype(qd_ref.dtype)
    kd_ref[:, cols] = (k * jnp.exp(row(b, n - 1)[None, :] - b)).astype(kd_ref.dtype)
    b_ref[:, cols] = b
  p_ref[...] = jnp.where(causal_mask(n), p, 0.0).astype(p_ref.dtype)
  inverse = _unit_lower_inverse(beta * jnp.where(_iota(n, 0) > _iota(n, 1), gram, 0.0),
                                _inverse_dot(interpret, dtype))
  u_v_ref[...] = dot(inverse, beta * v_ref[...].astype(jnp.float32), dtype).astype(u_v_ref.dtype)
  for cols in _column_blocks(k_ref.shape[-1]):
    x_k = beta * jnp.exp(b_ref[:, cols]) * k_ref[:, cols].astype(jnp.float32)
    w_ref[:, cols] = dot(inverse, x_k, dtype).astype(w_ref.dtype)
  if inverse_ref:
    inverse_ref[0][...] = inverse


def _channel_grad_kernel(q_ref, k_ref, v_ref, beta_ref, a_ref, inverse_ref, u_ref, state_ref,
                         dstate_ref, do_ref, du_ref, dq_ref, dk_ref, dv_ref, dbeta_ref, da_ref, *,
                         block_v, dtype, interpret):
  """As `_scalar_grad_kernel` with per-channel log-decays a [C, Dk] (da [C, Dk]). First the
  [C, C] cotangents, summed over the blocks of Dk (dA, through it dM and dG, and dP), then one
  pass per block of Dk for its columns of dq, dk and da. The second pass forms each block's b and
  dw again rather than keep [C, Dk] float32 values live across the first (register spills)."""
  matrix_dot = _matrix_dot(interpret)
  v_sum = functools.partial(_v_sum, block_v=block_v)
  f32 = lambda ref, cols: ref[:, cols].astype(jnp.float32)
  # x S[cols]^T [C, BK] for x_ref [C, Dv] and the rows `cols` of a state ref [Dk, Dv].
  times_state_rows = lambda x_ref, s_ref, cols: v_sum(
      lambda x, s: dot(x, s, dtype, trans_b=True), (x_ref, s_ref), rows=(None, cols))
  n = q_ref.shape[0]
  beta = beta_ref[...].astype(jnp.float32)[:, None]
  inverse = inverse_ref[...]

  # dA = dw X_k^T + du_v X_v^T (dw summed per block of Dk); dv; dM; dG; dP.
  v = v_ref[...].astype(jnp.float32)
  d_inverse = dot(du_ref[...], beta * v, dtype, trans_b=True)
  dx_v = dot(inverse, du_ref[...], dtype, trans_a=True)
  dv_ref[...] = (beta * dx_v).astype(dv_ref.dtype)
  dbeta = jnp.sum(dx_v * v, axis=1)
  gram = 0.0
  for cols in _column_blocks(k_ref.shape[-1]):
    b, k = _channel_decay(a_ref, cols, matrix_dot), f32(k_ref, cols)
    dw_j = -times_state_rows(du_ref, state_ref, cols)
    d_inverse = d_inverse + dot(dw_j, beta * jnp.exp(b) * k, dtype, trans_b=True)
    gram = gram + _channel_pair(k, k, b, dtype)
  strict = _iota(n, 0) > _iota(n, 1)
  inverse_dot = _inverse_dot(interpret, dtype)
  d_m = -inverse_dot(inverse, inverse_dot(d_inverse, inverse, trans_b=True), trans_a=True)
  d_m = jnp.where(strict, d_m, 0.0)
  dbeta = dbeta + jnp.sum(d_m * jnp.where(strict, gram, 0.0), axis=1)
  d_gram = beta * d_m
  dp = v_sum(lambda do, u: dot(do, u, dtype, trans_b=True), (do_ref, u_ref))
  dp = jnp.where(causal_mask(n), dp, 0.0)

  last = lax.broadcasted_iota(jnp.int32, (n, CHANNEL_BLOCK), 0) == n - 1
  for cols in _column_blocks(k_ref.shape[-1]):
    b, k, q = _channel_decay(a_ref, cols, matrix_dot), f32(k_ref, cols), f32(q_ref, cols)
    eb, to_end = jnp.exp(b), jnp.exp(row(b, n - 1)[None, :] - b)
    dx_k = dot(inverse, -times_state_rows(du_ref, state_ref, cols), dtype, trans_a=True)
    dbeta = dbeta + jnp.sum(dx_k * eb * k, axis=1)
    dk = beta * eb * dx_k
    db = dk * k
    dx, dy = _channel_pair_grads(d_gram, k, k, b, dtype)
    dk = dk + dx + dy
    db = db + k * (dx - dy)
    dq, dy = _channel_pair_grads(dp, q, k, b, dtype)
    dk = dk + dy
    db = db + q * dq - k * dy
    dqd = times_state_rows(do_ref, state_ref, cols)
    dq_ref[:, cols] = (dq + dqd * eb).astype(dq_ref.dtype)
    db = db + dqd * q * eb
    dkd = times_state_rows(u_ref, dstate_ref, cols)
    dk_ref[:, cols] = (dk + dkd * to_end).astype(dk_ref.dtype)
    to_end_db = dkd * k * to_end
    s_ds = v_sum(lambda s, ds: jnp.sum(s.astype(jnp.float32) * ds.astype(jnp.float32), axis=1),
                 (state_ref, dstate_ref), rows=(cols, cols))
    db = db - to_end_db + jnp.where(
        last, (jnp.sum(to_end_db, axis=0) + jnp.exp(row(b, n - 1)) * s_ds)[None, :], 0.0)
    da_ref[:, cols] = matrix_dot(jnp.where(triangular_mask(n, reverse=True), 1.0, 0.0), db)
  dbeta_ref[...] = dbeta


# Per head_dim_k: (num_warps, num_stages) of the factor kernels and of the backward's per-chunk
# kernels. Compiled for sm_90 at Dk = 128 (`bench/kernel_resources.py`, 2026-12-07), bytes
# spilled per thread with 8 warps: scalar decay, the factor kernel 0 (TF32 inverse products), the
# gradient kernel 216; per channel, 32-column blocks and 32-row pair blocks, 1720 and 2760
# (16-column blocks: 1432 and 2568; 16-row pair blocks: over 4000 each). Earlier, with TF32x3
# inverse products: 64-column blocks 1288 and 3904, one [C, Dk] pass 1888 and 7480.
PAIR_SUB = 32       # rows per block of a per-channel pair matrix
CHANNEL_BLOCK = 32  # key channels per block of the per-channel kernels
FUSED_LAUNCH = {64: ((4, 1), (4, 1)), 128: ((8, 1), (8, 1))}


def _per_chunk_spec(x, chunk: int):
  """BlockSpec of one chunk of x [B, T, H] or [B, T, H, D] over the grid (batch, head, chunk)."""
  if len(x.shape) == 3:
    return pl.BlockSpec((None, chunk, None), lambda i, h, c: (i, c, h))
  return pl.BlockSpec((None, chunk, None, x.shape[-1]), lambda i, h, c: (i, c, h, 0))


def _factors(q, k, v, beta, log_decay, interpret, *, save_inverse: bool):
  """(w, u_v, qd, kd, P, b) of `_factor_kernel` (`_channel_factor_kernel` for per-channel decays)
  for every chunk, and A with `save_inverse`:
  [B, T, H, *] (P and A with C columns), b [B, T, H]."""
  batch, t, heads, dk = q.shape
  chunk = CONFIGS[dk].chunk
  like = lambda x, last=None, dtype=None: jax.ShapeDtypeStruct(
      x.shape[:3] + ((x.shape[-1],) if last is None else (last,)), dtype or x.dtype)
  out_shape = (like(k), like(v), like(q), like(k), like(q, chunk),
               jax.ShapeDtypeStruct(log_decay.shape, jnp.float32))
  if save_inverse:
    out_shape += (like(q, chunk, jnp.float32),)
  operands = (q, k, v, beta, log_decay)
  num_warps, num_stages = FUSED_LAUNCH[dk][0]
  return pl.pallas_call(
      functools.partial(_channel_factor_kernel if log_decay.ndim == 4 else _factor_kernel,
                        dtype=q.dtype, interpret=interpret),
      grid=(batch, heads, t // chunk),
      in_specs=tuple(_per_chunk_spec(x, chunk) for x in operands),
      out_specs=tuple(_per_chunk_spec(x, chunk) for x in out_shape),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
  )(*operands)


def _fused_grads(q, k, v, beta, log_decay, inverse, u, states, dstates, do, du, interpret):
  """(dq, dk, dv, dbeta, dlog_decay) of `_scalar_grad_kernel` or `_channel_grad_kernel` for every
  chunk."""
  batch, t, heads, dk = q.shape
  dv = v.shape[-1]
  chunk = CONFIGS[dk].chunk
  state = pl.BlockSpec((None, None, dk, dv), lambda i, h, c: (i, h, c, 0))
  operands = (q, k, v, beta, log_decay, inverse, u, states, dstates, do, du)
  in_specs = tuple(state if x is states or x is dstates else _per_chunk_spec(x, chunk)
                   for x in operands)
  out_shape = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v, beta, log_decay))
  num_warps, num_stages = FUSED_LAUNCH[dk][1]
  return pl.pallas_call(
      functools.partial(_channel_grad_kernel if log_decay.ndim == 4 else _scalar_grad_kernel,
                        block_v=min(CHUNK_GRAD_LAUNCH[dk][0], dv),
                        dtype=q.dtype, interpret=interpret),
      grid=(batch, heads, t // chunk),
      in_specs=in_specs,
      out_specs=tuple(_per_chunk_spec(x, chunk) for x in out_shape),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
  )(*operands)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _fused_delta(q, k, v, beta, log_decay, initial_state, config, interpret):
  factors = _factors(q, k, v, beta, log_decay, interpret, save_inverse=False)
  return _forward(*factors, initial_state, config, interpret, save_residuals=False)[:2]


def _fused_delta_forward(q, k, v, beta, log_decay, initial_state, config, interpret):
  w, u_v, qd, kd, p, b, inverse = _factors(q, k, v, beta, log_decay, interpret,
                                           save_inverse=True)
  o, final_state, (states, u) = _forward(w, u_v, qd, kd, p, b, initial_state, config, interpret,
                                         save_residuals=True)
  return (o, final_state), (q, k, v, beta, log_decay, inverse, w, qd, kd, p, b, states, u)


def _fused_delta_backward(config, interpret, residuals, cotangents):
  q, k, v, beta, log_decay, inverse, w, qd, kd, p, b, states, u = residuals
  do, dfinal = cotangents
  do = do.astype(w.dtype)
  dstates, du, dinitial = _reverse_state_pass(w, qd, kd, p, b, u, do, dfinal, config, interpret)
  grads = _fused_grads(q, k, v, beta, log_decay, inverse, u, states, dstates, do, du, interpret)
  return (*grads, dinitial)


_fused_delta.defvjp(_fused_delta_forward, _fused_delta_backward)


def fused_delta_rule(q, k, v, beta, log_decay, initial_state, *, interpret: bool = False):
  """The chunked delta rule with one document per row, factors included (module docstring and
  the section above), differentiable in every input.

  Args:
    q: [B, T, H, Dk] (already scaled); k: [B, T, H, Dk]; v: [B, T, H, Dv]: one dtype, bf16 or
      float32 (the operand dtype). Dk, Dv in `chunk_common.HEAD_DIMS`.
    beta: [B, T, H] float32.
    log_decay: [B, T, H] float32 per-token log-decays (<= 0; zeros for DeltaNet), or
      [B, T, H, Dk] per key channel (KDA).
    initial_state: [B, H, Dk, Dv] float32.
    interpret: run the kernels in Pallas interpret mode (CPU tests).
  T must be a multiple of C = `chunk_size(Dk)`.

  Returns:
    (o [B, T, H, Dv] in the operand dtype, final state [B, H, Dk, Dv] float32).
  """
  batch, t, heads, dk = q.shape
  if t % CONFIGS[dk].chunk:
    raise ValueError(f"fused_delta_rule: T ({t}) must be a multiple of {CONFIGS[dk].chunk}")
  config = _config(batch, heads, dk, v.shape[-1])
  return _fused_delta(q, k, v, beta.astype(jnp.float32), log_decay.astype(jnp.float32),
                      initial_state.astype(jnp.float32), config, interpret)
