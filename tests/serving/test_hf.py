"""Loading a Llama-style safetensors folder: logits vs a float64 NumPy Llama forward (and vs Hugging
Face transformers when torch and transformers are installed), and the engine serving it."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.models.language_model import LanguageModel
from jaxchunk.serving import Engine, EngineConfig, SamplingParams
from jaxchunk.serving.hf import llama_config, load_llama
from tests.utils import assert_rel_close, randn

HF_CONFIG = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=48, rope_theta=500.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, hidden_act="silu", max_position_embeddings=64,
                 architectures=["LlamaForCausalLM"], model_type="llama")


def write_safetensors(path, tensors):
  """A minimal safetensors writer (float32)."""
  header, offset, blobs = {}, 0, []
  for name, x in tensors.items():
    blob = np.ascontiguousarray(x, np.float32).tobytes()
    header[name] = {"dtype": "F32", "shape": list(x.shape), "data_offsets": [offset, offset + len(blob)]}
    offset += len(blob)
    blobs.append(blob)
  raw = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(len(raw).to_bytes(8, "little") + raw + b"".join(blobs))


def random_llama(rng):
  c = HF_CONFIG
  d, h, hk, i = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"], c["intermediate_size"]
  dh = d // h
  w = {"model.embed_tokens.weight": randn(rng, c["vocab_size"], d),
       "model.norm.weight": 1 + randn(rng, d, scale=0.1), "lm_head.weight": randn(rng, c["vocab_size"], d, scale=0.2)}
  for layer in range(c["num_hidden_layers"]):
    p = f"model.layers.{layer}."
    w.update({p + "input_layernorm.weight": 1 + randn(rng, d, scale=0.1),
              p + "post_attention_layernorm.weight": 1 + randn(rng, d, scale=0.1),
              p + "self_attn.q_proj.weight": randn(rng, h * dh, d, scale=0.2),
              p + "self_attn.k_proj.weight": randn(rng, hk * dh, d, scale=0.2),
              p + "self_attn.v_proj.weight": randn(rng, hk * dh, d, scale=0.2),
              p + "self_attn.o_proj.weight": randn(rng, d, h * dh, scale=0.2),
              p + "mlp.gate_proj.weight": randn(rng, i, d, scale=0.2),
              p + "mlp.up_proj.weight": randn(rng, i, d, scale=0.2),
              p + "mlp.down_proj.weight": randn(rng, d, i, scale=0.2)})
  return w


def numpy_llama(w, tokens):
  """float64 Llama forward of HF's modeling_llama (rotate-half RoPE, GQA, SwiGLU)."""
  c = HF_CONFIG
  w = {k: v.astype(np.float64) for k, v in w.items()}
  h, hk = c["num_attention_heads"], c["num_key_value_heads"]
  dh = c["hidden_size"] // h
  t = len(tokens)
  norm = lambda x, g: x / np.sqrt((x * x).mean(-1, keepdims=True) + c["rms_norm_eps"]) * g
  inv = c["rope_theta"] ** (-np.arange(0, dh, 2) / dh)
  ang = np.arange(t)[:, None] * inv
  cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
  rot = lambda x: x * cos[:, None] + np.concatenate([-x[..., dh // 2:], x[..., :dh // 2]], -1) * sin[:, None]
  x = w["model.embed_tokens.weight"][tokens]
  for layer in range(c["num_hidden_layers"]):
    p = f"model.layers.{layer}."
    y = norm(x, w[p + "input_layernorm.weight"])
    q = rot((y @ w[p + "self_attn.q_proj.weight"].T).reshape(t, h, dh))
    k = rot((y @ w[p + "self_attn.k_proj.weight"].T).reshape(t, hk, dh))
    v = (y @ w[p + "self_attn.v_proj.weight"].T).reshape(t, hk, dh)
    k, v = np.repeat(k, h // hk, 1), np.repeat(v, h // hk, 1)
    s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(dh) + np.triu(np.full((t, t), -np.inf), 1)
    a = np.exp(s - s.max(-1, keepdims=True))
    o = np.einsum("hqk,khd->qhd", a / a.sum(-1, keepdims=True), v).reshape(t, h * dh)
    x = x + o @ w[p + "self_attn.o_proj.weight"].T
    y = norm(x, w[p + "post_attention_layernorm.weight"])
    gate = y @ w[p + "mlp.gate_proj.weight"].T
    x = x + (gate / (1 + np.exp(-gate)) * (y @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
  return norm(x, w["model.norm.weight"]) @ w["lm_head.weight"].T


@pytest.fixture
def llama_folder(rng, tmp_path):
  weights = random_llama(rng)
  (tmp_path / "config.json").write_text(json.dumps(HF_CONFIG))
  write_safetensors(tmp_path / "model.safetensors", weights)
  return tmp_path, weights


def test_logits_match_numpy_llama_and_engine_serves_it(rng, llama_folder):
  folder, weights = llama_folder
  config, variables = load_llama(str(folder))
  model = LanguageModel(config)
  tokens = rng.integers(0, HF_CONFIG["vocab_size"], size=20)
  logits = model.apply(variables, jnp.asarray(tokens[None], jnp.int32))[0][0]
  ref = numpy_llama(weights, tokens)
  assert_rel_close(logits, ref, 1e-5, "llama logits")

  engine = Engine(model, variables, EngineConfig(num_slots=2, max_len=32, page_size=8, chunk_size=8))
  out = engine.generate([list(tokens[:12])], SamplingParams(max_tokens=4))[0]
  seq = list(tokens[:12])
  for _ in range(4):
    seq.append(int(np.argmax(numpy_llama(weights, np.array(seq))[-1])))
  assert out.tokens == seq[12:]


def test_matches_transformers(llama_folder, rng):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  folder, weights = llama_folder
  hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG))
  hf.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()}, strict=False)
  tokens = rng.integers(0, HF_CONFIG["vocab_size"], size=20)
  ref = hf(torch.from_numpy(tokens[None])).logits[0].detach().numpy()
  config, variables = load_llama(str(folder))
  logits = LanguageModel(config).apply(variables, jnp.asarray(tokens[None], jnp.int32))[0][0]
  assert_rel_close(logits, ref, 1e-5, "vs transformers")


def test_rejects_unsupported_llama_variants():
  with pytest.raises(ValueError, match="rope_scaling"):
    llama_config({**HF_CONFIG, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}})
  with pytest.raises(ValueError, match="hidden_act"):
    llama_config({**HF_CONFIG, "hidden_act": "gelu"})
  with pytest.raises(ValueError, match="rope_parameters"):
    llama_config({**HF_CONFIG, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}})


def test_reads_rope_theta_of_transformers_5_configs():
  """transformers >= 5 nests rope_theta under rope_parameters."""
  nested = {k: v for k, v in HF_CONFIG.items() if k != "rope_theta"}
  nested["rope_parameters"] = {"rope_theta": 123.0, "rope_type": "default"}
  assert llama_config(nested).rope_theta == 123.0
  assert llama_config(HF_CONFIG).rope_theta == HF_CONFIG["rope_theta"]
