"""Tests for the Pallas kernels of RAT's in-chunk aggregation (pallas_kernels/gpu/rat_aggregate.py).

On CPU the kernels run in interpret mode. Values are checked against a float64 NumPy oracle and the
plain-JAX `_aggregate` of the xla path, gradients against `_aggregate` in float32 and in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.rat import _aggregate
from pallas_kernels.gpu.rat_aggregate import chunk_aggregate
from tests.utils import assert_rel_close, randn

TOL32 = 1e-5
TOL16 = 1e-2
NAMES = ("k_agg", "v_agg", "k_sum", "v_sum")


def oracle(gate, k, v, chunk_size):
  """Float64 aggregates, one row at a time. Returns (k_agg, v_agg [B,P,Hk,D], k_sum, v_sum
  [B,P/C,Hk,D])."""
  gate, k, v = (np.asarray(x, np.float64) for x in (gate, k, v))
  k_agg, v_agg = np.zeros_like(k), np.zeros_like(v)
  acc_k = acc_v = np.zeros_like(k[:, 0])
  for t in range(k.shape[1]):
    keep = 0.0 if t % chunk_size == 0 else 1.0
    acc_k = keep * gate[:, t] * acc_k + (1 - gate[:, t]) * k[:, t]
    acc_v = keep * gate[:, t] * acc_v + (1 - gate[:, t]) * v[:, t]
    k_agg[:, t], v_agg[:, t] = acc_k, acc_v
  last = slice(chunk_size - 1, None, chunk_size)
  return k_agg, v_agg, k_agg[:, last], v_agg[:, last]


def xla_aggregate(gate, k, v, chunk_size):
  """The xla path's `_aggregate` with `chunk_aggregate`'s signature and outputs."""
  b, p, hk, d = k.shape
  chunks = lambda x: x.reshape(b, p // chunk_size, chunk_size, hk, d)
  k_agg, v_agg = _aggregate(chunks(gate), chunks(k), chunks(v))
  return k_agg.reshape(b, p, hk, d), v_agg.reshape(b, p, hk, d), k_agg[:, :, -1], v_agg[:, :, -1]


def inputs(rng, b, p, hk, d):
  """Gates in [0.05, 0.95] and random k, v [B, P, Hk, D]."""
  gate = rng.uniform(0.05, 0.95, (b, p, hk, d)).astype(np.float32)
  return gate, randn(rng, b, p, hk, d), randn(rng, b, p, hk, d)


def kernel(gate, k, v, chunk_size, out_dtype=jnp.float32):
  return chunk_aggregate(gate, k, v, chunk_size=chunk_size, out_dtype=out_dtype, interpret=True)


def grads(aggregate, chunk_size, cotangents, gate, k, v):
  """Jitted d(gate, k, v) of the sum over the four outputs of output * cotangent."""
  def loss(gate, k, v):
    outs = aggregate(gate, k, v, chunk_size)
    return sum(jnp.sum(o.astype(ct.dtype) * ct) for o, ct in zip(outs, cotangents))
  return jax.jit(jax.grad(loss, (0, 1, 2)))(gate, k, v)


def grads64(chunk_size, cotangents, gate, k, v):
  """`grads` of `_aggregate` in float64, as NumPy arrays."""
  with jax.enable_x64(True):
    to64 = lambda xs: tuple(jnp.asarray(x, jnp.float64) for x in xs)
    return [np.asarray(g) for g in grads(xla_aggregate, chunk_size, to64(cotangents),
                                         *to64((gate, k, v)))]


@pytest.mark.parametrize("chunk_size,b,chunks,hk,d", [
    (8, 2, 5, 2, 16),    # chunks padded to one block of 8
    (16, 1, 4, 2, 24),   # three channel blocks of 8
    (8, 1, 20, 1, 16),   # two blocks of 16 chunks, the second one padded
])
def test_matches_oracle(rng, chunk_size, b, chunks, hk, d):
  gate, k, v = inputs(rng, b, chunks * chunk_size, hk, d)
  outs = kernel(gate, k, v, chunk_size)
  for name, out, ref, ref_xla in zip(NAMES, outs, oracle(gate, k, v, chunk_size),
                                     xla_aggregate(gate, k, v, chunk_size)):
    assert out.dtype == jnp.float32, name
    assert_rel_close(out, ref, TOL32, f"{name} vs float64")
    assert_rel_close(out, ref_xla, TOL32, f"{name} vs xla")


@pytest.mark.parametrize("chunk_size,chunks", [(8, 6), (16, 3)])
def test_gradients(rng, chunk_size, chunks):
  """d(gate, k, v) of all four outputs: kernel vs `_aggregate` in float32 and float64."""
  gate, k, v = inputs(rng, 2, chunks * chunk_size, 2, 16)
  outs = oracle(gate, k, v, chunk_size)
  cotangents = tuple(randn(rng, *o.shape) for o in outs)
  results = zip(("gate", "k", "v"), grads(kernel, chunk_size, cotangents, gate, k, v),
                grads(xla_aggregate, chunk_size, cotangents, gate, k, v),
                grads64(chunk_size, cotangents, gate, k, v))
  for name, g, g_xla, g64 in results:
    assert g.dtype == jnp.float32
    assert_rel_close(g, g_xla, TOL32, f"d{name} vs xla")
    assert_rel_close(g, g64, TOL32, f"d{name} vs float64")


@pytest.mark.parametrize("chunk_size", [8, 16])
def test_bfloat16(rng, chunk_size):
  """bf16 inputs and aggregates (summaries stay float32), values and gradients vs float64."""
  gate, k, v = (jnp.asarray(x, jnp.bfloat16) for x in inputs(rng, 1, 4 * chunk_size, 2, 16))
  bf16_kernel = lambda *xs: kernel(*xs, out_dtype=jnp.bfloat16)
  outs = bf16_kernel(gate, k, v, chunk_size)
  refs = oracle(gate, k, v, chunk_size)
  for name, out, ref in zip(NAMES, outs, refs):
    assert out.dtype == (jnp.float32 if "sum" in name else jnp.bfloat16), name
    assert_rel_close(out, ref, TOL16, f"bf16 {name}")

  cotangents = tuple(randn(rng, *o.shape) for o in refs)
  results = zip(("gate", "k", "v"), grads(bf16_kernel, chunk_size, cotangents, gate, k, v),
                grads64(chunk_size, cotangents, gate, k, v))
  for name, g, g64 in results:
    assert g.dtype == jnp.bfloat16
    assert_rel_close(g, g64, TOL16, f"bf16 d{name}")


def test_mixed_dtypes(rng):
  """A bf16 gate with float32 k, v (RAT's continued-state path): each read in its own dtype."""
  gate, k, v = inputs(rng, 1, 24, 2, 16)
  gate = jnp.asarray(gate, jnp.bfloat16)
  outs = kernel(gate, k, v, 8)
  cotangents = tuple(randn(rng, *o.shape) for o in outs)
  assert [g.dtype for g in grads(kernel, 8, cotangents, gate, k, v)] == [jnp.bfloat16, jnp.float32,
                                                                          jnp.float32]
  for name, out, ref in zip(NAMES, outs, oracle(gate, k, v, 8)):
    assert_rel_close(out, ref, TOL32, f"mixed {name}")


def test_jit_vmap(rng):
  gate, k, v = inputs(rng, 2, 16, 2, 16)
  run = jax.jit(jax.vmap(lambda *xs: kernel(*(x[None] for x in xs), 8)))
  for name, out, ref in zip(NAMES, run(gate, k, v), oracle(gate, k, v, 8)):
    assert_rel_close(out[:, 0], ref, TOL32, f"jit vmap {name}")


def test_bad_arguments(rng):
  gate, k, v = inputs(rng, 1, 16, 2, 16)
  with pytest.raises(ValueError, match="one shape"):
    kernel(gate, k[:, :, :1], v, 8)
  with pytest.raises(ValueError, match="one shape"):
    kernel(gate[0], k[0], v[0], 8)
  with pytest.raises(ValueError, match="multiple of chunk_size 6"):
    kernel(gate, k, v, 6)
