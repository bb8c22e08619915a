"""Mosaic GPU (Hopper) flash attention, forward and backward: dense causal / non-causal calls and
causal sliding windows.

Training-shaped attention: q [B, T, H, D], k and v [B, T, Hk, D] (Hk dividing H; query head h reads
kv head h // (H // Hk)), query i and key j at positions i and j, causal (j <= i) or not; a causal
call may take a sliding window W: i - W < j <= i (W keys, the query's own included, as
`jaxchunk.ops.attention`'s window). No segment ids, non-causal windows or soft-cap: the Triton
kernels of `flash_attention` serve those.

All three kernels are FlashAttention-3 style: each program (CTA) runs three warpgroups, two compute
warpgroups that issue `wgmma` on 64-row tiles and one producer warpgroup that streams the operand
blocks into a ring of shared-memory slots with TMA copies, signalled by barriers (a "loaded" barrier
per slot and operand, a "consumed" barrier per slot that both compute warpgroups arrive at).

- forward: grid (H, T / (2 * block_q), B). Each compute warpgroup owns block_q query rows, keeps
  its Q tile in shared memory and loops over the key blocks it can see (online softmax in base 2,
  the two warpgroups ping-ponging their softmax against each other's matmuls through a schedule
  barrier). Causal programs stop at the diagonal, windowed ones start at the first key block a row
  of the program sees (the producer streams exactly the program's blocks); each warpgroup reads
  the blocks its own rows see and releases the others unread (keeping the schedule barrier in
  step). Only the diagonal blocks and the blocks at the window's lower edge are masked; such a
  block of which one half is masked for all of a warpgroup's rows runs as a half step over the
  other half (`_edge_split_loops`). Writes o and the base-2 log-sum-exp.
- dq: grid (H, T / (2 * block_q), B). Each compute warpgroup keeps Q, dO, lse and delta = rowsum(o *
  dO) of its rows and loops over the key blocks the program sees (masked as in the forward):
  dq += (P * (dP - delta)) K.
- dkv: grid (Hk, T / (2 * block_kv), B). Each compute warpgroup keeps its K, V block and loops over
  the query heads of its GQA group and, per head, over the query blocks that see the program's
  keys (causal: from the diagonal on; with a window up to the last query whose window reaches
  them), masking the diagonal and window-edge blocks: dv += P^T dO, dk += dS^T Q, so dk and dv come
  out summed over the group.

Operands are bfloat16 or float16, matmuls accumulate in float32. T must be a multiple of the block
rows of every kernel (`seq_multiple`); `flash_attention` zero-pads a ragged causal T (padded keys
sit after every real query, so causality masks them) and `unsupported_reason` rejects a ragged
non-causal T. On CPU the kernels run in Mosaic GPU interpret mode (`interpret=True`; tests).

This module does not import jaxchunk.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import operator

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.gpu import flash_common


@dataclasses.dataclass(frozen=True)
class MgpuBlocks:
  """Tile rows of one kernel: each compute warpgroup owns `rows` rows of its resident operand and
  streams `cols`-row blocks of the other through `stages` shared-memory slots."""
  rows: int
  cols: int
  stages: int


# head_dim -> forward (query rows x key rows), dq (query x key rows), dkv (key x query rows).
BLOCKS: dict[int, dict[str, MgpuBlocks]] = {
    64: dict(fwd=MgpuBlocks(64, 128, 2), dq=MgpuBlocks(64, 64, 2), dkv=MgpuBlocks(64, 64, 2)),
    128: dict(fwd=MgpuBlocks(64, 128, 2), dq=MgpuBlocks(64, 64, 2), dkv=MgpuBlocks(64, 64, 2)),
}
HEAD_DIMS = tuple(BLOCKS)
DTYPES = ("bfloat16", "float16")

_COMPUTE_WGS = 2  # compute warpgroups per program; warpgroup 2 is the TMA producer
_COMPUTE_REGISTERS = 232
_PRODUCER_REGISTERS = 40
_LOG2E = math.log2(math.e)
_SCHEDULE_BARRIER_ID = 8  # hardware named barrier of the forward's ping-pong (Mosaic uses low ids)
_MIN_HALF_KEYS = 64  # the forward's half steps: 32-key halves (of 64-key blocks) fail to lower
_MASK_VALUE = -1e30  # masked logits (base 2) under a window: exp2(_MASK_VALUE - finite) == 0


def seq_multiple(head_dim: int) -> int:
  """The multiple of T that all three kernels need for this head dim."""
  blocks = BLOCKS[head_dim]
  return math.lcm(_COMPUTE_WGS * blocks["fwd"].rows, blocks["fwd"].cols,
                  _COMPUTE_WGS * blocks["dq"].rows, blocks["dq"].cols,
                  _COMPUTE_WGS * blocks["dkv"].rows, blocks["dkv"].cols)


def unsupported_reason(q_shape, k_shape, v_shape, dtype, *, causal: bool,
                       window: int | None = None) -> str | None:
  """None when these kernels cover the call, else the reason why not.

  q_shape [B, T, H, D], k_shape [B, T, Hk, D], v_shape [B, T, Hk, Dv]; window None or an int >= 1
  (causal calls only).
  """
  t, h, d = q_shape[1], q_shape[2], q_shape[3]
  if window is not None:
    if _as_window(window) is None:
      return f"window must be an int >= 1 or None, got {window!r}"
    if not causal:
      return "window needs causal=True (no non-causal sliding window)"
  if d not in HEAD_DIMS:
    return f"head_dim {d} not in {HEAD_DIMS}"
  if v_shape[3] != d:
    return f"head_dim_v {v_shape[3]} != head_dim {d}"
  if k_shape[1] != t:
    return f"Tk ({k_shape[1]}) != Tq ({t})"
  if h % k_shape[2]:
    return f"kv heads ({k_shape[2]}) do not divide q heads ({h})"
  if jnp.dtype(dtype).name not in DTYPES:
    return f"dtype {jnp.dtype(dtype).name} not in {DTYPES}"
  if not causal and t % seq_multiple(d):
    return f"non-causal T ({t}) must be a multiple of {seq_multiple(d)} (no key-length mask)"
  return None


def _as_window(window) -> int | None:
  """window as a Python int when it is an integer >= 1, else None."""
  if isinstance(window, bool):
    return None
  try:
    window = operator.index(window)
  except TypeError:
    return None
  return window if window >= 1 else None


def _tile_transforms(dtype):
  """Shared-memory layout of a [rows, head_dim] wgmma operand: 128-byte swizzled tiles."""
  swizzle_elems = 128 // jnp.dtype(dtype).itemsize
  return (plgpu.TilingTransform((8, swizzle_elems)), plgpu.SwizzleTransform(128))


def _interpret_params(interpret: bool):
  # Hardware wgmma accumulators (`plgpu.ACC`) start at zero; interpret mode models that with
  # zero-filled fresh buffers.
  return plgpu.InterpretGPUParams(uninitialized_memory="zero") if interpret else None


def _run_acc(shape, compute):
  """Runs `compute(acc_ref)` on a fresh zero float32 wgmma accumulator of `shape`; returns it."""
  def body(acc_ref):
    compute(acc_ref)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _wgmma_update(updates, *, interpret: bool, while_running=None):
  """acc + a @ b for each (acc, a, b) in `updates`: acc float32 [M, N] in wgmma layout, a [M, K] in
  registers or a shared-memory view (`ref.at[...]`), b [K, N] a shared-memory view. Returns the new
  accumulators, a tuple.

  On GPU the wgmmas accumulate in place (`pl.run_state`), are issued together, and
  `while_running()` (e.g. a barrier wait for the next block) runs before they are awaited. Interpret
  mode supports neither `run_state` nor register operands, so there each update is a plain dot.
  """
  if not interpret:
    def body(refs):
      for ref, (_, a, b) in zip(refs, updates):
        plgpu.wgmma(ref, a, b)
      if while_running is not None:
        while_running()
    return pl.run_state(body)(tuple(plgpu.ACC.init(acc) for acc, _, _ in updates))
  if while_running is not None:
    while_running()
  return tuple(acc + jnp.dot(a[...] if hasattr(a, "transforms") else a, b[...],
                             preferred_element_type=jnp.float32)
               for acc, a, b in updates)


@plgpu.inline_mgpu()
def _sync_compute_warpgroups(_):
  """bar.sync on a hardware named barrier for the two compute warpgroups' 256 threads."""
  mgpu_utils.inline_ptx(f"bar.sync {_SCHEDULE_BARRIER_ID}, {_COMPUTE_WGS * 128};",
                        has_side_effects=True, convergent=True)


def _zeros(shape):
  return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _causal_mask(shape, row_first, col_first, *, rows_are_queries: bool, window: int | None):
  """Bool [rows, cols] (wgmma layout): True where key position <= query position and, with a
  window, query position - key position < window."""
  rows = plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=plgpu.Layout.WGMMA) + row_first
  cols = plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=plgpu.Layout.WGMMA) + col_first
  if window is None:
    return rows >= cols if rows_are_queries else cols >= rows
  back = rows - cols if rows_are_queries else cols - rows  # query position - key position
  return (back >= 0) & (back < window)


def _key_blocks(q_first, rows: int, block_kv: int, window: int | None):
  """Causal: the key blocks [lo, hi) that query rows q_first .. q_first + rows - 1 see, and the
  ones [full_lo, full_hi) inside that every row sees whole (lo <= full_lo <= full_hi <= hi): the
  blocks before full_lo (the window's lower edge) and from full_hi on (the diagonal) need the mask.
  q_first is a multiple of 64 and block_kv of 64."""
  hi = pl.cdiv(q_first + rows, block_kv)
  full_hi = lax.div(q_first, block_kv)
  if window is None:
    return 0, 0, full_hi, hi
  lo = lax.div(lax.max(q_first - (window - 1), 0), block_kv)
  full_lo = lax.min(lax.div(lax.max(q_first + (rows - 1 - window), -1) + block_kv, block_kv), hi)
  return lo, full_lo, lax.max(full_hi, full_lo), hi


def _query_blocks(kv_first, rows: int, block_q: int, num_q: int, window: int | None):
  """Causal: the query blocks [lo, hi) that see any of the keys kv_first .. kv_first + rows - 1,
  and the ones [full_lo, full_hi) that see every one of them (lo <= full_lo <= full_hi <= hi): the
  blocks before full_lo (the diagonal) and from full_hi on (the window's upper edge) need the mask.
  """
  lo = lax.div(kv_first, block_q)
  full_lo = lax.min(pl.cdiv(kv_first + rows, block_q), num_q)
  if window is None:
    return lo, full_lo, num_q, num_q
  hi = lax.min(lax.div(kv_first + (rows - 1 + window - 1), block_q) + 1, num_q)
  full_lo = lax.min(full_lo, hi)
  full_hi = lax.max(lax.min(lax.div(kv_first + window, block_q), hi), full_lo)
  return lo, full_lo, full_hi, hi


def _masked_loops(body, blocks, carry, *, mask_first: bool):
  """Runs body(j, carry, masked=...) over the blocks (lo, full_lo, full_hi, hi): [lo, full_lo)
  masked (left out when not `mask_first`: the caller knows it is empty), [full_lo, full_hi)
  unmasked, [full_hi, hi) masked. Statically empty ranges emit no loop."""
  lo, full_lo, full_hi, hi = blocks

  def loop(first, end, masked: bool, carry):
    if isinstance(first, int) and isinstance(end, int) and first >= end:
      return carry  # statically empty
    return lax.fori_loop(first, end, functools.partial(body, masked=masked), carry)

  if mask_first:
    carry = loop(lo, full_lo, True, carry)
  carry = loop(full_lo, full_hi, False, carry)
  return loop(full_hi, hi, True, carry)


def _edge_split_loops(body, blocks, carry, *, q_first, rows: int, block_kv: int,
                      window: int | None):
  """`_masked_loops(body, blocks, carry, mask_first=window is not None)` for a warpgroup's query
  rows q_first .. q_first + rows - 1, where a masked edge block of which one half is masked for
  every row runs as a half step, body(j, carry, masked=True, half=h) over its other half h:
  the first half of the window's lower-edge block lo when no row reaches back into it, the
  second half of the last (diagonal) block when it starts after the last row. With 64-row query
  blocks and 128-key blocks one of each two warpgroups has such a block at every diagonal (and
  with a window a multiple of 128 keys the other one at the lower edge): half a block less
  matrix work of the 9 of a 1024-key window."""
  if block_kv < 2 * _MIN_HALF_KEYS:
    return _masked_loops(body, blocks, carry, mask_first=window is not None)
  lo, full_lo, full_hi, hi = blocks
  half = block_kv // 2

  def loop(first, end, carry, **kwargs):
    if isinstance(first, int) and isinstance(end, int) and first >= end:
      return carry  # statically empty
    return lax.fori_loop(first, end, functools.partial(body, **kwargs), carry)

  hi_half = ((full_hi < hi) & ((hi - 1) * block_kv + half >= q_first + rows)).astype(jnp.int32)
  if window is not None:
    lo_half = ((lo < full_lo)
               & (lo * block_kv + half <= q_first - (window - 1))).astype(jnp.int32)
    carry = loop(lo, lo + lo_half, carry, masked=True, half=1)
    carry = loop(lo + lo_half, full_lo, carry, masked=True)
  carry = loop(full_lo, full_hi, carry, masked=False)
  carry = loop(full_hi, hi - hi_half, carry, masked=True)
  return loop(hi - hi_half, hi, carry, masked=True, half=0)


def _stream_steps(ring_base, first, end, stages: int, consumed, load):
  """Producer loop: issues `load(j, slot)` for j in [first, end), block j into ring slot
  (ring_base + j - first) % stages, waiting on the `consumed(slot)` barriers of the block that
  held the slot `stages` ring steps before."""
  @pl.loop(first, end)
  def _(j):
    step = ring_base + j - first
    pl.when(step >= stages)(lambda: _wait_consumed(step - stages, stages, consumed))
    load(j, lax.rem(step, stages))


def _wait_consumed(step, stages: int, consumed):
  for barrier in consumed(lax.rem(step, stages)):
    plgpu.barrier_wait(barrier)


def _drain(num_steps, stages: int, consumed):
  """Waits until the last ring steps (of `num_steps`) are consumed, so that every barrier phase
  is observed before the scope ends."""
  pl.loop(lax.max(num_steps - stages, 0), num_steps)(
      lambda step: _wait_consumed(step, stages, consumed))


def _stream(num_steps, stages: int, consumed, load):
  """Producer loop: issues `load(step, slot)` for steps [0, num_steps) into a ring of `stages`
  slots, waiting on the `consumed(slot)` barriers before reusing a slot, and at the end until the
  last blocks are consumed."""
  _stream_steps(0, 0, num_steps, stages, consumed, load)
  _drain(num_steps, stages, consumed)


# ---------------------------------------------------------------------------------------------
# Forward.


def _persistent_programs(num_tiles: int) -> int:
  """Programs of a persistent forward: one per SM (at most one per tile)."""
  return max(1, min(num_tiles, flash_common.num_sms()))


def _forward(q, k, v, *, causal: bool, window: int | None, scale: float, interpret: bool):
  """o [B, T, H, D] (q's dtype) and the base-2 log-sum-exp lse2 [B, H, T] (float32) of
  softmax(scale * q k^T) v, for T a multiple of `seq_multiple(D)`.

  A tile is (batch, head, 2 * block_q query rows). Dense calls run one program per tile. Windowed
  calls, whose tiles are short and all alike, run persistent: one program per SM walks the tiles
  pid, pid + P, ... (query tiles fastest, so that concurrent tiles share keys in L2), its producer
  streams the key blocks of consecutive tiles through one ring without a break, each compute
  warpgroup loads its next tile's Q as soon as its last QK^T is done, and the output stores of a
  tile drain while the next one computes.
  """
  b, t, h, d = q.shape
  group = h // k.shape[2]
  blocks = BLOCKS[d]["fwd"]
  block_q, block_kv = blocks.rows, blocks.cols
  stages = min(blocks.stages, t // block_kv)
  num_kv = t // block_kv
  num_q_tiles = t // (_COMPUTE_WGS * block_q)
  num_tiles = b * h * num_q_tiles
  persistent = window is not None
  num_programs = _persistent_programs(num_tiles) if persistent else num_tiles
  dtype = q.dtype
  qk_scale = scale * _LOG2E
  # max(scale * s) = scale * max(s) needs scale >= 0; a negative scale is applied first.
  prescale, s_scale = (1.0, qk_scale) if qk_scale >= 0 else (qk_scale, 1.0)
  # The two compute warpgroups meet on a hardware named barrier (bar.sync) in dense calls
  # (H100, T=8K: 2.7% faster than an mbarrier); persistent window calls keep the mbarrier, whose
  # arrival can precede the wait for V (as fast or faster there).
  named_barrier = not (interpret or persistent)

  def tile_coords(tile):
    """(batch, head, first query row) of a tile; query tiles vary fastest."""
    rows = lax.rem(tile, num_q_tiles) * (_COMPUTE_WGS * block_q)
    batch_head = lax.div(tile, num_q_tiles)
    return lax.div(batch_head, h), lax.rem(batch_head, h), rows

  def streamed_blocks(program_first):
    """The key blocks [lo, hi) streamed for the tile whose rows start at program_first."""
    if not causal:
      return 0, num_kv
    lo, _, _, hi = _key_blocks(program_first, _COMPUTE_WGS * block_q, block_kv, window)
    return lo, hi

  def kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, q_smem2, o_smem2, lse_smem2, k_smem, v_smem,
             q_barriers, k_barriers, v_barriers, k_consumed, v_consumed, schedule_barrier):
    wg = lax.axis_index("wg")
    if persistent:
      first_tile, stride = lax.axis_index("programs"), num_programs
      my_tiles = lax.div(num_tiles - first_tile + stride - 1, stride)
    else:
      first_tile = ((lax.axis_index("batch") * h + lax.axis_index("heads")) * num_q_tiles
                    + lax.axis_index("q_seq"))
      stride, my_tiles = 1, None

    def over_tiles(body, carry):
      """body(tile, carry) over this program's tiles."""
      if not persistent:
        return body(first_tile, carry)
      return lax.fori_loop(0, my_tiles, lambda i, c: body(first_tile + i * stride, c),
                           jnp.int32(carry))

    def schedule():
      """Both compute warpgroups meet (the ping-pong of their softmax and matmuls)."""
      if named_barrier:
        _sync_compute_warpgroups()
      else:
        plgpu.barrier_arrive(schedule_barrier)
        plgpu.barrier_wait(schedule_barrier)

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
      q_smem, o_smem, lse_smem = q_smem2.at[wg], o_smem2.at[wg], lse_smem2.at[wg]

      def load_q(tile):
        batch, head, program_first = tile_coords(tile)
        rows = (batch, pl.ds(program_first + wg * block_q, block_q), head)
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_barriers.at[wg])

      def tile_body(tile, ring_base):
        # ring_base: key blocks the producer streamed for this program's earlier tiles; the
        # tile's block j sits in slot (ring_base + j - program_lo) % stages.
        batch, head, program_first = tile_coords(tile)
        program_lo, program_hi = streamed_blocks(program_first)
        q_first = program_first + wg * block_q
        if causal:
          kv_blocks = _key_blocks(q_first, block_q, block_kv, window)
        else:
          kv_blocks = (0, 0, num_kv, num_kv)
        kv_lo, kv_hi = kv_blocks[0], kv_blocks[3]

        def slot_of(step):
          return lax.rem(ring_base + step - program_lo, stages)

        def release(first, end):
          # Key blocks the producer loaded for the other warpgroup only: release them, and keep
          # the schedule barrier in step with the other warpgroup (two arrivals per block).
          @pl.loop(first, end)
          def _(step):
            slot = slot_of(step)
            plgpu.barrier_wait(k_barriers.at[slot])
            plgpu.barrier_wait(v_barriers.at[slot])
            plgpu.barrier_arrive(k_consumed.at[slot])
            plgpu.barrier_arrive(v_consumed.at[slot])
            schedule()
            schedule()

        plgpu.barrier_wait(q_barriers.at[wg])
        if window is None:
          plgpu.barrier_wait(k_barriers.at[slot_of(0)])
          pl.when(wg == 1)(schedule)
        else:
          # The second warpgroup's rows see fewer blocks at the window's lower edge.
          pl.when(wg == 1)(schedule)
          release(program_lo, kv_lo)
          plgpu.barrier_wait(k_barriers.at[slot_of(kv_lo)])

        def kv_step(step, carry, *, masked: bool, half: int | None = None):
          # half 0 or 1: only that half of the block's keys (the other is masked for every row).
          acc, row_max, row_sum = carry
          slot = slot_of(step)
          cols = block_kv if half is None else block_kv // 2
          keys = slice(None) if half is None else pl.ds(half * cols, cols)
          k_block, v_block = k_smem.at[slot, keys], v_smem.at[slot, keys]

          def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, k_block.transpose((1, 0)))
            schedule()
          # Unscaled logits: the scale joins exp2's argument (one fused multiply-add per logit).
          s = _run_acc((block_q, cols), qk)
          if prescale != 1.0:
            s = s * prescale
          plgpu.barrier_arrive(k_consumed.at[slot])
          if masked:
            mask = _causal_mask(s.shape, q_first, step * block_kv + (half or 0) * cols,
                                rows_are_queries=True, window=window)
            # With a window, a row can see no key of its first blocks; a finite mask value keeps
            # its running max finite (no inf - inf), those blocks add nothing, and the rescale
            # by exp2(scale * -1e30 - max) = 0 at its first visible key is harmless.
            s = jnp.where(mask, s, -jnp.inf if window is None else _MASK_VALUE)
          new_max = jnp.maximum(row_max, s.max(axis=1) * s_scale)
          rescale = jnp.exp2(row_max - new_max)
          logits = s * s_scale - lax.broadcast_in_dim(new_max, s.shape, [0])
          if masked and window is not None:
            # A masked logit minus a masked row max is 0 only up to the rounding of a fused
            # multiply-add at magnitude 1e29: zero those weights exactly.
            logits = jnp.where(mask, logits, -jnp.inf)
          p = jnp.exp2(logits)
          acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0])
          row_sum = row_sum * rescale + p.sum(axis=1)
          p16 = p.astype(dtype)
          acc, row_sum, new_max, p16 = lax.optimization_barrier((acc, row_sum, new_max, p16))
          if named_barrier:
            plgpu.barrier_wait(v_barriers.at[slot])
            schedule()
          else:
            plgpu.barrier_arrive(schedule_barrier)
            plgpu.barrier_wait(v_barriers.at[slot])
            plgpu.barrier_wait(schedule_barrier)

          def wait_next_k():
            next_step = step + 1

            @pl.when(next_step < kv_hi)
            def _():
              plgpu.barrier_wait(k_barriers.at[slot_of(next_step)])
          acc, = _wgmma_update([(acc, p16, v_block)], interpret=interpret,
                               while_running=wait_next_k)
          plgpu.barrier_arrive(v_consumed.at[slot])
          return acc, new_max, row_sum

        carry = (_zeros((block_q, d)),
                 plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32),
                                   plgpu.Layout.WGMMA.reduce(1)),
                 plgpu.layout_cast(jnp.zeros((block_q,), jnp.float32),
                                   plgpu.Layout.WGMMA.reduce(1)))
        if causal:
          carry = _edge_split_loops(kv_step, kv_blocks, carry, q_first=q_first, rows=block_q,
                                    block_kv=block_kv, window=window)
          release(kv_hi, program_hi)  # the first warpgroup's rows end before the second's
        else:
          carry = lax.fori_loop(0, num_kv, functools.partial(kv_step, masked=False), carry)
        if persistent:  # Q is read by no more wgmma: load the next tile's
          next_tile = tile + stride
          pl.when(next_tile < num_tiles)(lambda: load_q(next_tile))
        pl.when(wg == 0)(schedule)
        acc, row_max, row_sum = carry
        plgpu.wait_smem_to_gmem(0)  # the previous tile's output stores have left o/lse_smem
        o_smem[...] = (acc / lax.broadcast_in_dim(row_sum, acc.shape, [0])).astype(dtype)
        lse_smem[...] = row_max + jnp.log2(row_sum)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(o_smem, o_ref.at[batch, pl.ds(q_first, block_q), head],
                                commit_group=False)
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[batch, head, pl.ds(q_first, block_q)],
                                commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        return ring_base + program_hi - program_lo

      load_q(first_tile)
      over_tiles(tile_body, 0)
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _producer():
      plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")

      def consumed(slot):
        return k_consumed.at[slot], v_consumed.at[slot]

      def tile_body(tile, ring_base):
        batch, head, program_first = tile_coords(tile)
        program_lo, program_hi = streamed_blocks(program_first)
        kv_head = lax.div(head, group)

        def load(block, slot):
          rows = (batch, pl.ds(block * block_kv, block_kv), kv_head)
          plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_barriers.at[slot])
          plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_barriers.at[slot])

        _stream_steps(ring_base, program_lo, program_hi, stages, consumed, load)
        return ring_base + program_hi - program_lo

      _drain(over_tiles(tile_body, 0), stages, consumed)

  transforms = _tile_transforms(dtype)
  scratch = [
      plgpu.SMEM((_COMPUTE_WGS, block_q, d), dtype, transforms=transforms),
      plgpu.SMEM((_COMPUTE_WGS, block_q, d), dtype, transforms=transforms),
      plgpu.SMEM((_COMPUTE_WGS, block_q), jnp.float32),
      plgpu.SMEM((stages, block_kv, d), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_kv, d), dtype, transforms=transforms),
      plgpu.Barrier(num_barriers=_COMPUTE_WGS),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=_COMPUTE_WGS),
  ]
  if persistent:
    grid, grid_names = (num_programs,), ("programs",)
  else:
    grid, grid_names = (h, num_q_tiles, b), ("heads", "q_seq", "batch")
  return plgpu.kernel(
      kernel,
      out_type=(jax.ShapeDtypeStruct(q.shape, dtype),
                jax.ShapeDtypeStruct((b, h, t), jnp.float32)),
      scratch_types=scratch,
      grid=grid,
      grid_names=grid_names,
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret),
  )(q, k, v)


# ---------------------------------------------------------------------------------------------
# Backward.


def _backward_dq(q, k, v, do, lse2, delta, *, causal: bool, window: int | None, scale: float,
                 interpret: bool):
  """dq [B, T, H, D] (q's dtype) from the saved base-2 lse2 [B, H, T] and delta [B, H, T]."""
  b, t, h, d = q.shape
  group = h // k.shape[2]
  blocks = BLOCKS[d]["dq"]
  block_q, block_kv = blocks.rows, blocks.cols
  stages = min(blocks.stages, t // block_kv)
  num_kv = t // block_kv
  dtype = q.dtype
  qk_scale = scale * _LOG2E

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, q_smem2, do_smem2,
             lse_smem2, delta_smem2, k_smem, v_smem, q_barriers, do_barriers, lse_barriers,
             delta_barriers, k_barriers, v_barriers, consumed):
    batch, head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    program_first = lax.axis_index("q_seq") * (_COMPUTE_WGS * block_q)
    # Both compute warpgroups walk the key blocks [kv_lo, kv_hi) that any row of the program sees
    # (block j in slot (j - kv_lo) % stages), masking those that not every row sees whole.
    if causal:
      kv_blocks = _key_blocks(program_first, _COMPUTE_WGS * block_q, block_kv, window)
    else:
      kv_blocks = (0, 0, num_kv, num_kv)
    kv_lo, kv_hi = kv_blocks[0], kv_blocks[3]

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
      q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
      q_first = program_first + wg * block_q
      rows = (batch, pl.ds(q_first, block_q), head)
      row_stats = (batch, head, pl.ds(q_first, block_q))
      row_barriers = (q_barriers, do_barriers, lse_barriers, delta_barriers)
      plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem, q_barriers.at[wg])
      plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem, do_barriers.at[wg])
      plgpu.copy_gmem_to_smem(lse_ref.at[row_stats], lse_smem2.at[wg], lse_barriers.at[wg])
      plgpu.copy_gmem_to_smem(delta_ref.at[row_stats], delta_smem2.at[wg], delta_barriers.at[wg])
      for barriers in row_barriers:
        plgpu.barrier_wait(barriers.at[wg])
      lse = plgpu.load(lse_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))
      delta = plgpu.load(delta_smem2.at[wg], layout=plgpu.Layout.WGMMA.reduce(1))

      def kv_step(step, dq, *, masked: bool):
        slot = lax.rem(step - kv_lo, stages)
        plgpu.barrier_wait(k_barriers.at[slot])
        s = _run_acc((block_q, block_kv),
                     lambda acc: plgpu.wgmma(acc, q_smem, k_smem.at[slot].transpose((1, 0))))
        p = jnp.exp2(s * qk_scale - lax.broadcast_in_dim(lse, s.shape, [0]))
        if masked:
          mask = _causal_mask(s.shape, q_first, step * block_kv, rows_are_queries=True,
                              window=window)
          p = jnp.where(mask, p, 0.0)
        plgpu.barrier_wait(v_barriers.at[slot])
        dp = _run_acc((block_q, block_kv),
                      lambda acc: plgpu.wgmma(acc, do_smem, v_smem.at[slot].transpose((1, 0))))
        ds = p * (dp - lax.broadcast_in_dim(delta, dp.shape, [0]))

        dq, = _wgmma_update([(dq, ds.astype(dtype), k_smem.at[slot])], interpret=interpret)
        plgpu.barrier_arrive(consumed.at[slot])
        return dq

      dq = _zeros((block_q, d))
      if causal:
        dq = _masked_loops(kv_step, kv_blocks, dq, mask_first=window is not None)
      else:
        dq = lax.fori_loop(0, num_kv, functools.partial(kv_step, masked=False), dq)
      q_smem[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[rows])
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _producer():
      plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")
      kv_head = lax.div(head, group)

      def load(step, slot):
        rows = (batch, pl.ds((kv_lo + step) * block_kv, block_kv), kv_head)
        plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem.at[slot], k_barriers.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem.at[slot], v_barriers.at[slot])

      _stream(kv_hi - kv_lo, stages, lambda slot: (consumed.at[slot],), load)

  transforms = _tile_transforms(dtype)
  scratch = [
      plgpu.SMEM((_COMPUTE_WGS, block_q, d), dtype, transforms=transforms),
      plgpu.SMEM((_COMPUTE_WGS, block_q, d), dtype, transforms=transforms),
      plgpu.SMEM((_COMPUTE_WGS, block_q), jnp.float32),
      plgpu.SMEM((_COMPUTE_WGS, block_q), jnp.float32),
      plgpu.SMEM((stages, block_kv, d), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_kv, d), dtype, transforms=transforms),
      *[plgpu.Barrier(num_barriers=_COMPUTE_WGS)] * 4,
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
  ]
  return plgpu.kernel(
      kernel,
      out_type=jax.ShapeDtypeStruct(q.shape, dtype),
      scratch_types=scratch,
      grid=(h, t // (_COMPUTE_WGS * block_q), b),
      grid_names=("heads", "q_seq", "batch"),
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret),
  )(q, k, v, do, lse2, delta)


def _backward_dkv(q, k, v, do, lse2, delta, *, causal: bool, window: int | None, scale: float,
                  interpret: bool):
  """dk, dv [B, T, Hk, D] (k's dtype), summed over each kv head's group of query heads."""
  b, t, h, d = q.shape
  hk = k.shape[2]
  group = h // hk
  blocks = BLOCKS[d]["dkv"]
  block_kv, block_q = blocks.rows, blocks.cols
  num_q = t // block_q
  stages = min(blocks.stages, num_q)
  dtype = q.dtype
  qk_scale = scale * _LOG2E

  def kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, k_smem2, v_smem2,
             q_smem, do_smem, lse_smem, delta_smem, k_barriers, v_barriers, q_barriers,
             do_barriers, lse_barriers, delta_barriers, consumed):
    batch, kv_head, wg = lax.axis_index("batch"), lax.axis_index("heads"), lax.axis_index("wg")
    program_first = lax.axis_index("kv_seq") * (_COMPUTE_WGS * block_kv)
    # Both compute warpgroups walk, per query head of the group, the query blocks [q_lo, q_hi)
    # that see any of this program's keys (causal: from the diagonal on; with a window up to the
    # last query whose window reaches the program's last key), masking those that do not see all
    # of them. The producer streams them head after head, q_steps per head.
    if causal:
      q_blocks = _query_blocks(program_first, _COMPUTE_WGS * block_kv, block_q, num_q, window)
    else:
      q_blocks = (0, 0, num_q, num_q)
    q_lo, q_hi = q_blocks[0], q_blocks[3]
    q_steps = q_hi - q_lo

    @pl.when(wg < _COMPUTE_WGS)
    def _compute():
      plgpu.set_max_registers(_COMPUTE_REGISTERS, action="increase")
      k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
      kv_first = program_first + wg * block_kv
      rows = (batch, pl.ds(kv_first, block_kv), kv_head)
      plgpu.copy_gmem_to_smem(k_ref.at[rows], k_smem, k_barriers.at[wg])
      plgpu.copy_gmem_to_smem(v_ref.at[rows], v_smem, v_barriers.at[wg])
      plgpu.barrier_wait(k_barriers.at[wg])
      plgpu.barrier_wait(v_barriers.at[wg])

      def q_step(q_block, carry, *, step_base, masked: bool):
        dk, dv = carry
        slot = lax.rem(step_base + q_block - q_lo, stages)
        plgpu.barrier_wait(q_barriers.at[slot])
        s_t = _run_acc((block_kv, block_q),
                       lambda acc: plgpu.wgmma(acc, k_smem, q_smem.at[slot].transpose((1, 0))))
        plgpu.barrier_wait(lse_barriers.at[slot])
        lse = plgpu.load(lse_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
        p_t = jnp.exp2(s_t * qk_scale - lax.broadcast_in_dim(lse, s_t.shape, [1]))
        if masked:
          mask = _causal_mask(s_t.shape, kv_first, q_block * block_q, rows_are_queries=False,
                              window=window)
          p_t = jnp.where(mask, p_t, 0.0)
        plgpu.barrier_wait(do_barriers.at[slot])

        dv, dp_t = _wgmma_update(
            [(dv, p_t.astype(dtype), do_smem.at[slot]),
             (_zeros((block_kv, block_q)), v_smem, do_smem.at[slot].transpose((1, 0)))],
            interpret=interpret)
        plgpu.barrier_wait(delta_barriers.at[slot])
        delta = plgpu.load(delta_smem.at[slot], layout=plgpu.Layout.WGMMA.reduce(0))
        ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, dp_t.shape, [1]))

        dk, = _wgmma_update([(dk, ds_t.astype(dtype), q_smem.at[slot])], interpret=interpret)
        plgpu.barrier_arrive(consumed.at[slot])
        return dk, dv

      def head_loop(g, carry):
        step = functools.partial(q_step, step_base=g * q_steps)
        if causal:
          return _masked_loops(step, q_blocks, carry, mask_first=True)
        return lax.fori_loop(0, num_q, functools.partial(step, masked=False), carry)

      dk, dv = lax.fori_loop(0, group, head_loop, (_zeros((block_kv, d)), _zeros((block_kv, d))))
      k_smem[...] = (dk * scale).astype(dtype)
      v_smem[...] = dv.astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[rows], commit_group=False)
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[rows], commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == _COMPUTE_WGS)
    def _producer():
      plgpu.set_max_registers(_PRODUCER_REGISTERS, action="decrease")

      def load(step, slot):
        head = kv_head * group + lax.div(step, q_steps)
        q_first = (q_lo + lax.rem(step, q_steps)) * block_q
        rows = (batch, pl.ds(q_first, block_q), head)
        row_stats = (batch, head, pl.ds(q_first, block_q))
        plgpu.copy_gmem_to_smem(q_ref.at[rows], q_smem.at[slot], q_barriers.at[slot])
        plgpu.copy_gmem_to_smem(do_ref.at[rows], do_smem.at[slot], do_barriers.at[slot])
        plgpu.copy_gmem_to_smem(lse_ref.at[row_stats], lse_smem.at[slot], lse_barriers.at[slot])
        plgpu.copy_gmem_to_smem(delta_ref.at[row_stats], delta_smem.at[slot],
                                delta_barriers.at[slot])

      _stream(group * q_steps, stages, lambda slot: (consumed.at[slot],), load)

  transforms = _tile_transforms(dtype)
  scratch = [
      plgpu.SMEM((_COMPUTE_WGS, block_kv, d), dtype, transforms=transforms),
      plgpu.SMEM((_COMPUTE_WGS, block_kv, d), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_q, d), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_q, d), dtype, transforms=transforms),
      plgpu.SMEM((stages, block_q), jnp.float32),
      plgpu.SMEM((stages, block_q), jnp.float32),
      plgpu.Barrier(num_barriers=_COMPUTE_WGS),
      plgpu.Barrier(num_barriers=_COMPUTE_WGS),
      *[plgpu.Barrier(num_barriers=stages)] * 4,
      plgpu.Barrier(num_arrivals=_COMPUTE_WGS, num_barriers=stages),
  ]
  kv_type = jax.ShapeDtypeStruct(k.shape, dtype)
  return plgpu.kernel(
      kernel,
      out_type=(kv_type, kv_type),
      scratch_types=scratch,
      grid=(hk, t // (_COMPUTE_WGS * block_kv), b),
      grid_names=("heads", "kv_seq", "batch"),
      num_threads=_COMPUTE_WGS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret_params(interpret),
  )(q, k, v, do, lse2, delta)


# ---------------------------------------------------------------------------------------------
# Custom VJP and the public entry points.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q, k, v, causal: bool, window: int | None, scale: float, interpret: bool):
  return _forward(q, k, v, causal=causal, window=window, scale=scale, interpret=interpret)[0]


def _attention_fwd(q, k, v, causal: bool, window: int | None, scale: float, interpret: bool):
  o, lse2 = _forward(q, k, v, causal=causal, window=window, scale=scale, interpret=interpret)
  return o, (q, k, v, o, lse2)


def _attention_bwd(causal: bool, window: int | None, scale: float, interpret: bool, residuals,
                   do):
  q, k, v, o, lse2 = residuals
  do = do.astype(q.dtype)
  delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))
  options = dict(causal=causal, window=window, scale=scale, interpret=interpret)
  dq = _backward_dq(q, k, v, do, lse2, delta, **options)
  dk, dv = _backward_dkv(q, k, v, do, lse2, delta, **options)
  return dq, dk, dv


_attention.defvjp(_attention_fwd, _attention_bwd)


def _prepare(q, k, v, causal: bool, window: int | None):
  """Checks the call; returns (q, k, v) zero-padded to a multiple of `seq_multiple(D)` and the
  window the kernels take (None when it reaches back over the whole sequence)."""
  reason = unsupported_reason(q.shape, k.shape, v.shape, q.dtype, causal=causal, window=window)
  if reason is None and not q.dtype == k.dtype == v.dtype:
    reason = f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
  if reason is not None:
    raise ValueError(f"flash_attention_mgpu: {reason}")
  t, d = q.shape[1], q.shape[3]
  window = None if window is None else _as_window(window)
  if window is not None and window >= t:
    window = None  # every real query sees all its causal keys; padded queries do not matter
  pad = (-t) % seq_multiple(d)
  if pad:
    q, k, v = (jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))) for x in (q, k, v))
  return q, k, v, window


def flash_attention(q, k, v, *, causal: bool = True, window: int | None = None,
                    scale: float | None = None, interpret: bool = False):
  """softmax(scale * q k^T [+ causal / sliding-window mask]) v; differentiable (custom VJP).

  Args:
    q: [B, T, H, D] bfloat16 or float16, D in HEAD_DIMS.
    k, v: [B, T, Hk, D] of q's dtype, Hk dividing H.
    causal: mask keys after the query.
    window: None, or (causal only) an int >= 1: query i sees keys j with i - window < j <= i
      (`window` keys, itself included), as `jaxchunk.ops.attention`'s window.
    scale: logit scale; default D ** -0.5.
    interpret: run the kernels in Mosaic GPU interpret mode (CPU tests).

  Returns:
    o [B, T, H, D] in q's dtype. A causal T that is not a multiple of `seq_multiple(D)` is
    zero-padded inside; a non-causal one raises ValueError (see `unsupported_reason`).
  """
  t, d = q.shape[1], q.shape[3]
  q, k, v, window = _prepare(q, k, v, causal, window)
  scale = d ** -0.5 if scale is None else float(scale)
  return _attention(q, k, v, bool(causal), window, scale, bool(interpret))[:, :t]


def flash_attention_forward(q, k, v, *, causal: bool = True, window: int | None = None,
                            scale: float | None = None, interpret: bool = False):
  """The forward kernel alone: (o [B, T, H, D] in q's dtype, lse [B, H, T] float32), lse the natural
  log-sum-exp of each query row's scaled logits. Arguments as `flash_attention`."""
  t, d = q.shape[1], q.shape[3]
  q, k, v, window = _prepare(q, k, v, causal, window)
  scale = d ** -0.5 if scale is None else float(scale)
  o, lse2 = _forward(q, k, v, causal=bool(causal), window=window, scale=scale,
                     interpret=bool(interpret))
  return o[:, :t], lse2[:, :, :t] * math.log(2.0)
