"""Recursive layers: one shared stack of blocks applied several times, and Mixture-of-Recursions.

`RecursiveBlock` applies the shared stack `SharedStack(config)` (the blocks of
`config.layer_pattern`, each the `Block` of `jaxchunk.models.language_model`, so every mixer kind
works) `num_recursions` times with the same parameters. Without a router every token gets every
recursion (the fixed-depth recursive transformer). With a router (Mixture-of-Recursions, Bae et al.,
2025, "Mixture-of-Recursions: Learning Dynamic Recursive Depths for Adaptive Token-Level
Computation") each recursion r runs only over its active tokens, which are gathered into a smaller
[B, C_r, d] array (C_r = the depth's capacity), run through the stack, and scattered back:

  x_t <- x_t + w_t * (stack(x)_t - x_t)   for the active tokens t, x_t unchanged otherwise.

stack(x) - x is the residual branch of the stack, so w = 1 is the plain recursion.

Routers:
- "expert" (expert choice): recursion r has its own router, a linear map to one logit s_t; among
  the tokens active at r - 1 it keeps the top-k by s_t (k = C_r), and weighs their update by
  w = sigmoid(s_t). Top-k over the sequence looks at future tokens, so (the paper's "auxiliary
  loss" treatment) training adds a binary cross-entropy pushing sigmoid(s_t) towards 1 for the kept
  tokens and 0 for the others; at inference (`inference=True`, and always with a cache) a token
  goes deeper iff s_t >= 0 (sigmoid >= 1/2), a decision that depends only on the past.
- "token" (token choice): one router, a linear map of the hidden state entering recursion 1 to
  num_recursions logits; softmax probabilities p, depth d_t = argmax p (1-based: d_t recursions),
  w = p_{d_t} at the last recursion d_t, and 1 before. The balancing loss is the Switch-Transformer
  one, num_recursions * sum_i f_i P_i (f_i: fraction of tokens of depth i, P_i: mean probability).
  Capacity C_r bounds the gathered array; tokens beyond it (in position order, a causal rule)
  exit early.
Depths with capacity 1.0 keep every active token (no router decision, the gate still weighs them).

KV strategies (`kv_strategy`, `KV_STRATEGIES`):
- "recursion" (recursion-wise caching). The stack at recursion r sees the active tokens as one
  sequence in their order, with positions 0, 1, ... (their rank among the depth's active tokens).
  Every mixer therefore works unchanged over the gathered array (attention, sliding windows counted
  in active tokens, RAT chunks, linear recurrences, short convolutions), and each depth's cache
  holds only its active tokens. The paper's code keeps the tokens' original rotary positions
  instead; rank positions are what let the per-depth KV caches stay dense.
- "share_first" (recursive KV sharing). Recursion 1 runs on every token (capacities[0] must be 1)
  and its attention layers keep their keys and values; at every later recursion, block i of the
  stack computes queries only, for the gathered active tokens, and attends to block i's
  first-recursion keys/values of all tokens (`SharedKVStack`). Queries and keys both use the
  tokens' original positions (the positions passed in): rotary angles are those of the first
  recursion's keys, a query sees the keys of the tokens at or before it in the sequence, and
  sliding windows count original positions. Only attention mixers ("attention", "local") have
  keys/values to share; other kinds raise. The cache holds the first recursion's keys/values only.

Padding. At inference the number of active tokens varies, so recursion r gathers a buffer of T
slots: the active tokens first, in order, then the others as padding (processed, then discarded;
being after every active token, a causal mixer never lets them reach an active one).
With "share_first", later recursions read only the first recursion's keys, so padding queries never
reach an active token either.

Parameters (logical axes): stack/blocks_<i>/... as `Block`; expert routers router_<r>/kernel
[d_model, 1]: ("embed", None); token router router/kernel [d_model, num_recursions]:
("embed", None).

The cache (`init_recursive_cache`) is a tuple over recursions of {"count": int32 [B], the tokens
that recursion has processed per row, "layers": tuple of the stack's block caches}. With
"share_first" only recursion 1 has block caches (its KV caches, slot = position); the later
recursions' "layers" are ().
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxchunk.config import ATTENTION_KINDS, ModelConfig
from jaxchunk.layers.attention import check_mixer_input, project
from jaxchunk.layers.mlp import SwiGLU
from jaxchunk.layers.norm import RMSNorm
from jaxchunk.layers.rotary import apply_rotary
from jaxchunk.models.language_model import Block, init_layer_cache
from jaxchunk.ops.attention import attention

ROUTERS = (None, "expert", "token")
KV_STRATEGIES = ("recursion", "share_first")


def capacity_tokens(capacity: float, seq_len: int) -> int:
  """The gathered length of a depth keeping the fraction `capacity` of `seq_len` tokens (>= 1)."""
  return max(1, min(seq_len, round(capacity * seq_len)))


def default_capacities(router: str | None, num_recursions: int) -> tuple[float, ...]:
  """Expert choice: 1, (R-1)/R, ..., 1/R (the paper's linear schedule); otherwise all 1."""
  if router == "expert":
    return tuple((num_recursions - r) / num_recursions for r in range(num_recursions))
  return (1.0,) * num_recursions


def gather_tokens(x: jax.Array, index: jax.Array) -> jax.Array:
  """x [B,T,...], index [B,C] int -> x[b, index[b, c]]: [B,C,...]."""
  index = index.reshape(index.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)


def scatter_add_tokens(x: jax.Array, index: jax.Array, update: jax.Array,
                       valid: jax.Array) -> jax.Array:
  """x [B,T,d] plus update [B,C,d] at rows index[b, c] where valid[b, c] (index rows distinct)."""
  rows = jnp.arange(x.shape[0])[:, None]
  update = jnp.where(valid[..., None], update, 0).astype(x.dtype)
  return x.at[rows, index].add(update, unique_indices=True)


def token_mask(index: jax.Array, valid: jax.Array, seq_len: int) -> jax.Array:
  """The [B, seq_len] bool mask of the positions index[b, c] with valid[b, c]."""
  rows = jnp.arange(index.shape[0])[:, None]
  return jnp.zeros((index.shape[0], seq_len), bool).at[rows, index].set(valid, unique_indices=True)


def _order_first(keep: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """The `capacity` positions of each row, kept ones first, each group in position order."""
  t = keep.shape[1]
  pos = jnp.arange(t, dtype=jnp.int32)
  _, index = jax.lax.top_k(-jnp.where(keep, pos, pos + t), capacity)
  return index, jnp.take_along_axis(keep, index, axis=1)


def select_causal(keep: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array]:
  """keep [B,T] bool -> (index [B,C] int32, valid [B,C] bool), C = capacity.

  The first C kept tokens of each row in position order (kept tokens beyond C are dropped, a rule
  that depends only on earlier tokens), then unkept positions as padding with valid False.
  """
  keep = keep & (jnp.cumsum(keep, axis=1) <= capacity)
  return _order_first(keep, capacity)


def select_top_k(scores: jax.Array, candidates: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """Expert choice: the k best-scoring candidates of each row (scores, candidates [B,T]).

  Returns (index [B,k] int32 in position order, valid [B,k]); valid is False only where a row has
  fewer than k candidates (those slots come last).
  """
  _, index = jax.lax.top_k(jnp.where(candidates, scores, -jnp.inf), k)
  chosen = token_mask(index, jnp.take_along_axis(candidates, index, axis=1), scores.shape[1])
  return _order_first(chosen, k)


def sigmoid_bce(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Elementwise binary cross-entropy of sigmoid(logits) against targets in {0, 1}."""
  return jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits)))


def check_kv_strategy(kv_strategy: str, config: ModelConfig) -> None:
  """Raises a ValueError unless `kv_strategy` is one of `KV_STRATEGIES` and fits the stack."""
  if kv_strategy not in KV_STRATEGIES:
    raise ValueError(f"kv_strategy must be one of {KV_STRATEGIES}, got {kv_strategy!r}")
  if kv_strategy == "share_first":
    for kind in config.layer_pattern:
      if kind not in ATTENTION_KINDS:
        raise ValueError(f"kv_strategy='share_first' shares attention keys/values, but the shared "
                         f"stack has a {kind!r} layer (allowed: {ATTENTION_KINDS})")


def init_recursive_cache(config: ModelConfig, num_recursions: int, batch: int, max_len: int,
                         dtype, *, kv_strategy: str = "recursion") -> tuple:
  """The empty cache of a `RecursiveBlock`: per recursion {"count": zeros [B], "layers": caches}.

  "recursion": each recursion caches at most max_len tokens of each row (its active ones).
  "share_first": recursion 1 caches every token's keys/values; later recursions' layers are ().
  """
  check_kv_strategy(kv_strategy, config)

  def layers(r):
    if kv_strategy == "share_first" and r > 0:
      return ()
    return tuple(init_layer_cache(config, kind, batch, max_len, dtype)
                 for kind in config.layer_pattern)

  return tuple({"count": jnp.zeros((batch,), jnp.int32), "layers": layers(r)}
               for r in range(num_recursions))


def _with_fractions(aux: dict) -> dict:
  """aux plus "active_fraction" [R]: the fraction of tokens each recursion processed."""
  return dict(aux, active_fraction=jnp.mean(aux["active"].astype(jnp.float32), axis=(1, 2)))


class SharedStack(nn.Module):
  """The blocks of `config.layer_pattern` (each a language-model `Block`), applied in order."""

  config: ModelConfig

  def setup(self):
    self.blocks = [Block(self.config, kind) for kind in self.config.layer_pattern]

  def __call__(self, x, *, positions, segment_ids=None, caches=None):
    """x [B,T,d_model] -> (x [B,T,d_model], tuple of new block caches or None)."""
    new_caches = []
    for i, block in enumerate(self.blocks):
      x, new_cache = block(x, positions=positions, segment_ids=segment_ids,
                           cache=None if caches is None else caches[i])
      new_caches.append(new_cache)
    return x, None if caches is None else tuple(new_caches)


def attend_by_slots(q: jax.Array, k: jax.Array, v: jax.Array, slots: jax.Array, *,
                    window: int | None) -> jax.Array:
  """Causal softmax attention of queries at given key slots: the gathered tokens of a recursion.

  q [B,C,H,D] (unscaled: logits are scaled by D ** -0.5), the query of the token at key slot
  slots[b, c] (int [B,C]); k [B,S,Hk,D], v [B,S,Hk,Dv] with Hk dividing H (query head h
  reads kv head h // (H // Hk)). Query c attends to the keys j <= slots[b, c], and with a window
  only to those with slots[b, c] - j < window; its own slot is always visible. Dense [C, S] logits
  in float32; returns [B,C,H,Dv] in q's dtype.
  """
  b, c, h, d = q.shape
  hk = k.shape[2]
  hi = jax.lax.Precision.HIGHEST
  qg = q.astype(jnp.float32).reshape(b, c, hk, h // hk, d) * d ** -0.5
  logits = jnp.einsum("bckgd,bskd->bkgcs", qg, k.astype(jnp.float32), precision=hi)
  key_slots = jnp.arange(k.shape[1], dtype=jnp.int32)
  visible = key_slots <= slots[:, :, None]                                     # [B,C,S]
  if window is not None:
    visible &= slots[:, :, None] - key_slots < window
  logits = jnp.where(visible[:, None, None], logits, -jnp.inf)
  o = jnp.einsum("bkgcs,bskd->bckgd", jax.nn.softmax(logits, axis=-1), v.astype(jnp.float32),
                 precision=hi)
  return o.reshape(b, c, h, v.shape[3]).astype(q.dtype)


def _write_rows(cache: jax.Array, update: jax.Array, starts: jax.Array) -> jax.Array:
  """Writes update [B,T,...] into cache [B,L,...] at rows starts[b] .. starts[b] + T - 1."""
  write = lambda row, new, start: jax.lax.dynamic_update_slice(
      row, new, (start,) + (0,) * (row.ndim - 1))
  return jax.vmap(write)(cache, update.astype(cache.dtype), starts)


class SharedKVAttention(nn.Module):
  """The `Attention` mixer (the same parameters and math) split for recursive KV sharing.

  Without `shared` it is `Attention` on a dense KV cache or none, and also returns the keys and
  values it attended to: shared = {"k", "v": [B,S,Hk,Dh] (rotated keys and values of the call's T
  tokens, or the whole cache after writing them at slots positions[:, 0] onwards), "offset": None,
  or int32 [B] the cache slot of the call's first token}.
  With `shared` (from such a call of the same layer) it projects queries only, rotated by
  `positions`, and attends to the shared keys/values: with `query_index` None the queries are that
  call's T tokens (the same masks as the call: causal, window, segment_ids); with query_index
  int [B,C] they are the tokens query_index[b, c] of that call (gathered, at their original
  `positions` [B,C]), masked causally by key slot (`attend_by_slots`).

  Attributes:
    config: the model configuration (heads, head_dim, rope_theta, dtype, impl).
    window: None for global attention, else the sliding window in positions.
  """

  config: ModelConfig
  window: int | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids=None, cache=None,
               shared=None, query_index=None):
    """x [B,T or C,d_model] -> (y [B,T or C,d_model], new cache or None, shared)."""
    cfg = self.config
    check_mixer_input(x, positions, cfg)
    h, hk, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    x = x.astype(jnp.dtype(cfg.dtype))
    q = project(x, (h, dh), ("heads", "head_dim"), name="q_proj", config=cfg)
    q = apply_rotary(q, positions, theta=cfg.rope_theta)
    if shared is None:
      if cache is not None and (segment_ids is not None or "k" not in cache):
        raise ValueError("SharedKVAttention: a cache must be a dense {'k', 'v'} KV cache and "
                         "excludes segment_ids")
      k = project(x, (hk, dh), ("kv_heads", "head_dim"), name="k_proj", config=cfg)
      v = project(x, (hk, dh), ("kv_heads", "head_dim"), name="v_proj", config=cfg)
      k = apply_rotary(k, positions, theta=cfg.rope_theta)
      if cache is None:
        shared = {"k": k, "v": v, "offset": None}
      else:
        start = positions[:, 0].astype(jnp.int32)
        cache = {"k": _write_rows(cache["k"], k, start), "v": _write_rows(cache["v"], v, start)}
        shared = dict(cache, offset=start)
    k, v = shared["k"].astype(q.dtype), shared["v"].astype(q.dtype)
    offset = shared["offset"]
    if query_index is not None:
      slots = query_index if offset is None else offset[:, None] + query_index
      o = attend_by_slots(q, k, v, slots, window=self.window)
    elif offset is None:
      o = attention(q, k, v, causal=True, segment_ids=segment_ids, window=self.window,
                    impl=cfg.impl)
    else:
      o = attention(q, k, v, causal=True, window=self.window, q_offset=offset,
                    kv_length=offset + x.shape[1], impl=cfg.impl)
    y = project(o, (cfg.d_model,), ("embed",), name="o_proj", config=cfg,
                in_axes=("heads", "head_dim"))
    return y, cache, shared


class SharedKVBlock(nn.Module):
  """A language-model `Block` of an attention kind (same parameters) over a `SharedKVAttention`.

  x + mixer(norm(x)), then x + SwiGLU(norm(x)); the mixer arguments pass through.
  """

  config: ModelConfig
  kind: str

  @nn.compact
  def __call__(self, x, *, positions, segment_ids=None, cache=None, shared=None,
               query_index=None):
    """x [B,T,d_model] -> (x, new cache or None, shared keys/values); see `SharedKVAttention`."""
    cfg = self.config
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    window = cfg.window if self.kind == "local" else None
    h = RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name="mixer_norm")(x)
    h, new_cache, shared = SharedKVAttention(cfg, window, name="mixer")(
        h, positions=positions, segment_ids=segment_ids, cache=cache, shared=shared,
        query_index=query_index)
    x = x + h.astype(x.dtype)
    h = RMSNorm(cfg.norm_eps, dtype=dtype, param_dtype=param_dtype, name="mlp_norm")(x)
    x = x + SwiGLU(cfg.mlp_hidden, dtype=dtype, param_dtype=param_dtype, name="mlp")(h).astype(x.dtype)
    return x, new_cache, shared


class SharedKVStack(nn.Module):
  """The attention blocks of `config.layer_pattern` as `SharedKVBlock`s (the parameters of
  `SharedStack`), applied in order, for kv_strategy="share_first"."""

  config: ModelConfig

  def setup(self):
    check_kv_strategy("share_first", self.config)
    self.blocks = [SharedKVBlock(self.config, kind) for kind in self.config.layer_pattern]

  def __call__(self, x, *, positions, segment_ids=None, caches=None, shared=None,
               query_index=None):
    """x [B,T,d_model] -> (x, tuple of new block caches or None, tuple of per-block shared KV).

    `shared` None: the first recursion (computes and returns each block's keys/values); else the
    tuple it returned, reused by the same blocks (`SharedKVAttention`).
    """
    new_caches, new_shared = [], []
    for i, block in enumerate(self.blocks):
      x, new_cache, block_shared = block(
          x, positions=positions, segment_ids=segment_ids,
          cache=None if caches is None else caches[i],
          shared=None if shared is None else shared[i], query_index=query_index)
      new_caches.append(new_cache)
      new_shared.append(block_shared)
    return x, None if caches is None else tuple(new_caches), tuple(new_shared)


def _run_stack(module, x, positions, caches):
  return module.stack(x, positions=positions, caches=caches)


def _run_shared_stack(module, x, positions, shared, query_index):
  return module.stack(x, positions=positions, shared=shared, query_index=query_index)[0]


def _skip_shared_stack(module, x, positions, shared, query_index):
  del module, positions, shared, query_index
  return x


def _skip_stack(module, x, positions, caches):
  del module, positions
  return x, caches


def _router_dense(features: int, config: ModelConfig, name: str) -> nn.Dense:
  """A bias-free float32 projection d_model -> features, kernel axes ("embed", None)."""
  return nn.Dense(features, use_bias=False, dtype=jnp.float32,
                  param_dtype=jnp.dtype(config.param_dtype), name=name,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                           ("embed", None)))


class RecursiveBlock(nn.Module):
  """`num_recursions` passes of one shared stack, optionally routed per token; see the module doc.

  Attributes:
    config: the model configuration; its `layer_pattern` is the shared stack of one recursion.
    num_recursions: passes of the stack.
    router: None (every token, every recursion), "expert" or "token".
    capacities: per recursion, the fraction of the sequence gathered at training (non-increasing,
      in (0, 1]); () takes `default_capacities`.
    kv_strategy: "recursion" (each recursion caches its own active tokens) or "share_first"
      (later recursions reuse the first recursion's attention keys/values); see the module doc.
  """

  config: ModelConfig
  num_recursions: int
  router: str | None = None
  capacities: tuple[float, ...] = ()
  kv_strategy: str = "recursion"

  def setup(self):
    if self.router not in ROUTERS:
      raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
    check_kv_strategy(self.kv_strategy, self.config)
    self.share_kv = self.kv_strategy == "share_first"
    self.stack = SharedKVStack(self.config) if self.share_kv else SharedStack(self.config)
    if self.router == "expert":
      self.routers = [_router_dense(1, self.config, f"router_{r}")
                      for r in range(self.num_recursions)]
    elif self.router == "token":
      self.token_router = _router_dense(self.num_recursions, self.config, "router")

  def _capacities(self) -> tuple[float, ...]:
    caps = self.capacities or default_capacities(self.router, self.num_recursions)
    if len(caps) != self.num_recursions:
      raise ValueError(f"capacities must hold num_recursions = {self.num_recursions} fractions, "
                       f"got {caps}")
    if self.share_kv and caps[0] < 1:
      raise ValueError(f"kv_strategy='share_first' needs capacities[0] == 1 (the first recursion "
                       f"computes every token's keys/values), got {caps}")
    return caps

  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids=None, cache=None,
               inference: bool = False):
    """x [B,T,d_model] -> (x [B,T,d_model], new cache or None, aux).

    aux: {"router_bce": the expert-choice auxiliary loss (mean over recursions), "balance": the
    token-choice balancing loss (float32 scalars, zero where they do not apply), "active": bool
    [num_recursions, B, T], the tokens each recursion processed, "active_fraction":
    [num_recursions] their fraction}.
    Without a router, `positions` and `segment_ids` go to the stack unchanged at every recursion;
    with one, `segment_ids` is refused and each recursion uses rank positions ("recursion") or the
    tokens' `positions` ("share_first"; module docstring).
    `inference` (implied by a cache) routes causally: threshold instead of top-k, no drops.
    With a cache (from `init_recursive_cache`) the call continues it: T == 1 is a decode step.
    """
    if x.ndim != 3 or x.shape[-1] != self.config.d_model:
      raise ValueError(f"x must have shape [batch, seq, {self.config.d_model}], got {x.shape}")
    if cache is not None and len(cache) != self.num_recursions:
      raise ValueError(f"cache must hold {self.num_recursions} per-recursion caches, "
                       f"got {len(cache)}")
    caps = self._capacities()
    if self.router is None:
      return self._fixed_depth(x, positions, segment_ids, cache)
    if segment_ids is not None:
      raise ValueError("RecursiveBlock with a router cannot handle segment_ids (packed documents)")
    inference = inference or cache is not None
    if cache is not None and "rat" in self.config.layer_pattern and x.shape[0] > 1:
      raise ValueError("RecursiveBlock with a router and RAT layers decodes one row at a time: "
                       "a RAT cache holds one length for the whole batch, but rows route apart")
    recurrent = any(kind not in ATTENTION_KINDS for kind in self.config.layer_pattern)
    if cache is not None and x.shape[1] > 1 and recurrent:
      # Padding would advance recurrent states: continue token by token (exact).
      outputs, steps = [], []
      for i in range(x.shape[1]):
        y, cache, aux = self._routed(x[:, i:i + 1], positions[:, i:i + 1], caps, cache,
                                      inference)
        outputs.append(y)
        steps.append(aux)
      aux = jax.tree.map(lambda *a: jnp.concatenate(a, axis=-1) if a[0].ndim == 3
                         else sum(a) / len(a), *steps)
      return jnp.concatenate(outputs, axis=1), cache, _with_fractions(aux)
    x, new_cache, aux = self._routed(x, positions, caps, cache, inference)
    return x, new_cache, _with_fractions(aux)

  def _fixed_depth(self, x, positions, segment_ids, cache):
    """Every token through every recursion."""
    new_cache, shared = [], None
    for r in range(self.num_recursions):
      caches = None if cache is None or (self.share_kv and r > 0) else cache[r]["layers"]
      if self.share_kv:   # recursion 0 computes `shared`, the later ones pass it through
        x, layers, shared = self.stack(x, positions=positions, segment_ids=segment_ids,
                                       caches=caches, shared=shared)
        layers = layers if r == 0 else ()
      else:
        x, layers = self.stack(x, positions=positions, segment_ids=segment_ids, caches=caches)
      if cache is not None:
        new_cache.append({"count": cache[r]["count"] + x.shape[1], "layers": layers})
    zero = jnp.zeros((), jnp.float32)
    aux = {"router_bce": zero, "balance": zero,
           "active": jnp.ones((self.num_recursions,) + x.shape[:2], bool)}
    return x, None if cache is None else tuple(new_cache), _with_fractions(aux)

  def _routed(self, x, positions, caps, cache, inference):
    """Routed recursions over gathered active tokens; see __call__."""
    b, t, _ = x.shape
    rows_active = jnp.ones((b, t), bool)
    shared = None
    bce, balance = jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32)
    actives, new_cache = [], []
    if self.router == "token":
      logits = self.token_router(x)                                    # [B,T,R]
      probs = jax.nn.softmax(logits, axis=-1)
      depth = jnp.argmax(logits, axis=-1)                               # 0-based last recursion
      gate = jnp.max(probs, axis=-1)
      assigned = jax.nn.one_hot(depth, self.num_recursions, dtype=jnp.float32)
      balance = self.num_recursions * jnp.sum(jnp.mean(assigned, axis=(0, 1))
                                              * jnp.mean(probs, axis=(0, 1)))
    for r in range(self.num_recursions):
      size = t if inference else capacity_tokens(caps[r], t)
      if self.router == "expert":
        scores = self.routers[r](x)[..., 0]                             # [B,T] float32
        weight = jax.nn.sigmoid(scores)
        if caps[r] >= 1.0:
          index, valid = select_causal(rows_active, size)
        elif inference:
          index, valid = select_causal(rows_active & (scores >= 0), size)
        else:
          index, valid = select_top_k(scores, rows_active, size)
          target = token_mask(index, valid, t).astype(jnp.float32)
          per_token = sigmoid_bce(scores, target)
          bce += jnp.sum(per_token * rows_active) / jnp.maximum(jnp.sum(rows_active), 1)
      else:
        index, valid = select_causal(rows_active & (depth >= r), size)
        weight = jnp.where(depth == r, gate, 1.0)
      if self.share_kv:
        x, layers, shared = self._shared_recursion(x, positions, index, valid,
                                                   gather_tokens(weight, index),
                                                   None if cache is None else cache[r], shared)
      else:
        x, layers = self._recursion(x, index, valid, gather_tokens(weight, index),
                                    None if cache is None else cache[r])
      if cache is not None:
        new_cache.append({"count": cache[r]["count"] + jnp.sum(valid, axis=1, dtype=jnp.int32),
                          "layers": layers})
      rows_active = token_mask(index, valid, t)
      actives.append(rows_active)
    aux = {"router_bce": bce / self.num_recursions, "balance": balance,
           "active": jnp.stack(actives)}
    return x, None if cache is None else tuple(new_cache), aux

  def _recursion(self, x, index, valid, weight, cache):
    """One recursion over the gathered tokens x[b, index[b]] (weight, valid [B,C])."""
    selected = gather_tokens(x, index)
    start = 0 if cache is None else cache["count"][:, None]
    positions = start + jnp.arange(index.shape[1], dtype=jnp.int32)
    positions = jnp.broadcast_to(positions, index.shape)
    if cache is not None and index.shape[1] == 1 and not self.is_initializing():
      # Decode: early exit, the stack runs only if some row's token is still active.
      out, layers = nn.cond(jnp.any(valid), _run_stack, _skip_stack, self, selected, positions,
                            cache["layers"])
    else:
      out, layers = _run_stack(self, selected, positions,
                               None if cache is None else cache["layers"])
    if cache is not None and index.shape[1] == 1:
      layers = self._keep_inactive_states(layers, cache["layers"], valid[:, 0])
    update = weight[..., None].astype(jnp.float32) * (out.astype(jnp.float32)
                                                      - selected.astype(jnp.float32))
    return scatter_add_tokens(x, index, update, valid), layers

  def _shared_recursion(self, x, positions, index, valid, weight, cache, shared):
    """One "share_first" recursion over the gathered tokens x[b, index[b]] (weight, valid [B,C]).

    `shared` None: the first recursion (capacity 1, so index[b] = 0 .. T-1 in order); it runs the
    stack on every token, caching and returning the keys/values. Otherwise the gathered tokens'
    queries attend to `shared` at their original positions. Returns (x, block caches, shared).
    """
    selected = gather_tokens(x, index)
    selected_positions = gather_tokens(positions, index)
    if shared is None:
      out, layers, shared = self.stack(selected, positions=selected_positions,
                                       caches=None if cache is None else cache["layers"])
    else:
      layers = ()
      if cache is not None and index.shape[1] == 1 and not self.is_initializing():
        # Decode: early exit, the stack runs only if some row's token is still active.
        out = nn.cond(jnp.any(valid), _run_shared_stack, _skip_shared_stack, self, selected,
                      selected_positions, shared, index)
      else:
        out = _run_shared_stack(self, selected, selected_positions, shared, index)
    update = weight[..., None].astype(jnp.float32) * (out.astype(jnp.float32)
                                                      - selected.astype(jnp.float32))
    return scatter_add_tokens(x, index, update, valid), layers, shared

  def _keep_inactive_states(self, new_layers, old_layers, active):
    """Recurrent caches of rows whose token skipped this recursion stay as they were.

    Attention caches need no select: the skipped token's keys lie past the depth's count and are
    overwritten by the next active token before any query reads them.
    """
    def keep(new, old):
      if new.ndim == 0:  # RAT's length, one for the batch (routed RAT caches need batch 1)
        return jnp.where(jnp.all(active), new, old)
      return jnp.where(active.reshape((-1,) + (1,) * (new.ndim - 1)), new, old)

    return tuple(layers if kind in ATTENTION_KINDS else jax.tree.map(keep, layers, old)
                 for kind, layers, old in zip(self.config.layer_pattern, new_layers, old_layers))

