"""The benchmarks' wall-clock timer: the median of timed calls after warm-up calls.

The scripts run as `python bench/<script>.py`, which puts bench/ on sys.path:
`from timing import median_seconds`.
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp


def wall_seconds(fn, *args) -> float:
  """Wall seconds of one call `fn(*args)`, waiting for its outputs (`jax.block_until_ready`)."""
  start = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - start


def median_seconds(fn, *args, repeats: int = 10, warmup: int = 1,
                   slow_call_s: float | None = None, slow_repeats: int = 3) -> float:
  """Median wall seconds of `fn(*args)` over `repeats` timed calls after `warmup` (>= 1) others.

  The warm-up calls compile and fill caches. With `slow_call_s`, a last warm-up call slower than
  that many seconds cuts the timed calls to min(repeats, slow_repeats).
  """
  if warmup < 1:
    raise ValueError(f"warmup must be >= 1, got {warmup}")
  for _ in range(warmup):
    last = wall_seconds(fn, *args)
  if slow_call_s is not None and last > slow_call_s:
    repeats = min(repeats, slow_repeats)
  return statistics.median(wall_seconds(fn, *args) for _ in range(repeats))


def call_loop(fn, calls: int):
  """A jitted `loop(*args)` that calls `fn(*args)` `calls` times in one `fori_loop`, so that one
  launch and host dispatch spread over the calls (short kernels are timed without the ~50 us a
  standalone call adds).

  The first argument is carried through the loop behind an `optimization_barrier` together with
  a running sum of one element of every output array of each call, so that no call can be hoisted
  out of the loop and no output (e.g. one of several gradients) can be removed, at no memory
  traffic of its own.
  """
  @jax.jit
  def loop(first, *rest):
    def body(_, carry):
      x, total = carry
      leaves = jax.tree.leaves(fn(x, *rest))
      probe = sum(leaf.ravel()[0].astype(jnp.float32) for leaf in leaves)
      return jax.lax.optimization_barrier((x, total + probe))
    return jax.lax.fori_loop(0, calls, body, (first, jnp.float32(0)))
  return loop
