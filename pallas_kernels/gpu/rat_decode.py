"""Pallas (Triton) GPU kernel for one RAT decode token: attention over the chunk summaries.

At decode, query head h of row b attends with one softmax over the n_b = num_chunks[b] completed
chunk summaries of its kv head (k_chunks / v_chunks [B, N, Hk, D], slots >= n_b ignored) and the
row's own running aggregate (k_run / v_run [B, Hk, D], already updated with this token):

  o = softmax(scale * q . [K_0, ..., K_{n-1}, k_run]) [V_0, ..., V_{n-1}, v_run].

Grid (batch, query head, split): a program reads its query head's q [D] and walks the summary
blocks (`block_n` consecutive slots) of its split of [0, n_b), so a step reads each visible summary
once per query head (GQA heads of one kv head re-read it, mostly from L2) and never reads the
buffer's unused capacity. The scores are a multiply-reduce over D (one query row: no tensor-core
dot), in float32 whatever the storage dtype of the summaries. Split 0 seeds its online softmax with
the running-aggregate term; with `num_splits` > 1 (split-K for long contexts at small batch) each
split writes its normalised output and base-2 log-sum-exp and `rat_decode_attention` merges them in
XLA. A row with n_b = 0 attends to its running aggregate only.

The running-aggregate update and the summary append are elementwise / one-slot writes that the
caller (`jaxchunk.ops.rat.rat_step`) does in XLA around this kernel.

This module does not import jaxchunk.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.gpu.paged_attention import default_num_splits

HEAD_DIMS = (64, 128, 256)
DTYPES = ("bfloat16", "float16", "float32")
# head_dim -> (block_n summaries per loop step, num_warps, num_stages), from sweeps of whole decode
# steps at batch 64, 16 heads, 4K context on an H100. 128: block_n {16, 32, 64} x warps {2, 4, 8}
# x stages {2, 3, 4}, 72 us per step (the previous 32/4/3: 81 us). 64: block_n {16, 32, 64} x
# warps {2, 4}, 46 us (the previous 64/4/3: 53 us). 256: not swept.
CONFIGS = {64: (32, 2, 3), 128: (16, 2, 3), 256: (16, 4, 3)}

_LOG2E = math.log2(math.e)


def unsupported_reason(head_dim: int, q_dtype, summary_dtype) -> str | None:
  """None when the kernel supports this head dim and these dtypes, else the reason why not."""
  if head_dim not in HEAD_DIMS:
    return f"head_dim {head_dim} not in {HEAD_DIMS}"
  for name, dtype in (("q", q_dtype), ("summaries", summary_dtype)):
    if jnp.dtype(dtype).name not in DTYPES:
      return f"{name} dtype {jnp.dtype(dtype).name} not in {DTYPES}"
  return None


def _kernel(num_chunks_ref, q_ref, k_run_ref, v_run_ref, k_ref, v_ref, o_ref, lse_ref, *,
            scale: float, block_n: int, num_splits: int):
  """One (row, query head, split). q/k_run/v_run [D], k/v [N, D] (this row's kv head). Writes
  o [D] float32 (normalised over this split's keys) and lse [] (base 2; -inf if it saw none)."""
  capacity = k_ref.shape[0]
  n = jnp.minimum(num_chunks_ref[()], capacity)
  q = q_ref[...].astype(jnp.float32) * (scale * _LOG2E)
  # Split 0 starts from the running-aggregate term (one key with logit s_run), the others empty.
  # (The 0/1 weight comes from an integer: Triton lowers a bool-to-float cast as i1.)
  first = jnp.maximum(1 - pl.program_id(2), 0).astype(jnp.float32)
  s_run = jnp.sum(q * k_run_ref[...].astype(jnp.float32))
  m = jnp.where(pl.program_id(2) == 0, s_run, -jnp.inf)
  l = first
  acc = first * v_run_ref[...].astype(jnp.float32)

  blocks = pl.cdiv(n, block_n)
  per_split = pl.cdiv(blocks, num_splits)
  lo = jnp.minimum(pl.program_id(2) * per_split, blocks)
  hi = jnp.minimum(lo + per_split, blocks)

  def body(j, carry):
    m, l, acc = carry
    slots = j * block_n + jnp.arange(block_n, dtype=jnp.int32)
    rows = jnp.minimum(slots, capacity - 1)  # the last block's tail reads inside the buffer
    visible = slots < n
    k = k_ref[rows, :].astype(jnp.float32)
    v = jnp.where(visible[:, None], v_ref[rows, :].astype(jnp.float32), 0.0)
    s = jnp.where(visible, jnp.sum(k * q[None, :], axis=1), -jnp.inf)
    m_new = jnp.maximum(m, jnp.max(s))
    shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
    p = jnp.exp2(s - shift)
    alpha = jnp.exp2(m - shift)
    return m_new, alpha * l + jnp.sum(p), alpha * acc + jnp.sum(p[:, None] * v, axis=0)

  m, l, acc = lax.fori_loop(lo, hi, body, (m, l, acc))
  empty = l == 0.0
  safe_l = jnp.where(empty, 1.0, l)
  o_ref[...] = acc / safe_l
  lse_ref[...] = jnp.full(lse_ref.shape, jnp.where(empty, -jnp.inf, m + jnp.log2(safe_l)))


def rat_decode_attention(q, k_run, v_run, k_chunks, v_chunks, num_chunks, *, scale: float,
                         num_splits: int | None = None, block_n: int | None = None,
                         interpret: bool = False):
  """RAT's decode attention of one token per row (forward only).

  Args:
    q: [B, H, D] queries (any dtype of DTYPES; computed in float32).
    k_run, v_run: [B, Hk, D] running aggregates including this token (Hk dividing H).
    k_chunks, v_chunks: [B, N, Hk, D] chunk summaries, read in their storage dtype.
    num_chunks: int32 [B], the completed chunks each row sees (clipped to N).
    scale: logit scale.
    num_splits: summary splits per (row, head); None fills the SMs (`default_num_splits`).
    block_n: summaries per loop step; None takes CONFIGS.
    interpret: run in Pallas interpret mode (CPU tests).

  Returns:
    o [B, H, D] float32.
  """
  b, h, d = q.shape
  _, n, hk, _ = k_chunks.shape
  group = h // hk
  default_block, num_warps, num_stages = CONFIGS[d]
  block_n = block_n or default_block
  if num_splits is None:
    num_splits = default_num_splits(b * h, pl.cdiv(max(n, 1), block_n))
  kv_head = lambda i, j, s: (i, j // group, 0)
  summaries = pl.BlockSpec((None, n, None, d), lambda i, j, s: (i, 0, j // group, 0))
  o, lse = pl.pallas_call(
      functools.partial(_kernel, scale=float(scale), block_n=block_n, num_splits=num_splits),
      grid=(b, h, num_splits),
      in_specs=[pl.BlockSpec((None,), lambda i, j, s: (i,)),
                pl.BlockSpec((None, None, d), lambda i, j, s: (i, j, 0)),
                pl.BlockSpec((None, None, d), kv_head), pl.BlockSpec((None, None, d), kv_head),
                summaries, summaries],
      out_specs=[pl.BlockSpec((None, None, None, d), lambda i, j, s: (i, s, j, 0)),
                 pl.BlockSpec((None, None, None, 1), lambda i, j, s: (i, s, j, 0))],
      out_shape=[jax.ShapeDtypeStruct((b, num_splits, h, d), jnp.float32),
                 jax.ShapeDtypeStruct((b, num_splits, h, 1), jnp.float32)],
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret,
      name="rat_decode_attention",
  )(jnp.asarray(num_chunks, jnp.int32), q, k_run, v_run, k_chunks, v_chunks)
  if num_splits == 1:
    return o[:, 0]
  lse = lse[..., 0]
  top = jnp.max(lse, axis=1, keepdims=True)  # finite: split 0 always holds the running term
  weight = jnp.exp2(lse - top)
  return jnp.sum(weight[..., None] * o, axis=1) / jnp.sum(weight, axis=1)[..., None]
