"""Sampling text from a trained byte-level model through its cache (prefill, then decode steps).

The model is a `LanguageModel` (returns (logits, cache)) or a `MoRLanguageModel` (returns
(logits, aux) with the cache in aux["cache"]; decode steps exit early where routers decline).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.models import init_cache
from jaxchunk.models.mor import MoRLanguageModel, init_mor_cache


def _apply_with_cache(model: nn.Module, params, tokens, cache):
  """tokens [B, T] -> (logits [B, T, vocab], the new cache) for either model class."""
  logits, out = model.apply({"params": params}, tokens, cache=cache)
  return logits, out["cache"] if isinstance(model, MoRLanguageModel) else out


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens", "temperature"))
def _generate(model: nn.Module, params, prompt, key, *, max_new_tokens: int, temperature: float):
  """prompt int32 [B, P] -> new tokens int32 [B, max_new_tokens]."""
  batch, prompt_len = prompt.shape
  new_cache = init_mor_cache if isinstance(model, MoRLanguageModel) else init_cache
  cache = new_cache(model.config, batch, prompt_len + max_new_tokens)
  logits, cache = _apply_with_cache(model, params, prompt, cache)

  def pick(logits, key):
    if temperature == 0.0:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)

  def decode(carry, key):
    last_logits, cache = carry
    token = pick(last_logits, key)
    logits, cache = _apply_with_cache(model, params, token[:, None], cache)
    return (logits[:, -1], cache), token

  keys = jax.random.split(key, max_new_tokens)
  _, tokens = jax.lax.scan(decode, (logits[:, -1], cache), keys)
  return tokens.T


def generate(model: nn.Module, params, prompt: bytes, *, max_new_tokens: int,
             temperature: float = 0.8, seed: int = 0) -> bytes:
  """Continues the byte string `prompt` by `max_new_tokens` bytes.

  temperature 0 is greedy decoding; otherwise bytes are sampled from softmax(logits / temperature).
  The prompt is prefilled into the model's cache in one call, then each byte is one decode step.
  """
  if not prompt:
    raise ValueError("prompt must hold at least one byte")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  tokens = jnp.asarray(np.frombuffer(prompt, np.uint8).astype(np.int32))[None]
  new = _generate(model, params, tokens, jax.random.key(seed), max_new_tokens=max_new_tokens,
                  temperature=float(temperature))
  return bytes(np.asarray(new[0], np.uint8))
