"""Simple gated linear attention: one scalar log-decay per head and token (Lightning / RetNet).

  S_t = exp(g_t) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t,

with a [Dk, Dv] float32 state per head. The "xla" path is chunkwise-parallel: an intra-chunk causal
attention matrix (q_i . k_j) exp(b_i - b_j), with b the cumulative log-decay inside the chunk and
the exponent masked to -inf above the diagonal before `exp`, plus an inter-chunk state pass (a
`lax.scan` over chunks); see `jaxchunk.ops._gated_chunk`.
"""

from __future__ import annotations

from jaxchunk.ops._gated_chunk import gated_linear_attention, gated_linear_attention_step


def simple_gla(q, k, v, g, *, scale=None, initial_state=None, output_final_state=False,
               segment_ids=None, chunk_size=64, impl="auto"):
  """Gated linear attention with a scalar decay per head.

  Args:
    q: [B, T, H, Dk] queries.
    k: [B, T, Hk, Dk] keys, Hk dividing H (GQA).
    v: [B, T, Hk, Dv] values.
    g: [B, T, H] or [B, T, Hk] log-decays, <= 0.
    scale: multiplies q; defaults to Dk ** -0.5.
    initial_state: [B, H, Dk, Dv] float32 state before the first token, or None (zeros).
    output_final_state: whether to return the state after the last token.
    segment_ids: [B, T] int packed-document ids, or None (one document per row). A change of id
      between tokens t - 1 and t starts a document at t: the state is reset to zero before t, so
      initial_state applies to the row's first document only and the final state is that of the
      last document. The Pallas kernels support it (masks, no change to the decays).
    chunk_size: tokens per chunk of the "xla" path; T need not be a multiple of it.
    impl: "auto", "reference" (token-by-token scan), "xla" (chunked) or "pallas".

  Returns:
    (o [B, T, H, Dv] in q's dtype, final state [B, H, Dk, Dv] float32 or None).
  """
  return gated_linear_attention(
      "simple_gla", q, k, v, g, "g", per_channel=False, scale=scale, initial_state=initial_state,
      output_final_state=output_final_state, segment_ids=segment_ids, chunk_size=chunk_size,
      impl=impl)


def simple_gla_step(q, k, v, g, state, *, scale=None):
  """One decode token of `simple_gla`, continuing from `state` (a prefill's final state).

  Args:
    q: [B, H, Dk]; k: [B, Hk, Dk]; v: [B, Hk, Dv]; g: [B, H] or [B, Hk] log-decays <= 0.
    state: [B, H, Dk, Dv] float32, or None (zeros).
    scale: multiplies q; defaults to Dk ** -0.5.

  Returns:
    (o [B, H, Dv] in q's dtype, new state [B, H, Dk, Dv] float32).
  """
  return gated_linear_attention_step("simple_gla_step", q, k, v, g, "g", state, per_channel=False,
                                     scale=scale)
