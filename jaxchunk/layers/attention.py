"""Softmax-attention token mixer: global causal or sliding-window, GQA, RoPE and a KV cache.

Parameters (logical axes):
  q_proj/kernel [d_model, H, Dh]: ("embed", "heads", "head_dim");
  k_proj/kernel, v_proj/kernel [d_model, Hk, Dh]: ("embed", "kv_heads", "head_dim");
  o_proj/kernel [H, Dh, d_model]: ("heads", "head_dim", "embed").

The cache is {"k": [B, max_len, Hk, Dh], "v": [B, max_len, Hk, Dh]}: rotated keys and values of every
position written so far. A call with T tokens writes them at rows positions[:, 0] .. + T - 1 (per
batch row) and attends to the keys before positions[:, 0] + T. The sliding window masks older keys
but the cache still holds max_len positions.

Sequence-parallel (an active `SequenceParallel`, no cache): x and positions are in the layout order
of the sequence axis and the layer runs `SequenceParallel.attention` (ring or Ulysses attention)
with the same causal, window and segment_ids masks; rotary embeddings use the given positions.

A paged cache (for the serving engine) is {"k_pages", "v_pages": [num_pages, page_size, Hk, Dh],
"page_table": int32 [B, pages_per_seq]}: the keys of row b at position p live in page
page_table[b, p // page_size] (see `jaxchunk.ops.paged_attention`); pages are shared by all rows.

Streams (`jaxchunk.layers.streams`, the serving engine's mixed steps): x [1, N, d_model] holds
the tokens of several streams and the cache is a tuple of paged caches, one per stream, over the
same pools (each with the stream's page table). Every stream's keys and values are written to
the pools first, then each stream attends through its page table, so no pool is read before its
last write; each returned cache holds the final pools.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxchunk.layers import streams as streams_lib
from jaxchunk.layers.packing import packed_projections
from jaxchunk.layers.rotary import apply_rotary
from jaxchunk.config import ModelConfig
from jaxchunk.ops.attention import attention
from jaxchunk.ops.paged_attention import (chunked_prefill_attention, paged_slots, paged_write,
                                          paged_write_slots)
from jaxchunk.parallel.api import SequenceParallel, active_sequence_parallel


# q, k and v packed for serving (`jaxchunk.layers.packing`).
PACKED_NAME, PACKED_PARTS = "qkv_proj", ("q_proj", "k_proj", "v_proj")


def project(x: jax.Array, features: tuple[int, ...], axes: tuple, *, name: str, config: ModelConfig,
            in_axes: tuple = ("embed",), use_bias: bool = False,
            bias_init=nn.initializers.zeros) -> jax.Array:
  """A bias-free (unless `use_bias`) projection of x's last len(in_axes) dims to `features`.

  The kernel has logical axes in_axes + axes, the bias `axes`; compute in config.dtype.
  """
  return nn.DenseGeneral(
      features, axis=tuple(range(-len(in_axes), 0)), use_bias=use_bias, name=name,
      dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), in_axes + axes),
      bias_init=nn.with_logical_partitioning(bias_init, axes))(x)


def check_mixer_input(x: jax.Array, positions: jax.Array, config: ModelConfig) -> None:
  """Validates x [B,T,d_model] and positions [B,T] of a token mixer's call."""
  if x.ndim != 3 or x.shape[-1] != config.d_model:
    raise ValueError(f"x must have shape [batch, seq, {config.d_model}], got {x.shape}")
  if jnp.shape(positions) != x.shape[:2]:
    raise ValueError(f"positions must have shape [batch, seq] = {x.shape[:2]}, "
                     f"got {jnp.shape(positions)}")


def init_attention_cache(config: ModelConfig, batch: int, max_len: int, dtype) -> dict:
  """The empty KV cache of an `Attention` layer: {"k", "v"} zeros [B, max_len, Hk, Dh] in `dtype`."""
  shape = (batch, max_len, config.num_kv_heads, config.head_dim)
  return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}


def _write_cache(cache: jax.Array, update: jax.Array, starts: jax.Array) -> jax.Array:
  """Writes update [B,T,Hk,Dh] into cache [B,L,Hk,Dh] at rows starts[b] .. starts[b] + T - 1."""
  write_row = lambda row, new, start: jax.lax.dynamic_update_slice(row, new, (start, 0, 0))
  return jax.vmap(write_row)(cache, update.astype(cache.dtype), starts)


def _attend_streams(q, k, v, positions, caches: tuple, streams, *, window, impl):
  """Streams form of the paged branch: q [1,N,H,Dh], k/v [1,N,Hk,Dh], positions [1,N], one paged
  cache per stream over the same pools. Returns (o [1,N,H,Dh], the per-stream new caches)."""
  qs, ps = streams_lib.split(q, streams), streams_lib.split(positions, streams)
  k_pages, v_pages = caches[0]["k_pages"], caches[0]["v_pages"]
  # Every stream's keys in one scatter per pool (the row holds them in the streams' order). No two
  # streams write one slot: a slot's row decodes or takes a piece, never both, and only the
  # scratch page is shared.
  page_size = k_pages.shape[1]
  slots = jnp.concatenate([paged_slots(cache["page_table"], p_i, page_size)
                           for p_i, cache in zip(ps, caches)])
  k_pages, v_pages = paged_write_slots(k_pages, v_pages, k[0], v[0], slots)
  o = streams_lib.join([
      chunked_prefill_attention(q_i, k_pages, v_pages, cache["page_table"],
                                p_i[:, 0].astype(jnp.int32), window=window, impl=impl)
      for q_i, p_i, cache in zip(qs, ps, caches)])
  return o, tuple({"k_pages": k_pages, "v_pages": v_pages, "page_table": cache["page_table"]}
                  for cache in caches)


def _check_cache(cache: dict, batch: int, config: ModelConfig) -> None:
  """Validates a dense {"k", "v"} or paged {"k_pages", "v_pages", "page_table"} KV cache."""
  hk, dh = config.num_kv_heads, config.head_dim
  if "page_table" in cache:
    pool = cache["k_pages"].shape
    if len(pool) != 4 or pool[2:] != (hk, dh):
      raise ValueError(f"cache['k_pages'] must have shape [num_pages, page_size, {hk}, {dh}], "
                       f"got {pool}")
    if cache["v_pages"].shape != pool:
      raise ValueError(f"cache['v_pages'] must have the shape of cache['k_pages'] {pool}, "
                       f"got {cache['v_pages'].shape}")
    if cache["page_table"].ndim != 2 or cache["page_table"].shape[0] != batch:
      raise ValueError(f"cache['page_table'] must have shape [{batch}, pages_per_seq], "
                       f"got {cache['page_table'].shape}")
    return
  expected = (batch, cache["k"].shape[1], hk, dh)
  for name in ("k", "v"):
    if cache[name].shape != expected:
      raise ValueError(f"cache[{name!r}] must have shape [batch, max_len, kv_heads, head_dim] = "
                       f"{expected}, got {cache[name].shape}")


class Attention(nn.Module):
  """Causal multi-head softmax attention with GQA and rotary positions.

  Attributes:
    config: the model configuration (heads, head_dim, rope_theta, dtype, impl).
    window: None for global attention, else each query sees the keys within `window` positions back.
  """

  config: ModelConfig
  window: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids=None, cache=None,
               sequence_parallel: SequenceParallel | None = None,
               streams: streams_lib.Streams | None = None):
    """x [B,T,d_model], positions [B,T] int32 -> (y [B,T,d_model], new cache or None).

    Without a cache the T tokens attend causally among themselves (within their document when
    `segment_ids` [B,T] is given); with an active `sequence_parallel` they are in its layout order
    (positions too) and attend sequence-parallel. With a cache (from `init_attention_cache`) they are written at
    positions[:, 0] onwards and attend to everything cached before them: T > 1 is a chunked prefill,
    T == 1 a decode step. positions[:, 0] + T must not exceed the cache length. A paged cache
    (see the module docstring) works the same, writing to and reading from the row's pages.
    """
    cfg = self.config
    check_mixer_input(x, positions, cfg)
    sp = active_sequence_parallel(sequence_parallel, cache, "Attention")
    h, hk, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    if cache is not None and segment_ids is not None:
      raise ValueError("Attention: segment_ids (packed documents) cannot be combined with a cache")
    if streams is not None:
      streams_lib.check_streams(streams, x, cache)
      for (b, _), stream_cache in zip(streams, cache):
        if not isinstance(stream_cache, dict) or "page_table" not in stream_cache:
          raise ValueError("Attention: streams need paged caches (k_pages, v_pages, page_table)")
        _check_cache(stream_cache, b, cfg)
    elif cache is not None:
      _check_cache(cache, x.shape[0], cfg)
    x = x.astype(jnp.dtype(cfg.dtype))
    packed = packed_projections(self, x, PACKED_NAME, [(h, dh), (hk, dh), (hk, dh)], cfg.dtype)
    if packed is not None:
      q, k, v = packed
    else:
      q = project(x, (h, dh), ("heads", "head_dim"), name="q_proj", config=cfg)
      k = project(x, (hk, dh), ("kv_heads", "head_dim"), name="k_proj", config=cfg)
      v = project(x, (hk, dh), ("kv_heads", "head_dim"), name="v_proj", config=cfg)
    q = apply_rotary(q, positions, theta=cfg.rope_theta)
    k = apply_rotary(k, positions, theta=cfg.rope_theta)

    if streams is not None:
      o, new_cache = _attend_streams(q, k, v, positions, cache, streams, window=self.window,
                                     impl=cfg.impl)
    elif sp is not None:
      o = sp.attention(q, k, v, causal=True, segment_ids=segment_ids, window=self.window)
      new_cache = None
    elif cache is None:
      o = attention(q, k, v, causal=True, segment_ids=segment_ids, window=self.window,
                    impl=cfg.impl)
      new_cache = None
    elif "page_table" in cache:
      start = positions[:, 0].astype(jnp.int32)
      k_pages, v_pages = paged_write(cache["k_pages"], cache["v_pages"], k, v, cache["page_table"],
                                     positions)
      new_cache = {"k_pages": k_pages, "v_pages": v_pages, "page_table": cache["page_table"]}
      o = chunked_prefill_attention(q, k_pages, v_pages, cache["page_table"], start,
                                    window=self.window, impl=cfg.impl)
    else:
      start = positions[:, 0].astype(jnp.int32)
      new_cache = {"k": _write_cache(cache["k"], k, start), "v": _write_cache(cache["v"], v, start)}
      o = attention(q, new_cache["k"].astype(q.dtype), new_cache["v"].astype(q.dtype), causal=True,
                    window=self.window, q_offset=start, kv_length=start + x.shape[1],
                    impl=cfg.impl)
    y = project(o, (cfg.d_model,), ("embed",), name="o_proj", config=cfg,
                in_axes=("heads", "head_dim"))
    return y, new_cache
