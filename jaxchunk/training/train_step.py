"""The device side of training: mesh, sharded train state, jitted train and eval steps, FLOPs.

The mesh has the axes ("data", "fsdp", "tensor", "sequence"). Parameters and optimiser state are
sharded by the layers' logical axis names through `LOGICAL_AXIS_RULES` (a dimension whose size the
mesh axes do not divide stays replicated); batches [B, T] are split over ("data", "fsdp") x
"sequence". The train state is a dict {"step": int32 [], "params", "opt_state"}.

When the "sequence" axis has more than one device (`sequence_parallel`), every row is in zig-zag
layout order (`SequenceParallel.layout_batch`, host side) and the steps run the model's
sequence-parallel mixers; the token-summed loss does not depend on the order of the tokens.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from configs import MeshConfig
from jaxchunk.config import ModelConfig
from jaxchunk.models.mor import MoRLanguageModel
from jaxchunk.parallel.api import SequenceParallel

MESH_AXES = ("data", "fsdp", "tensor", "sequence")
BATCH_AXES = ("data", "fsdp")

# Logical parameter axis (named by the layers) -> mesh axes.
LOGICAL_AXIS_RULES = (
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("head_dim", None),
    ("conv", None),
)

REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# Dense bf16 peak FLOP/s per device by device-kind substring (first match wins), for MFU.
PEAK_FLOPS = (
    ("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("TPU v6", 918e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5", 459e12), ("TPU v4", 275e12),
)


def mesh_shape(config: MeshConfig, num_devices: int) -> tuple[int, ...]:
  """Axis sizes (data, fsdp, tensor, sequence) using `num_devices`; a -1 axis takes the rest."""
  sizes = [config.data, config.fsdp, config.tensor, config.sequence]
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh: axis sizes must be positive with at most one -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f"mesh: {num_devices} devices are not a multiple of the fixed axes {sizes}")
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh: axis sizes {sizes} use {math.prod(sizes)} devices, "
                     f"but {num_devices} are available")
  return tuple(sizes)


def make_mesh(config: MeshConfig, devices=None) -> jax.sharding.Mesh:
  """The training mesh over `devices` (default: all), every axis of type Auto."""
  devices = jax.devices() if devices is None else list(devices)
  return jax.make_mesh(mesh_shape(config, len(devices)), MESH_AXES,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES), devices=devices)


def sequence_parallel(mesh) -> SequenceParallel | None:
  """The zig-zag `SequenceParallel` over the mesh's "sequence" axis (batch over BATCH_AXES), or
  None when that axis has a single device."""
  if mesh.shape["sequence"] == 1:
    return None
  return SequenceParallel(mesh, axis_name="sequence", batch_axes=BATCH_AXES, layout="zigzag")


def check_sequence_parallel(model: nn.Module, sp: SequenceParallel | None) -> None:
  """Raises a ValueError for a sequence-parallel `sp` with a model that cannot run it (MoR)."""
  if sp is not None and isinstance(model, MoRLanguageModel):
    raise ValueError(f"Mixture-of-Recursions models do not support sequence parallelism: set "
                     f"mesh.sequence=1 (got a sequence axis of {sp.num_devices} devices)")


def batch_sharding(mesh) -> NamedSharding:
  """Sharding of [B, T] batch arrays."""
  return NamedSharding(mesh, P(BATCH_AXES, "sequence"))


def _fit_to_shape(sharding: NamedSharding, shape) -> NamedSharding:
  """Drops the mesh axes of dimensions they do not divide (those stay replicated)."""
  spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
  fitted = []
  for dim, axes in zip(shape, spec):
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    size = math.prod(sharding.mesh.shape[n] for n in names)
    fitted.append(axes if dim % size == 0 else None)
  return NamedSharding(sharding.mesh, P(*fitted))


def param_shardings(boxed_params, mesh):
  """NamedShardings of the (unboxed) params from the logical axes of `boxed_params`."""
  logical = nn.get_partition_spec(boxed_params)
  shardings = nn.logical_to_mesh_sharding(logical, mesh, LOGICAL_AXIS_RULES)
  return jax.tree.map(lambda s, p: _fit_to_shape(s, p.shape), shardings, nn.unbox(boxed_params))


def init_train_state(model: nn.Module, tx: optax.GradientTransformation, mesh, *, seed: int,
                     seq_len: int):
  """Initialises the sharded train state. Returns (state, state_shardings)."""
  tokens = jnp.zeros((1, seq_len), jnp.int32)
  # The key is an argument, not a constant: XLA would constant-fold (run at compile time) an init
  # whose inputs are all constants, which takes minutes for large models.
  key = jax.random.key(seed)

  def init_params(key):
    return model.init(key, tokens)["params"]

  boxed = jax.eval_shape(init_params, key)
  params_sh = param_shardings(boxed, mesh)
  abstract_params = nn.unbox(boxed)
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  replicated = NamedSharding(mesh, P())
  opt_sh = optax.tree_map_params(tx, lambda _, sharding: sharding, abstract_opt, params_sh,
                                 transform_non_params=lambda _: replicated)
  shardings = {"step": replicated, "params": params_sh, "opt_state": opt_sh}

  def init(key):
    params = nn.unbox(init_params(key))
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

  return jax.jit(init, out_shardings=shardings)(key), shardings


def abstract_state(state):
  """ShapeDtypeStructs (with shardings) of `state`: the restore target of a checkpoint."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def _token_nll_sums(model: nn.Module, params, batch, *, use_segment_ids: bool, remat: str,
                    inference: bool = False, sp: SequenceParallel | None = None):
  """(sum of masked next-token NLL in nats, number of counted tokens, router loss) of one batch.

  The router loss is a `MoRLanguageModel`'s aux["router_loss"] (float32 [], 0 for a
  `LanguageModel`); `inference` makes a MoR model route causally, as in decoding (evaluation).
  `sp`: the `SequenceParallel` of a batch in its layout order, or None.
  """
  is_mor = isinstance(model, MoRLanguageModel)
  options = {"inference": inference} if is_mor else {"sequence_parallel": sp}

  def forward(params, batch):
    logits, aux = model.apply({"params": params}, batch["inputs"], positions=batch["positions"],
                              segment_ids=batch["segment_ids"] if use_segment_ids else None,
                              **options)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    router_loss = aux["router_loss"].astype(jnp.float32) if is_mor else jnp.zeros((), jnp.float32)
    return jnp.sum(nll * batch["loss_mask"]), jnp.sum(batch["loss_mask"]), router_loss

  if remat not in REMAT_POLICIES:
    raise ValueError(f"run.remat must be one of {tuple(REMAT_POLICIES)}, got {remat!r}")
  if REMAT_POLICIES[remat] is not None:
    forward = jax.checkpoint(forward, policy=REMAT_POLICIES[remat])
  return forward(params, batch)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, state_shardings, mesh, *,
                    use_segment_ids: bool, grad_accum_steps: int = 1, remat: str = "none",
                    sp: SequenceParallel | None = None) -> Callable:
  """The jitted step (state, batch) -> (state, metrics); the input state is donated.

  With `sp` (see `sequence_parallel`; not for MoR models) the batch rows are in its layout order
  and the model runs sequence-parallel.

  The training loss is the mean token NLL plus, for a `MoRLanguageModel`, its router loss. The
  batch is split into `grad_accum_steps` micro-batches whose gradients of (summed token NLL +
  token count * router loss) are added, then divided by the token count: the update equals one
  large-batch step (router losses weighted by their micro-batch's tokens).
  metrics: "loss" (mean NLL, nats), "router_loss" (0 without routers), "grad_norm", "tokens"
  (counted targets).
  """
  if grad_accum_steps <= 0:
    raise ValueError(f"optim.grad_accum_steps must be positive, got {grad_accum_steps}")
  check_sequence_parallel(model, sp)

  def objective(params, batch):
    nll, count, router_loss = _token_nll_sums(model, params, batch,
                                              use_segment_ids=use_segment_ids, remat=remat, sp=sp)
    return nll + count * router_loss, (nll, count, router_loss)

  grad_fn = jax.value_and_grad(objective, has_aux=True)

  def step(state, batch):
    rows = batch["inputs"].shape[0]
    if rows % grad_accum_steps:
      raise ValueError(f"batch of {rows} rows is not divisible by "
                       f"optim.grad_accum_steps={grad_accum_steps}")
    # Row r of micro-batch i is batch row r * grad_accum_steps + i: each device keeps its rows.
    micro = jax.tree.map(
        lambda x: x.reshape(rows // grad_accum_steps, grad_accum_steps, *x.shape[1:]).swapaxes(0, 1),
        batch)

    def accumulate(carry, micro_batch):
      grads, nll, count, router = carry
      (_, (b_nll, b_count, b_router)), g = grad_fn(state["params"], micro_batch)
      return (jax.tree.map(jnp.add, grads, g), nll + b_nll, count + b_count,
              router + b_count * b_router), None

    zero = jnp.zeros((), jnp.float32)
    init = (jax.tree.map(jnp.zeros_like, state["params"]), zero, zero, zero)
    (grads, nll, count, router), _ = jax.lax.scan(accumulate, init, micro)
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": nll / count, "router_loss": router / count,
               "grad_norm": optax.tree.norm(grads), "tokens": count}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  data_sh = batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  return jax.jit(step, in_shardings=(state_shardings, data_sh),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)


def make_eval_step(model: nn.Module, state_shardings, mesh, *, use_segment_ids: bool,
                   sp: SequenceParallel | None = None) -> Callable:
  """The jitted (params, batch) -> (sum of token NLL in nats, token count).

  A `MoRLanguageModel` routes as at inference (causally: no token sees later tokens' scores).
  With `sp` the batch rows are in its layout order, as in `make_train_step`.
  """
  check_sequence_parallel(model, sp)

  def evaluate(params, batch):
    nll, count, _ = _token_nll_sums(model, params, batch, use_segment_ids=use_segment_ids,
                                    remat="none", inference=True, sp=sp)
    return nll, count

  replicated = NamedSharding(mesh, P())
  return jax.jit(evaluate, in_shardings=(state_shardings["params"], batch_sharding(mesh)),
                 out_shardings=(replicated, replicated))


def count_params(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def flops_per_token(config: ModelConfig, num_params: int, seq_len: int) -> float:
  """Training FLOPs (forward + backward) per token: 6 per matmul weight plus token mixing.

  Weight FLOPs are 6 * params (the embedding counts as the tied LM head's matmul; an untied
  embedding table is a lookup). Token mixing per layer, with c the mean number of keys a query
  sees: 12 * heads * head_dim * c, where c is T/2 for "attention", min(window, T/2) for "local",
  T / (2 * rat_chunk_size) chunk summaries for "rat", and linear_chunk_size/2 + head_dim (the
  intra-chunk attention and the state read/update) for linear mixers.
  """
  cfg = config
  weights = num_params if cfg.tie_embeddings else num_params - cfg.vocab_size * cfg.d_model
  width = cfg.num_heads * cfg.head_dim
  mixing = 0.0
  for kind in cfg.layer_pattern:
    if kind == "attention":
      keys = seq_len / 2
    elif kind == "local":
      keys = min(cfg.window, seq_len / 2)
    elif kind == "rat":
      keys = seq_len / (2 * cfg.rat_chunk_size)
    else:
      keys = cfg.linear_chunk_size / 2 + cfg.head_dim
    mixing += 12 * width * keys
  return 6.0 * weights + mixing


def peak_flops_per_device(device, override: float = 0.0) -> float | None:
  """`override` if positive, else the dense bf16 peak of `device`'s kind; None if unknown (CPU)."""
  if override > 0:
    return override
  kind = getattr(device, "device_kind", "")
  return next((flops for name, flops in PEAK_FLOPS if name.lower() in kind.lower()), None)
