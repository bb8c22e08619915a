"""The serving engine against step-by-step full-recompute greedy decoding (attention, RAT,
RAT+local, GLA, Gated DeltaNet models; staggered arrivals, chunked prefill under a token budget,
preemption), compilation counts, page accounting, sampling, streaming, cancellation, bad input."""

import collections
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.config import ModelConfig
from jaxchunk.models.language_model import LanguageModel
from jaxchunk.serving import Engine, EngineConfig, SamplingParams
from jaxchunk.serving import engine as engine_module
from jaxchunk.serving.tokenizer import ByteTokenizer

MAX_LEN = 32
ENGINE = EngineConfig(num_slots=3, max_len=MAX_LEN, page_size=4, chunk_size=4, token_budget=6)
# RAT+local in the default run; the other models (about 20-30 s of compilation each on CPU) in the
# slow run. The attention model's greedy match also runs by default, in
# test_preemption_under_page_pressure (same reference, pages preempted and recomputed).
PATTERNS = [("rat", "local")] + [
    pytest.param(p, marks=pytest.mark.slow)
    for p in [("attention",), ("rat",), ("gla",), ("gated_delta_rule",)]]
# Log-prob tolerance vs the full recompute (float32). These sharp weights amplify rounding: the
# full recompute itself moves by up to 1.7e-4 between packed and unpacked kernels of the same
# weights (test_preemption_under_page_pressure's requests), and the engine's cached path is up to
# 2.5e-4 off a float64 run there. Cache or scheduling bugs change tokens or log-probs by far more.
# The Gated DeltaNet model's full-sequence "xla" op path is itself ~1.5e-2 off a float64 run of
# these weights (its "reference" path 1.3e-4).
LOGPROB_TOL = {("gated_delta_rule",): 3e-2}
DEFAULT_LOGPROB_TOL = 5e-4


@functools.cache
def tiny_config(pattern, vocab_size=64) -> ModelConfig:
  return ModelConfig(vocab_size=vocab_size, d_model=32, layer_pattern=pattern, num_heads=2,
                     num_kv_heads=1, head_dim=8, mlp_hidden=64, window=6, rat_chunk_size=4,
                     linear_chunk_size=8, conv_size=3)


def tiny_model(pattern, vocab_size=64):
  """(model, variables, jitted log-probs (variables, tokens) of the full sequence) of a tiny
  model."""
  model = LanguageModel(tiny_config(pattern, vocab_size))
  variables = model.init(jax.random.PRNGKey(1), jnp.zeros((1, 1), jnp.int32))
  # Sharper logits than the default init: greedy paths that vary from token to token.
  variables = jax.tree.map(lambda x: x * 3.0, variables)
  log_probs = jax.jit(lambda v, t: jax.nn.log_softmax(model.apply(v, t)[0], axis=-1))
  return model, variables, log_probs


@functools.cache
def warm_engine(pattern, **overrides):
  model, variables, _ = tiny_model(pattern)
  engine = Engine(model, variables, EngineConfig(**{**ENGINE.__dict__, **overrides}))
  engine.warmup()
  return engine


def greedy_reference(log_probs, prompts, max_tokens):
  """Full recompute each step on [N, MAX_LEN] right-padded tokens (the models are causal)."""
  seqs = [list(p) for p in prompts]
  chosen = [[] for _ in prompts]
  for _ in range(max_tokens):
    batch = np.zeros((len(seqs), MAX_LEN), np.int32)
    for i, s in enumerate(seqs):
      batch[i, :len(s)] = s
    lp = np.asarray(log_probs(batch))
    for i, s in enumerate(seqs):
      token = int(np.argmax(lp[i, len(s) - 1]))
      chosen[i].append(float(lp[i, len(s) - 1, token]))
      s.append(token)
  return [s[len(p):] for s, p in zip(seqs, prompts)], chosen


def run_staggered(engine, prompts, arrivals, params):
  """Submits prompt i before step arrivals[i]; steps until all finish; returns outputs in order."""
  ids, step = {}, 0
  while len(ids) < len(prompts) or engine.has_work():
    for i, arrival in enumerate(arrivals):
      if arrival == step:
        ids[i] = engine.submit(prompts[i], params)
    engine.step()
    step += 1
  return [engine.pop_output(ids[i]) for i in range(len(prompts))]


def check_matches_reference(engine, pattern, rng, num_prompts, max_tokens):
  # The full recompute runs the engine's variables: its packed projections
  # (`EngineConfig.pack_projections`; packed vs unpacked logits are compared in tests/models).
  _, _, full_log_probs = tiny_model(pattern)
  log_probs = functools.partial(full_log_probs, engine.variables)
  lengths = rng.integers(1, MAX_LEN - max_tokens, size=num_prompts)
  prompts = [list(rng.integers(0, 64, size=n)) for n in lengths]
  arrivals = sorted(rng.integers(0, 12, size=num_prompts))
  traces = engine.num_traces
  outputs = run_staggered(engine, prompts, arrivals,
                          SamplingParams(max_tokens=max_tokens, logprobs=True))
  tokens, chosen = greedy_reference(log_probs, prompts, max_tokens)
  for out, ref_tokens, ref_lp in zip(outputs, tokens, chosen):
    assert out.tokens == ref_tokens
    assert out.finish_reason == "length"
    np.testing.assert_allclose(out.logprobs, ref_lp, rtol=0,
                               atol=LOGPROB_TOL.get(pattern, DEFAULT_LOGPROB_TOL))
  assert engine.num_traces == traces, "the engine compiled after warm-up"
  if engine.pool is not None:
    assert engine.pool.num_free == engine.pool.capacity, "pages leaked"
  assert all(slot is None for slot in engine.scheduler.slots)
  return outputs


@pytest.mark.parametrize("pattern", PATTERNS, ids=lambda p: "-".join(p))
def test_greedy_matches_full_recompute(rng, pattern):
  engine = warm_engine(pattern)
  mixed = engine.num_mixed_steps
  assert len(set(map(tuple, (o.tokens for o in check_matches_reference(
      engine, pattern, rng, num_prompts=6, max_tokens=8))))) > 1
  assert engine.num_mixed_steps > mixed, "no step ran decodes and a prefill piece in one call"


def test_host_arguments_round_trip_through_one_packed_vector(rng):
  """`_pack` / `_unpack` (a step's host arguments as one int32 transfer) give back every array
  bit for bit: floats, seeds >= 2**31, bools, scalars and 2-D tables, in their groups."""
  decode = (rng.integers(0, 1000, (4,)).astype(np.int32), rng.random(4) < 0.5,
            rng.integers(0, 9, (4, 3)).astype(np.int32), rng.standard_normal(4).astype(np.float32),
            np.array([3, 2**31 + 5, 2**32 - 1, 7], np.uint32))
  prefill = (np.int32(2), np.float32(0.37), np.array([[5, 6, 7]], np.int32))
  packed, layout = engine_module._pack((decode, prefill))
  assert packed.dtype == np.int32 and packed.ndim == 1
  groups = jax.jit(engine_module._unpack, static_argnums=1)(packed, layout)
  assert [len(g) for g in groups] == [len(decode), len(prefill)]
  for want, got in zip(decode + prefill, groups[0] + groups[1]):
    got = np.asarray(got)
    assert got.dtype == np.asarray(want).dtype and got.shape == np.shape(want)
    np.testing.assert_array_equal(got, want)
  with pytest.raises(ValueError, match="4-byte"):
    engine_module._pack(((np.zeros(2, np.float64),),))


def test_engine_packs_projections_once():
  """By default the engine serves packed projections (one kernel per group, packed at
  construction); `pack_projections=False` serves the variables as given."""
  model, variables, _ = tiny_model(("rat", "local"))
  packed = Engine(model, variables, ENGINE).variables["params"]
  assert set(packed["block_0"]["mixer"]) == {"in_proj_kernel", "in_proj_bias", "o_proj"}
  assert "gate_up_kernel" in packed["block_1"]["mlp"]
  plain = Engine(model, variables, EngineConfig(**{**ENGINE.__dict__, "pack_projections": False}))
  assert plain.variables["params"]["block_0"]["mixer"].keys() == variables["params"]["block_0"][
      "mixer"].keys()


# RAT+local's multi-step decode in the slow run (the default run has it with attention).
@pytest.mark.parametrize("pattern", [("attention",), pytest.param(("rat", "local"),
                                                                  marks=pytest.mark.slow)],
                         ids=lambda p: "-".join(p))
def test_multi_step_decode_matches_single_steps(rng, pattern):
  """decode_steps=4 (bursts of decode steps in one jitted call while nothing waits) gives the
  single-step engine's tokens and log-probs: greedy against the full recompute, and sampled with
  stop tokens against decode_steps=1; no compilation after warm-up, no page leaked."""
  engine = warm_engine(pattern, decode_steps=4)
  check_matches_reference(engine, pattern, rng, num_prompts=5, max_tokens=11)
  assert engine.num_multi_step_decodes > 0
  prompts = [list(rng.integers(0, 64, size=n)) for n in (3, 9, 5, 14)]
  params = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=7, stop_tokens=(3, 5),
                          logprobs=True)
  single = run_staggered(warm_engine(pattern), prompts, [0, 0, 1, 6], params)
  multi = run_staggered(engine, prompts, [0, 0, 1, 6], params)
  for a, b in zip(single, multi):
    assert (a.tokens, a.finish_reason) == (b.tokens, b.finish_reason)
    np.testing.assert_allclose(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
  if engine.pool is not None:
    assert engine.pool.num_free == engine.pool.capacity, "pages leaked"


def test_steps_dispatch_before_fetching(rng):
  """A step dispatches its calls, then fetches the previous step's tokens: a request decodes its
  next token while the one before is still on the device (its input is read there)."""
  engine = warm_engine(("rat", "local"))
  prompt = list(rng.integers(0, 64, size=3))
  expected = engine.generate([prompt], SamplingParams(max_tokens=4))[0].tokens
  request_id = engine.submit(prompt, SamplingParams(max_tokens=4))
  request = engine._requests[request_id]
  assert engine.step() == []  # the prompt ran; its sampled token is still on the device
  assert request.pending == 1 and not request.generated
  events = engine.step()  # the first decode was dispatched before the first token was fetched
  assert [e.token for e in events] == expected[:1] and request.pending == 1
  times = engine.last_step_times  # where the step's host time went
  assert list(times) == ["schedule", "dispatch", "fetch", "record"]
  assert all(t >= 0 for t in times.values()) and times["dispatch"] > 0
  while engine.has_work():
    engine.step()
  assert engine.pop_output(request_id).tokens == expected and request.pending == 0


def test_steps_update_cache_buffers_in_place():
  """The compiled prefill and mixed steps of the RAT+local engine copy no page pool and no RAT
  summary buffer. XLA copies a donated buffer when a read of it is not ordered before an in-place
  write to it (RAT's decode attention and its summary append; a prefill row's write-back after
  the attention over the summaries it started from): on an H100 that was 0.31 ms of a 350M
  model's 2.5 ms mixed step. The mixed step holds the decode step's work (its decode stream)."""
  engine = warm_engine(("rat", "local"))
  hlo_dtype = {"float32": "f32", "bfloat16": "bf16"}
  buffers = {f"{hlo_dtype[x.dtype.name]}[{','.join(map(str, x.shape))}]"
             for x in jax.tree.leaves(engine.cache) if x.ndim == 4}
  assert len(buffers) == 2  # the page pools and the summaries, of different shapes
  decode_args = engine._idle_decode_args()
  prefill_args = engine._idle_prefill_args(ENGINE.chunk_size, slot=1, start=4)
  for step, groups in [(engine._prefill, (prefill_args,)),
                       (engine._mixed, (decode_args, prefill_args))]:
    packed, layout = engine_module._pack(groups)
    hlo = step.lower(engine.variables, engine.cache, engine.last_tokens, packed,
                     layout).compile().as_text()
    copied = set(re.findall(r"= (\w+\[[\d,]*\])\{[^}]*\} copy\(", hlo))
    assert copied, "no copies at all: the pattern no longer matches XLA's text"
    assert not copied & buffers, copied & buffers


def test_select_rows_and_put_row_is_select_then_put(rng):
  """The mixed step's one-pass write-back equals `_select_rows` then `_put_row`, leaf by leaf
  (pools, RAT summaries and states, linear states and conv histories), on random contents."""
  layout = engine_module.init_engine_cache(tiny_config(("rat", "local", "gla")), ENGINE)
  fill = lambda tree: jax.tree.map(
      lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree)
  new, old = fill(layout), fill(layout)
  row = fill(engine_module._take_row(layout, 0))
  active, slot = jnp.asarray([True, False, True]), jnp.int32(1)
  expected = engine_module._put_row(engine_module._select_rows(active, new, old), row, slot)
  got = engine_module._select_rows_and_put_row(active, new, old, row, slot)
  assert jax.tree.structure(got) == jax.tree.structure(expected)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)


def _count_primitives(jaxpr, names) -> int:
  """Equations of `jaxpr` (a Jaxpr) and its sub-jaxprs whose primitive is in `names`."""
  count = 0
  for eqn in jaxpr.eqns:
    count += eqn.primitive.name in names
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      count += _count_primitives(sub, names)
  return count


def test_mixed_step_adds_no_scatter():
  """A RAT+local mixed step has the decode step's scatters plus the one that stores the piece's
  sample: the piece's keys ride in the decode's pool writes, and its RAT op, run on a batch of
  one, updates its buffers by dynamic updates (vmapped over the one row, each dynamic slice and
  update became a gather or a scatter: 72 scatters and 36 gathers more per mixed call of the
  350M preset, each a kernel on a GPU)."""
  model, variables, _ = tiny_model(("rat", "local"))
  engine = Engine(model, variables, ENGINE)
  decode_args = engine._idle_decode_args()
  prefill_args = engine._idle_prefill_args(ENGINE.chunk_size, slot=1, start=4)
  counts = {}
  for name, step, groups in [("decode", engine._decode, (decode_args,)),
                             ("mixed", engine._mixed, (decode_args, prefill_args))]:
    packed, layout = engine_module._pack(groups)
    jaxpr = jax.make_jaxpr(step, static_argnums=4)(engine.variables, engine.cache,
                                                   engine.last_tokens, packed, layout)
    counts[name] = _count_primitives(jaxpr.jaxpr, {"scatter"})
  assert counts["mixed"] == counts["decode"] + 1, counts


@pytest.mark.parametrize("pattern", [("attention",), ("rat", "local"), ("gla",)])
def test_cache_is_allocated_once(monkeypatch, pattern):
  """`init_engine_cache` only traces the layers' cache initialisers and allocates each leaf once,
  as distinct zero buffers: building the caches and copying them held two caches at the peak (an
  H100 ran out of memory at 96 slots of 4K tokens of the 350M attention model)."""
  seen = []
  layout = engine_module._cache_layout
  monkeypatch.setattr(engine_module, "_cache_layout",
                      lambda *args: seen.append(layout(*args)) or seen[-1])
  model, _, _ = tiny_model(pattern)
  cache = engine_module.init_engine_cache(model.config, ENGINE)
  assert len(seen) == 1
  assert all(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(seen[0]))
  leaves = jax.tree.leaves(cache)
  assert all(isinstance(x, jax.Array) and not np.any(np.asarray(x)) for x in leaves)
  assert len({x.unsafe_buffer_pointer() for x in leaves}) == len(leaves)


def test_pages_behind_the_window_are_freed(rng):
  """With only sliding-window attention layers (window 6, pages of 4, pieces of at most 4), a
  slot keeps the pages its next queries can see (at most 4 of them) instead of all 7 of a 28-token
  request; greedy outputs still match the full recompute (test above)."""
  engine = warm_engine(("rat", "local"))
  tables = engine.scheduler.tables
  assert tables.window == 6
  engine.submit(list(rng.integers(0, 64, size=20)), SamplingParams(max_tokens=8))
  most = 0
  while engine.has_work():
    engine.step()
    most = max(most, max(sum(p is not None for p in owned) for owned in tables.owned))
  assert 0 < most <= 4
  assert engine.pool.num_free == engine.pool.capacity
  model, variables, _ = tiny_model(("attention",))  # global attention keeps every page
  assert Engine(model, variables, ENGINE).scheduler.tables.window is None


def test_preemption_under_page_pressure(rng):
  # 3 slots of up to 8 pages each share 11 pages: requests are preempted and recomputed.
  engine = warm_engine(("attention",), num_pages=12)
  check_matches_reference(engine, ("attention",), rng, num_prompts=6, max_tokens=12)
  assert engine.scheduler.num_preemptions > 0


def test_no_recompilation_in_200_requests(rng):
  engine = warm_engine(("rat", "local"))
  traces = engine.num_traces
  prompts = [list(rng.integers(0, 64, size=n)) for n in rng.integers(1, 12, size=200)]
  params = [SamplingParams(max_tokens=int(n), temperature=float(t), top_k=int(k), seed=i)
            for i, (n, t, k) in enumerate(zip(rng.integers(1, 6, size=200),
                                              rng.choice([0.0, 0.7], size=200),
                                              rng.integers(0, 10, size=200)))]
  outputs = engine.generate(prompts, params)
  assert [len(o.tokens) for o in outputs] == [p.max_tokens for p in params]
  assert engine.num_traces == traces
  assert engine.pool.num_free == engine.pool.capacity


def test_warmup_runs_every_step_shape_and_compiles_once(monkeypatch):
  # A GPU records an executable's CUDA graph on its second run: warm-up must run each shape
  # more than once, and warming up again (or serving) must not compile.
  engine = warm_engine(("rat", "local"))
  calls = collections.Counter()
  run = engine._run
  names = {id(engine._decode): "decode", id(engine._prefill): "prefill", id(engine._mixed): "mixed"}

  def counting_run(step, *groups):
    length = None if step is engine._decode else groups[-1][1].shape[1]  # the piece's tokens
    calls[names[id(step)], length] += 1
    return run(step, *groups)

  monkeypatch.setattr(engine, "_run", counting_run)
  traces = engine.num_traces
  engine.warmup(runs=2)
  shapes = [("decode", None)] + [(kind, n) for n in engine.piece_lengths
                                 for kind in ("prefill", "mixed")]
  assert calls == {shape: 2 for shape in shapes}
  assert engine.num_traces == traces
  with pytest.raises(ValueError, match="runs"):
    engine.warmup(runs=0)


def test_mixed_step_limit_caps_the_pieces_of_steps_that_decode(rng, monkeypatch):
  engine = warm_engine(("rat", "local"))
  monkeypatch.setattr(engine, "config", dataclasses.replace(engine.config, mixed_step_limit=1.5))
  monkeypatch.setattr(engine, "step_times", {})
  monkeypatch.setattr(engine.scheduler, "mixed_chunk_size", engine.scheduler.mixed_chunk_size)
  traces = engine.num_traces
  engine.warmup(runs=1)
  times = engine.step_times
  assert set(times) == {"decode"} | {f"mixed {n}" for n in engine.piece_lengths}
  assert all(t > 0 for t in times.values())
  assert engine.scheduler.mixed_chunk_size == engine_module.longest_piece_within(
      1.5, times["decode"], {n: times[f"mixed {n}"] for n in engine.piece_lengths})
  # A cap under the budget: steps that decode take pieces of one token, steps without decodes
  # pieces up to chunk_size; the tokens are unchanged and nothing compiles.
  engine.scheduler.mixed_chunk_size = 1
  schedules, step = [], engine.step

  def recording_step():
    events = step()
    schedules.append(engine.last_schedule)
    return events

  monkeypatch.setattr(engine, "step", recording_step)
  check_matches_reference(engine, ("rat", "local"), rng, num_prompts=4, max_tokens=6)
  pieces = [(bool(s.decodes), p.length) for s in schedules for p in s.prefills]
  assert {length for decodes, length in pieces if decodes} == {1}
  assert max(length for decodes, length in pieces if not decodes) > 1
  assert engine.num_traces == traces


def test_longest_piece_within():
  mixed = {1: 1.1, 2: 1.2, 4: 1.6, 8: 2.5}
  assert engine_module.longest_piece_within(1.5, 1.0, mixed) == 2
  assert engine_module.longest_piece_within(2.5, 1.0, mixed) == 8
  assert engine_module.longest_piece_within(1.0, 1.0, mixed) == 1  # none fits: the shortest
  for bad in (0.5, True, "2"):
    with pytest.raises(ValueError, match="mixed_step_limit"):
      EngineConfig(mixed_step_limit=bad)


def test_seeded_sampling_is_reproducible_across_batches(rng):
  engine = warm_engine(("attention",))
  prompt = list(rng.integers(0, 64, size=5))
  params = SamplingParams(max_tokens=6, temperature=1.0, top_p=0.9, seed=7, logprobs=True)
  alone = engine.generate([prompt], params)[0]
  others = [list(rng.integers(0, 64, size=9)) for _ in range(2)]
  crowded = engine.generate([others[0], prompt, others[1]],
                            [SamplingParams(max_tokens=4, temperature=1.0), params,
                             SamplingParams(max_tokens=3)])[1]
  assert crowded.tokens == alone.tokens
  np.testing.assert_allclose(crowded.logprobs, alone.logprobs, rtol=1e-5)
  greedy = engine.generate([prompt], SamplingParams(max_tokens=6))[0]
  top1 = engine.generate([prompt], SamplingParams(max_tokens=6, temperature=2.0, top_k=1,
                                                  seed=3))[0]
  assert top1.tokens == greedy.tokens


def test_stop_tokens_strings_and_streaming(rng):
  model, variables, _ = tiny_model(("attention",), vocab_size=256)
  engine = Engine(model, variables, ENGINE, tokenizer=ByteTokenizer())
  prompt = list(rng.integers(0, 256, size=6))
  free_run = engine.generate([prompt], SamplingParams(max_tokens=10))[0]
  stop_token = free_run.tokens[3]
  first = free_run.tokens.index(stop_token)
  stopped = engine.generate([prompt], SamplingParams(max_tokens=10, stop_tokens=(stop_token,)))[0]
  assert stopped.tokens == free_run.tokens[:first + 1] and stopped.finish_reason == "stop"

  stop_text = ByteTokenizer().decode(free_run.tokens)[2:4]
  by_string = engine.generate([prompt], SamplingParams(max_tokens=10, stop=(stop_text,)))[0]
  assert by_string.finish_reason == "stop" and stop_text not in by_string.text
  assert ByteTokenizer().decode(free_run.tokens).startswith(by_string.text)

  events = list(engine.stream(prompt, SamplingParams(max_tokens=10)))
  assert [e.token for e in events] == free_run.tokens
  assert "".join(e.text for e in events) == free_run.text
  assert events[-1].finished and events[-1].finish_reason == "length"


def test_cancel_frees_slot_and_pages(rng):
  engine = warm_engine(("attention",))
  long_id = engine.submit(list(rng.integers(0, 64, size=10)), SamplingParams(max_tokens=20))
  for _ in range(4):
    engine.step()
  assert engine.pool.num_free < engine.pool.capacity
  engine.cancel(long_id)
  assert engine.output(long_id).finish_reason == "cancelled"
  assert engine.pool.num_free == engine.pool.capacity
  assert all(slot is None for slot in engine.scheduler.slots)
  engine.pop_output(long_id)
  stream = engine.stream(list(rng.integers(0, 64, size=4)), SamplingParams(max_tokens=20))
  next(stream)
  stream.close()  # a client that goes away
  assert not engine.has_work() and engine.pool.num_free == engine.pool.capacity
  out = engine.generate([[1, 2, 3]], SamplingParams(max_tokens=2))[0]  # the engine goes on
  assert len(out.tokens) == 2


def test_bad_input_raises_and_engine_continues():
  engine = warm_engine(("attention",))
  with pytest.raises(ValueError, match="empty"):
    engine.submit([])
  with pytest.raises(ValueError, match="max_len"):
    engine.submit([1] * 30, SamplingParams(max_tokens=5))
  with pytest.raises(ValueError, match=r"\[0, 64\)"):
    engine.submit([1, 64])
  for bad in (["a", "b"], [1.5, 2.0], [[1, 2], [3]], 7):
    with pytest.raises(ValueError, match="token ids"):
      engine.submit(bad)
  with pytest.raises(ValueError, match="tokenizer"):
    engine.submit([1], SamplingParams(stop=("x",)))
  with pytest.raises(ValueError, match="temperature"):
    SamplingParams(temperature=-1.0)
  with pytest.raises(ValueError, match="top_p"):
    SamplingParams(top_p=0.0)
  with pytest.raises(ValueError, match="unknown sampling fields"):
    SamplingParams.from_dict({"max_tokens": 3, "beam_width": 2})
  with pytest.raises(ValueError, match="chunk_size"):
    EngineConfig(chunk_size=6)
  with pytest.raises(ValueError, match="num_pages"):
    EngineConfig(max_len=32, page_size=4, num_pages=5)
  for name, bad in (("num_slots", True), ("decode_steps", 2.0), ("token_budget", 80.0),
                    ("num_pages", "9"), ("prefill_first", 1)):
    with pytest.raises(ValueError, match=name):
      EngineConfig(**{name: bad})
  assert len(engine.generate([[5, 6]], SamplingParams(max_tokens=3))[0].tokens) == 3
  assert engine.generate([np.array([5, 6])], SamplingParams(max_tokens=3))[0].prompt == [5, 6]
