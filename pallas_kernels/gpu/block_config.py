"""The launch configuration shared by the flash-style GPU kernels (attention, RAT)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockConfig:
  """Tile sizes (powers of two, >= 16) and Triton launch parameters of one kernel."""
  block_q: int
  block_k: int
  num_warps: int
  num_stages: int
