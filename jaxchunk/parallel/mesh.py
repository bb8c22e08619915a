"""Sequence meshes and token layouts for sequence parallelism.

A sequence of T tokens is split over the n devices of a mesh axis (the "sequence" axis) in one of
two layouts, both made of equal contiguous *segments* of the sequence:

  "contiguous"  n segments of T / n tokens; device i holds segment i.
  "zigzag"      2n segments of T / (2n) tokens; device i holds segments i and 2n - 1 - i (in that
                order). Under a causal mask every device then has the same amount of work.

A global array "in layout order" is the concatenation of the devices' local blocks in device order,
so sharding its sequence axis over the mesh axis gives every device its block. `to_layout` and
`from_layout` convert between natural and layout order (data loaders apply `layout_permutation` to
each row on the host, so no device ever gathers a whole row).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

LAYOUTS = ("contiguous", "zigzag")


def check_layout(layout: str) -> int:
  """Raises a ValueError for an unknown layout; returns its number of segments per device."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  return 1 if layout == "contiguous" else 2


def sequence_mesh(sequence: int | None = None, *, axis_name: str = "sequence",
                  devices=None) -> jax.sharding.Mesh:
  """A 1-D mesh (axis type Auto) of `sequence` devices (default: all of `devices` / all devices)."""
  devices = jax.devices() if devices is None else list(devices)
  sequence = len(devices) if sequence is None else sequence
  if not 1 <= sequence <= len(devices):
    raise ValueError(f"sequence must be in [1, {len(devices)}] (the devices available), "
                     f"got {sequence}")
  return jax.make_mesh((sequence,), (axis_name,), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=devices[:sequence])


def segment_table(num_devices: int, layout: str) -> np.ndarray:
  """int [n, S]: the global index of each of a device's S segments (S = 1 or 2)."""
  if check_layout(layout) == 1:
    return np.arange(num_devices)[:, None]
  device = np.arange(num_devices)
  return np.stack([device, 2 * num_devices - 1 - device], axis=1)


def check_divisible(seq_len: int, num_devices: int, layout: str, *, multiple: int = 1,
                    name: str = "seq") -> int:
  """Raises unless `seq_len` splits into equal segments of a multiple of `multiple` tokens.

  Returns the segment length.
  """
  segments = num_devices * check_layout(layout)
  if seq_len % (segments * multiple):
    raise ValueError(f"{name} length {seq_len} must be a multiple of {segments * multiple} "
                     f"({segments} {layout} segments of a multiple of {multiple} tokens)")
  return seq_len // segments


def layout_permutation(seq_len: int, num_devices: int, layout: str) -> np.ndarray:
  """int [T]: the natural position of each token in layout order (x_layout = x[..., perm, ...])."""
  seg_len = check_divisible(seq_len, num_devices, layout)
  starts = segment_table(num_devices, layout).reshape(-1) * seg_len
  return (starts[:, None] + np.arange(seg_len)).reshape(-1)


def to_layout(x, num_devices: int, layout: str, *, axis: int = 1):
  """Reorders the sequence axis of `x` from natural to layout order."""
  return jnp.take(x, layout_permutation(x.shape[axis], num_devices, layout), axis=axis)


def from_layout(x, num_devices: int, layout: str, *, axis: int = 1):
  """Reorders the sequence axis of `x` from layout to natural order (inverse of `to_layout`)."""
  perm = layout_permutation(x.shape[axis], num_devices, layout)
  return jnp.take(x, np.argsort(perm), axis=axis)


def local_segments(axis_name: str, layout: str):
  """Inside `shard_map`: int32 [S], the global segment indices of this device's segments."""
  table = jnp.asarray(segment_table(lax.axis_size(axis_name), layout), jnp.int32)
  return table[lax.axis_index(axis_name)]


def local_positions(local_len: int, axis_name: str, layout: str):
  """Inside `shard_map`: int32 [local_len], the global positions of this device's tokens."""
  segments = check_layout(layout)
  seg_len = local_len // segments
  starts = local_segments(axis_name, layout) * seg_len
  return (starts[:, None] + jnp.arange(seg_len, dtype=jnp.int32)).reshape(-1)
