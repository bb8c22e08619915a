"""Sequence-parallel RAT: chunk summaries are shared, the in-chunk work stays local.

RAT (`jaxchunk.ops.rat`) lets every query attend to the summaries of all earlier chunks plus its own
running aggregate. The summaries are T / C rows per head, so each device (inside `jax.shard_map`)

1. computes the summaries of its own chunks (one gated reduction per chunk),
2. all-gathers them (a [B, T / C, Hk, D] buffer in sequence order on every device), and
3. runs the single-device op on each of its segments from a `RATState` that holds that buffer and
   the segment's start position: the op's own visibility rule (summary index < query chunk) hides
   the summaries of the segment's and of later chunks, so the result is the single-device one.

Segments must be whole chunks (segment length a multiple of `chunk_size`). Gradients reach the
other devices' keys, values and gates through the all-gather.

Packed documents (`segment_ids`, in layout order): every document is chunked from its own start,
as `rat`'s segment_ids do on one device. Each device first learns where the document entering each
of its segments started (an all-gathered fold of per-segment start counts and last starts, and a
one-token halo of the ids for a start at a segment's first token), so every token knows its
document and its position in it. The summaries (aggregates at tokens that end a document's chunk)
are computed per segment, with the aggregate entering the segment from a one-token halo (a chunk
of at most C tokens that straddles two segments starts strictly inside the first, whose own scan is
exact there), gathered with their document and chunk indices, and each segment runs the op per row
from the state of its entering document: that document's summaries, the entering aggregate and the
position in the document.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxchunk.ops._common import (check_qkv, check_segment_ids, check_shape, compute_dtype,
                                  document_starts)
from jaxchunk.ops.rat import RATState, document_aggregates, rat, scatter_slots
from jaxchunk.parallel.halo import halo_shard
from jaxchunk.parallel.linear_scan import entering_states, segment_documents, split_segments
from jaxchunk.parallel.mesh import (check_divisible, check_layout, local_segments,
                                    segment_table)


def _chunk_summaries(k, v, f, chunk_size: int):
  """The aggregates at the last token of every chunk: k, v, f [B, T, Hk, D] -> 2 x [B, T/C, Hk, D].

  The aggregate x~_t = f_t x~_{t-1} + (1 - f_t) x_t restarts at every chunk: a scan over the C
  token positions, all chunks at once.
  """
  b, t, hk, d = k.shape
  by_position = lambda x: jnp.moveaxis(x.reshape(b, t // chunk_size, chunk_size, hk, d), 2, 0)

  def step(carry, token):
    k_agg, v_agg = carry
    k_t, v_t, f_t = token
    return (f_t * k_agg + (1 - f_t) * k_t, f_t * v_agg + (1 - f_t) * v_t), None

  zeros = jnp.zeros((b, t // chunk_size, hk, d), k.dtype)
  (k_sum, v_sum), _ = lax.scan(step, (zeros, zeros), tuple(map(by_position, (k, v, f))))
  return k_sum, v_sum


def _document_positions(segment_ids, segments: int, *, axis_name: str, layout: str):
  """Inside `shard_map`: each token's document and position in it, over the whole sequence.

  segment_ids [B, Tl] (layout order). Returns (doc, pos), int32 [S*B, Ts] split like
  `split_segments`: doc numbers the documents of the row from 0 in sequence order, pos counts
  from 0 at each document's first token (the row's first token starts document 0).
  """
  b, t = segment_ids.shape
  ts = t // segments
  ids, first_document, _ = segment_documents(segment_ids, segments, axis_name=axis_name,
                                             layout=layout)
  # Document starts, one at a segment's first token where the document there is new.
  starts = document_starts(ids).at[:, 0].set(~first_document[:, 0])
  segment = jnp.repeat(local_segments(axis_name, layout), b)        # [S*B] global segment index
  index = segment[:, None] * ts + jnp.arange(ts, dtype=jnp.int32)   # global token index
  latest = lax.cummax(jnp.where(starts, index, -1), axis=1)         # the latest start so far

  def apply(summary, state):  # (start of the current document, documents before) after a segment
    last, count = summary
    start, before = state
    return jnp.where(last >= 0, last, start), before + count

  per_segment = lambda x: x.reshape(segments, b)
  summaries = (per_segment(latest[:, -1]), per_segment(jnp.sum(starts, axis=1, dtype=jnp.int32)))
  initial = (jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32))
  (start, count), _ = entering_states(summaries, initial, apply, axis_name=axis_name,
                                      layout=layout)
  start = jnp.maximum(start.reshape(-1)[:, None], latest)
  doc = count.reshape(-1)[:, None] + jnp.cumsum(starts, axis=1, dtype=jnp.int32)
  return doc, index - start


def _rat_documents_shard(q, k, v, f, segment_ids, *, axis_name: str, layout: str,
                         chunk_size: int, scale, block_size: int, impl: str):
  """`rat_shard` over packed documents (see the module docstring). Returns o [B, Tl, H, D]."""
  b, t, _, hk, d, _ = check_qkv(q, k, v)
  segments = check_layout(layout)
  c = chunk_size
  ts = t // segments
  n = lax.axis_size(axis_name)
  split = functools.partial(split_segments, segments=segments)
  doc, pos = _document_positions(segment_ids, segments, axis_name=axis_name, layout=layout)
  dtype = compute_dtype(q, k, v, f)

  # Aggregates of each segment, the one entering it from the segment before (zeros before the
  # first, where the row's first token restarts anyway).
  restart = (pos % c == 0)[..., None, None]
  k32, v32, f32 = (jnp.asarray(split(x), dtype) for x in (k, v, f))
  gate = jnp.where(restart, 0, f32)

  def predecessor(x_end):  # [S*B, Hk, D] -> the end aggregate of each segment's predecessor
    by_segment = jnp.swapaxes(x_end.reshape(segments, b, hk, d), 0, 1)
    return jnp.swapaxes(halo_shard(by_segment, 1, axis_name=axis_name, layout=layout)[:, :, 0],
                        0, 1).reshape(segments * b, hk, d)

  entering = lambda k_end, v_end: (predecessor(k_end), predecessor(v_end))

  k_agg, v_agg, k_in, v_in = document_aggregates(gate, (1 - f32) * k32, (1 - f32) * v32,
                                                 entering, chunk_size=c)

  # Every segment's summaries, gathered in sequence order with their document and chunk.
  m = ts // c + 1  # summaries a segment can hold
  ends = (pos + 1) % c == 0
  slot = jnp.where(ends, jnp.cumsum(ends, axis=1) - 1, m)
  gather_local = functools.partial(scatter_slots, slot=slot, size=m)
  order = np.argsort(segment_table(n, layout).reshape(-1))

  def gather(x):  # [S*B, m, ...] -> [B, n*S*m, ...] in sequence order
    x = lax.all_gather(x.reshape((segments, b, m) + x.shape[2:]), axis_name, tiled=True)[order]
    return jnp.swapaxes(x, 0, 1).reshape((b, n * segments * m) + x.shape[3:])

  k_all, v_all = gather(gather_local(k_agg, fill=0)), gather(gather_local(v_agg, fill=0))
  chunk_all = gather(gather_local(pos // c, fill=-1))
  doc_all = gather(gather_local(doc, fill=-1))

  # Each segment continues its entering document: that document's summaries in slots = their
  # chunk (later ones are ignored by the op: they sit at or past the entering position's chunk).
  capacity = n * segments * ts // c
  outs = []
  for s in range(segments):
    piece = lambda x: lax.slice_in_dim(x, s * ts, (s + 1) * ts, axis=1)
    at = lambda x: x[s * b:(s + 1) * b]
    mine = doc_all == at(doc)[:, :1]
    put = functools.partial(scatter_slots, slot=jnp.where(mine, chunk_all, capacity),
                            size=capacity, fill=0)
    state = RATState(put(k_all), put(v_all), at(k_in), at(v_in), at(pos)[:, 0])

    def one_row(q, k, v, f, ids, state):
      o, _ = rat(q[None], k[None], v[None], f[None], chunk_size=c, scale=scale,
                 initial_state=jax.tree.map(lambda x: x[None] if x.ndim else x, state),
                 max_chunks=capacity, segment_ids=ids[None], block_size=block_size, impl=impl)
      return o[0]

    outs.append(jax.vmap(one_row)(piece(q), piece(k), piece(v), piece(f), piece(segment_ids),
                                  state))
  return jnp.concatenate(outs, axis=1)


def rat_shard(q, k, v, f, segment_ids=None, *, axis_name: str, layout: str = "contiguous",
              chunk_size: int = 16, scale=None, block_size: int = 128, impl: str = "auto"):
  """Per-device RAT inside `shard_map` over the sequence axis `axis_name`.

  Args:
    q: local queries [B, Tl, H, D]; k, v, f: [B, Tl, Hk, D] (f in (0, 1)).
    segment_ids: None or the local block [B, Tl] of int ids (packed documents, see the module
      docstring).
    axis_name: the sequence mesh axis.
    layout: "contiguous" or "zigzag"; each segment must be a multiple of `chunk_size` tokens.
    chunk_size, scale, block_size, impl: as `jaxchunk.ops.rat.rat`.

  Returns:
    o [B, Tl, H, D] in q's dtype.
  """
  b, t, _, hk, d, _ = check_qkv(q, k, v)
  check_shape(f, (b, t, hk, d), "f", "[batch, seq, kv_heads, head_dim]")
  segments = check_layout(layout)
  if t % (segments * chunk_size):
    raise ValueError(f"the local sequence length {t} must be a multiple of {segments} segments "
                     f"of whole chunks of {chunk_size} tokens")
  if segment_ids is not None:
    return _rat_documents_shard(q, k, v, f, segment_ids, axis_name=axis_name, layout=layout,
                                chunk_size=chunk_size, scale=scale, block_size=block_size,
                                impl=impl)
  seg_len = t // segments
  n = lax.axis_size(axis_name)
  dtype = compute_dtype(q, k, v, f)
  k32, v32, f32 = (jnp.asarray(x, dtype) for x in (k, v, f))
  k_sum, v_sum = _chunk_summaries(k32, v32, f32, chunk_size)   # [B, Tl / C, Hk, D]
  per_seg = seg_len // chunk_size
  order = np.argsort(segment_table(n, layout).reshape(-1))

  def gather(x):  # -> [B, T / C, Hk, D] in sequence order
    x = x.reshape(b, segments, per_seg, hk, d)
    x = lax.all_gather(x, axis_name, axis=1, tiled=True)[:, order]
    return x.reshape(b, -1, hk, d)

  k_all, v_all = gather(k_sum), gather(v_sum)
  run = jnp.zeros((b, hk, d), dtype)
  starts = local_segments(axis_name, layout) * seg_len
  outs = []
  for s in range(segments):
    piece = lambda x: lax.slice_in_dim(x, s * seg_len, (s + 1) * seg_len, axis=1)
    state = RATState(k_all, v_all, run, run, starts[s])
    o, _ = rat(piece(q), piece(k), piece(v), piece(f), chunk_size=chunk_size, scale=scale,
               initial_state=state, max_chunks=k_all.shape[1], block_size=block_size, impl=impl)
    outs.append(o)
  return jnp.concatenate(outs, axis=1)


def sequence_parallel_rat(q, k, v, f, *, mesh, axis_name: str = "sequence", batch_axes=None,
                          layout: str = "contiguous", segment_ids=None, **options):
  """RAT on global arrays [B, T, ...] in layout order, sharded over `axis_name`.

  `segment_ids` (None or int [B, T] in layout order) are packed documents, as `rat` takes them;
  `options` are those of `rat_shard` (chunk_size, scale, block_size, impl). Runs with
  `check_vma=False` (the op's scans start from device-invariant carries). The backward pass is a
  second `shard_map` that recomputes the forward and differentiates it per device (`jax.vjp`
  inside the manual region): XLA:CPU (jax 0.11.2) crashes compiling the transpose of a `shard_map`
  around the op's `associative_scan`, and this form also keeps no forward residuals alive.
  Returns o [B, T, H, D] in layout order.
  """
  chunk_size = options.get("chunk_size", 16)
  check_divisible(q.shape[1], mesh.shape[axis_name], layout, multiple=chunk_size,
                  name="q sequence")
  check_segment_ids(segment_ids, q.shape[0], q.shape[1])
  seq = P(batch_axes, axis_name)
  shard = functools.partial(rat_shard, axis_name=axis_name, layout=layout, **options)
  ids = () if segment_ids is None else (jnp.asarray(segment_ids, jnp.int32),)
  forward = jax.shard_map(shard, mesh=mesh, in_specs=(seq,) * (4 + len(ids)), out_specs=seq,
                          check_vma=False)

  def per_device_vjp(q, k, v, f, *ids_and_do):
    *ids, do = ids_and_do
    return jax.vjp(lambda q, k, v, f: shard(q, k, v, f, *ids), q, k, v, f)[1](do)

  backward = jax.shard_map(per_device_vjp, mesh=mesh, in_specs=(seq,) * (5 + len(ids)),
                           out_specs=(seq,) * 4, check_vma=False)

  @jax.custom_vjp
  def run(q, k, v, f, *ids):
    return forward(q, k, v, f, *ids)

  # The segment ids (integers) get no cotangent.
  run.defvjp(lambda *xs: (forward(*xs), xs),
             lambda xs, do: (*backward(*xs, do), *(None for _ in xs[4:])))
  return run(q, k, v, f, *ids)
