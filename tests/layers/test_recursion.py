"""Tests of jaxchunk.layers.recursion: token selection, routers, gather/scatter vs references."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.layers.mlp import SwiGLU
from jaxchunk.layers.norm import RMSNorm
from jaxchunk.layers.recursion import (RecursiveBlock, SharedKVStack, SharedStack,
                                       attend_by_slots, capacity_tokens, select_causal,
                                       select_top_k)
from jaxchunk.layers.rotary import apply_rotary
from jaxchunk.config import ModelConfig
from jaxchunk.models.language_model import Block
from jaxchunk.ops.attention import attention
from tests.utils import assert_rel_close, randn

B, T, D = 2, 24, 32


def small_config(*kinds) -> ModelConfig:
  return ModelConfig(vocab_size=64, d_model=D, layer_pattern=kinds, num_heads=2, num_kv_heads=1,
                     head_dim=16, mlp_hidden=48, window=8, rat_chunk_size=4, linear_chunk_size=8,
                     conv_size=3)


def run_block(block, x, **kwargs):
  """(params, (y, cache, aux)) of a freshly initialised `block` on x."""
  positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
  init = jax.jit(lambda x: block.init(jax.random.key(1), x, positions=positions)["params"])
  params = nn.unbox(init(x))
  apply = jax.jit(lambda p, x: block.apply({"params": p}, x, positions=positions, **kwargs))
  return params, apply(params, x)


def test_select_causal_capacity_order_and_causality(rng):
  keep = rng.random((3, 40)) < 0.6
  capacity = 15
  index, valid = map(np.asarray, select_causal(jnp.asarray(keep), capacity))
  assert index.shape == valid.shape == (3, capacity)
  for row in range(3):
    expected = np.flatnonzero(keep[row])[:capacity]
    n = len(expected)
    np.testing.assert_array_equal(index[row, :n], expected)   # first kept tokens, in order
    assert valid[row, :n].all() and not valid[row, n:].any()   # padding only at the end
    assert len(set(index[row])) == capacity                    # distinct rows for the scatter
  # Changing the future never changes which past tokens are kept.
  changed = keep.copy()
  changed[:, 20:] = rng.random((3, 20)) < 0.6
  index2, valid2 = map(np.asarray, select_causal(jnp.asarray(changed), capacity))
  for row in range(3):
    before = set(index[row][valid[row] & (index[row] < 20)])
    after = set(index2[row][valid2[row] & (index2[row] < 20)])
    assert before == after


def test_select_top_k_matches_numpy(rng):
  scores = randn(rng, 2, 30)
  candidates = rng.random((2, 30)) < 0.7
  k = 10
  index, valid = map(np.asarray, select_top_k(jnp.asarray(scores), jnp.asarray(candidates), k))
  for row in range(2):
    cand = np.flatnonzero(candidates[row])
    best = np.sort(cand[np.argsort(-scores[row, cand])[:k]])
    np.testing.assert_array_equal(index[row], best)
    assert valid[row].all()


def _dense_masked_reference(block, params, x, active, router):
  """The recursions over the full sequence, attention confined to active tokens by segment_ids.

  Positions are the ranks among active tokens; inactive tokens keep their state. The routing
  decisions `active` [R,B,T] come from the block; expert-choice gates are recomputed here.
  """
  stack = SharedStack(block.config)
  x = jnp.asarray(x)
  if router == "token":
    probs = jax.nn.softmax(x @ params["router"]["kernel"], axis=-1)
    depth, gate = jnp.argmax(probs, -1), jnp.max(probs, -1)
  for r in range(active.shape[0]):
    mask = jnp.asarray(active[r])
    if router == "expert":
      scores = (x @ params[f"router_{r}"]["kernel"])[..., 0]
      weight = jax.nn.sigmoid(scores)
    else:
      weight = jnp.where(depth == r, gate, 1.0)
    positions = jnp.cumsum(mask, axis=1, dtype=jnp.int32) - 1
    out, _ = stack.apply({"params": params["stack"]}, x, positions=positions,
                         segment_ids=mask.astype(jnp.int32))
    x = x + jnp.where(mask[..., None], weight[..., None] * (out - x), 0)
  return x


@pytest.mark.parametrize("router", ["expert", "token"])
def test_gather_scatter_equals_dense_masked_and_capacity(rng, router):
  caps = (1.0, 2 / 3, 1 / 3)
  block = RecursiveBlock(small_config("attention", "attention"), 3, router, caps)
  x = randn(rng, B, T, D)
  params, (y, _, aux) = run_block(block, jnp.asarray(x))
  active = np.asarray(aux["active"])
  ref = _dense_masked_reference(block, params, x, active, router)
  assert_rel_close(y, ref, 1e-5, f"{router}: gathered vs dense masked")
  # The routers respect each depth's capacity, and deeper tokens were active one depth before.
  counts = active.sum(axis=2)                                   # [R, B]
  limits = np.array([capacity_tokens(c, T) for c in caps])[:, None]
  if router == "expert":
    np.testing.assert_array_equal(counts, np.broadcast_to(limits, counts.shape))
    assert float(aux["router_bce"]) > 0
  else:
    assert (counts <= limits).all() and float(aux["balance"]) > 0
  assert (active[1:] <= active[:-1]).all()
  assert (counts[1:] < T).all()                                 # routing dropped tokens


def _subsequence_reference(block, params, x, active):
  """Per row and recursion, the stack over the exact subsequence of active tokens (expert gates)."""
  stack = SharedStack(block.config)
  x = np.array(x)
  for r in range(active.shape[0]):
    weight = np.asarray(jax.nn.sigmoid(x @ params[f"router_{r}"]["kernel"]))[..., 0]
    for row in range(x.shape[0]):
      idx = np.flatnonzero(active[r, row])
      sub = jnp.asarray(x[row, idx])[None]
      out, _ = stack.apply({"params": params["stack"]}, sub,
                           positions=jnp.arange(len(idx), dtype=jnp.int32)[None])
      x[row, idx] += weight[row, idx, None] * (np.asarray(out[0]) - x[row, idx])
  return x


@pytest.mark.parametrize("kind", ["simple_gla", pytest.param("rat", marks=pytest.mark.slow),
                                  pytest.param("local", marks=pytest.mark.slow)])
def test_gather_scatter_equals_subsequence_for_other_mixers(rng, kind):
  block = RecursiveBlock(small_config(kind), 3, "expert", (1.0, 0.5, 0.25))
  x = randn(rng, B, T, D)
  params, (y, _, aux) = run_block(block, jnp.asarray(x))
  ref = _subsequence_reference(block, params, x, np.asarray(aux["active"]))
  assert_rel_close(y, ref, 1e-5, f"{kind}: gathered vs per-row subsequence")


@pytest.mark.parametrize("router", ["expert", "token"])
def test_inference_routing_is_causal(rng, router):
  block = RecursiveBlock(small_config("attention"), 3, router, (1.0, 0.5, 0.25))
  x = randn(rng, B, T, D)
  changed = x.copy()
  changed[:, 15:] = randn(rng, B, T - 15, D)
  params, (y, _, aux) = run_block(block, jnp.asarray(x), inference=True)
  _, (y2, _, aux2) = run_block(block, jnp.asarray(changed), inference=True)
  np.testing.assert_allclose(np.asarray(y2)[:, :15], np.asarray(y)[:, :15], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(aux2["active"])[..., :15],
                                np.asarray(aux["active"])[..., :15])
  assert not np.allclose(np.asarray(y2)[:, 15:], np.asarray(y)[:, 15:])


@pytest.mark.parametrize("router", [None, "expert", "token"])
def test_gradients_reach_router_and_shared_stack(rng, router):
  caps = (1.0, 0.5) if router else ()
  block = RecursiveBlock(small_config("attention"), 2, router, caps)
  x = jnp.asarray(randn(rng, B, T, D))
  cotangent = jnp.asarray(randn(rng, B, T, D))
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  params = nn.unbox(jax.jit(lambda x: block.init(jax.random.key(0), x, positions=positions))(x))
  params = params["params"]

  def loss(params):
    y, _, aux = block.apply({"params": params}, x, positions=positions)
    return jnp.sum(y * cotangent) + aux["router_bce"] + aux["balance"]

  grads = jax.jit(jax.grad(loss))(params)
  norms = {name: float(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(sub)))
           for name, sub in grads.items()}
  assert set(norms) == set(params) and all(n > 0 for n in norms.values()), norms


def test_bad_arguments(rng):
  x = jnp.asarray(randn(rng, 1, 8, D))
  positions = jnp.arange(8, dtype=jnp.int32)[None]
  with pytest.raises(ValueError, match="capacities must hold"):
    RecursiveBlock(small_config("attention"), 3, "expert", (1.0, 0.5)).init(
        jax.random.key(0), x, positions=positions)
  with pytest.raises(ValueError, match="router must be one of"):
    RecursiveBlock(small_config("attention"), 2, "random").init(
        jax.random.key(0), x, positions=positions)
  with pytest.raises(ValueError, match="segment_ids"):
    RecursiveBlock(small_config("attention"), 2, "token").init(
        jax.random.key(0), x, positions=positions, segment_ids=jnp.zeros((1, 8), jnp.int32))
  with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 32\]"):
    RecursiveBlock(small_config("attention"), 2).init(jax.random.key(0), x[..., :16],
                                                      positions=positions)


# ---------------------------------------------------------------------------------------------
# Recursive KV sharing (kv_strategy="share_first").


def test_attend_by_slots_equals_causal_attention_on_every_token(rng):
  q, k, v = (jnp.asarray(randn(rng, B, T, h, 16)) for h in (4, 2, 2))
  slots = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  for window in (None, 5):
    ref = attention(q, k, v, causal=True, window=window, impl="reference")
    assert_rel_close(attend_by_slots(q, k, v, slots, window=window), ref, 1e-5, f"window={window}")
  # A gathered subset of queries equals the same rows of the full computation.
  index = jnp.asarray(np.sort(rng.choice(T, (B, 7), replace=True), axis=1), jnp.int32)
  full = attention(q, k, v, causal=True, window=5, impl="reference")
  subset = attend_by_slots(jnp.take_along_axis(q, index[..., None, None], axis=1), k, v, index,
                           window=5)
  assert_rel_close(subset, jnp.take_along_axis(full, index[..., None, None], axis=1), 1e-5, "subset")


def test_shared_kv_stack_first_recursion_is_the_block_stack(rng):
  config = small_config("attention", "local")
  x = jnp.asarray(randn(rng, B, T, D))
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  params = nn.unbox(jax.jit(SharedStack(config).init)(jax.random.key(3), x, positions=positions))
  shared_params = jax.eval_shape(SharedKVStack(config).init, jax.random.key(3), x,
                                 positions=positions)
  assert jax.tree.structure(params) == jax.tree.structure(nn.unbox(shared_params))
  ref, _ = jax.jit(SharedStack(config).apply)(params, x, positions=positions)
  out, _, shared = jax.jit(SharedKVStack(config).apply)(params, x, positions=positions)
  assert_rel_close(out, ref, 1e-6, "first recursion vs language-model blocks")
  assert len(shared) == 2 and shared[0]["k"].shape == (B, T, 1, 16)


def _np_attention(q, k, v, window):
  """Causal (windowed) softmax attention in float64 with an explicit mask; GQA by head groups."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  group = q.shape[2] // k.shape[2]
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  logits = np.einsum("bihd,bjhd->bhij", q, k) / np.sqrt(q.shape[-1])
  i, j = np.arange(q.shape[1])[:, None], np.arange(k.shape[1])[None, :]
  allowed = (j <= i) & ((i - j < window) if window else True)
  logits = np.where(allowed, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  return np.einsum("bhij,bjhd->bihd", p / p.sum(-1, keepdims=True), v)


def _share_first_reference(config, params, x, active, router):
  """The dense masked share_first computation, written out from the parameters.

  Recursion 0 runs the language-model `Block`s on every token and keeps each block's keys/values;
  every later recursion computes the queries of every token at its position, attends (float64,
  explicit causal / window mask) to recursion 0's keys/values of the same block, and updates only
  the tokens `active` [R,B,T] there, weighted like the block.
  """
  stack = params["stack"]
  x = jnp.asarray(x)
  positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
  norm = lambda p, h: RMSNorm(config.norm_eps).apply({"params": p}, h)
  rotate = lambda t: apply_rotary(t, positions, theta=config.rope_theta)
  if router == "token":
    probs = jax.nn.softmax(x @ params["router"]["kernel"], axis=-1)
    depth, gate = jnp.argmax(probs, -1), jnp.max(probs, -1)
  shared = []
  for r in range(active.shape[0]):
    if router == "expert":
      weight = jax.nn.sigmoid((x @ params[f"router_{r}"]["kernel"])[..., 0])
    elif router == "token":
      weight = jnp.where(depth == r, gate, 1.0)
    else:
      weight = jnp.ones(x.shape[:2])
    h = x
    for i, kind in enumerate(config.layer_pattern):
      p = stack[f"blocks_{i}"]
      mixer = p["mixer"]
      normed = norm(p["mixer_norm"], h)
      if r == 0:
        shared.append((rotate(jnp.einsum("btd,dhk->bthk", normed, mixer["k_proj"]["kernel"])),
                       jnp.einsum("btd,dhk->bthk", normed, mixer["v_proj"]["kernel"])))
        h, _ = Block(config, kind).apply({"params": p}, h, positions=positions)
        continue
      q = rotate(jnp.einsum("btd,dhk->bthk", normed, mixer["q_proj"]["kernel"]))
      o = _np_attention(q, *shared[i], config.window if kind == "local" else None)
      h = h + jnp.einsum("bthk,hkd->btd", jnp.asarray(o, jnp.float32), mixer["o_proj"]["kernel"])
      h = h + SwiGLU(config.mlp_hidden).apply({"params": p["mlp"]}, norm(p["mlp_norm"], h))
    x = x + jnp.where(jnp.asarray(active[r])[..., None], weight[..., None] * (h - x), 0)
  return x


@pytest.mark.parametrize("router", [pytest.param(None, marks=pytest.mark.slow), "expert",
                                    pytest.param("token", marks=pytest.mark.slow)])
def test_share_first_equals_dense_masked_reference(rng, router):
  caps = (1.0, 2 / 3, 1 / 3) if router else ()
  config = small_config("attention", "local")
  block = RecursiveBlock(config, 3, router, caps, kv_strategy="share_first")
  x = randn(rng, B, T, D)
  params, (y, _, aux) = run_block(block, jnp.asarray(x))
  active = np.asarray(aux["active"])
  assert active[0].all()                                          # recursion 0 sees every token
  if router:
    assert (active[1:] <= active[:-1]).all() and (active[1:].sum(axis=2) < T).all()
  ref = _share_first_reference(config, params, x, active, router)
  assert_rel_close(y, ref, 1e-5, f"{router}: share_first gathered vs dense masked")


def test_share_first_gradients_reach_every_parameter(rng):
  block = RecursiveBlock(small_config("attention"), 2, "expert", (1.0, 0.5),
                         kv_strategy="share_first")
  x = jnp.asarray(randn(rng, B, T, D))
  cotangent = jnp.asarray(randn(rng, B, T, D))
  positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  params = nn.unbox(block.init(jax.random.key(0), x, positions=positions))["params"]

  def loss(params):
    y, _, aux = block.apply({"params": params}, x, positions=positions)
    return jnp.sum(y * cotangent) + aux["router_bce"]

  grads = jax.jit(jax.grad(loss))(params)
  flat = jax.tree_util.tree_leaves_with_path(grads)
  assert len(flat) == len(jax.tree.leaves(params))
  for path, g in flat:
    assert np.isfinite(np.asarray(g)).all() and float(jnp.sum(g ** 2)) > 0, path


def test_share_first_bad_arguments(rng):
  x = jnp.asarray(randn(rng, 1, 8, D))
  positions = jnp.arange(8, dtype=jnp.int32)[None]
  init = lambda block: block.init(jax.random.key(0), x, positions=positions)
  with pytest.raises(ValueError, match=r"kv_strategy='share_first' .* 'simple_gla' layer"):
    init(RecursiveBlock(small_config("attention", "simple_gla"), 2, kv_strategy="share_first"))
  with pytest.raises(ValueError, match=r"share_first' needs capacities\[0\] == 1"):
    init(RecursiveBlock(small_config("attention"), 2, "expert", (0.5, 0.5),
                        kv_strategy="share_first"))
  with pytest.raises(ValueError, match="kv_strategy must be one of"):
    init(RecursiveBlock(small_config("attention"), 2, kv_strategy="everything"))
