"""Per-request sampling: the options (`SamplingParams`) and the batched, jittable sampler.

Each request draws its t-th generated token with the key fold_in(PRNGKey(seed), t), so its samples
depend only on its own seed and logits, not on the batch it happens to share or on preemption.
Order of the transforms (as in Hugging Face `generate`): temperature, then top-k, then top-p over
the remaining tokens. temperature == 0 is greedy (argmax). The reported log-probability is that of
the chosen token under the model's distribution (log_softmax of the raw logits).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How one request is sampled and when it stops.

  Attributes:
    max_tokens: the most tokens to generate (>= 1).
    temperature: 0 for greedy, else logits are divided by it (>= 0).
    top_k: keep the k most likely tokens (0: all).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (0 < p <= 1).
    seed: the request's random seed (None: the engine picks one).
    stop_tokens: generation ends after any of these tokens (it is included in the output).
    stop: generation ends once the decoded text contains any of these strings (the text is cut
      before it); needs an engine with a tokenizer.
    logprobs: whether to report the log-probability of each generated token.
  """

  max_tokens: int = 16
  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0
  seed: int | None = None
  stop_tokens: tuple[int, ...] = ()
  stop: tuple[str, ...] = ()
  logprobs: bool = False

  def __post_init__(self):
    object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))
    object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
    if not _is_int(self.max_tokens) or self.max_tokens < 1:
      raise ValueError(f"max_tokens must be an int >= 1, got {self.max_tokens!r}")
    if not _is_number(self.temperature) or self.temperature < 0:
      raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
    if not _is_int(self.top_k) or self.top_k < 0:
      raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}")
    if not _is_number(self.top_p) or not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
    if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**32):
      raise ValueError(f"seed must be None or an int in [0, 2**32), got {self.seed!r}")
    if not all(_is_int(t) and t >= 0 for t in self.stop_tokens):
      raise ValueError(f"stop_tokens must be non-negative ints, got {self.stop_tokens!r}")
    if not all(isinstance(s, str) and s for s in self.stop):
      raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
    if not isinstance(self.logprobs, bool):
      raise ValueError(f"logprobs must be a bool, got {self.logprobs!r}")

  @classmethod
  def from_dict(cls, options: Mapping[str, Any]) -> SamplingParams:
    """Builds the params from a mapping, raising ValueError on a field it does not know."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
      raise ValueError(f"unknown sampling fields {unknown}; expected a subset of {sorted(fields)}")
    return cls(**options)


def _is_int(x) -> bool:
  return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def sample_tokens(logits: jax.Array, temperature: jax.Array, top_k: jax.Array, top_p: jax.Array,
                  seeds: jax.Array, counters: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Samples one token per row.

  Args:
    logits: [N, V] float32.
    temperature: float32 [N] (0: greedy); top_k: int32 [N] (0: off); top_p: float32 [N] (1: off).
    seeds: uint32 [N] per-request seeds; counters: int32 [N], the index of the token being drawn.

  Returns:
    (tokens int32 [N], log-probabilities float32 [N] of those tokens under softmax(logits)).
  """
  logits = logits.astype(jnp.float32)
  vocab = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

  scaled = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]
  order = jnp.argsort(-scaled, axis=-1)
  sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
  rank = jnp.arange(vocab)[None, :]
  keep = (top_k[:, None] <= 0) | (rank < top_k[:, None])
  sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep = keep & (mass_before < top_p[:, None])  # the most likely token is always kept
  sorted_logits = jnp.where(keep, sorted_logits, -jnp.inf)

  def draw(seed, counter, row):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), counter)
    return jax.random.categorical(key, row)
  choice = jax.vmap(draw)(seeds, counters, sorted_logits)
  sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
  tokens = jnp.where(temperature > 0, sampled, greedy)
  return tokens, jnp.take_along_axis(log_probs, tokens[:, None], axis=-1)[:, 0]
