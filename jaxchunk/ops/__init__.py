"""Pure-functional sequence ops: layout [batch, seq, heads, head_dim], `impl=` dispatch.

Each family lives in its own module with its reference (token-by-token) and xla (chunked) paths side
by side; see docs/ops.md for the math, shapes and available paths of each op.
"""

from jaxchunk.ops.attention import attention
from jaxchunk.ops.delta_rule import delta_rule, delta_rule_step
from jaxchunk.ops.delta_rule import gated_delta_rule, gated_delta_rule_step
from jaxchunk.ops.gla import gla, gla_step
from jaxchunk.ops.kda import kda, kda_step
from jaxchunk.ops.mlstm import mlstm, mlstm_step
from jaxchunk.ops.rat import RATState, rat, rat_init_state, rat_step
from jaxchunk.ops.simple_gla import simple_gla, simple_gla_step

__all__ = [
    "attention",
    "delta_rule", "delta_rule_step",
    "gated_delta_rule", "gated_delta_rule_step",
    "gla", "gla_step",
    "kda", "kda_step",
    "mlstm", "mlstm_step",
    "RATState", "rat", "rat_init_state", "rat_step",
    "simple_gla", "simple_gla_step",
]
