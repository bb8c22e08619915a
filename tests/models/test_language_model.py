"""LanguageModel: shapes, jit, gradients, and the cached paths (prefill, decode, chunked prefill)
against the whole-sequence logits, for layer patterns covering every mixer kind."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.config import ATTENTION_KINDS, LINEAR_KINDS, ModelConfig
from jaxchunk.models.language_model import LanguageModel, init_cache
from jaxchunk.serving.engine import EngineConfig, init_engine_cache
from tests.utils import assert_rel_close

TOL = 1e-5
# (layer pattern, op impl): every mixer kind in the default run, the linear kinds together on their
# fast-compiling "reference" ops (their "xla" paths are checked against those by the op tests); each
# linear kind on its own, on its default op, in the slow run, where a failure names the kind.
PATTERNS = [(("rat", "local"), "auto"), (("attention",), "auto"), (LINEAR_KINDS, "reference")] + [
    pytest.param(((kind, "local"), "auto"), marks=pytest.mark.slow) for kind in LINEAR_KINDS]


def pattern_id(case) -> str:
  pattern, impl = case
  return "-".join(pattern) + f"-{impl}"


def tiny_config(pattern, **overrides) -> ModelConfig:
  fields = dict(vocab_size=50, d_model=32, layer_pattern=pattern, num_heads=4, num_kv_heads=2,
                head_dim=8, mlp_hidden=64, window=6, rat_chunk_size=4, linear_chunk_size=8,
                conv_size=3)
  fields.update(overrides)
  return ModelConfig(**fields)


def random_tokens(rng, b, t, cfg):
  return jnp.asarray(rng.integers(0, cfg.vocab_size, size=(b, t)), jnp.int32)


@functools.cache
def init_model(cfg):
  """(model, variables, jitted apply(variables, tokens, segment_ids, positions, cache)), built
  once per config so that the tests of one pattern share their compilations."""
  model = LanguageModel(cfg)
  variables = jax.jit(lambda t: model.init(jax.random.PRNGKey(0), t))(jnp.zeros((1, 1), jnp.int32))
  apply = jax.jit(lambda v, t, seg=None, pos=None, cache=None: model.apply(
      v, t, segment_ids=seg, positions=pos, cache=cache))
  return model, variables, apply


def run_pieces(apply, variables, tokens, pieces, cache):
  """Feeds tokens [B,T] piece by piece (lengths `pieces`) through the cached path."""
  logits, start = [], 0
  for n in pieces:
    out, cache = apply(variables, tokens[:, start:start + n], None, None, cache)
    logits.append(out)
    start += n
  assert start == tokens.shape[1]
  return jnp.concatenate(logits, axis=1), cache


# The six linear kinds together in the slow run here (their caches: the next test, default run).
SHAPE_PATTERNS = PATTERNS[:2] + [pytest.param(PATTERNS[2], marks=pytest.mark.slow)] + PATTERNS[3:]


@pytest.mark.parametrize("case", SHAPE_PATTERNS, ids=pattern_id)
def test_shapes_jit_and_grad(rng, case):
  pattern, impl = case
  cfg = tiny_config(pattern, impl=impl)
  b, t = 2, 11
  tokens = random_tokens(rng, b, t, cfg)
  _, variables, apply = init_model(cfg)
  logits, cache = apply(variables, tokens)
  assert logits.shape == (b, t, cfg.vocab_size) and logits.dtype == jnp.float32
  assert cache is None and np.all(np.isfinite(logits))
  targets = random_tokens(rng, b, t, cfg)

  def loss(variables):
    logits, _ = apply(variables, tokens)
    picked = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)
    return -jnp.mean(picked)

  grads = jax.jit(jax.grad(loss))(variables)
  flat = jax.tree_util.tree_leaves_with_path(nn.meta.unbox(grads))
  for path, g in flat:
    name = jax.tree_util.keystr(path)
    assert np.all(np.isfinite(g)), f"non-finite gradient for {name}"
    assert np.linalg.norm(np.asarray(g)) > 0, f"zero gradient for {name}: the parameter is unused"


@pytest.mark.parametrize("case", PATTERNS, ids=pattern_id)
def test_cached_paths_match_full_sequence(rng, case):
  pattern, impl = case
  cfg = tiny_config(pattern, impl=impl)
  b, t = 2, 23
  tokens = random_tokens(rng, b, t, cfg)
  _, variables, apply = init_model(cfg)
  full, _ = apply(variables, tokens)
  # prefill 6 (mid-chunk for RAT), decode 3 steps across a chunk boundary, chunked prefill of 11
  # (spans the local window and several chunks), decode 3 more steps
  pieces = [6, 1, 1, 1, 11, 1, 1, 1]
  cached, cache = run_pieces(apply, variables, tokens, pieces, init_cache(cfg, b, 24))
  assert_rel_close(cached, full, TOL, "prefill + decode")
  np.testing.assert_array_equal(cache["length"], [t, t])
  # one cached piece == two pieces, logits and final caches alike
  one, one_cache = run_pieces(apply, variables, tokens[:, :17], [17], init_cache(cfg, b, 24))
  two, two_cache = run_pieces(apply, variables, tokens[:, :17], [6, 11], init_cache(cfg, b, 24))
  assert_rel_close(two, one, TOL, "two-piece prefill logits")
  assert_rel_close(one, full[:, :17], TOL, "one-piece prefill logits")
  for a, c in zip(jax.tree.leaves(two_cache), jax.tree.leaves(one_cache)):
    assert_rel_close(a, c, TOL, "two-piece prefill cache")


def test_init_cache_structure():
  cfg = tiny_config(("rat", "local", "attention"), dtype="bfloat16")
  cache = init_cache(cfg, 3, 20)
  assert cache["length"].dtype == jnp.int32 and cache["length"].shape == (3,)
  assert len(cache["layers"]) == 3
  rat_state, local, attention = cache["layers"]
  assert rat_state.k_chunks.shape == (3, 5, cfg.num_kv_heads, cfg.head_dim)  # ceil(20 / 4)
  assert local["k"].shape == (3, 20, cfg.num_kv_heads, cfg.head_dim)
  assert attention["v"].dtype == jnp.bfloat16
  assert init_cache(cfg, 3, 20, jnp.float32)["layers"][1]["k"].dtype == jnp.float32


@pytest.mark.parametrize("pattern", [("attention",), ("rat", "local"), ("gated_delta_rule",)])
def test_packed_documents_match_separate_runs(rng, pattern):
  """Every mixer kind separates packed documents: RAT chunks each document from its start, the
  linear mixers reset their state and short convolutions (here Gated DeltaNet's)."""
  cfg = tiny_config(pattern)
  lengths = (7, 1, 10)
  tokens = random_tokens(rng, 1, sum(lengths), cfg)
  _, variables, apply = init_model(cfg)
  segment_ids = jnp.asarray([sum(([i] * n for i, n in enumerate(lengths)), [])], jnp.int32)
  positions = jnp.asarray([sum((list(range(n)) for n in lengths), [])], jnp.int32)
  packed, _ = apply(variables, tokens, segment_ids, positions)
  ends = np.cumsum((0,) + lengths)
  separate = jnp.concatenate([apply(variables, tokens[:, lo:hi])[0]
                              for lo, hi in zip(ends[:-1], ends[1:])], axis=1)
  assert_rel_close(packed, separate, TOL, "packed documents")


def test_untied_head_and_bf16(rng):
  cfg = tiny_config(("rat",), tie_embeddings=False, dtype="bfloat16")
  tokens = random_tokens(rng, 2, 9, cfg)
  _, variables, apply = init_model(cfg)
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["lm_head"]["kernel"] == jax.sharding.PartitionSpec("embed", "vocab")
  assert specs["embed"]["embedding"] == jax.sharding.PartitionSpec("vocab", "embed")
  logits, _ = apply(variables, tokens)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))
  f32_logits, _ = jax.jit(LanguageModel(tiny_config(("rat",), tie_embeddings=False)).apply)(
      variables, tokens)
  assert_rel_close(logits, f32_logits, 2e-2, "bf16 vs f32 logits")


def test_rejects_bad_arguments(rng):
  cfg = tiny_config(("rat", "local"))
  tokens = random_tokens(rng, 1, 8, cfg)
  model, variables, _ = init_model(cfg)
  with pytest.raises(ValueError, match="tokens must have shape"):
    model.apply(variables, tokens[0])
  with pytest.raises(ValueError, match="positions must have shape"):
    model.apply(variables, tokens, positions=jnp.zeros((1, 7), jnp.int32))
  with pytest.raises(ValueError, match="segment_ids"):
    model.apply(variables, tokens, segment_ids=jnp.zeros((1, 8), jnp.int32),
                cache=init_cache(cfg, 1, 16))
  with pytest.raises(ValueError, match="cache\\['layers'\\] must hold 2"):
    model.apply(variables, tokens, cache=init_cache(tiny_config(("rat",)), 1, 8))
  with pytest.raises(ValueError, match="streams need positions and a cache"):
    model.apply(variables, tokens, streams=((1, 8),))
  positions = jnp.arange(8, dtype=jnp.int32)[None]
  cache = init_cache(cfg, 1, 16)
  with pytest.raises(ValueError, match="tuple of 2 per-stream caches"):  # one cache, two streams
    model.apply(variables, tokens, positions=positions, cache=cache, streams=((1, 4), (2, 2)))
  with pytest.raises(ValueError, match=r"x must have shape \[1, 9"):
    model.apply(variables, tokens, positions=positions, streams=((1, 4), (1, 5)),
                cache={"layers": tuple((c, c) for c in cache["layers"])})


@pytest.mark.parametrize("remat", ["block", pytest.param("block_dots", marks=pytest.mark.slow)])
def test_block_remat_keeps_loss_and_gradients(rng, remat):
  """Per-block rematerialisation changes memory, not values: same params tree, loss, gradients."""
  tokens = random_tokens(rng, 2, 24, tiny_config(("rat",)))
  plain = LanguageModel(tiny_config(("rat", "attention")))
  remat_model = LanguageModel(tiny_config(("rat", "attention"), remat=remat))
  params = jax.jit(plain.init)(jax.random.PRNGKey(0), tokens)
  # the remat model's parameters have the same tree (shapes alone: no eager init to compare)
  assert (jax.tree.structure(jax.eval_shape(remat_model.init, jax.random.PRNGKey(0), tokens))
          == jax.tree.structure(params))
  loss = lambda model: lambda p: jnp.mean(jnp.tanh(model.apply(p, tokens)[0]))
  value, grads = jax.jit(jax.value_and_grad(loss(plain)))(params)
  value_r, grads_r = jax.jit(jax.value_and_grad(loss(remat_model)))(params)
  assert_rel_close(value_r, value, 1e-6, "loss")
  for g_r, g in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
    assert_rel_close(g_r, g, 1e-5, "gradient")
  with pytest.raises(ValueError, match="remat"):
    tiny_config(("rat",), remat="everything")


def test_packed_projections_match(rng):
  """`pack_projections` joins RAT's five input projections, attention's q/k/v and every MLP's
  gate/up into one kernel each (linear-attention mixers keep theirs); the packed model's logits,
  full-sequence and cached (prefill, then decode steps), are the unpacked model's."""
  cfg = tiny_config(("rat", "local", "attention", "gla"), impl="reference")
  b, t = 2, 13
  tokens = random_tokens(rng, b, t, cfg)
  model, variables, apply = init_model(cfg)
  packed = model.pack_projections(variables)
  params = packed["params"]
  assert sorted(params["block_0"]["mixer"]) == ["in_proj_bias", "in_proj_kernel", "o_proj"]
  q_z, k_v, f = 2 * 4 * 8, 2 * 2 * 8, 2 * 4
  assert params["block_0"]["mixer"]["in_proj_kernel"].shape == (32, q_z + k_v + f)
  for i in (1, 2):
    assert sorted(params[f"block_{i}"]["mixer"]) == ["o_proj", "qkv_proj_kernel"]
  assert "q_proj" in params["block_3"]["mixer"]
  assert all(sorted(params[f"block_{i}"]["mlp"]) == ["down", "gate_up_kernel"] for i in range(4))
  full, _ = apply(variables, tokens)
  assert_rel_close(apply(packed, tokens)[0], full, TOL, "packed full sequence")
  cached, _ = run_pieces(apply, packed, tokens, [6, 1, 5, 1], init_cache(cfg, b, 16))
  assert_rel_close(cached, full, TOL, "packed prefill + decode")
  with pytest.raises(ValueError, match="cannot pack in_proj: the parameters have no"):
    model.pack_projections(packed)


# The linear kinds' streams in the slow run (their caches: test_cached_paths_match_full_sequence).
STREAM_PATTERNS = [(("attention", "local", "rat"), "auto")] + [
    pytest.param(case, marks=pytest.mark.slow) for case in [
        (("simple_gla", "gla", "mlstm"), "reference"),
        (("delta_rule", "gated_delta_rule", "kda"), "reference")]]


@pytest.mark.parametrize("case", STREAM_PATTERNS, ids=pattern_id)
def test_streams_match_separate_calls(rng, case):
  # The serving engine's mixed step: 3 slots decode one token while slot 3 prefills 4 tokens.
  # As streams of one forward the logits and every cache must equal a decode call followed by a
  # prefill call (the prefill seeing the pools the decode wrote). Random cache contents: pools,
  # states and conv histories; RAT lengths match the positions.
  pattern, impl = case
  cfg = tiny_config(pattern, impl=impl)
  model, variables, _ = init_model(cfg)
  slots, decode_at, piece_at, piece_len = 4, 5, 3, 4
  engine_config = EngineConfig(num_slots=slots, max_len=16, page_size=4)
  lengths = np.array([decode_at] * 3 + [piece_at], np.int32)
  layers = jax.tree.map(lambda x: jnp.asarray(0.5 * rng.standard_normal(x.shape), x.dtype),
                        init_engine_cache(cfg, engine_config))
  # The engine keeps no RAT length (its steps pass their positions): the rows' lengths.
  layers = tuple(layer._replace(length=jnp.asarray(lengths)) if kind == "rat" else layer
                 for kind, layer in zip(pattern, layers))
  pages = engine_config.pages_per_seq
  table = jnp.arange(1, 1 + slots * pages, dtype=jnp.int32).reshape(slots, pages)

  def view(rows, pools_from):
    """Rows `rows` of the per-slot caches; attention layers: pools of `pools_from` + tables."""
    return tuple({"k_pages": p["k_pages"], "v_pages": p["v_pages"], "page_table": table[rows]}
                 if kind in ATTENTION_KINDS else jax.tree.map(lambda x: x[rows], layer)
                 for kind, layer, p in zip(pattern, layers, pools_from))

  decode_tokens = random_tokens(rng, 3, 1, cfg)
  piece = random_tokens(rng, 1, piece_len, cfg)
  decode_positions = jnp.full((3, 1), decode_at, jnp.int32)
  piece_positions = piece_at + jnp.arange(piece_len, dtype=jnp.int32)[None]
  decode_rows, piece_rows = slice(0, 3), slice(3, 4)

  call = lambda tokens, positions, cache: model.apply(variables, tokens, positions=positions,
                                                      cache=cache)
  logits_d, new_d = call(decode_tokens, decode_positions,
                         {"length": lengths[:3], "layers": view(decode_rows, layers)})
  logits_p, new_p = call(piece, piece_positions,
                         {"length": lengths[3:], "layers": view(piece_rows, new_d["layers"])})
  logits, new = jax.jit(functools.partial(model.apply, streams=((3, 1), (1, piece_len))))(
      variables, jnp.concatenate([decode_tokens[:, 0], piece[0]])[None],
      positions=jnp.concatenate([decode_positions[:, 0], piece_positions[0]])[None],
      cache={"layers": tuple(zip(view(decode_rows, layers), view(piece_rows, layers)))})

  assert_rel_close(logits[0, :3], logits_d[:, 0], TOL, "decode logits")
  assert_rel_close(logits[0, 3:], logits_p[0], TOL, "prefill logits")
  for i, (streams_caches, *separate) in enumerate(zip(new["layers"], new_d["layers"],
                                                      new_p["layers"])):
    for stream, (out, ref) in enumerate(zip(streams_caches, separate)):
      if pattern[i] in ATTENTION_KINDS:  # the final pools: after the decode's and piece's writes
        out, ref = (out["k_pages"], out["v_pages"]), (new_p["layers"][i]["k_pages"],
                                                      new_p["layers"][i]["v_pages"])
      for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
        assert_rel_close(a, b, TOL, f"layer {i} ({pattern[i]}) stream {stream} cache")
