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

Packed documents (`rat_attention_ranges`): query t sees the summary slots lo_t <= j < hi_t (both
non-decreasing along t) instead of j < its chunk. The kernels take lo and hi per query under a
static `documents` flag (without it they are unchanged); the d(summaries) kernel visits the query
blocks that the caller's search found for its summary block, all with the mask.

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


def _block_ranges(q_chunk, q_lo, block_k: int, num_blocks: int):
  """The summary blocks a query block visits: (begin, full_begin, full_end, end), blocks [begin,
  full_begin) and [full_end, end) with the mask, [full_begin, full_end) without; begin and
  full_begin are None without q_lo (the visit starts unmasked at block 0).

  q_chunk [BQ]: each query sees slots < q_chunk; q_lo: None (from slot 0) or [BQ], each query then
  sees slots >= q_lo only.
  """
  end = jnp.minimum(pl.cdiv(jnp.max(q_chunk), block_k), num_blocks)
  if q_lo is None:
    return None, None, jnp.minimum(jnp.min(q_chunk) // block_k, num_blocks), end
  begin = jnp.minimum(jnp.min(q_lo) // block_k, end)
  full_begin = jnp.clip(pl.cdiv(jnp.max(q_lo), block_k), begin, end)
  full_end = jnp.clip(jnp.min(q_chunk) // block_k, full_begin, end)
  return begin, full_begin, full_end, end


def _visible(first_slot, size: int, q_chunk, q_lo):
  """Bool [BQ, size]: which of the slots first_slot .. first_slot + size - 1 each query sees."""
  slot = first_slot + jnp.arange(size)[None, :]
  visible = slot < q_chunk[:, None]
  return visible if q_lo is None else visible & (slot >= q_lo[:, None])


def _visit_blocks(body, ranges, carry):
  """Runs body(j, carry, masked=...) over the summary blocks of `_block_ranges`."""
  begin, full_begin, full_end, end = ranges
  if begin is not None:
    carry = lax.fori_loop(begin, full_begin, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(0 if full_begin is None else full_begin, full_end,
                        functools.partial(body, masked=False), carry)
  return lax.fori_loop(full_end, end, functools.partial(body, masked=True), carry)


def _fwd_kernel(q_ref, k_run_ref, v_run_ref, k_sum_ref, v_sum_ref, q_chunk_ref, *refs,
                scale: float, block_k: int, documents: bool):
  """One (batch, head, query block): q [BQ, D], own terms [BQ, D], summaries [M, D], q_chunk [BQ]
  (each query sees the slots before it), then with `documents` q_lo [BQ] (and the slots from it).

  Writes o [BQ, D] and lse [BQ] (base 2: log2 of the softmax denominator in scaled-score units).
  """
  q_lo_ref, o_ref, lse_ref = refs if documents else (None, *refs)
  qk_scale = scale * _LOG2E
  q = q_ref[...]
  q_chunk = q_chunk_ref[...]
  q_lo = None if q_lo_ref is None else q_lo_ref[...]
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
      s = jnp.where(_visible(j * block_k, block_k, q_chunk, q_lo), s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    alpha = jnp.exp2(m - m_new)
    p = jnp.exp2(s - m_new[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + dot(p.astype(vs.dtype), vs)
    return m_new, l, acc

  m, l, acc = _visit_blocks(body, _block_ranges(q_chunk, q_lo, block_k, num_blocks), (m, l, acc))
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log2(l)


def _dq_kernel(q_ref, k_run_ref, v_run_ref, k_sum_ref, v_sum_ref, q_chunk_ref, *refs,
               scale: float, block_k: int, documents: bool):
  """One (batch, head, query block): dq, d(k~), d(v~) [BQ, D] float32, for this query head.

  refs: [q_lo (with `documents`),] do, lse, delta, then the outputs dq, dk_run, dv_run.
  """
  q_lo_ref, do_ref, lse_ref, delta_ref, dq_ref, dk_run_ref, dv_run_ref = (
      refs if documents else (None, *refs))
  qk_scale = scale * _LOG2E
  q = q_ref[...]
  do = do_ref[...]
  q_chunk = q_chunk_ref[...]
  q_lo = None if q_lo_ref is None else q_lo_ref[...]
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
      s = jnp.where(_visible(j * block_k, block_k, q_chunk, q_lo), s, -jnp.inf)
    p = jnp.exp2(s - lse[:, None])
    ds = p * (dot(do, vs, trans_b=True) - delta[:, None])
    return dq + dot(ds.astype(ks.dtype), ks)

  dq = ds_run[:, None] * k_run
  dq = _visit_blocks(body, _block_ranges(q_chunk, q_lo, block_k, num_blocks), dq)
  dq_ref[...] = dq * scale


def _dkv_kernel(q_ref, k_sum_ref, v_sum_ref, q_chunk_ref, *refs, scale: float, chunk_size: int,
                block_q: int, documents: bool):
  """One (batch, head, summary block): d(k_sum), d(v_sum) [BK, D] float32, for this query head.

  Without `documents`, summary j is seen by queries r >= (j + 1 - first_chunk) * C; the query
  blocks that see part of the block take the mask, the later ones (which see all of it) do not.
  With `documents`, refs start with q_lo [P] and the range [2] of query blocks that see some of
  the block (computed by the caller), all visited with the mask. Then do, lse, delta, dk, dv.
  """
  q_lo_ref, visits_ref, *refs = refs if documents else (None, None, *refs)
  do_ref, lse_ref, delta_ref, dk_ref, dv_ref = refs
  qk_scale = scale * _LOG2E
  block_k = k_sum_ref.shape[0]
  start = pl.program_id(2) * block_k
  ks = k_sum_ref[...]
  vs = v_sum_ref[...]

  def body(i, carry, *, masked):
    dk, dv = carry
    rows = pl.ds(i * block_q, block_q)
    q = q_ref[rows, :]
    do = do_ref[rows, :]
    s = dot(q, ks, trans_b=True) * qk_scale
    if masked:
      q_lo = None if q_lo_ref is None else q_lo_ref[rows]
      s = jnp.where(_visible(start, block_k, q_chunk_ref[rows], q_lo), s, -jnp.inf)
    p = jnp.exp2(s - lse_ref[rows][:, None])
    dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
    ds = p * (dot(do, vs, trans_b=True) - delta_ref[rows][:, None])
    dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  zeros = jnp.zeros(ks.shape, jnp.float32)
  if documents:
    visits = visits_ref[...]  # (first block, end block), first <= end
    dk, dv = lax.fori_loop(jnp.min(visits), jnp.max(visits), functools.partial(body, masked=True),
                           (zeros, zeros))
  else:
    num_blocks = q_ref.shape[0] // block_q
    first_chunk = jnp.min(q_chunk_ref[pl.ds(0, block_q)])
    first_row = jnp.maximum((start + 1 - first_chunk) * chunk_size, 0)
    full_row = jnp.maximum((start + block_k - first_chunk) * chunk_size, 0)
    first_block = jnp.minimum(first_row // block_q, num_blocks)
    full_block = jnp.minimum(pl.cdiv(full_row, block_q), num_blocks)
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


def _query_specs(q_lo, block: int):
  """BlockSpecs of (q_chunk, q_lo) for blocks of `block` queries: [P] shared by the batch without
  q_lo, [B, P] each with it."""
  if q_lo is None:
    return [pl.BlockSpec((block,), lambda i, j, n: (n,))]
  return [pl.BlockSpec((None, block), lambda i, j, n: (i, n))] * 2


def _forward(q, k_run, v_run, k_sum, v_sum, q_chunk, q_lo, cfg: BlockConfig, *, scale, interpret):
  """The forward kernel on whole blocks. Returns (o [B, P, H, D], lse [B, H, P] float32)."""
  b, p, h, d = q.shape
  group = h // k_run.shape[2]
  m = k_sum.shape[1]
  bq = cfg.block_q
  documents = q_lo is not None
  row = lambda kv: pl.BlockSpec((None, bq, None, d),
                                lambda i, j, n: (i, n, j // group if kv else j, 0))
  whole_kv = pl.BlockSpec((None, m, None, d), lambda i, j, n: (i, 0, j // group, 0))
  return pl.pallas_call(
      functools.partial(_fwd_kernel, scale=scale, block_k=cfg.block_k, documents=documents),
      grid=(b, h, p // bq),
      in_specs=[row(False), row(True), row(True), whole_kv, whole_kv, *_query_specs(q_lo, bq)],
      out_specs=[row(False), pl.BlockSpec((None, None, bq), lambda i, j, n: (i, j, n))],
      out_shape=[jax.ShapeDtypeStruct((b, p, h, d), q.dtype),
                 jax.ShapeDtypeStruct((b, h, p), jnp.float32)],
      compiler_params=_params(cfg),
      interpret=interpret,
      name="rat_fwd",
  )(q, k_run, v_run, k_sum, v_sum, q_chunk, *([] if q_lo is None else [q_lo]))


def _query_block_visits(q_chunk, q_lo, block_k: int, block_q: int, num_summary_blocks: int):
  """int32 [B, S, 2]: per summary block of `block_k` slots, the query blocks [first, end) holding
  the queries that see some of it (q_chunk and q_lo [B, P] non-decreasing along P)."""
  first_slot = jnp.arange(num_summary_blocks, dtype=jnp.int32) * block_k
  first_row = jax.vmap(lambda hi: jnp.searchsorted(hi, first_slot, side="right"))(q_chunk)
  end_row = jax.vmap(lambda lo: jnp.searchsorted(lo, first_slot + block_k - 1, side="right"))(q_lo)
  first = first_row // block_q
  return jnp.stack([first, jnp.maximum(-(-end_row // block_q), first)], axis=-1).astype(
      jnp.int32)


def _backward(q, k_run, v_run, k_sum, v_sum, q_chunk, q_lo, o, lse, do, cfg_dq: BlockConfig,
              cfg_dkv: BlockConfig, *, chunk_size, scale, interpret):
  """The dq and d(summaries) kernels. Returns per-query-head float32 gradients
  (dq, dk_run, dv_run [B, P, H, D]; dk_sum, dv_sum [B, M, H, D])."""
  b, p, h, d = q.shape
  group = h // k_run.shape[2]
  m = k_sum.shape[1]
  documents = q_lo is not None
  delta = jnp.einsum("bphd,bphd->bhp", o.astype(jnp.float32), do.astype(jnp.float32))
  do = do.astype(q.dtype)
  lo = [] if q_lo is None else [q_lo]

  bq = cfg_dq.block_q
  row = lambda kv: pl.BlockSpec((None, bq, None, d),
                                lambda i, j, n: (i, n, j // group if kv else j, 0))
  whole_kv = pl.BlockSpec((None, m, None, d), lambda i, j, n: (i, 0, j // group, 0))
  per_q = pl.BlockSpec((None, None, bq), lambda i, j, n: (i, j, n))
  grad = jax.ShapeDtypeStruct((b, p, h, d), jnp.float32)
  dq, dk_run, dv_run = pl.pallas_call(
      functools.partial(_dq_kernel, scale=scale, block_k=cfg_dq.block_k, documents=documents),
      grid=(b, h, p // bq),
      in_specs=[row(False), row(True), row(True), whole_kv, whole_kv, *_query_specs(q_lo, bq),
                row(False), per_q, per_q],
      out_specs=[row(False)] * 3,
      out_shape=[grad] * 3,
      compiler_params=_params(cfg_dq),
      interpret=interpret,
      name="rat_bwd_dq",
  )(q, k_run, v_run, k_sum, v_sum, q_chunk, *lo, do, lse, delta)

  bk = cfg_dkv.block_k
  whole_q = pl.BlockSpec((None, p, None, d), lambda i, j, n: (i, 0, j, 0))
  whole_row = pl.BlockSpec((None, None, p), lambda i, j, n: (i, j, 0))
  summary = lambda kv: pl.BlockSpec((None, bk, None, d),
                                    lambda i, j, n: (i, n, j // group if kv else j, 0))
  if documents:
    visits = [_query_block_visits(q_chunk, q_lo, bk, cfg_dkv.block_q, m // bk)]
    index_specs = [pl.BlockSpec((None, p), lambda i, j, n: (i, 0))] * 2 + [
        pl.BlockSpec((None, None, 2), lambda i, j, n: (i, n, 0))]
  else:
    visits = []
    index_specs = [pl.BlockSpec((p,), lambda i, j, n: (0,))]
  dk_sum, dv_sum = pl.pallas_call(
      functools.partial(_dkv_kernel, scale=scale, chunk_size=chunk_size,
                        block_q=cfg_dkv.block_q, documents=documents),
      grid=(b, h, m // bk),
      in_specs=[whole_q, summary(True), summary(True), *index_specs, whole_q, whole_row,
                whole_row],
      out_specs=[summary(False)] * 2,
      out_shape=[jax.ShapeDtypeStruct((b, m, h, d), jnp.float32)] * 2,
      compiler_params=_params(cfg_dkv),
      interpret=interpret,
      name="rat_bwd_dkv",
  )(q, k_sum, v_sum, q_chunk, *lo, *visits, do, lse, delta)
  return dq, dk_run, dv_run, dk_sum, dv_sum


def _sum_groups(x, kv_heads: int):
  """[B, L, H, D] per-query-head gradient -> [B, L, Hk, D], summing each GQA group."""
  b, length, h, d = x.shape
  return x.reshape(b, length, kv_heads, h // kv_heads, d).sum(axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9, 10))
def _attention(q, k_run, v_run, k_sum, v_sum, q_chunk, q_lo, cfgs, chunk_size, scale, interpret):
  """Attention on block-padded inputs (see `rat_attention`): q_chunk [P] int32 and q_lo None, or
  (`rat_attention_ranges`) both [B, P] int32."""
  o, _ = _forward(q, k_run, v_run, k_sum, v_sum, q_chunk, q_lo, cfgs[0], scale=scale,
                  interpret=interpret)
  return o


def _attention_fwd(q, k_run, v_run, k_sum, v_sum, q_chunk, q_lo, cfgs, chunk_size, scale,
                   interpret):
  o, lse = _forward(q, k_run, v_run, k_sum, v_sum, q_chunk, q_lo, cfgs[0], scale=scale,
                    interpret=interpret)
  return o, (q, k_run, v_run, k_sum, v_sum, q_chunk, q_lo, o, lse)


def _attention_bwd(cfgs, chunk_size, scale, interpret, residuals, do):
  q, k_run, v_run, k_sum, v_sum, q_chunk, q_lo, o, lse = residuals
  dq, dk_run, dv_run, dk_sum, dv_sum = _backward(
      q, k_run, v_run, k_sum, v_sum, q_chunk, q_lo, o, lse, do, cfgs[1], cfgs[2],
      chunk_size=chunk_size, scale=scale, interpret=interpret)
  hk = k_run.shape[2]
  grads = (dq, *(_sum_groups(x, hk) for x in (dk_run, dv_run, dk_sum, dv_sum)))
  primals = (q, k_run, v_run, k_sum, v_sum)
  return (*(g.astype(x.dtype) for g, x in zip(grads, primals)), None, None)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _block_padded(name: str, q, k_run, v_run, k_sum, v_sum):
  """The (fwd, dq, dkv) configs for these shapes and the inputs zero-padded to whole blocks
  (queries and own terms along T, summaries along M). Raises a ValueError naming `name` when the
  kernels do not cover the head dim or dtype."""
  t, d = q.shape[1], q.shape[3]
  reason = unsupported_reason(d, q.dtype)
  if reason is not None:
    raise ValueError(f"{name}: {reason}")
  cfgs = _configs(d, q.dtype, t, k_sum.shape[1])
  multiple_q = max(c.block_q for c in cfgs)
  multiple_k = max(c.block_k for c in cfgs)
  q, k_run, v_run = (_pad_axis(x, multiple_q, 1) for x in (q, k_run, v_run))
  k_sum, v_sum = (_pad_axis(x, multiple_k, 1) for x in (k_sum, v_sum))
  return cfgs, q, k_run, v_run, k_sum, v_sum


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
  t = q.shape[1]
  cfgs, q, k_run, v_run, k_sum, v_sum = _block_padded("rat_attention", q, k_run, v_run, k_sum,
                                                      v_sum)
  q_chunk = (jnp.asarray(first_chunk, jnp.int32)
             + jnp.arange(q.shape[1], dtype=jnp.int32) // chunk_size)
  o = _attention(q, k_run, v_run, k_sum, v_sum, q_chunk, None, cfgs, chunk_size, scale,
                 interpret)
  return o[:, :t]


def rat_attention_ranges(q, k_run, v_run, k_sum, v_sum, lo, hi, *, scale: float,
                         interpret: bool = False):
  """`rat_attention` with each query's summary slots given as a range (packed documents).

  Args:
    q, k_run, v_run, k_sum, v_sum: as `rat_attention` ([B, T, H, D], [B, T, Hk, D] x 2,
      [B, M, Hk, D] x 2).
    lo, hi: int32 [B, T], both non-decreasing along T: query t of row b sees the summary slots
      lo[b, t] <= j < hi[b, t] (and its own running aggregate).
    scale: softmax scale.
    interpret: run the kernels in Pallas interpret mode (CPU tests).

  Returns:
    o [B, T, H, D] in q's dtype.
  """
  t = q.shape[1]
  cfgs, q, k_run, v_run, k_sum, v_sum = _block_padded("rat_attention_ranges", q, k_run, v_run,
                                                      k_sum, v_sum)
  # Padding queries see nothing (lo = hi = the last hi, keeping both non-decreasing).
  pad = [(0, 0), (0, q.shape[1] - t)]
  hi = jnp.pad(jnp.asarray(hi, jnp.int32), pad, mode="edge")
  lo = jnp.where(jnp.arange(q.shape[1]) < t, jnp.pad(jnp.asarray(lo, jnp.int32), pad), hi)
  o = _attention(q, k_run, v_run, k_sum, v_sum, hi, lo, cfgs, 0, scale, interpret)
  return o[:, :t]
