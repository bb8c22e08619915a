"""Softmax attention: a dense reference and a memory-efficient blockwise (FlashAttention) path.

Layout [batch, seq, heads, head_dim]: q [B, Tq, H, D], k [B, Tk, Hk, D], v [B, Tk, Hk, Dv] with Hk
dividing H (grouped-query attention: query head h reads kv head h // (H // Hk)).

Query i sits at position `q_offset + i` (per batch element), key j at position j, so the same op
serves training (Tq == Tk), chunked prefill and decoding over a KV-cache buffer (Tq != Tk, with
`kv_length` the cache's valid length). A query may attend to a key when every active mask allows it:

  causal        key pos <= query pos
  window        query pos - key pos < window (and key pos - query pos < window when not causal)
  segment_ids   same segment id (packed documents)
  kv_length     key pos < kv_length[b]

A query row with no valid key outputs zeros, and its gradients are zeros (never NaN). Both paths
compute in float32 (float64 for float64 inputs under `jax.enable_x64`) and return q's dtype.

Paths (`impl=`):
  "reference"  dense softmax with an explicit [Tq, Tk] mask; the definition.
  "xla"        FlashAttention in plain JAX: an online softmax over [block_q, block_k] tiles under
               a `jax.custom_vjp` whose forward saves only o and the row log-sum-exp and whose
               backward recomputes the tiles (FlashAttention-2), so forward and backward memory is
               O(T * block). Key blocks that causality, the window or `kv_length` mask out entirely
               are skipped (the loop bounds are computed per query block, and vice versa in the
               backward pass).
  "pallas"     the FlashAttention-2 Triton kernels of `pallas_kernels.gpu.flash_attention`
               (forward and backward under a custom VJP; GQA through the kernels' index maps;
               causal/window/segment masks, blocks outside them skipped; soft-cap). They cover
               training-shaped calls: Tq == Tk, q_offset 0, no kv_length, head_dim == head_dim_v in
               (64, 128, 256), q/k/v of one dtype among bfloat16, float16, float32. Other calls
               (decode, chunked prefill) raise NotImplementedError under an explicit "pallas".
               On CPU the kernels run in interpret mode (tests). Calls without segment_ids or
               softcap, dense or with a causal window, on a Hopper GPU (compute capability 9.x)
               run the Mosaic GPU kernels of `pallas_kernels.gpu.flash_attention_mgpu` instead
               (wgmma + TMA, warp specialised) when they cover the call (bfloat16/float16,
               head_dim 64 or 128, T a multiple of 128 when not causal); the env var
               JAXCHUNK_FLASH_KERNEL=mosaic|triton forces one of the two (see
               `_use_mosaic_kernel`).

"auto" on GPU: dense calls (no segment_ids, window or softcap; Tq == Tk, q_offset 0, no kv_length)
in bfloat16/float16 with head_dim == head_dim_v in (64, 128) go to cuDNN
(`jax.nn.dot_product_attention(..., implementation="cudnn")`), which needs no explicit mask there
and is the fastest path; every other call the Pallas kernel covers goes to "pallas"; the rest to
"xla". Off GPU, "auto" is "xla".
"""

from __future__ import annotations

import functools
import operator
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jaxchunk.ops._common import check_rank, default_scale, is_traced, pad_seq, repeat_heads
from jaxchunk.ops._common import pallas_interpret, resolve_impl
from pallas_kernels.gpu import flash_attention as flash_kernel
from pallas_kernels.gpu import flash_attention_mgpu as mgpu_kernel

_HIGHEST = lax.Precision.HIGHEST


class _Tiling(NamedTuple):
  """Static mask options and tile sizes of one blockwise attention call."""
  causal: bool
  window: int | None
  softcap: float | None
  block_q: int
  block_k: int


def attention(q, k, v, *, causal: bool = True, segment_ids=None, window: int | None = None,
              softcap: float | None = None, scale: float | None = None, q_offset=0,
              kv_length=None, block_q: int = 128, block_k: int = 128, impl: str = "auto"):
  """Softmax attention softmax(scale * q k^T + mask) v with causal/window/segment/length masks.

  Args:
    q: queries [B, Tq, H, D].
    k: keys [B, Tk, Hk, D], Hk dividing H.
    v: values [B, Tk, Hk, Dv].
    causal: mask keys after the query's position.
    segment_ids: None; int [B, T] (requires Tq == Tk); or a pair (q_segment_ids [B, Tq],
      kv_segment_ids [B, Tk]). Queries and keys with different ids do not attend to each other.
    window: if given (int >= 1), a query attends only to keys less than `window` positions back
      (itself included), and when not causal also less than `window` positions ahead.
    softcap: if given (> 0), logits become softcap * tanh(logits / softcap).
    scale: logit scale; default D ** -0.5.
    q_offset: position of the first query, an int or int array [B].
    kv_length: None or int (array [B]): keys at positions >= kv_length[b] are masked.
    block_q, block_k: tile sizes of the "xla" path (clipped to Tq and Tk).
    impl: "auto" | "reference" | "xla" | "pallas".

  Returns:
    o [B, Tq, H, Dv] in q's dtype.
  """
  b, tq, tk = _check_qkv(q, k, v)
  q_seg, kv_seg = _split_segment_ids(segment_ids, b, tq, tk)
  pallas_unsupported = _pallas_unsupported(q, k, v, q_offset=q_offset, kv_length=kv_length)
  q_offset = _per_batch_int(q_offset, b, "q_offset")
  kv_limit = jnp.full((b,), tk, jnp.int32) if kv_length is None else \
      jnp.minimum(_per_batch_int(kv_length, b, "kv_length"), tk)
  window = _check_window(window)
  softcap = _check_softcap(softcap)
  block_q = _check_block(block_q, "block_q")
  block_k = _check_block(block_k, "block_k")
  scale = default_scale(scale, q.shape[3])
  dense = segment_ids is None and window is None and softcap is None
  # The Mosaic GPU kernels' calls: dense ones and causal sliding windows.
  mosaic_masks = segment_ids is None and softcap is None and (window is None or bool(causal))
  path = resolve_impl(impl, "attention", pallas_unsupported=pallas_unsupported)
  if path == "pallas" and impl == "auto" and dense and _cudnn_supports(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=bool(causal),
                                        implementation="cudnn")
  if path == "pallas" and mosaic_masks and _use_mosaic_kernel(q, k, v, bool(causal), window):
    return mgpu_kernel.flash_attention(q, k, v, causal=bool(causal), window=window, scale=scale,
                                       interpret=pallas_interpret())
  if path == "pallas":
    return flash_kernel.flash_attention(
        q, k, v, None if q_seg is None else (q_seg, kv_seg), causal=bool(causal), window=window,
        softcap=softcap, scale=scale, interpret=pallas_interpret())

  out_dtype = q.dtype
  dtype = jnp.result_type(q.dtype, k.dtype, v.dtype, jnp.float32)
  q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
  tiling = _Tiling(causal=bool(causal), window=window, softcap=softcap,
                   block_q=min(block_q, tq), block_k=min(block_k, tk))
  if path == "reference":
    o = _attention_reference(q * scale, k, v, q_offset, kv_limit, q_seg, kv_seg, tiling)
  else:
    o = _attention_blockwise(q * scale, k, v, q_offset, kv_limit, q_seg, kv_seg, tiling)
  return o.astype(out_dtype)


# ---------------------------------------------------------------------------------------------
# Which calls the Pallas kernel and cuDNN cover.


def _pallas_unsupported(q, k, v, *, q_offset, kv_length) -> str | None:
  """None when the Pallas training kernel covers the call, else the reason it does not.

  `q_offset` is the caller's argument (before validation); a traced one is not covered.
  """
  if q.shape[1] != k.shape[1]:
    return f"Tq ({q.shape[1]}) != Tk ({k.shape[1]}) (decode / chunked prefill)"
  if kv_length is not None:
    return "kv_length is not supported (decode / chunked prefill)"
  if is_traced(q_offset) or np.any(np.asarray(q_offset) != 0):
    return "q_offset other than 0 is not supported (decode / chunked prefill)"
  if not q.dtype == k.dtype == v.dtype:
    return f"q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})"
  return flash_kernel.unsupported_reason(q.shape[3], v.shape[3], q.dtype)


FLASH_KERNEL_ENV = "JAXCHUNK_FLASH_KERNEL"
FLASH_KERNELS = ("auto", "mosaic", "triton")


def _use_mosaic_kernel(q, k, v, causal: bool, window: int | None = None) -> bool:
  """Whether an impl="pallas" call without segment ids or soft-cap (dense, or a causal sliding
  window) runs the Mosaic GPU (Hopper) kernel instead of Triton's.

  The environment variable JAXCHUNK_FLASH_KERNEL picks: "auto" (default) the Mosaic kernel on GPUs
  of compute capability 9.x when it covers the call; "mosaic" always (interpret mode off GPU),
  raising NotImplementedError when it does not cover the call; "triton" never.
  """
  choice = os.environ.get(FLASH_KERNEL_ENV, "auto")
  if choice not in FLASH_KERNELS:
    raise ValueError(f"{FLASH_KERNEL_ENV} must be one of {FLASH_KERNELS}, got {choice!r}")
  if choice == "triton":
    return False
  reason = mgpu_kernel.unsupported_reason(q.shape, k.shape, v.shape, q.dtype, causal=causal,
                                         window=window)
  if choice == "mosaic":
    if reason is not None:
      raise NotImplementedError(f"attention: {FLASH_KERNEL_ENV}=mosaic but the Mosaic GPU kernel "
                                f"does not cover this call: {reason}")
    return True
  return reason is None and _is_hopper()


def _is_hopper() -> bool:
  """Whether the default device is a GPU of compute capability 9.x."""
  if jax.default_backend() != "gpu":
    return False
  return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def _cudnn_supports(q, k, v) -> bool:
  """Whether cuDNN's fused attention runs this dense, training-shaped call without a mask.

  cuDNN refuses odd sequence lengths in training (jax's `check_is_flash_attention`: "Unsupported
  sequence length"), e.g. the 1365 tokens a Mixture-of-Recursions depth gathers from 2048.
  """
  return (jnp.dtype(q.dtype).name in ("bfloat16", "float16") and q.shape[3] == v.shape[3]
          and q.shape[3] in (64, 128) and q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)


# ---------------------------------------------------------------------------------------------
# Argument checks.


def _check_qkv(q, k, v):
  """Validates q [B,Tq,H,D], k [B,Tk,Hk,D], v [B,Tk,Hk,Dv], Hk dividing H. Returns (B, Tq, Tk)."""
  check_rank(q, 4, "q", "[batch, q_seq, heads, head_dim]")
  check_rank(k, 4, "k", "[batch, kv_seq, kv_heads, head_dim]")
  check_rank(v, 4, "v", "[batch, kv_seq, kv_heads, head_dim_v]")
  b, tq, h, d = q.shape
  if k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f"k must have shape [{b}, kv_seq, kv_heads, {d}] to match q {q.shape}, "
                     f"got {k.shape}")
  if v.shape[:3] != k.shape[:3]:
    raise ValueError(f"v must have shape [{', '.join(map(str, k.shape[:3]))}, head_dim_v] to "
                     f"match k {k.shape}, got {v.shape}")
  if h % k.shape[2]:
    raise ValueError(f"the heads of k/v ({k.shape[2]}) must divide the heads of q ({h})")
  return b, tq, k.shape[1]


def _check_ids(x, shape: tuple, name: str):
  """Checks an integer array of `shape`; returns it as int32."""
  x = jnp.asarray(x)
  if x.shape != shape or not jnp.issubdtype(x.dtype, jnp.integer):
    raise ValueError(f"{name} must be an integer array of shape {list(shape)}, "
                     f"got {x.dtype}{list(x.shape)}")
  return x.astype(jnp.int32)


def _split_segment_ids(segment_ids, b: int, tq: int, tk: int):
  """Returns (q_segment_ids [B, Tq], kv_segment_ids [B, Tk]) as int32, or (None, None)."""
  if segment_ids is None:
    return None, None
  if isinstance(segment_ids, (tuple, list)):
    if len(segment_ids) != 2:
      raise ValueError("segment_ids must be an int array [batch, seq] or a pair (q_segment_ids "
                       f"[{b}, {tq}], kv_segment_ids [{b}, {tk}]), got {len(segment_ids)} arrays")
    return (_check_ids(segment_ids[0], (b, tq), "q_segment_ids (segment_ids[0])"),
            _check_ids(segment_ids[1], (b, tk), "kv_segment_ids (segment_ids[1])"))
  if tq != tk:
    raise ValueError(f"segment_ids as one array requires Tq == Tk, got Tq={tq}, Tk={tk}; pass "
                     "a pair (q_segment_ids, kv_segment_ids) instead")
  ids = _check_ids(segment_ids, (b, tq), "segment_ids")
  return ids, ids


def _per_batch_int(x, b: int, name: str):
  """An int or int array [B] as an int32 array [B]."""
  x = jnp.asarray(x)
  if x.ndim == 0 and jnp.issubdtype(x.dtype, jnp.integer):
    return jnp.full((b,), x, jnp.int32)
  if x.ndim == 0:
    raise ValueError(f"{name} must be an int or an int array of shape [{b}], got {x.dtype}")
  return _check_ids(x, (b,), name)


def _check_window(window):
  if window is None:
    return None
  try:
    window = operator.index(window)
  except TypeError:
    raise ValueError(f"window must be a Python int >= 1 or None, got {window!r}") from None
  if window < 1:
    raise ValueError(f"window must be >= 1, got {window}")
  return window


def _check_softcap(softcap):
  if softcap is None:
    return None
  if is_traced(softcap) or jnp.ndim(softcap) != 0:
    raise ValueError(f"softcap must be a concrete positive number or None, got {softcap!r}")
  softcap = float(softcap)
  if not softcap > 0:
    raise ValueError(f"softcap must be > 0, got {softcap}")
  return softcap


def _check_block(block, name: str) -> int:
  try:
    block = operator.index(block)
  except TypeError:
    raise ValueError(f"{name} must be a positive int, got {block!r}") from None
  if block < 1:
    raise ValueError(f"{name} must be a positive int, got {block}")
  return block


# ---------------------------------------------------------------------------------------------
# Masks and logits shared by both paths.


def _token_mask(q_pos, k_pos, kv_limit, q_seg, kv_seg, tiling: _Tiling):
  """Which (query, key) pairs may attend.

  q_pos [B, tq] and k_pos [tk] are positions, kv_limit [B] the number of valid keys, q_seg [B, tq]
  and kv_seg [B, tk] segment ids or None. Returns a bool mask broadcastable to [B, tq, tk].
  """
  qp = q_pos[:, :, None]
  kp = k_pos[None, None, :]
  mask = kp < kv_limit[:, None, None]
  if tiling.causal:
    mask = mask & (kp <= qp)
  if tiling.window is not None:
    mask = mask & (qp - kp < tiling.window)
    if not tiling.causal:
      mask = mask & (kp - qp < tiling.window)
  if q_seg is not None:
    mask = mask & (q_seg[:, :, None] == kv_seg[:, None, :])
  return mask


def _softcapped(s, softcap):
  return s if softcap is None else softcap * jnp.tanh(s / softcap)


# ---------------------------------------------------------------------------------------------
# Reference: dense softmax.


def _attention_reference(q, k, v, q_offset, kv_limit, q_seg, kv_seg, tiling: _Tiling):
  """Dense masked softmax: q [B,Tq,H,D] (pre-scaled), k/v [B,Tk,Hk,D/Dv] -> o [B,Tq,H,Dv]."""
  h, tq, tk = q.shape[2], q.shape[1], k.shape[1]
  k, v = repeat_heads(k, h), repeat_heads(v, h)
  s = _softcapped(jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=_HIGHEST), tiling.softcap)
  q_pos = q_offset[:, None] + jnp.arange(tq, dtype=jnp.int32)
  mask = _token_mask(q_pos, jnp.arange(tk, dtype=jnp.int32), kv_limit, q_seg, kv_seg, tiling)
  s = jnp.where(mask[:, None], s, -jnp.inf)
  row_max = lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
  p = jnp.exp(s - jnp.where(jnp.isneginf(row_max), 0.0, row_max))
  denom = jnp.sum(p, axis=-1, keepdims=True)
  p = p / jnp.where(denom > 0, denom, 1.0)
  return jnp.einsum("bhqk,bkhd->bqhd", p, v, precision=_HIGHEST)


# ---------------------------------------------------------------------------------------------
# Blockwise (FlashAttention) path. Inside it q is grouped as [B, Hk, G, Tq, D] (G = H // Hk query
# heads per kv head), k and v are [B, Hk, Tk, D], and Tq / Tk are multiples of the block sizes.


def _attention_blockwise(q, k, v, q_offset, kv_limit, q_seg, kv_seg, tiling: _Tiling):
  """Pads, groups heads and runs the custom-VJP blockwise kernel. Shapes as _attention_reference."""
  b, tq, h, d = q.shape
  hk, dv = k.shape[2], v.shape[3]
  g = h // hk
  q, _ = pad_seq(q, tiling.block_q)
  k, _ = pad_seq(k, tiling.block_k)
  v, _ = pad_seq(v, tiling.block_k)
  if q_seg is not None:
    q_seg, _ = pad_seq(q_seg, tiling.block_q)
    kv_seg, _ = pad_seq(kv_seg, tiling.block_k)
  q = q.reshape(b, q.shape[1], hk, g, d).transpose(0, 2, 3, 1, 4)
  k = k.transpose(0, 2, 1, 3)
  v = v.transpose(0, 2, 1, 3)
  o = _flash(tiling, q, k, v, q_offset, kv_limit, q_seg, kv_seg)
  o = o.transpose(0, 3, 1, 2, 4).reshape(b, -1, h, dv)
  return o[:, :tq]


def _block_range(first, last, block: int):
  """Blocks [lo, hi) covering indices first..last (first >= 0); empty when last < first."""
  lo = first // block
  hi = jnp.where(last >= first, last // block + 1, lo)
  return lo.astype(jnp.int32), hi.astype(jnp.int32)


def _kv_block_range(tiling: _Tiling, iq, q_offset, kv_limit):
  """Key blocks [lo, hi) holding a key that some query of query block `iq` may attend to."""
  pos_first = jnp.min(q_offset) + iq * tiling.block_q
  pos_last = jnp.max(q_offset) + (iq + 1) * tiling.block_q - 1
  key_first = jnp.zeros((), jnp.int32)
  key_last = jnp.max(kv_limit) - 1
  if tiling.causal:
    key_last = jnp.minimum(key_last, pos_last)
  if tiling.window is not None:
    key_first = jnp.maximum(key_first, pos_first - tiling.window + 1)
    if not tiling.causal:
      key_last = jnp.minimum(key_last, pos_last + tiling.window - 1)
  return _block_range(key_first, key_last, tiling.block_k)


def _q_block_range(tiling: _Tiling, jk, q_offset, kv_limit, num_q_rows: int):
  """Query blocks [lo, hi) holding a query that may attend to some key of key block `jk`."""
  key_first = jk * tiling.block_k
  key_last = jnp.minimum(key_first + tiling.block_k, jnp.max(kv_limit)) - 1
  off_min, off_max = jnp.min(q_offset), jnp.max(q_offset)
  row_first = jnp.zeros((), jnp.int32)
  row_last = jnp.full((), num_q_rows - 1, jnp.int32)
  if tiling.causal:
    row_first = jnp.maximum(row_first, key_first - off_max)
  if tiling.window is not None:
    row_last = jnp.minimum(row_last, key_last + tiling.window - 1 - off_min)
    if not tiling.causal:
      row_first = jnp.maximum(row_first, key_first - tiling.window + 1 - off_max)
  lo, hi = _block_range(row_first, row_last, tiling.block_q)
  return lo, jnp.where(key_last >= key_first, hi, lo)


def _tile_mask(tiling: _Tiling, iq, jk, q_offset, kv_limit, q_seg, kv_seg):
  """Mask of query block `iq` x key block `jk`, broadcastable to [B, 1, 1, block_q, block_k]."""
  bq, bk = tiling.block_q, tiling.block_k
  q_pos = q_offset[:, None] + iq * bq + jnp.arange(bq, dtype=jnp.int32)
  k_pos = jk * bk + jnp.arange(bk, dtype=jnp.int32)
  if q_seg is not None:
    q_seg = lax.dynamic_slice_in_dim(q_seg, iq * bq, bq, axis=1)
    kv_seg = lax.dynamic_slice_in_dim(kv_seg, jk * bk, bk, axis=1)
  return _token_mask(q_pos, k_pos, kv_limit, q_seg, kv_seg, tiling)[:, None, None]


def _flash_forward(tiling: _Tiling, q, k, v, q_offset, kv_limit, q_seg, kv_seg):
  """Online-softmax forward over tiles.

  q [B,Hk,G,Tq,D] (pre-scaled), k [B,Hk,Tk,D], v [B,Hk,Tk,Dv]. Returns o [B,Hk,G,Tq,Dv] and the
  row log-sum-exp lse [B,Hk,G,Tq], +inf on rows without a valid key (so exp(s - lse) = 0 there).
  """
  bq, bk = tiling.block_q, tiling.block_k
  b, hk, g, tq, _ = q.shape
  dv = v.shape[3]

  def query_block(iq):
    qb = lax.dynamic_slice_in_dim(q, iq * bq, bq, axis=3)

    def key_block(jk, carry):
      row_max, row_sum, acc = carry
      kb = lax.dynamic_slice_in_dim(k, jk * bk, bk, axis=2)
      vb = lax.dynamic_slice_in_dim(v, jk * bk, bk, axis=2)
      s = _softcapped(jnp.einsum("bhgqd,bhkd->bhgqk", qb, kb, precision=_HIGHEST), tiling.softcap)
      s = jnp.where(_tile_mask(tiling, iq, jk, q_offset, kv_limit, q_seg, kv_seg), s, -jnp.inf)
      new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
      shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
      p = jnp.exp(s - shift[..., None])
      rescale = jnp.exp(row_max - shift)
      acc = rescale[..., None] * acc + jnp.einsum("bhgqk,bhkd->bhgqd", p, vb, precision=_HIGHEST)
      return new_max, rescale * row_sum + jnp.sum(p, axis=-1), acc

    init = (jnp.full((b, hk, g, bq), -jnp.inf, q.dtype), jnp.zeros((b, hk, g, bq), q.dtype),
            jnp.zeros((b, hk, g, bq, dv), q.dtype))
    lo, hi = _kv_block_range(tiling, iq, q_offset, kv_limit)
    row_max, row_sum, acc = lax.fori_loop(lo, hi, key_block, init)
    empty = row_sum == 0
    safe_sum = jnp.where(empty, 1.0, row_sum)
    lse = jnp.where(empty, jnp.inf, row_max + jnp.log(safe_sum))
    return acc / safe_sum[..., None], lse

  o, lse = lax.map(query_block, jnp.arange(tq // bq, dtype=jnp.int32))
  o = jnp.moveaxis(o, 0, 3).reshape(b, hk, g, tq, dv)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, hk, g, tq)
  return o, lse


def _flash_backward(tiling: _Tiling, residuals, do):
  """FlashAttention-2 backward: recomputes each tile's probabilities from the saved lse.

  Loops over key blocks (accumulating that block's dk, dv) and, inside, over the query blocks that
  can see it (accumulating dq in place). Returns (dq, dk, dv) shaped like (q, k, v).
  """
  q, k, v, o, lse, q_offset, kv_limit, q_seg, kv_seg = residuals
  bq, bk = tiling.block_q, tiling.block_k
  b, hk, _, tq, d = q.shape
  tk, d_v = v.shape[2], v.shape[3]
  delta = jnp.sum(do * o, axis=-1)  # [B, Hk, G, Tq]

  def key_block(dq, jk):
    kb = lax.dynamic_slice_in_dim(k, jk * bk, bk, axis=2)
    vb = lax.dynamic_slice_in_dim(v, jk * bk, bk, axis=2)

    def query_block(iq, carry):
      dk_b, dv_b, dq = carry
      qb, dob = (lax.dynamic_slice_in_dim(x, iq * bq, bq, axis=3) for x in (q, do))
      lse_b, delta_b = (lax.dynamic_slice_in_dim(x, iq * bq, bq, axis=3) for x in (lse, delta))
      s = jnp.einsum("bhgqd,bhkd->bhgqk", qb, kb, precision=_HIGHEST)
      if tiling.softcap is not None:
        tanh_s = jnp.tanh(s / tiling.softcap)
        s = tiling.softcap * tanh_s
      mask = _tile_mask(tiling, iq, jk, q_offset, kv_limit, q_seg, kv_seg)
      p = jnp.where(mask, jnp.exp(s - lse_b[..., None]), 0.0)
      dv_b = dv_b + jnp.einsum("bhgqk,bhgqd->bhkd", p, dob, precision=_HIGHEST)
      dp = jnp.einsum("bhgqd,bhkd->bhgqk", dob, vb, precision=_HIGHEST)
      ds = p * (dp - delta_b[..., None])
      if tiling.softcap is not None:
        ds = ds * (1.0 - tanh_s * tanh_s)
      dk_b = dk_b + jnp.einsum("bhgqk,bhgqd->bhkd", ds, qb, precision=_HIGHEST)
      dq_b = lax.dynamic_slice_in_dim(dq, iq * bq, bq, axis=3)
      dq_b = dq_b + jnp.einsum("bhgqk,bhkd->bhgqd", ds, kb, precision=_HIGHEST)
      return dk_b, dv_b, lax.dynamic_update_slice_in_dim(dq, dq_b, iq * bq, axis=3)

    init = (jnp.zeros((b, hk, bk, d), q.dtype), jnp.zeros((b, hk, bk, d_v), q.dtype), dq)
    lo, hi = _q_block_range(tiling, jk, q_offset, kv_limit, tq)
    dk_b, dv_b, dq = lax.fori_loop(lo, hi, query_block, init)
    return dq, (dk_b, dv_b)

  dq, (dk, dv) = lax.scan(key_block, jnp.zeros_like(q), jnp.arange(tk // bk, dtype=jnp.int32))
  dk = jnp.moveaxis(dk, 0, 2).reshape(b, hk, tk, d)
  dv = jnp.moveaxis(dv, 0, 2).reshape(b, hk, tk, d_v)
  return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(tiling: _Tiling, q, k, v, q_offset, kv_limit, q_seg, kv_seg):
  """Blockwise attention on grouped, padded inputs (see _flash_forward); returns o."""
  return _flash_forward(tiling, q, k, v, q_offset, kv_limit, q_seg, kv_seg)[0]


def _flash_fwd(tiling: _Tiling, q, k, v, q_offset, kv_limit, q_seg, kv_seg):
  o, lse = _flash_forward(tiling, q, k, v, q_offset, kv_limit, q_seg, kv_seg)
  return o, (q, k, v, o, lse, q_offset, kv_limit, q_seg, kv_seg)


def _flash_bwd(tiling: _Tiling, residuals, do):
  dq, dk, dv = _flash_backward(tiling, residuals, do)
  return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
