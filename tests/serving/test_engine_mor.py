"""The serving engine on recursive / Mixture-of-Recursions models (`MoRLanguageModel`) against
step-by-step full-recompute greedy decoding: fixed depth and routed (expert / token choice), both
KV strategies; staggered arrivals, chunked prefill under a token budget, more requests than slots
(slots and their per-recursion caches reused), no compilation after warm-up, unservable variants.

The reference is the model's full forward with causal inference routing (`inference=True`: expert
choice by router threshold, no capacity drops), the routing a cached decode uses; on right-padded
[N, MAX_LEN] tokens it is causal, so position i's logits depend on tokens 0..i only.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.config import ModelConfig
from jaxchunk.models.mor import MoRConfig, MoRLanguageModel
from jaxchunk.serving import Engine, EngineConfig, SamplingParams
from tests.serving.test_engine import MAX_LEN, greedy_reference, run_staggered

ENGINE = EngineConfig(num_slots=3, max_len=MAX_LEN, page_size=4, chunk_size=2, token_budget=5)
# (router, sharing, layer_pattern, kv_strategy): the default run has the expert router (early exits,
# middle_cycle, a multi-step decode); the token router with shared KV, fixed depth (the routers'
# path with every token kept) and recurrent stacks (token-by-token routed prefill, longer compiles)
# are in the slow run.
VARIANTS = [
    ("expert", "middle_cycle", ("attention",), "recursion"),
] + [pytest.param(v, marks=pytest.mark.slow) for v in [
    ("token", "cycle", ("local",), "share_first"),
    (None, "cycle", ("attention",), "recursion"),
    ("expert", "cycle", ("attention", "local"), "share_first"),
    ("token", "middle_cycle", ("attention",), "recursion"),
    ("token", "cycle", ("simple_gla",), "recursion"),
    (None, "cycle", ("rat", "local"), "recursion"),
]]


# This model's engine decodes in bursts of 4 (`decode_steps`) when nothing waits: its routers'
# early exits run inside the scanned decode.
MULTI_STEP = ("expert", "middle_cycle", ("attention",), "recursion")


def variant_id(variant) -> str:
  router, sharing, pattern, kv_strategy = variant
  return "-".join([str(router), sharing, *pattern, kv_strategy])


def mor_config(router, sharing, pattern, kv_strategy) -> MoRConfig:
  model = ModelConfig(vocab_size=64, d_model=32, layer_pattern=pattern, num_heads=2,
                      num_kv_heads=1, head_dim=8, mlp_hidden=64, window=6, rat_chunk_size=4,
                      linear_chunk_size=8, conv_size=3)
  return MoRConfig(model=model, num_recursions=2, sharing=sharing, router=router,
                   kv_strategy=kv_strategy)


@functools.cache
def tiny_mor(variant):
  """(model, variables, jitted full-sequence (log-probs [N, T, vocab], active [R, N, T]))."""
  model = MoRLanguageModel(mor_config(*variant))
  variables = jax.jit(lambda: model.init(jax.random.PRNGKey(1), jnp.zeros((1, 4), jnp.int32)))()
  # Sharper logits and router scores than the default init: greedy paths that vary from token to
  # token, and routers that send some tokens deeper than others.
  variables = jax.tree.map(lambda x: x * 3.0, variables)

  @jax.jit
  def forward(tokens):
    logits, aux = model.apply(variables, tokens, inference=True)
    return jax.nn.log_softmax(logits, axis=-1), aux["active"]
  return model, variables, forward


@functools.cache
def warm_engine(variant):
  model, variables, _ = tiny_mor(variant)
  engine = Engine(model, variables, dataclasses.replace(
      ENGINE, decode_steps=4 if variant == MULTI_STEP else 1))
  engine.warmup()
  return engine


@pytest.mark.parametrize("variant", VARIANTS, ids=variant_id)
def test_greedy_matches_full_recompute(rng, variant):
  """6 requests on 3 slots, arriving over 12 steps, prompts prefilled in pieces of at most 2:
  every request's greedy tokens and log-probs are those of the full recompute of its prompt
  alone (so a reused slot starts from empty caches); routed models send some tokens through fewer
  recursions than others."""
  engine = warm_engine(variant)
  _, _, forward = tiny_mor(variant)
  max_tokens = 8
  lengths = rng.integers(1, MAX_LEN - max_tokens, size=6)
  prompts = [list(rng.integers(0, 64, size=n)) for n in lengths]
  arrivals = sorted(rng.integers(0, 12, size=6))
  traces, mixed, multi = engine.num_traces, engine.num_mixed_steps, engine.num_multi_step_decodes
  outputs = run_staggered(engine, prompts, arrivals,
                          SamplingParams(max_tokens=max_tokens, logprobs=True))
  tokens, chosen = greedy_reference(lambda batch: forward(batch)[0], prompts, max_tokens)
  for out, ref_tokens, ref_lp in zip(outputs, tokens, chosen):
    assert out.tokens == ref_tokens
    assert out.finish_reason == "length"
    np.testing.assert_allclose(out.logprobs, ref_lp, rtol=0, atol=2e-4)
  assert len({tuple(o.tokens) for o in outputs}) > 1
  assert engine.num_traces == traces, "the engine compiled after warm-up"
  assert engine.num_mixed_steps > mixed, "no step ran decodes and a prefill piece in one call"
  assert (engine.num_multi_step_decodes > multi) == (variant == MULTI_STEP)
  assert all(slot is None for slot in engine.scheduler.slots)
  if variant[0] is not None:
    final = np.zeros((len(prompts), MAX_LEN), np.int32)    # the final sequences, right-padded
    for i, (p, t) in enumerate(zip(prompts, tokens)):
      final[i, :len(p) + len(t)] = p + t
    active = np.asarray(forward(final)[1])                 # [R, N, MAX_LEN]
    real = np.arange(MAX_LEN) < np.asarray([[len(p) + max_tokens] for p in prompts])
    depth = active.sum(axis=0)[real]                       # recursions each real token took
    assert depth.min() < depth.max(), "routing sent every token equally deep"


def test_unservable_variant_raises():
  config = mor_config("token", "cycle", ("rat", "attention"), "recursion")
  with pytest.raises(ValueError, match="router='token' and RAT"):
    Engine(MoRLanguageModel(config), {}, ENGINE)
