"""Pallas (Triton) GPU kernel for attention over a paged KV cache: decode and chunked prefill.

The keys and values of all sequences live in shared pools k_pages, v_pages
[num_pages, page_size, Hk, D]; row b of page_table [B, W] lists the pages of sequence b in order,
so its key at position p sits in slot page_table[b, p // page_size] * page_size + p % page_size of
the pool seen as [num_pages * page_size, Hk, D].

Row b has q_length[b] new queries at positions q_offset[b] + i (the rest of the T query slots are
padding and output zeros). Query i sees key position p when

  p <= q_offset[b] + i                    causal
  p < kv_length[b] and p < W * page_size  valid keys of the row
  q_offset[b] + i - p < window            optional sliding window

and `softcap` turns logits into softcap * tanh(logits / softcap). A query without a visible key
outputs zeros. Decode is the case q_length = 1, q_offset = kv_length - 1; a ragged batch mixes
decode rows and prefill chunks (q_length up to T) in one call.

One kernel serves both. The G = H // Hk query heads of a kv head are folded into the rows of the
dot: query i, head g of that kv head is row i * G + g of q grouped as [B, Hk, T * G, D] (padded to
a whole number of row blocks of at least 16 rows), so each page is read once per row block and kv
head, whatever the group size. Grid (batch, kv head, row block, split): a program walks the key
blocks (`block_k` consecutive positions, gathered slot by slot through the page table, so a block
may straddle pages of any size) its rows can see, bounded by the row's length and causal limit
(key blocks past them are never read) and the window's lower edge (blocks before it are skipped).
That range is cut into `num_splits` contiguous parts (split-K / FlashDecoding), one per program, so
that a long context spreads over the GPU's SMs even at batch 1. Blocks fully visible to every row
of the block skip the mask; boundary blocks mask the logits and zero the values of slots outside
the range (page-table entries past a row's length may name any page, even an invalid id: ids are
clipped into the pool and those slots never contribute). Each program writes its normalised
partial output and base-2 log-sum-exp; `paged_attention` merges the splits (log-sum-exp weights)
in XLA. Any page_size works (a key block gathers slot by slot).

Scores use base 2 (exp2, log2(e) folded into the scale). Loads keep the pool dtype (bf16 pages are
read as bf16) and dots accumulate in float32 (IEEE for float32 operands).

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

from pallas_kernels.gpu import flash_common
from pallas_kernels.gpu.flash_common import BlockConfig, dot

# (head_dim, operand width) -> configs for decode-shaped calls (all rows of a kv head fit one block
# of 16) and for prefill-shaped calls. block_q counts rows (query tokens x group heads), block_k
# key positions. Decode stages keep num_stages x (K + V tile) <= 128 KiB of shared memory.
# Width 256 is also D=64 decode with 4 kv heads folded (`default_fold`): an H100 sweep of that call
# (window 512, 4K context, batch 64; bench/results/paged_decode-2026-12-06-w512.md) put
# (16, 32, 4, 4) at 65 us against 70 us for the earlier (16, 64, 4, 2).
CONFIGS: dict[tuple[int, str], dict[str, BlockConfig]] = {
    (64, "16bit"): dict(decode=BlockConfig(16, 128, 4, 3), prefill=BlockConfig(64, 64, 4, 2)),
    (128, "16bit"): dict(decode=BlockConfig(16, 64, 4, 3), prefill=BlockConfig(64, 64, 4, 2)),
    (256, "16bit"): dict(decode=BlockConfig(16, 32, 4, 4), prefill=BlockConfig(32, 32, 4, 2)),
    (64, "float32"): dict(decode=BlockConfig(16, 64, 4, 2), prefill=BlockConfig(32, 32, 4, 2)),
    (128, "float32"): dict(decode=BlockConfig(16, 64, 4, 2), prefill=BlockConfig(32, 32, 4, 2)),
    (256, "float32"): dict(decode=BlockConfig(16, 32, 4, 2), prefill=BlockConfig(16, 16, 4, 1)),
}
HEAD_DIMS = (64, 128, 256)
DTYPES = ("bfloat16", "float16", "float32")
MIN_ROWS = 16  # smallest row block: the M dimension of a tensor-core dot
MAX_FOLD_WIDTH = 256  # widest folded key row (fold x head_dim) of a decode program
MIN_BLOCKS_PER_SPLIT = 4  # a split reads at least this many key blocks of the longest row
# Programs per SM that split-K aims at. An H100 sweep (32K context, batch 1 and 16; 128K, batch 1)
# read 80-102% of the copy rate with two per SM against 75-94% with one (two fit an SM's shared
# memory and overlap one's pipeline start with the other's loads).
SPLIT_WAVES = 2

_LOG2E = math.log2(math.e)


class Masking(NamedTuple):
  """Static options of one call."""
  group: int  # query heads per kv head
  page_size: int
  scale: float
  window: int | None
  softcap: float | None


def unsupported_reason(head_dim: int, q_dtype, pages_dtype) -> str | None:
  """None when the kernel supports this head dim and these dtypes, else the reason why not."""
  if head_dim not in HEAD_DIMS:
    return f"head_dim {head_dim} not in {HEAD_DIMS}"
  for name, dtype in (("q", q_dtype), ("k_pages/v_pages", pages_dtype)):
    if jnp.dtype(dtype).name not in DTYPES:
      return f"{name} dtype {jnp.dtype(dtype).name} not in {DTYPES}"
  return None


def _config(head_dim: int, dtype, rows: int) -> BlockConfig:
  """The table's config for `rows` query rows per kv head, the row block shrunk to short inputs."""
  width = "float32" if jnp.dtype(dtype) == jnp.float32 else "16bit"
  table = CONFIGS[(head_dim, width)]
  cfg = table["decode"] if rows <= MIN_ROWS else table["prefill"]
  return dataclasses.replace(cfg, block_q=max(MIN_ROWS, min(cfg.block_q,
                                                            pl.next_power_of_2(rows))))


def default_num_splits(programs: int, max_blocks: int, num_sms: int | None = None) -> int:
  """Key splits per program so that `programs` x splits makes SPLIT_WAVES programs per SM, with
  at least MIN_BLOCKS_PER_SPLIT of the `max_blocks` key blocks (of the longest possible row) per
  split."""
  if num_sms is None:
    num_sms = flash_common.num_sms()
  most = max(1, max_blocks // MIN_BLOCKS_PER_SPLIT)
  return max(1, min(SPLIT_WAVES * num_sms // programs, most))


def _key_bounds(r_first, block_q: int, q_offset, q_length, kv_limit, masking: Masking):
  """Key positions [lo, hi) that rows r_first .. r_first + block_q - 1 may see, and [full_lo,
  full_hi) visible to every valid row of the block (unclipped)."""
  g = masking.group
  tok_first = r_first // g
  tok_last = jnp.minimum((r_first + block_q - 1) // g, q_length - 1)
  pos_first, pos_last = q_offset + tok_first, q_offset + tok_last
  hi = jnp.where(tok_first < q_length, jnp.minimum(kv_limit, pos_last + 1), 0)
  full_hi = jnp.minimum(kv_limit, pos_first + 1)
  lo = full_lo = jnp.int32(0)
  if masking.window is not None:
    lo = jnp.maximum(pos_first - masking.window + 1, 0)
    full_lo = jnp.maximum(pos_last - masking.window + 1, 0)
  return lo, hi, full_lo, full_hi


def _split_blocks(lo, hi, full_lo, full_hi, block_k: int, num_splits: int):
  """This program's key blocks [a, c) (its part of the blocks covering [lo, hi)) and the unmasked
  blocks [u_lo, u_hi) inside them (a <= u_lo <= u_hi <= c)."""
  blk_lo = lo // block_k
  blk_hi = jnp.maximum(pl.cdiv(hi, block_k), blk_lo)
  per_split = pl.cdiv(blk_hi - blk_lo, num_splits)
  a = jnp.minimum(blk_lo + pl.program_id(3) * per_split, blk_hi)
  c = jnp.minimum(a + per_split, blk_hi)
  u_lo = jnp.clip(pl.cdiv(full_lo, block_k), a, c)
  u_hi = jnp.clip(full_hi // block_k, u_lo, c)
  return a, u_lo, u_hi, c


def _logits(q, k, masking: Masking):
  """Base-2 logits [BQ, BK] of q [BQ, D] and k [BK, D]."""
  s = dot(q, k.astype(q.dtype), trans_b=True)
  if masking.softcap is None:
    return s * (masking.scale * _LOG2E)
  return jnp.tanh(s * (masking.scale / masking.softcap)) * (masking.softcap * _LOG2E)


def _kernel(q_offset_ref, q_length_ref, kv_length_ref, table_ref, q_ref, k_ref, v_ref, o_ref,
            lse_ref, *, masking: Masking, block_k: int, num_splits: int):
  """One (batch, kv head, row block, split). q [BQ, D] (rows i * G + g), k/v [slots, D] (this kv
  head of the flattened pools), table [W]. Writes o [BQ, D] float32 (normalised over this split's
  keys) and lse [BQ] (base 2; -inf where the split saw no key)."""
  block_q = q_ref.shape[0]
  page_size = masking.page_size
  r_first = pl.program_id(2) * block_q
  q_offset, q_length = q_offset_ref[()], q_length_ref[()]
  kv_limit = jnp.minimum(kv_length_ref[()], table_ref.shape[0] * page_size)
  lo, hi, full_lo, full_hi = _key_bounds(r_first, block_q, q_offset, q_length, kv_limit, masking)
  pos = q_offset + (r_first + jnp.arange(block_q, dtype=jnp.int32)) // masking.group
  q = q_ref[...]

  num_pages = k_ref.shape[0] // page_size
  last_page = table_ref.shape[0] - 1

  def body(j, carry, *, masked):
    m, l, acc = carry
    keys = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
    # Slots of the block's keys; clipped so that keys past the row's table or invalid table
    # entries (both masked) still read inside the pools.
    page_ids = jnp.clip(table_ref[jnp.minimum(keys // page_size, last_page)], 0, num_pages - 1)
    slots = page_ids * page_size + keys % page_size
    s = _logits(q, k_ref[slots, :], masking)
    v = v_ref[slots, :]
    if masked:
      r, c = pos[:, None], keys[None, :]
      visible = (c >= lo) & (c < hi) & (c <= r)
      if masking.window is not None:
        visible = visible & (r - c < masking.window)
      s = jnp.where(visible, s, -jnp.inf)
      v = jnp.where(((keys >= lo) & (keys < hi))[:, None], v, 0)  # masked slots may hold anything
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp2(s - shift[:, None])
    alpha = jnp.exp2(m - shift)
    acc = alpha[:, None] * acc + dot(p.astype(q.dtype), v.astype(q.dtype))
    return m_new, alpha * l + jnp.sum(p, axis=1), acc

  a, u_lo, u_hi, c = _split_blocks(lo, hi, full_lo, full_hi, block_k, num_splits)
  carry = (jnp.full((block_q,), -jnp.inf, jnp.float32), jnp.zeros((block_q,), jnp.float32),
           jnp.zeros(q_ref.shape, jnp.float32))
  carry = lax.fori_loop(a, u_lo, functools.partial(body, masked=True), carry)
  carry = lax.fori_loop(u_lo, u_hi, functools.partial(body, masked=False), carry)
  m, l, acc = lax.fori_loop(u_hi, c, functools.partial(body, masked=True), carry)
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[...] = acc / safe_l[:, None]
  lse_ref[...] = jnp.where(empty, -jnp.inf, m + jnp.log2(safe_l))


def _merge_splits(o, lse):
  """o [..., S, R, D], base-2 lse [..., S, R] of S key splits -> (o [..., R, D], lse [..., R])."""
  top = jnp.max(lse, axis=-2, keepdims=True)
  top = jnp.where(top == -jnp.inf, 0.0, top)
  weight = jnp.exp2(lse - top)  # 0 for empty splits
  total = jnp.sum(weight, axis=-2)
  o = jnp.sum(weight[..., None] * o, axis=-3)
  safe_total = jnp.where(total == 0.0, 1.0, total)
  lse = jnp.where(total == 0.0, -jnp.inf, top[..., 0, :] + jnp.log2(safe_total))
  return o / safe_total[..., None], lse


def default_fold(t: int, batch: int, kv_heads: int, group: int, head_dim: int,
                 num_sms: int | None = None) -> int:
  """kv heads per program of a decode call (t == 1) with enough programs to fill SPLIT_WAVES per
  SM unsplit (batch x kv_heads of them): the most (a divisor of kv_heads) whose rows (fold x
  group) fit one MIN_ROWS row block and whose keys (fold x head_dim) fit MAX_FOLD_WIDTH, else 1.
  Prefill chunks and small batches (which need split-K) are not folded.

  H100, D=64 MHA at 4K context and batch 64, or D=128 GQA 4 at 32K and batch 16: 5% faster
  folded; batch 1 (fewer programs, more splits): 2-15% slower."""
  if num_sms is None:
    num_sms = flash_common.num_sms()
  if t != 1 or batch * kv_heads < SPLIT_WAVES * num_sms:
    return 1
  return max(f for f in range(1, kv_heads + 1)
             if kv_heads % f == 0 and f * group <= MIN_ROWS and f * head_dim <= MAX_FOLD_WIDTH)


def _fold_queries(q, fold: int):
  """q [B, Hk, G, D] -> block-diagonal [B, Hk / fold, fold * G, fold * D]: row f * G + g holds
  head f's query g in columns f * D .. (f + 1) * D and zeros elsewhere, so that one dot with the
  fold heads' keys side by side ([keys, fold * D]) gives each row its own head's logits."""
  b, hk, g, d = q.shape
  q = q.reshape(b, hk // fold, fold, g, d)
  eye = jnp.eye(fold, dtype=q.dtype)
  return jnp.einsum("bjfge,fk->bjfgke", q, eye).reshape(b, hk // fold, fold * g, fold * d)


def _unfold_outputs(o, fold: int, group: int):
  """o [B, Hk / fold, >= fold * G, fold * D] of folded rows -> [B, Hk, G, D] (each row's own
  head's columns)."""
  b, hf, _, width = o.shape
  d = width // fold
  o = o[:, :, :fold * group].reshape(b, hf, fold, group, fold, d)
  o = jnp.einsum("bjfgke,fk->bjfge", o, jnp.eye(fold, dtype=o.dtype))
  return o.reshape(b, hf * fold, group, d)


def paged_attention(q, k_pages, v_pages, page_table, q_offset, q_length, kv_length, *,
                    scale: float, window: int | None = None, softcap: float | None = None,
                    num_splits: int | None = None, fold: int | None = None,
                    config: BlockConfig | None = None, interpret: bool = False):
  """Causal attention of q's new tokens to their rows' paged keys (forward only).

  Args:
    q: [B, T, H, D] queries; bfloat16, float16 or float32; D in HEAD_DIMS.
    k_pages, v_pages: [num_pages, page_size, Hk, D] pools (Hk dividing H), any dtype of DTYPES
      (read as is; cast to q's dtype in registers).
    page_table: int32 [B, W] page ids of each row.
    q_offset, q_length, kv_length: int32 [B]: position of row b's first query, its number of
      valid queries (<= T; later slots output zeros) and of valid keys.
    scale: logit scale.
    window, softcap: optional sliding window and logit soft-cap (module docstring).
    num_splits: key splits per (row, kv head, row block); None fills the SMs (default_num_splits).
    fold: kv heads per program (dividing Hk; decode calls, T == 1, only); None takes
      `default_fold`. A decode row block has G real rows of at least 16: folding f heads fills it
      with f * G rows (block-diagonal queries against the f heads' keys side by side), so a
      program reads f times the bytes per key block and the grid has f times fewer programs.
    config: BlockConfig overriding the table (tests use small blocks).
    interpret: run in Pallas interpret mode (CPU tests).

  Returns:
    o [B, T, H, D] in q's dtype.
  """
  b, t, h, d = q.shape
  num_pages, page_size, hk, _ = k_pages.shape
  group = h // hk
  fold = default_fold(t, b, hk, group, d) if fold is None else fold
  if hk % fold or (fold > 1 and t != 1):
    raise ValueError(f"fold must divide the kv heads ({hk}) and needs T == 1, got fold={fold}, "
                     f"T={t}")
  qg = q.reshape(b, t, hk, group, d).transpose(0, 2, 1, 3, 4).reshape(b, hk, t * group, d)
  if fold > 1:
    qg = _fold_queries(qg, fold)
  hf, rows, width = hk // fold, qg.shape[2], fold * d  # programs' kv heads, rows, key width
  cfg = _config(width, q.dtype, rows) if config is None else config
  num_blocks = pl.cdiv(rows, cfg.block_q)
  if num_splits is None:
    max_blocks = pl.cdiv(page_table.shape[1] * page_size, cfg.block_k)  # the longest row
    num_splits = default_num_splits(b * hf * num_blocks, max_blocks)
  qg = jnp.pad(qg, ((0, 0), (0, 0), (0, num_blocks * cfg.block_q - rows), (0, 0)))
  rows_p = qg.shape[2]
  # Folded rows all belong to the one query token: a group of rows_p puts every row at token 0.
  masking = Masking(group=rows_p if fold > 1 else group, page_size=page_size, scale=float(scale),
                    window=window, softcap=softcap)
  scalar = pl.BlockSpec((None,), lambda i, j, n, s: (i,))
  pool = pl.BlockSpec((num_pages * page_size, None, width), lambda i, j, n, s: (0, j, 0))
  o, lse = pl.pallas_call(
      functools.partial(_kernel, masking=masking, block_k=cfg.block_k, num_splits=num_splits),
      grid=(b, hf, num_blocks, num_splits),
      in_specs=[scalar, scalar, scalar,
                pl.BlockSpec((None, page_table.shape[1]), lambda i, j, n, s: (i, 0)),
                pl.BlockSpec((None, None, cfg.block_q, width), lambda i, j, n, s: (i, j, n, 0)),
                pool, pool],
      out_specs=[pl.BlockSpec((None, None, None, cfg.block_q, width),
                              lambda i, j, n, s: (i, j, s, n, 0)),
                 pl.BlockSpec((None, None, None, cfg.block_q), lambda i, j, n, s: (i, j, s, n))],
      out_shape=[jax.ShapeDtypeStruct((b, hf, num_splits, rows_p, width), jnp.float32),
                 jax.ShapeDtypeStruct((b, hf, num_splits, rows_p), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
      interpret=interpret,
      name="paged_attention",
  )(q_offset, q_length, kv_length, page_table, qg,
    k_pages.reshape(num_pages * page_size, hf, width),
    v_pages.reshape(num_pages * page_size, hf, width))
  o = o[:, :, 0] if num_splits == 1 else _merge_splits(o, lse)[0]
  if fold > 1:
    o = _unfold_outputs(o, fold, group)
  o = o[:, :, :t * group].reshape(b, hk, t, group, d).swapaxes(1, 2).reshape(b, t, h, d)
  valid = jnp.arange(t, dtype=jnp.int32)[None, :] < q_length[:, None]
  return jnp.where(valid[:, :, None, None], o, 0.0).astype(q.dtype)
