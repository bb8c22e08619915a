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
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxchunk.ops._common import check_qkv, check_shape, compute_dtype
from jaxchunk.ops.rat import RATState, rat
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


def rat_shard(q, k, v, f, *, axis_name: str, layout: str = "contiguous", chunk_size: int = 16,
              scale=None, block_size: int = 128, impl: str = "auto"):
  """Per-device RAT inside `shard_map` over the sequence axis `axis_name`.

  Args:
    q: local queries [B, Tl, H, D]; k, v, f: [B, Tl, Hk, D] (f in (0, 1)).
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
                          layout: str = "contiguous", **options):
  """RAT on global arrays [B, T, ...] in layout order, sharded over `axis_name`.

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
  seq = P(batch_axes, axis_name)
  shard = functools.partial(rat_shard, axis_name=axis_name, layout=layout, **options)
  forward = jax.shard_map(shard, mesh=mesh, in_specs=(seq,) * 4, out_specs=seq, check_vma=False)

  def per_device_vjp(q, k, v, f, do):
    return jax.vjp(shard, q, k, v, f)[1](do)

  backward = jax.shard_map(per_device_vjp, mesh=mesh, in_specs=(seq,) * 5, out_specs=(seq,) * 4,
                           check_vma=False)

  @jax.custom_vjp
  def run(q, k, v, f):
    return forward(q, k, v, f)

  run.defvjp(lambda *xs: (forward(*xs), xs), lambda xs, do: backward(*xs, do))
  return run(q, k, v, f)
