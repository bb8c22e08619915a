"""Linear-attention token mixers: one Flax module for the six linear-RNN families.

`LinearAttention(config, kind)` follows the layers of flash-linear-attention (fla/layers/*.py):

- "simple_gla": per-head scalar decay g = logsigmoid(W_g x + b) / 16 (GLA's gate logit normaliser).
- "gla": per-channel decay from a rank-16 projection, gk = logsigmoid(W_up W_down x + b) / 16.
- "delta_rule" (DeltaNet): SiLU short convs on q/k/v, L2-normalised q/k, beta = sigmoid(W_b x).
- "gated_delta_rule" (Gated DeltaNet): as DeltaNet plus g = -exp(A_log) * softplus(W_a x + dt_bias).
- "kda" (Kimi Delta Attention): as Gated DeltaNet with a per-channel decay
  gk = -exp(A_log) * softplus(W_up W_down x + dt_bias) and a low-rank sigmoid output gate.
- "mlstm": exponential input gate i = W_i x + b_i, sigmoid forget gate f = W_f x + b_f with b_f
  initialised to linspace(3, 6) over heads (xLSTM).

Every kind projects q [B,T,H,Dh] and k, v [B,T,Hk,Dh] (H = num_heads, Hk = num_kv_heads,
Dh = head_dim), runs the op of `jaxchunk.ops` (chunked `impl=config.impl` over a sequence, the
`<op>_step` decode form for a single token), normalises each head's output with an RMSNorm, gates it
(SiLU, or sigmoid for kda) and projects back to d_model.

Parameters and their logical axes:
  q_proj/kernel [d_model, H, Dh]: ("embed", "heads", "head_dim");
  k_proj, v_proj/kernel [d_model, Hk, Dh]: ("embed", "kv_heads", "head_dim");
  {q,k,v}_conv/kernel [conv_size, H*Dh or Hk*Dh]: ("conv", "heads" or "kv_heads");
  g_proj/kernel [d_model, H, Dh]: ("embed", "heads", "head_dim") (kda: g_down [d_model, Dh]:
    ("embed", None) then g_up [Dh, H, Dh]: (None, "heads", "head_dim") with bias);
  projections to one logit per head ({gk,a,b,i,f}_proj/kernel [d_model, H]): ("embed", "heads"),
    with bias [H]: ("heads",) for gk (simple_gla), i and f (mlstm);
  gla gk_down [d_model, 16]: ("embed", None), gk_up [16, Hk, Dh]: (None, "kv_heads", "head_dim")
    with bias [Hk, Dh];
  kda f_down [d_model, Dh]: ("embed", None), f_up [Dh, H, Dh]: (None, "heads", "head_dim");
  A_log [H]: ("heads",); dt_bias [H] or [H, Dh]: ("heads",) or ("heads", "head_dim");
  o_norm/scale [Dh]: ("head_dim",); o_proj/kernel [H, Dh, d_model]: ("heads", "head_dim", "embed").

The cache is {"state": the op's recurrent state (float32), "conv": {"q", "k", "v"} short-conv caches
(empty for kinds without short convs)}; its size does not grow with the sequence.

Streams (`jaxchunk.layers.streams`, the serving engine's mixed steps): x [1, N, d_model] holds
the tokens of several streams and the cache is a tuple of caches, one per stream; projections and
gates run on all tokens, the short convolutions and the recurrence per stream.

Packed documents (`segment_ids`, training and evaluation forwards, sequence-parallel too): the
op's segment_ids reset the state at every document start, and no short-convolution tap reaches
into an earlier document.

Sequence-parallel (an active `SequenceParallel`, no cache): x is in the layout order of the
sequence axis; the op runs as `SequenceParallel.linear` (per-device chunks combined through their
affine state summaries) and the short convolutions take their halos from the preceding segments.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxchunk.layers import streams as streams_lib
from jaxchunk.layers.conv import ShortConv, init_conv_cache
from jaxchunk.config import LINEAR_KINDS, ModelConfig
from jaxchunk.ops.delta_rule import (delta_rule, delta_rule_step, gated_delta_rule,
                                     gated_delta_rule_step)
from jaxchunk.ops.gla import gla, gla_step
from jaxchunk.ops.kda import kda, kda_step
from jaxchunk.ops.mlstm import mlstm, mlstm_step
from jaxchunk.ops.simple_gla import simple_gla, simple_gla_step
from jaxchunk.parallel.api import SequenceParallel, active_sequence_parallel

GATE_LOGIT_NORMALIZER = 16.0  # GLA: log-decays are logsigmoid(logits) / 16, so near 0 at init.
GLA_GATE_RANK = 16            # GLA: rank of the per-channel decay projection.
DT_MIN, DT_MAX, DT_FLOOR = 1e-3, 1e-1, 1e-4  # Mamba-2 / Gated DeltaNet range of initial time steps.
MLSTM_FORGET_BIAS = (3.0, 6.0)  # xLSTM: forget-gate biases span linspace(3, 6) over heads.


def _dense(x, features: tuple[int, ...], axes: tuple, *, name: str, config: ModelConfig,
           in_axes: tuple = ("embed",), use_bias: bool = False, bias_init=nn.initializers.zeros):
  """A projection of x's last len(in_axes) dims to `features`, with logical axes in_axes + axes."""
  return nn.DenseGeneral(
      features, axis=tuple(range(-len(in_axes), 0)), use_bias=use_bias, name=name,
      dtype=jnp.dtype(config.dtype), param_dtype=jnp.dtype(config.param_dtype),
      kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), in_axes + axes),
      bias_init=nn.with_logical_partitioning(bias_init, axes))(x)


def _param(module: nn.Module, name: str, init, shape: tuple, axes: tuple) -> jax.Array:
  """A float32 view of a parameter with logical axes `axes`."""
  value = module.param(name, nn.with_logical_partitioning(init, axes), shape,
                       jnp.dtype(module.config.param_dtype))
  return value.astype(jnp.float32)


def _a_log_init(low: float, high: float):
  """A_log = log(A) with A ~ U(low, high): per-head decay rates of the Mamba-2 style gates."""
  def init(key, shape, dtype=jnp.float32):
    return jnp.log(jax.random.uniform(key, shape, jnp.float32, low, high)).astype(dtype)
  return init


def _dt_bias_init(key, shape, dtype=jnp.float32):
  """softplus^-1(dt) with dt log-uniform in [DT_MIN, DT_MAX], floored at DT_FLOOR (Mamba-2)."""
  log_dt = jax.random.uniform(key, shape, jnp.float32, math.log(DT_MIN), math.log(DT_MAX))
  dt = jnp.maximum(jnp.exp(log_dt), DT_FLOOR)
  return (dt + jnp.log(-jnp.expm1(-dt))).astype(dtype)


def _forget_bias_init(key, shape, dtype=jnp.float32):
  """xLSTM's forget-gate bias: linspace(3, 6) over heads, so the memory starts long."""
  del key
  return jnp.linspace(*MLSTM_FORGET_BIAS, shape[0], dtype=dtype)


def _head_logits(module, x, name: str, *, use_bias: bool = False,
                 bias_init=nn.initializers.zeros) -> jax.Array:
  """One float32 logit per head, [B,T,H], from a linear projection of x [B,T,d_model]."""
  logits = _dense(x, (module.config.num_heads,), ("heads",), name=name, config=module.config,
                  use_bias=use_bias, bias_init=bias_init)
  return logits.astype(jnp.float32)


def _simple_gla_gates(module, x):
  """(g [B,T,H],): per-head log-decay logsigmoid(W_g x + b) / 16."""
  logits = _head_logits(module, x, "gk_proj", use_bias=True)
  return (nn.log_sigmoid(logits) / GATE_LOGIT_NORMALIZER,)


def _gla_gates(module, x):
  """(gk [B,T,Hk,Dh],): per-channel log-decay logsigmoid(W_up W_down x + b) / 16."""
  cfg = module.config
  low = _dense(x, (GLA_GATE_RANK,), (None,), name="gk_down", config=cfg)
  logits = _dense(low, (cfg.num_kv_heads, cfg.head_dim), ("kv_heads", "head_dim"), name="gk_up",
                  config=cfg, in_axes=(None,), use_bias=True)
  return (nn.log_sigmoid(logits.astype(jnp.float32)) / GATE_LOGIT_NORMALIZER,)


def _beta(module, x) -> jax.Array:
  """beta [B,T,H] = sigmoid(W_b x): the delta rule's per-token write strength in (0, 1)."""
  return nn.sigmoid(_head_logits(module, x, "b_proj"))


def _delta_rule_gates(module, x):
  """(beta [B,T,H],)."""
  return (_beta(module, x),)


def _gated_delta_rule_gates(module, x):
  """(g [B,T,H], beta [B,T,H]): g = -exp(A_log) * softplus(W_a x + dt_bias)."""
  h = module.config.num_heads
  a_log = _param(module, "A_log", _a_log_init(0.0, 16.0), (h,), ("heads",))
  dt_bias = _param(module, "dt_bias", _dt_bias_init, (h,), ("heads",))
  g = -jnp.exp(a_log) * jax.nn.softplus(_head_logits(module, x, "a_proj") + dt_bias)
  return g, _beta(module, x)


def _kda_gates(module, x):
  """(gk [B,T,H,Dh], beta [B,T,H]): gk = -exp(A_log) * softplus(W_up W_down x + dt_bias)."""
  cfg = module.config
  h, dh = cfg.num_heads, cfg.head_dim
  low = _dense(x, (dh,), (None,), name="f_down", config=cfg)
  logits = _dense(low, (h, dh), ("heads", "head_dim"), name="f_up", config=cfg, in_axes=(None,))
  a_log = _param(module, "A_log", _a_log_init(1.0, 16.0), (h,), ("heads",))
  dt_bias = _param(module, "dt_bias", nn.initializers.zeros, (h, dh), ("heads", "head_dim"))
  gk = -jnp.exp(a_log)[:, None] * jax.nn.softplus(logits.astype(jnp.float32) + dt_bias)
  return gk, _beta(module, x)


def _mlstm_gates(module, x):
  """(i [B,T,H], f [B,T,H]): input and forget gate pre-activations."""
  i = _head_logits(module, x, "i_proj", use_bias=True, bias_init=nn.initializers.normal(0.1))
  f = _head_logits(module, x, "f_proj", use_bias=True, bias_init=_forget_bias_init)
  return i, f


@dataclasses.dataclass(frozen=True)
class _Family:
  """How one linear family is wired: its op pair, gates, short convs, q/k norm and output gate."""
  op: Callable
  step: Callable
  gates: Callable  # (module, x [B,T,d_model]) -> the op's gate arguments, in order
  short_conv: bool = False
  qk_l2norm: bool = False
  out_gate: Callable = nn.silu
  low_rank_out_gate: bool = False


_FAMILIES = {
    "simple_gla": _Family(simple_gla, simple_gla_step, _simple_gla_gates),
    "gla": _Family(gla, gla_step, _gla_gates),
    "delta_rule": _Family(delta_rule, delta_rule_step, _delta_rule_gates, short_conv=True,
                          qk_l2norm=True),
    "gated_delta_rule": _Family(gated_delta_rule, gated_delta_rule_step, _gated_delta_rule_gates,
                                short_conv=True, qk_l2norm=True),
    "kda": _Family(kda, kda_step, _kda_gates, short_conv=True, qk_l2norm=True,
                   out_gate=nn.sigmoid, low_rank_out_gate=True),
    "mlstm": _Family(mlstm, mlstm_step, _mlstm_gates),
}
assert tuple(_FAMILIES) == LINEAR_KINDS


def _family(kind: str) -> _Family:
  if kind not in _FAMILIES:
    raise ValueError(f"kind must be one of {LINEAR_KINDS}, got {kind!r}")
  return _FAMILIES[kind]


def _l2_normalize(x: jax.Array, eps: float) -> jax.Array:
  """x / ||x|| over the last axis (head_dim), in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=-1, keepdims=True) + eps)


def _conv_widths(config: ModelConfig) -> dict[str, tuple[int, str]]:
  """Channels and channel axis name of the q, k and v short convs."""
  return {"q": (config.num_heads * config.head_dim, "heads"),
          "k": (config.num_kv_heads * config.head_dim, "kv_heads"),
          "v": (config.num_kv_heads * config.head_dim, "kv_heads")}


def init_linear_attention_cache(config: ModelConfig, kind: str, batch: int, max_len: int, dtype):
  """The empty cache of `LinearAttention(config, kind)`: zero state, zero conv histories.

  Returns {"state": [B,H,Dh,Dh] float32 (mlstm: (C [B,H,Dh,Dh], n [B,H,Dh], m [B,H])),
  "conv": {"q": [B,conv_size-1,H*Dh], "k"/"v": [B,conv_size-1,Hk*Dh]} in `dtype` or {}}.
  `max_len` is accepted for the shared cache protocol; the state has a fixed size.
  """
  del max_len
  family = _family(kind)
  h, dh = config.num_heads, config.head_dim
  memory = jnp.zeros((batch, h, dh, dh), jnp.float32)
  if kind == "mlstm":
    state = (memory, jnp.zeros((batch, h, dh), jnp.float32), jnp.zeros((batch, h), jnp.float32))
  else:
    state = memory
  conv = {}
  if family.short_conv:
    conv = {name: init_conv_cache(batch, config.conv_size, width, dtype)
            for name, (width, _) in _conv_widths(config).items()}
  return {"state": state, "conv": conv}


class LinearAttention(nn.Module):
  """A linear-RNN token mixer of family `kind` (one of LINEAR_KINDS); see the module docstring."""

  config: ModelConfig
  kind: str

  @nn.compact
  def __call__(self, x: jax.Array, *, positions: jax.Array, segment_ids=None, cache=None,
               sequence_parallel: SequenceParallel | None = None,
               streams: streams_lib.Streams | None = None):
    """x [B,T,d_model] -> (y [B,T,d_model], new cache or None).

    `positions` [B,T] is unused: the recurrence itself orders the tokens (in the layout order of
    an active `sequence_parallel`, see the module docstring). With `cache` (from
    `init_linear_attention_cache` or a previous call) the layer continues from it: T == 1 takes the
    `<op>_step` decode path, T > 1 a chunked prefill from the cached state. `segment_ids` [B,T]
    (packed documents; no cache; in layout order with `sequence_parallel`) reset the state and the
    short convolutions' history at every document start, as each document alone. With `streams`
    (see the module docstring) x is [1, N, d_model] and the cache a tuple of per-stream caches.
    """
    del positions
    cfg = self.config
    family = _family(self.kind)
    if x.ndim != 3 or x.shape[-1] != cfg.d_model:
      raise ValueError(f"x must have shape [batch, seq, {cfg.d_model}], got {x.shape}")
    sp = active_sequence_parallel(sequence_parallel, cache, f"LinearAttention({self.kind!r})")
    if segment_ids is not None and cache is not None:
      raise ValueError(f"LinearAttention({self.kind!r}): segment_ids (packed documents) cannot be "
                       "combined with a cache")
    if streams is not None:
      streams_lib.check_streams(streams, x, cache)
    h, hk, dh = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    dtype = jnp.dtype(cfg.dtype)
    x = x.astype(dtype)

    qkv = {"q": _dense(x, (h, dh), ("heads", "head_dim"), name="q_proj", config=cfg),
           "k": _dense(x, (hk, dh), ("kv_heads", "head_dim"), name="k_proj", config=cfg),
           "v": _dense(x, (hk, dh), ("kv_heads", "head_dim"), name="v_proj", config=cfg)}
    gates = family.gates(self, x)
    convs = {}
    if family.short_conv:
      convs = {name: ShortConv(width, cfg.conv_size, channel_axis=axis, dtype=dtype,
                               param_dtype=jnp.dtype(cfg.param_dtype), name=f"{name}_conv")
               for name, (width, axis) in _conv_widths(cfg).items()}

    def mix(q, k, v, *gates_and_cache):
      """The sequence work on one batch: q [B,T,H,Dh], k/v [B,T,Hk,Dh], the gates [B,T,...] and
      the cache -> (o [B,T,H,Dh], new cache or None)."""
      *gates, cache = gates_and_cache
      b, t = q.shape[:2]
      qkv, new_conv = {"q": q, "k": k, "v": v}, {}
      for name, conv in convs.items():
        y, new_conv[name] = conv(qkv[name].reshape(b, t, -1),
                                 cache=None if cache is None else cache["conv"][name],
                                 segment_ids=segment_ids, sequence_parallel=sp)
        qkv[name] = y.reshape(qkv[name].shape)
      q, k, v = qkv["q"], qkv["k"], qkv["v"]
      if family.qk_l2norm:
        q, k = (_l2_normalize(z, cfg.norm_eps).astype(dtype) for z in (q, k))
      if sp is not None:
        o, _ = sp.linear(self.kind, q, k, v, *gates, chunk_size=cfg.linear_chunk_size,
                         segment_ids=segment_ids, impl=cfg.impl)
        return o, None
      if cache is None:
        o, _ = family.op(q, k, v, *gates, chunk_size=cfg.linear_chunk_size,
                         segment_ids=segment_ids, impl=cfg.impl)
        return o, None
      if t == 1:
        o, state = family.step(q[:, 0], k[:, 0], v[:, 0], *(g[:, 0] for g in gates),
                               cache["state"])
        o = o[:, None]
      else:
        o, state = family.op(q, k, v, *gates, initial_state=cache["state"],
                             output_final_state=True, chunk_size=cfg.linear_chunk_size,
                             impl=cfg.impl)
      return o, {"state": state, "conv": new_conv}

    if streams is None:
      o, new_cache = mix(qkv["q"], qkv["k"], qkv["v"], *gates, cache)
    else:
      o, new_cache = streams_lib.map_streams(mix, streams, cache, qkv["q"], qkv["k"], qkv["v"],
                                             *gates)

    o = nn.RMSNorm(epsilon=cfg.norm_eps, dtype=jnp.float32, param_dtype=jnp.dtype(cfg.param_dtype),
                   scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("head_dim",)),
                   name="o_norm")(o)
    if family.low_rank_out_gate:
      low = _dense(x, (dh,), (None,), name="g_down", config=cfg)
      gate = _dense(low, (h, dh), ("heads", "head_dim"), name="g_up", config=cfg, in_axes=(None,),
                    use_bias=True)
    else:
      gate = _dense(x, (h, dh), ("heads", "head_dim"), name="g_proj", config=cfg)
    o = (o * family.out_gate(gate.astype(jnp.float32))).astype(dtype)
    y = _dense(o, (cfg.d_model,), ("embed",), name="o_proj", config=cfg,
               in_axes=("heads", "head_dim"))
    return y, new_cache
