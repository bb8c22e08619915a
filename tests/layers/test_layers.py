"""Core layers: RMSNorm, rotary embedding, SwiGLU, the Attention and RAT mixers.

Each layer is checked against a float64 NumPy oracle written from its parameters, and every cached
path (chunked prefill, decode steps of one token) against the whole-sequence call.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.layers.attention import Attention, init_attention_cache
from jaxchunk.layers.mlp import SwiGLU
from jaxchunk.layers.norm import RMSNorm
from jaxchunk.layers.rat import RATLayer, init_rat_cache
from jaxchunk.layers.rotary import apply_rotary
from jaxchunk.config import ModelConfig
from tests.utils import assert_rel_close, randn

TOL = 1e-5


def tiny_config(**overrides) -> ModelConfig:
  """A small config; the dense "reference" ops unless `impl` is given (they compile fastest)."""
  fields = dict(vocab_size=64, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_hidden=48,
                window=5, rat_chunk_size=4, layer_pattern=("attention",), impl="reference")
  fields.update(overrides)
  return ModelConfig(**fields)


def arange_positions(b: int, t: int, start: int = 0) -> jax.Array:
  return jnp.broadcast_to(jnp.arange(start, start + t, dtype=jnp.int32), (b, t))


def init_params(module, x, positions):
  return jax.jit(lambda x, pos: module.init(jax.random.PRNGKey(0), x, positions=pos))(x, positions)


def apply_fn(module):
  """module.apply(variables, x, positions=, segment_ids=, cache=), jitted."""
  return jax.jit(lambda v, x, pos, seg=None, cache=None: module.apply(
      v, x, positions=pos, segment_ids=seg, cache=cache))


def np_params(variables) -> dict:
  """The float64 NumPy arrays of a module's parameters, boxes removed."""
  return jax.tree.map(lambda p: np.asarray(p, np.float64), nn.meta.unbox(variables)["params"])


# ---------------------------------------------------------------------------------------------
# NumPy oracles.


def np_rotary(x, positions, theta=10000.0):
  """x [B,T,H,D] rotated by positions [B,T], rotate-half layout, float64."""
  d = x.shape[-1]
  inv_freq = theta ** (-np.arange(0, d, 2, dtype=np.float64) / d)
  angles = np.asarray(positions, np.float64)[:, :, None, None] * inv_freq
  x1, x2 = x[..., :d // 2], x[..., d // 2:]
  return np.concatenate([x1 * np.cos(angles) - x2 * np.sin(angles),
                         x2 * np.cos(angles) + x1 * np.sin(angles)], axis=-1)


def np_softmax(s):
  s = s - s.max(axis=-1, keepdims=True)
  e = np.exp(s)
  return e / e.sum(axis=-1, keepdims=True)


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_attention_layer(p, x, cfg, window=None, segment_ids=None):
  """The Attention mixer on x [B,T,d_model] at positions 0..T-1 (or restarting per segment)."""
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  group = cfg.num_heads // cfg.num_kv_heads
  if segment_ids is None:
    segment_ids = np.zeros((b, t), np.int64)
  positions = np.stack([[np.sum(seg[:i] == seg[i]) for i in range(t)] for seg in segment_ids])
  q = np_rotary(np.einsum("btd,dhe->bthe", x, p["q_proj"]["kernel"]), positions, cfg.rope_theta)
  k = np_rotary(np.einsum("btd,dhe->bthe", x, p["k_proj"]["kernel"]), positions, cfg.rope_theta)
  v = np.einsum("btd,dhe->bthe", x, p["v_proj"]["kernel"])
  k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
  s = np.einsum("bihe,bjhe->bhij", q, k) * cfg.head_dim ** -0.5
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  allowed = (j <= i)[None] & (segment_ids[:, :, None] == segment_ids[:, None, :])
  if window is not None:
    allowed &= (i - j < window)[None]
  s = np.where(allowed[:, None], s, -np.inf)
  o = np.einsum("bhij,bjhe->bihe", np_softmax(s), v)
  return np.einsum("bthe,hed->btd", o, p["o_proj"]["kernel"])


def np_rat_layer(p, x, cfg):
  """The RAT mixer as the public code writes it: per-feature gates, keys rotated AFTER the in-chunk
  recurrence by their chunk index, attention over the previous chunks' final summaries and the
  current token's running summary."""
  x = np.asarray(x, np.float64)
  b, t, _ = x.shape
  c = cfg.rat_chunk_size
  group = cfg.num_heads // cfg.num_kv_heads
  q = np.einsum("btd,dhe->bthe", x, p["q_proj"]["kernel"])
  k = np.einsum("btd,dhe->bthe", x, p["k_proj"]["kernel"])
  v = np.einsum("btd,dhe->bthe", x, p["v_proj"]["kernel"])
  f_half = np_sigmoid(np.einsum("btd,dhe->bthe", x, p["f_proj"]["kernel"]) + p["f_proj"]["bias"])
  f = np.concatenate([f_half, f_half], axis=-1)
  k_run, v_run = np.zeros_like(k), np.zeros_like(v)
  for s in range(t):
    keep = f[:, s] if s % c else np.zeros_like(f[:, s])
    prev_k = k_run[:, s - 1] if s else 0.0
    prev_v = v_run[:, s - 1] if s else 0.0
    k_run[:, s] = keep * prev_k + (1 - f[:, s]) * k[:, s]
    v_run[:, s] = keep * prev_v + (1 - f[:, s]) * v[:, s]
  chunk_of = np.arange(t) // c
  positions = np.broadcast_to(chunk_of, (b, t))
  q = np_rotary(q, positions, cfg.rope_theta)
  k_run = np.repeat(np_rotary(k_run, positions, cfg.rope_theta), group, axis=2)
  v_run = np.repeat(v_run, group, axis=2)
  o = np.zeros_like(q)
  for s in range(t):
    ends = [j * c + c - 1 for j in range(chunk_of[s])]  # final tokens of the closed chunks
    keys = np.concatenate([k_run[:, ends], k_run[:, s:s + 1]], axis=1)  # [B, n+1, H, D]
    vals = np.concatenate([v_run[:, ends], v_run[:, s:s + 1]], axis=1)
    w = np_softmax(np.einsum("bhe,bnhe->bhn", q[:, s], keys) * cfg.head_dim ** -0.5)
    o[:, s] = np.einsum("bhn,bnhe->bhe", w, vals)
  o = o * np_sigmoid(np.einsum("btd,dhe->bthe", x, p["z_proj"]["kernel"]))
  return np.einsum("bthe,hed->btd", o, p["o_proj"]["kernel"])


# ---------------------------------------------------------------------------------------------
# RMSNorm, rotary, SwiGLU.


def test_rmsnorm_matches_oracle(rng):
  x = randn(rng, 2, 5, 16, scale=3.0)
  norm = RMSNorm(eps=1e-6)
  variables = norm.init(jax.random.PRNGKey(0), x)
  scale = randn(rng, 16)
  variables = {"params": {"scale": nn.meta.replace_boxed(variables["params"]["scale"], scale)}}
  y = jax.jit(norm.apply)(variables, x)
  x64 = x.astype(np.float64)
  ref = x64 / np.sqrt(np.mean(x64 ** 2, axis=-1, keepdims=True) + 1e-6) * scale
  assert_rel_close(y, ref, TOL, "rmsnorm")
  assert nn.get_partition_spec(norm.init(jax.random.PRNGKey(0), x))["params"]["scale"] == \
      jax.sharding.PartitionSpec("embed")


def test_rmsnorm_bf16_output(rng):
  x = jnp.asarray(randn(rng, 2, 3, 8), jnp.bfloat16)
  norm = RMSNorm(dtype=jnp.bfloat16)
  y = norm.apply(norm.init(jax.random.PRNGKey(0), x), x)
  assert y.dtype == jnp.bfloat16
  x64 = np.asarray(x, np.float64)
  assert_rel_close(y, x64 / np.sqrt(np.mean(x64 ** 2, -1, keepdims=True) + 1e-6), 1e-2, "bf16")


def test_rotary_matches_oracle_and_is_relative(rng):
  x = randn(rng, 2, 6, 3, 8)
  positions = jnp.asarray(rng.integers(0, 50, size=(2, 6)), jnp.int32)
  assert_rel_close(apply_rotary(x, positions, theta=500.0),
                   np_rotary(x.astype(np.float64), np.asarray(positions), 500.0), TOL, "rope")
  q, k = randn(rng, 1, 1, 1, 8), randn(rng, 1, 1, 1, 8)
  dot = lambda pq, pk: float(jnp.sum(apply_rotary(q, jnp.full((1, 1), pq)) *
                                     apply_rotary(k, jnp.full((1, 1), pk))))
  np.testing.assert_allclose(dot(7, 3), dot(104, 100), rtol=1e-4)
  assert abs(dot(7, 3) - dot(3, 7)) > 1e-3  # the score sees the signed distance


def test_rotary_rejects_bad_shapes(rng):
  with pytest.raises(ValueError, match="head_dim must be even"):
    apply_rotary(randn(rng, 1, 2, 1, 5), jnp.zeros((1, 2), jnp.int32))
  with pytest.raises(ValueError, match="positions must have shape"):
    apply_rotary(randn(rng, 1, 2, 1, 4), jnp.zeros((1, 3), jnp.int32))


def test_swiglu_matches_oracle(rng):
  x = randn(rng, 2, 4, 16)
  mlp = SwiGLU(hidden=24)
  variables = mlp.init(jax.random.PRNGKey(1), x)
  p = np_params(variables)
  y = jax.jit(mlp.apply)(variables, x)
  x64 = x.astype(np.float64)
  gate, up = x64 @ p["gate"]["kernel"], x64 @ p["up"]["kernel"]
  ref = (gate * np_sigmoid(gate) * up) @ p["down"]["kernel"]
  assert_rel_close(y, ref, TOL, "swiglu")
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["gate"]["kernel"] == jax.sharding.PartitionSpec("embed", "mlp")
  assert specs["down"]["kernel"] == jax.sharding.PartitionSpec("mlp", "embed")


# ---------------------------------------------------------------------------------------------
# Mixers: whole sequence vs oracle, cached paths vs whole sequence.


def run_cached(module, variables, x, pieces, cache):
  """Runs x [B,T,d] through `module` piece by piece (lengths `pieces`) from `cache`."""
  outs, start = [], 0
  apply = apply_fn(module)
  for n in pieces:
    y, cache = apply(variables, x[:, start:start + n], arange_positions(x.shape[0], n, start), None,
                     cache)
    outs.append(y)
    start += n
  assert start == x.shape[1]
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("kv_heads,window,impl", [(4, None, "reference"), (2, 5, "reference"),
                                                  (2, 5, "xla")])
def test_attention_matches_oracle(rng, kv_heads, window, impl):
  cfg = tiny_config(num_kv_heads=kv_heads, impl=impl)
  layer = Attention(cfg, window=window)
  x = randn(rng, 2, 13, cfg.d_model)
  variables = init_params(layer, x, arange_positions(2, 13))
  y, cache = apply_fn(layer)(variables, x, arange_positions(2, 13))
  assert cache is None and y.shape == x.shape
  assert_rel_close(y, np_attention_layer(np_params(variables), x, cfg, window), TOL, "attention")


def test_attention_segment_ids_match_separate_documents(rng):
  cfg = tiny_config()
  layer = Attention(cfg)
  segment_ids = np.array([[0] * 5 + [1] * 7, [2] * 9 + [3] * 3])
  positions = np.stack([np.concatenate([np.arange(5), np.arange(7)]),
                        np.concatenate([np.arange(9), np.arange(3)])])
  x = randn(rng, 2, 12, cfg.d_model)
  variables = init_params(layer, x, jnp.asarray(positions))
  y, _ = apply_fn(layer)(variables, x, jnp.asarray(positions, jnp.int32),
                         jnp.asarray(segment_ids, jnp.int32))
  ref = np_attention_layer(np_params(variables), x, cfg, segment_ids=segment_ids)
  assert_rel_close(y, ref, TOL, "packed documents")


@pytest.mark.parametrize("window,impl", [(None, "reference"), (3, "xla")])
def test_attention_cache_matches_full_sequence(rng, window, impl):
  cfg = tiny_config(impl=impl)
  layer = Attention(cfg, window=window)
  b, t = 2, 14
  x = randn(rng, b, t, cfg.d_model)
  variables = init_params(layer, x, arange_positions(b, t))
  full, _ = apply_fn(layer)(variables, x, arange_positions(b, t))
  cache = init_attention_cache(cfg, b, 16, jnp.float32)
  # a prefill, decode steps, a chunked prefill, more decode steps
  y, cache = run_cached(layer, variables, x, [5, 1, 1, 4, 1, 1, 1], cache)
  assert_rel_close(y, full, TOL, "cached attention")
  np.testing.assert_array_equal(cache["k"][:, t:], 0.0)  # rows past the last position untouched


def test_attention_cache_rows_at_different_offsets(rng):
  cfg = tiny_config()
  layer = Attention(cfg, window=4)
  x = randn(rng, 2, 9, cfg.d_model)
  variables = init_params(layer, x, arange_positions(2, 9))
  apply = apply_fn(layer)
  full, _ = apply(variables, x, arange_positions(2, 9))
  # Both rows prefill 6 tokens; row 0 then rewinds to length 3 (its rows 4, 5 go stale and must
  # be masked by its own kv_length), row 1 goes on at length 6.
  _, cache = apply(variables, x[:, :6], arange_positions(2, 6), None,
                   init_attention_cache(cfg, 2, 10, jnp.float32))
  lengths = np.array([3, 6])
  step_x = x[np.arange(2), lengths][:, None]
  y, _ = apply(variables, step_x, jnp.asarray(lengths, jnp.int32)[:, None], None, cache)
  assert_rel_close(y, np.asarray(full)[np.arange(2), lengths][:, None], TOL, "per-row decode")


def test_attention_grad_xla_matches_reference(rng):
  b, t = 2, 10
  x = randn(rng, b, t, 32)
  cotangent = randn(rng, b, t, 32)
  grads = {}
  for impl in ("reference", "xla"):
    layer = Attention(tiny_config(impl=impl), window=4)
    variables = init_params(layer, x, arange_positions(b, t))
    loss = lambda v, x: jnp.sum(layer.apply(v, x, positions=arange_positions(b, t))[0] * cotangent)
    grads[impl] = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)
  for ref, out in zip(jax.tree.leaves(grads["reference"]), jax.tree.leaves(grads["xla"])):
    assert np.all(np.isfinite(out)) and np.linalg.norm(np.asarray(out)) > 0
    assert_rel_close(out, ref, TOL, "attention grad")


def test_attention_rejects_bad_arguments(rng):
  cfg = tiny_config()
  layer = Attention(cfg)
  x = randn(rng, 1, 4, cfg.d_model)
  variables = init_params(layer, x, arange_positions(1, 4))
  with pytest.raises(ValueError, match="x must have shape"):
    layer.apply(variables, randn(rng, 1, 4, 16), positions=arange_positions(1, 4))
  with pytest.raises(ValueError, match="positions must have shape"):
    layer.apply(variables, x, positions=arange_positions(1, 5))
  cache = init_attention_cache(cfg, 1, 8, jnp.float32)
  with pytest.raises(ValueError, match="segment_ids"):
    layer.apply(variables, x, positions=arange_positions(1, 4), cache=cache,
                segment_ids=jnp.zeros((1, 4), jnp.int32))
  with pytest.raises(ValueError, match=r"cache\['k'\] must have shape"):
    layer.apply(variables, x, positions=arange_positions(1, 4),
                cache=init_attention_cache(tiny_config(num_kv_heads=4), 1, 8, jnp.float32))


def test_attention_param_axes(rng):
  cfg = tiny_config()
  specs = nn.get_partition_spec(init_params(Attention(cfg), randn(rng, 1, 2, cfg.d_model),
                                            arange_positions(1, 2)))["params"]
  P = jax.sharding.PartitionSpec
  assert specs["q_proj"]["kernel"] == P("embed", "heads", "head_dim")
  assert specs["k_proj"]["kernel"] == P("embed", "kv_heads", "head_dim")
  assert specs["o_proj"]["kernel"] == P("heads", "head_dim", "embed")


@pytest.mark.parametrize("kv_heads,impl", [(4, "reference"), (2, "xla")])
def test_rat_matches_public_form(rng, kv_heads, impl):
  cfg = tiny_config(num_kv_heads=kv_heads, impl=impl)
  layer = RATLayer(cfg)
  b, t = 2, 15  # not a multiple of the chunk (4)
  x = randn(rng, b, t, cfg.d_model)
  variables = init_params(layer, x, arange_positions(b, t))
  y, cache = apply_fn(layer)(variables, x, arange_positions(b, t))
  assert cache is None and y.shape == x.shape
  assert_rel_close(y, np_rat_layer(np_params(variables), x, cfg), TOL, "rat")


def test_rat_forget_bias_init():
  cfg = tiny_config(rat_chunk_size=16, num_kv_heads=4, head_dim=16)
  layer = RATLayer(cfg)
  x = jnp.zeros((1, 2, cfg.d_model))
  variables = init_params(layer, x, arange_positions(1, 2))
  bias = np.asarray(nn.meta.unbox(variables)["params"]["f_proj"]["bias"])
  assert bias.shape == (4, 8)
  u = np.exp(bias)  # bias = log(U(1, chunk - 1))
  assert u.min() >= 1.0 and u.max() <= 15.0 and u.std() > 1.0
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["f_proj"]["kernel"] == jax.sharding.PartitionSpec("embed", "kv_heads", "head_dim")
  assert specs["z_proj"]["kernel"] == jax.sharding.PartitionSpec("embed", "heads", "head_dim")


def test_rat_cache_matches_full_sequence(rng):
  cfg = tiny_config()
  layer = RATLayer(cfg)
  b, t = 2, 17
  x = randn(rng, b, t, cfg.d_model)
  variables = init_params(layer, x, arange_positions(b, t))
  full, _ = apply_fn(layer)(variables, x, arange_positions(b, t))
  # prefill ending mid-chunk, decode across a chunk boundary, chunked prefill, decode
  cache = init_rat_cache(cfg, b, 20, jnp.float32)
  y, _ = run_cached(layer, variables, x, [6, 1, 1, 1, 5, 1, 1, 1], cache)
  assert_rel_close(y, full, TOL, "cached rat")
  cache = init_rat_cache(cfg, b, 20, jnp.float32)
  y, _ = run_cached(layer, variables, x, [8, 9], cache)
  assert_rel_close(y, full, TOL, "two-piece prefill")


@pytest.mark.parametrize("b", [1, 2])
def test_rat_cache_with_per_row_lengths(rng, b):
  # The serving engine's caches hold one length per row: a piece continues each row by the op
  # per row (vmapped), or as is for a batch of one (a prefill piece). Both equal the whole call.
  cfg = tiny_config(impl="xla")
  layer = RATLayer(cfg)
  t = 15
  x = randn(rng, b, t, cfg.d_model)
  variables = init_params(layer, x, arange_positions(b, t))
  full, _ = apply_fn(layer)(variables, x, arange_positions(b, t))
  _, cache = run_cached(layer, variables, x[:, :6], [6], init_rat_cache(cfg, b, 20, jnp.float32))
  cache = cache._replace(length=jnp.full((b,), 6, jnp.int32))
  y, new = apply_fn(layer)(variables, x[:, 6:], arange_positions(b, t - 6, 6), None, cache)
  assert_rel_close(y, full[:, 6:], TOL, "per-row continuation")
  assert new.length.shape == (b,) and np.all(np.asarray(new.length) == t)


def test_rat_grad_xla_matches_reference(rng):
  b, t = 2, 10
  x = randn(rng, b, t, 32)
  cotangent = randn(rng, b, t, 32)
  grads = {}
  for impl in ("reference", "xla"):
    layer = RATLayer(tiny_config(impl=impl))
    variables = init_params(layer, x, arange_positions(b, t))
    loss = lambda v, x: jnp.sum(layer.apply(v, x, positions=arange_positions(b, t))[0] * cotangent)
    grads[impl] = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables, x)
  for ref, out in zip(jax.tree.leaves(grads["reference"]), jax.tree.leaves(grads["xla"])):
    assert np.all(np.isfinite(out)) and np.linalg.norm(np.asarray(out)) > 0
    assert_rel_close(out, ref, TOL, "rat grad")


def test_rat_rejects_bad_arguments(rng):
  cfg = tiny_config()
  layer = RATLayer(cfg)
  x = randn(rng, 1, 4, cfg.d_model)
  variables = init_params(layer, x, arange_positions(1, 4))
  with pytest.raises(ValueError, match="segment_ids .* cannot be combined with a cache"):
    layer.apply(variables, x, positions=arange_positions(1, 4),
                segment_ids=jnp.zeros((1, 4), jnp.int32), cache=init_rat_cache(cfg, 1, 8, jnp.float32))
  with pytest.raises(ValueError, match="x must have shape"):
    layer.apply(variables, x[..., :8], positions=arange_positions(1, 4))
