"""Trains several presets on the same tokens and plots validation loss against tokens and wall time.

  python launch/compare.py --configs quickstart,rat_local_125m --set run.steps=100 --workdir runs/cmp

Each preset trains in `<workdir>/<preset>` with the shared `--set` overrides (same data section,
seed and step count, so every model sees the same batches); Mixture-of-Recursions presets
(`mor_*`, which define `MOR`) train their MoR model. compare.png holds two panels: validation
bits/byte against training tokens and against wall-clock seconds.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import configs  # noqa: E402  (after making the repository importable)

CONFIGS = flags.DEFINE_list("configs", ["quickstart"], "presets to train, comma-separated")
SET = flags.DEFINE_multi_string("set", [], "override applied to every preset: section.field=value")
WORKDIR = flags.DEFINE_string("workdir", None, "folder of the runs and compare.png", required=True)


def validation_curve(workdir: str) -> list[dict]:
  """The records with a validation loss from a run's metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if "val_bits_per_byte" in r]


def plot_comparison(curves: dict[str, list[dict]], path: str) -> None:
  """Validation bits/byte against tokens (left) and wall seconds (right), one line per run."""
  from matplotlib.figure import Figure

  fig = Figure(figsize=(12, 4.5))
  by_tokens, by_time = fig.subplots(1, 2, sharey=True)
  for name, records in curves.items():
    losses = [r["val_bits_per_byte"] for r in records]
    by_tokens.plot([r["tokens"] for r in records], losses, "o-", label=name)
    by_time.plot([r["wall_s"] for r in records], losses, "o-", label=name)
  by_tokens.set_xlabel("training tokens")
  by_time.set_xlabel("wall time (s)")
  by_tokens.set_ylabel("validation loss (bits per byte)")
  for ax in (by_tokens, by_time):
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)


def compare(presets, overrides, workdir: str, *, devices=None) -> dict[str, dict]:
  """Trains each preset (a Mixture-of-Recursions one around its stack) with `overrides` in
  `<workdir>/<preset>` on `devices` (default all), plots compare.png; returns each preset's
  trainer summary."""
  import jax
  from jaxchunk.training.trainer import Trainer

  summaries, curves = {}, {}
  for name in presets:
    run_dir = os.path.join(workdir, name)
    trainer = Trainer(configs.load_config(name, overrides), run_dir, devices=devices,
                      mor=configs.load_mor(name))
    summaries[name] = trainer.train()
    trainer.close()
    curves[name] = validation_curve(run_dir)
    if jax.process_index() == 0:
      print(f"{name}: {summaries[name]['num_params'] / 1e6:.2f}M params, validation "
            f"{summaries[name]['val_bits_per_byte']:.3f} bits/byte", flush=True)
  if jax.process_index() == 0:
    path = os.path.join(workdir, "compare.png")
    plot_comparison(curves, path)
    print(f"wrote {path}", flush=True)
  return summaries


def main(argv) -> None:
  del argv
  compare(CONFIGS.value, SET.value, WORKDIR.value)


if __name__ == "__main__":
  app.run(main)
