"""mLSTM: the xLSTM matrix memory with exponential input gate and max-stabiliser.

Per head, with pre-activations i_t (input gate) and f_t (forget gate), log i_t = i_t and
log f_t = log_sigmoid(f_t), the stabilised recurrence over the state (C [Dk,Dv], n [Dk], m scalar)
is

  m_t = max(log f_t + m_{t-1}, log i_t)
  C_t = exp(log f_t + m_{t-1} - m_t) C_{t-1} + exp(log i_t - m_t) k_t^T v_t
  n_t = exp(log f_t + m_{t-1} - m_t) n_{t-1} + exp(log i_t - m_t) k_t
  h_t = (scale q_t C_t) / (max(|scale q_t . n_t|, exp(-m_t)) + eps)

Conventions, taken from NX-AI/mlstm_kernels (`recurrent/native_step.py`, `chunkwise/native/fw.py`):
- `scale` (default Dk**-0.5) multiplies q, so it enters both the numerator q C and the normaliser
  q . n;
- `eps` (default 1e-6) is added after the max in the denominator;
- without `initial_state` the state starts at C = 0, n = 0 and m = 0 (m = 0, not -inf);
- the state is the tuple (C [B,H,Dk,Dv], n [B,H,Dk], m [B,H]), float32 (float64 for float64
  inputs).

The `xla` path is the chunkwise (TFLA) form: a `lax.scan` over chunks carries (C, n, m) with the
chunk-level max-stabiliser m_k = max(g_k + m_{k-1}, max_s a_s) (g: the chunk's total log forget
gate, a_s: the log weight of token s in the end-of-chunk state), which equals the recurrent m_t at
every chunk boundary; within a chunk, outputs combine the inter-chunk part (q C_{k-1}) and the
intra-chunk part (a causal gated score matrix) under their common max, which equals the recurrent
m_t at every token. Both paths therefore compute the same function, eps term included. Memory is
O(T): one state per chunk.

Packed documents (`segment_ids`): where a document starts the whole state is reset to its empty
value (C = 0, n = 0, m = 0, as without `initial_state`) before the token, so the start token's
log f still enters the stabiliser (m = max(log f + 0, log i)). In the chunked form a token of a
document that starts inside the chunk sees no carried-in (C, n) and, in place of m_{k-1} + cum f,
the empty state's log weight: log f summed from its document's start (`_document_cumsum`); the
score matrix keeps only pairs of one document; the end-of-chunk state sums only the chunk's last
document and, when a document starts inside the chunk, starts from the empty state.

The "pallas" path (GPU, or interpret mode on CPU) runs `pallas_kernels.gpu.mlstm`, the same chunked
form with the chunk of its config table (`chunk_size` sets the xla path's chunk only); q, k, v stay
in their (shared) dtype, bf16 or float32, head dims 64 and 128. It takes segment_ids too: the
stabilisers get the same per-document logic in XLA and the kernels mask the score matrix to pairs
of one document and the handed-on state to the chunk's last document.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from jaxchunk.ops._common import (check_gate, check_qkv, check_rank,
                                  check_segment_ids, chunk_documents, compute_dtype,
                                  default_scale, document_starts, pallas_interpret, repeat_heads,
                                  reset_state, resolve_impl, same_document)
from pallas_kernels.gpu import chunk_common
from pallas_kernels.gpu import mlstm as mlstm_kernel

_HIGHEST = lax.Precision.HIGHEST

MLSTMState = tuple[jax.Array, jax.Array, jax.Array]


def _state_layout(b: int, h: int, dk: int, dv: int) -> str:
  return (f"a tuple (C [B,H,Dk,Dv], n [B,H,Dk], m [B,H]) = "
          f"([{b}, {h}, {dk}, {dv}], [{b}, {h}, {dk}], [{b}, {h}])")


def _check_state(state, name: str, b: int, h: int, dk: int, dv: int) -> None:
  """Raises a ValueError unless `state` is (C [B,H,Dk,Dv], n [B,H,Dk], m [B,H])."""
  layout = _state_layout(b, h, dk, dv)
  if not isinstance(state, (tuple, list)) or len(state) != 3:
    raise ValueError(f"{name} must be {layout}, got {type(state).__name__}")
  shapes = tuple(tuple(jnp.shape(x)) for x in state)
  if shapes != ((b, h, dk, dv), (b, h, dk), (b, h)):
    raise ValueError(f"{name} must be {layout}, got shapes {shapes}")


def _zero_state(b: int, h: int, dk: int, dv: int, dtype) -> MLSTMState:
  return (jnp.zeros((b, h, dk, dv), dtype), jnp.zeros((b, h, dk), dtype), jnp.zeros((b, h), dtype))


def _recurrent_step(state: MLSTMState, q, k, v, log_i, log_f, *, scale: float, eps: float):
  """One token of the stabilised recurrence.

  q, k [B,H,Dk], v [B,H,Dv], log_i, log_f [B,H], state (C [B,H,Dk,Dv], n [B,H,Dk], m [B,H]).
  Returns (h [B,H,Dv], new_state).
  """
  c, n, m = state
  m_new = jnp.maximum(log_f + m, log_i)
  decay = jnp.exp(log_f + m - m_new)
  gain = jnp.exp(log_i - m_new)
  c = decay[..., None, None] * c + gain[..., None, None] * k[..., :, None] * v[..., None, :]
  n = decay[..., None] * n + gain[..., None] * k
  q = scale * q
  num = jnp.einsum("bhk,bhkv->bhv", q, c, precision=_HIGHEST)
  qn = jnp.einsum("bhk,bhk->bh", q, n, precision=_HIGHEST)
  den = jnp.maximum(jnp.abs(qn), jnp.exp(-m_new)) + eps
  return num / den[..., None], (c, n, m_new)


def _mlstm_reference(q, k, v, log_i, log_f, state: MLSTMState, starts, *, scale: float,
                     eps: float):
  """Token-by-token `lax.scan`. q, k [B,T,H,Dk], v [B,T,H,Dv], log gates [B,T,H]; starts [B,T]
  bool, where the state is reset to zeros before the token (`document_starts`).

  Returns (h [B,T,H,Dv], final_state).
  """

  def body(carry, xs):
    *token, start = xs
    carry = tuple(reset_state(x, start) for x in carry)
    h, carry = _recurrent_step(carry, *token, scale=scale, eps=eps)
    return carry, h

  xs = tuple(jnp.moveaxis(x, 1, 0) for x in (q, k, v, log_i, log_f, starts))
  final_state, h = lax.scan(body, state, xs)
  return jnp.moveaxis(h, 0, 1), final_state


def _chunk_states(k, v, a, g, resets, state: MLSTMState):
  """Inter-chunk pass: the state entering each chunk, and the final state.

  k [B,H,N,L,Dk], v [B,H,N,L,Dv]; a [B,H,N,L] the log weight of each token in its end-of-chunk
  state (-inf for tokens not in it); g [B,H,N] the log weight in it of the state the chunk starts
  from (the chunk's total log forget gate, or the sum from its last document's start); resets
  [B,N] bool: the chunk starts from the empty state instead of the carried-in one (a document
  starts inside it).
  Returns ((C [B,H,N,Dk,Dv], n [B,H,N,Dk], m [B,H,N]), final_state).
  """

  def body(carry, xs):
    k_c, v_c, a_c, g_c, reset_c = xs
    c, n, m = (reset_state(x, reset_c) for x in carry)
    m_next = jnp.maximum(g_c + m, jnp.max(a_c, axis=-1))
    decay = jnp.exp(g_c + m - m_next)
    k_gated = k_c * jnp.exp(a_c - m_next[..., None])[..., None]
    c_next = decay[..., None, None] * c + jnp.einsum("bhlk,bhlv->bhkv", k_gated, v_c,
                                                     precision=_HIGHEST)
    n_next = decay[..., None] * n + jnp.sum(k_gated, axis=-2)
    return (c_next, n_next, m_next), carry

  xs = tuple(jnp.moveaxis(x, 2, 0) for x in (k, v, a, g)) + (jnp.moveaxis(resets, 1, 0),)
  final_state, entering = lax.scan(body, state, xs)
  return tuple(jnp.moveaxis(x, 0, 2) for x in entering), final_state


def _document_cumsum(x, doc):
  """x [B,H,N,L]; doc [B,1,N,L] each token's document within its chunk (`chunk_documents`).

  Returns [B,H,N,L]: x summed from the first token of each token's document in the chunk (the
  chunk's first token for document 0) through the token.
  """
  total = jnp.cumsum(x, axis=-1)
  positions = jnp.arange(x.shape[-1])
  doc_start = lax.cummax(jnp.where(jnp.diff(doc, axis=-1, prepend=0) != 0, positions, 0),
                         axis=doc.ndim - 1)  # position of the first token of each token's document
  before = jnp.take_along_axis(total - x, jnp.broadcast_to(doc_start, x.shape), axis=-1)
  return total - before


def _mlstm_chunkwise(q, k, v, log_i, log_f, state: MLSTMState, starts, *, scale: float,
                     eps: float, chunk_size: int):
  """Chunkwise-parallel form (TFLA). q, k [B,T,H,Dk], v [B,T,H,Dv], log gates [B,T,H]; starts
  [B,T] bool or None (one document).

  Returns (h [B,T,H,Dv], final_state).
  """
  b, t, h, dk = q.shape
  dv = v.shape[-1]
  size = min(chunk_size, t)
  pad = (-t) % size
  # Padded tokens leave the state unchanged: k = v = 0, log f = 0, log i = -inf (zero weight) and
  # no document start.
  widths = ((0, 0), (0, pad), (0, 0))
  log_i = jnp.pad(log_i, widths, constant_values=-jnp.inf)
  log_f = jnp.pad(log_f, widths)
  q, k, v = (jnp.pad(x, widths + ((0, 0),)) for x in (q, k, v))
  n_chunks = (t + pad) // size

  def to_chunks(x):  # [B, T, H, ...] -> [B, H, N, L, ...]
    x = x.reshape(b, n_chunks, size, h, *x.shape[3:])
    return jnp.moveaxis(x, 3, 1)

  q, k, v, log_i, log_f = map(to_chunks, (q, k, v, log_i, log_f))
  cum_f = jnp.cumsum(log_f, axis=-1)  # [B,H,N,L]: log decay from the chunk start to token t
  causal = jnp.tril(jnp.ones((size, size), bool))
  if starts is None:  # one document: nothing masked
    pairs, doc_f, first, last = causal, cum_f, True, True
    resets = jnp.zeros((b, n_chunks), bool)
  else:
    doc = chunk_documents(starts, size)  # [B,N,L]
    resets = doc[..., -1] != 0
    doc = doc[:, None]  # [B,1,N,L]
    pairs = causal & same_document(doc)
    doc_f = _document_cumsum(log_f, doc)  # log decay from the token's document start
    first, last = doc == 0, doc == doc[..., -1:]
  to_end = jnp.where(last, cum_f[..., -1:] - cum_f + log_i, -jnp.inf)
  (c_in, n_in, m_in), final_state = _chunk_states(k, v, to_end, doc_f[..., -1], resets, state)

  log_d = jnp.where(pairs, cum_f[..., :, None] - cum_f[..., None, :] + log_i[..., None, :],
                    -jnp.inf)  # [B,H,N,L,L]
  m_inter = doc_f + jnp.where(first, m_in[..., None], 0)  # [B,H,N,L]
  m_comb = jnp.maximum(m_inter, jnp.max(log_d, axis=-1))
  q = scale * q
  scores = jnp.einsum("bhnlk,bhnsk->bhnls", q, k, precision=_HIGHEST) \
      * jnp.exp(log_d - m_comb[..., None])
  inter_w = jnp.where(first, jnp.exp(m_inter - m_comb), 0)
  num = inter_w[..., None] * jnp.einsum("bhnlk,bhnkv->bhnlv", q, c_in, precision=_HIGHEST) \
      + jnp.einsum("bhnls,bhnsv->bhnlv", scores, v, precision=_HIGHEST)
  qn = inter_w * jnp.einsum("bhnlk,bhnk->bhnl", q, n_in, precision=_HIGHEST) \
      + jnp.sum(scores, axis=-1)
  out = num / (jnp.maximum(jnp.abs(qn), jnp.exp(-m_comb)) + eps)[..., None]
  out = jnp.moveaxis(out, 1, 3).reshape(b, n_chunks * size, h, dv)
  return out[:, :t], final_state


def _pallas_unsupported(q, k, v) -> str | None:
  """None when the Pallas kernel supports this call, else the reason."""
  dtypes = {jnp.dtype(x.dtype) for x in (q, k, v)}
  if len(dtypes) != 1 or dtypes.pop() not in (jnp.bfloat16, jnp.float32):
    return f"q, k, v must share one dtype of bfloat16/float32, got {q.dtype}, {k.dtype}, {v.dtype}"
  return chunk_common.unsupported_reason(q.shape[-1], v.shape[-1])


@functools.partial(jax.jit, static_argnames=("scale", "eps"))
def _mlstm_pallas(q, k, v, i, f, initial_state: MLSTMState | None, segment_ids, *, scale: float,
                  eps: float):
  """The Pallas kernel on q [B,T,H,Dk], k [B,T,Hk,Dk], v [B,T,Hk,Dv] (one dtype), gate
  pre-activations i, f [B,T,H or Hk], segment_ids [B,T] int or None. Returns (h [B,T,H,Dv] in q's
  dtype, final state)."""
  b, _, h, dk = q.shape
  k, v, i, f = (repeat_heads(x, h) for x in (k, v, i, f))
  i, f = (jnp.asarray(x, jnp.float32) for x in (i, f))
  state = (_zero_state(b, h, dk, v.shape[-1], jnp.float32) if initial_state is None
           else tuple(jnp.asarray(x, jnp.float32) for x in initial_state))
  return mlstm_kernel.mlstm(q, k, v, i, jax.nn.log_sigmoid(f), state, scale=scale, eps=eps,
                            segment_ids=segment_ids, interpret=pallas_interpret())


def mlstm(q, k, v, i, f, *, scale: float | None = None, initial_state: MLSTMState | None = None,
          output_final_state: bool = False, segment_ids=None, chunk_size: int = 64,
          eps: float = 1e-6, impl: str = "auto"):
  """mLSTM (xLSTM matrix memory) over a sequence.

  Args:
    q: queries [B,T,H,Dk].
    k: keys [B,T,Hk,Dk], Hk dividing H (GQA).
    v: values [B,T,Hk,Dv].
    i: input-gate pre-activations [B,T,H] or [B,T,Hk]; log i_t = i.
    f: forget-gate pre-activations [B,T,H] or [B,T,Hk]; log f_t = log_sigmoid(f).
    scale: query scale, default Dk**-0.5.
    initial_state: (C [B,H,Dk,Dv], n [B,H,Dk], m [B,H]); default zeros.
    output_final_state: also return the final state.
    segment_ids: [B,T] int packed-document ids, or None (one document per row). A change of id
      between tokens t - 1 and t starts a document at t: the state (C, n, m) is reset to zeros
      before t, so initial_state applies to the row's first document only and the final state is
      that of the last document. Every impl supports it.
    chunk_size: chunk length of the `xla` path.
    eps: added to the normaliser's denominator.
    impl: "auto" | "reference" | "xla" | "pallas" ("pallas": head dims 64 or 128, q, k, v of
      one dtype; "auto" picks it on GPU when it applies).

  Returns:
    (h [B,T,H,Dv] in q's dtype, final state (C, n, m) in float32 or None).
  """
  b, t, h, hk, dk, dv = check_qkv(q, k, v)
  check_gate(i, "i", b, t, (h, hk))
  check_gate(f, "f", b, t, (h, hk))
  if initial_state is not None:
    _check_state(initial_state, "initial_state", b, h, dk, dv)
  check_segment_ids(segment_ids, b, t)
  if not isinstance(chunk_size, int) or chunk_size < 1:
    raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
  path = resolve_impl(impl, "mlstm",
                      pallas_unsupported=_pallas_unsupported(q, k, v))
  scale = default_scale(scale, dk)
  if path == "pallas":
    ids = None if segment_ids is None else jnp.asarray(segment_ids)
    out, final_state = _mlstm_pallas(q, k, v, i, f, initial_state, ids, scale=float(scale),
                                     eps=float(eps))
    return out, (final_state if output_final_state else None)
  out_dtype = q.dtype
  dtype = compute_dtype(q, k, v, i, f)
  q, k, v, i, f = (jnp.asarray(x, dtype) for x in (q, k, v, i, f))
  k, v, i, f = (repeat_heads(x, h) for x in (k, v, i, f))
  state = (_zero_state(b, h, dk, dv, dtype) if initial_state is None
           else tuple(jnp.asarray(x, dtype) for x in initial_state))
  log_f = jax.nn.log_sigmoid(f)
  starts = None if segment_ids is None else document_starts(jnp.asarray(segment_ids))
  if path == "reference":
    if starts is None:
      starts = jnp.zeros((b, t), bool)
    out, final_state = _mlstm_reference(q, k, v, i, log_f, state, starts, scale=scale, eps=eps)
  else:
    out, final_state = _mlstm_chunkwise(q, k, v, i, log_f, state, starts, scale=scale, eps=eps,
                                        chunk_size=chunk_size)
  return out.astype(out_dtype), (final_state if output_final_state else None)


def _check_step_inputs(q, k, v, i, f):
  """Validates single-token q [B,H,Dk], k [B,Hk,Dk], v [B,Hk,Dv], i, f [B,H] or [B,Hk].

  Returns (B, H, Hk, Dk, Dv).
  """
  check_rank(q, 3, "q", "[batch, heads, head_dim]")
  b, h, dk = q.shape
  if jnp.ndim(k) != 3 or k.shape[0] != b or k.shape[2] != dk or h % k.shape[1]:
    raise ValueError(f"k must have shape [{b}, kv_heads, {dk}] with kv_heads dividing {h}, "
                     f"got {jnp.shape(k)}")
  hk = k.shape[1]
  if jnp.ndim(v) != 3 or v.shape[:2] != (b, hk):
    raise ValueError(f"v must have shape [{b}, {hk}, head_dim_v], got {jnp.shape(v)}")
  for gate, name in ((i, "i"), (f, "f")):
    if jnp.ndim(gate) != 2 or gate.shape[0] != b or gate.shape[1] not in (h, hk):
      raise ValueError(f"{name} must have shape [{b}, {' or '.join(map(str, sorted({h, hk})))}], "
                       f"got {jnp.shape(gate)}")
  return b, h, hk, dk, v.shape[2]


def mlstm_step(q, k, v, i, f, state: MLSTMState | None, *, scale: float | None = None,
               eps: float = 1e-6):
  """One decode step of `mlstm`, continuing exactly from a prefill's final state.

  Args:
    q: query [B,H,Dk].
    k: key [B,Hk,Dk].
    v: value [B,Hk,Dv].
    i: input-gate pre-activation [B,H] or [B,Hk].
    f: forget-gate pre-activation [B,H] or [B,Hk].
    state: (C [B,H,Dk,Dv], n [B,H,Dk], m [B,H]), or None for zeros.
    scale: query scale, default Dk**-0.5.
    eps: added to the normaliser's denominator.

  Returns:
    (h [B,H,Dv] in q's dtype, new state (C, n, m) in float32).
  """
  b, h, _, dk, dv = _check_step_inputs(q, k, v, i, f)
  if state is not None:
    _check_state(state, "state", b, h, dk, dv)
  scale = default_scale(scale, dk)
  out_dtype = q.dtype
  dtype = compute_dtype(q, k, v, i, f)
  q, k, v, i, f = (jnp.asarray(x, dtype) for x in (q, k, v, i, f))
  k, v, i, f = (repeat_heads(x, h, axis=1) for x in (k, v, i, f))
  state = (_zero_state(b, h, dk, dv, dtype) if state is None
           else tuple(jnp.asarray(x, dtype) for x in state))
  out, new_state = _recurrent_step(state, q, k, v, i, jax.nn.log_sigmoid(f), scale=scale, eps=eps)
  return out.astype(out_dtype), new_state
