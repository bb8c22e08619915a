"""bench/linear_kernels.py's keeping of Triton autotune choices between runs, and bench/timing.py's
reading of profiler traces (the GPU parts run on the device machine only)."""

import os

import pytest


BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


def test_copy_autotune_copies_only_new_choices(tmp_path, monkeypatch):
  monkeypatch.syspath_prepend(BENCH)
  import linear_kernels  # noqa: PLC0415 (bench/ is not a package)
  cache, kept = tmp_path / "cache", tmp_path / "kept"
  for folder, files in {"A1": ["chunk_fwd.autotune.json", "chunk_fwd.cubin"],
                        "B2": ["chunk_bwd.autotune.json", "chunk_bwd.json"]}.items():
    (cache / folder).mkdir(parents=True)
    for name in files:
      (cache / folder / name).write_text(f"{folder}/{name}")
  assert linear_kernels.copy_autotune(str(cache), str(kept)) == 2
  found = sorted(os.path.relpath(os.path.join(d, f), kept) for d, _, fs in os.walk(kept) for f in fs)
  assert found == ["A1/chunk_fwd.autotune.json", "B2/chunk_bwd.autotune.json"]
  assert (kept / "A1" / "chunk_fwd.autotune.json").read_text() == "A1/chunk_fwd.autotune.json"
  # A second run's cache, seeded from `kept`, adds one choice: only that one is new.
  (cache / "C3").mkdir()
  (cache / "C3" / "chunk_dh.autotune.json").write_text("C3")
  (cache / "A1" / "chunk_fwd.autotune.json").write_text("changed")
  assert linear_kernels.copy_autotune(str(cache), str(kept)) == 1
  assert (kept / "A1" / "chunk_fwd.autotune.json").read_text() == "A1/chunk_fwd.autotune.json"
  assert linear_kernels.copy_autotune(str(tmp_path / "missing"), str(kept)) == 0


def test_kernel_totals_sums_gpu_events_only(monkeypatch):
  """bench/timing.py's profile reading: complete events of GPU processes, summed per kernel."""
  monkeypatch.syspath_prepend(BENCH)
  import timing  # noqa: PLC0415
  events = [
      {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": 3, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": 7, "name": "delta_rule_fwd", "dur": 1500.0},
      {"ph": "X", "pid": 7, "name": "delta_rule_fwd", "dur": 500.0},
      {"ph": "X", "pid": 7, "name": "gemm_fusion", "dur": 250.0},
      {"ph": "X", "pid": 3, "name": "host_work", "dur": 9000.0},
      {"ph": "i", "pid": 7, "name": "marker"},
  ]
  assert timing.kernel_totals(events) == {"delta_rule_fwd": 2.0, "gemm_fusion": 0.25}
  assert timing.host_totals(events) == {"host_work": (9.0, 1)}
  # Two calls on the GPU: spans end at idle gaps over 300 us; spans under 10 us are transfers.
  two_calls = events[:2] + [
      {"ph": "X", "pid": 7, "name": "a", "ts": 0.0, "dur": 100.0},
      {"ph": "X", "pid": 7, "name": "b", "ts": 105.0, "dur": 95.0},     # first call: 0.2 ms
      {"ph": "X", "pid": 7, "name": "MemcpyD2H", "ts": 700.0, "dur": 2.0},
      {"ph": "X", "pid": 7, "name": "a", "ts": 5000.0, "dur": 150.0},
      {"ph": "X", "pid": 7, "name": "b", "ts": 5160.0, "dur": 240.0},   # second call: 0.4 ms
      {"ph": "X", "pid": 3, "name": "host_work", "ts": 0.0, "dur": 9000.0}]
  summary = timing.launch_summary(two_calls, calls=2)
  assert summary["launches"] == 2.5 and summary["span_ms"] == pytest.approx(0.3)
  assert summary["busy_ms"] == pytest.approx(0.2935)


def test_profile_pallas_runs_on_cpu(monkeypatch):
  """--profile's path end to end on CPU (interpret-mode kernels; no GPU events, so no rows)."""
  monkeypatch.syspath_prepend(BENCH)
  import linear_kernels  # noqa: PLC0415
  monkeypatch.setattr(linear_kernels, "TOKENS", 128)
  assert linear_kernels.profile_pallas("simple_gla", 64, "fwd", calls=1) == {}
