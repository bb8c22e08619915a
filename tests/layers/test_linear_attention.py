"""Tests of the linear-attention mixers (six families) and of the causal short convolution.

Every LinearAttention call runs under jax.jit (`init`, `apply`), which is how the model runs it.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.layers.conv import ShortConv, init_conv_cache
from jaxchunk.layers.linear_attention import LinearAttention, init_linear_attention_cache
from jaxchunk.config import LINEAR_KINDS, ModelConfig
from tests.utils import assert_rel_close, randn

AXIS_NAMES = {"vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "conv", None}


def make_config(kind: str, **overrides) -> ModelConfig:
  """A tiny config whose single layer is `kind`: GQA (2 query heads share 1 kv head) and chunk 8,
  so T=24 spans several chunks and a 12-token prefill ends mid-chunk. Tests share these shapes, so
  the jitted `init`/`apply` compile once per kind and shape."""
  fields = dict(d_model=32, num_heads=2, num_kv_heads=1, head_dim=16, linear_chunk_size=8,
                conv_size=4, layer_pattern=(kind,))
  return ModelConfig(**{**fields, **overrides})


def positions_for(x, start: int = 0):
  b, t = x.shape[:2]
  return jnp.broadcast_to(start + jnp.arange(t, dtype=jnp.int32), (b, t))


@functools.partial(jax.jit, static_argnums=(0, 1))
def apply(kind, config, params, x, cache, start):
  """LinearAttention(config, kind) on x [B,T,d_model] at positions start.., continuing `cache`
  (None: a whole sequence)."""
  return LinearAttention(config, kind).apply(params, x, positions=positions_for(x, start),
                                             cache=cache)


@functools.partial(jax.jit, static_argnums=(0, 1))
def init(kind, config, key, x):
  """Parameters of LinearAttention(config, kind), built from one decode step of x [B,1,d_model].

  The parameters do not depend on T or on the path, and the decode step compiles fastest.
  """
  cache = empty_cache(kind, config, x.shape[0])
  return LinearAttention(config, kind).init(key, x, positions=positions_for(x), cache=cache)


def init_params(kind, config, rng, x):
  return init(kind, config, jax.random.key(int(rng.integers(2 ** 31))), x[:, :1])


def setup(kind, rng, *, seq=24):
  """(config, params, x [2, seq, d_model]) for LinearAttention(make_config(kind), kind)."""
  config = make_config(kind)
  x = jnp.asarray(randn(rng, 2, seq, config.d_model))
  return config, init_params(kind, config, rng, x), x


def empty_cache(kind, config, batch):
  return init_linear_attention_cache(config, kind, batch, 64, jnp.dtype(config.dtype))


# ------------------------------------------------------------------------------------------------
# ShortConv


def conv_oracle(x, kernel, silu):
  """Float64 loop: y[b,t,c] = sum_j kernel[j,c] * x[b, t-K+1+j, c] (zeros before t=0)."""
  x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
  size = kernel.shape[0]
  y = np.zeros_like(x)
  for t in range(x.shape[1]):
    for j in range(size):
      src = t - size + 1 + j
      if src >= 0:
        y[:, t] += kernel[j] * x[:, src]
  return y / (1 + np.exp(-y)) if silu else y


@pytest.mark.parametrize("silu", [True, False])
def test_short_conv_matches_oracle(rng, silu):
  conv = ShortConv(6, 4, silu=silu)
  x = jnp.asarray(randn(rng, 2, 11, 6))
  params = conv.init(jax.random.key(1), x)
  y, cache = conv.apply(params, x)
  kernel = nn.unbox(params["params"]["kernel"])
  assert_rel_close(y, conv_oracle(x, kernel, silu), 1e-6, "short conv")
  np.testing.assert_array_equal(cache, x[:, -3:])


def test_short_conv_cache_continues(rng):
  conv = ShortConv(5, 3)
  x = jnp.asarray(randn(rng, 2, 10, 5))
  params = conv.init(jax.random.key(2), x)
  full, _ = conv.apply(params, x)
  cache = init_conv_cache(2, 3, 5, jnp.float32)
  pieces = []
  for lo, hi in [(0, 1), (1, 4), (4, 5), (5, 10)]:   # a piece shorter than conv_size-1 included
    y, cache = conv.apply(params, x[:, lo:hi], cache=cache)
    pieces.append(y)
  assert_rel_close(jnp.concatenate(pieces, axis=1), full, 1e-6, "pieces vs full")


def test_short_conv_segment_ids_match_documents_alone(rng):
  """Packed documents (ids change at 3, 4 and 9; equal ids on non-adjacent documents): each
  document is convolved alone, its taps never reaching into the one before."""
  conv = ShortConv(6, 4)
  x = jnp.asarray(randn(rng, 2, 11, 6))
  params = conv.init(jax.random.key(1), x)
  ids = np.array([[0] * 3 + [1] + [0] * 5 + [1] * 2, [5] * 11], np.int32)
  y, cache = conv.apply(params, x, segment_ids=jnp.asarray(ids))
  kernel = nn.unbox(params["params"]["kernel"])
  ref = np.concatenate([conv_oracle(x[:1, lo:hi], kernel, True)
                        for lo, hi in [(0, 3), (3, 4), (4, 9), (9, 11)]], axis=1)
  assert_rel_close(y[:1], ref, 1e-6, "packed row")
  assert_rel_close(y[1:], conv_oracle(x[1:], kernel, True), 1e-6, "one-document row")
  np.testing.assert_array_equal(cache, x[:, -3:])
  with pytest.raises(ValueError, match="segment_ids must be an integer array"):
    conv.apply(params, x, segment_ids=jnp.asarray(ids, jnp.float32))


def test_short_conv_rejects_bad_shapes(rng):
  conv = ShortConv(4, 4)
  x = jnp.asarray(randn(rng, 1, 5, 4))
  params = conv.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="x must have shape"):
    conv.apply(params, x[..., :3])
  with pytest.raises(ValueError, match="cache must have shape"):
    conv.apply(params, x, cache=jnp.zeros((1, 2, 4)))


# ------------------------------------------------------------------------------------------------
# LinearAttention


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_shapes_dtypes_and_cache_structure(rng, kind):
  config, params, x = setup(kind, rng)
  y, none = apply(kind, config, params, x, None, 0)
  assert y.shape == x.shape and y.dtype == jnp.float32 and none is None
  assert bool(jnp.all(jnp.isfinite(y)))
  cache = empty_cache(kind, config, 2)
  _, new_cache = apply(kind, config, params, x[:, :12], cache, 0)
  shapes = lambda tree: jax.tree.map(lambda a: (a.shape, a.dtype), tree)
  assert shapes(new_cache) == shapes(cache)
  state_leaves = jax.tree.leaves(new_cache["state"])
  assert all(leaf.dtype == jnp.float32 for leaf in state_leaves)
  assert bool(new_cache["conv"]) == (kind in ("delta_rule", "gated_delta_rule", "kda"))


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_params_carry_logical_axes(rng, kind):
  config, params, _ = setup(kind, rng)
  leaves = jax.tree.leaves(params, is_leaf=lambda a: isinstance(a, nn.LogicallyPartitioned))
  for leaf in leaves:
    assert isinstance(leaf, nn.LogicallyPartitioned), leaf
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= AXIS_NAMES, leaf.names
  q_kernel = params["params"]["q_proj"]["kernel"]
  assert q_kernel.names == ("embed", "heads", "head_dim")
  assert params["params"]["o_proj"]["kernel"].names == ("heads", "head_dim", "embed")


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_param_grads_finite_and_nonzero(rng, kind):
  config, params, x = setup(kind, rng)
  cotangent = jnp.asarray(randn(rng, *x.shape))
  loss = lambda p: jnp.sum(apply(kind, config, p, x, None, 0)[0] * cotangent)
  grads = jax.jit(jax.grad(loss))(params)
  for path, g in jax.tree_util.tree_leaves_with_path(nn.unbox(grads)):
    name = jax.tree_util.keystr(path)
    assert bool(jnp.all(jnp.isfinite(g))), f"non-finite gradient for {name}"
    assert float(jnp.linalg.norm(g)) > 0, f"zero gradient for {name} (parameter unused?)"


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_prefill_then_decode_matches_full_sequence(rng, kind):
  config, params, x = setup(kind, rng)
  full, _ = apply(kind, config, params, x, None, 0)
  prefill = 12
  out, cache = apply(kind, config, params, x[:, :prefill], empty_cache(kind, config, 2), 0)
  outs = [out]
  for t in range(prefill, x.shape[1]):
    out, cache = apply(kind, config, params, x[:, t:t + 1], cache, t)
    outs.append(out)
  assert_rel_close(jnp.concatenate(outs, axis=1), full, 1e-5, f"{kind}: prefill + decode")


@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_two_piece_prefill_matches_full_sequence(rng, kind):
  config, params, x = setup(kind, rng)
  full, _ = apply(kind, config, params, x, None, 0)
  first, cache = apply(kind, config, params, x[:, :12], empty_cache(kind, config, 2), 0)
  second, _ = apply(kind, config, params, x[:, 12:], cache, 12)
  assert_rel_close(jnp.concatenate([first, second], axis=1), full, 1e-5, f"{kind}: two pieces")


@pytest.mark.slow
@pytest.mark.parametrize("kind", LINEAR_KINDS)
def test_bfloat16_compute_close_to_float32(rng, kind):
  config, params, x = setup(kind, rng)
  reference, _ = apply(kind, config, params, x, None, 0)
  bf16 = make_config(kind, dtype="bfloat16")
  out, _ = apply(kind, bf16, params, x.astype(jnp.bfloat16), None, 0)
  assert out.dtype == jnp.bfloat16
  assert_rel_close(out.astype(jnp.float32), reference, 5e-2, f"{kind}: bf16 vs f32")


def test_gate_parameter_inits(rng):
  _, gdn, _ = setup("gated_delta_rule", rng)
  gdn = nn.unbox(gdn["params"])
  assert bool(jnp.all((jnp.exp(gdn["A_log"]) >= 0) & (jnp.exp(gdn["A_log"]) <= 16)))
  dt = jax.nn.softplus(gdn["dt_bias"])
  assert bool(jnp.all((dt >= 1e-3 * (1 - 1e-5)) & (dt <= 0.1 * (1 + 1e-5)))), dt
  _, kda_params, _ = setup("kda", rng)
  a = jnp.exp(nn.unbox(kda_params["params"]["A_log"]))
  assert bool(jnp.all((a >= 1) & (a <= 16)))
  config, mlstm_params, _ = setup("mlstm", rng)
  forget_bias = nn.unbox(mlstm_params["params"]["f_proj"]["bias"])
  np.testing.assert_allclose(forget_bias, np.linspace(3.0, 6.0, config.num_heads), rtol=1e-6)


def test_rejects_bad_arguments(rng):
  config, params, x = setup("simple_gla", rng, seq=4)
  layer = LinearAttention(config, "simple_gla")
  with pytest.raises(ValueError, match="segment_ids .* cannot be combined with a cache"):
    layer.apply(params, x, positions=positions_for(x), segment_ids=jnp.zeros((2, 4), jnp.int32),
                cache=empty_cache("simple_gla", config, 2))
  with pytest.raises(ValueError, match=r"x must have shape \[batch, seq, 32\]"):
    layer.apply(params, x[..., :16], positions=positions_for(x))
  with pytest.raises(ValueError, match="kind must be one of"):
    LinearAttention(config, "rat").init(jax.random.key(0), x, positions=positions_for(x))
  with pytest.raises(ValueError, match="kind must be one of"):
    init_linear_attention_cache(config, "attention", 2, 16, jnp.float32)
