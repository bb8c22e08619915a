"""Pallas (Triton) GPU kernels for RAT's cross-chunk attention, forward and backward.

RAT query t, in chunk c_t, attends with one softmax over the summaries (aggregated key / value at a
chunk's last token) of every chunk before c_t and over its own running aggregate k~_t / v~_t:

  o_t = softmax_j(scale * q_t . K_j) V_j,   K = [k_sum_0, ..., k_sum_{c_t - 1}, k~_t] (same for V).

The in-chunk aggregation that produces k~, v~ and the summaries is done by the caller (O(T * D),
memory-bound); this file holds the O(T * T / C) attention, flash-attention style:

- forward: grid (batch, heads, query blocks of BQ tokens). A program loads its queries and their own
  running aggregates; the own term seeds the online softmax (m = q . k~_t, l = 1, acc = v~_t). It then
  loops over blocks of BK summaries: the blocks wholly before the block's first chunk unmasked, the
  few blocks up to its last chunk with the chunk-causal mask. Writes o and the log2-sum-exp.
- backward (FlashAttention-2): one kernel per query block computes dq and the gradients of the own
  terms; one per summary block loops over the query blocks that see it and computes d(summaries).

GQA: the grid runs over query heads; the kv-head inputs are indexed with head // group. Gradients of
kv-head inputs come out per query head ([B, *, H, D] float32) and the caller's wrapper sums groups.

Scores use base 2 (exp2, with log2(e) folded into the scale). Dots accumulate in float32; float32
operands use full-precision (IEEE) dots, bfloat16 operands the tensor cores' bf16 path.

This module does not import jaxchunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu.flash_common import BlockConfig, dot, fit_block


# (head_dim, operand dtype name) -> configs of the forward, dq and d(summaries) kernels.
CONFIGS: dict[tuple[int, str], dict[str, BlockConfig]] = {
    (64, "bfloat16"): dict(fwd=BlockConfig(128, 64, 4, 3), dq=BlockConfig(64, 64, 4, 2),
                           dkv=BlockConfig(64, 64, 4, 2)),
    (128, "bfloat16"): dict(fwd=BlockConfig(128, 64, 8, 2), dq=BlockConfig(64, 64, 4, 2),
                            dkv=BlockConfig(64, 64, 4, 2)),
    (64, "float32"): dict(fwd=BlockConfig(64, 32, 4, 2), dq=BlockConfig(32, 32, 4, 2),
                          dkv=BlockConfig(32, 32, 4, 2)),
    (128, "float32"): dict(fwd=BlockConfig(64, 32, 4, 2), dq=BlockConfig(32, 32, 4, 2),
                           dkv=BlockConfig(32, 32, 4, 2)),
}
HEAD_DIMS = (64, 128)
DTYPES = ("bfloat16", "float32")

_LOG2E = math.log2(math.e)


def unsupported_reason(head_dim: int, dtype) -> str | None:
  """None when the kernels support this head dim and operand dtype, else the reason they do not."""
  if head_dim not in HEAD_DIMS:
    return f"head_dim {head_dim} not in {HEAD_DIMS}"
  if jnp.dtype(dtype).name not in DTYPES:
    return f"dtype {jnp.dtype(dtype).name} not in {DTYPES}"
  return None


def _fwd_kernel(q_ref, k_run_ref, v_run_ref, k_sum_ref, v_sum_ref, q_chunk_ref, o_ref, lse_ref, *,
                scale: float, block_k: int):
  """One (batch, head, query block): q [BQ, D], own terms [BQ, D], summaries [M, D], q_chunk [BQ].

  Writes o [BQ, D] and lse [BQ] (base 2: log2 of the softmax denominator in scaled-score units).
  """
  qk_scale = scale * _LOG2E
  q = q_ref[...]
  q_chunk = q_chunk_ref[...]
  k_run = k_run_ref[...].astype(jnp.float32)
  m = jnp.sum(q.astype(jnp.float32) * k_run, axis=1) * qk_scale
  l = jnp.ones_like(m)
  acc = v_run_ref[...].astype(jnp.float32)
  num_blocks = k_sum_ref.shape[0] // block_k

  def body(j, carry, *, masked):
    m, l, acc = carry
    ks = k_sum_ref[pl.ds(j * block_k, block_k), :]
    vs = v_sum_ref[pl.ds(j * block_k, block_k), :]
    s = dot(q, ks, trans_b=True) * qk_scale
    if masked:
      visible = j * block_k + jnp.arange(block_k)[None, :] < q_chunk[:, None]
      s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + dot(p.astype(vs.dtype), vs)
    return m_new, l, acc

  first_masked = jnp.minimum(jnp.min(q_chunk) // block_k, num_blocks)
  end = jnp.minimum(pl.cdiv(jnp.max(q_chunk), block_k), num_blocks)
  carry = lax.fori_loop(0, first_masked, functools.partial(body, masked=False), (m, l, acc))
  m, l, acc = lax.fori_loop(first_masked, end, functools.partial(body, masked=True), carry)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def _dq_kernel(q_ref, k_run_ref, v_run_ref, k_sum_ref, v_sum_ref, q_chunk_ref, do_ref, lse_ref,
               delta_ref, dq_ref, dk_run_ref, dv_run_ref, *, scale: float, block_k: int):
  """One (batch, head, query block): dq, d(k~), d(v~) [BQ, D] float32, for this query head."""
  qk_scale = scale * _LOG2E
  q = q_ref[...]
  do = do_ref[...]
  q_chunk = q_chunk_ref[...]
  lse = lse_ref[...]
  delta = delta_ref[...]
  k_run = k_run_ref[...].astype(jnp.float32)
  v_run = v_run_ref[...].astype(jnp.float32)
  q32, do32 = q.astype(jnp.float32), do.astype(jnp.float32)
  p_run = jnp.exp2(jnp.sum(q32 * k_run, axis=1) * qk_scale - lse)
  ds_run = p_run * (jnp.sum(do32 * v_run, axis=1) - delta)
  dk_run_ref[...] = ds_run[:, None] * q32 * scale
  dv_run_ref[...] = p_run[:, None] * do32
  num_blocks = k_sum_ref.shape[0] // block_k

  def body(j, dq, *, masked):
    ks = k_sum_ref[pl.ds(j * block_k, block_k), :]
    vs = v_sum_ref[pl.ds(j * block_k, block_k), :]
    s = dot(q, ks, trans_b=True) * qk_scale
    if masked:
      visible = j * block_k + jnp.arange(block_k)[None, :] < q_chunk[:, None]
      s = jnp.where(visible, s, -jnp.inf)
    p = jnp.exp2(s - lse[:, None])
    ds = p * (dot(do, vs, trans_b=True) - delta[:, None])
    return dq + dot(ds.astype(ks.dtype), ks)

  first_masked = jnp.minimum(jnp.min(q_chunk) // block_k, num_blocks)
  end = jnp.minimum(pl.cdiv(jnp.max(q_chunk), block_k), num_blocks)
  dq = ds_run[:, None] * k_run
  dq = lax.fori_loop(0, first_masked, functools.partial(body, masked=False), dq)
  dq = lax.fori_loop(first_masked, end, functools.partial(body, masked=True), dq)
  dq_ref[...] = dq * scale


def _dkv_kernel(q_ref, k_sum_ref, v_sum_ref, q_chunk_ref, do_ref, lse_ref, delta_ref, dk_ref,
                dv_ref, *, scale: float, chunk_size: int, block_q: int):
  """One (batch, head, summary block): d(k_sum), d(v_sum) [BK, D] float32, for this query head.

  Summary j is seen by queries r >= (j + 1 - first_chunk) * C; the query blocks that see part of the
  block take the mask, the later ones (which see all of it) do not.
  """
  qk_scale = scale * _LOG2E
  block_k = k_sum_ref.shape[0]
  start = pl.program_id(2) * block_k
  ks = k_sum_ref[...]
  vs = v_sum_ref[...]
  first_chunk = jnp.min(q_chunk_ref[pl.ds(0, block_q)])
  num_blocks = q_ref.shape[0] // block_q

  def body(i, carry, *, masked):
    dk, dv = carry
    rows = pl.ds(i * block_q, block_q)
    q = q_ref[rows, :]
    do = do_ref[rows, :]
    s = dot(q, ks, trans_b=True) * qk_scale
    if masked:
      visible = start + jnp.arange(block_k)[None, :] < q_chunk_ref[rows][:, None]
      s = jnp.where(visible, s, -jnp.inf)
    p = jnp.exp2(s - lse_ref[rows][:, None])
    dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
    ds = p * (dot(do, vs, trans_b=True) - delta_ref[rows][:, None])
    dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  first_row = jnp.maximum((start + 1 - first_chunk) * chunk_size, 0)
  full_row = jnp.maximum((start + block_k - first_chunk) * chunk_size, 0)
  first_block = jnp.minimum(first_row // block_q, num_blocks)
  full_block = jnp.minimum(pl.cdiv(full_row, block_q), num_blocks)
  zeros = jnp.zeros(ks.shape, jnp.float32)
  carry = lax.fori_loop(first_block, full_block, functools.partial(body, masked=True),
                        (zeros, zeros))
  dk, dv = lax.fori_loop(full_block, num_blocks, functools.partial(body, masked=False), carry)
  dk_ref[...] = dk * scale
  dv_ref[...] = dv


def _pad_axis(x, multiple: int, axis: int):
  """Zero-pads `x` along `axis` up to a multiple of `multiple`."""
  pad = -x.shape[axis] % multiple
  return x if pad == 0 else jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)])


def _configs(head_dim: int, dtype, length: int, summaries: int) -> tuple[BlockConfig, ...]:
  """The table's (fwd, dq, dkv) configs, blocks shrunk to short inputs."""
  table = CONFIGS[(head_dim, jnp.dtype(dtype).name)]
  return tuple(dataclasses.replace(table[name], block_q=fit_block(table[name].block_q, length),
                                   block_k=fit_block(table[name].block_k, summaries))
               for name in ("fwd", "dq", "dkv"))


def _params(cfg: BlockConfig):
  return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _forward(q, k_run, v_run, k_sum, v_sum, q_chunk, cfg: BlockConfig, *, scale, interpret):
  """The forward kernel on whole blocks. Returns (o [B, P, H, D], lse [B, H, P] float32)."""
  b, p, h, d = q.shape
  group = h // k_run.shape[2]
  m = k_sum.shape[1]
  bq = cfg.block_q
  row = lambda kv: pl.BlockSpec((None, bq, None, d),
                                lambda i, j, n: (i, n, j // group if kv else j, 0))
  whole_kv = pl.BlockSpec((None, m, None, d), lambda i, j, n: (i, 0, j // group, 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, block_k=cfg.block_k),
      grid=(b, h, p // bq),
      in_specs=[row(False), row(True), row(True), whole_kv, whole_kv,
                pl.BlockSpec((bq,), lambda i, j, n: (n,))],
      out_specs=[row(False), pl.BlockSpec((None, None, bq), lambda i, j, n: (i, j, n))],
      out_shape=[jax.ShapeDtypeStruct((b, p, h, d), q.dtype),
                 jax.ShapeDtypeStruct((b, h, p), jnp.float32)],
      compiler_params=_params(cfg),
      interpret=interpret,
      name="rat_fwd",
  )(q, k_run, v_run, k_sum, v_sum, q_chunk)


def _backward(q, k_run, v_run, k_sum, v_sum, q_chunk, o, lse, do, cfg_dq: BlockConfig,
              cfg_dkv: BlockConfig, *, chunk_size, scale, interpret):
  """The dq and d(summaries) kernels. Returns per-query-head float32 gradients
  (dq, dk_run, dv_run [B, P, H, D]; dk_sum, dv_sum [B, M, H, D])."""
  b, p, h, d = q.shape
  group = h // k_run.shape[2]
  m = k_sum.shape[1]
  delta = jnp.einsum("bphd,bphd->bhp", o.astype(jnp.float32), do.astype(jnp.float32))
  do = do.astype(q.dtype)

  bq = cfg_dq.block_q
  row = lambda kv: pl.BlockSpec((None, bq, None, d),
                                lambda i, j, n: (i, n, j // group if kv else j, 0))
  whole_kv = pl.BlockSpec((None, m, None, d), lambda i, j, n: (i, 0, j // group, 0))
  per_q = pl.BlockSpec((None, None, bq), lambda i, j, n: (i, j, n))
  grad = jax.ShapeDtypeStruct((b, p, h, d), jnp.float32)
  dq, dk_run, dv_run = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_k=cfg_dq.block_k),
      grid=(b, h, p // bq),
      in_specs=[row(False), row(True), row(True), whole_kv, whole_kv,
                pl.BlockSpec((bq,), lambda i, j, n: (n,)), row(False), per_q, per_q],
      out_specs=[row(False)] * 3,
      out_shape=[grad] * 3,
      compiler_params=_params(cfg_dq),
      interpret=interpret,
      name="rat_bwd_dq",
  )(q, k_run, v_run, k_sum, v_sum, q_chunk, do, lse, delta)

  bk = cfg_dkv.block_k
  whole_q = pl.BlockSpec((None, p, None, d), lambda i, j, n: (i, 0, j, 0))
  whole_row = pl.BlockSpec((None, None, p), lambda i, j, n: (i, j, 0))
  summary = lambda kv: pl.BlockSpec((None, bk, None, d),
                                    lambda i, j, n: (i, n, j // group if kv else j, 0))
  dk_sum, dv_sum = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, chunk_size=chunk_size,
                        block_q=cfg_dkv.block_q),
      grid=(b, h, m // bk),
      in_specs=[whole_q, summary(True), summary(True), pl.BlockSpec((p,), lambda i, j, n: (0,)),
                whole_q, whole_row, whole_row],
      out_specs=[summary(False)] * 2,
      out_shape=[jax.ShapeDtypeStruct((b, m, h, d), jnp.float32)] * 2,
      compiler_params=_params(cfg_dkv),
      interpret=interpret,
      name="rat_bwd_dkv",
  )(q, k_sum, v_sum, q_chunk, do, lse, delta)
  return dq, dk_run, dv_run, dk_sum, dv_sum


def _sum_groups(x, kv_heads: int):
  """[B, L, H, D] per-query-head gradient -> [B, L, Hk, D], summing each GQA group."""
  b, length, h, d = x.shape
  return x.reshape(b, length, kv_heads, h // kv_heads, d).sum(axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8, 9))
def _attention(q, k_run, v_run, k_sum, v_sum, q_chunk, cfgs, chunk_size, scale, interpret):
  """Attention on block-padded inputs (see `rat_attention`); q_chunk [P] int32."""
  o, _ = _forward(q, k_run, v_run, k_sum, v_sum, q_chunk, cfgs[0], scale=scale,
                  interpret=interpret)
  return o


def _attention_fwd(q, k_run, v_run, k_sum, v_sum, q_chunk, cfgs, chunk_size, scale, interpret):
  o, lse = _forward(q, k_run, v_run, k_sum, v_sum, q_chunk, cfgs[0], scale=scale,
                    interpret=interpret)
  return o, (q, k_run, v_run, k_sum, v_sum, q_chunk, o, lse)


def _attention_bwd(cfgs, chunk_size, scale, interpret, residuals, do):
  q, k_run, v_run, k_sum, v_sum, q_chunk, o, lse = residuals
  dq, dk_run, dv_run, dk_sum, dv_sum = _backward(
      q, k_run, v_run, k_sum, v_sum, q_chunk, o, lse, do, cfgs[1], cfgs[2],
      chunk_size=chunk_size, scale=scale, interpret=interpret)
  hk = k_run.shape[2]
  grads = (dq, *(_sum_groups(x, hk) for x in (dk_run, dv_run, dk_sum, dv_sum)))
  primals = (q, k_run, v_run, k_sum, v_sum)
  return (*(g.astype(x.dtype) for g, x in zip(grads, primals)), None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def rat_attention(q, k_run, v_run, k_sum, v_sum, first_chunk, *, chunk_size: int, scale: float,
                  interpret: bool = False):
  """RAT's cross-chunk attention with the own running term, differentiable (custom VJP).

  Args:
    q: [B, T, H, D] queries, bfloat16 or float32 (the dot operand dtype).
    k_run, v_run: [B, T, Hk, D] each query's own running aggregate (Hk dividing H), q's dtype.
    k_sum, v_sum: [B, M, Hk, D] chunk summaries; slot j holds chunk j. q's dtype.
    first_chunk: int32 scalar (may be traced): query t belongs to chunk first_chunk + t // C and
      sees the summary slots j < its chunk. Every slot a query may see must exist (M covers it).
    chunk_size: C.
    scale: softmax scale.
    interpret: run the kernels in Pallas interpret mode (CPU tests).

  Returns:
    o [B, T, H, D] in q's dtype.
  """
  b, t, h, d = q.shape
  reason = unsupported_reason(d, q.dtype)
  if reason is not None:
    raise ValueError(f"rat_attention: {reason}")
  cfgs = _configs(d, q.dtype, t, k_sum.shape[1])
  multiple_q = max(c.block_q for c in cfgs)
  multiple_k = max(c.block_k for c in cfgs)
  q, k_run, v_run = (_pad_axis(x, multiple_q, 1) for x in (q, k_run, v_run))
  k_sum, v_sum = (_pad_axis(x, multiple_k, 1) for x in (k_sum, v_sum))
  q_chunk = (jnp.asarray(first_chunk, jnp.int32)
             + jnp.arange(q.shape[1], dtype=jnp.int32) // chunk_size)
  o = _attention(q, k_run, v_run, k_sum, v_sum, q_chunk, cfgs, chunk_size, scale, interpret)
  return o[:, :t]
