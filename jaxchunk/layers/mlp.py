"""SwiGLU feed-forward block: down(silu(gate(x)) * up(x)).

Parameters (logical axes): `gate/kernel`, `up/kernel` [d_model, hidden] -> ("embed", "mlp");
`down/kernel` [hidden, d_model] -> ("mlp", "embed").
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxchunk.layers.packing import packed_projections

# gate and up packed for serving (`jaxchunk.layers.packing`).
PACKED_NAME, PACKED_PARTS = "gate_up", ("gate", "up")


class SwiGLU(nn.Module):
  """The gated MLP of LLaMA: x [B,T,d_model] -> [B,T,d_model] through `hidden` features.

  Attributes:
    hidden: width of the gated hidden layer.
    dtype: compute dtype; param_dtype: parameter dtype.
  """

  hidden: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def _dense(self, features: int, axes: tuple[str, str], name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                    name=name)

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d_model = x.shape[-1]
    x = x.astype(self.dtype)
    packed = packed_projections(self, x, PACKED_NAME, [(self.hidden,)] * 2, self.dtype)
    if packed is not None:
      gate, up = packed
    else:
      gate = self._dense(self.hidden, ("embed", "mlp"), "gate")(x)
      up = self._dense(self.hidden, ("embed", "mlp"), "up")(x)
    return self._dense(d_model, ("mlp", "embed"), "down")(nn.silu(gate) * up)
