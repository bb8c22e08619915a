"""Sequence parallelism with `jax.shard_map`: one sequence spread over the devices of a mesh axis.

- `ring_attention`: K/V blocks around a ring of `lax.ppermute`s, online-softmax merge, ringing
  custom VJP, zig-zag causal load balance, GQA, segment_ids, sliding windows (skipped steps).
- `ulysses_attention`: all-to-all between sequence and head sharding.
- `sequence_parallel_attention`: the per-layer choice between them.
- `sequence_parallel_linear`: every linear op (simple_gla, gla, delta_rule, gated_delta_rule, kda,
  mlstm) from per-device affine state summaries.
- `sequence_parallel_rat`: RAT with shared chunk summaries.
- `sequence_parallel_halo`: the tokens before each segment, for short causal convolutions.
- `SequenceParallel`: the bundle a trainer hands to its layers, with host-side batch layout.

Each global function takes arrays [B, T, ...] in layout order (see `jaxchunk.parallel.mesh`) and has
a per-device `*_shard` form for use inside an enclosing `shard_map`. See docs/parallel.md.
"""

from jaxchunk.parallel.api import (SequenceParallel, active_sequence_parallel, choose_strategy,
                                   sequence_parallel_attention)
from jaxchunk.parallel.halo import halo_shard, sequence_parallel_halo
from jaxchunk.parallel.linear_scan import (SHARD_OPS, delta_rule_shard, gated_delta_rule_shard,
                                           gla_shard, kda_shard, mlstm_shard,
                                           sequence_parallel_linear, simple_gla_shard)
from jaxchunk.parallel.mesh import (LAYOUTS, from_layout, layout_permutation, local_positions,
                                    sequence_mesh, to_layout)
from jaxchunk.parallel.rat import rat_shard, sequence_parallel_rat
from jaxchunk.parallel.ring import ring_attention, ring_attention_shard
from jaxchunk.parallel.ulysses import ulysses_attention, ulysses_attention_shard

__all__ = [
    "LAYOUTS", "from_layout", "layout_permutation", "local_positions", "sequence_mesh", "to_layout",
    "ring_attention", "ring_attention_shard",
    "ulysses_attention", "ulysses_attention_shard",
    "choose_strategy", "sequence_parallel_attention",
    "SHARD_OPS", "sequence_parallel_linear", "simple_gla_shard", "gla_shard", "delta_rule_shard",
    "gated_delta_rule_shard", "kda_shard", "mlstm_shard",
    "rat_shard", "sequence_parallel_rat",
    "halo_shard", "sequence_parallel_halo",
    "SequenceParallel", "active_sequence_parallel",
]
