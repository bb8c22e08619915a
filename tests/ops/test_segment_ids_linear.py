"""Tests of `segment_ids` (packed documents: the state resets to zeros at each document start) on
the linear-RNN ops: simple_gla, gla, delta_rule, gated_delta_rule, kda and mlstm.

Every family runs one packed batch of T = 75 tokens in chunks of 32 (gla/kda sub-chunks of 16), so
T is ragged, with GQA (4 query heads, 2 kv heads), an initial state, and document starts at a chunk
edge, at a sub-chunk edge, inside a chunk, several in one chunk, in the padded last chunk, a
1-token document inside a row and one at its end, equal ids on non-adjacent documents, plus a few
random starts.
"""

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.delta_rule import delta_rule, gated_delta_rule
from jaxchunk.ops.gla import gla
from jaxchunk.ops.kda import kda
from jaxchunk.ops.mlstm import mlstm
from jaxchunk.ops.simple_gla import simple_gla
from tests.ops import linear_oracle
from tests.ops import test_mlstm
from tests.utils import assert_rel_close, randn, rel_err

B, T, H, HK, DK, DV = 2, 75, 4, 2, 8, 6
CHUNK = 32
SCALE = 0.3
STARTS = ({10, 32, 40, 41, 48, 70}, {20, 64, 74})  # forced document starts of rows 0 and 1


@dataclasses.dataclass(frozen=True)
class Family:
  """An op under test. `op(*inputs, **kwargs)`; `make(rng, t=T, dk=DK, dv=DV)` -> (inputs,
  initial_state) with batch B, H query and HK kv heads;
  `oracle(inputs, initial_state, segment_ids)` -> float64 (o, final state); `neutral` the values
  of each input that leave the state unchanged (for padding documents to one length)."""
  names: tuple[str, ...]
  op: Callable
  make: Callable
  oracle: Callable
  neutral: tuple[float, ...]


def _linear_family(op, names, *, per_channel=False, delta=False, gated=True, gate_heads=HK):
  """A `Family` of the linear_oracle recurrence; inputs q, k, v[, gate][, beta]."""
  def make(rng, t=T, dk=DK, dv=DV):
    q, k, v, g, *beta, s0 = linear_oracle.make_inputs(
        rng, b=B, t=t, h=H, hk=HK, dk=dk, dv=dv, gate_heads=gate_heads, per_channel=per_channel,
        delta=delta)
    return (q, k, v) + ((g,) if gated else ()) + tuple(beta), s0

  def oracle(inputs, s0, segment_ids):
    q, k, v, *gates = inputs
    g = gates[0] if gated else None
    beta = gates[-1] if delta else None
    return linear_oracle.oracle(q, k, v, g, beta, SCALE, s0, segment_ids)

  return Family(names, op, make, oracle, (0.0,) * len(names))


def _make_mlstm(rng, t=T, dk=DK, dv=DV):
  q, k, v, i, f = test_mlstm.make_inputs(rng, b=B, t=t, h=H, hk=HK, dk=dk, dv=dv, gate_heads=H)
  return (q, k, v, i, f), test_mlstm.make_state(rng, B, H, dk, dv)


def _mlstm_oracle(inputs, s0, segment_ids):
  """The float64 mLSTM oracle of test_mlstm run on each document alone (initial state on a row's
  first document, the empty state on the others), concatenated."""
  q, _, v, *_ = inputs
  o = np.zeros((*q.shape[:3], v.shape[-1]))
  finals = []
  for row, docs in enumerate(documents(segment_ids)):
    for start, end in docs:
      state = tuple(x[row:row + 1] for x in s0) if start == 0 else None
      piece = tuple(x[row:row + 1, start:end] for x in inputs)
      o[row:row + 1, start:end], final = test_mlstm.oracle(*piece, scale=SCALE, state=state)
    finals.append(final)
  return o, tuple(np.concatenate(x) for x in zip(*finals))


def _delta_rule(q, k, v, beta, **kwargs):
  return delta_rule(q, k, v, beta, **kwargs)


FAMILIES = {
    "simple_gla": _linear_family(simple_gla, ("q", "k", "v", "g")),
    "gla": _linear_family(gla, ("q", "k", "v", "gk"), per_channel=True, gate_heads=H),
    "delta_rule": _linear_family(_delta_rule, ("q", "k", "v", "beta"), delta=True, gated=False),
    "gated_delta_rule": _linear_family(gated_delta_rule, ("q", "k", "v", "g", "beta"), delta=True,
                                       gate_heads=H),
    "kda": _linear_family(kda, ("q", "k", "v", "gk", "beta"), per_channel=True, delta=True),
    "mlstm": Family(("q", "k", "v", "i", "f"), mlstm, _make_mlstm, _mlstm_oracle,
                    (0.0, 0.0, 0.0, -np.inf, np.inf)),
}


def make_segment_ids(rng):
  """[B, T] int32 ids: the forced `STARTS` plus two random starts per row; ids alternate between
  two values, so non-adjacent documents share ids."""
  starts = np.zeros((B, T), bool)
  for row, forced in enumerate(STARTS):
    starts[row, sorted(forced)] = True
    starts[row, rng.integers(1, T, size=2)] = True
  return (7 + np.cumsum(starts, axis=1) % 2).astype(np.int32)


def documents(segment_ids):
  """Per row, the [start, end) token ranges of its documents (segment_ids None: one per row)."""
  if segment_ids is None:
    return [[(0, T)]] * B
  rows = []
  for ids in np.asarray(segment_ids):
    edges = [0] + [t for t in range(1, len(ids)) if ids[t] != ids[t - 1]] + [len(ids)]
    rows.append(list(zip(edges[:-1], edges[1:])))
  return rows


@functools.partial(jax.jit, static_argnames=("family", "impl"))
def run(family, inputs, s0, segment_ids, impl):
  """The packed call, jitted: segment_ids (and everything else) traced."""
  return family.op(*inputs, scale=SCALE, initial_state=s0, output_final_state=True,
                   segment_ids=segment_ids, chunk_size=CHUNK, impl=impl)


def run_documents_alone(family, inputs, s0, segment_ids):
  """Every document as its own row of one batched xla call, padded to the longest document with
  `family.neutral` tokens (which leave the state unchanged), starting from the row's initial state
  (first documents) or zeros. Returns (o [B,T,H,Dv] reassembled, final state of each row's last
  document)."""
  docs = [(row, start, end) for row, ranges in enumerate(documents(segment_ids))
          for start, end in ranges]
  length = max(end - start for _, start, end in docs)
  batch = []
  for x, fill in zip(inputs, family.neutral):
    padded = np.full((len(docs), length) + x.shape[2:], fill, np.float32)
    for d, (row, start, end) in enumerate(docs):
      padded[d, :end - start] = x[row, start:end]
    batch.append(padded)
  states = jax.tree.map(
      lambda x: np.stack([x[row] if start == 0 else np.zeros_like(x[row])
                          for row, start, _ in docs]), s0)
  o_docs, s_docs = run(family, tuple(batch), states, None, "xla")
  o = np.zeros((B, T, H, DV), np.float32)
  for d, (row, start, end) in enumerate(docs):
    o[row, start:end] = o_docs[d, :end - start]
  last = [d for d, (_, _, end) in enumerate(docs) if end == T]
  return o, jax.tree.map(lambda x: np.asarray(x)[last], s_docs)


def assert_state_close(state, ref, tol, what):
  for i, (x, y) in enumerate(zip(jax.tree.leaves(state), jax.tree.leaves(ref))):
    assert_rel_close(x, y, tol, f"{what} final state leaf {i}")


@pytest.mark.parametrize("name", FAMILIES)
def test_packed_matches_documents_and_oracle(rng, name):
  """(1) packed == each document alone; (2) xla, reference and the float64 oracle agree."""
  family = FAMILIES[name]
  inputs, s0 = family.make(rng)
  segment_ids = make_segment_ids(rng)
  o_ref64, s_ref64 = family.oracle(inputs, s0, segment_ids)
  o_alone, s_alone = run_documents_alone(family, inputs, s0, segment_ids)
  assert_rel_close(o_alone, o_ref64, 1e-5, "documents alone vs oracle")
  for impl in ("xla", "reference"):
    o, s = run(family, inputs, s0, segment_ids, impl)
    assert o.dtype == jnp.float32 and o.shape == (B, T, H, DV)
    assert_rel_close(o, o_alone, 1e-5, f"{impl} packed vs documents alone")
    assert_state_close(s, s_alone, 1e-5, f"{impl} packed vs documents alone")
    assert_rel_close(o, o_ref64, 1e-5, f"{impl} vs float64 oracle")
    assert_state_close(s, s_ref64, 1e-5, f"{impl} vs float64 oracle")


def _loss(family, impl, ct, proj):
  """sum(o * ct) + sum(final state * proj) as a jitted function of (inputs, s0, segment_ids)."""
  @jax.jit
  def loss(inputs, s0, segment_ids):
    o, s = run(family, inputs, s0, segment_ids, impl)
    return jnp.sum(o * ct) + sum(jnp.sum(x * p) for x, p in zip(jax.tree.leaves(s),
                                                                 jax.tree.leaves(proj)))
  return loss


@pytest.mark.parametrize("name", FAMILIES)
def test_gradients_match(rng, name):
  """Gradients w.r.t. every input and the initial state, segment ids traced under jit: xla vs
  reference in float32 vs reference in float64."""
  family = FAMILIES[name]
  inputs, s0 = family.make(rng)
  segment_ids = jnp.asarray(make_segment_ids(rng))
  ct = randn(rng, B, T, H, DV)
  proj = jax.tree.map(lambda x: randn(rng, *x.shape), s0)
  grad = lambda impl, *args: jax.grad(_loss(family, impl, *args), (0, 1))
  grads = {impl: grad(impl, ct, proj)(inputs, s0, segment_ids) for impl in ("xla", "reference")}
  with jax.enable_x64(True):
    to64 = lambda tree: jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
    grads64 = grad("reference", *to64((ct, proj)))(*to64((inputs, s0)), segment_ids)
    grads64 = to64(grads64)
  names = family.names + tuple(f"initial_state[{i}]" for i in range(len(jax.tree.leaves(s0))))
  leaves = {impl: jax.tree.leaves(g) for impl, g in grads.items()}
  for i, (g_xla, g_ref, g_64) in enumerate(zip(leaves["xla"], leaves["reference"],
                                               jax.tree.leaves(grads64))):
    assert g_64.dtype == np.float64
    assert_rel_close(g_xla, g_ref, 1e-4, f"d{names[i]} xla vs reference")
    assert_rel_close(g_xla, g_64, 1e-4, f"d{names[i]} xla vs float64")
    assert_rel_close(g_ref, g_64, 1e-4, f"d{names[i]} reference vs float64")


@pytest.mark.parametrize("name", FAMILIES)
def test_one_document_per_row_is_no_segments(rng, name):
  """(3) Ids constant along each row (but different between rows) change nothing."""
  family = FAMILIES[name]
  inputs, s0 = family.make(rng)
  constant = np.repeat(np.array([[3], [9]], np.int32), T, axis=1)
  o, s = run(family, inputs, s0, None, "xla")
  o_seg, s_seg = run(family, inputs, s0, constant, "xla")
  assert rel_err(o_seg, o) <= 1e-6
  assert_state_close(s_seg, s, 1e-6, "constant ids vs none")
  o_ref64, s_ref64 = family.oracle(inputs, s0, None)
  assert_rel_close(o, o_ref64, 1e-5, "no segments vs float64 oracle")
  assert_state_close(s, s_ref64, 1e-5, "no segments vs float64 oracle")


@pytest.mark.parametrize("name", FAMILIES)
@pytest.mark.parametrize("bad", [(B, T + 1), (T,), (B, T, 1), "float"])
def test_bad_segment_ids_raise(rng, name, bad):
  """(4) Wrong shapes or a float dtype: a ValueError naming segment_ids."""
  family = FAMILIES[name]
  inputs, s0 = family.make(rng)
  segment_ids = np.zeros((B, T), np.float32) if bad == "float" else np.zeros(bad, np.int32)
  with pytest.raises(ValueError, match="segment_ids"):
    run(family, inputs, s0, segment_ids, "xla")


def _traced_auto_on_gpu(family, inputs, s0, monkeypatch):
  """ids -> the jaxpr text of the impl="auto" call as a GPU backend would trace it.

  The jit caches are cleared after each trace: the ops' inner jitted functions read the backend
  (Pallas interpret mode or not) while tracing, so an entry traced as "gpu" would run the kernels
  compiled, which fails on CPU, in a later test with the same shapes (delta_rule then
  gated_delta_rule did, depending on the test order)."""
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")

  def trace(ids):
    text = str(jax.make_jaxpr(
        lambda x, x0: family.op(*x, initial_state=x0, segment_ids=ids, impl="auto"))(inputs, s0))
    jax.clear_caches()
    return text
  return trace


@pytest.mark.parametrize("name", FAMILIES)
def test_pallas_takes_segment_ids(rng, name, monkeypatch):
  """impl="pallas" runs the kernels with segment_ids (T = 12, shorter than one chunk, starts at 5,
  6 and 11: 1-token documents inside the row and at its end) and matches the float64 oracle;
  impl="auto" on a GPU backend picks the kernel for them."""
  family = FAMILIES[name]
  inputs, s0 = family.make(rng, t=12, dk=64, dv=64)
  segment_ids = np.repeat(np.array([[0] * 5 + [1] + [0] * 5 + [2]]), B, axis=0)
  o, s = family.op(*inputs, scale=SCALE, initial_state=s0, output_final_state=True,
                   segment_ids=segment_ids, impl="pallas")
  o_ref64, s_ref64 = family.oracle(inputs, s0, segment_ids)
  assert_rel_close(o, o_ref64, 1e-5, "pallas vs float64 oracle")
  assert_state_close(s, s_ref64, 1e-5, "pallas vs float64 oracle")
  assert "pallas_call" in _traced_auto_on_gpu(family, inputs, s0, monkeypatch)(segment_ids)


@pytest.mark.parametrize("name", FAMILIES)
def test_vmap(rng, name):
  """vmap over a leading axis of two packed batches with different ids: each matches the float64
  oracle."""
  family = FAMILIES[name]
  batches = [family.make(rng) for _ in range(2)]
  segment_ids = np.stack([make_segment_ids(rng), make_segment_ids(rng)])
  stacked = jax.tree.map(lambda *x: np.stack(x), *batches)
  o, s = jax.vmap(lambda x, x0, ids: run(family, x, x0, ids, "xla"))(*stacked, segment_ids)
  for i, (inputs, s0) in enumerate(batches):
    o_ref64, s_ref64 = family.oracle(inputs, s0, segment_ids[i])
    assert_rel_close(o[i], o_ref64, 1e-5, f"vmapped batch {i}")
    assert_state_close(jax.tree.map(lambda y: y[i], s), s_ref64, 1e-5, f"vmapped batch {i}")
