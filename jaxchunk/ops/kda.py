"""Kimi Delta Attention (KDA): the delta rule with a per-key-channel log-decay.

  S_t = (I - beta_t k_t^T k_t) diag(exp(gk_t)) S_{t-1} + beta_t k_t^T v_t,    o_t = scale * q_t S_t,

with a [Dk, Dv] float32 state per head: the decay acts on the state's rows (key channels) before the
delta-rule update. The "xla" path is the chunked WY / UT-transform form shared with
`jaxchunk.ops.delta_rule` (see its module docstring); the per-channel decays inside a chunk go
through in-between reference points so no exponent can overflow (`jaxchunk.ops._gated_chunk`).
"""

from __future__ import annotations

from jaxchunk.ops.delta_rule import _delta_family, _delta_family_step


def kda(q, k, v, gk, beta, *, scale=None, initial_state=None, output_final_state=False,
        segment_ids=None, chunk_size=64, impl="auto"):
  """Kimi Delta Attention over a whole sequence.

  Args:
    q: [B, T, H, Dk] queries.
    k: [B, T, Hk, Dk] keys (usually L2-normalised), Hk dividing H (GQA).
    v: [B, T, Hk, Dv] values.
    gk: [B, T, H, Dk] or [B, T, Hk, Dk] per-key-channel log-decays, <= 0.
    beta: [B, T, H] or [B, T, Hk] write strengths, usually in (0, 1).
    scale: multiplies q; defaults to Dk ** -0.5.
    initial_state: [B, H, Dk, Dv] float32 state before the first token, or None (zeros).
    output_final_state: whether to return the state after the last token.
    segment_ids: [B, T] int packed-document ids, or None (one document per row). A change of id
      between tokens t - 1 and t starts a document at t: the state is reset to zero before t, so
      initial_state applies to the row's first document only and the final state is that of the
      last document. impl="pallas" does not support it ("auto" picks "xla").
    chunk_size: tokens per chunk of the "xla" path; T need not be a multiple of it.
    impl: "auto", "reference" (token-by-token scan), "xla" (chunked) or "pallas".

  Returns:
    (o [B, T, H, Dv] in q's dtype, final state [B, H, Dk, Dv] float32 or None).
  """
  return _delta_family("kda", q, k, v, beta, gk, "gk", per_channel=True, scale=scale,
                       initial_state=initial_state, output_final_state=output_final_state,
                       segment_ids=segment_ids, chunk_size=chunk_size, impl=impl)


def kda_step(q, k, v, gk, beta, state, *, scale=None):
  """One decode token of `kda`, continuing from `state` (a prefill's final state).

  Args:
    q: [B, H, Dk]; k: [B, Hk, Dk]; v: [B, Hk, Dv]; gk: [B, H, Dk] or [B, Hk, Dk] log-decays <= 0;
    beta: [B, H] or [B, Hk].
    state: [B, H, Dk, Dv] float32, or None (zeros).
    scale: multiplies q; defaults to Dk ** -0.5.

  Returns:
    (o [B, H, Dv] in q's dtype, new state [B, H, Dk, Dv] float32).
  """
  return _delta_family_step("kda_step", q, k, v, beta, gk, "gk", state, per_channel=True,
                            scale=scale)
