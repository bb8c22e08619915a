"""Ring attention: softmax attention over a sequence sharded on a mesh axis.

Every device keeps its queries and passes its key/value block around the ring of the axis with
`lax.ppermute`: at step s a device holds the block of device (i - s) mod n, sends it on to device
i + 1 and meanwhile attends its queries to it (the send does not depend on the compute, so XLA
overlaps them). Per-block results are merged with an online softmax on their row log-sum-exps.

The backward pass is a custom VJP that rings as well (FlashAttention-2 style): the forward saves
only q, k, v, o and the merged row log-sum-exp; the backward passes each key/value block around the
ring again together with its accumulating dk/dv, recomputing each block's probabilities from the
saved log-sum-exp, and finally returns dk/dv to the block's owner.

Tokens are placed by a layout of `jaxchunk.parallel.mesh` ("zigzag" balances the causal work:
device i holds segments i and 2n - 1 - i). Each (query segment, key segment) pair is one call of the
blockwise FlashAttention kernels of `jaxchunk.ops.attention` with the segments' relative offset, so
masks (causal, window, segment_ids) are exact and fully-masked tiles are skipped inside the kernel.
Ring steps whose key blocks no query of any device can see (sliding windows) are skipped statically:
the contiguous layout with a causal window of w tokens needs only 1 + ceil((w - 1) / T_local) steps
and as many sends.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxchunk.ops._common import check_qkv, check_shape, default_scale
from jaxchunk.ops.attention import _check_window, _flash_backward, _flash_forward, _Tiling
from jaxchunk.parallel.mesh import check_divisible, check_layout, segment_table


class _Ring(NamedTuple):
  """Static configuration of one ring attention call."""
  axis_name: str
  layout: str
  num_devices: int
  segments: int        # per device
  seg_len: int
  shifts: tuple        # ring steps computed: the block of device i - s for each s
  tiling: _Tiling


def _largest_divisor(n: int, cap: int) -> int:
  return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def needed_shifts(num_devices: int, layout: str, seg_len: int, *, causal: bool,
                  window: int | None) -> tuple[int, ...]:
  """Ring steps s (0 = the local block) at which some query of some device may see a key.

  Query segment a and key segment b overlap when some distance d = query pos - key pos in
  [(a - b) * L - (L - 1), (a - b) * L + (L - 1)] is allowed: d >= 0 when causal, d < window and
  (without causality) -d < window when windowed.
  """
  table = segment_table(num_devices, layout)
  lo = 0 if causal else (-(window - 1) if window is not None else -math.inf)
  hi = window - 1 if window is not None else math.inf
  shifts = []
  for s in range(num_devices):
    for i in range(num_devices):
      pairs = [(a, b) for a in table[i] for b in table[(i - s) % num_devices]]
      if any((a - b) * seg_len - (seg_len - 1) <= hi and (a - b) * seg_len + seg_len - 1 >= lo
             for a, b in pairs):
        shifts.append(s)
        break
  return tuple(shifts)


def _is_chain(shifts: tuple) -> bool:
  return shifts == tuple(range(len(shifts)))


def _rotate(tree, cfg: _Ring, shift: int):
  """Sends every array of `tree` from device i to device i + shift (mod n)."""
  n = cfg.num_devices
  if shift % n == 0:
    return tree
  perm = [(i, (i + shift) % n) for i in range(n)]
  return jax.tree.map(lambda x: lax.ppermute(x, cfg.axis_name, perm), tree)


def _source_segments(cfg: _Ring, shift):
  """Global segment indices [S] of the key block held at ring step `shift` (traced)."""
  table = jnp.asarray(segment_table(cfg.num_devices, cfg.layout), jnp.int32)
  return table[(lax.axis_index(cfg.axis_name) - shift) % cfg.num_devices]


def _segment(x, index: int, cfg: _Ring, axis: int):
  return lax.slice_in_dim(x, index * cfg.seg_len, (index + 1) * cfg.seg_len, axis=axis)


def _pair_args(cfg: _Ring, q_segs, k_segs, a: int, b: int, batch: int):
  """q_offset and kv_limit of query segment a vs key segment b for the blockwise kernels."""
  offset = (q_segs[a] - k_segs[b]) * cfg.seg_len
  return jnp.full((batch,), offset, jnp.int32), jnp.full((batch,), cfg.seg_len, jnp.int32)


def _merge(o, lse, o_b, lse_b):
  """Online-softmax merge of two partial results; lse is -inf on rows without a key."""
  top = jnp.maximum(lse, lse_b)
  top = jnp.where(jnp.isneginf(top), 0.0, top)
  w, w_b = jnp.exp(lse - top), jnp.exp(lse_b - top)
  total = w + w_b
  safe = jnp.where(total > 0, total, 1.0)
  o = (w[..., None] * o + w_b[..., None] * o_b) / safe[..., None]
  return o, jnp.where(total > 0, top + jnp.log(safe), -jnp.inf)


def _block_forward(cfg: _Ring, q, k, v, q_seg, kv_seg, shift, acc):
  """Merges the attention of local queries to the key block of ring step `shift` into `acc`.

  q [B,Hk,G,Tl,D] (pre-scaled); k [B,Hk,Tl,D]; v [B,Hk,Tl,Dv]; q_seg, kv_seg [B,Tl] or None;
  acc = (o [B,Hk,G,Tl,Dv], lse [B,Hk,G,Tl]).
  """
  q_segs = _source_segments(cfg, 0)
  k_segs = _source_segments(cfg, shift)
  b = q.shape[0]
  outs, lses = [], []
  for a in range(cfg.segments):
    o_a = _segment(acc[0], a, cfg, 3)
    lse_a = _segment(acc[1], a, cfg, 3)
    for j in range(cfg.segments):
      offset, limit = _pair_args(cfg, q_segs, k_segs, a, j, b)
      o_b, lse_b = _flash_forward(
          cfg.tiling, _segment(q, a, cfg, 3), _segment(k, j, cfg, 2), _segment(v, j, cfg, 2),
          offset, limit, None if q_seg is None else _segment(q_seg, a, cfg, 1),
          None if kv_seg is None else _segment(kv_seg, j, cfg, 1))
      o_a, lse_a = _merge(o_a, lse_a, o_b, jnp.where(jnp.isposinf(lse_b), -jnp.inf, lse_b))
    outs.append(o_a)
    lses.append(lse_a)
  return jnp.concatenate(outs, axis=3), jnp.concatenate(lses, axis=3)


def _block_backward(cfg: _Ring, q, k, v, o, lse, do, q_seg, kv_seg, shift):
  """Gradients of the key block of ring step `shift`: (dq, dk, dv) contributions."""
  q_segs = _source_segments(cfg, 0)
  k_segs = _source_segments(cfg, shift)
  b = q.shape[0]
  dq = [0.0] * cfg.segments
  dk = [0.0] * cfg.segments
  dv = [0.0] * cfg.segments
  for a in range(cfg.segments):
    for j in range(cfg.segments):
      offset, limit = _pair_args(cfg, q_segs, k_segs, a, j, b)
      residuals = (_segment(q, a, cfg, 3), _segment(k, j, cfg, 2), _segment(v, j, cfg, 2),
                   _segment(o, a, cfg, 3), _segment(lse, a, cfg, 3), offset, limit,
                   None if q_seg is None else _segment(q_seg, a, cfg, 1),
                   None if kv_seg is None else _segment(kv_seg, j, cfg, 1))
      dq_p, dk_p, dv_p = _flash_backward(cfg.tiling, residuals, _segment(do, a, cfg, 3))
      dq[a] = dq[a] + dq_p
      dk[j] = dk[j] + dk_p
      dv[j] = dv[j] + dv_p
  return (jnp.concatenate(dq, axis=3), jnp.concatenate(dk, axis=2), jnp.concatenate(dv, axis=2))


def _ring_forward(cfg: _Ring, q, k, v, q_seg, kv_seg):
  """Returns o [B,Hk,G,Tl,Dv] and lse [B,Hk,G,Tl] (+inf on rows without a visible key)."""
  b, hk, g, tl, _ = q.shape
  acc = (jnp.zeros((b, hk, g, tl, v.shape[-1]), q.dtype),
         jnp.full((b, hk, g, tl), -jnp.inf, q.dtype))
  block = (k, v, kv_seg)
  if _is_chain(cfg.shifts):
    def step(carry, shift):
      block, acc = carry
      incoming = _rotate(block, cfg, 1)  # independent of this step's compute: overlaps with it
      return (incoming, _block_forward(cfg, q, *block[:2], q_seg, block[2], shift, acc)), None

    last = len(cfg.shifts) - 1
    if last:
      (block, acc), _ = lax.scan(step, (block, acc), jnp.arange(last, dtype=jnp.int32))
    acc = _block_forward(cfg, q, *block[:2], q_seg, block[2], last, acc)
  else:
    for shift in cfg.shifts:
      held = _rotate(block, cfg, shift)
      acc = _block_forward(cfg, q, *held[:2], q_seg, held[2], shift, acc)
  o, lse = acc
  return o, jnp.where(jnp.isneginf(lse), jnp.inf, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ring(cfg: _Ring, q, k, v, q_seg, kv_seg):
  return _ring_forward(cfg, q, k, v, q_seg, kv_seg)[0]


def _ring_fwd(cfg: _Ring, q, k, v, q_seg, kv_seg):
  o, lse = _ring_forward(cfg, q, k, v, q_seg, kv_seg)
  return o, (q, k, v, q_seg, kv_seg, o, lse)


def _ring_bwd(cfg: _Ring, residuals, do):
  q, k, v, q_seg, kv_seg, o, lse = residuals
  dq = jnp.zeros_like(q)
  grads = (jnp.zeros_like(k), jnp.zeros_like(v))
  block = (k, v, kv_seg)
  if _is_chain(cfg.shifts):
    def step(carry, shift):
      block, grads, dq = carry
      incoming = _rotate(block, cfg, 1)
      dq_b, dk_b, dv_b = _block_backward(cfg, q, *block[:2], o, lse, do, q_seg, block[2], shift)
      grads = _rotate((grads[0] + dk_b, grads[1] + dv_b), cfg, 1)
      return (incoming, grads, dq + dq_b), None

    last = len(cfg.shifts) - 1
    if last:
      (block, grads, dq), _ = lax.scan(step, (block, grads, dq), jnp.arange(last, dtype=jnp.int32))
    dq_b, dk_b, dv_b = _block_backward(cfg, q, *block[:2], o, lse, do, q_seg, block[2], last)
    dk, dv = _rotate((grads[0] + dk_b, grads[1] + dv_b), cfg, -last)
    dq = dq + dq_b
  else:
    dk, dv = grads
    for shift in cfg.shifts:
      held = _rotate(block, cfg, shift)
      dq_b, dk_b, dv_b = _block_backward(cfg, q, *held[:2], o, lse, do, q_seg, held[2], shift)
      dk_b, dv_b = _rotate((dk_b, dv_b), cfg, -shift)
      dq, dk, dv = dq + dq_b, dk + dk_b, dv + dv_b
  return dq, dk, dv, None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention_shard(q, k, v, *, axis_name: str, layout: str = "zigzag", causal: bool = True,
                         segment_ids=None, window: int | None = None, scale: float | None = None,
                         block_q: int = 128, block_k: int = 128):
  """Per-device ring attention inside `shard_map` over the sequence axis `axis_name`.

  Args:
    q: local queries [B, Tl, H, D] (this device's tokens in layout order).
    k: local keys [B, Tl, Hk, D], Hk dividing H (GQA; only Hk heads travel around the ring).
    v: local values [B, Tl, Hk, Dv].
    axis_name: the sequence mesh axis.
    layout: "zigzag" (balanced causal work) or "contiguous" (fewest steps for sliding windows).
    causal, window: masks on global positions, as `jaxchunk.ops.attention`.
    segment_ids: local int [B, Tl] segment ids (packed documents), or None.
    scale: logit scale; default D ** -0.5.
    block_q, block_k: tile sizes of the blockwise kernels (lowered to divide the segment length).

  Returns:
    o [B, Tl, H, Dv] in q's dtype, equal to single-device attention of the whole sequence.
  """
  b, t, h, hk, d, dv = check_qkv(q, k, v)
  segments = check_layout(layout)
  if t % segments:
    raise ValueError(f"the local sequence length {t} must be a multiple of {segments} for layout "
                     f"{layout!r}")
  if segment_ids is not None:
    check_shape(segment_ids, (b, t), "segment_ids", "[batch, seq]")
  window = _check_window(window)
  n = lax.axis_size(axis_name)
  seg_len = t // segments
  tiling = _Tiling(causal=bool(causal), window=window, softcap=None,
                   block_q=_largest_divisor(seg_len, block_q),
                   block_k=_largest_divisor(seg_len, block_k))
  cfg = _Ring(axis_name, layout, n, segments, seg_len,
              needed_shifts(n, layout, seg_len, causal=bool(causal), window=window), tiling)
  out_dtype = q.dtype
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype, jnp.float32)
  q = jnp.asarray(q, dtype) * default_scale(scale, d)
  q = q.reshape(b, t, hk, h // hk, d).transpose(0, 2, 3, 1, 4)
  k = jnp.asarray(k, dtype).transpose(0, 2, 1, 3)
  v = jnp.asarray(v, dtype).transpose(0, 2, 1, 3)
  seg = None if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
  o = _ring(cfg, q, k, v, seg, seg)
  return o.transpose(0, 3, 1, 2, 4).reshape(b, t, h, dv).astype(out_dtype)


def ring_attention(q, k, v, *, mesh, axis_name: str = "sequence", batch_axes=None,
                   layout: str = "zigzag", segment_ids=None, **options):
  """Ring attention on global arrays [B, T, ...] in layout order, sharded over `axis_name`.

  The `shard_map` runs with `check_vma=False`: the blockwise kernels start their loops from fresh
  (device-invariant) accumulators, which the varying-type check rejects; call
  `ring_attention_shard` inside your own `shard_map` the same way.

  `options` are those of `ring_attention_shard` (causal, window, scale, block_q, block_k).
  Returns o [B, T, H, Dv] in layout order.
  """
  check_divisible(q.shape[1], mesh.shape[axis_name], layout, name="q sequence")
  seq = P(batch_axes, axis_name)
  shard = functools.partial(ring_attention_shard, axis_name=axis_name, layout=layout, **options)
  if segment_ids is None:
    return jax.shard_map(shard, mesh=mesh, in_specs=(seq,) * 3, out_specs=seq,
                         check_vma=False)(q, k, v)
  run = lambda q, k, v, ids: shard(q, k, v, segment_ids=ids)
  return jax.shard_map(run, mesh=mesh, in_specs=(seq,) * 4, out_specs=seq,
                       check_vma=False)(q, k, v, segment_ids)
