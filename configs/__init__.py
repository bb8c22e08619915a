"""Typed run configurations: model / data / optim / mesh / run sections, presets and overrides.

A preset is a module of this package (one file each, e.g. `configs/quickstart.py`) that defines
`CONFIG: RunConfig`. `load_config("quickstart", ["model.d_model=128", "run.steps=50"])` returns the
preset with `--set`-style overrides applied (`apply_overrides`); a Mixture-of-Recursions preset
also defines `MOR` (`load_mor`). `save_config` writes the resolved config as JSON beside a run and
`config_from_json` reads it back.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import json
import pkgutil
import typing

from jaxchunk.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where tokens come from and how they are packed into [batch, seq_len] rows.

  `source` is "stdlib" (the running interpreter's standard-library .py files: needs no download),
  "text" (the files and folders in `paths`), "array_record" (`paths` of ArrayRecord files holding
  one document per record) or "parquet" (`paths` of Parquet files, or folders of them: one document
  per row, the string or binary column `column`). Tokens are bytes (vocabulary 256); every document is followed by the
  separator byte `eos_id`. With `model_segment_ids` the model gets `segment_ids` and per-document
  positions (every mixer keeps documents apart); without, it sees each row as one stream with
  positions 0..seq_len-1.
  """

  source: str = "stdlib"
  paths: tuple[str, ...] = ()
  column: str = "text"             # the Parquet column holding the documents
  seq_len: int = 256
  global_batch_size: int = 16
  validation_fraction: float = 0.05
  eos_id: int = 0
  model_segment_ids: bool = False
  seed: int = 0


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warm-up then cosine decay to `end_lr_ratio * lr`, global-norm clipping."""

  lr: float = 3e-3
  warmup_steps: int = 50
  end_lr_ratio: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  grad_accum_steps: int = 1        # micro-batches per step (the batch is split, grads averaged)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh axis sizes; one axis may be -1 (all remaining devices)."""

  data: int = -1
  fsdp: int = 1
  tensor: int = 1
  sequence: int = 1


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  """The training loop: length, evaluation, checkpoints, logging and sampling."""

  steps: int = 1000
  seed: int = 0
  eval_every: int = 200
  eval_batches: int = 4
  checkpoint_every: int = 200
  keep_checkpoints: int = 2
  async_checkpoints: bool = True
  log_every: int = 10
  remat: str = "none"               # whole-forward policy "none" | "dots" (see also model.remat)
  peak_flops_per_device: float = 0.0  # for MFU; 0 looks the device kind up (unknown -> no MFU)
  sample_prompt: str = "def "
  sample_len: int = 200
  sample_temperature: float = 0.8


@dataclasses.dataclass(frozen=True)
class RunConfig:
  """Everything one training run needs; each section is overridable with `--set section.field=v`."""

  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  mesh: MeshConfig = MeshConfig()
  run: LoopConfig = LoopConfig()


# Nominal sizes of the large presets (GPT-3 family shapes; byte vocabulary, so fewer embedding params).
SIZES = {
    "125m": dict(d_model=768, num_layers=12, num_heads=12, head_dim=64, mlp_hidden=2048),
    "350m": dict(d_model=1024, num_layers=24, num_heads=16, head_dim=64, mlp_hidden=2816),
    "1b3": dict(d_model=2048, num_layers=24, num_heads=16, head_dim=128, mlp_hidden=5632),
}


def sized_preset(size: str, pattern_unit: tuple[str, ...], **model_fields) -> RunConfig:
  """A large preset: `SIZES[size]` with the layer pattern `pattern_unit` repeated to its depth.

  Trains bf16 on T=4096 rows with FSDP over all devices, each block rematerialised in the
  backward except its matmul outputs (`model.remat="block_dots"`; 1.3B: `"block"`, only block
  inputs kept); `model_fields` override model fields.
  """
  shape = dict(SIZES[size])
  num_layers = shape.pop("num_layers")
  if num_layers % len(pattern_unit):
    raise ValueError(f"{size}: {num_layers} layers is not a multiple of the pattern {pattern_unit}")
  model = ModelConfig(layer_pattern=pattern_unit * (num_layers // len(pattern_unit)),
                      num_kv_heads=shape["num_heads"], window=512, dtype="bfloat16",
                      **{"remat": "block" if size == "1b3" else "block_dots", **shape,
                         **model_fields})
  return RunConfig(
      model=model,
      data=DataConfig(seq_len=4096, global_batch_size=64),
      optim=OptimConfig(lr=3e-4 if size == "1b3" else 6e-4, warmup_steps=1000),
      mesh=MeshConfig(data=1, fsdp=-1),
      run=LoopConfig(steps=20000, eval_every=1000, eval_batches=16, checkpoint_every=1000,
                     keep_checkpoints=3, log_every=50))


def _parse_value(text: str, current):
  """Parses the override `text` for a field whose current value is `current`."""
  if isinstance(current, bool):
    lowered = text.strip().lower()
    if lowered not in ("true", "false", "1", "0"):
      raise ValueError(f"expected a boolean (true/false), got {text!r}")
    return lowered in ("true", "1")
  if isinstance(current, tuple):
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = tuple(part.strip() for part in text.split(",") if part.strip())
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
  if isinstance(current, int):
    return int(text)
  if isinstance(current, float):
    return float(text)
  if isinstance(current, str):
    return text
  raise ValueError(f"cannot override a field holding {current!r}")


def apply_overrides(config: RunConfig, assignments: typing.Sequence[str]) -> RunConfig:
  """Returns `config` with `a.b=value` assignments applied in order (values parsed by field type).

  All assignments are applied before the dataclasses are rebuilt (and validated), so related fields
  can change together, e.g. model.num_heads=2 with model.num_kv_heads=2.
  """
  tree = config_to_dict(config)
  for assignment in assignments:
    if "=" not in assignment:
      raise ValueError(f"override {assignment!r} must look like section.field=value")
    dotted, text = assignment.split("=", 1)
    *sections, name = dotted.strip().split(".")
    node = tree
    for section in sections:
      if not isinstance(node.get(section), dict):
        raise ValueError(f"override {dotted!r}: {section!r} is not a section; "
                         f"sections are {sorted(k for k, v in node.items() if isinstance(v, dict))}")
      node = node[section]
    if name not in node:
      raise ValueError(f"override {dotted!r}: no field {name!r}; fields are {sorted(node)}")
    if isinstance(node[name], dict):
      raise ValueError(f"override {dotted!r} names a section; name one of its fields")
    current = tuple(node[name]) if isinstance(node[name], list) else node[name]
    try:
      node[name] = _parse_value(text, current)
    except ValueError as err:
      raise ValueError(f"override {dotted!r}: {err}") from None
  return config_from_dict(tree)


def _preset_module(preset: str):
  try:
    return importlib.import_module(f"configs.{preset}")
  except ModuleNotFoundError as err:
    if err.name != f"configs.{preset}":
      raise
    raise ValueError(f"unknown config preset {preset!r}; presets are {list_presets()}") from None


def load_config(preset: str, overrides: typing.Sequence[str] = ()) -> RunConfig:
  """The `CONFIG` of the preset module `configs.<preset>` with `overrides` applied in order."""
  return apply_overrides(_preset_module(preset).CONFIG, overrides)


def load_mor(preset: str):
  """The preset's `MOR` (a `jaxchunk.models.mor.MoRConfig`), or None if it defines none.

  The trainer replaces its `model` (the shared stack) by the run config's `model`, so `--set
  model.*` overrides apply to it.
  """
  return getattr(_preset_module(preset), "MOR", None)


def list_presets() -> list[str]:
  """Names of the preset modules in this package."""
  return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def config_to_dict(config: RunConfig) -> dict:
  return dataclasses.asdict(config)


def config_from_dict(data: dict) -> RunConfig:
  """Inverse of `config_to_dict` (lists become tuples)."""

  def build(cls, values):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for field in dataclasses.fields(cls):
      if field.name not in values:
        continue
      value = values[field.name]
      hint = hints[field.name]
      if dataclasses.is_dataclass(hint):
        value = build(hint, value)
      elif isinstance(value, list):
        value = tuple(value)
      kwargs[field.name] = value
    return cls(**kwargs)

  return build(RunConfig, data)


def save_config(config: RunConfig, path: str) -> None:
  """Writes the resolved config as JSON."""
  with open(path, "w") as f:
    json.dump(config_to_dict(config), f, indent=2)
    f.write("\n")


def config_from_json(path: str) -> RunConfig:
  with open(path) as f:
    return config_from_dict(json.load(f))
