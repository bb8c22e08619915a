"""Gated linear attention (GLA) with a per-key-channel log-decay.

  S_t = diag(exp(gk_t)) S_{t-1} + k_t^T v_t,    o_t = scale * q_t S_t,

with a [Dk, Dv] float32 state per head. The "xla" path is chunkwise-parallel. Its intra-chunk
attention matrix goes by blocks of 8 query rows: earlier keys factor exp(b_i - b_j) through a
reference point between key and query, so both factors are <= 1; keys inside a block go through
its middle row with log-decays floored at -16 (a change only to weights below e^-16). Chunk sizes
not a multiple of 8 use FLA's exact secondary chunking instead. Nothing overflows even with
strong decays over a whole chunk; see `jaxchunk.ops._gated_chunk` for the derivation.
"""

from __future__ import annotations

from jaxchunk.ops._gated_chunk import gated_linear_attention, gated_linear_attention_step


def gla(q, k, v, gk, *, scale=None, initial_state=None, output_final_state=False,
        segment_ids=None, chunk_size=64, impl="auto"):
  """Gated linear attention with a per-channel decay.

  Args:
    q: [B, T, H, Dk] queries.
    k: [B, T, Hk, Dk] keys, Hk dividing H (GQA).
    v: [B, T, Hk, Dv] values.
    gk: [B, T, H, Dk] or [B, T, Hk, Dk] per-key-channel log-decays, <= 0.
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
      "gla", q, k, v, gk, "gk", per_channel=True, scale=scale, initial_state=initial_state,
      output_final_state=output_final_state, segment_ids=segment_ids, chunk_size=chunk_size,
      impl=impl)


def gla_step(q, k, v, gk, state, *, scale=None):
  """One decode token of `gla`, continuing from `state` (a prefill's final state).

  Args:
    q: [B, H, Dk]; k: [B, Hk, Dk]; v: [B, Hk, Dv]; gk: [B, H, Dk] or [B, Hk, Dk] log-decays <= 0.
    state: [B, H, Dk, Dv] float32, or None (zeros).
    scale: multiplies q; defaults to Dk ** -0.5.

  Returns:
    (o [B, H, Dv] in q's dtype, new state [B, H, Dk, Dv] float32).
  """
  return gated_linear_attention_step("gla_step", q, k, v, gk, "gk", state, per_channel=True,
                                     scale=scale)
