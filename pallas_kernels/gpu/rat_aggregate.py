"""Pallas (Triton) GPU kernels for RAT's in-chunk gated aggregation, forward and backward.

Per channel, with one gate for keys and values, restarting at every chunk start (acc_{-1} = 0):

  acc_t = gate_t * acc_{t-1} + (1 - gate_t) * x_t,    x = k and x = v.

The work is elementwise and bound by memory bandwidth, so the kernels read every input once in its
own dtype (bf16 or float32), compute in float32 and write every output once.

- forward: grid (batch, blocks of BN chunks, kv heads, blocks of BD channels). A program walks the C
  rows of its chunks with a `fori_loop`: step i loads row i of all BN chunks at once (a [BN, BD]
  tile, chunk-strided), updates the float32 aggregates carried in registers and stores them in
  `out_dtype`. After the last row the carry is each chunk's summary, also written in float32.
- backward: the same grid, walking the rows in reverse. With G_t the total cotangent reaching acc_t
  (that of the output row t, plus gate_{t+1} G_{t+1} through the recurrence, plus the summary's
  cotangent at the last row),

    dk_t = (1 - gate_t) Gk_t,   dv_t = (1 - gate_t) Gv_t,
    dgate_t = Gk_t (acc^k_{t-1} - k_t) + Gv_t (acc^v_{t-1} - v_t),    acc_{-1} = 0.

  acc_{t-1} is read from the saved forward outputs: 2 arrays in `out_dtype`, fewer bytes than
  re-running the forward walk (3 input arrays and a buffer for its rows), and the caller (RAT's
  attention) keeps them alive anyway.

Layout: [B, P, Hk, D] arrays with P = N * C, viewed as [B, N, C, Hk, D] (a free reshape); blocks
cover [BN, C, BD] of one (batch, kv head) and row i is the strided view `ref[:, i, :]`. N is padded
to a multiple of BN when needed (`chunk_multiple` tells callers which N needs no padding).

This module does not import jaxchunk.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class Config:
  """Tile of one program and Triton launch parameters."""
  block_chunks: int  # BN: chunks per program (rows of a tile), a power of two
  block_d: int       # BD: channels per program (columns of a tile), a power of two
  num_warps: int
  num_stages: int


# Per pass. A [16, 64] tile is 1024 elements: with 4 warps each thread moves 8 contiguous channels
# (16 bytes of bf16) per array and row, and each tile row is one 128-byte segment in bf16.
CONFIGS = {
    "fwd": Config(block_chunks=16, block_d=64, num_warps=4, num_stages=3),
    "bwd": Config(block_chunks=16, block_d=64, num_warps=4, num_stages=3),
}


def _fit(config: Config, num_chunks: int, head_dim: int) -> Config:
  """`config` with BN shrunk for few chunks and BD the largest power of two dividing D."""
  block_d = min(config.block_d, head_dim & -head_dim)
  return dataclasses.replace(config, block_chunks=min(config.block_chunks,
                                                      pl.next_power_of_2(num_chunks)),
                             block_d=block_d)


def chunk_multiple(num_chunks: int) -> int:
  """The chunk-count multiple the kernels take without padding, for about `num_chunks` chunks."""
  return max(min(c.block_chunks, pl.next_power_of_2(num_chunks)) for c in CONFIGS.values())


def _forward_kernel(gate_ref, k_ref, v_ref, k_agg_ref, v_agg_ref, k_sum_ref, v_sum_ref):
  """One (batch, chunk block, kv head, channel block): refs [BN, C, BD]; summaries [BN, BD]."""
  block_chunks, chunk, block_d = gate_ref.shape

  def row(i, carry):
    acc_k, acc_v = carry
    gate = gate_ref[:, i, :].astype(jnp.float32)
    acc_k = gate * acc_k + (1 - gate) * k_ref[:, i, :].astype(jnp.float32)
    acc_v = gate * acc_v + (1 - gate) * v_ref[:, i, :].astype(jnp.float32)
    k_agg_ref[:, i, :] = acc_k.astype(k_agg_ref.dtype)
    v_agg_ref[:, i, :] = acc_v.astype(v_agg_ref.dtype)
    return acc_k, acc_v

  zeros = jnp.zeros((block_chunks, block_d), jnp.float32)
  k_sum_ref[...], v_sum_ref[...] = lax.fori_loop(0, chunk, row, (zeros, zeros))


def _backward_kernel(gate_ref, k_ref, v_ref, k_agg_ref, v_agg_ref, dk_agg_ref, dv_agg_ref,
                     dk_sum_ref, dv_sum_ref, dgate_ref, dk_ref, dv_ref):
  """Reverse walk of one block: forward refs and output cotangents [BN, C, BD], summary cotangents
  [BN, BD] (float32); writes dgate, dk, dv [BN, C, BD] in the inputs' dtypes."""
  chunk = gate_ref.shape[1]

  def row(i, carry, prev_k, prev_v):
    """Row i with acc_{i-1} = (prev_k, prev_v); carry = gate_{i+1} G_{i+1} for keys and values."""
    gate = gate_ref[:, i, :].astype(jnp.float32)
    grad_k = carry[0] + dk_agg_ref[:, i, :].astype(jnp.float32)
    grad_v = carry[1] + dv_agg_ref[:, i, :].astype(jnp.float32)
    dgate = (grad_k * (prev_k - k_ref[:, i, :].astype(jnp.float32))
             + grad_v * (prev_v - v_ref[:, i, :].astype(jnp.float32)))
    dgate_ref[:, i, :] = dgate.astype(dgate_ref.dtype)
    dk_ref[:, i, :] = ((1 - gate) * grad_k).astype(dk_ref.dtype)
    dv_ref[:, i, :] = ((1 - gate) * grad_v).astype(dv_ref.dtype)
    return gate * grad_k, gate * grad_v

  def inner_row(j, carry):
    i = chunk - 1 - j
    return row(i, carry, k_agg_ref[:, i - 1, :].astype(jnp.float32),
               v_agg_ref[:, i - 1, :].astype(jnp.float32))

  carry = (dk_sum_ref[...].astype(jnp.float32), dv_sum_ref[...].astype(jnp.float32))
  carry = lax.fori_loop(0, chunk - 1, inner_row, carry)
  zeros = jnp.zeros_like(carry[0])
  row(0, carry, zeros, zeros)


def _specs(config: Config, chunk: int, head_dim: int):
  """BlockSpecs over the grid (batch, chunk block, kv head, channel block) for [B, N, C, Hk, D]
  row arrays and [B, N, Hk, D] summary arrays."""
  bn, bd = config.block_chunks, config.block_d
  rows = pl.BlockSpec((None, bn, chunk, None, bd), lambda b, n, h, j: (b, n, 0, h, j))
  summaries = pl.BlockSpec((None, bn, None, bd), lambda b, n, h, j: (b, n, h, j))
  return rows, summaries


def _grid(config: Config, shape):
  b, n, _, hk, d = shape
  return (b, n // config.block_chunks, hk, d // config.block_d)


def _params(config: Config):
  return plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)


def _forward(gate, k, v, *, out_dtype, interpret):
  """gate, k, v [B, N, C, Hk, D] -> (k_agg, v_agg like them in out_dtype, k_sum, v_sum
  [B, N, Hk, D] float32)."""
  b, n, c, hk, d = gate.shape
  config = _fit(CONFIGS["fwd"], n, d)
  rows, summaries = _specs(config, c, d)
  return pl.pallas_call(
      _forward_kernel,
      grid=_grid(config, gate.shape),
      in_specs=[rows] * 3,
      out_specs=[rows, rows, summaries, summaries],
      out_shape=[jax.ShapeDtypeStruct(gate.shape, out_dtype)] * 2
      + [jax.ShapeDtypeStruct((b, n, hk, d), jnp.float32)] * 2,
      compiler_params=_params(config),
      interpret=interpret,
      name="rat_aggregate_fwd",
  )(gate, k, v)


def _backward(gate, k, v, k_agg, v_agg, dk_agg, dv_agg, dk_sum, dv_sum, *, interpret):
  """The reverse walk on [B, N, C, Hk, D] rows. Returns (dgate, dk, dv) in the inputs' dtypes."""
  n, d = gate.shape[1], gate.shape[4]
  config = _fit(CONFIGS["bwd"], n, d)
  rows, summaries = _specs(config, gate.shape[2], d)
  return pl.pallas_call(
      _backward_kernel,
      grid=_grid(config, gate.shape),
      in_specs=[rows] * 7 + [summaries] * 2,
      out_specs=[rows] * 3,
      out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (gate, k, v)],
      compiler_params=_params(config),
      interpret=interpret,
      name="rat_aggregate_bwd",
  )(gate, k, v, k_agg, v_agg, dk_agg, dv_agg, dk_sum, dv_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _aggregate(gate, k, v, out_dtype, interpret):
  """`chunk_aggregate` on [B, N, C, Hk, D] with N a multiple of the kernels' chunk blocks."""
  return _forward(gate, k, v, out_dtype=out_dtype, interpret=interpret)


def _aggregate_fwd(gate, k, v, out_dtype, interpret):
  outs = _forward(gate, k, v, out_dtype=out_dtype, interpret=interpret)
  return outs, (gate, k, v, outs[0], outs[1])


def _aggregate_bwd(out_dtype, interpret, residuals, cotangents):
  dk_agg, dv_agg, dk_sum, dv_sum = cotangents
  return _backward(*residuals, dk_agg, dv_agg, dk_sum, dv_sum, interpret=interpret)


_aggregate.defvjp(_aggregate_fwd, _aggregate_bwd)


def chunk_aggregate(gate, k, v, *, chunk_size: int, out_dtype, interpret: bool = False):
  """RAT's in-chunk running aggregates of k and v under `gate`, differentiable (custom VJP).

  Args:
    gate: [B, P, Hk, D] gates (bf16 or float32), P a multiple of `chunk_size`.
    k, v: [B, P, Hk, D] keys and values (bf16 or float32; dtypes may differ).
    chunk_size: C; the aggregates restart at rows 0, C, 2C, ...
    out_dtype: dtype of the aggregates (e.g. bf16 for the bf16 attention kernel).
    interpret: run the kernels in Pallas interpret mode (CPU tests).

  Returns:
    (k_agg, v_agg [B, P, Hk, D] in out_dtype, k_sum, v_sum [B, P / C, Hk, D] float32): the
    aggregates at every row and, in float32, at every chunk's last row (the chunk summaries).
  """
  if not (gate.shape == k.shape == v.shape and gate.ndim == 4):
    raise ValueError(f"gate, k and v must have one shape [B, P, Hk, D], got {gate.shape}, "
                     f"{k.shape}, {v.shape}")
  b, p, hk, d = gate.shape
  if p % chunk_size:
    raise ValueError(f"the length {p} must be a multiple of chunk_size {chunk_size}")
  n = p // chunk_size
  n_pad = -n % chunk_multiple(n)
  widths = [(0, 0), (0, n_pad), (0, 0), (0, 0), (0, 0)]
  rows = lambda x: jnp.pad(x.reshape(b, n, chunk_size, hk, d), widths) if n_pad else \
      x.reshape(b, n, chunk_size, hk, d)
  k_agg, v_agg, k_sum, v_sum = _aggregate(rows(gate), rows(k), rows(v), jnp.dtype(out_dtype),
                                          interpret)
  agg = lambda x: x[:, :n].reshape(b, p, hk, d)
  return agg(k_agg), agg(v_agg), k_sum[:, :n], v_sum[:, :n]
