"""RAT token mixer (Wei et al., 2025): recurrence inside chunks, softmax attention across chunks.

Follows the layer of the public code (CLAIRE-Labo/RAT, src/model/backbone/rat): projections q, k, v,
a forget gate f = sigmoid(W_f x + b) whose bias starts at log(U(1, chunk_size - 1)), the same gate
on keys and values, rotary positions of the chunk index ("InterRoPE": every token of chunk c is
rotated by angle c, so a query scores the summary of chunk j by the distance c - j), an output gate
sigmoid(W_z x) and an output projection. The op `jaxchunk.ops.rat.rat` runs the recurrence and the
attention.

The public code rotates the keys after the in-chunk recurrence. Here the keys are rotated before the
op, which is the same because the rotation is constant within a chunk, the recurrence restarts at
every chunk, and the gate is tied over each rotated pair of features (feature i and i + head_dim/2),
so the per-feature decay commutes with the rotation.

Parameters (logical axes):
  q_proj/kernel [d_model, H, Dh], z_proj/kernel [d_model, H, Dh]: ("embed", "heads", "head_dim");
  k_proj/kernel, v_proj/kernel [d_model, Hk, Dh]: ("embed", "kv_heads", "head_dim");
  f_proj/kernel [d_model, Hk, Dh/2]: ("embed", "kv_heads", "head_dim"), f_proj/bias [Hk, Dh/2]:
    ("kv_heads", "head_dim");
  o_proj/kernel [H, Dh, d_model]: ("heads", "head_dim", "embed").

The cache is the op's `RATState`: a fixed number of chunk summaries plus the running summary of the
open chunk. Its `length` is a scalar (all rows at the same position, as `init_rat_cache` builds it)
or int32 [B], one length per row (the serving engine's slots): decode steps take it as is, a
prefill runs the op per row (vmap).

Packed documents (`segment_ids`, training and evaluation forwards, sequence-parallel too): every
document is chunked and aggregated as if it ran alone (`jaxchunk.ops.rat.rat`'s segment_ids).

Streams (`jaxchunk.layers.streams`, the serving engine's mixed steps): x [1, N, d_model] holds
the tokens of several streams and the cache is a tuple of `RATState`s, one per stream; each
stream continues its own state as a call with that stream's shape would.

Sequence-parallel (an active `SequenceParallel`, no cache): x and positions are in the layout order
of the sequence axis and the op runs as `SequenceParallel.rat` (chunk summaries shared across
devices); every segment of the layout must hold whole chunks.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxchunk.layers import streams as streams_lib
from jaxchunk.layers.attention import check_mixer_input, project
from jaxchunk.layers.packing import packed_projections
from jaxchunk.layers.rotary import apply_rotary
from jaxchunk.config import ModelConfig
from jaxchunk.ops.rat import RATState, rat, rat_init_state, rat_step
from jaxchunk.parallel.api import SequenceParallel, active_sequence_parallel


# The input projections (q, k, v, f, z) packed for serving (`jaxchunk.layers.packing`).
PACKED_NAME, PACKED_PARTS = "in_proj", ("q_proj", "k_proj", "v_proj", "f_proj", "z_proj")


def forget_bias_init(chunk_size: int):
  """The public code's gate bias: log(u) with u ~ U(1, chunk_size - 1), so sigmoid(b) = u / (1 + u).

  The initial decay then spans 1/2 .. (chunk_size - 1)/chunk_size, memories of 2 to chunk_size tokens.
  """
  high = float(max(chunk_size - 1, 1))

  def init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, 1.0, high)).astype(dtype)
  return init


def init_rat_cache(config: ModelConfig, batch: int, max_len: int, dtype) -> RATState:
  """The empty cache of a `RATLayer`: room for ceil(max_len / rat_chunk_size) chunk summaries.

  The summaries are stored in `dtype` when it is bfloat16 / float16 (half the bytes a decode step
  reads; the Pallas training path attends to bf16 summaries too), else in float32; the running
  aggregates are float32.
  """
  narrow = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  max_chunks = -(-max_len // config.rat_chunk_size)
  return rat_init_state(batch, config.num_kv_heads, config.head_dim, max_chunks,
                        dtype=dtype if narrow else jnp.float32)


def _per_row(op, q, k, v, f, state: RATState):
  """Runs op(q, k, v, f, state) -> (o, RATState) on each batch row when state.length is [B].

  q, k, v, f have the batch axis first; each row runs as a batch of one with a scalar length.
  A batch of one (the serving engine's prefill pieces) runs as it is: under vmap the op's
  dynamic slices and updates at the row's offset would become gathers and scatters.
  """
  if state.length.ndim == 0:
    return op(q, k, v, f, state)
  if q.shape[0] == 1:
    o, new = op(q, k, v, f, state._replace(length=state.length[0]))
    return o, new._replace(length=new.length[None])

  def row(q, k, v, f, state):
    o, new = op(q[None], k[None], v[None], f[None],
                RATState(*(x[None] for x in state[:4]), state.length))
    return o[0], RATState(*(x[0] for x in new[:4]), new.length)
  return jax.vmap(row)(q, k, v, f, state)


def _continue(q, k, v, f, state: RATState, *, chunk_size: int, impl: str):
  """Continues `state` with q [B,T,H,Dh], k/v/f [B,T,Hk,Dh]: T == 1 a decode step (`rat_step`,
  which takes one length per row itself), T > 1 a chunked prefill (per row when the lengths
  are per row). Returns (o like q, the new state)."""
  if q.shape[1] == 1:
    o, new = rat_step(q[:, 0], k[:, 0], v[:, 0], f[:, 0], state, chunk_size=chunk_size, impl=impl)
    return o[:, None], new
  prefill = lambda q, k, v, f, state: rat(
      q, k, v, f, chunk_size=chunk_size, initial_state=state, output_final_state=True,
      max_chunks=state.k_chunks.shape[1], impl=impl)
  return _per_row(prefill, q, k, v, f, state)


class RATLayer(nn.Module):
  """The RAT mixer; see the module docstring. `config.rat_chunk_size` is the chunk length."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids=None, cache=None,
               sequence_parallel: SequenceParallel | None = None,
               streams: streams_lib.Streams | None = None):
    """x [B,T,d_model], positions [B,T] int32 -> (y [B,T,d_model], new `RATState` or None).

    `positions` must be the token indices of the sequence (0 .. T-1 without a cache, in the layout
    order of an active `sequence_parallel`; the cached length onwards with a cache): the op chunks
    tokens by index and the rotary angle is the chunk index positions // rat_chunk_size. With a
    cache T == 1 is a decode step (`rat_step`), T > 1 a chunked prefill continuing the cached
    state; the cache keeps its capacity of chunk summaries. `segment_ids` [B,T] (packed
    documents, no cache; in layout order with `sequence_parallel`) start each document with an
    empty state and its own chunk 0; pass positions restarting at 0 in each document, so that the
    rotary chunk index is the document's. With `streams` (see the module docstring) x is
    [1, N, d_model] and the cache a tuple of per-stream states.
    """
    cfg = self.config
    check_mixer_input(x, positions, cfg)
    if streams is not None:
      streams_lib.check_streams(streams, x, cache)
    sp = active_sequence_parallel(sequence_parallel, cache, "RATLayer")
    if segment_ids is not None and cache is not None:
      raise ValueError("RATLayer: segment_ids (packed documents) cannot be combined with a cache")
    if cfg.head_dim % 2:
      raise ValueError(f"RATLayer needs an even head_dim for its rotary positions, got {cfg.head_dim}")
    h, hk, dh, chunk = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rat_chunk_size
    x = x.astype(jnp.dtype(cfg.dtype))
    packed = packed_projections(self, x, PACKED_NAME,
                                [(h, dh), (hk, dh), (hk, dh), (hk, dh // 2), (h, dh)], cfg.dtype)
    if packed is not None:
      q, k, v, f_logits, z = packed
    else:
      q = project(x, (h, dh), ("heads", "head_dim"), name="q_proj", config=cfg)
      k = project(x, (hk, dh), ("kv_heads", "head_dim"), name="k_proj", config=cfg)
      v = project(x, (hk, dh), ("kv_heads", "head_dim"), name="v_proj", config=cfg)
      f_logits = project(x, (hk, dh // 2), ("kv_heads", "head_dim"), name="f_proj", config=cfg,
                         use_bias=True, bias_init=forget_bias_init(chunk))
    f_half = nn.sigmoid(f_logits.astype(jnp.float32))
    f = jnp.concatenate([f_half, f_half], axis=-1)  # tied over rotary pairs (i, i + Dh/2)
    chunk_index = positions // chunk
    q = apply_rotary(q, chunk_index, theta=cfg.rope_theta)
    k = apply_rotary(k, chunk_index, theta=cfg.rope_theta)

    if sp is not None:
      o = sp.rat(q, k, v, f, chunk_size=chunk, segment_ids=segment_ids, impl=cfg.impl)
      new_cache = None
    elif cache is None:
      o, _ = rat(q, k, v, f, chunk_size=chunk, segment_ids=segment_ids, impl=cfg.impl)
      new_cache = None
    elif streams is not None:
      o, new_cache = streams_lib.map_streams(
          functools.partial(_continue, chunk_size=chunk, impl=cfg.impl), streams, cache, q, k, v, f)
    else:
      o, new_cache = _continue(q, k, v, f, cache, chunk_size=chunk, impl=cfg.impl)
    if packed is None:
      z = project(x, (h, dh), ("heads", "head_dim"), name="z_proj", config=cfg)
    o = (o.astype(jnp.float32) * nn.sigmoid(z.astype(jnp.float32))).astype(x.dtype)
    y = project(o, (cfg.d_model,), ("embed",), name="o_proj", config=cfg,
                in_axes=("heads", "head_dim"))
    return y, new_cache
