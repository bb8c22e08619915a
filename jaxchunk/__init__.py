"""jaxchunk: chunked sequence layers for JAX.

Ops (`jaxchunk.ops`) are pure functions on arrays laid out [batch, seq, heads, head_dim]; layers
(`jaxchunk.layers`) are thin Flax Linen modules over them; `jaxchunk.models` builds language models
from a layer pattern.
"""

__version__ = "0.1.0"
