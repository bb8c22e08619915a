"""Pallas (Triton) GPU kernels for gated linear attention: scalar decay (simple GLA) and per-channel
decay (GLA), forward and backward, wired with `jax.custom_vjp`.

Recurrence, per batch and head, with a [Dk, Dv] float32 state S and log-decays a_t <= 0 (one per
token, or one per key channel):

  S_t = diag(exp(a_t)) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t.

Design (Lightning Attention-2 / FLA fused-chunk): the grid is (batch, heads, Dv blocks); each
program walks the chunks of C tokens in order with its [Dk, BV] float32 state slice in registers.
Inside a chunk, with b the cumulative log-decay from the chunk start (inclusive, computed outside
the kernel) and b_C its last row:

  o     = (q * e^b) S_0 + mask(A) v,             A_ij = sum_d q_id k_jd e^(b_id - b_jd),
  S_C   = e^(b_C) * S_0 + (k * e^(b_C - b))^T v.

Scalar decay: A = (q k^T) * e^(b_i - b_j) with the exponent masked to -inf above the diagonal
before `exp` (exact, never overflows). Per-channel decay: A = (q e^(b - r)) (k e^(r - b))^T with r
the cumulative decay at the middle of the chunk, one matmul; the two factors stay finite while the
decay over half a chunk is above -88 (mean log-decay above -88 / (C / 2) per token: -5.5 for the
C = 32 of the table below), as in FLA's fused-chunk GLA.

Backward: one kernel walks the chunks in reverse carrying dS (the gradient of the state at the
chunk end) for dk, dv and the initial-state gradient; one walks forward re-running the state for
dq. With dA_ij = (do_i . v_j) masked,

  dq = (dA (k e^(r - b))) e^(b - r) + e^b (do S_0^T),
  dk = (dA^T (q e^(b - r))) e^(r - b) + e^(b_C - b) (v dS_C^T),
  dv = mask(A)^T do + (k e^(b_C - b)) dS_C,      dS_0 = e^(b_C) dS_C + (q e^b)^T do.

The decay gradient needs no kernel: since o and the final state depend on the global cumulative
log-decay B only through differences B_i - B_j between a query (or the final state) and a key,

  dB_t = q_t * dq_t - k_t * dk_t  (+ sum_e S_T * dS_T at t = T),   da_t = sum_{s >= t} dB_s,

summed over the key channels for a scalar decay. dq and dk are computed per Dv block and summed.

Operands of the matmuls are in the input dtype (bf16 or float32; float32 with full-precision
IEEE dots, not tf32), accumulation and states in float32; with bf16 inputs the dots with the state
and those giving dq, dk keep float32 operands (tf32 on the GPU; see `chunk_common.dot`). This module never
imports jaxchunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu.chunk_common import Config, causal_mask, dot, fit_block_v, row


# Block sizes per (per-channel decay, head_dim_k) (`fit_block_v` narrows block_v for small grids).
CONFIGS = {
    (False, 64): Config(chunk=64, block_v=64, num_warps=4, num_stages=2),
    (False, 128): Config(chunk=64, block_v=64, num_warps=4, num_stages=2),
    (True, 64): Config(chunk=32, block_v=64, num_warps=4, num_stages=2),
    (True, 128): Config(chunk=32, block_v=64, num_warps=4, num_stages=2),
}
def _config(per_channel: bool, batch: int, heads: int, dk: int, dv: int) -> Config:
  return fit_block_v(CONFIGS[(per_channel, dk)], batch, heads, dv)


# ------------------------------------------------------------------------------------------------
# In-kernel helpers (values, not refs).


def _chunk_decays(b, causal, per_channel: bool):
  """Decay factors of one chunk from its cumulative log-decay b ([C] scalar, or [C, Dk]).

  Returns (q_out, k_state, s_decay, q_intra, k_intra, pair):
    q_out = e^b and k_state = e^(b_C - b), [C, 1] or [C, Dk];
    s_decay = e^(b_C), a scalar or [Dk, 1] (scales the state's rows);
    q_intra, k_intra: factors of q and k inside A ([C, Dk], or 1.0 for a scalar decay);
    pair: [C, C] factor e^(b_i - b_j) masked to 0 above the diagonal (1.0 for per-channel).
  """
  chunk = b.shape[0]
  b_last = row(b, chunk - 1)
  if per_channel:
    b_mid = row(b, chunk // 2)[None, :]
    return (jnp.exp(b), jnp.exp(b_last[None, :] - b), jnp.exp(b_last)[:, None],
            jnp.exp(b - b_mid), jnp.exp(b_mid - b), 1.0)
  pair = jnp.exp(jnp.where(causal, b[:, None] - b[None, :], -jnp.inf))
  return jnp.exp(b)[:, None], jnp.exp(b_last - b)[:, None], jnp.exp(b_last), 1.0, 1.0, pair


# ------------------------------------------------------------------------------------------------
# Kernels. Refs are one (batch, head, Dv block): q, k [T, Dk]; v, o, do [T, BV]; b [T] or [T, Dk];
# states [Dk, BV].


def _forward_kernel(q_ref, k_ref, v_ref, b_ref, s0_ref, o_ref, st_ref, *, chunk, num_chunks, scale,
                    per_channel, dtype):
  causal = causal_mask(chunk)

  def body(c, state):
    rows = pl.ds(c * chunk, chunk)
    q = q_ref[rows, :].astype(jnp.float32) * scale
    k = k_ref[rows, :].astype(jnp.float32)
    v = v_ref[rows, :]
    q_out, k_state, s_decay, q_intra, k_intra, pair = _chunk_decays(
        b_ref[rows, ...].astype(jnp.float32), causal, per_channel)
    a = jnp.where(causal, dot(q * q_intra, k * k_intra, dtype, trans_b=True) * pair, 0.0)
    o = dot(a, v, dtype) + dot(q * q_out, state, dtype, wide=True)
    o_ref[rows, :] = o.astype(o_ref.dtype)
    return s_decay * state + dot(k * k_state, v, dtype, wide=True, trans_a=True)

  st_ref[...] = lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def _backward_dq_kernel(k_ref, v_ref, b_ref, do_ref, s0_ref, dq_ref, *, chunk, num_chunks, scale,
                        per_channel, dtype):
  causal = causal_mask(chunk)

  def body(c, state):
    rows = pl.ds(c * chunk, chunk)
    k = k_ref[rows, :].astype(jnp.float32)
    v = v_ref[rows, :]
    do = do_ref[rows, :]
    q_out, k_state, s_decay, q_intra, k_intra, pair = _chunk_decays(
        b_ref[rows, ...].astype(jnp.float32), causal, per_channel)
    da = jnp.where(causal, dot(do, v, dtype, trans_b=True) * pair, 0.0)
    dq = (dot(da, k * k_intra, dtype, wide=True) * q_intra
          + q_out * dot(do, state, dtype, wide=True, trans_b=True))
    dq_ref[rows, :] = dq * scale
    return s_decay * state + dot(k * k_state, v, dtype, wide=True, trans_a=True)

  lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(jnp.float32))


def _backward_dkv_kernel(q_ref, k_ref, v_ref, b_ref, do_ref, dst_ref, dk_ref, dv_ref, ds0_ref, *,
                         chunk, num_chunks, scale, per_channel, dtype):
  causal = causal_mask(chunk)

  def body(i, dstate):
    rows = pl.ds((num_chunks - 1 - i) * chunk, chunk)
    q = q_ref[rows, :].astype(jnp.float32) * scale
    k = k_ref[rows, :].astype(jnp.float32)
    v = v_ref[rows, :]
    do = do_ref[rows, :]
    q_out, k_state, s_decay, q_intra, k_intra, pair = _chunk_decays(
        b_ref[rows, ...].astype(jnp.float32), causal, per_channel)
    a = jnp.where(causal, dot(q * q_intra, k * k_intra, dtype, trans_b=True) * pair, 0.0)
    da = jnp.where(causal, dot(do, v, dtype, trans_b=True) * pair, 0.0)
    dk = (dot(da, q * q_intra, dtype, wide=True, trans_a=True) * k_intra
          + k_state * dot(v, dstate, dtype, wide=True, trans_b=True))
    dv = dot(a, do, dtype, trans_a=True) + dot(k * k_state, dstate, dtype, wide=True)
    dk_ref[rows, :] = dk
    dv_ref[rows, :] = dv.astype(dv_ref.dtype)
    return s_decay * dstate + dot(q * q_out, do, dtype, wide=True, trans_a=True)

  ds0_ref[...] = lax.fori_loop(0, num_chunks, body, dst_ref[...].astype(jnp.float32))


# ------------------------------------------------------------------------------------------------
# pallas_call wrappers. Arrays: q, k [B,T,H,Dk]; v, o [B,T,H,Dv]; b [B,T,H] or [B,T,H,Dk] (chunk-
# local cumulative log-decay, float32); states [B,H,Dk,Dv] float32. T is a multiple of the chunk.


def _specs(shapes: dict, names, block_v: int):
  """BlockSpecs over the grid (batch, head, Dv block) for the named operands."""
  def seq(last, v_blocked):
    return pl.BlockSpec((None, shapes["t"], None, last),
                        lambda b, h, j: (b, 0, h, j if v_blocked else 0))

  table = {
      "qk": seq(shapes["dk"], False),
      "v": seq(block_v, True),
      "b": (pl.BlockSpec((None, shapes["t"], None, shapes["dk"]), lambda b, h, j: (b, 0, h, 0))
            if shapes["per_channel"] else
            pl.BlockSpec((None, shapes["t"], None), lambda b, h, j: (b, 0, h))),
      "state": pl.BlockSpec((None, None, shapes["dk"], block_v), lambda b, h, j: (b, h, 0, j)),
      "partial": pl.BlockSpec((None, None, shapes["t"], None, shapes["dk"]),
                              lambda b, h, j: (j, b, 0, h, 0)),
  }
  return tuple(table[n] for n in names)


def _call(kernel, in_names, out_names, out_shape, q, v, b, config, interpret, **kw):
  batch, t, heads, dk = q.shape
  dv = v.shape[-1]
  shapes = dict(t=t, dk=dk, per_channel=b.ndim == 4)
  return pl.pallas_call(
      functools.partial(kernel, chunk=config.chunk, num_chunks=t // config.chunk,
                        per_channel=b.ndim == 4, dtype=q.dtype, **kw),
      grid=(batch, heads, dv // config.block_v),
      in_specs=_specs(shapes, in_names, config.block_v),
      out_specs=_specs(shapes, out_names, config.block_v),
      out_shape=out_shape,
      compiler_params=plgpu.CompilerParams(num_warps=config.num_warps,
                                           num_stages=config.num_stages),
      interpret=interpret,
  )


def _chunk_cumsum(log_decay, chunk: int):
  """Chunk-local inclusive cumulative sum along T of [B,T,H(,Dk)] log-decays, in float32."""
  shape = log_decay.shape
  x = log_decay.astype(jnp.float32).reshape(shape[0], shape[1] // chunk, chunk, *shape[2:])
  return jnp.cumsum(x, axis=2).reshape(shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _gla(q, k, v, log_decay, initial_state, scale, config, interpret):
  return _gla_forward(q, k, v, log_decay, initial_state, scale, config, interpret)[0]


def _gla_forward(q, k, v, log_decay, initial_state, scale, config, interpret):
  batch, t, heads, dk = q.shape
  dv = v.shape[-1]
  b = _chunk_cumsum(log_decay, config.chunk)
  o, final_state = _call(
      _forward_kernel, ("qk", "qk", "v", "b", "state"), ("v", "state"),
      (jax.ShapeDtypeStruct((batch, t, heads, dv), q.dtype),
       jax.ShapeDtypeStruct((batch, heads, dk, dv), jnp.float32)),
      q, v, b, config, interpret, scale=scale)(q, k, v, b, initial_state)
  return (o, final_state), (q, k, v, log_decay, b, initial_state, final_state)


def _gla_backward(scale, config, interpret, residuals, cotangents):
  q, k, v, log_decay, b, initial_state, final_state = residuals
  do, dfinal = cotangents
  batch, t, heads, dk = q.shape
  dv = v.shape[-1]
  num_v = dv // config.block_v
  partial = jax.ShapeDtypeStruct((num_v, batch, t, heads, dk), jnp.float32)
  do = do.astype(q.dtype)
  (dq,) = _call(_backward_dq_kernel, ("qk", "v", "b", "v", "state"), ("partial",), (partial,),
                q, v, b, config, interpret, scale=scale)(k, v, b, do, initial_state)
  dq = dq.sum(0)
  dk_, dv_, dinitial = _call(
      _backward_dkv_kernel, ("qk", "qk", "v", "b", "v", "state"), ("partial", "v", "state"),
      (partial, jax.ShapeDtypeStruct(v.shape, v.dtype),
       jax.ShapeDtypeStruct((batch, heads, dk, dv), jnp.float32)),
      q, v, b, config, interpret, scale=scale)(q, k, v, b, do, dfinal)
  dk_ = dk_.sum(0)

  db = q.astype(jnp.float32) * dq - k.astype(jnp.float32) * dk_       # [B,T,H,Dk]
  final_term = jnp.sum(final_state * dfinal, axis=-1)                 # [B,H,Dk]
  if log_decay.ndim == 3:
    db, final_term = db.sum(-1), final_term.sum(-1)
  dlog_decay = jnp.flip(jnp.cumsum(jnp.flip(db, 1), axis=1), 1) + final_term[:, None]
  return (dq.astype(q.dtype), dk_.astype(k.dtype), dv_, dlog_decay.astype(log_decay.dtype),
          dinitial)


_gla.defvjp(_gla_forward, _gla_backward)


def gated_linear_attention(q, k, v, log_decay, initial_state, *, scale: float,
                           interpret: bool = False):
  """Chunked gated linear attention on GPU (or in interpret mode), differentiable in every input.

  Args:
    q, k: [B, T, H, Dk] (k already broadcast to q's heads); v: [B, T, H, Dv]; bf16 or float32,
      one dtype. Dk, Dv in `chunk_common.HEAD_DIMS`.
    log_decay: [B, T, H] (scalar decay per head) or [B, T, H, Dk] (per key channel), <= 0.
    initial_state: [B, H, Dk, Dv] float32.
    scale: multiplies q.
    interpret: run the kernels in Pallas interpret mode (CPU tests).

  Returns:
    (o [B, T, H, Dv] in q's dtype, final state [B, H, Dk, Dv] float32). T need not be a multiple of
    the chunk: the sequence is padded with k = v = 0 and log-decay 0, which leave the state as is.
  """
  batch, t, heads, dk = q.shape
  dv = v.shape[-1]
  config = _config(log_decay.ndim == 4, batch, heads, dk, dv)
  pad = (-t) % config.chunk
  if pad:
    q, k, v, log_decay = (jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
                          for x in (q, k, v, log_decay))
  o, final_state = _gla(q, k, v, log_decay, initial_state.astype(jnp.float32), float(scale), config,
                        interpret)
  return o[:, :t], final_state
