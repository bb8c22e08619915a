"""Token streams: several batches of different shapes through one forward (mixed serving steps).

A mixed serving step runs the decodes of many slots ([S, 1] tokens) and a prefill piece of one
slot ([1, L] tokens). Run as two forwards, the step reads every weight twice and launches every
kernel twice; run as streams, everything a block does token by token (norms, projections, the
MLP, rotary positions, gates) runs once on all S + L tokens, laid out as one row [1, N, ...]
(N = S + L), and only a token mixer's work along the sequence (attention over its cache, the
recurrence, short convolutions) runs per stream, on the stream's own [b, t] shape and cache.

`streams` is a static tuple of (batch, length) pairs, ((S, 1), (1, L)) for a mixed step; the row
holds the streams one after another, each row-major (stream i's token (r, j) at offset
sum_{i' < i} b_i' * t_i' + r * t_i + j). `split` cuts the row into the streams, `join` puts them
back; `map_streams` runs a mixer's sequence work per stream. A mixer called with `streams` takes
a tuple of per-stream caches and returns one.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

Streams = tuple[tuple[int, int], ...]


def num_tokens(streams: Streams) -> int:
  """N, the tokens of all streams."""
  return sum(b * t for b, t in streams)


def check_streams(streams: Streams, x: jax.Array, cache) -> None:
  """Validates a mixer's streams call: x [1, N, ...] and a tuple of one cache per stream."""
  if not streams or any(not (isinstance(b, int) and isinstance(t, int) and b > 0 and t > 0)
                        for b, t in streams):
    raise ValueError(f"streams must be (batch, length) pairs of positive ints, got {streams!r}")
  if x.shape[:2] != (1, num_tokens(streams)):
    raise ValueError(f"with streams {streams} x must have shape [1, {num_tokens(streams)}, ...], "
                     f"got {x.shape}")
  if type(cache) is not tuple or len(cache) != len(streams):  # (a RATState is a NamedTuple)
    raise ValueError(f"with streams {streams} the cache must be a tuple of {len(streams)} "
                     f"per-stream caches, got {type(cache).__name__}")


def split(x: jax.Array, streams: Streams) -> list[jax.Array]:
  """x [1, N, ...] -> [x_i [b_i, t_i, ...] for each stream]."""
  offsets = [0]
  for b, t in streams:
    offsets.append(offsets[-1] + b * t)
  return [x[0, lo:hi].reshape((b, t) + x.shape[2:])
          for (b, t), lo, hi in zip(streams, offsets, offsets[1:])]


def join(parts: list[jax.Array]) -> jax.Array:
  """[x_i [b_i, t_i, ...]] -> x [1, N, ...] (the inverse of `split`)."""
  flat = [p.reshape((math.prod(p.shape[:2]),) + p.shape[2:]) for p in parts]
  return jnp.concatenate(flat, axis=0)[None]


def map_streams(fn: Callable, streams: Streams, caches: tuple, *arrays: jax.Array):
  """fn(*stream_arrays, cache) -> (out [b_i, t_i, ...], new cache) on each stream's part of
  `arrays` (each [1, N, ...]) and its cache; returns (the outs joined [1, N, ...], the tuple of
  new caches)."""
  parts = [fn(*stream_arrays, cache)
           for *stream_arrays, cache in zip(*(split(a, streams) for a in arrays), caches)]
  return join([out for out, _ in parts]), tuple(cache for _, cache in parts)
