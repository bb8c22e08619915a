"""MoR comparison, vanilla baseline: 4 unshared attention blocks (the MoR presets' parameters).

The `mor_*` presets share `STACK` (a CPU-sized attention block, byte vocabulary) and `RUN` (data
and optimiser). Each defines `CONFIG` (a trainer `RunConfig`: here the vanilla model itself, for
the MoR presets their shared stack) and `MOR` (the `MoRConfig`, None here); `bench/mor.py` trains
them at equal training FLOPs.
"""

import dataclasses

from configs import DataConfig, LoopConfig, MeshConfig, OptimConfig, RunConfig
from jaxchunk.config import ModelConfig

STACK = ModelConfig(vocab_size=256, d_model=128, layer_pattern=("attention", "attention"),
                    num_heads=4, num_kv_heads=4, head_dim=32, mlp_hidden=384)
RUN = RunConfig(
    model=STACK,
    data=DataConfig(source="stdlib", seq_len=128, global_batch_size=16, model_segment_ids=False),
    optim=OptimConfig(lr=3e-3, warmup_steps=30, end_lr_ratio=0.1, weight_decay=0.1),
    mesh=MeshConfig(data=-1),
    run=LoopConfig(steps=300, eval_every=100, eval_batches=8, checkpoint_every=300, log_every=10))

MOR = None
CONFIG = dataclasses.replace(RUN, model=dataclasses.replace(STACK, layer_pattern=("attention",) * 4))
