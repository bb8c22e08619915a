"""Sequence parallelism wired into the layers, the language model and the trainer (8 CPU devices):
each sequence-parallel run equals the single-device run on the natural order (values and grads)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import DataConfig, LoopConfig, MeshConfig, OptimConfig, RunConfig
from jaxchunk.config import ModelConfig
from jaxchunk.layers.conv import ShortConv
from jaxchunk.models.language_model import LanguageModel
from jaxchunk.models.mor import MoRConfig, MoRLanguageModel
from jaxchunk.parallel.api import SequenceParallel
from jaxchunk.parallel.halo import halo_sends, halo_shard, sequence_parallel_halo
from jaxchunk.parallel.mesh import from_layout, layout_permutation, to_layout
from jaxchunk.training import train_step as step_lib
from jaxchunk.training.trainer import Trainer
from tests.utils import alternating_segment_ids, assert_rel_close, randn

B, T, SEQUENCE = 2, 64, 4
TOL = 1e-5
slow = pytest.mark.slow


def _sequence_parallel(layout="zigzag", strategy="auto", sequence=SEQUENCE):
  """A SequenceParallel over a trainer mesh with data=2 and the given sequence axis."""
  mesh = step_lib.make_mesh(MeshConfig(data=2, sequence=sequence), jax.devices()[:2 * sequence])
  return SequenceParallel(mesh, batch_axes=step_lib.BATCH_AXES, layout=layout, strategy=strategy)


def _check_values_and_grads(single, parallel, args, rng, what):
  """single(*args) and parallel(*args) (both natural order) agree, and so do the gradients of a
  random projection of the output w.r.t. every arg (pytrees of parameters included)."""
  want = jax.jit(single)(*args)
  assert_rel_close(jax.jit(parallel)(*args), want, TOL, f"{what} value")
  cotangent = randn(rng, *want.shape)
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * cotangent)
  argnums = tuple(range(len(args)))
  grads_want = jax.jit(jax.grad(loss(single), argnums))(*args)
  grads = jax.jit(jax.grad(loss(parallel), argnums))(*args)
  leaves = zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(grads_want))
  for (path, got), ref in leaves:
    assert_rel_close(got, ref, TOL, f"{what} grad {jax.tree_util.keystr(path)}")


# ------------------------------------------------------------------------------------------------
# Halos and the short convolution.


def test_halo_sends_pair_each_segment_with_its_predecessor():
  # zig-zag, 4 devices: device i holds segments i and 7 - i
  assert halo_sends(4, "zigzag") == {(0, 0): ((0, 1), (1, 2), (2, 3)),
                                     (1, 1): ((1, 0), (2, 1), (3, 2)),
                                     (1, 0): ((3, 3),)}
  assert halo_sends(4, "contiguous") == {(0, 0): ((0, 1), (1, 2), (2, 3))}


def test_halo_holds_the_tokens_before_each_segment(rng):
  sp = _sequence_parallel()
  x = jnp.asarray(randn(rng, B, T, 3))
  halo = jax.jit(lambda x: sp.halo(x, 3))(to_layout(x, SEQUENCE, "zigzag"))
  starts = layout_permutation(T, SEQUENCE, "zigzag")[::T // sp.num_segments]
  padded = np.concatenate([np.zeros((B, 3, 3), np.float32), x], axis=1)
  want = np.stack([padded[:, s:s + 3] for s in starts], axis=1)
  np.testing.assert_array_equal(halo, want)
  seq = jax.sharding.PartitionSpec(sp.batch_axes, "sequence")
  per_device = jax.shard_map(lambda x: halo_shard(x, 3, axis_name="sequence"), mesh=sp.mesh,
                             in_specs=seq, out_specs=seq)
  np.testing.assert_array_equal(jax.jit(per_device)(to_layout(x, SEQUENCE, "zigzag")), want)
  with pytest.raises(ValueError, match=r"halo width 9 must be in \[0, 8\]"):
    sequence_parallel_halo(x, 9, mesh=sp.mesh, batch_axes=sp.batch_axes)


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_short_conv_matches_single_device(rng, layout):
  sp = _sequence_parallel(layout)
  conv = ShortConv(6, conv_size=4)
  x = jnp.asarray(randn(rng, B, T, 6))
  params = conv.init(jax.random.key(0), x)
  lay = lambda a: to_layout(a, SEQUENCE, layout)
  single = lambda params, x: conv.apply(params, x)[0]
  parallel = lambda params, x: from_layout(conv.apply(params, lay(x), sequence_parallel=sp)[0],
                                           SEQUENCE, layout)
  _check_values_and_grads(single, parallel, (params, x), rng, f"conv {layout}")


# Starts at zig-zag segment edges on 4 devices (every T / 8 tokens), inside segments, at
# neighbouring tokens and within conv_size - 1 tokens of an edge.
DOCUMENT_STARTS = ({T // 8, T // 8 + 1, 3 * T // 8 + 2, T - 1}, {5, T // 2, T // 2 + 2})


def test_short_conv_with_segment_ids_matches_single_device(rng):
  sp = _sequence_parallel()
  conv = ShortConv(6, conv_size=4)
  x = jnp.asarray(randn(rng, B, T, 6))
  ids = alternating_segment_ids(DOCUMENT_STARTS, T)
  params = conv.init(jax.random.key(0), x)
  lay = lambda a: to_layout(a, SEQUENCE, "zigzag")
  single = lambda params, x: conv.apply(params, x, segment_ids=ids)[0]
  parallel = lambda params, x: from_layout(
      conv.apply(params, lay(x), segment_ids=lay(ids), sequence_parallel=sp)[0], SEQUENCE,
      "zigzag")
  _check_values_and_grads(single, parallel, (params, x), rng, "conv documents")


def test_short_conv_errors(rng):
  sp = _sequence_parallel(sequence=4)
  conv = ShortConv(6, conv_size=4)
  x = jnp.asarray(randn(rng, B, 16, 6))     # 8 segments of 2 tokens < conv_size - 1
  params = conv.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="at least conv_size - 1 = 3 tokens"):
    conv.apply(params, x, sequence_parallel=sp)
  with pytest.raises(ValueError, match="cannot be combined with a cache"):
    conv.apply(params, x, cache=jnp.zeros((B, 3, 6)), sequence_parallel=sp)


# ------------------------------------------------------------------------------------------------
# The language model.

MODEL_CASES = {
    # name: (layer pattern, attention strategy); "auto" sends global layers with H divisible by
    # the axis to Ulysses and windowed ones to the ring.
    "attention+gated_delta_rule": (("attention", "gated_delta_rule"), "auto"),
    "rat+local": (("rat", "local"), "auto"),
    "gla+attention_ring": (("gla", "attention"), "ring"),
}


def _model_config(pattern, **fields):
  options = dict(d_model=32, layer_pattern=pattern, num_heads=4, num_kv_heads=2, head_dim=8,
                 mlp_hidden=64, window=12, rat_chunk_size=8, linear_chunk_size=8, impl="xla")
  return ModelConfig(**{**options, **fields})


@functools.cache
def _model_and_params(case):
  """(model, params) of a case, initialised once (under jit) for all the tests of that case."""
  model = LanguageModel(_model_config(MODEL_CASES[case][0]))
  # the tokens only give init their shape
  params = jax.jit(lambda key: model.init(key, jnp.zeros((B, T), jnp.int32)))(jax.random.key(0))
  return model, params


def _model_and_tokens(rng, case):
  model, params = _model_and_params(case)
  tokens = jnp.asarray(rng.integers(0, 256, (B, T)), jnp.int32)
  return model, params, tokens, _sequence_parallel(strategy=MODEL_CASES[case][1])


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_forward_matches_single_device(rng, case):
  """Logits (un-permuted) of a sequence=4, data=2 forward."""
  model, params, tokens, sp = _model_and_tokens(rng, case)
  logits = jax.jit(lambda p, t: model.apply(p, t, sequence_parallel=sp)[0])(
      params, to_layout(tokens, SEQUENCE, "zigzag"))
  want = jax.jit(lambda p, t: model.apply(p, t)[0])(params, tokens)
  assert_rel_close(from_layout(logits, SEQUENCE, "zigzag"), want, TOL, f"{case} logits")


# rat+local in the slow run: test_parallel.py checks sequence-parallel RAT with documents (values
# and gradients) in the default run.
@pytest.mark.parametrize("case", ["attention+gated_delta_rule",
                                  *(pytest.param(c, marks=slow) for c in ("rat+local",
                                                                           "gla+attention_ring"))])
def test_model_forward_with_documents_matches_single_device(rng, case):
  """Packed documents (segment_ids and per-document positions, in layout order): attention, RAT
  and the linear mixers with their short convolutions keep documents apart across devices."""
  model, params, tokens, sp = _model_and_tokens(rng, case)
  ids = alternating_segment_ids(DOCUMENT_STARTS, T)
  positions = np.stack([np.arange(T) - np.maximum.accumulate(
      np.where(np.r_[True, row[1:] != row[:-1]], np.arange(T), 0)) for row in ids])
  positions = positions.astype(np.int32)
  lay = lambda a: to_layout(a, SEQUENCE, "zigzag")
  logits = jax.jit(lambda p, t, s, q: model.apply(p, t, segment_ids=s, positions=q,
                                                  sequence_parallel=sp)[0])(
      params, lay(tokens), lay(ids), lay(positions))
  want = jax.jit(lambda p, t, s, q: model.apply(p, t, segment_ids=s, positions=q)[0])(
      params, tokens, ids, positions)
  assert_rel_close(from_layout(logits, SEQUENCE, "zigzag"), want, TOL, f"{case} logits")


@slow
@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_gradients_match_single_device(rng, case):
  """Parameter gradients of a sequence=4, data=2 forward (the fast trainer test below checks
  them for attention layers through three optimiser steps)."""
  model, params, tokens, sp = _model_and_tokens(rng, case)
  single = lambda params: model.apply(params, tokens)[0]
  parallel = lambda params: from_layout(
      model.apply(params, to_layout(tokens, SEQUENCE, "zigzag"), sequence_parallel=sp)[0],
      SEQUENCE, "zigzag")
  _check_values_and_grads(single, parallel, (params,), rng, case)


def test_model_sequence_parallel_errors(rng):
  sp = _sequence_parallel()
  tokens = jnp.asarray(rng.integers(0, 256, (B, T)), jnp.int32)
  model = LanguageModel(_model_config(("rat",), rat_chunk_size=16))
  params = model.init(jax.random.key(0), tokens)
  with pytest.raises(ValueError, match="multiple of 128"):      # 8 segments of whole RAT chunks
    model.apply(params, tokens, sequence_parallel=sp)
  with pytest.raises(ValueError, match="cannot be combined with a cache"):
    model.apply(params, tokens, sequence_parallel=sp, cache={"length": None, "layers": (None,)})
  with pytest.raises(ValueError, match="do not support sequence parallelism"):
    step_lib.check_sequence_parallel(MoRLanguageModel(MoRConfig()), sp)


# ------------------------------------------------------------------------------------------------
# The trainer.


def _run_config(corpus, pattern, mesh, segment_ids):
  return RunConfig(
      model=_model_config(pattern),
      data=DataConfig(source="text", paths=(corpus,), seq_len=T, global_batch_size=4,
                      validation_fraction=0.25, model_segment_ids=segment_ids),
      optim=OptimConfig(lr=1e-2, warmup_steps=1),
      mesh=mesh,
      run=LoopConfig(steps=3, eval_every=3, eval_batches=1, checkpoint_every=3, log_every=1,
                     async_checkpoints=False))


def _params(trainer):
  return jax.tree.map(np.asarray, jax.device_get(trainer.state["params"]))


@pytest.mark.parametrize("pattern,sequence,segment_ids", [
    (("attention", "local"), 2, True),
    pytest.param(("local", "gated_delta_rule"), 2, True, marks=slow),
    pytest.param(("rat", "attention"), 4, False, marks=slow)])
def test_trainer_sequence_parallel_matches_single_device(corpus, tmp_path, pattern, sequence,
                                                         segment_ids):
  """Three AdamW steps with mesh data=2 x sequence=n equal one device; so does the evaluation.
  Attention and linear layers also take packed documents (segment_ids and per-document
  positions)."""
  config = _run_config(corpus, pattern, MeshConfig(data=1), segment_ids)
  single = Trainer(config, str(tmp_path / "one"), devices=jax.devices()[:1])
  parallel = Trainer(dataclasses.replace(config, mesh=MeshConfig(data=2, sequence=sequence)),
                     str(tmp_path / "sp"), devices=jax.devices()[:2 * sequence])
  # rows arrive in zig-zag order, each device holding only its 2 segments of each row
  perm = layout_permutation(T, sequence, "zigzag")
  for key, value in parallel.val_batches[0].items():
    np.testing.assert_array_equal(value, np.asarray(single.val_batches[0][key])[:, perm], key)
    assert {s.data.shape for s in value.addressable_shards} == {(2, T // sequence)}, key
  single.train()
  parallel.train()
  for want, got in zip(single._records, parallel._records):
    assert got["loss"] == pytest.approx(want["loss"], rel=TOL), want["step"]
  # per tensor ||difference|| / ||single|| (a lone near-zero entry may move by Adam's noise)
  leaves = zip(jax.tree_util.tree_leaves_with_path(_params(parallel)),
               jax.tree.leaves(_params(single)))
  for (path, got), want in leaves:
    assert_rel_close(got, want, 10 * TOL, f"param {jax.tree_util.keystr(path)}")
  # evaluation of the same parameters (Adam steps amplify rounding differences of the params)
  parallel.state = dict(parallel.state, params=jax.device_put(
      single.state["params"], parallel.state_shardings["params"]))
  assert parallel.evaluate() == pytest.approx(single.evaluate(), rel=TOL)
  single.close()
  parallel.close()
