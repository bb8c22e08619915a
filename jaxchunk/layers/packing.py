"""Packed projections: the kernels that project one input, joined into one matrix for serving.

A decode step multiplies a few rows by every weight matrix, so each projection costs about one
read of its kernel plus a kernel launch. XLA's GPU compiler already joins dots that share an input
(its dot merger), but it does so by concatenating their kernels: for RAT's five input projections
that copy runs inside the decode loop on every token. Packing once, outside any jitted step,
leaves one plain matmul per group.

`pack(params, name, parts)` is the parameter transform (the serving engine runs it once through
`LanguageModel.pack_projections`): in one layer's parameter dict it replaces the sub-dicts `parts`
(each {"kernel" [d_in, *features], optional "bias" [*features]}) by two leaves,
`<name>_kernel` [d_in, sum of the parts' feature sizes] and, when a part has a bias,
`<name>_bias` [sum] (zeros for the parts without one). `packed_projections(module, x, name,
shapes, dtype)` is the layer side: the parts' outputs from the packed kernel when the module holds
it, else None (the layer then projects part by part, as at training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def pack(params: dict, name: str, parts: Sequence[str]) -> dict:
  """`params` (one layer's parameters) with the kernels `parts` packed as `<name>_kernel` /
  `<name>_bias`; see the module docstring."""
  missing = [part for part in parts if part not in params]
  if missing:
    raise ValueError(f"cannot pack {name}: the parameters have no {missing} "
                     f"(they have {sorted(params)})")
  kernels = [params[part]["kernel"] for part in parts]
  d_in = kernels[0].shape[0]
  if any(kernel.shape[0] != d_in for kernel in kernels):
    raise ValueError(f"cannot pack {name}: the kernels' input sizes differ "
                     f"{[kernel.shape[0] for kernel in kernels]}")
  packed = {key: value for key, value in params.items() if key not in parts}
  packed[f"{name}_kernel"] = jnp.concatenate(
      [kernel.reshape(d_in, -1) for kernel in kernels], axis=1)
  if any("bias" in params[part] for part in parts):
    packed[f"{name}_bias"] = jnp.concatenate([
        params[part]["bias"].reshape(-1) if "bias" in params[part]
        else jnp.zeros((math.prod(kernel.shape[1:]),), kernel.dtype)
        for part, kernel in zip(parts, kernels)])
  return packed


def packed_projections(module: nn.Module, x: jax.Array, name: str,
                       shapes: Sequence[tuple[int, ...]], dtype) -> list[jax.Array] | None:
  """x [..., d_in] -> the outputs [..., *shape] of the parts packed as `name` (computed in
  `dtype`, as `nn.DenseGeneral` does), or None when `module` holds no such packed kernel."""
  if not module.has_variable("params", f"{name}_kernel"):
    return None
  kernel = module.get_variable("params", f"{name}_kernel")
  y = jnp.dot(x.astype(dtype), kernel.astype(dtype))
  if module.has_variable("params", f"{name}_bias"):
    y = y + module.get_variable("params", f"{name}_bias").astype(dtype)
  ends = np.cumsum([math.prod(shape) for shape in shapes])[:-1]
  return [part.reshape(*x.shape[:-1], *shape)
          for part, shape in zip(jnp.split(y, ends, axis=-1), shapes)]
