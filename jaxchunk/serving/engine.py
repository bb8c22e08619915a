"""The serving engine: jitted decode and prefill steps over per-slot caches, driven by the scheduler.

The device holds one cache pytree for all `num_slots` slots (`init_engine_cache`). For a
`LanguageModel`: attention layers keep their keys/values in a shared page pool
(`jaxchunk.serving.pages`), RAT layers a `RATState` without its length (a step passes its rows'
positions instead), linear layers their per-slot recurrent state and short-conv history. For a
`MoRLanguageModel` (recursive / Mixture-of-Recursions): its own cache (`init_mor_cache`) without
"length", every leaf one row per slot: the unshared first/last blocks' caches and, per recursion,
the tokens it has processed ("count" [num_slots]) and its block caches (dense keys/values
[num_slots, max_len + 1, ...], no pages, the last position a scratch slot; with kv_strategy
"share_first" only the first recursion's). Jitted functions update it:

- decode: one token for every slot ([num_slots, 1] tokens at per-slot positions); idle slots and
  slots still in prefill are masked (their rows of the cache are kept, their page-table rows point at
  the scratch page) so they are never disturbed;
- decode_many (with `EngineConfig.decode_steps` > 1): that many decode steps in one call, each
  step's sampled tokens feeding the next on device, for steps that only decode;
- prefill: `length` tokens of one slot (its row of the cache is sliced out, continued and written
  back); lengths are powers of two up to `chunk_size`, one compilation each;
- mixed: a decode and one prefill piece in one call (one compilation per piece length), for the
  steps that have both. For a `LanguageModel` they run as two streams of one forward
  (`jaxchunk.layers.streams`): the norms, projections and MLPs run once on the S + L tokens (one
  read of every weight, one launch of every per-token kernel), only the mixers' attention and
  recurrences per stream. A recursive model runs the decode, then the piece.

A step's host arguments (tokens, positions, page tables, sampling parameters: 10 to 19 small
arrays) travel to the device as one int32 vector (`_pack`), cut back into arrays inside the jitted
function: each separate argument costs a transfer (~40 us on an H100 host).

All sample the next token on device (`sampling.sample_tokens`) and keep each slot's latest sampled
token in a device array (`last_tokens` [num_slots]) that a decode reads its input token from, so
the host need not have fetched it. A step dispatches its calls, then fetches and records the
tokens of the *previous* step while the device runs: the host's work (scheduling, dispatch, token
bookkeeping, which on a GPU costs milliseconds per step) overlaps the device instead of adding
to it, and events reach the caller one step late. After `warmup()` no call compiles again;
`num_traces` counts the traces of the step functions.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from typing import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.layers.linear_attention import init_linear_attention_cache
from jaxchunk.layers.rat import init_rat_cache
from jaxchunk.config import ATTENTION_KINDS, ModelConfig
from jaxchunk.models.mor import MoRConfig, init_mor_cache
from jaxchunk.ops.rat import RATState
from jaxchunk.serving.pages import SCRATCH_PAGE, PagePool, PageTables
from jaxchunk.serving.sampling import SamplingParams, _is_int, _is_number, sample_tokens
from jaxchunk.serving.scheduler import PrefillPiece, Request, Schedule, Scheduler, Status

_POOL_KEYS = ("k_pages", "v_pages")
# Runs of every step shape in `Engine.warmup`: the first runs op by op, the second records the
# CUDA graph, the third is the first replay.
WARMUP_RUNS = 3
# `Engine.warmup`'s timing of step shapes for `EngineConfig.mixed_step_limit`: rounds (the median
# is kept) of calls issued back to back.
CALIBRATION_ROUNDS = 3
CALIBRATION_CALLS = 8
# RAT's chunk-summary buffers. A decode step writes a row's buffer only at the slot of the chunk in
# progress (length // chunk_size, when the token completes it). For a slot that is not decoding
# (mid-prefill, or free) that slot is never read before its prefill completes the chunk and writes
# the true summary there (a request's first prefill piece clears its row), so a decode step need
# not restore inactive rows of these buffers: copying them back would move the whole buffers every
# step.
_SUMMARY_FIELDS = ("k_chunks", "v_chunks")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
  """Sizes of the engine.

  Attributes:
    num_slots: requests decoded together (the decode batch).
    max_len: the most tokens (prompt + generated) of one request; a multiple of page_size.
    page_size: tokens per KV page.
    num_pages: pages in the pool, page 0 included (scratch); default enough for every slot to hold
      max_len tokens. Must hold at least one full request.
    chunk_size: the largest prefill piece (a power of two).
    token_budget: tokens per step (decodes + prefill); default num_slots + chunk_size.
    prefill_first: the baseline scheduler (prefill whole prompts before any decode).
    cache_dtype: dtype of the KV pages and conv histories; default the model's dtype.
    decode_steps: decode tokens per slot that one step may run in a single jitted call (a
      `lax.scan` of decode steps, each sampled token fed to the next on device), when the step
      has only decodes and nothing waits (see `Scheduler.extend_decodes`). Values > 1 pay the
      host's per-step work (scheduling, dispatch, fetching tokens) once per that many tokens;
      tokens then stream in bursts of that many, and a request that stops early discards the rest
      of its burst. Outputs are the same as with 1 (sampling keys count the generated tokens).
    mixed_step_limit: a bound on the steps that decode and prefill together (Sarathi-Serve's TBT
      target): `Engine.warmup` times the decode step and each mixed step (the decode with one
      prefill piece of each length) issued back to back, as the engine issues its steps, and caps
      the pieces of steps that decode at the longest length whose step takes at most this
      multiple of the decode step's time (the shortest length when none does). Steps without
      decodes still take pieces of up to chunk_size. None: no timing, pieces up to chunk_size.
      On the 350M RAT+local preset's heavy load trace (H100) the cap did not pay: a mixed step's
      cost is mostly per piece, so shorter pieces made more slow steps (docs/serving.md).
    pack_projections: serve a `LanguageModel` from `LanguageModel.pack_projections` (each
      block's projections of one input in one kernel, packed once at construction: one matmul
      per group in every step; outputs equal up to float rounding; `Engine.variables` then
      holds the packed kernels). On an H100 at 4K context and 64 slots it makes RAT+local's
      decode 6% faster (2.18 -> 2.06 ms per token) and leaves attention's unchanged.
  """

  num_slots: int = 8
  max_len: int = 256
  page_size: int = 16
  num_pages: int | None = None
  chunk_size: int = 64
  token_budget: int | None = None
  prefill_first: bool = False
  cache_dtype: str | None = None
  decode_steps: int = 1
  mixed_step_limit: float | None = None
  pack_projections: bool = True

  def __post_init__(self):
    for name in ("num_slots", "max_len", "page_size", "chunk_size", "decode_steps"):
      if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
        raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
    for name in ("num_pages", "token_budget"):
      if getattr(self, name) is not None and not _is_int(getattr(self, name)):
        raise ValueError(f"{name} must be an int or None, got {getattr(self, name)!r}")
    for name in ("prefill_first", "pack_projections"):
      if not isinstance(getattr(self, name), bool):
        raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
    if self.max_len % self.page_size:
      raise ValueError(f"max_len ({self.max_len}) must be a multiple of page_size "
                       f"({self.page_size})")
    if self.chunk_size & (self.chunk_size - 1):
      raise ValueError(f"chunk_size must be a power of two, got {self.chunk_size}")
    if self.num_pages is not None and self.num_pages - 1 < self.pages_per_seq:
      raise ValueError(f"num_pages ({self.num_pages}) must exceed the {self.pages_per_seq} pages "
                       "of one max_len request (page 0 is scratch)")
    if self.mixed_step_limit is not None and not (
        _is_number(self.mixed_step_limit) and self.mixed_step_limit >= 1):
      raise ValueError(f"mixed_step_limit must be a number >= 1 or None, got "
                       f"{self.mixed_step_limit!r}")
    if self.token_budget is not None and self.token_budget < self.num_slots + 1:
      raise ValueError(f"token_budget ({self.token_budget}) must exceed num_slots "
                       f"({self.num_slots}) so prefills always progress")

  @property
  def pages_per_seq(self) -> int:
    return self.max_len // self.page_size

  @property
  def pool_pages(self) -> int:
    return self.num_slots * self.pages_per_seq + 1 if self.num_pages is None else self.num_pages

  @property
  def budget(self) -> int:
    return self.num_slots + self.chunk_size if self.token_budget is None else self.token_budget


@dataclasses.dataclass
class StreamEvent:
  """One generated token of a request (or its end: `finished` with a `finish_reason`)."""

  request_id: int
  token: int | None
  logprob: float | None
  text: str            # new text since the previous event ("" without a tokenizer)
  finished: bool
  finish_reason: str | None


@dataclasses.dataclass
class RequestOutput:
  """The result of a finished request."""

  request_id: int
  prompt: list[int]
  tokens: list[int]
  text: str | None
  logprobs: list[float] | None
  finish_reason: str
  arrival_time: float
  first_token_time: float | None
  token_times: list[float]


def _check_servable(config: MoRConfig) -> None:
  """Raises a ValueError for a recursive model the engine cannot serve exactly.

  A routed `RecursiveBlock` with RAT layers decodes one row at a time (its RAT caches hold one
  length for the batch while rows route apart), but the engine decodes all slots in one batch.
  """
  if config.router is not None and "rat" in config.model.layer_pattern:
    raise ValueError(f"Engine cannot serve a MoR model with router={config.router!r} and RAT "
                     f"layers in its shared stack {config.model.layer_pattern}: routed RAT caches "
                     "decode one row at a time; use router=None or a stack without 'rat'")


def _per_slot_rat_lengths(cache, slots: int):
  """`cache` with each `RATState`'s scalar length replaced by zeros [slots] (one per slot)."""
  return jax.tree.map(
      lambda x: x._replace(length=jnp.zeros((slots,), jnp.int32)) if isinstance(x, RATState) else x,
      cache, is_leaf=lambda x: isinstance(x, RATState))


def init_engine_cache(config: ModelConfig | MoRConfig, engine_config: EngineConfig):
  """The caches of all slots, every leaf zeros.

  `LanguageModel` (a ModelConfig): a tuple of per-layer caches, page pools
  {"k_pages", "v_pages": [pool_pages, page_size, Hk, D]} for attention, per-slot states otherwise
  (a `RATState`'s length None: the steps set it from their positions, `Engine._attach`).
  `MoRLanguageModel` (a MoRConfig): `init_mor_cache` for num_slots rows of max_len + 1 tokens
  without its "length" (dense keys/values [num_slots, max_len + 1, Hk, D], position max_len a
  scratch slot); every leaf has the slot axis first.

  The layout is traced (`jax.eval_shape`) and each leaf then allocated once, as a distinct buffer
  (the step functions donate the cache): building the caches and then copying them held two at
  the peak (an H100 ran out of memory at 96 slots of 4K tokens). Every leaf of an empty cache is
  zeros: `_clear_row_if` empties a slot's row by zeroing it.
  """
  layout = jax.eval_shape(lambda: _cache_layout(config, engine_config))
  return jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), layout)


def _cache_layout(config: ModelConfig | MoRConfig, engine_config: EngineConfig):
  """`init_engine_cache`'s tree, built from the model's cache initialisers (traced only)."""
  slots, max_len = engine_config.num_slots, engine_config.max_len
  if isinstance(config, MoRConfig):
    dtype = jnp.dtype(engine_config.cache_dtype or config.model.dtype)
    # One position more than max_len: the scratch position of slots a decode step does not serve.
    cache = init_mor_cache(config, slots, max_len + 1, dtype)
    del cache["length"]  # a step passes its positions instead
    return _per_slot_rat_lengths(cache, slots)
  dtype = jnp.dtype(engine_config.cache_dtype or config.dtype)
  layers = []
  for kind in config.layer_pattern:
    if kind in ATTENTION_KINDS:
      shape = (engine_config.pool_pages, engine_config.page_size, config.num_kv_heads,
               config.head_dim)
      layers.append({"k_pages": jnp.zeros(shape, dtype), "v_pages": jnp.zeros(shape, dtype)})
    elif kind == "rat":
      layers.append(init_rat_cache(config, slots, max_len, dtype)._replace(length=None))
    else:
      layers.append(init_linear_attention_cache(config, kind, slots, max_len, dtype))
  return tuple(layers)


def _is_pool(path) -> bool:
  return any(getattr(entry, "key", None) in _POOL_KEYS for entry in path)


def _take_row(cache, slot):
  """Slot `slot`'s view of the cache: per-slot leaves sliced to batch 1, pools whole."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if _is_pool(path) else jax.lax.dynamic_slice_in_dim(x, slot, 1, 0), cache)


def _clear_row_if(clear, row):
  """`row` (from `_take_row`) with its per-slot leaves zeroed (the empty cache) where `clear`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x if _is_pool(path) else jnp.where(clear, jnp.zeros_like(x), x), row)


def _put_row(cache, row, slot):
  """Writes a batch-1 view (from `_take_row`, updated) back; its pools replace the cache's."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x, r: r if _is_pool(path) else jax.lax.dynamic_update_slice_in_dim(x, r, slot, 0),
      cache, row)


def _is_dense_kv(path) -> bool:
  """Whether a cache leaf is a dense attention cache's keys or values ({"k", "v"} [S, L, Hk, D] of
  a recursive model; a short-conv history {"conv": {"q", "k", "v"}} is not)."""
  keys = [getattr(entry, "key", None) for entry in path]
  return keys[-1] in ("k", "v") and (len(keys) < 2 or keys[-2] != "conv")


def _kept_whole(path) -> bool:
  """Whether `_select_rows` takes a leaf from the new cache whole, unselected: pools, RAT summary
  buffers (see `_SUMMARY_FIELDS`) and dense KV caches (written at the scratch position by rows
  that are not active: `Engine._decode_fn`)."""
  return (_is_pool(path) or _is_dense_kv(path)
          or any(getattr(e, "name", None) in _SUMMARY_FIELDS for e in path))


def _select_rows(active, new, old):
  """Per-slot leaves from `new` where active [S] else from `old`; those `_kept_whole` from
  `new`."""
  def select(path, n, o):
    if _kept_whole(path):
      return n
    return jnp.where(active.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
  return jax.tree_util.tree_map_with_path(select, new, old)


def _select_rows_and_put_row(active, new, old, row, slot):
  """`_put_row(_select_rows(active, new, old), row, slot)`, the selected leaves in one pass:
  row `slot` joins the select (one fusion per leaf instead of a select and an update)."""
  def put(path, n, o, r):
    if _is_pool(path):
      return r
    if _kept_whole(path):
      return jax.lax.dynamic_update_slice_in_dim(n, r, slot, 0)
    shape = (-1,) + (1,) * (n.ndim - 1)
    rows = jnp.arange(n.shape[0])
    return jnp.where((rows == slot).reshape(shape), r,
                     jnp.where(active.reshape(shape), n, o))
  return jax.tree_util.tree_map_with_path(put, new, old, row)


def longest_piece_within(limit: float, decode_time: float, mixed_times: dict[int, float]) -> int:
  """The longest piece length L whose mixed step (mixed_times[L], seconds) takes at most `limit`
  times the decode step's `decode_time`; the shortest length when none does."""
  fits = [length for length, seconds in mixed_times.items() if seconds <= limit * decode_time]
  return max(fits) if fits else min(mixed_times)


def _pack(groups) -> tuple[np.ndarray, tuple]:
  """Host arrays (tuples of int32 / uint32 / float32 / bool arrays or scalars) -> (one int32
  vector of all their bits, the layout that `_unpack` cuts it back by).

  A jitted call transfers each host argument separately (~40 us each on an H100 host); a step
  has 10 to 19 of them, so they travel as one.
  """
  arrays = [np.asarray(a) for group in groups for a in group]
  layout = tuple(tuple((np.shape(a), np.asarray(a).dtype.name) for a in group) for group in groups)
  bits = []
  for a in arrays:
    a = a.astype(np.int32) if a.dtype == np.bool_ else a
    if a.dtype.itemsize != 4:
      raise ValueError(f"host arguments must have 4-byte dtypes or bool, got {a.dtype}")
    bits.append(np.ascontiguousarray(a).reshape(-1).view(np.int32))
  return np.concatenate(bits), layout


def _unpack(packed, layout) -> list[tuple]:
  """The argument groups of `_pack` from its int32 vector (in a jitted function)."""
  groups, offset = [], 0
  for group in layout:
    arrays = []
    for shape, dtype in group:
      size = int(np.prod(shape, dtype=np.int64))
      bits = packed[offset:offset + size].reshape(shape)
      offset += size
      arrays.append(bits != 0 if dtype == "bool"
                    else jax.lax.bitcast_convert_type(bits, jnp.dtype(dtype)))
    groups.append(tuple(arrays))
  return groups


def _samples(tokens, logprobs):
  """Sampled tokens [..., n] and their log-probs [..., n] as one int32 array [..., 2, n] (the
  log-probs' bits in row 1), fetched by the host in one transfer."""
  return jnp.stack([tokens.astype(jnp.int32),
                    jax.lax.bitcast_convert_type(logprobs.astype(jnp.float32), jnp.int32)], -2)


def _with_samples(cache, last, tokens, logprobs):
  """A step function's outputs with its tokens and log-probs [..., n] as one `_samples` array."""
  return cache, last, _samples(tokens, logprobs)


def _jit_packed(step):
  """jax.jit of `step(variables, cache, last, *groups)` (groups: tuples of arrays) as a function
  of (variables, cache, last, packed, layout) with `_pack`'s outputs; cache and last donated."""
  return jax.jit(lambda variables, cache, last, packed, layout:
                 step(variables, cache, last, *_unpack(packed, layout)),
                 static_argnums=4, donate_argnums=(1, 2))


class Engine:
  """Continuous-batching generation for a `LanguageModel` or a `MoRLanguageModel`.

  Usage: `Engine(model, params, EngineConfig(...)).generate(prompts, SamplingParams(...))`, or
  `submit` / `step` / `cancel` to drive it, or `stream` for one request's tokens as they come.
  Thread-safe: `submit` and `cancel` may be called while another thread runs `step`.
  """

  def __init__(self, model: nn.Module, params, config: EngineConfig = EngineConfig(), *,
               tokenizer=None, clock: Callable[[], float] = time.perf_counter):
    self.model = model
    # A MoRLanguageModel: its cache is per-slot dense rows (`init_engine_cache`), never paged.
    self.recursive = isinstance(model.config, MoRConfig)
    if self.recursive:
      _check_servable(model.config)
    self.model_config: ModelConfig = model.config.model if self.recursive else model.config
    self._scratch_position = config.max_len if self.recursive else 0
    self.config = config
    self.tokenizer = tokenizer
    self.clock = clock
    params = nn.meta.unbox(params)
    self.variables = params if "params" in params else {"params": params}
    if config.pack_projections and not self.recursive:
      self.variables = model.pack_projections(self.variables)
    self.kinds = self.model_config.layer_pattern
    has_attention = not self.recursive and any(kind in ATTENTION_KINDS for kind in self.kinds)
    self.pool = PagePool(config.pool_pages, config.page_size) if has_attention else None
    # Only sliding-window attention layers: pages behind every layer's window are freed.
    window = None if "attention" in self.kinds else self.model_config.window
    tables = (PageTables(self.pool, config.num_slots, config.pages_per_seq, window)
              if has_attention else None)
    self.scheduler = Scheduler(config.num_slots, max_len=config.max_len,
                               chunk_size=config.chunk_size,
                               token_budget=config.budget, tables=tables,
                               prefill_first=config.prefill_first)
    self.cache = init_engine_cache(model.config, config)
    self.num_traces = 0
    self.num_multi_step_decodes = 0  # jitted calls that ran `decode_steps` decode tokens
    self.num_mixed_steps = 0  # jitted calls that ran a decode and a prefill piece together
    self.last_schedule: Schedule | None = None  # the latest step's work (for monitoring)
    self.last_step_times: dict[str, float] = {}  # where the latest step's host time went
    # Seconds per call of each step shape, timed by `warmup` for `mixed_step_limit` (else empty).
    self.step_times: dict[str, float] = {}
    self.last_tokens = jnp.zeros((config.num_slots,), jnp.int32)  # each slot's latest sample
    # The previous step's results, not fetched yet: (request, column, samples) as in `step`.
    self._pending: list[tuple[Request, int, jax.Array]] = []
    # The jitted steps, each called through `_run` with its host arrays packed (`_pack`); each
    # returns (cache, last, samples) with its tokens and log-probs as one array (`_samples`): a
    # decode's [2, num_slots], a multi-step decode's [steps, 2, num_slots], a prefill's [2, 1],
    # a mixed step's [2, num_slots + 1] (the piece's in the last column).
    self._decode = _jit_packed(
        lambda v, c, last, args: _with_samples(*self._decode_fn(v, c, last, *args)))
    self._decode_many = _jit_packed(
        lambda v, c, last, args: _with_samples(*self._decode_many_fn(v, c, last, *args)))
    self._prefill = _jit_packed(
        lambda v, c, last, args: _with_samples(*self._prefill_fn(v, c, last, *args)))
    self._mixed = _jit_packed(lambda *args: _with_samples(*self._mixed_fn(*args)))
    self._requests: dict[int, Request] = {}
    self._outputs: dict[int, RequestOutput] = {}
    self._events: dict[int, list[StreamEvent]] = {}
    self._text_sent: dict[int, int] = {}
    self._times: dict[int, list[float]] = {}
    self._ids = itertools.count()
    self._seeds = np.random.default_rng(0)
    self._lock = threading.RLock()

  # ------------------------------------------------------------------------------------------
  # Jitted step functions.

  def _attach(self, layers, table, lengths):
    """The layer caches as the model takes them: attention pools with page tables table [B,
    pages_per_seq], RAT states with lengths [B] (the rows' positions: the engine keeps no RAT
    length, so rows need no clearing or selecting of one)."""
    def attach(kind, c):
      if kind in ATTENTION_KINDS:
        return dict(c, page_table=table)
      return c._replace(length=lengths) if kind == "rat" else c
    return tuple(attach(kind, c) for kind, c in zip(self.kinds, layers))

  def _detach(self, layers):
    """The inverse of `_attach`: the layer caches in the engine's layout."""
    def detach(kind, c):
      if kind in ATTENTION_KINDS:
        return {k: c[k] for k in _POOL_KEYS}
      return c._replace(length=None) if kind == "rat" else c
    return tuple(detach(kind, c) for kind, c in zip(self.kinds, layers))

  def _apply(self, variables, tokens, positions, cache, table):
    """The model on tokens [B, T] at positions [B, T] (consecutive per row), continuing `cache`
    (B slots' rows of the engine's cache; table [B, pages_per_seq] their page tables, unused by a
    recursive model). Returns (logits [B, T, vocab], the updated cache in the engine's layout)."""
    length = positions[:, 0]
    if self.recursive:
      logits, aux = self.model.apply(variables, tokens, positions=positions,
                                     cache=dict(cache, length=length))
      return logits, {name: aux["cache"][name] for name in cache}
    logits, new = self.model.apply(variables, tokens, positions=positions,
                                   cache={"length": length,
                                          "layers": self._attach(cache, table, length)})
    return logits, self._detach(new["layers"])

  def _decode_inputs(self, last, tokens, from_last, positions, table, active):
    """A decode's (tokens, positions, table) [S] / [S, pages]: a row's token is last[row] where
    from_last; rows not active read and write the scratch page at the scratch position."""
    tokens = jnp.where(from_last, last, tokens)
    table = jnp.where(active[:, None], table, SCRATCH_PAGE)
    # Rows not decoding run at a scratch position: 0 for a LanguageModel (their page-table rows
    # name the scratch page; RAT writes no summary at position 0), max_len for a recursive model
    # (its dense caches have a slot there that no query reads). A routed recursion writes at its
    # token count instead, which the row's next real token overwrites (counts are restored).
    positions = jnp.where(active, positions, self._scratch_position)
    return tokens, positions, table

  def _prefill_row(self, cache, slot, start, length: int):
    """(slot's row of the cache, cleared when start == 0, and the positions [1, length] of a
    piece at `start`): a request's first piece starts from an empty row whatever an earlier
    request left in the slot."""
    row = _clear_row_if(start == 0, _take_row(cache, slot))
    return row, start + jnp.arange(length, dtype=jnp.int32)[None]

  def _decode_fn(self, variables, cache, last, tokens, from_last, positions, table, active,
                 temperature, top_k, top_p, seeds, counters):
    """One token for every slot: last/tokens/from_last/positions/active [S], table
    [S, pages_per_seq]. A row's input token is last[row] where from_last, else tokens[row];
    returns (cache, last with the active rows' samples, samples [S], their log-probs [S])."""
    self.num_traces += 1
    tokens, positions, table = self._decode_inputs(last, tokens, from_last, positions, table,
                                                   active)
    logits, new = self._apply(variables, tokens[:, None], positions[:, None], cache, table)
    new_cache = _select_rows(active, new, cache)
    next_tokens, logprobs = sample_tokens(logits[:, -1], temperature, top_k, top_p, seeds, counters)
    return new_cache, jnp.where(active, next_tokens, last), next_tokens, logprobs

  def _decode_many_fn(self, variables, cache, last, tokens, from_last, positions, table, active,
                      temperature, top_k, top_p, seeds, counters):
    """`decode_steps` decode steps (a scan of `_decode_fn`), each reading its input tokens from
    the previous one's samples; returns (cache, last, tokens [steps, S], logprobs [steps, S])."""
    def one(carry, _):
      cache, last, from_last, positions, counters = carry
      cache, last, tokens_, logprobs = self._decode_fn(
          variables, cache, last, tokens, from_last, positions, table, active, temperature, top_k,
          top_p, seeds, counters)
      return (cache, last, jnp.ones_like(from_last), positions + 1, counters + 1), (tokens_,
                                                                                    logprobs)
    (cache, last, *_), (tokens, logprobs) = jax.lax.scan(
        one, (cache, last, from_last, positions, counters), None, length=self.config.decode_steps)
    return cache, last, tokens, logprobs

  def _prefill_fn(self, variables, cache, last, slot, tokens, start, table_row, temperature, top_k,
                  top_p, seeds, counters):
    """tokens [1, C] of slot `slot` at positions start .. start + C - 1; table_row [1, pages].
    A piece at start 0 (a request's first, after admission or preemption) starts from an empty
    row: whatever an earlier request left in the slot is cleared in the same call.
    Returns (cache, last with the sample at `slot`, sample [1], its log-prob [1])."""
    self.num_traces += 1
    row, positions = self._prefill_row(cache, slot, start, tokens.shape[1])
    logits, new = self._apply(variables, tokens, positions, row, table_row)
    # Orders the row's write-back after every read of the cache (as in `_mixed_fn`): RAT's
    # attention reads the summaries the row started from.
    logits, new = jax.lax.optimization_barrier((logits, new))
    cache = _put_row(cache, new, slot)
    next_tokens, logprobs = sample_tokens(logits[:, -1], temperature, top_k, top_p, seeds, counters)
    return cache, last.at[slot].set(next_tokens[0]), next_tokens, logprobs

  def _mixed_fn(self, variables, cache, last, decode_args, prefill_args):
    """`_decode_fn` and `_prefill_fn` (their arguments after `last`, as tuples) in one call;
    returns (cache, last, tokens [S + 1], logprobs [S + 1]): the decode's, then the piece's.

    A `LanguageModel` runs both as streams of one forward (`jaxchunk.layers.streams`): the
    decodes [S, 1] and the piece [1, L] share every weight read and kernel launch of the per-token
    work; the prefill continues its slot's row as it was before the step (the decode leaves an
    inactive row as it was), and its row is written back after the decode's rows are selected.
    A recursive model runs the decode, then the prefill.
    """
    if self.recursive:
      cache, last, tokens, logprobs = self._decode_fn(variables, cache, last, *decode_args)
      # The prefill writes the states the decode read; without an order between those reads and
      # writes (the barrier makes the decode's results precede anything after it) XLA copies the
      # states instead of updating them in place.
      cache, last, tokens, logprobs = jax.lax.optimization_barrier((cache, last, tokens, logprobs))
      cache, last, token, logprob = self._prefill_fn(variables, cache, last, *prefill_args)
      return cache, last, jnp.append(tokens, token), jnp.append(logprobs, logprob)
    self.num_traces += 1
    tokens, from_last, positions, table, active, *decode_sampling = decode_args
    slot, piece, start, table_row, *prefill_sampling = prefill_args
    row, piece_positions = self._prefill_row(cache, slot, start, piece.shape[1])
    # The row is sliced out before anything updates the cache in place: without this order XLA
    # would copy the per-slot buffers (RAT summaries, recurrent states) to keep them for the slice.
    row, cache = jax.lax.optimization_barrier((row, cache))
    tokens, positions, table = self._decode_inputs(last, tokens, from_last, positions, table,
                                                   active)
    decode_layers = self._attach(cache, table, positions)
    row_layers = self._attach(row, table_row, jnp.reshape(start, (1,)))
    num_slots, length = tokens.shape[0], piece.shape[1]
    logits, new = self.model.apply(
        variables, jnp.concatenate([tokens, piece[0]])[None],
        positions=jnp.concatenate([positions, piece_positions[0]])[None],
        cache={"layers": tuple(zip(decode_layers, row_layers))},
        streams=((num_slots, 1), (1, length)))
    # The piece's row is written into the decode's new buffers in place. The barrier orders that
    # write after every read of them in the forward (RAT's decode attention reads the summary
    # buffers it has just appended to); nothing else orders them, and XLA keeps such an order by
    # copying the buffers (a mixed step of the 350M RAT+local preset spent 0.31 ms in memcpy on
    # an H100 without this barrier, about two copies of its RAT summaries).
    logits, new = jax.lax.optimization_barrier((logits, new))
    new_decode = self._detach(tuple(d for d, _ in new["layers"]))
    new_row = self._detach(tuple(r for _, r in new["layers"]))
    cache = _select_rows_and_put_row(active, new_decode, cache, new_row, slot)
    # Both streams' rows sampled together (one launch of each sampling kernel; rows are drawn
    # independently): the decodes' last logits, then the piece's.
    tokens, logprobs = sample_tokens(
        jnp.concatenate([logits[0, :num_slots], logits[0, -1:]]),
        *(jnp.concatenate([d, p]) for d, p in zip(decode_sampling, prefill_sampling)))
    last = jnp.where(active, tokens[:num_slots], last).at[slot].set(tokens[num_slots])
    return cache, last, tokens, logprobs

  # ------------------------------------------------------------------------------------------
  # Host side.

  @property
  def piece_lengths(self) -> list[int]:
    """The prefill piece lengths the scheduler may pick (powers of two from chunk_size down to
    1), each one compiled shape of the prefill and of the mixed call."""
    return [self.config.chunk_size >> i for i in range(self.config.chunk_size.bit_length())]

  def warmup(self, runs: int = WARMUP_RUNS) -> None:
    """Compiles every step shape (decode, each prefill piece length alone and with a decode) and
    runs each `runs` times on slot 0.

    On a GPU, XLA runs a new executable op by op the first time and records its CUDA graph (a few
    ms to tens of ms for a model's step) the second; running every shape twice or more here keeps
    both out of the steps that serve requests. The calls write only the scratch page of the pools,
    but every slot's per-slot states (the decode runs all slots, the pieces slot 0), which each
    slot's next request clears with its first piece; call it while the engine is idle.

    With `EngineConfig.mixed_step_limit`, then times the step shapes (`step_times`) and sets the
    longest prefill piece of a step that decodes (`scheduler.mixed_chunk_size`) from them.
    """
    if runs < 1:
      raise ValueError(f"runs must be >= 1, got {runs}")
    with self._lock:
      if self.scheduler.has_work():
        raise RuntimeError("warmup() must run before any request is submitted")
      decode_args = self._idle_decode_args()
      mixed_decode_args = self._idle_decode_args(active=False)
      prefill_args = [self._idle_prefill_args(length) for length in self.piece_lengths]
      for _ in range(runs):
        for decode in [self._decode] + [self._decode_many] * (self.config.decode_steps > 1):
          self._run(decode, decode_args)
        for piece_args in prefill_args:
          self._run(self._prefill, piece_args)
          self._run(self._mixed, mixed_decode_args, piece_args)
      jax.block_until_ready(self.last_tokens)
      if self.config.mixed_step_limit is not None:
        self.step_times = self._time_steps()
        self.scheduler.mixed_chunk_size = longest_piece_within(
            self.config.mixed_step_limit, self.step_times["decode"],
            {length: self.step_times[f"mixed {length}"] for length in self.piece_lengths})

  def _time_steps(self) -> dict[str, float]:
    """Seconds per call of the decode ("decode") and of each mixed step ("mixed L"), every slot
    decoding at position max_len // 2 (at most max_len - chunk_size) and the piece on slot 0
    starting there, each shape's calls issued back to back; the median of CALIBRATION_ROUNDS
    rounds that time every shape in turn. The calls write the scratch page and every slot's
    per-slot states, which each slot's next request clears with its first piece."""
    position = max(0, min(self.config.max_len // 2, self.config.max_len - self.config.chunk_size))
    decode_args = self._idle_decode_args(position=position)
    shapes = {"decode": (self._decode, (decode_args,))}
    for length in self.piece_lengths:
      piece_args = self._idle_prefill_args(length, start=position)
      shapes[f"mixed {length}"] = (self._mixed, (decode_args, piece_args))
    times = {name: [] for name in shapes}
    for _ in range(CALIBRATION_ROUNDS):
      for name, (step, groups) in shapes.items():
        jax.block_until_ready(self.last_tokens)
        start = time.perf_counter()
        for _ in range(CALIBRATION_CALLS):
          self._run(step, *groups)
        jax.block_until_ready(self.last_tokens)
        times[name].append((time.perf_counter() - start) / CALIBRATION_CALLS)
    return {name: float(np.median(seconds)) for name, seconds in times.items()}

  def submit(self, prompt: Sequence[int], params: SamplingParams = SamplingParams()) -> int:
    """Queues a request; returns its id. Raises ValueError on a bad prompt or params."""
    if not isinstance(params, SamplingParams):
      raise ValueError(f"params must be a SamplingParams, got {type(params).__name__}")
    prompt = self._check_prompt(prompt, params)
    if params.stop and self.tokenizer is None:
      raise ValueError("stop strings need an engine with a tokenizer")
    with self._lock:
      request_id = next(self._ids)
      seed = int(self._seeds.integers(2**32)) if params.seed is None else params.seed
      request = Request(request_id, prompt, params, seed, self.clock(), tokens=list(prompt))
      self._requests[request_id] = request
      self._events[request_id] = []
      self._text_sent[request_id] = 0
      self._times[request_id] = []
      self.scheduler.add(request)
    return request_id

  def cancel(self, request_id: int) -> None:
    """Ends a request now (its slot and pages are freed); finished requests are left alone."""
    with self._lock:
      request = self._requests.get(request_id)
      if request is not None and request.status is not Status.FINISHED:
        self._finish(request, "cancelled")

  def has_work(self) -> bool:
    with self._lock:
      return self.scheduler.has_work() or any(
          request.status is not Status.FINISHED for request, *_ in self._pending)

  def step(self) -> list[StreamEvent]:
    """Runs one scheduled step; returns the events (new tokens, ends) of the step before it.

    The step's calls are dispatched first; then the previous step's tokens are fetched and
    recorded while the device runs this one (its decodes read their input tokens from the
    device). A step with nothing to run only fetches. `last_step_times` holds the host's seconds
    in each part of the step: "schedule", "dispatch" (argument packing and the jitted calls until
    they return), "fetch" (waiting for the previous step's samples) and "record" (appending them
    to their requests).
    """
    with self._lock:
      start = self.clock()
      schedule = self.last_schedule = self.scheduler.schedule()
      scheduled = self.clock()
      # (request, column, samples): the request's tokens and log-probs are samples[..., :, column]
      results = []
      pieces = schedule.prefills
      if schedule.decodes and pieces:  # one piece (the scheduler's rule): one call for both
        (piece,) = pieces
        pieces = []
        self.num_mixed_steps += 1
        samples = self._run(self._mixed, self._decode_args(schedule.decodes),
                            self._prefill_args(piece))
        results.extend((request, request.slot, samples) for request in schedule.decodes)
        if piece.completes:
          results.append((piece.request, -1, samples))
      elif schedule.decodes:
        many = self.scheduler.extend_decodes(schedule.decodes, self.config.decode_steps - 1)
        decode = self._decode_many if many else self._decode
        self.num_multi_step_decodes += many
        samples = self._run(decode, self._decode_args(schedule.decodes))
        results.extend((request, request.slot, samples) for request in schedule.decodes)
      for piece in pieces:
        samples = self._run(self._prefill, self._prefill_args(piece))
        if piece.completes:
          results.append((piece.request, 0, samples))
      for request, _, samples in results:
        request.pending += samples.shape[0] if samples.ndim == 3 else 1
        if request.status is Status.PREFILL:  # its prompt is in the cache: it decodes next
          request.status = Status.DECODE
      dispatched = self.clock()
      previous, self._pending = self._pending, results
      fetched = self._fetch(previous)
      done = self.clock()
      events = self._process(previous, fetched, done)
      self.last_step_times = {"schedule": scheduled - start, "dispatch": dispatched - scheduled,
                              "fetch": done - dispatched, "record": self.clock() - done}
      return events

  @staticmethod
  def _fetch(results) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """A step's samples on the host, by id of their device array: (tokens, logprobs), each
    [..., n] (one transfer per array, started when the step was dispatched)."""
    fetched = {}
    for _, _, samples in results:
      if id(samples) not in fetched:
        host = np.asarray(samples)
        fetched[id(samples)] = host[..., 0, :], host[..., 1, :].view(np.float32)
    return fetched

  def _process(self, results, fetched, now: float) -> list[StreamEvent]:
    """Records a step's fetched samples (`_fetch`) per request at time `now`; returns the events
    produced."""
    for request, column, samples in results:
      tokens, logprobs = fetched[id(samples)]
      tokens, logprobs = tokens[..., column], logprobs[..., column]
      tokens, logprobs = np.atleast_1d(tokens), np.atleast_1d(logprobs)
      request.pending -= len(tokens)
      for token, logprob in zip(tokens, logprobs):
        self._append(request, int(token), float(logprob), now)  # ignored once it finished
    events = [event for events in self._events.values() for event in events]
    for request_id in self._events:
      self._events[request_id] = []
    for event in events:
      if event.finished:
        self._events.pop(event.request_id, None)
        self._text_sent.pop(event.request_id, None)
    return events

  def generate(self, prompts: Sequence[Sequence[int]],
               params: SamplingParams | Sequence[SamplingParams] = SamplingParams()
               ) -> list[RequestOutput]:
    """Generates for every prompt (one params for all, or one each); outputs in prompt order."""
    params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    if len(params) != len(prompts):
      raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
    ids = [self.submit(prompt, p) for prompt, p in zip(prompts, params)]
    while not all(i in self._outputs for i in ids):
      self.step()
    return [self.pop_output(i) for i in ids]

  def stream(self, prompt: Sequence[int], params: SamplingParams = SamplingParams()
             ) -> Iterator[StreamEvent]:
    """Yields the events of one request as it runs (stepping the engine); closing it cancels."""
    request_id = self.submit(prompt, params)
    try:
      while True:
        for event in self.step():
          if event.request_id == request_id:
            yield event
            if event.finished:
              return
    finally:
      self.cancel(request_id)
      self._outputs.pop(request_id, None)

  def output(self, request_id: int) -> RequestOutput | None:
    """The result of a finished request (None while it runs)."""
    return self._outputs.get(request_id)

  def pop_output(self, request_id: int) -> RequestOutput:
    """Removes and returns the result of a finished request."""
    with self._lock:
      self._requests.pop(request_id, None)
      return self._outputs.pop(request_id)

  # ------------------------------------------------------------------------------------------

  def _check_prompt(self, prompt, params: SamplingParams) -> list[int]:
    vocab = self.model_config.vocab_size
    # Checked as one NumPy array (a few µs per thousand tokens, where a Python loop over them
    # costs the engine's thread ~0.1 ms: a serving loop's arrivals land between its steps).
    try:
      tokens = np.asarray(prompt)
    except (TypeError, ValueError):
      tokens = None
    if tokens is None or tokens.ndim != 1:
      raise ValueError("prompt must be a sequence of token ids")
    if not tokens.size:
      raise ValueError("prompt is empty")
    if not np.issubdtype(tokens.dtype, np.integer):
      raise ValueError("prompt must be a sequence of token ids")
    if tokens.min() < 0 or tokens.max() >= vocab:
      raise ValueError(f"prompt token ids must lie in [0, {vocab})")
    prompt = tokens.tolist()
    total = len(prompt) + params.max_tokens
    if total > self.config.max_len:
      raise ValueError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) = "
                       f"{total} exceeds the engine's max_len {self.config.max_len}")
    if any(t >= vocab for t in params.stop_tokens):
      raise ValueError(f"stop_tokens must lie in [0, {vocab})")
    return prompt

  def _run(self, step, *groups) -> jax.Array:
    """Runs a jitted step (`_decode`, `_decode_many`, `_prefill`, `_mixed`) on its host
    arguments (one tuple of arrays per argument group), updating the cache and `last_tokens`;
    returns the step's samples (`_samples`), whose copy to the host starts as soon as the
    device has computed them."""
    packed, layout = _pack(groups)
    self.cache, self.last_tokens, samples = step(self.variables, self.cache, self.last_tokens,
                                                 packed, layout)
    samples.copy_to_host_async()
    return samples

  def _table(self) -> np.ndarray:
    if self.scheduler.tables is None:
      return np.zeros((self.config.num_slots, self.config.pages_per_seq), np.int32)
    return self.scheduler.tables.table.copy()

  def _sampling_arrays(self, requests: list[Request | None]):
    """(temperature, top_k, top_p, seeds, counters) arrays of the rows' requests (None: greedy);
    the counters count the pending tokens as generated."""
    temperature = np.zeros((len(requests),), np.float32)
    top_k = np.zeros((len(requests),), np.int32)
    top_p = np.ones((len(requests),), np.float32)
    seeds = np.zeros((len(requests),), np.uint32)
    counters = np.zeros((len(requests),), np.int32)
    for i, request in enumerate(requests):
      if request is not None:
        temperature[i] = request.params.temperature
        top_k[i] = request.params.top_k
        top_p[i] = request.params.top_p
        seeds[i] = request.seed
        counters[i] = request.num_generated + request.pending
    return temperature, top_k, top_p, seeds, counters

  def _decode_args(self, requests: list[Request]) -> tuple:
    """The arguments of `_decode_fn` after `last` for one token of each request; a request with
    pending tokens reads its input token from `last_tokens`."""
    slots = self.config.num_slots
    tokens = np.zeros((slots,), np.int32)
    from_last = np.zeros((slots,), bool)
    positions = np.zeros((slots,), np.int32)
    active = np.zeros((slots,), bool)
    rows: list[Request | None] = [None] * slots
    for request in requests:
      tokens[request.slot] = request.tokens[-1]
      from_last[request.slot] = request.pending > 0
      positions[request.slot] = len(request.tokens) - 1 + request.pending
      active[request.slot] = True
      rows[request.slot] = request
    return (tokens, from_last, positions, self._table(), active, *self._sampling_arrays(rows))

  def _idle_decode_args(self, *, position: int = 0, active: bool = True) -> tuple:
    """`_decode_fn`'s arguments after `last` on an idle engine (warm-up, benchmarks, tests): every
    slot at `position` on the scratch page, greedy, `active` or not."""
    slots = self.config.num_slots
    zeros = np.zeros((slots,), np.int32)
    return (zeros, np.zeros((slots,), bool), np.full((slots,), position, np.int32),
            np.full((slots, self.config.pages_per_seq), SCRATCH_PAGE, np.int32),
            np.full((slots,), active), *self._sampling_arrays([None] * slots))

  def _idle_prefill_args(self, length: int, *, slot: int = 0, start: int = 0) -> tuple:
    """`_prefill_fn`'s arguments after `last` on an idle engine: a piece of `length` tokens at
    `start` on `slot`'s row and the scratch page, greedy."""
    return (np.int32(slot), np.zeros((1, length), np.int32), np.int32(start),
            np.full((1, self.config.pages_per_seq), SCRATCH_PAGE, np.int32),
            *self._sampling_arrays([None]))

  def _prefill_args(self, piece: PrefillPiece) -> tuple:
    """The arguments of `_prefill_fn` after `last` for one prefill piece."""
    request = piece.request
    tokens = np.asarray([request.tokens[piece.start:piece.start + piece.length]], np.int32)
    return (np.int32(request.slot), tokens, np.int32(piece.start),
            self._table()[request.slot:request.slot + 1], *self._sampling_arrays([request]))

  def _append(self, request: Request, token: int, logprob: float, now: float) -> None:
    """Records a sampled token and ends the request when it stops."""
    if request.status is Status.FINISHED:
      return
    request.tokens.append(token)
    request.logprobs.append(logprob)
    self._times[request.request_id].append(now)
    reason = None
    text_end = None
    try:
      if token in request.params.stop_tokens:
        reason = "stop"
      elif request.params.stop:
        text = self.tokenizer.decode(request.generated)
        hits = [text.find(s) for s in request.params.stop if s in text]
        if hits:
          reason, text_end = "stop", min(hits)
      if reason is None and (request.num_generated >= request.params.max_tokens
                             or len(request.tokens) >= self.config.max_len):
        reason = "length"
      self._emit(request, token, logprob, reason, text_end)
    except Exception as error:  # a broken request (e.g. its tokenizer) ends alone
      reason = f"error: {error}"
      self._emit(request, token, logprob, reason, None)
    if reason is not None:
      self._finish(request, reason, text_end)

  def _text(self, request: Request, text_end: int | None = None) -> str:
    if self.tokenizer is None:
      return ""
    text = self.tokenizer.decode(request.generated)
    return text if text_end is None else text[:text_end]

  def _emit(self, request: Request, token, logprob, reason, text_end) -> None:
    text = self._text(request, text_end)
    sent = self._text_sent[request.request_id]
    end = len(text)
    if reason is None:  # hold back what may still become a stop string or a multi-byte character
      hold = max((len(s) - 1 for s in request.params.stop), default=0)
      end = max(sent, len(text.rstrip("\ufffd")) - hold)
    self._text_sent[request.request_id] = end
    self._events[request.request_id].append(StreamEvent(
        request.request_id, token, logprob if request.params.logprobs else None, text[sent:end],
        reason is not None, reason))

  def _finish(self, request: Request, reason: str, text_end: int | None = None) -> None:
    self.scheduler.finish(request, reason)
    times = self._times.pop(request.request_id, [])
    if reason == "cancelled":
      self._events.setdefault(request.request_id, []).append(
          StreamEvent(request.request_id, None, None, "", True, reason))
    self._outputs[request.request_id] = RequestOutput(
        request.request_id, request.prompt, request.generated,
        self._text(request, text_end) if self.tokenizer is not None else None,
        request.logprobs if request.params.logprobs else None, reason, request.arrival_time,
        times[0] if times else None, times)
