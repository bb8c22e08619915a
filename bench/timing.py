"""The benchmarks' wall-clock timer: the median of timed calls after warm-up calls.

The scripts run as `python bench/<script>.py`, which puts bench/ on sys.path:
`from timing import median_seconds`.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import statistics
import tempfile
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


def profile_kernels(call, calls: int, *, wait=lambda: None, per_call: float = 1.0,
                    label: str = "call", top: int = 25) -> dict[str, float]:
  """GPU time per `label` (ms: per call / `per_call`) of the `top` costliest kernels (by name)
  over `calls` calls of `call`, from a JAX profiler trace (perfetto JSON: the device events of GPU
  processes; on a machine without a GPU the table is empty). `call()` dispatches the work and may
  return arrays; the trace ends after the last call's outputs and `wait()`'s arrays (e.g. a
  donated cache that each call replaces) are ready. Prints the table and returns it."""
  totals = kernel_totals(trace_events(call, calls, wait=wait))
  ranked = sorted(((name, ms / (calls * per_call)) for name, ms in totals.items()),
                  key=lambda kv: -kv[1])
  print(f"GPU kernel time per {label}: {sum(totals.values()) / (calls * per_call):.3f} ms in "
        f"{len(totals)} kernels",
        flush=True)
  for name, ms in ranked[:top]:
    print(f"  {ms:8.4f} ms  {name[:110]}", flush=True)
  return dict(ranked[:top])


def trace_events(call, calls: int, *, wait=lambda: None) -> list[dict]:
  """The perfetto trace events of `calls` calls of `call` (a JAX profiler trace that ends once
  the last call's outputs and `wait()`'s arrays are ready)."""
  jax.block_until_ready(wait())
  with tempfile.TemporaryDirectory(prefix="jaxchunk_trace_") as folder:
    with jax.profiler.trace(folder, create_perfetto_trace=True):
      for _ in range(calls):
        out = call()
      jax.block_until_ready((out, wait()))
    [path] = glob.glob(os.path.join(folder, "**", "perfetto_trace.json.gz"), recursive=True)
    with gzip.open(path) as f:
      events = json.load(f)
  return events["traceEvents"] if isinstance(events, dict) else events


def _on_idle_device(call, wait):
  """`call`, dispatched only once the previous call's `wait()` arrays are ready."""
  def one_call():
    jax.block_until_ready(wait())
    return call()
  return one_call


# Python frames of starting and stopping the trace itself, left out of `profile_host`'s table.
_TRACE_CONTROL = ("$profiler.py", "$contextlib.py")


def profile_host(call, calls: int, *, wait=lambda: None, label: str = "call",
                 top: int = 30) -> dict[str, tuple[float, float]]:
  """Host time per `label` of the `top` costliest host trace events (by name; inclusive times,
  so a parent's includes its children's) over `calls` calls of `call`: {name: (ms per call,
  events per call)}. Each call is dispatched on an idle device (the previous one waited for), so
  the events are the host's work for one call: JAX's argument handling, XLA's thunks, command
  buffer updates and launches. Prints the table and returns it."""
  totals = host_totals(trace_events(_on_idle_device(call, wait), calls, wait=wait))
  totals = {name: value for name, value in totals.items() if not name.startswith(_TRACE_CONTROL)}
  ranked = sorted(((name, (ms / calls, count / calls)) for name, (ms, count) in totals.items()),
                  key=lambda kv: -kv[1][0])
  print(f"Host trace events per {label} (inclusive ms, events):", flush=True)
  for name, (ms, count) in ranked[:top]:
    print(f"  {ms:8.4f} ms  {count:7.1f}  {name[:110]}", flush=True)
  return dict(ranked[:top])


def host_totals(events: list[dict]) -> dict[str, tuple[float, int]]:
  """(total milliseconds, count) per event name of a perfetto trace's complete ("X") events in
  the processes not named like a GPU."""
  gpu = _gpu_pids(events)
  totals: dict[str, tuple[float, int]] = {}
  for e in events:
    if e.get("ph") == "X" and e.get("pid") not in gpu:
      ms, count = totals.get(e["name"], (0.0, 0))
      totals[e["name"]] = (ms + e.get("dur", 0.0) / 1e3, count + 1)
  return totals


def _gpu_pids(events: list[dict]) -> set:
  """The pids of a perfetto trace's processes named like a GPU ("process_name" metadata)."""
  return {e["pid"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
          and "gpu" in str(e.get("args", {}).get("name", "")).lower()}


def profile_launches(call, calls: int, *, wait=lambda: None, gap_us: float = 300.0) -> dict:
  """How one call of `call` occupies the GPU, over `calls` calls dispatched one at a time on an
  idle device: {"launches": GPU events per call (kernels, and the copies of its inputs and
  outputs), "busy_ms": their summed time per call,
  "span_ms": the median span from a call's first kernel start to its last kernel end}. A span
  ends at an idle gap longer than `gap_us` (a call's own gaps are a few us); spans under 10 us
  (the transfers around a call) are left out. Without GPU events every figure is 0."""
  events = trace_events(_on_idle_device(call, wait), calls, wait=wait)
  return launch_summary(events, calls, gap_us=gap_us)


def launch_summary(events: list[dict], calls: int, *, gap_us: float = 300.0) -> dict:
  """`profile_launches`' figures from a perfetto trace's events of `calls` calls."""
  gpu = _gpu_pids(events)
  kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("pid") in gpu),
                   key=lambda e: e["ts"])
  spans, start, end = [], None, None
  for e in kernels:
    if start is not None and e["ts"] - end > gap_us:
      spans.append((end - start) / 1e3)
      start = None
    start = e["ts"] if start is None else start
    end = e["ts"] + e.get("dur", 0.0) if end is None else max(end, e["ts"] + e.get("dur", 0.0))
  if start is not None:
    spans.append((end - start) / 1e3)
  spans = [span for span in spans if span >= 0.01]
  return {"launches": len(kernels) / calls,
          "busy_ms": sum(e.get("dur", 0.0) for e in kernels) / 1e3 / calls,
          "span_ms": statistics.median(spans) if spans else 0.0}


def kernel_totals(events: list[dict]) -> dict[str, float]:
  """Total milliseconds per kernel name of a perfetto trace's events: the complete ("X") events
  of the processes named like a GPU (the trace's "process_name" metadata)."""
  gpu = _gpu_pids(events)
  totals: dict[str, float] = {}
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in gpu:
      totals[e["name"]] = totals.get(e["name"], 0.0) + e.get("dur", 0.0) / 1e3
  return totals
