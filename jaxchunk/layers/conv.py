"""Causal depthwise short convolution over time, with a cache for chunked prefill and decode.

Sequence-parallel (a `SequenceParallel` whose sequence axis is > 1, rows in its layout order):
every segment of the layout is convolved after its halo, the conv_size - 1 tokens before it in
the natural order (`jaxchunk.parallel.halo`), so the result equals the convolution of the natural
order.

Parameters (logical axes): `kernel` [conv_size, features] -> ("conv", `channel_axis`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jaxchunk.ops._common import check_segment_ids, document_starts
from jaxchunk.parallel.api import SequenceParallel, active_sequence_parallel


def init_conv_cache(batch: int, conv_size: int, features: int, dtype) -> jax.Array:
  """The empty cache of a `ShortConv`: the last conv_size-1 inputs, zeros [B, conv_size-1, C]."""
  return jnp.zeros((batch, conv_size - 1, features), dtype)


def causal_conv(x: jax.Array, kernel: jax.Array, history: jax.Array, ids: jax.Array | None = None):
  """Depthwise causal convolution along axis -2.

  Args:
    x: [..., T, C] inputs.
    kernel: [K, C] taps, kernel[K - 1] on the current token.
    history: [..., K - 1, C], the inputs before x.
    ids: None, or int [..., K - 1 + T] the segment ids of history ++ x (packed documents: a
      change of id between neighbours starts a document): taps that reach into an earlier
      document read zero.

  Returns:
    (y [..., T, C], padded [..., K - 1 + T, C] = history ++ x).
  """
  t, taps = x.shape[-2], kernel.shape[0]
  padded = jnp.concatenate([history, x], axis=-2)
  tap = lambda j: lax.slice_in_dim(padded, j, j + t, axis=-2)
  if ids is not None:
    doc = jnp.cumsum(document_starts(ids), axis=-1)
    doc_at = lambda j: lax.slice_in_dim(doc, j, j + t, axis=-1)
    read = tap
    tap = lambda j: jnp.where((doc_at(j) == doc_at(taps - 1))[..., None], read(j), 0)
  y = sum(kernel[j] * tap(j) for j in range(taps))
  return y, padded


class ShortConv(nn.Module):
  """y_t = act(sum_j kernel[j] * x_{t-conv_size+1+j}), per channel, causal in time.

  Attributes:
    features: number of channels C.
    conv_size: kernel width (taps over time, the current token included).
    silu: apply SiLU to the output.
    channel_axis: logical axis name of the channel dimension (e.g. "heads" when C = heads*head_dim).
    dtype: compute dtype; param_dtype: parameter dtype.
  """

  features: int
  conv_size: int = 4
  silu: bool = True
  channel_axis: str | None = None
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, *, cache: jax.Array | None = None, segment_ids=None,
               sequence_parallel: SequenceParallel | None = None):
    """x [B,T,C]; cache [B,conv_size-1,C] (the inputs before x; None = zeros).

    Returns (y [B,T,C], new_cache [B,conv_size-1,C]), new_cache being the last conv_size-1 inputs
    of cache ++ x, so the next call continues exactly. `segment_ids` [B,T] (packed documents, as
    the linear ops take them: a change of id between neighbours starts a document; in layout
    order with `sequence_parallel`) keep each token's taps inside its document (the cache
    precedes the row's first document).
    With an active `sequence_parallel` (no cache) x is in its layout order, y too, and new_cache
    is None.
    """
    if x.ndim != 3 or x.shape[2] != self.features:
      raise ValueError(f"x must have shape [batch, seq, {self.features}], got {x.shape}")
    sp = active_sequence_parallel(sequence_parallel, cache, "ShortConv")
    b, t, c = x.shape
    if segment_ids is not None:
      check_segment_ids(segment_ids, b, t)
    if sp is not None:
      if t % sp.num_segments or t // sp.num_segments < self.conv_size - 1:
        raise ValueError(f"ShortConv: sequence-parallel x length {t} must split into "
                         f"{sp.num_segments} equal segments of at least conv_size - 1 = "
                         f"{self.conv_size - 1} tokens")
    elif cache is None:
      cache = init_conv_cache(b, self.conv_size, c, self.dtype)
    elif cache.shape != (b, self.conv_size - 1, c):
      raise ValueError(f"cache must have shape [batch, conv_size-1, features] = "
                       f"{(b, self.conv_size - 1, c)}, got {cache.shape}")
    # PyTorch's Conv1d init for a depthwise kernel: U(-1/sqrt(conv_size), 1/sqrt(conv_size)).
    kernel_init = nn.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=0,
                                                   out_axis=1)
    kernel = self.param(
        "kernel", nn.with_logical_partitioning(kernel_init, ("conv", self.channel_axis)),
        (self.conv_size, c), self.param_dtype)
    kernel = kernel.astype(self.dtype)
    x = x.astype(self.dtype)
    width = self.conv_size - 1
    if sp is None:
      ids = None
      if segment_ids is not None:  # the cache continues the row's first document
        ids = jnp.concatenate([jnp.repeat(segment_ids[:, :1], width, axis=1), segment_ids], 1)
      y, padded = causal_conv(x, kernel, cache.astype(self.dtype), ids)
      new_cache = padded[:, t:]
    else:
      split = lambda z: z.reshape((b, sp.num_segments, t // sp.num_segments) + z.shape[2:])
      ids = None
      if segment_ids is not None:  # each segment's ids after those of the tokens before it
        ids = jnp.concatenate([sp.halo(segment_ids, width), split(segment_ids)], axis=2)
      y, _ = causal_conv(split(x), kernel, sp.halo(x, width), ids)
      y, new_cache = y.reshape(b, t, c), None
    if self.silu:
      y = nn.silu(y)
    return y, new_cache
