"""bench/serve_decode.py and bench/serve_load.py in smoke mode: tiny models on CPU, reports written
as markdown and JSON with finite, positive numbers."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "bench")


def run_smoke(tmp_path, script: str, *args: str, suffix: str = "smoke") -> tuple[str, dict]:
  """Runs bench/<script>.py --smoke `args` --out tmp_path; returns its markdown report and JSON
  results, written as <script>-<date>-<suffix>.md / .json."""
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  proc = subprocess.run([sys.executable, os.path.join(BENCH, f"{script}.py"), "--smoke", *args,
                         "--out", str(tmp_path)], env=env, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  names = sorted(os.listdir(tmp_path))
  assert len(names) == 2 and all(n.startswith(f"{script}-") for n in names), names
  assert [n.removesuffix(".json").removesuffix(".md").endswith(f"-{suffix}") for n in names] == [
      True, True], names
  assert [n.rsplit(".", 1)[1] for n in names] == ["json", "md"]
  with open(tmp_path / names[1]) as f:
    report = f.read()
  with open(tmp_path / names[0]) as f:
    return report, json.load(f)


def assert_positive(row: dict, *keys: str) -> None:
  for key in keys:
    assert math.isfinite(row[key]) and row[key] > 0, (key, row)


def test_serve_decode_smoke(tmp_path):
  report, results = run_smoke(tmp_path, "serve_decode")
  assert "device: 1 x cpu" in report and "## Decode at 64 tokens of context" in report
  rows = results["presets"]
  assert [(r["preset"], r["batch"]) for r in rows] == [("attention_350m", 2), ("rat_local_350m", 2)]
  for row in rows:
    assert_positive(row, "tokens_per_s", "step_ms_p50", "step_ms_p99", "fill_s", "cache_gb",
                    "params_m", "vs_first")
    assert row["step_ms_p50"] <= row["step_ms_p99"]
    assert f"| {row['preset']} |" in report
  assert rows[0]["vs_first"] == 1.0
  assert math.isclose(rows[1]["vs_first"], rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"])
  llama = results["llama"]
  if "skipped" in llama:  # no torch / transformers here (CPU CI)
    assert llama["skipped"].startswith("skipped: ") and llama["skipped"] in report
  else:
    for engine in ("hf", "jaxchunk"):
      assert_positive(llama[engine], "t_new_s", "t_one_s", "decode_tokens_per_s",
                      "end_to_end_tokens_per_s")
    assert_positive(llama, "decode_tokens_per_s_ratio", "end_to_end_tokens_per_s_ratio")
    assert "| jaxchunk Engine |" in report and "| HF generate |" in report


# ~50 s on 2 cores (two engines compile every step shape): in the slow run; the serve_decode smoke
# keeps the serving benchmarks in the default run.
@pytest.mark.slow
def test_serve_load_smoke(tmp_path):
  report, results = run_smoke(tmp_path, "serve_load")
  assert "device: 1 x cpu" in report and "TBT p99 under arrivals / steady TBT p50" in report
  steady = results["steady"]
  assert (steady["slots"], steady["prompt"], steady["steps"]) == (4, 24, 8)
  assert_positive(steady, "tbt_p50_ms", "tbt_p99_ms", "throughput_tok_s")
  for name in ("chunked", "prefill_first"):
    run = results[name]
    assert run["requests"] == 16 and run["output_tokens"] >= 16
    assert run["traces_after_warmup"] == 0
    assert_positive(run, "ttft_p50_ms", "ttft_p99_ms", "tbt_p50_ms", "tbt_p99_ms",
                    "throughput_tok_s", "seconds")
    assert run["ttft_p50_ms"] <= run["ttft_p99_ms"] and run["tbt_p50_ms"] <= run["tbt_p99_ms"]
    assert f"| {name.replace('_', '-')} |" in report
    # both ratios in the run's row: to the steady TBT p50 (the target's) and p99
    assert (f"{run['tbt_p99_ms'] / steady['tbt_p50_ms']:.2f}x | "
            f"{run['tbt_p99_ms'] / steady['tbt_p99_ms']:.2f}x |") in report
  # Chunked prefill runs decodes and a piece in one call; prefill-first never does.
  kinds = {name: results[name]["steps"]["kinds"] for name in ("chunked", "prefill_first")}
  assert {"decode", "mixed"} <= set(kinds["chunked"]) and "mixed" not in kinds["prefill_first"]
  for summary in kinds.values():
    for kind in summary.values():
      assert kind["steps"] > 0 and 0 < kind["p50_ms"] <= kind["p90_ms"] <= kind["p99_ms"]
  slowest = results["chunked"]["steps"]["slowest"]
  assert slowest and all(s["decodes"] > 0 for s in slowest)
  assert [s["wall_ms"] for s in slowest] == sorted((s["wall_ms"] for s in slowest), reverse=True)
  # --call-times (smoke: 2 reps): the decode, and every piece length (chunk 4) alone and mixed.
  calls = results["calls"]
  assert list(calls) == ["decode", "prefill 4", "mixed 4", "prefill 2", "mixed 2", "prefill 1",
                         "mixed 1"]
  for times in calls.values():
    assert 0 < times["dispatch_ms"] <= times["total_ms"] and times["back_to_back_ms"] > 0
  assert "| mixed 4 |" in report and "| chunked | mixed |" in report
  # Both runs replay one trace: same requests, same greedy lengths.
  assert results["chunked"]["output_tokens"] == results["prefill_first"]["output_tokens"]


def test_serve_load_calls_only_smoke(tmp_path):
  """--calls-only: the decode and the longest mixed call timed alone, no trace, XLA_FLAGS in the
  report."""
  report, results = run_smoke(tmp_path, "serve_load", "--calls-only", "--host-profile", "2",
                              "--profile", "2", suffix="smoke-calls")
  assert "XLA_FLAGS=''" in report and "device: 1 x cpu" in report
  assert list(results["calls"]) == ["decode", "mixed 4"]
  for times in results["calls"].values():
    assert 0 < times["dispatch_ms"] <= times["total_ms"] and times["back_to_back_ms"] > 0
  assert "| mixed 4 |" in report and "steady" not in results and "chunked" not in results
  # --host-profile: the host's trace events of each call (the jitted call's own among them).
  assert list(results["host_profile"]) == ["decode", "mixed 4"]
  for events in results["host_profile"].values():
    assert events and all(ms >= 0 and count > 0 for ms, count in events.values())
  assert "Costliest host trace events of the mixed 4 call" in report
  # --profile: no GPU events on CPU, so no launches; the table still names both calls.
  assert list(results["launches"]) == ["decode", "mixed 4"] and "| decode | 0 |" in report


def test_serve_load_step_summary_splits_decodes_by_the_step_before(monkeypatch):
  monkeypatch.syspath_prepend(BENCH)
  import serve_load  # noqa: PLC0415 (bench/ is not a package)
  kinds = ["decode", "mixed", "decode", "decode", "prefill", "decode", "decode"]
  walls = [2.0, 5.0, 4.0, 2.5, 9.0, 3.5, 2.2]
  steps = [{"kind": k, "wall_ms": w, "decodes": int(k != "prefill"), "pieces": [],
            "parts_ms": {"dispatch": 0.5 * w, "fetch": 0.25 * w}} for k, w in zip(kinds, walls)]
  summary = serve_load.step_summary(steps, slowest=2)["kinds"]
  assert summary["decode"]["steps"] == 5
  assert summary["decode after decode"]["steps"] == 2  # steps 3 and 6
  assert summary["decode after decode"]["p50_ms"] == pytest.approx((2.5 + 2.2) / 2)
  assert summary["decode after mixed/prefill"]["steps"] == 2  # steps 2 and 5
  assert summary["decode after mixed/prefill"]["p50_ms"] == pytest.approx((4.0 + 3.5) / 2)
  assert summary["prefill"]["steps"] == 1 and summary["mixed"]["p99_ms"] == 5.0
  parts = summary["decode after decode"]["parts_p50_p99_ms"]
  assert parts["dispatch"][0] == pytest.approx((2.5 + 2.2) / 4)
  assert parts["fetch"][1] == pytest.approx(0.25 * np.percentile([2.5, 2.2], 99))


def test_serve_decode_lists_out_of_memory_and_goes_on(monkeypatch):
  """A (preset, batch) that runs out of device memory is an OOM row; later batches and presets
  still run, and ratios are left out where either side ran out."""
  sys.path.insert(0, BENCH)
  import jax
  import serve_decode

  def fake_throughput(model, variables, *, batch, context, **kwargs):
    if batch == 4 and model.config.layer_pattern[0] == "attention":
      raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate")
    rate = 1000.0 * batch * (3.0 if "rat" in model.config.layer_pattern else 1.0)
    return {"batch": batch, "context": context, "fill_s": 0.5, "step_ms_p50": 2.0,
            "step_ms_p99": 2.5, "device_step_ms": 1.0, "tokens_per_s": rate, "cache_gb": 0.1}

  from jaxchunk.config import ModelConfig  # noqa: PLC0415
  tiny = lambda preset, smoke: ModelConfig(  # noqa: E731 (one-layer models: init compiles fast)
      vocab_size=64, d_model=16, layer_pattern=("rat",) if "rat" in preset else ("attention",),
      num_heads=2, num_kv_heads=1, head_dim=8, mlp_hidden=32, rat_chunk_size=4)
  monkeypatch.setattr(serve_decode, "preset_config", tiny)
  monkeypatch.setattr(serve_decode, "decode_throughput", fake_throughput)
  args = serve_decode.argparse.Namespace(
      presets="attention_350m,rat_local_350m", batches="2,4", smoke=True, seed=0, context=64,
      steps=4, warmup_steps=1, chunk_size=32, page_size=16, decode_steps=2, profile=False,
      pack_projections=True)
  rows = serve_decode.bench_presets(args)
  assert [(r["preset"], r["batch"], "oom" in r) for r in rows] == [
      ("attention_350m", 2, False), ("attention_350m", 4, True),
      ("rat_local_350m", 2, False), ("rat_local_350m", 4, False)]
  assert [r["vs_first"] for r in rows] == [1.0, None, 3.0, None]
  table = serve_decode.render_presets(rows, args)
  assert "| attention_350m | " in table and " | 4 | 64 | OOM |" in table
  assert "rat_local_350m 3.000x at batch 2" in table and "at batch 4" not in table


def test_serve_load_steady_state_fills_whatever_the_piece_cap(monkeypatch):
  """The steady state's prompts go in with pieces of up to chunk_size even where
  `mixed_step_limit` capped the piece of a step that decodes at 1 (at that cap the first slots
  would finish decoding before the last prompt is in); the cap is kept for what follows."""
  monkeypatch.syspath_prepend(BENCH)
  import serve_load  # noqa: PLC0415
  import jax  # noqa: PLC0415
  import jax.numpy as jnp  # noqa: PLC0415
  from jaxchunk.config import ModelConfig  # noqa: PLC0415
  from jaxchunk.models.language_model import LanguageModel  # noqa: PLC0415
  from jaxchunk.serving import Engine, EngineConfig  # noqa: PLC0415

  model = LanguageModel(ModelConfig(vocab_size=64, d_model=16, layer_pattern=("attention",),
                                    num_heads=2, num_kv_heads=1, head_dim=8, mlp_hidden=32))
  variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  engine = Engine(model, variables, EngineConfig(num_slots=3, max_len=48, page_size=8,
                                                 chunk_size=8))
  engine.scheduler.mixed_chunk_size = 1
  steady = serve_load.steady_state(engine, np.random.default_rng(0), prompt_len=24, steps=4,
                                   vocab=64)
  assert (steady["slots"], steady["steps"]) == (3, 4) and steady["tbt_p50_ms"] > 0
  assert engine.scheduler.mixed_chunk_size == 1 and not engine.has_work()
