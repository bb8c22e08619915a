"""Per-layer choice of the attention strategy and the bundle the trainer passes to its layers."""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from jaxchunk.parallel.halo import sequence_parallel_halo
from jaxchunk.parallel.linear_scan import sequence_parallel_linear
from jaxchunk.parallel.mesh import check_layout, layout_permutation
from jaxchunk.parallel.rat import sequence_parallel_rat
from jaxchunk.parallel.ring import ring_attention
from jaxchunk.parallel.ulysses import ulysses_attention

STRATEGIES = ("auto", "ring", "ulysses")


def choose_strategy(strategy: str, *, heads: int, num_devices: int, window) -> str:
  """"ring" or "ulysses" for one attention layer.

  "auto" picks Ulysses (4 all-to-alls, whatever n) when the heads divide over the axis and the
  layer is global, and ring attention for sliding windows (only the neighbouring blocks travel)
  or head counts Ulysses cannot split.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  if strategy == "auto":
    return "ulysses" if heads % num_devices == 0 and window is None else "ring"
  if strategy == "ulysses" and heads % num_devices:
    raise ValueError(f"strategy='ulysses' needs the query heads ({heads}) divisible by the "
                     f"sequence axis size ({num_devices})")
  return strategy


def sequence_parallel_attention(q, k, v, *, mesh, axis_name: str = "sequence", batch_axes=None,
                                layout: str = "zigzag", strategy: str = "auto",
                                segment_ids=None, causal: bool = True, window=None, scale=None):
  """Attention on global arrays [B, T, ...] in layout order, sharded over `axis_name`.

  Same masks and result as `jaxchunk.ops.attention` on the natural-order sequence; `strategy`
  picks ring attention or Ulysses (see `choose_strategy`).
  """
  chosen = choose_strategy(strategy, heads=q.shape[2], num_devices=mesh.shape[axis_name],
                           window=window)
  run = ring_attention if chosen == "ring" else ulysses_attention
  return run(q, k, v, mesh=mesh, axis_name=axis_name, batch_axes=batch_axes, layout=layout,
             segment_ids=segment_ids, causal=causal, window=window, scale=scale)


class SequenceParallel(NamedTuple):
  """What a model needs to run its token mixers sequence-parallel on `mesh`.

  Attributes:
    mesh: the training mesh; `axis_name` is its sequence axis, `batch_axes` its batch axes.
    layout: token layout of every row ("zigzag" or "contiguous"), shared by all layers.
    strategy: attention strategy ("auto", "ring" or "ulysses").
  """
  mesh: jax.sharding.Mesh
  axis_name: str = "sequence"
  batch_axes: tuple | str | None = None
  layout: str = "zigzag"
  strategy: str = "auto"

  @property
  def num_devices(self) -> int:
    return self.mesh.shape[self.axis_name]

  @property
  def active(self) -> bool:
    return self.num_devices > 1

  @property
  def num_segments(self) -> int:
    """Contiguous segments of every row: num_devices (contiguous) or 2 * num_devices (zigzag)."""
    return self.num_devices * check_layout(self.layout)

  def attention(self, q, k, v, **options):
    """`sequence_parallel_attention` on this mesh (options: segment_ids, causal, window, scale)."""
    return sequence_parallel_attention(q, k, v, mesh=self.mesh, axis_name=self.axis_name,
                                       batch_axes=self.batch_axes, layout=self.layout,
                                       strategy=self.strategy, **options)

  def linear(self, op: str, q, k, v, *gates, **options):
    """`sequence_parallel_linear(op, ...)` on this mesh; returns (o, final state or None)."""
    return sequence_parallel_linear(op, q, k, v, *gates, mesh=self.mesh,
                                    axis_name=self.axis_name, batch_axes=self.batch_axes,
                                    layout=self.layout, **options)

  def rat(self, q, k, v, f, **options):
    """`sequence_parallel_rat` on this mesh."""
    return sequence_parallel_rat(q, k, v, f, mesh=self.mesh, axis_name=self.axis_name,
                                 batch_axes=self.batch_axes, layout=self.layout, **options)

  def halo(self, x, width: int):
    """`sequence_parallel_halo` on this mesh: [B, num_segments, width, ...], the `width` tokens
    before each segment of x [B, T, ...] in the natural order (zeros before the first)."""
    return sequence_parallel_halo(x, width, mesh=self.mesh, axis_name=self.axis_name,
                                  batch_axes=self.batch_axes, layout=self.layout)

  def layout_batch(self, batch: dict) -> dict:
    """Host side: puts every [B, T] array of `batch` in layout order, adding "positions".

    Each row is permuted on its own (no device ever holds a whole row once the batch is sharded
    P(batch_axes, axis_name)). A batch without "positions" gets the natural token positions in
    layout order, int32 [B, T], for rotary embeddings; given positions (e.g. restarting at every
    packed document) are permuted like the other arrays. The loss is a sum over tokens, so inputs
    and targets permuted alike give the same loss.
    """
    rows, seq_len = next(iter(batch.values())).shape[:2]
    perm = layout_permutation(seq_len, self.num_devices, self.layout)
    natural = {"positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (rows, seq_len))}
    return {name: np.asarray(x)[:, perm] for name, x in {**natural, **batch}.items()}


def active_sequence_parallel(sequence_parallel: SequenceParallel | None, cache,
                             what: str) -> SequenceParallel | None:
  """The `SequenceParallel` a layer should run with: None unless given and active (sequence axis
  > 1). Raises a ValueError naming `what` when an active one comes with a cache: sequence
  parallelism runs training and evaluation forwards, whose rows are in layout order."""
  if sequence_parallel is None or not sequence_parallel.active:
    return None
  if cache is not None:
    raise ValueError(f"{what}: sequence_parallel (a sequence axis of {sequence_parallel.num_devices}"
                     " devices) cannot be combined with a cache")
  return sequence_parallel
