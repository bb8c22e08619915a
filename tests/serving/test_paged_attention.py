"""paged_write / chunked_prefill_attention / paged_decode_attention against a float64 NumPy oracle
on a shuffled page pool (GQA, window, per-row offsets), and their argument checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.paged_attention import (chunked_prefill_attention, paged_decode_attention,
                                          paged_slots, paged_write, paged_write_slots)
from tests.utils import assert_rel_close, randn

B, H, HK, D, PAGE, PAGES_PER_SEQ = 2, 4, 2, 8, 4, 5


def oracle(q, k, v, q_offset, window=None):
  """Causal attention of q [B,T,H,D] (positions q_offset[b] + i) to contiguous k, v [B,L,Hk,D]."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  b, t, h, d = q.shape
  out = np.zeros_like(q)
  for bi in range(b):
    for i in range(t):
      pos = q_offset[bi] + i
      keys = np.arange(pos + 1)
      if window is not None:
        keys = keys[pos - keys < window]
      for hi in range(h):
        kh = hi // (h // k.shape[2])
        s = k[bi, keys, kh] @ q[bi, i, hi] / np.sqrt(d)
        p = np.exp(s - s.max())
        out[bi, i, hi] = (p / p.sum()) @ v[bi, keys, kh]
  return out


def setup(rng, t, q_offset):
  """A shuffled pool holding contiguous keys k, v [B, q_offset + t, Hk, D] of every row."""
  num_pages = B * PAGES_PER_SEQ + 1
  table = rng.permutation(np.arange(1, num_pages)).reshape(B, PAGES_PER_SEQ).astype(np.int32)
  length = max(q_offset) + t
  k, v = randn(rng, B, length, HK, D), randn(rng, B, length, HK, D)
  pools = jnp.asarray(randn(rng, num_pages, PAGE, HK, D)), jnp.asarray(randn(rng, num_pages, PAGE, HK, D))
  positions = np.broadcast_to(np.arange(length, dtype=np.int32), (B, length))
  k_pages, v_pages = paged_write(*pools, jnp.asarray(k), jnp.asarray(v), jnp.asarray(table),
                                 jnp.asarray(positions))
  return k, v, k_pages, v_pages, jnp.asarray(table)


def test_write_slots_of_two_tables_equals_two_writes(rng):
  """One scatter for two streams (decodes [B, 1] and a piece [1, 6], each with its page table)
  writes what two `paged_write` calls write."""
  num_pages = B * PAGES_PER_SEQ + 1
  pools = [jnp.asarray(randn(rng, num_pages, PAGE, HK, D)) for _ in range(2)]
  tables = rng.permutation(np.arange(1, num_pages)).reshape(B, PAGES_PER_SEQ).astype(np.int32)
  streams = [(jnp.asarray(tables), jnp.asarray([[7], [2]], jnp.int32)),
             (jnp.asarray(tables[1:]), jnp.asarray([np.arange(9, 15)], jnp.int32))]
  ks = [jnp.asarray(randn(rng, *p.shape, HK, D)) for _, p in streams]
  vs = [jnp.asarray(randn(rng, *p.shape, HK, D)) for _, p in streams]
  expected = pools
  for (table, positions), k, v in zip(streams, ks, vs):
    expected = paged_write(*expected, k, v, table, positions)
  slots = jnp.concatenate([paged_slots(table, positions, PAGE) for table, positions in streams])
  flat = lambda xs: jnp.concatenate([x.reshape(-1, HK, D) for x in xs])
  got = paged_write_slots(*pools, flat(ks), flat(vs), slots)
  for g, e in zip(got, expected):
    np.testing.assert_array_equal(np.asarray(g), np.asarray(e))
  with pytest.raises(ValueError, match="slots"):
    paged_write_slots(*pools, flat(ks), flat(vs), slots[None])
  with pytest.raises(ValueError, match="k must"):
    paged_write_slots(*pools, flat(ks)[1:], flat(vs), slots)


@pytest.mark.parametrize("impl", ["reference", "xla"])
@pytest.mark.parametrize("window", [None, 5])
def test_chunked_prefill_matches_oracle(rng, impl, window):
  t, q_offset = 6, np.array([3, 11], np.int32)
  k, v, k_pages, v_pages, table = setup(rng, t, q_offset)
  q = randn(rng, B, t, H, D)
  o = chunked_prefill_attention(jnp.asarray(q), k_pages, v_pages, table, jnp.asarray(q_offset),
                                window=window, impl=impl)
  assert_rel_close(o, oracle(q, k, v, q_offset, window), 1e-5, f"prefill {impl}")


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_decode_matches_oracle_and_jits(rng, impl):
  lengths = np.array([7, 18], np.int32)
  k, v, k_pages, v_pages, table = setup(rng, 1, lengths - 1)
  q = randn(rng, B, H, D)
  decode = jax.jit(lambda *a: paged_decode_attention(*a, impl=impl))
  o = decode(jnp.asarray(q), k_pages, v_pages, table, jnp.asarray(lengths))
  assert_rel_close(o, oracle(q[:, None], k, v, lengths - 1)[:, 0], 1e-5, f"decode {impl}")


def test_bf16_pool(rng):
  lengths = np.array([9, 4], np.int32)
  k, v, k_pages, v_pages, table = setup(rng, 1, lengths - 1)
  q = randn(rng, B, H, D)
  o = paged_decode_attention(jnp.asarray(q, jnp.bfloat16), k_pages.astype(jnp.bfloat16),
                             v_pages.astype(jnp.bfloat16), table, jnp.asarray(lengths))
  assert o.dtype == jnp.bfloat16
  assert_rel_close(o, oracle(q[:, None], k, v, lengths - 1)[:, 0], 1e-2, "bf16 decode")


def test_bad_arguments(rng):
  k, v, k_pages, v_pages, table = setup(rng, 1, np.array([2, 2]))
  q = jnp.asarray(randn(rng, B, H, D))
  with pytest.raises(ValueError, match="v_pages"):
    paged_decode_attention(q, k_pages, v_pages[:, :2], table, jnp.array([3, 3]))
  with pytest.raises(ValueError, match="page_table"):
    paged_decode_attention(q, k_pages, v_pages, table[:1], jnp.array([3, 3]))
  with pytest.raises(ValueError, match="lengths"):
    paged_decode_attention(q, k_pages, v_pages, table, jnp.array([3, 3, 3]))
  with pytest.raises(ValueError, match="k_pages"):
    paged_decode_attention(q[..., :4], k_pages, v_pages, table, jnp.array([3, 3]))
  with pytest.raises(ValueError, match="page_table"):
    paged_decode_attention(q, k_pages, v_pages, table.astype(jnp.float32), jnp.array([3, 3]))
