"""Shared helpers for the test-suite: random inputs and relative-error checks."""

import numpy as np


def rel_err(out, ref) -> float:
  """||out - ref|| / ||ref|| in float64."""
  out = np.asarray(out, np.float64)
  ref = np.asarray(ref, np.float64)
  return float(np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30))


def assert_rel_close(out, ref, tol: float, what: str = "") -> None:
  """Asserts ||out - ref|| / ||ref|| <= tol, with shapes equal."""
  assert np.shape(out) == np.shape(ref), f"{what}: shape {np.shape(out)} != {np.shape(ref)}"
  err = rel_err(out, ref)
  assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def randn(rng: np.random.Generator, *shape, scale: float = 1.0) -> np.ndarray:
  """Fresh float32 normal samples (never zeros or ones)."""
  return (scale * rng.standard_normal(shape)).astype(np.float32)


def alternating_segment_ids(starts_per_row, t: int) -> np.ndarray:
  """int32 [B, T] segment ids of packed documents starting at the given token indices (one set
  per row), alternating 0 1 0 1 ... so that equal ids also sit on documents that are not
  neighbours."""
  return np.stack([np.cumsum([i in starts for i in range(t)]) % 2
                   for starts in starts_per_row]).astype(np.int32)
