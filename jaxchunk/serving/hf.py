"""Loading a Llama-style Hugging Face checkpoint folder (config.json + *.safetensors) as a jaxchunk
attention model, so the engine serves a real architecture.

The Llama block is exactly `LanguageModel`'s with global attention layers: pre-RMSNorm, GQA
attention with "rotate half" RoPE, SwiGLU MLP, final RMSNorm, tied or untied head. Llama variants
this loader does not implement (rope_scaling, attention or MLP biases, other activations) are
rejected with a ValueError rather than loaded wrongly. The safetensors files are read with NumPy
(F32, F16, BF16), so neither torch nor the safetensors package is needed.
"""

from __future__ import annotations

import json
import os

import numpy as np

from jaxchunk.config import ModelConfig

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


def read_safetensors(path: str) -> dict[str, np.ndarray]:
  """All tensors of one .safetensors file as float32 NumPy arrays."""
  with open(path, "rb") as f:
    header_size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_size))
    data = f.read()
  tensors = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in _DTYPES:
      raise ValueError(f"{path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    raw = np.frombuffer(data[start:end], _DTYPES[info["dtype"]]).reshape(info["shape"])
    if info["dtype"] == "BF16":
      raw = (raw.astype(np.uint32) << 16).view(np.float32)
    tensors[name] = raw.astype(np.float32)
  return tensors


def llama_config(hf_config: dict, **overrides) -> ModelConfig:
  """The `ModelConfig` of a Llama config.json (a dict); `overrides` set e.g. dtype or impl."""
  if hf_config.get("rope_scaling"):
    raise ValueError(f"rope_scaling {hf_config['rope_scaling']} is not supported")
  # transformers >= 5 writes {"rope_parameters": {"rope_theta": ..., "rope_type": ...}} instead.
  rope = hf_config.get("rope_parameters") or {}
  if rope.get("rope_type", "default") != "default":
    raise ValueError(f"rope_parameters {rope} is not supported (only rope_type 'default')")
  rope_theta = float(rope.get("rope_theta", hf_config.get("rope_theta", 1e4)))
  if hf_config.get("attention_bias") or hf_config.get("mlp_bias"):
    raise ValueError("attention_bias / mlp_bias checkpoints are not supported")
  if hf_config.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act must be silu, got {hf_config['hidden_act']!r}")
  heads = hf_config["num_attention_heads"]
  fields = dict(
      vocab_size=hf_config["vocab_size"], d_model=hf_config["hidden_size"],
      layer_pattern=("attention",) * hf_config["num_hidden_layers"], num_heads=heads,
      num_kv_heads=hf_config.get("num_key_value_heads", heads),
      head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads,
      mlp_hidden=hf_config["intermediate_size"], rope_theta=rope_theta,
      norm_eps=float(hf_config.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf_config.get("tie_word_embeddings", False)))
  fields.update(overrides)
  return ModelConfig(**fields)


def llama_params(tensors: dict[str, np.ndarray], config: ModelConfig) -> dict:
  """Flax params of `LanguageModel(config)` from HF Llama tensors (torch [out, in] layout)."""
  h, hk, dh, d = config.num_heads, config.num_kv_heads, config.head_dim, config.d_model

  def take(name):
    if name not in tensors:
      raise ValueError(f"checkpoint lacks tensor {name}")
    return tensors[name]

  params = {"embed": {"embedding": take("model.embed_tokens.weight")},
            "final_norm": {"scale": take("model.norm.weight")}}
  for i in range(config.num_layers):
    prefix = f"model.layers.{i}."
    attn = lambda n: take(prefix + f"self_attn.{n}.weight").T
    mlp = lambda n: {"kernel": take(prefix + f"mlp.{n}.weight").T}
    params[f"block_{i}"] = {
        "mixer_norm": {"scale": take(prefix + "input_layernorm.weight")},
        "mlp_norm": {"scale": take(prefix + "post_attention_layernorm.weight")},
        "mixer": {"q_proj": {"kernel": attn("q_proj").reshape(d, h, dh)},
                  "k_proj": {"kernel": attn("k_proj").reshape(d, hk, dh)},
                  "v_proj": {"kernel": attn("v_proj").reshape(d, hk, dh)},
                  "o_proj": {"kernel": attn("o_proj").reshape(h, dh, d)}},
        "mlp": {"gate": mlp("gate_proj"), "up": mlp("up_proj"), "down": mlp("down_proj")}}
  if not config.tie_embeddings:
    params["lm_head"] = {"kernel": take("lm_head.weight").T}
  dtype = np.dtype(config.param_dtype)
  return _map(lambda x: np.ascontiguousarray(x, dtype), params)


def _map(fn, tree):
  return {k: _map(fn, v) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def load_llama(folder: str, **overrides) -> tuple[ModelConfig, dict]:
  """(config, {"params": ...}) of the Llama checkpoint in `folder` (config.json, *.safetensors)."""
  with open(os.path.join(folder, "config.json")) as f:
    hf_config = json.load(f)
  config = llama_config(hf_config, **overrides)
  files = sorted(name for name in os.listdir(folder) if name.endswith(".safetensors"))
  if not files:
    raise ValueError(f"no .safetensors files in {folder}")
  tensors = {}
  for name in files:
    tensors.update(read_safetensors(os.path.join(folder, name)))
  return config, {"params": llama_params(tensors, config)}
