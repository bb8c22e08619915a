"""Validation, padding and dispatch shared by every op family.

All ops use the layout [batch, seq, heads, head_dim]. Helpers here raise `ValueError`s that name the
offending argument and the expected shape, before any tracing work is done.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

IMPLS = ("auto", "reference", "xla", "pallas")


def resolve_impl(impl: str, op_name: str, *, pallas_unsupported: str | None = "no Pallas kernel "
                 "for this op yet") -> str:
  """Maps the user's `impl=` choice to the path that runs: "reference", "xla" or "pallas".

  `pallas_unsupported` is None when a Pallas kernel exists for this op and supports this call, else
  the reason it does not. "auto" picks "pallas" on GPU when the kernel supports the call and "xla"
  otherwise; an explicit "pallas" with an unsupported call raises `NotImplementedError` with the
  reason. On CPU, "pallas" runs the kernel in interpret mode (for tests).
  """
  if impl not in IMPLS:
    raise ValueError(f"{op_name}: impl must be one of {IMPLS}, got {impl!r}")
  if impl == "auto":
    return "pallas" if pallas_unsupported is None and jax.default_backend() == "gpu" else "xla"
  if impl == "pallas" and pallas_unsupported is not None:
    raise NotImplementedError(f"{op_name}: impl='pallas' unavailable: {pallas_unsupported}; "
                              "use impl='xla' (or 'auto')")
  return impl


def pallas_interpret() -> bool:
  """Whether Pallas kernels must run in interpret mode (no GPU/TPU backend: tests on CPU)."""
  return jax.default_backend() not in ("gpu", "tpu")


def check_rank(x, rank: int, name: str, layout: str) -> None:
  """Raises a ValueError unless `x` has `rank` dimensions (`layout` names them, e.g. "[B,T,H,D]")."""
  if jnp.ndim(x) != rank:
    raise ValueError(f"{name} must have shape {layout}, got shape {jnp.shape(x)}")


def check_shape(x, shape: tuple, name: str, layout: str) -> None:
  """Raises a ValueError unless `x.shape == shape`."""
  if tuple(jnp.shape(x)) != tuple(shape):
    raise ValueError(f"{name} must have shape {layout} = {tuple(shape)}, got {jnp.shape(x)}")


def check_qkv(q, k, v, *, v_heads_match_k: bool = True):
  """Validates q [B,T,H,Dk], k [B,T,Hk,Dk], v [B,T,Hk,Dv] with Hk dividing H (GQA).

  Returns (B, T, H, Hk, Dk, Dv).
  """
  check_rank(q, 4, "q", "[batch, seq, heads, head_dim]")
  check_rank(k, 4, "k", "[batch, seq, kv_heads, head_dim]")
  check_rank(v, 4, "v", "[batch, seq, kv_heads, head_dim_v]")
  b, t, h, dk = q.shape
  if k.shape[:2] != (b, t) or k.shape[3] != dk:
    raise ValueError(f"k must have shape [{b}, {t}, kv_heads, {dk}] to match q {q.shape}, "
                     f"got {k.shape}")
  hk = k.shape[2]
  if v.shape[:3] != (b, t, hk) and v_heads_match_k:
    raise ValueError(f"v must have shape [{b}, {t}, {hk}, head_dim_v] to match k {k.shape}, "
                     f"got {v.shape}")
  if h % hk:
    raise ValueError(f"the heads of k/v ({hk}) must divide the heads of q ({h})")
  return b, t, h, hk, dk, v.shape[3]


def check_step_qkv(q, k, v, op_name: str):
  """Validates one decode token: q [B,H,Dk], k [B,Hk,Dk], v [B,Hk,Dv] with Hk dividing H.

  Returns (B, H, Hk, Dk, Dv).
  """
  check_rank(q, 3, "q", "[batch, heads, head_dim]")
  check_rank(k, 3, "k", "[batch, kv_heads, head_dim]")
  check_rank(v, 3, "v", "[batch, kv_heads, head_dim_v]")
  b, h, dk = q.shape
  hk, dv = k.shape[1], v.shape[2]
  if k.shape[0] != b or k.shape[2] != dk or h % hk:
    raise ValueError(f"{op_name}: k must have shape [{b}, kv_heads dividing {h}, {dk}] to match "
                     f"q {q.shape}, got {k.shape}")
  if v.shape[:2] != (b, hk):
    raise ValueError(f"{op_name}: v must have shape [{b}, {hk}, head_dim_v] to match k {k.shape}, "
                     f"got {v.shape}")
  return b, h, hk, dk, dv


def check_gate(x, name: str, b: int, t: int, heads: tuple[int, ...], tail: tuple = ()) -> None:
  """Checks a gate shaped [B, T, heads, *tail] where heads may be any of `heads` (q or kv heads)."""
  layout = f"[{b}, {t}, {' or '.join(map(str, sorted(set(heads))))}{''.join(f', {d}' for d in tail)}]"
  if jnp.ndim(x) != 3 + len(tail) or x.shape[:2] != (b, t) or x.shape[2] not in heads \
      or tuple(x.shape[3:]) != tuple(tail):
    raise ValueError(f"{name} must have shape {layout}, got {jnp.shape(x)}")


def default_scale(scale, head_dim: int) -> float:
  """`scale` if given, else head_dim ** -0.5."""
  return head_dim ** -0.5 if scale is None else scale


def repeat_heads(x, heads: int, axis: int = 2):
  """Repeats the head axis of `x` so it has `heads` heads (GQA: each kv head serves a group)."""
  n = x.shape[axis]
  return x if n == heads else jnp.repeat(x, heads // n, axis=axis)


def pad_seq(x, multiple: int, axis: int = 1, value=0):
  """Pads `x` along `axis` up to a multiple of `multiple`. Returns (padded, original_length)."""
  t = x.shape[axis]
  pad = (-t) % multiple
  if pad == 0:
    return x, t
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, pad)
  return jnp.pad(x, widths, constant_values=value), t


def compute_dtype(*xs):
  """The dtype ops compute in: float32, or float64 when an input is float64 (possible only with x64
  enabled), so that the reference path can serve as a float64 oracle in tests."""
  return jnp.result_type(jnp.float32, *(x for x in xs if x is not None))


def check_nonpositive(gate, name: str) -> None:
  """Raises a ValueError if a concrete (non-traced) log-decay has a positive entry."""
  if is_traced(gate):
    return
  largest = float(jnp.max(jnp.asarray(gate, jnp.float32)))
  if largest > 0:
    raise ValueError(f"{name} is a log-decay and must be <= 0 everywhere, got max {largest}")


def is_traced(x) -> bool:
  return isinstance(x, jax.core.Tracer)


# ------------------------------------------------------------------------------------------------
# Packed documents (`segment_ids`) of the linear-RNN ops.


def check_segment_ids(segment_ids, b: int, t: int) -> None:
  """Raises a ValueError unless `segment_ids` is None or an integer array [B, T]."""
  if segment_ids is None:
    return
  check_shape(segment_ids, (b, t), "segment_ids", "[batch, seq]")
  if not jnp.issubdtype(jnp.result_type(segment_ids), jnp.integer):
    raise ValueError(f"segment_ids must be an integer array, got dtype "
                     f"{jnp.result_type(segment_ids)}")


def document_starts(segment_ids):
  """segment_ids [..., T] int -> starts [..., T] bool, True at each t > 0 whose id differs from that
  of t - 1: a new document begins there and the recurrent state is reset to zero before token t.

  t = 0 is never a start: the row's first document continues from the initial state. Only changes
  between neighbours count, so equal ids in two separate runs are two documents.
  """
  changed = segment_ids[..., 1:] != segment_ids[..., :-1]
  return jnp.pad(changed, ((0, 0),) * (segment_ids.ndim - 1) + ((1, 0),))


def reset_state(state, start):
  """`state` [B, ...] with the rows where `start` [B] (bool) is set replaced by zeros."""
  return jnp.where(start.reshape(start.shape + (1,) * (state.ndim - 1)), 0, state)


def chunk_documents(starts, chunk_size: int):
  """starts [B, T] bool -> doc [B, N, C] int32, each token's document within its chunk of C tokens:
  0 for the document that continues from the state carried into the chunk, then 1, 2, ... after
  each start. T is padded to N * C with no starts, so padding joins the last document.
  """
  starts = pad_seq(starts, chunk_size, value=False)[0]
  b, t = starts.shape
  return jnp.cumsum(starts.reshape(b, t // chunk_size, chunk_size), axis=-1, dtype=jnp.int32)


def same_document(doc):
  """doc [..., C] -> [..., C, C] bool: whether tokens i and j of a chunk are in one document."""
  return doc[..., :, None] == doc[..., None, :]
