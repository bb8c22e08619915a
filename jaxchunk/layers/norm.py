"""RMSNorm over the feature axis, computed in float32.

Parameters (logical axes): `scale` [features] -> (`axis_name`,), "embed" by default.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale over the last axis.

  Attributes:
    eps: added to the mean square before the reciprocal square root.
    axis_name: logical axis name of the feature dimension.
    dtype: output dtype (the statistics are float32 whatever the input dtype).
    param_dtype: dtype of `scale`.
  """

  eps: float = 1e-6
  axis_name: str = "embed"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., features] -> [..., features] in `dtype`."""
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)
