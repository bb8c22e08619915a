"""Attention over a paged KV cache: chunked prefill and decode for a serving engine.

The keys and values of every sequence live in a shared pool of fixed-size pages,
k_pages / v_pages [num_pages, page_size, Hk, D]; row b of `page_table` [B, pages_per_seq] lists the
pages of sequence b in order, so its key at position p sits in page page_table[b, p // page_size]
at offset p % page_size. Entries past a sequence's length may name any page (the engine uses page
0, a scratch page never handed to a sequence): those keys are masked.

`paged_write` stores new keys/values, `chunked_prefill_attention` attends T new queries at
positions q_offset[b] .. q_offset[b] + T - 1 to the keys before q_offset[b] + T, and
`paged_decode_attention` is its T = 1 form. With `q_length` [B] only the first q_length[b] query
slots of row b are real (the rest output zeros), so one call can mix decode rows (q_length 1) and
prefill chunks of different lengths (a ragged batch).

Paths: "reference" and "xla" gather the pages of each row into a contiguous
[B, pages_per_seq * page_size, Hk, D] view and run `jaxchunk.ops.attention.attention` (its dense
reference or its blockwise FlashAttention-2 path) with per-row offsets and lengths; GQA as in that
op. "pallas" runs the Triton kernel of `pallas_kernels.gpu.paged_attention`, which reads the pages
in place through the page table (each page once per kv head and block of query rows, only the pages
inside the row's causal / length / window range), folds each GQA group into the rows of one dot and
splits long contexts over several programs (split-K, merged by log-sum-exp). It covers head_dim 64,
128, 256, any page_size and q and pools in bfloat16, float16 or float32 (forward only: serving);
window, softcap and q_length included. "auto" picks it on GPU for those calls, else "xla". On CPU "pallas" runs the
kernel in interpret mode (tests).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxchunk.ops._common import check_rank, check_shape, default_scale, pallas_interpret
from jaxchunk.ops._common import resolve_impl
from jaxchunk.ops.attention import _check_softcap, _check_window, attention
from pallas_kernels.gpu import paged_attention as paged_kernel


def _check_pages(k_pages, v_pages, page_table, batch: int):
  """Validates the pools and the page table; returns (page_size, Hk, D)."""
  check_rank(k_pages, 4, "k_pages", "[num_pages, page_size, kv_heads, head_dim]")
  check_shape(v_pages, k_pages.shape, "v_pages", "[num_pages, page_size, kv_heads, head_dim]")
  check_rank(page_table, 2, "page_table", "[batch, pages_per_seq]")
  if page_table.shape[0] != batch:
    raise ValueError(f"page_table must have shape [batch, pages_per_seq] with batch = {batch}, "
                     f"got {page_table.shape}")
  if not jnp.issubdtype(page_table.dtype, jnp.integer):
    raise ValueError(f"page_table must hold integer page indices, got dtype {page_table.dtype}")
  _, page_size, hk, d = k_pages.shape
  return page_size, hk, d


def _per_row(x, batch: int, name: str) -> jax.Array:
  """An int scalar or [batch] array as int32 [batch]."""
  x = jnp.asarray(x)
  if x.ndim == 0:
    x = jnp.broadcast_to(x, (batch,))
  check_shape(x, (batch,), name, "[batch] (or a scalar)")
  return x.astype(jnp.int32)


def gather_pages(pages: jax.Array, page_table: jax.Array) -> jax.Array:
  """The contiguous view [B, pages_per_seq * page_size, Hk, D] of pages [P, page_size, Hk, D]."""
  b, n = page_table.shape
  _, page_size, hk, d = pages.shape
  return pages[page_table].reshape(b, n * page_size, hk, d)


def paged_write(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
                page_table: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes k, v [B,T,Hk,D] at `positions` [B,T] of each row's pages; returns the new pools.

  Positions must be below pages_per_seq * page_size. Rows whose page-table entries name the same
  page (the engine's scratch page 0 for idle rows) overwrite each other there.
  """
  b, t = positions.shape
  page_size, hk, d = _check_pages(k_pages, v_pages, page_table, b)
  check_shape(k, (b, t, hk, d), "k", "[batch, seq, kv_heads, head_dim]")
  check_shape(v, (b, t, hk, d), "v", "[batch, seq, kv_heads, head_dim]")
  return paged_write_slots(k_pages, v_pages, k.reshape(b * t, hk, d), v.reshape(b * t, hk, d),
                           paged_slots(page_table, positions, page_size))


def paged_slots(page_table: jax.Array, positions: jax.Array, page_size: int) -> jax.Array:
  """The slots [B*T] of the flat pool [num_pages * page_size] that positions [B,T] of each row
  map to through page_table [B, pages_per_seq] (row-major, as k.reshape(B*T, ...))."""
  positions = positions.astype(jnp.int32)
  page = jnp.take_along_axis(page_table.astype(jnp.int32), positions // page_size, axis=1)
  return (page * page_size + positions % page_size).reshape(-1)


def paged_write_slots(k_pages: jax.Array, v_pages: jax.Array, k: jax.Array, v: jax.Array,
                      slots: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Writes k, v [N,Hk,D] at the flat pool slots [N] (`paged_slots`, possibly of several page
  tables concatenated: one scatter per pool for all of them); returns the new pools.

  The scatter tells XLA the slots are unique, so that it stores without atomic updates. A slot
  written twice (the engine's scratch page, where idle rows write) then holds, per element, one
  of the values written to it (XLA: implementation-defined).
  """
  check_rank(k_pages, 4, "k_pages", "[num_pages, page_size, kv_heads, head_dim]")
  num_pages, page_size, hk, d = k_pages.shape
  check_shape(v_pages, k_pages.shape, "v_pages", "[num_pages, page_size, kv_heads, head_dim]")
  check_rank(slots, 1, "slots", "[tokens]")
  check_shape(k, (slots.shape[0], hk, d), "k", "[tokens, kv_heads, head_dim]")
  check_shape(v, (slots.shape[0], hk, d), "v", "[tokens, kv_heads, head_dim]")

  def write(pool, new):
    pool = pool.reshape(num_pages * page_size, hk, d)
    return pool.at[slots].set(new.astype(pool.dtype), unique_indices=True).reshape(
        num_pages, page_size, hk, d)
  return write(k_pages, k), write(v_pages, v)


def chunked_prefill_attention(q, k_pages, v_pages, page_table, q_offset, *, q_length=None,
                              kv_length=None, window: int | None = None,
                              softcap: float | None = None, scale: float | None = None,
                              num_splits: int | None = None, impl: str = "auto"):
  """Causal attention of T new queries per row to that row's paged keys.

  Args:
    q: [B, T, H, D] queries at positions q_offset[b] + i.
    k_pages, v_pages: [num_pages, page_size, Hk, D] pools (Hk dividing H), already holding the
      keys/values of the new tokens (see `paged_write`).
    page_table: int [B, pages_per_seq].
    q_offset: int or int [B], the position of each row's first query.
    q_length: None (all T), or int or int [B]: row b's queries i >= q_length[b] are padding and
      output zeros (a ragged batch of decodes and prefill chunks).
    kv_length: int or int [B], keys at positions >= kv_length are masked; default
      q_offset + q_length.
    window: None, or a query sees only the keys less than `window` positions back.
    softcap: None, or logits become softcap * tanh(logits / softcap).
    scale: logit scale, default D ** -0.5.
    num_splits: "pallas" path only: the number of parts each row's key range is split into
      (split-K); None picks enough to fill the GPU.
    impl: "auto" | "reference" | "xla" | "pallas".

  Returns:
    o [B, T, H, D] in q's dtype.
  """
  check_rank(q, 4, "q", "[batch, seq, heads, head_dim]")
  b, t, h, d = q.shape
  _, hk, dk = _check_pages(k_pages, v_pages, page_table, b)
  if dk != d or h % hk:
    raise ValueError(f"k_pages must have shape [num_pages, page_size, kv_heads, {d}] with kv_heads "
                     f"dividing {h} (the heads of q), got {k_pages.shape}")
  q_offset = _per_row(q_offset, b, "q_offset")
  q_length = jnp.full((b,), t, jnp.int32) if q_length is None else \
      jnp.clip(_per_row(q_length, b, "q_length"), 0, t)
  kv_length = q_offset + q_length if kv_length is None else _per_row(kv_length, b, "kv_length")
  window = _check_window(window)
  softcap = _check_softcap(softcap)
  if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
    raise ValueError(f"num_splits must be None or a positive int, got {num_splits!r}")
  path = resolve_impl(impl, "chunked_prefill_attention", pallas_unsupported=
                      paged_kernel.unsupported_reason(d, q.dtype, k_pages.dtype))
  if path == "pallas":
    return paged_kernel.paged_attention(
        q, k_pages, v_pages, page_table.astype(jnp.int32), q_offset, q_length, kv_length,
        scale=default_scale(scale, d), window=window, softcap=softcap, num_splits=num_splits,
        interpret=pallas_interpret())
  k = gather_pages(k_pages, page_table).astype(q.dtype)
  v = gather_pages(v_pages, page_table).astype(q.dtype)
  o = attention(q, k, v, causal=True, window=window, softcap=softcap, scale=scale,
                q_offset=q_offset, kv_length=kv_length, impl=path)
  valid = jnp.arange(t, dtype=jnp.int32)[None, :] < q_length[:, None]
  return jnp.where(valid[:, :, None, None], o, jnp.zeros((), o.dtype))


def paged_decode_attention(q, k_pages, v_pages, page_table, lengths, *, window: int | None = None,
                           softcap: float | None = None, scale: float | None = None,
                           num_splits: int | None = None, impl: str = "auto"):
  """One decode token per row: q [B, H, D] at position lengths[b] - 1 -> o [B, H, D].

  `lengths` [B] counts each row's valid keys including the new token (already written to the
  pools). Other arguments as in `chunked_prefill_attention`.
  """
  check_rank(q, 3, "q", "[batch, heads, head_dim]")
  lengths = _per_row(lengths, q.shape[0], "lengths")
  o = chunked_prefill_attention(q[:, None], k_pages, v_pages, page_table, lengths - 1,
                                kv_length=lengths, window=window, softcap=softcap, scale=scale,
                                num_splits=num_splits, impl=impl)
  return o[:, 0]
