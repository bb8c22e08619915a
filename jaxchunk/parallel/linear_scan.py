"""Sequence-parallel linear recurrences: the sequence is split over a mesh axis, every device runs
the single-device chunked op on its own tokens, and the devices' affine state summaries are
combined.

Every linear op of `jaxchunk.ops` maps the state entering a stretch of tokens affinely to the state
leaving it, S_out = A S_in + B, with B the state the stretch reaches from a zero state. Per device
(inside `jax.shard_map`, per segment of the layout, see `jaxchunk.parallel.mesh`):

1. run the op on the segment from a zero state, keeping its outputs and B;
2. all-gather the small summaries (A, B) of every segment (O(segments * Dk * Dv) per head), put
   them in sequence order and fold them locally from the op's initial state: the state entering
   each segment and the final state (every device computes the same fold);
3. correct the outputs with the entering state S_in.

The summaries and corrections per family:

  simple_gla, gla    A = diag(exp(b_T)), b_t the segment's cumulative log-decay (per channel for
                     gla); the correction is o_t += scale (q_t * exp(b_t)) S_in, exact and cheap.
  delta_rule,        A is a dense [Dk, Dk] product of (I - beta k^T k) diag(exp(a)) factors. It
  gated_delta_rule,  comes from the same op call, run on values widened by Dk zero columns from
  kda                the initial state [0 | I]: that state block evolves as A_t, so the call returns
                     B, A and the rows scale q_t A_t, and the correction is
                     o_t += (scale q_t A_t) S_in (one op call over Dv + Dk value columns).
  mlstm              the max-stabilised state (C, n, m) composes as
                     m = max(F + m_in, m_B), C = exp(F + m_in - m) C_in + exp(m_B - m) C_B (n alike)
                     with F the segment's total log forget gate and (C_B, n_B, m_B) the state from
                     zero, computed directly with one einsum. Since the normaliser
                     max(|q n|, exp(-m)) is not linear in the state, the op is re-run once from the
                     entering state instead of corrected (one op call plus the summary einsum).

Packed documents (`segment_ids`, in layout order like the other inputs): each segment runs the op
with its ids, so documents inside it reset as on one device; a segment where a document starts
(inside it, or at its first token: the previous token's id comes with a one-token halo) keeps
nothing of the entering state at its end, so its summary drops that term (and mlstm's composes
from the empty state of its last document); the entering state corrects only the tokens of the
segment's first document, and none when that document starts at the segment's first token.

Gradients flow across devices through the all-gather (its transpose is a reduce-scatter).
Each op has a per-device form `<op>_shard(..., axis_name=, layout=)` for use inside `shard_map`
and `sequence_parallel_linear(op, ...)` runs one on global arrays sharded over a mesh.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxchunk.ops._common import (check_nonpositive, check_qkv, check_segment_ids, check_shape,
                                  compute_dtype, default_scale, document_starts, repeat_heads)
from jaxchunk.ops.delta_rule import delta_rule, gated_delta_rule
from jaxchunk.ops.gla import gla
from jaxchunk.ops.kda import kda
from jaxchunk.ops.mlstm import mlstm
from jaxchunk.ops.simple_gla import simple_gla
from jaxchunk.parallel.halo import halo_shard
from jaxchunk.parallel.mesh import check_divisible, check_layout, local_segments, segment_table

_HIGHEST = lax.Precision.HIGHEST


def _einsum(spec, *operands):
  return jnp.einsum(spec, *operands, precision=_HIGHEST)


# ------------------------------------------------------------------------------------------------
# Segments and the summary fold.


def split_segments(x, segments: int):
  """[B, S * Ts, ...] -> [S * B, Ts, ...]: a device's layout segments stacked on the batch axis."""
  b, t = x.shape[:2]
  x = x.reshape((b, segments, t // segments) + x.shape[2:])
  return jnp.swapaxes(x, 0, 1).reshape((segments * b, t // segments) + x.shape[3:])


def merge_segments(x, segments: int):
  """Inverse of `split_segments`: [S * B, Ts, ...] -> [B, S * Ts, ...]."""
  sb, ts = x.shape[:2]
  x = jnp.swapaxes(x.reshape((segments, sb // segments, ts) + x.shape[2:]), 0, 1)
  return x.reshape((sb // segments, segments * ts) + x.shape[3:])


def _per_segment(x, segments: int):
  """[S * B, ...] -> [S, B, ...]."""
  return x.reshape((segments, x.shape[0] // segments) + x.shape[1:])


def _per_batch(x):
  """[S, B, ...] -> [S * B, ...]."""
  return x.reshape((-1,) + x.shape[2:])


def _vary_like(x, *likes):
  """Marks `x` as varying over every mesh axis some array of `likes` varies over.

  Scan carries must keep their varying type: a state entering a scan over inputs sharded on the
  sequence (and batch) axes must vary over those axes too.
  """
  varying = frozenset().union(*(jax.typeof(y).manual_axis_type.varying
                                for y in jax.tree.leaves(likes)))
  axes = tuple(sorted(varying - jax.typeof(x).manual_axis_type.varying))
  return lax.pcast(x, axes, to="varying") if axes else x


def entering_states(summaries, initial_state, apply, *, axis_name: str, layout: str):
  """Folds every device's segment summaries in sequence order, starting from `initial_state`.

  Args:
    summaries: pytree of arrays [S, ...], this device's segments in local order.
    initial_state: pytree, the state before the first token of the sequence.
    apply: (summary, state) -> the state after a segment entered with `state`.
    axis_name: the sequence mesh axis.
    layout: "contiguous" or "zigzag".

  Returns:
    (the states entering this device's segments, pytree [S, ...]; the final state).
  """
  n = lax.axis_size(axis_name)
  gathered = jax.tree.map(lambda x: lax.all_gather(x, axis_name, to="invarying"), summaries)
  order = np.argsort(segment_table(n, layout).reshape(-1))
  in_order = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:])[order], gathered)

  def fold(state, summary):
    return apply(summary, state), state

  initial_state = jax.tree.map(lambda x: _vary_like(x, in_order), initial_state)
  final, entering = lax.scan(fold, initial_state, in_order)
  mine = local_segments(axis_name, layout)
  return jax.tree.map(lambda x: x[mine], entering), final


def segment_documents(segment_ids, segments: int, *, axis_name: str, layout: str):
  """Inside `shard_map`: where the documents of this device's segments start.

  Args:
    segment_ids: the local block [B, Tl] of int ids (layout order), or None.
    segments: local segments S of the layout.
    axis_name, layout: the sequence axis and layout.

  Returns:
    None without ids, else (ids [S*B, Ts] split like `split_segments`; first [S*B, Ts] bool, the
    tokens of the document that continues the state entering the segment (none where a document
    starts at the segment's first token); open [S*B, 1] float, 1 where no document starts in the
    segment, so that the entering state reaches its end).
  """
  if segment_ids is None:
    return None
  ids = split_segments(segment_ids, segments)
  before = jnp.swapaxes(halo_shard(segment_ids, 1, axis_name=axis_name, layout=layout)[:, :, 0],
                        0, 1).reshape(-1)               # the id of the token before each segment
  b = segment_ids.shape[0]
  sequence_start = jnp.repeat(local_segments(axis_name, layout) == 0, b)
  fresh = (ids[:, 0] != before) & ~sequence_start      # a document starts at the first token
  first = (jnp.cumsum(document_starts(ids), axis=1) == 0) & ~fresh[:, None]
  return ids, first, first[:, -1:].astype(jnp.float32)


def _check_local(t: int, segments: int, axis_name: str) -> None:
  if t % segments:
    raise ValueError(f"the local sequence length {t} must be a multiple of {segments} (the "
                     f"segments per device of the layout on axis {axis_name!r})")


def _check_initial_state(state, shape: tuple) -> None:
  if state is not None:
    check_shape(state, shape, "initial_state", "[batch, heads, head_dim, head_dim_v]")


# ------------------------------------------------------------------------------------------------
# Gated linear attention: diagonal decay summaries and an additive correction.


def _gated_shard(op, q, k, v, gate, *, per_channel: bool, axis_name: str, layout: str, scale,
                 initial_state, output_final_state: bool, chunk_size: int, impl: str,
                 segment_ids=None):
  b, t, h, _, dk, dv = check_qkv(q, k, v)
  segments = check_layout(layout)
  _check_local(t, segments, axis_name)
  _check_initial_state(initial_state, (b, h, dk, dv))
  split = functools.partial(split_segments, segments=segments)
  documents = segment_documents(segment_ids, segments, axis_name=axis_name, layout=layout)
  dtype = compute_dtype(q, k, v, gate, initial_state)
  zero = _vary_like(jnp.zeros((segments * b, h, dk, dv), dtype), q, k, v, gate)
  o_local, s_local = op(split(q), split(k), split(v), split(gate), scale=scale, initial_state=zero,
                        output_final_state=True, chunk_size=chunk_size,
                        segment_ids=None if documents is None else documents[0], impl=impl)
  log_decay = repeat_heads(jnp.asarray(split(gate), dtype), h)
  log_decay = log_decay if per_channel else log_decay[..., None]
  cum = jnp.cumsum(log_decay, axis=1)                      # [S*B, Ts, H, Dk or 1]
  carry = jnp.exp(cum[:, -1])                              # the entering state's decay to the end
  q_decayed = jnp.asarray(split(q), dtype) * default_scale(scale, dk) * jnp.exp(cum)
  if documents is not None:
    _, first, open_ = documents
    carry = carry * open_[..., None]
    q_decayed = q_decayed * first[..., None, None]

  def apply(summary, state):
    carry, from_zero = summary
    return carry[..., None] * state + from_zero

  summaries = (_per_segment(carry, segments), _per_segment(s_local.astype(dtype), segments))
  initial = (jnp.zeros((b, h, dk, dv), dtype) if initial_state is None
             else jnp.asarray(initial_state, dtype))
  entering, final = entering_states(summaries, initial, apply, axis_name=axis_name, layout=layout)
  o = o_local.astype(dtype) + _einsum("bthk,bhkv->bthv", q_decayed, _per_batch(entering))
  return merge_segments(o, segments).astype(q.dtype), (final if output_final_state else None)


def simple_gla_shard(q, k, v, g, *, axis_name: str, layout: str = "contiguous", scale=None,
                     initial_state=None, output_final_state=False, chunk_size=64,
                     segment_ids=None, impl="auto"):
  """Per-device `simple_gla` inside `shard_map`: local blocks q [B,Tl,H,Dk], k [B,Tl,Hk,Dk],
  v [B,Tl,Hk,Dv], g [B,Tl,H or Hk], segment_ids [B,Tl] or None; initial_state [B,H,Dk,Dv] (the
  same on every device).

  Returns (o [B,Tl,H,Dv], final state [B,H,Dk,Dv] float32 (identical on every device) or None).
  """
  return _gated_shard(simple_gla, q, k, v, g, per_channel=False, axis_name=axis_name,
                      layout=layout, scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, chunk_size=chunk_size, impl=impl,
                      segment_ids=segment_ids)


def gla_shard(q, k, v, gk, *, axis_name: str, layout: str = "contiguous", scale=None,
              initial_state=None, output_final_state=False, chunk_size=64, segment_ids=None,
              impl="auto"):
  """Per-device `gla` inside `shard_map`; gk [B,Tl,H or Hk,Dk]. Otherwise as `simple_gla_shard`."""
  return _gated_shard(gla, q, k, v, gk, per_channel=True, axis_name=axis_name, layout=layout,
                      scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, chunk_size=chunk_size, impl=impl,
                      segment_ids=segment_ids)


# ------------------------------------------------------------------------------------------------
# Delta rule family: dense [Dk, Dk] transition summaries from widened values.


def _delta_shard(op, q, k, v, *gates, axis_name: str, layout: str, scale, initial_state,
                 output_final_state: bool, chunk_size: int, impl: str, segment_ids=None):
  b, t, h, _, dk, dv = check_qkv(q, k, v)
  segments = check_layout(layout)
  _check_local(t, segments, axis_name)
  _check_initial_state(initial_state, (b, h, dk, dv))
  split = functools.partial(split_segments, segments=segments)
  documents = segment_documents(segment_ids, segments, axis_name=axis_name, layout=layout)
  dtype = compute_dtype(q, k, v, *gates, initial_state)
  widened = jnp.concatenate([v, jnp.zeros(v.shape[:3] + (dk,), v.dtype)], axis=-1)
  sb = segments * b
  identity = jnp.concatenate([jnp.zeros((sb, h, dk, dv), dtype),
                              jnp.broadcast_to(jnp.eye(dk, dtype=dtype), (sb, h, dk, dk))], axis=-1)
  # With documents, the [0 | I] block evolves only through the segment's first document: the
  # op's transition and q maps vanish past a document start (masked below where one starts at
  # the segment's first token).
  o_wide, s_wide = op(split(q), split(k), split(widened), *map(split, gates), scale=scale,
                      initial_state=_vary_like(identity, q, k, v, gates), output_final_state=True,
                      chunk_size=chunk_size,
                      segment_ids=None if documents is None else documents[0], impl=impl)
  o_local, q_maps = o_wide[..., :dv].astype(dtype), o_wide[..., dv:].astype(dtype)
  transition = s_wide[..., dv:]
  if documents is not None:
    _, first, open_ = documents
    q_maps = q_maps * first[..., None, None]
    transition = transition * open_[..., None, None]

  def apply(summary, state):
    transition, from_zero = summary
    return _einsum("bhij,bhjv->bhiv", transition, state) + from_zero

  summaries = (_per_segment(transition, segments), _per_segment(s_wide[..., :dv], segments))
  initial = (jnp.zeros((b, h, dk, dv), dtype) if initial_state is None
             else jnp.asarray(initial_state, dtype))
  entering, final = entering_states(summaries, initial, apply, axis_name=axis_name, layout=layout)
  o = o_local + _einsum("bthk,bhkv->bthv", q_maps, _per_batch(entering))
  return merge_segments(o, segments).astype(q.dtype), (final if output_final_state else None)


def delta_rule_shard(q, k, v, beta, *, axis_name: str, layout: str = "contiguous", scale=None,
                     initial_state=None, output_final_state=False, chunk_size=64,
                     segment_ids=None, impl="auto"):
  """Per-device `delta_rule` inside `shard_map`; beta [B,Tl,H or Hk]. As `simple_gla_shard`."""
  return _delta_shard(delta_rule, q, k, v, beta, axis_name=axis_name, layout=layout, scale=scale,
                      initial_state=initial_state, output_final_state=output_final_state,
                      chunk_size=chunk_size, impl=impl, segment_ids=segment_ids)


def gated_delta_rule_shard(q, k, v, g, beta, *, axis_name: str, layout: str = "contiguous",
                           scale=None, initial_state=None, output_final_state=False, chunk_size=64,
                           segment_ids=None, impl="auto"):
  """Per-device `gated_delta_rule` inside `shard_map`; g, beta [B,Tl,H or Hk]."""
  return _delta_shard(gated_delta_rule, q, k, v, g, beta, axis_name=axis_name, layout=layout,
                      scale=scale, initial_state=initial_state,
                      output_final_state=output_final_state, chunk_size=chunk_size, impl=impl,
                      segment_ids=segment_ids)


def kda_shard(q, k, v, gk, beta, *, axis_name: str, layout: str = "contiguous", scale=None,
              initial_state=None, output_final_state=False, chunk_size=64, segment_ids=None,
              impl="auto"):
  """Per-device `kda` inside `shard_map`; gk [B,Tl,H or Hk,Dk], beta [B,Tl,H or Hk]."""
  return _delta_shard(kda, q, k, v, gk, beta, axis_name=axis_name, layout=layout, scale=scale,
                      initial_state=initial_state, output_final_state=output_final_state,
                      chunk_size=chunk_size, impl=impl, segment_ids=segment_ids)


# ------------------------------------------------------------------------------------------------
# mLSTM: stabilised summaries, then a re-run from the entering state.


def mlstm_shard(q, k, v, i, f, *, axis_name: str, layout: str = "contiguous", scale=None,
                initial_state=None, output_final_state=False, chunk_size=64, eps=1e-6,
                segment_ids=None, impl="auto"):
  """Per-device `mlstm` inside `shard_map`; i, f [B,Tl,H or Hk] gate pre-activations;
  initial_state (C [B,H,Dk,Dv], n [B,H,Dk], m [B,H]) or None (zeros, m = 0); segment_ids
  [B,Tl] or None.

  Returns (h [B,Tl,H,Dv], final state (C, n, m) (identical on every device) or None).
  """
  b, t, h, _, dk, dv = check_qkv(q, k, v)
  segments = check_layout(layout)
  _check_local(t, segments, axis_name)
  split = functools.partial(split_segments, segments=segments)
  documents = segment_documents(segment_ids, segments, axis_name=axis_name, layout=layout)
  dtype = compute_dtype(q, k, v, i, f)
  k_h, v_h, log_i, f_h = (repeat_heads(jnp.asarray(split(x), dtype), h) for x in (k, v, i, f))
  cum = jnp.cumsum(jax.nn.log_sigmoid(f_h), axis=1)        # [S*B, Ts, H]
  total = cum[:, -1]
  weight = log_i + total[:, None] - cum                    # log weight of token j in the end state
  if documents is None:
    log_f, keep = total, None
  else:
    # The end state is the last document's, from the empty state (m = 0) at its start: only its
    # tokens weigh, and the state carried to the end decays over that document alone.
    ids, _, keep = documents
    doc = jnp.cumsum(document_starts(ids), axis=1)
    last = doc == doc[:, -1:]                              # [S*B, Ts]: the last document
    weight = jnp.where(last[..., None], weight, -jnp.inf)
    start = jnp.argmax(last, axis=1)[:, None, None]        # its first token
    before = cum - jax.nn.log_sigmoid(f_h)                 # log-decay before each token
    log_f = total - jnp.take_along_axis(before, start, axis=1)[:, 0]
  m_zero = jnp.max(weight, axis=1)
  w = jnp.exp(weight - m_zero[:, None])
  c_zero = _einsum("bth,bthk,bthv->bhkv", w, k_h, v_h)
  n_zero = _einsum("bth,bthk->bhk", w, k_h)

  def apply(summary, state):
    log_f, keep, c_b, n_b, m_b = summary
    c, n, m = (state if keep is None else  # the empty state where a document starts
               tuple(jnp.where(keep.reshape(keep.shape + (1,) * (x.ndim - 1)) > 0, x, 0)
                     for x in state))
    m_new = jnp.maximum(log_f + m, m_b)
    carry, fresh = jnp.exp(log_f + m - m_new), jnp.exp(m_b - m_new)
    return (carry[..., None, None] * c + fresh[..., None, None] * c_b,
            carry[..., None] * n + fresh[..., None] * n_b, m_new)

  per_segment = lambda x: None if x is None else _per_segment(x, segments)
  summaries = tuple(map(per_segment, (log_f, None if keep is None else keep[:, 0], c_zero,
                                      n_zero, m_zero)))
  if initial_state is None:
    initial = (jnp.zeros((b, h, dk, dv), dtype), jnp.zeros((b, h, dk), dtype),
               jnp.zeros((b, h), dtype))
  else:
    initial = tuple(jnp.asarray(x, dtype) for x in initial_state)
  entering, final = entering_states(summaries, initial, apply, axis_name=axis_name, layout=layout)
  entering = tuple(map(_per_batch, entering))
  if documents is not None:  # a document starting at the segment's first token starts empty
    fresh = ~documents[1][:, 0]
    entering = tuple(jnp.where(fresh.reshape((-1,) + (1,) * (x.ndim - 1)), 0, x)
                     for x in entering)
  o, _ = mlstm(split(q), split(k), split(v), split(i), split(f), scale=scale,
               initial_state=entering, chunk_size=chunk_size, eps=eps,
               segment_ids=None if documents is None else documents[0], impl=impl)
  return merge_segments(o, segments), (final if output_final_state else None)


# ------------------------------------------------------------------------------------------------
# Global entry point.

SHARD_OPS = {
    "simple_gla": simple_gla_shard,
    "gla": gla_shard,
    "delta_rule": delta_rule_shard,
    "gated_delta_rule": gated_delta_rule_shard,
    "kda": kda_shard,
    "mlstm": mlstm_shard,
}

# Positions (after q, k, v) of the log-decay inputs that must be <= 0.
_LOG_DECAYS = {"simple_gla": (0,), "gla": (0,), "gated_delta_rule": (0,), "kda": (0,)}


def sequence_parallel_linear(op: str, q, k, v, *gates, mesh, axis_name: str = "sequence",
                             batch_axes=None, layout: str = "contiguous", initial_state=None,
                             output_final_state: bool = False, segment_ids=None, **options):
  """Runs linear op `op` on global arrays whose sequence axis is sharded over `axis_name`.

  Args:
    op: one of `SHARD_OPS` ("simple_gla", "gla", "delta_rule", "gated_delta_rule", "kda",
      "mlstm").
    q, k, v, *gates: the op's sequence inputs, [B, T, ...] in layout order (see
      `jaxchunk.parallel.mesh`), e.g. (q, k, v, g, beta) for gated_delta_rule.
    mesh: a mesh with the axis `axis_name` (and `batch_axes`, if given).
    axis_name: the sequence mesh axis; T must split into its devices' segments.
    batch_axes: mesh axes (a name or tuple) sharding the batch axis, or None.
    layout: "contiguous" or "zigzag".
    initial_state: the op's initial state (replicated over the sequence axis), or None.
    output_final_state: whether to return the final state.
    segment_ids: None or int [B, T] in layout order, packed documents as the single-device op
      takes them (a change of id between neighbours in the natural order starts a document).
    **options: the op's other keyword options (scale, chunk_size, impl, eps for mlstm).

  Returns:
    (o [B, T, H, Dv] in layout order, final state or None), equal to the single-device op.
  """
  if op not in SHARD_OPS:
    raise ValueError(f"op must be one of {tuple(SHARD_OPS)}, got {op!r}")
  check_divisible(q.shape[1], mesh.shape[axis_name], layout, name="q sequence")
  for index in _LOG_DECAYS.get(op, ()):
    check_nonpositive(gates[index], "log-decay gate")
  check_segment_ids(segment_ids, q.shape[0], q.shape[1])
  seq = P(batch_axes, axis_name)
  shard = functools.partial(SHARD_OPS[op], axis_name=axis_name, layout=layout,
                            output_final_state=True, **options)
  inputs = (q, k, v) + gates
  if segment_ids is not None:  # passed last, by keyword
    inputs += (jnp.asarray(segment_ids, jnp.int32),)
    shard = lambda *xs, shard=shard, **kw: shard(*xs[:-1], segment_ids=xs[-1], **kw)
  if initial_state is None:
    run = lambda *xs: shard(*xs)
    args, in_specs = inputs, (seq,) * len(inputs)
  else:
    run = lambda state, *xs: shard(*xs, initial_state=state)
    args, in_specs = (initial_state,) + inputs, (P(batch_axes),) + (seq,) * len(inputs)
  o, final = jax.shard_map(run, mesh=mesh, in_specs=in_specs,
                           out_specs=(seq, P(batch_axes)))(*args)
  return o, (final if output_final_state else None)
