"""Rotary position embedding (RoPE) as a pure function of integer positions.

The "rotate half" layout of GPT-NeoX / LLaMA: feature i is paired with feature i + head_dim/2 and
the pair is rotated by the angle position * theta^(-2i/head_dim).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def rotary_angles(positions: jax.Array, head_dim: int, *, theta: float = 10000.0) -> jax.Array:
  """Rotation angles [..., head_dim/2] (float32) of integer `positions` [...]."""
  if head_dim % 2:
    raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
  inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  return jnp.asarray(positions, jnp.float32)[..., None] * inv_freq


def apply_rotary(x: jax.Array, positions: jax.Array, *, theta: float = 10000.0) -> jax.Array:
  """Rotates x [B,T,H,D] by the positions [B,T] of its tokens; returns [B,T,H,D] in x's dtype.

  Computed in float32. Dot products of rotated queries and keys depend only on the difference of
  their positions.
  """
  if x.ndim != 4:
    raise ValueError(f"x must have shape [batch, seq, heads, head_dim], got {x.shape}")
  if jnp.shape(positions) != x.shape[:2]:
    raise ValueError(f"positions must have shape [batch, seq] = {x.shape[:2]}, "
                     f"got {jnp.shape(positions)}")
  angles = rotary_angles(positions, x.shape[-1], theta=theta)[:, :, None, :]  # [B,T,1,D/2]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
