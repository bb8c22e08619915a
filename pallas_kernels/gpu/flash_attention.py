"""Pallas (Triton) GPU kernels for softmax attention (FlashAttention-2), forward and backward.

Training-shaped attention: q [B, T, H, D], k and v [B, T, Hk, D] (Hk dividing H; query head h reads
kv head h // (H // Hk) through the index maps, no repeat), query i and key j at positions i and j.
A query sees a key when every active mask allows it:

  causal        j <= i
  window        i - j < window (and j - i < window when not causal)
  segment_ids   q_segment_ids[i] == kv_segment_ids[j] (packed documents)
  ragged T      j < T (inputs are zero-padded to whole blocks inside)

`softcap` turns logits into softcap * tanh(logits / softcap). A query with no visible key outputs
zeros and gets zero gradients.

- forward: grid (batch, heads, query blocks). Each program loops over the key blocks its queries can
  see, in three ranges: masked blocks before the fully visible ones (the window's lower edge), the
  fully visible blocks without a mask, and masked blocks after them (the diagonal, ragged end).
  Blocks wholly outside the causal/window range are not visited; with segment ids, neither are the
  key blocks whose id range [min, max] does not overlap the query block's (for sorted, i.e. packed,
  ids this skips every block of another document; for unsorted ids it stays exact, skipping less).
  Writes o and the log2-sum-exp.
- backward: one kernel per query block computes dq over the same key ranges; one per key block loops
  over the query blocks that see it and computes dk, dv (per query head, float32; the wrapper sums
  each GQA group).

Scores use base 2 (exp2, with log2(e) folded into the scale). Dots accumulate in float32; float32
operands use full-precision (IEEE) dots, 16-bit operands the tensor cores.

This module does not import jaxchunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu.flash_common import BlockConfig, dot, fit_block


def _triple(fwd: BlockConfig, dq: BlockConfig, dkv: BlockConfig) -> dict[str, BlockConfig]:
  return dict(fwd=fwd, dq=dq, dkv=dkv)


# (head_dim, operand width: "16bit" for bfloat16/float16, "float32") -> forward, dq, dkv configs.
CONFIGS: dict[tuple[int, str], dict[str, BlockConfig]] = {
    (64, "16bit"): _triple(BlockConfig(128, 64, 4, 3), BlockConfig(64, 64, 4, 2),
                           BlockConfig(64, 64, 4, 2)),
    (128, "16bit"): _triple(BlockConfig(128, 64, 8, 2), BlockConfig(64, 64, 4, 2),
                            BlockConfig(64, 64, 4, 2)),
    (256, "16bit"): _triple(BlockConfig(64, 32, 8, 2), BlockConfig(32, 32, 8, 1),
                            BlockConfig(32, 32, 8, 1)),
    (64, "float32"): _triple(BlockConfig(64, 32, 4, 2), BlockConfig(32, 32, 4, 2),
                             BlockConfig(32, 32, 4, 2)),
    (128, "float32"): _triple(BlockConfig(64, 32, 4, 2), BlockConfig(32, 32, 4, 2),
                              BlockConfig(32, 32, 4, 2)),
    (256, "float32"): _triple(BlockConfig(32, 16, 8, 1), BlockConfig(16, 16, 8, 1),
                              BlockConfig(16, 16, 8, 1)),
}
HEAD_DIMS = (64, 128, 256)
DTYPES = ("bfloat16", "float16", "float32")

_LOG2E = math.log2(math.e)
_NO_SEGMENT = -(2 ** 31)  # padded block-range entries: overlap nothing


class Masking(NamedTuple):
  """Static mask options of one call."""
  causal: bool
  window: int | None
  softcap: float | None
  scale: float
  length: int  # the true T; keys at or after it are padding


def unsupported_reason(head_dim: int, head_dim_v: int, dtype) -> str | None:
  """None when the kernels support these head dims and operand dtype, else the reason why not."""
  if head_dim not in HEAD_DIMS:
    return f"head_dim {head_dim} not in {HEAD_DIMS}"
  if head_dim_v != head_dim:
    return f"head_dim_v {head_dim_v} != head_dim {head_dim}"
  if jnp.dtype(dtype).name not in DTYPES:
    return f"dtype {jnp.dtype(dtype).name} not in {DTYPES}"
  return None


def _logits(q, k, masking: Masking):
  """Base-2 logits [BQ, BK] of q [BQ, D] and k [BK, D]; also tanh(.) when soft-capped, else None."""
  s = dot(q, k, trans_b=True)
  if masking.softcap is None:
    return s * (masking.scale * _LOG2E), None
  tanh_s = jnp.tanh(s * (masking.scale / masking.softcap))
  return tanh_s * (masking.softcap * _LOG2E), tanh_s


def _visible(rows, cols, q_seg, kv_seg, masking: Masking):
  """Mask [BQ, BK] of query positions rows [BQ] x key positions cols [BK]."""
  r, c = rows[:, None], cols[None, :]
  mask = c < masking.length
  if masking.causal:
    mask = mask & (c <= r)
  if masking.window is not None:
    mask = mask & (r - c < masking.window)
    if not masking.causal:
      mask = mask & (c - r < masking.window)
  if q_seg is not None:
    mask = mask & (q_seg[:, None] == kv_seg[None, :])
  return mask


def _key_ranges(r_first, block_q: int, block_k: int, num_k: int, seg_range, masking: Masking):
  """Key blocks [lo, hi) that rows r_first .. r_first + block_q - 1 may see, and the fully visible
  blocks [full_lo, full_hi) inside it (lo <= full_lo <= full_hi <= hi)."""
  r_last = r_first + block_q - 1
  w = masking.window
  lo = jnp.int32(0)
  hi = jnp.minimum(num_k, pl.cdiv(masking.length, block_k))
  full_lo = jnp.int32(0)
  full_hi = jnp.int32(masking.length // block_k)
  if masking.causal:
    hi = jnp.minimum(hi, r_last // block_k + 1)
    full_hi = jnp.minimum(full_hi, (r_first + 1) // block_k)
  if w is not None:
    lo = jnp.maximum(r_first - w + 1, 0) // block_k
    full_lo = (jnp.maximum(r_last - w, -1) + block_k) // block_k
    if not masking.causal:
      hi = jnp.minimum(hi, (r_last + w - 1) // block_k + 1)
      full_hi = jnp.minimum(full_hi, (r_first + w) // block_k)
  if seg_range is not None:
    lo, hi = jnp.maximum(lo, seg_range[0]), jnp.minimum(hi, seg_range[1])
    full_hi = full_lo  # segment ids always take the mask
  hi = jnp.maximum(hi, lo)
  full_lo = jnp.clip(full_lo, lo, hi)
  full_hi = jnp.clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def _query_ranges(c_first, block_k: int, block_q: int, num_q: int, seg_range, masking: Masking):
  """Query blocks [lo, hi) that may see keys c_first .. c_first + block_k - 1, and the blocks
  [full_lo, full_hi) that see every one of them."""
  c_last = c_first + block_k - 1
  w = masking.window
  lo = jnp.int32(0)
  hi = jnp.minimum(num_q, pl.cdiv(masking.length, block_q))  # padded queries have zero gradient
  full_lo = jnp.int32(0)
  full_hi = hi
  if masking.causal:
    lo = c_first // block_q
    full_lo = (c_last + block_q - 1) // block_q
  if w is not None:
    hi = jnp.minimum(hi, (c_last + w - 1) // block_q + 1)
    full_hi = jnp.minimum(full_hi, (c_first + w) // block_q)
    if not masking.causal:
      lo = jnp.maximum(c_first - w + 1, 0) // block_q
      full_lo = (jnp.maximum(c_last - w, -1) + block_q) // block_q
  if seg_range is not None:
    lo, hi = jnp.maximum(lo, seg_range[0]), jnp.minimum(hi, seg_range[1])
  if seg_range is not None:
    full_hi = full_lo
  full_hi = jnp.where(c_last >= masking.length, full_lo, full_hi)  # padded keys take the mask
  hi = jnp.maximum(hi, lo)
  full_lo = jnp.clip(full_lo, lo, hi)
  full_hi = jnp.clip(full_hi, full_lo, hi)
  return lo, full_lo, full_hi, hi


def _overlapping_blocks(seg_min, seg_max, blk_min_ref, blk_max_ref):
  """[lo, hi) covering the blocks whose segment-id range overlaps [seg_min, seg_max]."""
  blk_min, blk_max = blk_min_ref[...], blk_max_ref[...]
  n = blk_min.shape[0]
  index = jnp.arange(n, dtype=jnp.int32)
  overlap = (blk_max >= seg_min) & (blk_min <= seg_max)
  return (jnp.min(jnp.where(overlap, index, n)), jnp.max(jnp.where(overlap, index + 1, 0)))


def _three_loops(body, ranges, carry):
  """Runs body(j, carry, masked=...) over [lo, full_lo) masked, [full_lo, full_hi) unmasked and
  [full_hi, hi) masked."""
  lo, full_lo, full_hi, hi = ranges
  carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
  return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _fwd_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, kv_blk_min_ref, kv_blk_max_ref, o_ref,
                lse_ref, *, masking: Masking, block_k: int):
  """One (batch, head, query block): q [BQ, D], k/v [Tp, D]. Writes o [BQ, D] and lse [BQ]
  (base 2; +inf on rows without a visible key)."""
  block_q = q_ref.shape[0]
  r_first = pl.program_id(2) * block_q
  rows = r_first + jnp.arange(block_q, dtype=jnp.int32)
  q = q_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  seg_range = None if q_seg is None else _overlapping_blocks(
      jnp.min(q_seg), jnp.max(q_seg), kv_blk_min_ref, kv_blk_max_ref)

  def body(j, carry, *, masked):
    m, l, acc = carry
    cols = pl.ds(j * block_k, block_k)
    k, v = k_ref[cols, :], v_ref[cols, :]
    s, _ = _logits(q, k, masking)
    if masked:
      kv_seg = None if q_seg is None else kv_seg_ref[cols]
      mask = _visible(rows, j * block_k + jnp.arange(block_k, dtype=jnp.int32), q_seg, kv_seg,
                      masking)
      s = jnp.where(mask, s, -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp2(s - shift[:, None])
    alpha = jnp.exp2(m - shift)
    l = alpha * l + jnp.sum(p, axis=1)
    acc = alpha[:, None] * acc + dot(p.astype(v.dtype), v)
    return m_new, l, acc

  ranges = _key_ranges(r_first, block_q, block_k, k_ref.shape[0] // block_k, seg_range, masking)
  init = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
          jnp.zeros((block_q, v_ref.shape[1]), jnp.float32))
  m, l, acc = _three_loops(body, ranges, init)
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[...] = (acc / safe_l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(safe_l))


def _probabilities(q, k, lse, rows, cols, q_seg, kv_seg, masking: Masking, masked: bool):
  """Recomputed probabilities p [BQ, BK] (0 where masked) and tanh of the soft-capped logits."""
  s, tanh_s = _logits(q, k, masking)
  p = jnp.exp2(s - lse[:, None])
  if masked:
    p = jnp.where(_visible(rows, cols, q_seg, kv_seg, masking), p, 0.0)
  return p, tanh_s


def _dscores(p, dp, delta, tanh_s):
  """d(logit) [BQ, BK] (natural units, before the scale) from dp = do v^T."""
  ds = p * (dp - delta[:, None])
  return ds if tanh_s is None else ds * (1.0 - tanh_s * tanh_s)


def _dq_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, kv_blk_min_ref, kv_blk_max_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, masking: Masking, block_k: int):
  """One (batch, head, query block): dq [BQ, D] in dq_ref's dtype."""
  block_q = q_ref.shape[0]
  r_first = pl.program_id(2) * block_q
  rows = r_first + jnp.arange(block_q, dtype=jnp.int32)
  q, do = q_ref[...], do_ref[...]
  lse, delta = lse_ref[...], delta_ref[...]
  q_seg = None if q_seg_ref is None else q_seg_ref[...]
  seg_range = None if q_seg is None else _overlapping_blocks(
      jnp.min(q_seg), jnp.max(q_seg), kv_blk_min_ref, kv_blk_max_ref)

  def body(j, dq, *, masked):
    cols = pl.ds(j * block_k, block_k)
    k, v = k_ref[cols, :], v_ref[cols, :]
    kv_seg = None if q_seg is None else kv_seg_ref[cols]
    p, tanh_s = _probabilities(q, k, lse, rows, j * block_k + jnp.arange(block_k, dtype=jnp.int32),
                               q_seg, kv_seg, masking, masked)
    ds = _dscores(p, dot(do, v, trans_b=True), delta, tanh_s)
    return dq + dot(ds.astype(k.dtype), k)

  ranges = _key_ranges(r_first, block_q, block_k, k_ref.shape[0] // block_k, seg_range, masking)
  dq = _three_loops(body, ranges, jnp.zeros(q_ref.shape, jnp.float32))
  dq_ref[...] = (dq * masking.scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, q_seg_ref, kv_seg_ref, q_blk_min_ref, q_blk_max_ref, do_ref,
                lse_ref, delta_ref, dk_ref, dv_ref, *, masking: Masking, block_q: int):
  """One (batch, head, key block): dk, dv [BK, D] for this query head, in dk_ref's dtype."""
  block_k = k_ref.shape[0]
  c_first = pl.program_id(2) * block_k
  cols = c_first + jnp.arange(block_k, dtype=jnp.int32)
  k, v = k_ref[...], v_ref[...]
  kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
  seg_range = None if kv_seg is None else _overlapping_blocks(
      jnp.min(kv_seg), jnp.max(kv_seg), q_blk_min_ref, q_blk_max_ref)

  def body(i, carry, *, masked):
    dk, dv = carry
    rows = pl.ds(i * block_q, block_q)
    q, do = q_ref[rows, :], do_ref[rows, :]
    q_seg = None if kv_seg is None else q_seg_ref[rows]
    p, tanh_s = _probabilities(q, k, lse_ref[rows], i * block_q + jnp.arange(
        block_q, dtype=jnp.int32), cols, q_seg, kv_seg, masking, masked)
    dv = dv + dot(p.astype(do.dtype), do, trans_a=True)
    ds = _dscores(p, dot(do, v, trans_b=True), delta_ref[rows], tanh_s)
    dk = dk + dot(ds.astype(q.dtype), q, trans_a=True)
    return dk, dv

  ranges = _query_ranges(c_first, block_k, block_q, q_ref.shape[0] // block_q, seg_range, masking)
  zeros = jnp.zeros(k_ref.shape, jnp.float32)
  dk, dv = _three_loops(body, ranges, (zeros, zeros))
  dk_ref[...] = (dk * masking.scale).astype(dk_ref.dtype)
  dv_ref[...] = dv.astype(dv_ref.dtype)


def _pad_axis(x, multiple: int, axis: int, value=0):
  """Pads `x` along `axis` with `value` up to a multiple of `multiple`."""
  pad = -x.shape[axis] % multiple
  if pad == 0:
    return x
  return jnp.pad(x, [(0, pad if a == axis else 0) for a in range(x.ndim)], constant_values=value)


def _block_ranges(seg, block: int):
  """Per-block (min, max) of segment ids seg [B, Tp] -> two [B, next_pow2(Tp / block)] arrays."""
  b, tp = seg.shape
  blocks = seg.reshape(b, tp // block, block)
  width = pl.next_power_of_2(tp // block)
  lo = _pad_axis(blocks.min(axis=2), width, 1, value=jnp.iinfo(jnp.int32).max)
  hi = _pad_axis(blocks.max(axis=2), width, 1, value=_NO_SEGMENT)
  return lo, hi


def _configs(head_dim: int, dtype, length: int) -> tuple[BlockConfig, ...]:
  """The table's (fwd, dq, dkv) configs, blocks shrunk to short inputs."""
  width = "float32" if jnp.dtype(dtype) == jnp.float32 else "16bit"
  table = CONFIGS[(head_dim, width)]
  return tuple(dataclasses.replace(table[name], block_q=fit_block(table[name].block_q, length),
                                   block_k=fit_block(table[name].block_k, length))
               for name in ("fwd", "dq", "dkv"))


def _params(cfg: BlockConfig):
  return plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _specs(group: int, tp: int, d: int, block: int):
  """BlockSpecs on grid (batch, head, block): a block of a q-head array, a block of a kv-head array,
  the whole kv-head sequence, the whole q-head sequence, the [B, H, Tp] rows' block / whole, and
  the [B, Tp] segment ids' block / whole."""
  return dict(
      q_block=pl.BlockSpec((None, block, None, d), lambda i, j, n: (i, n, j, 0)),
      kv_block=pl.BlockSpec((None, block, None, d), lambda i, j, n: (i, n, j // group, 0)),
      kv_whole=pl.BlockSpec((None, tp, None, d), lambda i, j, n: (i, 0, j // group, 0)),
      q_whole=pl.BlockSpec((None, tp, None, d), lambda i, j, n: (i, 0, j, 0)),
      row_block=pl.BlockSpec((None, None, block), lambda i, j, n: (i, j, n)),
      row_whole=pl.BlockSpec((None, None, tp), lambda i, j, n: (i, j, 0)),
      seg_block=pl.BlockSpec((None, block), lambda i, j, n: (i, n)),
      seg_whole=pl.BlockSpec((None, tp), lambda i, j, n: (i, 0)),
  )


def _forward(q, k, v, segments, cfg: BlockConfig, masking: Masking, interpret: bool):
  """o [B, Tp, H, D] and lse [B, H, Tp] float32 on padded inputs."""
  b, tp, h, d = q.shape
  group = h // k.shape[2]
  sp = _specs(group, tp, d, cfg.block_q)
  seg_args, seg_specs = [], []
  if segments is not None:
    q_seg, kv_seg = segments
    kv_min, kv_max = _block_ranges(kv_seg, cfg.block_k)
    seg_args = [q_seg, kv_seg, kv_min, kv_max]
    seg_specs = [sp["seg_block"], sp["seg_whole"], _whole_row(kv_min), _whole_row(kv_max)]
  kernel = functools.partial(_fwd_kernel, masking=masking, block_k=cfg.block_k)
  return pl.pallas_call(
      _with_optional_segments(kernel, segments is not None),
      grid=(b, h, tp // cfg.block_q),
      in_specs=[sp["q_block"], sp["kv_whole"], sp["kv_whole"], *seg_specs],
      out_specs=[sp["q_block"], sp["row_block"]],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                 jax.ShapeDtypeStruct((b, h, tp), jnp.float32)],
      compiler_params=_params(cfg),
      interpret=interpret,
      name="flash_attention_fwd",
  )(q, k, v, *seg_args)


def _whole_row(x):
  """BlockSpec of a [B, N] per-batch array read whole by every program."""
  return pl.BlockSpec((None, x.shape[1]), lambda i, j, n: (i, 0))


def _with_optional_segments(kernel, segmented: bool):
  """`kernel` (whose four segment refs follow q, k, v) adapted to calls without segment ids."""
  if segmented:
    return kernel
  return lambda q_ref, k_ref, v_ref, *refs: kernel(q_ref, k_ref, v_ref, None, None, None, None,
                                                   *refs)


def _backward(q, k, v, segments, o, lse, do, cfg_dq: BlockConfig, cfg_dkv: BlockConfig,
              masking: Masking, interpret: bool):
  """dq [B, Tp, H, D] in q's dtype and per-query-head dk, dv [B, Tp, H, D] on padded inputs
  (in k's dtype without GQA, else float32 for the caller's sum over each group)."""
  b, tp, h, d = q.shape
  group = h // k.shape[2]
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  do = do.astype(q.dtype)
  grad_kv = jax.ShapeDtypeStruct((b, tp, h, d), k.dtype if group == 1 else jnp.float32)

  sp = _specs(group, tp, d, cfg_dq.block_q)
  seg_args, seg_specs = [], []
  if segments is not None:
    q_seg, kv_seg = segments
    kv_min, kv_max = _block_ranges(kv_seg, cfg_dq.block_k)
    seg_args = [q_seg, kv_seg, kv_min, kv_max]
    seg_specs = [sp["seg_block"], sp["seg_whole"], _whole_row(kv_min), _whole_row(kv_max)]
  dq = pl.pallas_call(
      _with_optional_segments(functools.partial(_dq_kernel, masking=masking,
                                                block_k=cfg_dq.block_k), segments is not None),
      grid=(b, h, tp // cfg_dq.block_q),
      in_specs=[sp["q_block"], sp["kv_whole"], sp["kv_whole"], *seg_specs, sp["q_block"],
                sp["row_block"], sp["row_block"]],
      out_specs=sp["q_block"],
      out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
      compiler_params=_params(cfg_dq),
      interpret=interpret,
      name="flash_attention_bwd_dq",
  )(q, k, v, *seg_args, do, lse, delta)

  sp = _specs(group, tp, d, cfg_dkv.block_k)
  seg_args, seg_specs = [], []
  if segments is not None:
    q_seg, kv_seg = segments
    q_min, q_max = _block_ranges(q_seg, cfg_dkv.block_q)
    seg_args = [q_seg, kv_seg, q_min, q_max]
    seg_specs = [sp["seg_whole"], sp["seg_block"], _whole_row(q_min), _whole_row(q_max)]
  dk, dv = pl.pallas_call(
      _with_optional_segments(functools.partial(_dkv_kernel, masking=masking,
                                                block_q=cfg_dkv.block_q), segments is not None),
      grid=(b, h, tp // cfg_dkv.block_k),
      in_specs=[sp["q_whole"], sp["kv_block"], sp["kv_block"], *seg_specs, sp["q_whole"],
                sp["row_whole"], sp["row_whole"]],
      out_specs=[sp["q_block"]] * 2,
      out_shape=[grad_kv] * 2,
      compiler_params=_params(cfg_dkv),
      interpret=interpret,
      name="flash_attention_bwd_dkv",
  )(q, k, v, *seg_args, do, lse, delta)
  return dq, dk, dv


def _sum_groups(x, kv_heads: int):
  """[B, T, H, D] per-query-head gradient -> [B, T, Hk, D], summing each GQA group."""
  b, t, h, d = x.shape
  if h == kv_heads:
    return x
  return x.reshape(b, t, kv_heads, h // kv_heads, d).sum(axis=3)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _attention(q, k, v, segments, cfgs, masking, interpret):
  """Attention on block-padded inputs; segments None or (q_seg, kv_seg) [B, Tp] int32."""
  return _forward(q, k, v, segments, cfgs[0], masking, interpret)[0]


def _attention_fwd(q, k, v, segments, cfgs, masking, interpret):
  o, lse = _forward(q, k, v, segments, cfgs[0], masking, interpret)
  return o, (q, k, v, segments, o, lse)


def _attention_bwd(cfgs, masking, interpret, residuals, do):
  q, k, v, segments, o, lse = residuals
  dq, dk, dv = _backward(q, k, v, segments, o, lse, do, cfgs[1], cfgs[2], masking, interpret)
  hk = k.shape[2]
  dk, dv = _sum_groups(dk, hk), _sum_groups(dv, hk)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_attention.defvjp(_attention_fwd, _attention_bwd)


def flash_attention(q, k, v, segment_ids=None, *, causal: bool = True, window: int | None = None,
                    softcap: float | None = None, scale: float, interpret: bool = False,
                    configs: tuple[BlockConfig, BlockConfig, BlockConfig] | None = None):
  """Softmax attention with causal/window/segment masks and soft-cap, differentiable (custom VJP).

  Args:
    q: [B, T, H, D] queries; bfloat16, float16 or float32; D in HEAD_DIMS.
    k, v: [B, T, Hk, D] keys and values in q's dtype, Hk dividing H.
    segment_ids: None or a pair (q_segment_ids, kv_segment_ids), int32 [B, T] each.
    causal, window, softcap: the masks and logit cap of the module docstring.
    scale: logit scale.
    interpret: run the kernels in Pallas interpret mode (CPU tests).
    configs: (fwd, dq, dkv) BlockConfigs overriding the table (tests use small blocks).

  Returns:
    o [B, T, H, D] in q's dtype.
  """
  b, t, h, d = q.shape
  reason = unsupported_reason(d, v.shape[3], q.dtype)
  if reason is not None:
    raise ValueError(f"flash_attention: {reason}")
  if k.dtype != q.dtype or v.dtype != q.dtype:
    raise ValueError(f"flash_attention: k and v must have q's dtype {q.dtype}, got {k.dtype}, "
                     f"{v.dtype}")
  cfgs = _configs(d, q.dtype, t) if configs is None else tuple(configs)
  multiple = max(max(c.block_q, c.block_k) for c in cfgs)
  q, k, v = (_pad_axis(x, multiple, 1) for x in (q, k, v))
  if segment_ids is not None:
    segment_ids = tuple(_pad_axis(jnp.asarray(x, jnp.int32), multiple, 1) for x in segment_ids)
  masking = Masking(causal=bool(causal), window=window, softcap=softcap, scale=float(scale),
                    length=t)
  return _attention(q, k, v, segment_ids, cfgs, masking, interpret)[:, :t]
