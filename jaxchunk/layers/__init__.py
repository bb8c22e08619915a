"""Flax Linen layers over the `jaxchunk.ops` functions.

Every token mixer is `Mixer(config, ...)` with
`__call__(x [B,T,d_model], *, positions [B,T], segment_ids=None, cache=None) -> (y, new_cache)`
and a pure `init_<name>_cache(config, ..., batch, max_len, dtype)` building its empty cache.
With a cache, `streams=((b_0, t_0), ...)` runs several batches laid out as one row [1, N, d_model]
(`jaxchunk.layers.streams`: the serving engine's mixed steps), the cache a tuple of per-stream
caches.
"""

from jaxchunk.layers.attention import Attention, init_attention_cache
from jaxchunk.layers.conv import ShortConv, init_conv_cache
from jaxchunk.layers.linear_attention import LinearAttention, init_linear_attention_cache
from jaxchunk.layers.mlp import SwiGLU
from jaxchunk.layers.norm import RMSNorm
from jaxchunk.layers.rat import RATLayer, init_rat_cache
from jaxchunk.layers.rotary import apply_rotary, rotary_angles

__all__ = [
    "Attention",
    "LinearAttention",
    "RATLayer",
    "RMSNorm",
    "ShortConv",
    "SwiGLU",
    "apply_rotary",
    "init_attention_cache",
    "init_conv_cache",
    "init_linear_attention_cache",
    "init_rat_cache",
    "rotary_angles",
]
