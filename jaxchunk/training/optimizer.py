"""The optimiser: AdamW with linear warm-up and cosine decay, global-norm gradient clipping."""

from __future__ import annotations

import jax
import optax

from configs import OptimConfig


def learning_rate_schedule(config: OptimConfig, total_steps: int) -> optax.Schedule:
  """0 -> config.lr linearly over `warmup_steps`, then cosine down to `end_lr_ratio * lr`."""
  warmup = min(config.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=config.lr * config.end_lr_ratio)


def decay_mask(params):
  """Weight decay applies to matrices (ndim >= 2), not to norm scales or biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: OptimConfig, total_steps: int) -> optax.GradientTransformation:
  """clip_by_global_norm(clip_norm) then AdamW on `learning_rate_schedule`.

  `clip_norm <= 0` disables clipping.
  """
  adamw = optax.adamw(learning_rate_schedule(config, total_steps), b1=config.b1, b2=config.b2,
                      eps=config.eps, weight_decay=config.weight_decay, mask=decay_mask)
  if config.clip_norm <= 0:
    return adamw
  return optax.chain(optax.clip_by_global_norm(config.clip_norm), adamw)
