"""Tests of jaxchunk.models.mor: prefill + decode equals the full forward, configs, losses.

"Equal" for a routed model: the full forward with causal inference routing (`inference=True`:
expert choice by router threshold, no capacity drops) and the same tokens fed as a prefill then
one-token decode steps give logits within 1e-5 relative error and identical routing decisions;
each recursion's cache then holds exactly the tokens it processed. Training-mode expert choice
(top-k over the whole sequence) looks at future tokens and is not expected to match. Both KV
strategies are covered: recursion-wise caching and recursive KV sharing ("share_first").
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import configs
from jaxchunk.layers.recursion import capacity_tokens
from jaxchunk.config import ModelConfig
from jaxchunk.models.mor import MoRConfig, MoRLanguageModel, init_mor_cache, mor_flops_per_token
from tests.utils import assert_rel_close, randn

B, T, T1, VOCAB = 2, 14, 9, 64


def mor_config(router, sharing, kinds=("attention",), **fields) -> MoRConfig:
  model = ModelConfig(vocab_size=VOCAB, d_model=32, layer_pattern=kinds, num_heads=2,
                      num_kv_heads=1, head_dim=16, mlp_hidden=48, window=6, rat_chunk_size=4,
                      linear_chunk_size=8, conv_size=3)
  return MoRConfig(model=model, num_recursions=3, sharing=sharing, router=router, **fields)


def init_params(model, tokens):
  return nn.unbox(jax.jit(lambda t: model.init(jax.random.key(2), t))(tokens))["params"]


def spread_router_biases(params, rng):
  """Random router kernels so that inference routing keeps some tokens and drops others."""
  recursion = dict(params["recursion"])
  for name in recursion:
    if name.startswith("router"):
      kernel = recursion[name]["kernel"]
      recursion[name] = {"kernel": jnp.asarray(randn(rng, *kernel.shape, scale=0.5))}
  return dict(params, recursion=recursion)


# The default run covers both routers, both sharings and both KV strategies; fixed depth (no
# router: every token kept, the routers' path with nothing dropped) is in the slow run.
CASES = [
    ("token", "middle_cycle", ("attention",), "recursion"),
    ("expert", "middle_cycle", ("local",), "share_first"),
    ("token", "cycle", ("attention",), "share_first"),
    pytest.param("expert", "cycle", ("attention",), "recursion", marks=pytest.mark.slow),
    pytest.param(None, "middle_cycle", ("attention",), "recursion", marks=pytest.mark.slow),
    pytest.param("expert", "cycle", ("attention", "local"), "share_first", marks=pytest.mark.slow),
    pytest.param("token", "middle_cycle", ("local",), "share_first", marks=pytest.mark.slow),
    pytest.param(None, "cycle", ("attention", "local"), "share_first", marks=pytest.mark.slow),
    pytest.param("expert", "middle_cycle", ("local", "simple_gla"), "recursion",
                 marks=pytest.mark.slow),
    pytest.param("token", "cycle", ("gated_delta_rule",), "recursion", marks=pytest.mark.slow),
    pytest.param(None, "cycle", ("rat", "attention"), "recursion", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("router,sharing,kinds,kv_strategy", CASES)
def test_prefill_decode_equals_full_forward(rng, router, sharing, kinds, kv_strategy):
  config = mor_config(router, sharing, kinds, kv_strategy=kv_strategy)
  model = MoRLanguageModel(config)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (B, T)))
  params = spread_router_biases(init_params(model, tokens), rng)
  apply = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c, inference=True))

  full, full_aux = apply(params, tokens, None)
  logits, aux = apply(params, tokens[:, :T1], init_mor_cache(config, B, T + 2))
  pieces, cache = [logits], aux["cache"]
  for i in range(T1, T):
    logits, aux = apply(params, tokens[:, i:i + 1], cache)
    pieces.append(logits)
    cache = aux["cache"]
  assert_rel_close(jnp.concatenate(pieces, axis=1), full, 1e-5, "prefill + decode vs full")
  active = np.asarray(full_aux["active"])                        # [R, B, T]
  counts = np.stack([np.asarray(c["count"]) for c in cache["recursion"]])
  np.testing.assert_array_equal(counts, active.sum(axis=2))     # each depth cached its tokens
  np.testing.assert_array_equal(np.asarray(cache["length"]), [T, T])
  if kv_strategy == "share_first":                                # only recursion 1 holds KV
    assert all(c["layers"] == () for c in cache["recursion"][1:])
  if router is not None:
    assert 0 < active[1].sum() and active[-1].sum() < B * T     # some went deeper, some exited


@pytest.mark.parametrize("kv_strategy", ["recursion", "share_first"])
def test_chunked_prefill_in_two_pieces_equals_one(rng, kv_strategy):
  config = mor_config("expert", "cycle", kv_strategy=kv_strategy)
  model = MoRLanguageModel(config)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (B, T)))
  params = spread_router_biases(init_params(model, tokens), rng)
  apply = jax.jit(lambda p, t, c: model.apply({"params": p}, t, cache=c))
  one, aux_one = apply(params, tokens, init_mor_cache(config, B, T))
  first, aux = apply(params, tokens[:, :5], init_mor_cache(config, B, T))
  second, aux_two = apply(params, tokens[:, 5:], aux["cache"])
  assert_rel_close(jnp.concatenate([first, second], axis=1), one, 1e-5, "two pieces vs one")
  # Each depth's KV cache agrees on its valid slots (past them lie discarded padding keys).
  for two, one in zip(aux_two["cache"]["recursion"], aux_one["cache"]["recursion"]):
    np.testing.assert_array_equal(np.asarray(two["count"]), np.asarray(one["count"]))
    assert len(one["layers"]) == len(two["layers"])
    for row, count in enumerate(np.asarray(one["count"])):
      for name in ("k", "v") if one["layers"] else ():
        assert_rel_close(two["layers"][0][name][row, :count], one["layers"][0][name][row, :count],
                         1e-5, f"cache {name}")


def test_share_first_cache_is_smaller_than_recursion_wise():
  def cache_bytes(kv_strategy):
    config = mor_config("expert", "middle_cycle", ("attention", "local"), kv_strategy=kv_strategy)
    return sum(leaf.nbytes for leaf in jax.tree.leaves(init_mor_cache(config, B, 64)))

  kv_bytes = 2 * B * 64 * 1 * 16 * 4                 # one layer's k and v: [B, 64, Hk=1, 16] f32
  shared, recursion = cache_bytes("share_first"), cache_bytes("recursion")
  # middle_cycle: first + last + 2 shared layers x 3 recursions, against first + last + 2 x 1.
  assert recursion - shared == (3 - 1) * 2 * kv_bytes
  assert shared < 0.6 * recursion


@pytest.mark.parametrize("router,kv_strategy", [
    ("expert", "recursion"), pytest.param("token", "recursion", marks=pytest.mark.slow),
    pytest.param("token", "share_first", marks=pytest.mark.slow)])
def test_training_loss_grad_and_capacity(rng, router, kv_strategy):
  config = mor_config(router, "middle_cycle", capacities=(1.0, 0.5, 0.25), kv_strategy=kv_strategy)
  model = MoRLanguageModel(config)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (B, T)))
  params = init_params(model, tokens)

  def loss(params):
    logits, aux = model.apply({"params": params}, tokens)
    nll = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]),
                                        tokens[:, 1:, None], axis=-1))
    return nll + aux["router_loss"], aux

  (value, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert np.isfinite(float(value)) and float(aux["router_loss"]) > 0
  fractions = np.asarray(aux["active_fraction"])
  limits = [capacity_tokens(c, T) / T for c in config.resolved_capacities]
  if router == "expert":
    np.testing.assert_allclose(fractions, limits)
  else:
    assert (fractions <= np.asarray(limits) + 1e-6).all()
  router_grad = grads["recursion"]["router_1" if router == "expert" else "router"]["kernel"]
  assert float(jnp.sum(router_grad ** 2)) > 0


def test_config_shapes_and_baselines():
  config = mor_config("expert", "middle_cycle", ("attention", "local"))
  assert config.resolved_capacities == (1.0, 2 / 3, 1 / 3)
  assert config.num_unique_blocks == 4
  assert config.unrolled_pattern == ("attention",) + ("attention", "local") * 3 + ("local",)
  assert config.vanilla_config().num_layers == 8
  assert config.block_passes_per_token() == pytest.approx(2 + 2 * 2.0)
  assert mor_config(None, "cycle").block_passes_per_token() == 3


def test_share_first_flops_and_preset():
  seq_len = 96
  recursion = mor_config("expert", "cycle", ("attention",))
  shared = mor_config("expert", "cycle", ("attention",), kv_strategy="share_first")
  cfg = recursion.model
  width, kv_weights = cfg.num_heads * cfg.head_dim, 2 * cfg.d_model * cfg.num_kv_heads * cfg.head_dim
  # Recursions 2 and 3 (capacities 2/3, 1/3) skip k/v projections; their queries see all keys.
  expected = sum(f * (-6.0 * kv_weights + 12.0 * width * (seq_len / 2 - f * seq_len / 2))
                 for f in (2 / 3, 1 / 3))
  assert mor_flops_per_token(shared, seq_len) - mor_flops_per_token(recursion, seq_len) == \
      pytest.approx(expected)
  preset = configs.load_mor("mor_expert_share")
  assert preset.kv_strategy == "share_first"
  assert dataclasses.replace(preset, kv_strategy="recursion") == configs.load_mor("mor_expert")


def test_bad_config_and_inputs():
  with pytest.raises(ValueError, match="sharing must be one of"):
    mor_config("expert", "ring")
  with pytest.raises(ValueError, match="non-increasing"):
    mor_config("expert", "cycle", capacities=(1.0, 0.3, 0.6))
  with pytest.raises(ValueError, match="need a router"):
    mor_config(None, "cycle", capacities=(1.0, 0.5, 0.5))
  with pytest.raises(ValueError, match="kv_strategy must be one of"):
    mor_config("token", "cycle", kv_strategy="everything")
  with pytest.raises(ValueError, match=r"kv_strategy='share_first' .* 'rat' layer"):
    mor_config("token", "cycle", ("attention", "rat"), kv_strategy="share_first")
  with pytest.raises(ValueError, match=r"needs capacities\[0\] == 1"):
    mor_config("expert", "cycle", capacities=(0.5, 0.5, 0.25), kv_strategy="share_first")
  model = MoRLanguageModel(mor_config("token", "cycle"))
  with pytest.raises(ValueError, match=r"tokens must have shape \[batch, seq\]"):
    model.init(jax.random.key(0), jnp.zeros((2, 3, 4), jnp.int32))
