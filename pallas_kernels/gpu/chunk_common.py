"""Helpers shared by the chunked linear-recurrence kernels (gated linear attention, delta rule,
mLSTM): their block configs, launches and BlockSpecs, head-dim support, the dot precision rule,
the in-chunk causal and triangular masks, operand rounding, row extraction without value indexing
and the per-chunk document index of packed documents. This module never imports jaxchunk.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class Config:
  chunk: int         # tokens per chunk
  block_v: int       # Dv columns per program
  num_warps: int
  num_stages: int


@dataclasses.dataclass(frozen=True)
class Launch:
  """One kernel's launch: warps, software-pipelining stages and, where the kernel splits the head
  dims, the block of key / value columns per program (None: the whole head dim)."""
  num_warps: int
  num_stages: int = 1
  block_k: int | None = None
  block_v: int | None = None


def compiler_params(launch: Launch):
  return plgpu.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages)


def chunk_spec(chunk: int, width: int | None = None, blocked: bool = False):
  """BlockSpec of one chunk of a [B,T,H(,width)] array over a grid (batch, head, chunk[, column
  block]): all columns, or (blocked) the program's column block of `width`."""
  if width is None:
    return pl.BlockSpec((None, chunk, None), lambda i, h, c, *j: (i, c, h))
  return pl.BlockSpec((None, chunk, None, width),
                      lambda i, h, c, *j: (i, c, h, j[0] if blocked else 0))


def doc_specs(doc, block):
  """([BlockSpec of doc [B, T] int32 with block (length, index map)], (doc,)) if doc is given,
  else ([], ())."""
  return ([], ()) if doc is None else ([pl.BlockSpec((None, block[0]), block[1])], (doc,))


HEAD_DIMS = (64, 128)
MIN_PROGRAMS = 128  # about the SM count of an H100


def fit_launches(config, batch: int, heads: int, dk: int, dv: int):
  """`config` (a dataclass with a `state` launch over (batch, head, Dk block, Dv block) and an
  `output` launch over Dv blocks) with its blocks clipped to the head dims and the state pass's
  blocks halved (down to 32x32) while its grid has fewer than MIN_PROGRAMS programs."""
  bk, bv = min(config.state.block_k, dk), min(config.state.block_v, dv)
  while bk * bv > 32 * 32 and batch * heads * (dk // bk) * (dv // bv) < MIN_PROGRAMS:
    if bv >= bk:
      bv //= 2
    else:
      bk //= 2
  return dataclasses.replace(
      config, state=dataclasses.replace(config.state, block_k=bk, block_v=bv),
      output=dataclasses.replace(config.output, block_v=min(config.output.block_v, dv)))


def unsupported_reason(head_dim_k: int, head_dim_v: int) -> str | None:
  """None when the kernels support these head dims, else why not."""
  if head_dim_k not in HEAD_DIMS or head_dim_v not in HEAD_DIMS:
    return (f"the Pallas kernel supports head dims {HEAD_DIMS}, got head_dim={head_dim_k}, "
            f"head_dim_v={head_dim_v}")
  return None


def fit_block_v(config: Config, batch: int, heads: int, dv: int) -> Config:
  """`config` with `block_v` halved (down to 32) while the grid (batch, heads, Dv blocks) has fewer
  than MIN_PROGRAMS programs, so long sequences with a small batch still fill the chip."""
  block_v = min(config.block_v, dv)
  while block_v > 32 and batch * heads * (dv // block_v) < MIN_PROGRAMS:
    block_v //= 2
  return dataclasses.replace(config, block_v=block_v)


def dot(a, b, dtype, *, wide=False, trans_a=False, trans_b=False):
  """a @ b (optionally transposed), accumulated in float32; `dtype` is the inputs' dtype.

  Float32 inputs: float32 operands, full-precision (IEEE) dots. bf16 inputs: bf16 operands, except
  where `wide` (the dots with the float32 state or its gradient, and those giving dq and dk), whose
  operands stay float32 (tf32 on the GPU): the decay gradient q dq - k dk cancels, and bf16 there
  puts it at 1.1-1.7e-2 from the float64 reference for GLA (1.2e-3 with float32 operands).
  """
  if dtype == jnp.float32:
    precision = lax.Precision.HIGHEST
  else:
    dtype, precision = (jnp.float32 if wide else dtype), None
  return plgpu.dot(a.astype(dtype), b.astype(dtype), trans_a=trans_a, trans_b=trans_b,
                   precision=precision)


def row(x, index: int):
  """Row `index` of x [C] or [C, Dk] (a scalar or [Dk]), by a masked sum (no value indexing)."""
  rows = lax.broadcasted_iota(jnp.int32, x.shape, 0)
  return jnp.sum(jnp.where(rows == index, x, 0.0), axis=0)


def triangular_mask(n: int, *, reverse: bool):
  """[n, n] boolean: column <= row (a cumulative sum from the first row as a masked sum or a
  matmul), or column >= row with `reverse` (from the last row)."""
  rows = lax.broadcasted_iota(jnp.int32, (n, n), 0)
  cols = lax.broadcasted_iota(jnp.int32, (n, n), 1)
  return cols >= rows if reverse else cols <= rows


def round_mantissa(x, bits: int):
  """float32 x rounded to `bits` mantissa bits (to nearest even), kept in float32: the operand a
  bf16 (7 bits) or TF32 (10 bits) dot sees. By integer ops: XLA may elide a float32 -> bf16 ->
  float32 round trip (interpret mode)."""
  drop = 23 - bits
  raw = lax.bitcast_convert_type(x, jnp.uint32)
  raw = raw + (jnp.uint32((1 << (drop - 1)) - 1) + ((raw >> drop) & jnp.uint32(1)))
  return lax.bitcast_convert_type(raw & jnp.uint32((0xFFFFFFFF >> drop) << drop), jnp.float32)


def causal_mask(chunk: int):
  """[chunk, chunk] boolean, True on and below the diagonal."""
  rows = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0)
  cols = lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1)
  return rows >= cols


def chunk_documents(segment_ids, chunk: int):
  """segment_ids [B, T] int -> doc [B, T padded to a multiple of `chunk`] int32: each token's
  document within its chunk, 0 for the one running at the chunk start (continued from the carried
  state), then 1, 2, ... after each start (a change of id from the previous token; t = 0 is never
  one). The padding joins the last document."""
  batch, t = segment_ids.shape
  starts = jnp.pad(segment_ids[:, 1:] != segment_ids[:, :-1], ((0, 0), (1, (-t) % chunk)))
  return jnp.cumsum(starts.reshape(batch, -1, chunk), axis=-1, dtype=jnp.int32).reshape(batch, -1)
