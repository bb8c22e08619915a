"""Pieces shared by the flash-style GPU kernels (attention, RAT): the SM count, launch configs, block
fitting and the float32-accumulating dot."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


H100_NUM_SMS = 132  # SM count assumed when the device does not report one (interpret mode)


def num_sms() -> int:
  """Streaming multiprocessors of the default device (H100_NUM_SMS when it reports none)."""
  return getattr(jax.devices()[0], "core_count", None) or H100_NUM_SMS


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Tile sizes (powers of two, >= 16) and Triton launch parameters of one kernel."""
  block_q: int
  block_k: int
  num_warps: int
  num_stages: int


def dot(a, b, *, trans_a=False, trans_b=False):
  """a @ b (operands optionally transposed) with float32 accumulation, IEEE for float32 operands."""
  a = a.T if trans_a else a
  b = b.T if trans_b else b
  return jnp.dot(a, b, precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)


def fit_block(block: int, length: int) -> int:
  """`block` shrunk for short inputs: the next power of two >= length, at least 16."""
  return max(16, min(block, pl.next_power_of_2(length)))
