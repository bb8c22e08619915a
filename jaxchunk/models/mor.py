"""Mixture-of-Recursions language models and their recursive baselines.

`MoRLanguageModel(MoRConfig(...))`: tokens -> embedding -> [unshared first block] ->
`RecursiveBlock` (the shared stack `model.layer_pattern`, `num_recursions` times, routed per token)
-> [unshared last block] -> RMSNorm -> LM head. Parameter sharing (Bae et al., 2025):
- "cycle": every block is in the shared stack, so the unique blocks are `layer_pattern`;
- "middle_cycle": an unshared first block (kind layer_pattern[0]) and last block (kind
  layer_pattern[-1]) run once on every token around the shared stack.
`router=None` is the fixed-depth recursive transformer; "expert" and "token" are MoR's routers (see
`jaxchunk.layers.recursion`). The vanilla baseline is `LanguageModel` with the unrolled pattern
(`MoRConfig.vanilla_config`).

Parameters (logical axes): embed/embedding [vocab, d_model]: ("vocab", "embed");
first/..., last/...: a language-model `Block`; recursion/...: `RecursiveBlock`; final_norm/scale:
("embed",); lm_head/kernel [d_model, vocab]: ("embed", "vocab") when embeddings are untied.

The cache (`init_mor_cache`) is {"length": int32 [B], "first": (block cache,) or (), "recursion":
per-recursion caches, "last": (block cache,) or ()}.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxchunk.layers.recursion import (ROUTERS, RecursiveBlock, check_kv_strategy,
                                       default_capacities, init_recursive_cache)
from jaxchunk.config import ModelConfig
from jaxchunk.models.language_model import (Block, embedding, init_layer_cache, output_logits,
                                            token_positions)

SHARING = ("cycle", "middle_cycle")


@dataclasses.dataclass(frozen=True)
class MoRConfig:
  """A recursive / Mixture-of-Recursions model around `model` (whose layer_pattern is shared).

  Attributes:
    model: the block configuration; `layer_pattern` is the stack reused by every recursion.
    num_recursions: passes of the shared stack.
    sharing: "cycle" or "middle_cycle" (unshared first and last blocks).
    router: None (fixed depth), "expert" (expert choice) or "token" (token choice).
    capacities: per recursion, the fraction of tokens gathered in training; () is the default
      (expert: 1, (R-1)/R, ..., 1/R; token: all 1). Non-increasing, in (0, 1].
    kv_strategy: "recursion": each recursion caches the keys/values (or states) of its own active
      tokens (rank positions); "share_first" (recursive KV sharing): every recursion after the
      first reuses the first recursion's attention keys/values of all tokens and computes only
      its active tokens' queries, at their original positions; the cache holds the first
      recursion's keys/values only. Needs an all-attention stack and capacities[0] == 1.
    router_loss_weight: weight of the expert-choice auxiliary BCE loss in aux["router_loss"].
    balance_loss_weight: weight of the token-choice balancing loss in aux["router_loss"].
  """

  model: ModelConfig = ModelConfig(layer_pattern=("attention",) * 2)
  num_recursions: int = 3
  sharing: str = "cycle"
  router: str | None = "expert"
  capacities: tuple[float, ...] = ()
  kv_strategy: str = "recursion"
  router_loss_weight: float = 0.1
  balance_loss_weight: float = 0.1

  def __post_init__(self):
    object.__setattr__(self, "capacities", tuple(float(c) for c in self.capacities))
    if self.num_recursions < 1:
      raise ValueError(f"num_recursions must be positive, got {self.num_recursions}")
    if self.sharing not in SHARING:
      raise ValueError(f"sharing must be one of {SHARING}, got {self.sharing!r}")
    if self.router not in ROUTERS:
      raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
    check_kv_strategy(self.kv_strategy, self.model)
    caps = self.resolved_capacities
    if len(caps) != self.num_recursions:
      raise ValueError(f"capacities must hold num_recursions = {self.num_recursions} fractions, "
                       f"got {caps}")
    if any(not 0 < c <= 1 for c in caps) or any(b > a for a, b in zip(caps, caps[1:])):
      raise ValueError(f"capacities must be non-increasing fractions in (0, 1], got {caps}")
    if self.router is None and any(c < 1 for c in caps):
      raise ValueError(f"capacities below 1 need a router, got {caps} with router=None")
    if self.kv_strategy == "share_first" and caps[0] < 1:
      raise ValueError(f"kv_strategy='share_first' needs capacities[0] == 1 (the first recursion "
                       f"computes every token's keys/values), got {caps}")

  @property
  def resolved_capacities(self) -> tuple[float, ...]:
    return self.capacities or default_capacities(self.router, self.num_recursions)

  @property
  def num_unique_blocks(self) -> int:
    """Blocks with their own parameters."""
    return len(self.model.layer_pattern) + (2 if self.sharing == "middle_cycle" else 0)

  @property
  def unrolled_pattern(self) -> tuple[str, ...]:
    """The layer pattern of a token that takes every recursion."""
    pattern = self.model.layer_pattern * self.num_recursions
    if self.sharing == "middle_cycle":
      pattern = (pattern[0],) + pattern + (pattern[-1],)
    return pattern

  def block_passes_per_token(self) -> float:
    """Mean blocks a token goes through in training (capacities weigh the shared stack)."""
    shared = len(self.model.layer_pattern) * sum(self.resolved_capacities)
    return shared + (2 if self.sharing == "middle_cycle" else 0)

  def vanilla_config(self) -> ModelConfig:
    """The unshared `LanguageModel` config with every block of the unrolled depth."""
    return dataclasses.replace(self.model, layer_pattern=self.unrolled_pattern)


def block_params(config: ModelConfig, kind: str) -> int:
  """Parameters of one language-model `Block` of mixer `kind`."""
  x = jax.ShapeDtypeStruct((1, 1, config.d_model), jnp.dtype(config.dtype))
  positions = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  shapes = jax.eval_shape(lambda x, p: Block(config, kind).init(jax.random.key(0), x, positions=p),
                          x, positions)
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(shapes))


def mor_flops_per_token(config: MoRConfig, seq_len: int) -> float:
  """Training FLOPs (forward + backward) per token, counted like `train_step.flops_per_token`.

  6 per weight per token that passes through it, plus attention-like mixing 12 * heads * head_dim
  * c for c mean keys per query. A recursion of capacity f runs on f * seq_len tokens: its weights
  cost f per token and its mixers see a sequence of f * seq_len tokens. With "share_first" the
  recursions after the first skip the key/value projections and their queries see the first
  recursion's keys of the whole sequence. Routers are included.
  """
  cfg = config.model
  width = cfg.num_heads * cfg.head_dim
  kv_weights = 2 * cfg.d_model * cfg.num_kv_heads * cfg.head_dim

  def block(kind: str, fraction: float, shares_kv: bool = False) -> float:
    length = seq_len if shares_kv else fraction * seq_len
    keys = {"attention": length / 2, "local": min(cfg.window, length / 2),
            "rat": length / (2 * cfg.rat_chunk_size)}.get(kind, cfg.linear_chunk_size / 2
                                                          + cfg.head_dim)
    weights = block_params(cfg, kind) - (kv_weights if shares_kv else 0)
    return fraction * (6.0 * weights + 12.0 * width * keys)

  flops = 6.0 * cfg.vocab_size * cfg.d_model + 6.0 * cfg.d_model   # LM head, final norm
  if config.sharing == "middle_cycle":
    flops += block(cfg.layer_pattern[0], 1.0) + block(cfg.layer_pattern[-1], 1.0)
  for r, fraction in enumerate(config.resolved_capacities):
    shares_kv = config.kv_strategy == "share_first" and r > 0
    flops += sum(block(kind, fraction, shares_kv) for kind in cfg.layer_pattern)
  router_outputs = {"expert": config.num_recursions, "token": config.num_recursions}
  return flops + 6.0 * cfg.d_model * router_outputs.get(config.router, 0)


def init_mor_cache(config: MoRConfig, batch: int, max_len: int, dtype=None) -> dict:
  """The empty cache of `MoRLanguageModel(config)` for `batch` rows of up to `max_len` tokens."""
  cfg = config.model
  dtype = jnp.dtype(cfg.dtype if dtype is None else dtype)
  ends = config.sharing == "middle_cycle"
  first = (init_layer_cache(cfg, cfg.layer_pattern[0], batch, max_len, dtype),) if ends else ()
  last = (init_layer_cache(cfg, cfg.layer_pattern[-1], batch, max_len, dtype),) if ends else ()
  return {"length": jnp.zeros((batch,), jnp.int32), "first": first, "last": last,
          "recursion": init_recursive_cache(cfg, config.num_recursions, batch, max_len, dtype,
                                            kv_strategy=config.kv_strategy)}


class MoRLanguageModel(nn.Module):
  """Recursive / Mixture-of-Recursions language model; see the module docstring."""

  config: MoRConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, *, positions=None, segment_ids=None, cache=None,
               inference: bool = False):
    """tokens [B,T] int -> (logits [B,T,vocab] float32, aux).

    aux: {"router_loss": the weighted router losses to add to the LM loss, "router_bce",
    "balance", "active" [num_recursions, B, T] bool, "active_fraction" [num_recursions], "cache":
    the new cache or None}.
    `inference` routes causally (expert choice by threshold; no capacity drops); a cache (from
    `init_mor_cache`) implies it: the model continues each row from its cached length, T > 1 is a
    chunked prefill and T == 1 a decode step where a token stops at the first recursion its router
    declines (early exit). `positions` [B,T] defaults to arange(T) (+ the cached length); routed
    recursions use rank positions ("recursion") or these positions ("share_first"; see
    `jaxchunk.layers.recursion`).
    """
    config = self.config
    cfg = config.model
    if tokens.ndim != 2:
      raise ValueError(f"tokens must have shape [batch, seq], got {tokens.shape}")
    b, t = tokens.shape
    positions = token_positions(positions, b, t, cache)
    embed = embedding(cfg)
    x = embed(tokens)
    ends = config.sharing == "middle_cycle"
    new_cache = None if cache is None else dict(cache)

    def unshared(x, kind, name):
      x, block_cache = Block(cfg, kind, name=name)(
          x, positions=positions, segment_ids=segment_ids,
          cache=None if cache is None else cache[name][0])
      if cache is not None:
        new_cache[name] = (block_cache,)
      return x

    if ends:
      x = unshared(x, cfg.layer_pattern[0], "first")
    x, recursion_cache, aux = RecursiveBlock(
        cfg, config.num_recursions, config.router, config.resolved_capacities,
        config.kv_strategy, name="recursion")(
            x, positions=positions, segment_ids=segment_ids,
            cache=None if cache is None else cache["recursion"], inference=inference)
    if ends:
      x = unshared(x, cfg.layer_pattern[-1], "last")
    logits = output_logits(cfg, x, embed)
    if cache is not None:
      new_cache["recursion"] = recursion_cache
      new_cache["length"] = cache["length"] + t
    aux = dict(aux, cache=new_cache,
               router_loss=config.router_loss_weight * aux["router_bce"]
               + config.balance_loss_weight * aux["balance"])
    return logits, aux
