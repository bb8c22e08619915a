"""The language-model configuration: one dataclass, a layer pattern mixing token mixers.

It sits at the top of the package because both `jaxchunk.layers` and `jaxchunk.models` read it.
"""

from __future__ import annotations

import dataclasses

# Token mixers a layer pattern may name.
ATTENTION_KINDS = ("attention", "local")
REMAT_MODES = ("none", "block", "block_dots")
LINEAR_KINDS = ("simple_gla", "gla", "delta_rule", "gated_delta_rule", "kda", "mlstm")
MIXER_KINDS = ATTENTION_KINDS + ("rat",) + LINEAR_KINDS


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """A decoder-only language model: embedding, `layer_pattern` blocks, final norm, LM head.

  Each block is pre-norm: x + mixer(norm(x)), then x + SwiGLU(norm(x)). `layer_pattern` names the
  mixer of each block, e.g. ("rat", "local") * 6: "attention" (global causal softmax attention),
  "local" (sliding window of `window` tokens), "rat", or a linear family from `LINEAR_KINDS`.
  """

  vocab_size: int = 256
  d_model: int = 256
  layer_pattern: tuple[str, ...] = ("rat", "local") * 2
  num_heads: int = 4
  num_kv_heads: int = 4            # GQA for attention/RAT when < num_heads
  head_dim: int = 64
  mlp_hidden: int = 768            # SwiGLU hidden width
  window: int = 128                # "local" layers: keys within `window` positions back
  rat_chunk_size: int = 16
  linear_chunk_size: int = 64      # chunk of the xla/pallas paths of linear layers
  conv_size: int = 4               # short causal convolution of linear layers
  rope_theta: float = 10000.0
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  dtype: str = "float32"           # activation/compute dtype ("bfloat16" for speed)
  param_dtype: str = "float32"
  impl: str = "auto"               # op implementation for every mixer
  remat: str = "none"              # per-block rematerialisation in training: "none" | "block"
  #                                  (a block keeps only its input) | "block_dots" (and its matmuls)

  def __post_init__(self):
    object.__setattr__(self, "layer_pattern", tuple(self.layer_pattern))
    for kind in self.layer_pattern:
      if kind not in MIXER_KINDS:
        raise ValueError(f"layer_pattern: unknown mixer {kind!r}; expected one of {MIXER_KINDS}")
    if self.remat not in REMAT_MODES:
      raise ValueError(f"remat must be one of {REMAT_MODES}, got {self.remat!r}")
    if not self.layer_pattern:
      raise ValueError("layer_pattern must name at least one layer")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_kv_heads ({self.num_kv_heads}) must divide num_heads ({self.num_heads})")
    for name in ("vocab_size", "d_model", "num_heads", "head_dim", "mlp_hidden", "window",
                 "rat_chunk_size", "linear_chunk_size", "conv_size"):
      if getattr(self, name) <= 0:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

  @property
  def num_layers(self) -> int:
    return len(self.layer_pattern)
