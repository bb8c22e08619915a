"""Ulysses attention: all-to-all from sequence sharding to head sharding and back.

Each device holds a block of the sequence with all heads. One `lax.all_to_all` per input gives
every device the whole sequence for H / n query heads (and Hk / n kv heads); it runs the
single-device attention op (`jaxchunk.ops.attention`, any mask) on them and a last all-to-all
returns the outputs to sequence sharding. Communication is 4 all-to-alls of the local activations,
independent of the number of ring steps; it needs H divisible by the axis size n. When Hk is not
divisible by n the kv heads are first repeated to H (more traffic, same result).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxchunk.ops._common import check_qkv, check_shape, repeat_heads
from jaxchunk.ops.attention import attention
from jaxchunk.parallel.mesh import check_divisible, check_layout, layout_permutation


def ulysses_attention_shard(q, k, v, *, axis_name: str, layout: str = "zigzag",
                            causal: bool = True, segment_ids=None, window: int | None = None,
                            scale: float | None = None, block_q: int = 128, block_k: int = 128,
                            impl: str = "auto"):
  """Per-device Ulysses attention inside `shard_map` over the sequence axis `axis_name`.

  Args:
    q: local queries [B, Tl, H, D], H divisible by the axis size.
    k, v: local keys / values [B, Tl, Hk, D / Dv].
    axis_name: the sequence mesh axis.
    layout: the token layout of the local blocks ("zigzag" or "contiguous").
    causal, segment_ids (local [B, Tl]), window, scale, block_q, block_k, impl: as
      `jaxchunk.ops.attention` on the whole sequence.

  Returns:
    o [B, Tl, H, Dv] in q's dtype.
  """
  b, t, h, hk, _, _ = check_qkv(q, k, v)
  check_layout(layout)
  n = lax.axis_size(axis_name)
  if h % n:
    raise ValueError(f"Ulysses attention needs the query heads ({h}) divisible by the size of "
                     f"axis {axis_name!r} ({n}); use ring attention instead")
  if segment_ids is not None:
    check_shape(segment_ids, (b, t), "segment_ids", "[batch, seq]")
  if hk % n:
    k, v = repeat_heads(k, h), repeat_heads(v, h)
  perm = layout_permutation(n * t, n, layout)
  natural = np.argsort(perm)

  def to_heads(x):  # [B, Tl, heads, D] -> [B, T, heads / n, D] in natural order
    return jnp.take(lax.all_to_all(x, axis_name, 2, 1, tiled=True), natural, axis=1)

  if segment_ids is not None:
    segment_ids = jnp.take(lax.all_gather(segment_ids, axis_name, axis=1, tiled=True), natural,
                           axis=1)
  o = attention(to_heads(q), to_heads(k), to_heads(v), causal=causal, segment_ids=segment_ids,
                window=window, scale=scale, block_q=block_q, block_k=block_k, impl=impl)
  return lax.all_to_all(jnp.take(o, perm, axis=1), axis_name, 1, 2, tiled=True)


def ulysses_attention(q, k, v, *, mesh, axis_name: str = "sequence", batch_axes=None,
                      layout: str = "zigzag", segment_ids=None, **options):
  """Ulysses attention on global arrays [B, T, ...] in layout order, sharded over `axis_name`.

  `options` are those of `ulysses_attention_shard`. Runs with `check_vma=False` (the attention
  kernels start from device-invariant accumulators). Returns o [B, T, H, Dv] in layout order.
  """
  check_divisible(q.shape[1], mesh.shape[axis_name], layout, name="q sequence")
  seq = P(batch_axes, axis_name)
  shard = functools.partial(ulysses_attention_shard, axis_name=axis_name, layout=layout,
                            **options)
  if segment_ids is None:
    return jax.shard_map(shard, mesh=mesh, in_specs=(seq,) * 3, out_specs=seq,
                         check_vma=False)(q, k, v)
  run = lambda q, k, v, ids: shard(q, k, v, segment_ids=ids)
  return jax.shard_map(run, mesh=mesh, in_specs=(seq,) * 4, out_specs=seq,
                       check_vma=False)(q, k, v, segment_ids)
