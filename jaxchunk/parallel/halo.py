"""Halos for short causal convolutions: the tokens just before each segment of a sharded sequence.

A causal convolution of width K needs, for the first K - 1 tokens of every segment of the layout
(see `jaxchunk.parallel.mesh`), the last K - 1 tokens of the segment before it in the natural order.
Each device sends the tails of its segments straight to the devices holding the following segments
with `lax.ppermute` (one send per pair of local segment slots: two neighbour exchanges for the
zig-zag layout, one for the contiguous layout); the first segment of the sequence gets zeros, as a
single-device convolution pads. Gradients flow back through the transposed `ppermute`s.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jaxchunk.parallel.mesh import check_divisible, check_layout, segment_table


def halo_sends(num_devices: int, layout: str) -> dict[tuple[int, int], tuple[tuple[int, int], ...]]:
  """The `ppermute`s of a halo exchange.

  Returns {(slot, source slot): ((source device, device), ...)}: the segment before the segment in
  local slot `slot` of `device` is the segment in slot `source slot` of `source device`. The first
  segment of the sequence has no predecessor and appears nowhere.
  """
  table = segment_table(num_devices, layout)
  owner = {int(segment): (device, slot) for device, row in enumerate(table)
           for slot, segment in enumerate(row)}
  sends = {}
  for device, row in enumerate(table):
    for slot, segment in enumerate(row):
      if segment > 0:
        source, source_slot = owner[int(segment) - 1]
        sends.setdefault((slot, source_slot), []).append((source, device))
  return {key: tuple(pairs) for key, pairs in sends.items()}


def _segment_tails(x, width: int, segments: int):
  """x [B, S * L, ...] -> [B, S, width, ...]: the last `width` tokens of each of its S segments."""
  b, t = x.shape[:2]
  seg_len = t // segments
  if not 0 <= width <= seg_len:
    raise ValueError(f"halo width {width} must be in [0, {seg_len}] (the segment length)")
  return x.reshape((b, segments, seg_len) + x.shape[2:])[:, :, seg_len - width:]


def _exchange(tails, *, axis_name: str, layout: str):
  """Inside `shard_map`: local segment tails [B, S, width, ...] -> their successors' halos."""
  halo = [jnp.zeros_like(tails[:, 0]) for _ in range(tails.shape[1])]
  if tails.shape[2]:
    for (slot, source_slot), pairs in halo_sends(lax.axis_size(axis_name), layout).items():
      halo[slot] = halo[slot] + lax.ppermute(tails[:, source_slot], axis_name, pairs)
  return jnp.stack(halo, axis=1)


def halo_shard(x, width: int, *, axis_name: str, layout: str = "zigzag"):
  """Per-device halo inside `shard_map` over the sequence axis `axis_name`.

  Args:
    x: the local block [B, Tl, ...] (this device's segments in layout order).
    width: tokens wanted before each segment (at most the segment length).
    axis_name: the sequence mesh axis.
    layout: "zigzag" or "contiguous".

  Returns:
    [B, S, width, ...]: for each of the S local segments the `width` tokens before it in the
    natural order (zeros before the first token of the sequence).
  """
  segments = check_layout(layout)
  if x.shape[1] % segments:
    raise ValueError(f"the local sequence length {x.shape[1]} must be a multiple of {segments} "
                     f"for layout {layout!r}")
  return _exchange(_segment_tails(x, width, segments), axis_name=axis_name, layout=layout)


def sequence_parallel_halo(x, width: int, *, mesh, axis_name: str = "sequence", batch_axes=None,
                           layout: str = "zigzag"):
  """Halos of a global array x [B, T, ...] in layout order, sharded over `axis_name`.

  Returns [B, n * S, width, ...] (n devices, S segments each), sharded like x: row s holds the
  `width` tokens before the s-th segment of the layout order (see `halo_shard`). Only the segment
  tails enter the `shard_map`.
  """
  n = mesh.shape[axis_name]
  check_divisible(x.shape[1], n, layout, name="x sequence")
  tails = _segment_tails(x, width, n * check_layout(layout))
  seq = P(batch_axes, axis_name)
  exchange = functools.partial(_exchange, axis_name=axis_name, layout=layout)
  return jax.shard_map(exchange, mesh=mesh, in_specs=seq, out_specs=seq)(tails)
