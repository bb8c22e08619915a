"""Causal depthwise short convolution over time, with a cache for chunked prefill and decode.

Parameters (logical axes): `kernel` [conv_size, features] -> ("conv", `channel_axis`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def init_conv_cache(batch: int, conv_size: int, features: int, dtype) -> jax.Array:
  """The empty cache of a `ShortConv`: the last conv_size-1 inputs, zeros [B, conv_size-1, C]."""
  return jnp.zeros((batch, conv_size - 1, features), dtype)


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
  def __call__(self, x: jax.Array, *, cache: jax.Array | None = None):
    """x [B,T,C]; cache [B,conv_size-1,C] (the inputs before x; None = zeros).

    Returns (y [B,T,C], new_cache [B,conv_size-1,C]), new_cache being the last conv_size-1 inputs
    of cache ++ x, so the next call continues exactly.
    """
    if x.ndim != 3 or x.shape[2] != self.features:
      raise ValueError(f"x must have shape [batch, seq, {self.features}], got {x.shape}")
    b, t, c = x.shape
    if cache is None:
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
    padded = jnp.concatenate([cache.astype(self.dtype), x.astype(self.dtype)], axis=1)
    y = sum(kernel[j] * padded[:, j:j + t] for j in range(self.conv_size))
    if self.silu:
      y = nn.silu(y)
    return y, padded[:, t:]
