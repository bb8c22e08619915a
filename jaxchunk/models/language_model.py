"""A decoder-only language model built from `ModelConfig.layer_pattern`.

tokens -> embedding -> blocks (x + mixer(norm(x)), then x + SwiGLU(norm(x))) -> RMSNorm -> LM head.
The LM head is the transposed embedding when `tie_embeddings`, else its own projection.

Parameters (logical axes): embed/embedding [vocab, d_model]: ("vocab", "embed");
lm_head/kernel [d_model, vocab]: ("embed", "vocab") (untied only); norms: ("embed",); the mixers
and MLPs document their own (`jaxchunk.layers`).

The cache is {"length": int32 [B], the tokens seen per row, "layers": tuple of per-layer mixer
caches}; `init_cache` builds an empty one.

Streams (`jaxchunk.layers.streams`): `model.apply(params, tokens [1, N], positions=[1, N],
cache={"layers": per-layer tuples of per-stream caches}, streams=((S, 1), (1, L)))` runs several
batches (the serving engine's decodes and a prefill piece) as one forward: per-token work once on
all N tokens, each mixer's sequence work per stream. Returns (logits [1, N, vocab],
{"layers": per-layer tuples of per-stream caches}).

Sequence parallelism: `model.apply(params, tokens, positions=..., sequence_parallel=sp)` with a
`jaxchunk.parallel.SequenceParallel` whose sequence axis is > 1 takes rows in its layout order
(`sp.layout_batch`) sharded over that axis; every mixer then runs its sequence-parallel form and the
logits come back in the same order. Training and evaluation only (no cache).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxchunk.layers import attention as attention_layer
from jaxchunk.layers import mlp as mlp_layer
from jaxchunk.layers import rat as rat_layer
from jaxchunk.layers.attention import Attention, init_attention_cache
from jaxchunk.layers.linear_attention import LinearAttention, init_linear_attention_cache
from jaxchunk.layers.mlp import SwiGLU
from jaxchunk.layers.norm import RMSNorm
from jaxchunk.layers.packing import pack
from jaxchunk.layers.rat import RATLayer, init_rat_cache
from jaxchunk.config import ModelConfig
from jaxchunk.parallel.api import SequenceParallel, active_sequence_parallel
from jaxchunk.parallel.mesh import layout_permutation


def make_mixer(config: ModelConfig, kind: str, name: str) -> nn.Module:
  """The token mixer of a layer of kind `kind` (one of config.MIXER_KINDS)."""
  if kind == "attention":
    return Attention(config, name=name)
  if kind == "local":
    return Attention(config, window=config.window, name=name)
  if kind == "rat":
    return RATLayer(config, name=name)
  return LinearAttention(config, kind, name=name)


def init_layer_cache(config: ModelConfig, kind: str, batch: int, max_len: int, dtype):
  """The empty cache of one mixer of kind `kind`."""
  if kind in ("attention", "local"):
    return init_attention_cache(config, batch, max_len, dtype)
  if kind == "rat":
    return init_rat_cache(config, batch, max_len, dtype)
  return init_linear_attention_cache(config, kind, batch, max_len, dtype)


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
  """The empty cache of `LanguageModel(config)` for `batch` rows of up to `max_len` tokens.

  Returns {"length": zeros int32 [batch], "layers": tuple of per-layer caches}; `dtype` (default
  config.dtype) is the dtype of the activation caches (KV caches, conv histories).
  """
  dtype = jnp.dtype(config.dtype if dtype is None else dtype)
  layers = tuple(init_layer_cache(config, kind, batch, max_len, dtype)
                 for kind in config.layer_pattern)
  return {"length": jnp.zeros((batch,), jnp.int32), "layers": layers}


def token_positions(positions, batch: int, seq: int, cache=None) -> jax.Array:
  """The positions [batch, seq] int32 of a model call's tokens.

  `positions` as given (checked to be [batch, seq]), else arange(seq) offset by each row's cached
  length cache["length"] [batch] (0 without a cache).
  """
  if positions is None:
    start = jnp.zeros((batch,), jnp.int32) if cache is None else cache["length"]
    return start[:, None] + jnp.arange(seq, dtype=jnp.int32)
  if jnp.shape(positions) != (batch, seq):
    raise ValueError(f"positions must have shape [batch, seq] = {(batch, seq)}, "
                     f"got {jnp.shape(positions)}")
  return positions


def embedding(config: ModelConfig) -> nn.Embed:
  """The token embedding [vocab, d_model] ("embed"), a submodule of the calling compact module."""
  return nn.Embed(config.vocab_size, config.d_model, dtype=jnp.dtype(config.dtype),
                  param_dtype=jnp.dtype(config.param_dtype),
                  embedding_init=nn.with_logical_partitioning(nn.linear.default_embed_init,
                                                              ("vocab", "embed")),
                  name="embed")


def output_logits(config: ModelConfig, x: jax.Array, embed: nn.Embed) -> jax.Array:
  """x [B,T,d_model] -> logits [B,T,vocab] float32: RMSNorm ("final_norm"), then the LM head.

  The head is `embed`'s transposed table when config.tie_embeddings, else its own projection
  ("lm_head"); both are submodules of the calling compact module.
  """
  dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
  x = RMSNorm(config.norm_eps, dtype=dtype, param_dtype=param_dtype, name="final_norm")(x)
  # The operands stay in their own (promoted) dtype and the products accumulate in float32: the
  # same logits as float32 operands (bf16 values are exact in float32), without a float32 copy of
  # the table or a float32 GEMM.
  if config.tie_embeddings:
    return jnp.einsum("btd,vd->btv", x, embed.embedding, preferred_element_type=jnp.float32)
  return nn.Dense(config.vocab_size, use_bias=False, param_dtype=param_dtype,
                  dot_general=functools.partial(lax.dot_general,
                                                preferred_element_type=jnp.float32),
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                           ("embed", "vocab")),
                  name="lm_head")(x)


class Block(nn.Module):
  """One pre-norm residual block: x + mixer(norm(x)), then x + SwiGLU(norm(x))."""

  config: ModelConfig
  kind: str

  @nn.compact
  def __call__(self, x, positions, segment_ids=None, cache=None,
               sequence_parallel: SequenceParallel | None = None, streams=None):
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    h = RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name="mixer_norm")(x)
    h, new_cache = make_mixer(cfg, self.kind, "mixer")(h, positions=positions,
                                                       segment_ids=segment_ids, cache=cache,
                                                       sequence_parallel=sequence_parallel,
                                                       streams=streams)
    x = x + h.astype(x.dtype)
    h = RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name="mlp_norm")(x)
    x = x + SwiGLU(cfg.mlp_hidden, dtype=dtype, param_dtype=param_dtype, name="mlp")(h).astype(x.dtype)
    return x, new_cache


_REMAT_POLICIES = {"block": jax.checkpoint_policies.nothing_saveable,
                   "block_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def remat_block(remat: str):
  """`Block`, or `Block` under `nn.remat` with the policy of `ModelConfig.remat` (the backward
  recomputes each block from its input; the parameter tree is unchanged)."""
  if remat == "none":
    return Block
  # static_argnums count `self` as 0: argument 5 is the (hashable) SequenceParallel or None.
  return nn.remat(Block, policy=_REMAT_POLICIES[remat], static_argnums=(5,))


class LanguageModel(nn.Module):
  """Decoder-only language model; see the module docstring."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, *, segment_ids=None, positions=None, cache=None,
               sequence_parallel: SequenceParallel | None = None, streams=None):
    """tokens [B,T] int -> (logits [B,T,vocab] float32, new cache or None).

    `segment_ids` [B,T] marks packed documents (pass `positions` restarting at each document):
    every mixer keeps them apart, each giving what it gives alone (not with a cache).
    `positions` [B,T] defaults to arange(T), or with a cache to cache["length"][:, None] +
    arange(T).
    With a cache (from `init_cache` or a previous call) the model continues each row from its
    cached length: T > 1 is a chunked prefill, T == 1 a decode step; the returned cache has
    length + T.
    With an active `sequence_parallel` (no cache) tokens, segment_ids, positions and the logits
    are in its layout order; positions default to the natural positions in that order.
    With `streams` (see the module docstring) tokens [1, N] hold several batches' tokens, and
    positions [1, N] and a cache of per-stream layer caches are required.
    """
    cfg = self.config
    if tokens.ndim != 2:
      raise ValueError(f"tokens must have shape [batch, seq], got {tokens.shape}")
    if streams is not None:
      return self._streams(tokens, positions, cache, streams)
    b, t = tokens.shape
    if cache is not None and len(cache["layers"]) != cfg.num_layers:
      raise ValueError(f"cache['layers'] must hold {cfg.num_layers} layer caches, "
                       f"got {len(cache['layers'])}")
    sp = active_sequence_parallel(sequence_parallel, cache, "LanguageModel")
    if sp is not None and positions is None:
      natural = layout_permutation(t, sp.num_devices, sp.layout).astype(jnp.int32)
      positions = jnp.broadcast_to(natural, (b, t))
    positions = token_positions(positions, b, t, cache)
    embed = embedding(cfg)
    x = embed(tokens)
    block = Block if cache is not None else remat_block(cfg.remat)
    new_layers = []
    for i, kind in enumerate(cfg.layer_pattern):
      x, layer_cache = block(cfg, kind, name=f"block_{i}")(
          x, positions, segment_ids, None if cache is None else cache["layers"][i], sp)
      new_layers.append(layer_cache)
    logits = output_logits(cfg, x, embed)
    if cache is None:
      return logits, None
    return logits, {"length": cache["length"] + t, "layers": tuple(new_layers)}

  def _streams(self, tokens, positions, cache, streams):
    """The streams forward; see the module docstring."""
    cfg = self.config
    if positions is None or cache is None:
      raise ValueError("LanguageModel: streams need positions and a cache")
    if jnp.shape(positions) != tokens.shape:
      raise ValueError(f"positions must have the shape of tokens {tokens.shape}, "
                       f"got {jnp.shape(positions)}")
    if len(cache["layers"]) != cfg.num_layers:
      raise ValueError(f"cache['layers'] must hold {cfg.num_layers} layer caches, "
                       f"got {len(cache['layers'])}")
    embed = embedding(cfg)
    x = embed(tokens)
    new_layers = []
    for i, kind in enumerate(cfg.layer_pattern):
      x, layer_cache = Block(cfg, kind, name=f"block_{i}")(
          x, positions, None, cache["layers"][i], None, streams=tuple(map(tuple, streams)))
      new_layers.append(layer_cache)
    return output_logits(cfg, x, embed), {"layers": tuple(new_layers)}

  def pack_projections(self, variables: dict) -> dict:
    """`variables` (unboxed, if boxed) with each block's projections of one input packed into
    one kernel (`jaxchunk.layers.packing`): the input projections of RAT and attention mixers and
    the MLP's gate and up. The model gives the same outputs from either; the serving engine packs
    once so that a decode step runs one matmul per group. Linear-attention mixers are unchanged.
    """
    packs = {"attention": attention_layer, "local": attention_layer, "rat": rat_layer}
    variables = nn.meta.unbox(variables)
    params = dict(variables["params"])
    for i, kind in enumerate(self.config.layer_pattern):
      block = dict(params[f"block_{i}"])
      if kind in packs:
        block["mixer"] = pack(block["mixer"], packs[kind].PACKED_NAME, packs[kind].PACKED_PARTS)
      block["mlp"] = pack(block["mlp"], mlp_layer.PACKED_NAME, mlp_layer.PACKED_PARTS)
      params[f"block_{i}"] = block
    return {**variables, "params": params}
