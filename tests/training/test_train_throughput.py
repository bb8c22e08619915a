"""bench/train_throughput.py in smoke mode: tiny configs train on CPU and the report is written."""

import os
import subprocess
import sys

import pytest

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "..", "bench", "train_throughput.py")

# Runs the script, then fails if it imported the data pipeline (the GPU machine has no grain).
RUN_WITHOUT_GRAIN = """
import runpy, sys
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
loaded = [name for name in ("grain", "jaxchunk.training.data") if name in sys.modules]
assert not loaded, f"the benchmark imported {loaded}"
"""


def run_smoke(tmp_path, *args) -> str:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  subprocess.run([sys.executable, "-c", RUN_WITHOUT_GRAIN, SCRIPT, "--smoke", "--out",
                  str(tmp_path), *args], env=env, check=True, capture_output=True)
  [name] = os.listdir(tmp_path)
  assert name.startswith("train_throughput-") and name.endswith("-smoke.md")
  with open(tmp_path / name) as f:
    return f.read()


def table_rows(report: str) -> list[list[str]]:
  lines = [line for line in report.splitlines() if line.startswith("| ")][1:]
  return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_smoke_reports_throughput_and_ratios(tmp_path):
  report = run_smoke(tmp_path, "--presets", "attention_350m,rat_350m", "--lengths", "64")
  assert "device: 1 x cpu" in report and "bfloat16 compute" in report
  rows = table_rows(report)
  assert [(r[0], r[1]) for r in rows] == [("attention_350m", "64"), ("rat_350m", "64")]
  for preset, _, batch_rows, params, step_ms, tokens_per_s, mfu, ratio in rows:
    assert int(batch_rows) == 4 and float(params) > 0
    assert float(step_ms) > 0 and float(tokens_per_s.replace(",", "")) > 0
    assert mfu == "n/a"                        # no known peak FLOP/s on CPU
  assert rows[0][-1] == "1.00x" and float(rows[1][-1].rstrip("x")) > 0


@pytest.mark.slow
def test_smoke_all_presets_and_lengths(tmp_path):
  rows = table_rows(run_smoke(tmp_path))
  assert [(r[0], r[1]) for r in rows] == [
      (preset, t) for t in ("64", "128") for preset in
      ("attention_350m", "rat_350m", "rat_local_350m")]
  assert all(r[4] != "OOM" for r in rows)
