"""Config presets, `--set` overrides and the JSON round trip."""

import dataclasses

import pytest

import configs
from configs import RunConfig


def test_every_preset_loads_and_is_a_run_config():
  presets = configs.list_presets()
  expected = {"quickstart"} | {f"{kind}_{size}" for kind in
                               ("attention", "rat", "rat_local", "gla", "gated_deltanet")
                               for size in ("125m", "350m", "1b3")}
  assert expected <= set(presets)
  for name in presets:
    config = configs.load_config(name)
    assert isinstance(config, RunConfig), name
  assert configs.load_config("rat_local_350m").model.layer_pattern == ("rat", "local") * 12
  assert configs.load_config("gated_deltanet_1b3").model.d_model == 2048


def test_overrides_parse_by_field_type():
  config = configs.load_config("quickstart", [
      "model.d_model=128", "optim.lr=1e-3", "data.model_segment_ids=true",
      "model.layer_pattern=rat,local,attention", "data.paths=['a', 'b']", "run.sample_prompt=x=1"])
  assert config.model.d_model == 128
  assert config.optim.lr == 1e-3
  assert config.data.model_segment_ids is True
  assert config.model.layer_pattern == ("rat", "local", "attention")
  assert config.data.paths == ("a", "b")
  assert config.run.sample_prompt == "x=1"
  # applied together, then validated: heads may shrink below the preset's kv heads in one go
  small = configs.load_config("quickstart", ["model.num_heads=2", "model.num_kv_heads=2"])
  assert (small.model.num_heads, small.model.num_kv_heads) == (2, 2)


@pytest.mark.parametrize("assignment, match", [
    ("model.nope=1", "no field 'nope'"),
    ("nope.x=1", "is not a section"),
    ("model=1", "names a section"),
    ("model.d_model", "section.field=value"),
    ("data.model_segment_ids=maybe", "boolean"),
    ("model.layer_pattern=rat,bogus", "unknown mixer"),
])
def test_bad_overrides_raise(assignment, match):
  with pytest.raises(ValueError, match=match):
    configs.load_config("quickstart", [assignment])


def test_unknown_preset_raises():
  with pytest.raises(ValueError, match="unknown config preset"):
    configs.load_config("no_such_preset")


def test_json_round_trip(tmp_path):
  config = configs.load_config("rat_local_125m", ["data.paths=x,y", "run.steps=7"])
  path = tmp_path / "config.json"
  configs.save_config(config, str(path))
  restored = configs.config_from_json(str(path))
  assert restored == config
  assert dataclasses.asdict(restored) == dataclasses.asdict(config)
