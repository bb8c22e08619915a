"""Tests for the Pallas RAT kernel (`impl="pallas"` of jaxchunk.ops.rat).

On CPU the kernels run in Pallas interpret mode; on a GPU backend (run with JAX_PLATFORMS=cuda) the
same tests run the compiled Triton kernels. Values are checked against the float64 oracle of
test_rat.py, gradients against the xla path and the float64 reference path.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.rat import rat, rat_step
from pallas_kernels.gpu import rat as rat_kernel
from tests.ops.test_rat import assert_state_close, inputs, loss_fn, oracle, random_state
from tests.utils import assert_rel_close, randn

ON_CPU = jax.default_backend() == "cpu"
TOL32 = 1e-5 if ON_CPU else 1e-4  # float32 on GPU: the bound (kernel dots are IEEE)
TOL16 = 1e-2
D = 64  # the smallest head dim the kernel supports


@pytest.mark.parametrize("chunk_size,b,t,h,hk", [
    (8, 1, 40, 2, 2),    # T a multiple of the chunk, one query block
    (16, 2, 37, 4, 2),   # ragged T, GQA
    (2, 1, 70, 2, 1),    # multi-query; 2 query blocks x 2 summary blocks, masked and unmasked
])
def test_matches_oracle(rng, chunk_size, b, t, h, hk):
  q, k, v, f = inputs(rng, b, t, h, hk, D)
  o, state = rat(q, k, v, f, chunk_size=chunk_size, output_final_state=True, impl="pallas")
  ref_o, ref_state = oracle(q, k, v, f, chunk_size)
  assert o.dtype == jnp.float32
  assert_rel_close(o, ref_o, TOL32, "pallas o")
  assert_state_close(state, ref_state, TOL32, "pallas")


def test_bfloat16_inputs(rng):
  q, k, v, f = (jnp.asarray(x, jnp.bfloat16) for x in inputs(rng, 1, 45, 4, 2, D))
  o, state = rat(q, k, v, f, chunk_size=8, output_final_state=True, impl="pallas")
  assert o.dtype == jnp.bfloat16 and state.k_run.dtype == jnp.float32
  assert_rel_close(o, oracle(q, k, v, f, 8)[0], TOL16, "pallas bf16")


@pytest.mark.parametrize("length", [13, 16])
def test_initial_state_traced_length(rng, length):
  """Continuation from a state (mid-chunk and chunk-aligned) with the length traced under jit."""
  chunk_size, capacity = 8, 3
  q, k, v, f = inputs(rng, 1, 30, 4, 2, D)
  init = random_state(rng, 1, 2, D, capacity, length)
  run = jax.jit(lambda init: rat(q, k, v, f, chunk_size=chunk_size, initial_state=init,
                                 output_final_state=True, scale=0.2, impl="pallas"))
  o, state = run(init)
  ref_o, ref_state = oracle(q, k, v, f, chunk_size, scale=0.2, state=init)
  assert_rel_close(o, ref_o, TOL32, "pallas o")
  assert_state_close(state, ref_state, TOL32, "pallas")


def test_gradients(rng):
  """Gradients w.r.t. q, k, v, f and every initial-state array: pallas vs xla vs float64."""
  chunk_size, capacity, length = 8, 2, 11
  q, k, v, f = inputs(rng, 1, 35, 4, 2, D)
  init = random_state(rng, 1, 2, D, capacity, length)
  args = (q, k, v, f) + tuple(init[:4])
  cotangent = randn(rng, *q.shape)
  final_capacity = capacity + 5
  projections = (randn(rng, 1, final_capacity, 2, D), randn(rng, 1, final_capacity, 2, D),
                 randn(rng, 1, 2, D), randn(rng, 1, 2, D))
  argnums = tuple(range(len(args)))
  grads = {impl: jax.jit(jax.grad(loss_fn(impl, chunk_size, cotangent, projections, length=length,
                                          block_size=16), argnums))(*args)
           for impl in ("pallas", "xla")}
  with jax.enable_x64(True):
    to64 = lambda x: jnp.asarray(x, jnp.float64)
    loss64 = loss_fn("reference", chunk_size, to64(cotangent), tuple(map(to64, projections)),
                     length=length, block_size=16)
    grads64 = jax.grad(loss64, argnums)(*map(to64, args))
    grads64 = [np.asarray(g) for g in grads64]
  names = ("q", "k", "v", "f", "k_chunks", "v_chunks", "k_run", "v_run")
  for name, g, g_xla, g64 in zip(names, grads["pallas"], grads["xla"], grads64):
    assert_rel_close(g, g_xla, TOL32, f"d{name} pallas vs xla")
    assert_rel_close(g, g64, TOL32, f"d{name} pallas vs float64")


def test_bfloat16_gradients(rng):
  q, k, v, f = inputs(rng, 1, 24, 2, 2, D)
  cotangent = randn(rng, *q.shape)
  loss = lambda impl: lambda *xs: jnp.sum(
      rat(*xs, chunk_size=8, impl=impl)[0].astype(jnp.float32) * cotangent)
  bf16 = tuple(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v, f))
  grads = jax.grad(loss("pallas"), (0, 1, 2, 3))(*bf16)
  with jax.enable_x64(True):
    grads64 = jax.grad(loss("reference"), (0, 1, 2, 3))(
        *(jnp.asarray(x, jnp.float64) for x in bf16))
    grads64 = [np.asarray(g) for g in grads64]
  for name, g, g64 in zip("qkvf", grads, grads64):
    assert g.dtype == jnp.bfloat16
    assert_rel_close(g, g64, TOL16, f"d{name} bf16")


def test_prefill_then_decode(rng):
  chunk_size, t1, steps = 8, 19, 6
  q, k, v, f = inputs(rng, 1, t1 + steps, 2, 2, D)
  full, _ = rat(q, k, v, f, chunk_size=chunk_size, impl="xla")
  o, state = rat(q[:, :t1], k[:, :t1], v[:, :t1], f[:, :t1], chunk_size=chunk_size,
                 output_final_state=True, max_chunks=4, impl="pallas")
  outs = [o]
  step = jax.jit(lambda *xs: rat_step(*xs, chunk_size=chunk_size))
  for i in range(t1, t1 + steps):
    o_i, state = step(q[:, i], k[:, i], v[:, i], f[:, i], state)
    outs.append(o_i[:, None])
  assert_rel_close(jnp.concatenate(outs, axis=1), full, TOL32, "prefill + decode")


def test_vmap(rng):
  q, k, v, f = inputs(rng, 2, 20, 2, 2, D)
  one = lambda *xs: rat(*(x[None] for x in xs), chunk_size=8, impl="pallas")[0][0]
  assert_rel_close(jax.vmap(one)(q, k, v, f), rat(q, k, v, f, chunk_size=8, impl="xla")[0],
                   TOL32, "vmap")


def test_unsupported_calls(rng):
  q, k, v, f = inputs(rng, 1, 8, 2, 2, 16)
  with pytest.raises(NotImplementedError, match="head_dim 16"):
    rat(q, k, v, f, chunk_size=4, impl="pallas")
  auto, _ = rat(q, k, v, f, chunk_size=4, impl="auto")  # falls back to xla
  assert_rel_close(auto, oracle(q, k, v, f, 4)[0], TOL32, "auto fallback")
  assert rat_kernel.unsupported_reason(64, jnp.float16) == "dtype float16 not in ('bfloat16', " \
      "'float32')"
  with pytest.raises(ValueError, match="head_dim 16"):
    rat_kernel.rat_attention(q, k, v, k, v, 0, chunk_size=4, scale=1.0)


@pytest.mark.slow
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, TOL32), (jnp.bfloat16, TOL16)])
def test_head_dim_128_long(rng, dtype, tol):
  """D = 128 over several query and summary blocks of the full-size configs."""
  q, k, v, f = (jnp.asarray(x, dtype) for x in inputs(rng, 1, 600, 2, 1, 128))
  cotangent = randn(rng, *q.shape)
  run = lambda impl: jax.value_and_grad(
      lambda *xs: jnp.sum(rat(*xs, chunk_size=8, impl=impl)[0].astype(jnp.float32) * cotangent),
      (0, 1, 2, 3))
  o = rat(q, k, v, f, chunk_size=8, impl="pallas")[0]
  assert_rel_close(o, oracle(q, k, v, f, 8)[0], tol, "o")
  _, grads = run("pallas")(q, k, v, f)
  _, grads_xla = run("xla")(*(jnp.asarray(x, jnp.float32) for x in (q, k, v, f)))
  for name, g, g_xla in zip("qkvf", grads, grads_xla):
    assert_rel_close(g, g_xla, tol, f"d{name}")
