"""The Pallas paged-attention kernel (interpret mode on CPU) against a float64 NumPy oracle and the
xla path: decode over ragged lengths, shuffled page tables, GQA, split-K, chunked prefill with
per-row offsets, ragged batches mixing decodes and prefill chunks, window, softcap, bf16; and its
lowering to Triton for an (abstract) H100."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.ops.paged_attention import chunked_prefill_attention, paged_decode_attention
from pallas_kernels.gpu import paged_attention as paged_kernel
from pallas_kernels.gpu.flash_common import BlockConfig
from tests.utils import assert_rel_close, randn

B, H, HK, D, PAGE, PAGES_PER_SEQ = 3, 4, 2, 64, 16, 8
NUM_PAGES = B * PAGES_PER_SEQ + 1  # page 0 is the engine's scratch page


def oracle(q, k_pages, v_pages, table, q_offset, q_length, kv_length, window=None, softcap=None):
  """Float64 attention of q [B,T,H,D] (row b: queries i < q_length[b] at q_offset[b] + i) to the
  keys of each row's pages; padding queries and queries without a key output zeros."""
  q, k_pages, v_pages = (np.asarray(x, np.float64) for x in (q, k_pages, v_pages))
  table = np.asarray(table)
  b, t, h, d = q.shape
  out = np.zeros_like(q)
  for bi in range(b):
    k = k_pages.take(table[bi], axis=0, mode="clip").reshape(-1, HK, d)  # unused ids: not read
    v = v_pages.take(table[bi], axis=0, mode="clip").reshape(-1, HK, d)
    for i in range(q_length[bi]):
      pos = q_offset[bi] + i
      keys = np.arange(min(pos + 1, kv_length[bi], k.shape[0]))
      if window is not None:
        keys = keys[pos - keys < window]
      if keys.size == 0:
        continue
      for hi in range(h):
        kh = hi // (h // HK)
        s = k[keys, kh] @ q[bi, i, hi] / np.sqrt(d)
        if softcap is not None:
          s = softcap * np.tanh(s / softcap)
        p = np.exp(s - s.max())
        out[bi, i, hi] = (p / p.sum()) @ v[keys, kh]
  return out


def pools(rng, scratch=0.0):
  """Random pools [NUM_PAGES, PAGE, HK, D] whose scratch page 0 holds `scratch`."""
  k, v = randn(rng, NUM_PAGES, PAGE, HK, D), randn(rng, NUM_PAGES, PAGE, HK, D)
  k[0], v[0] = scratch, scratch
  return k, v


def run(op, *args, **options):
  """op(*args, **options) under jit (faster than eager dispatch in interpret mode)."""
  return jax.jit(functools.partial(op, **options))(*args)


def page_table(rng, lengths, unused=0):
  """Shuffled, non-contiguous pages for each row; entries past a row's length name page `unused`
  (the scratch page 0, or an id outside the pool)."""
  table = rng.permutation(np.arange(1, NUM_PAGES)).reshape(B, PAGES_PER_SEQ).astype(np.int32)
  used = -(-np.asarray(lengths) // PAGE)
  table[np.arange(PAGES_PER_SEQ)[None, :] >= used[:, None]] = unused
  return table


def test_decode_ragged_lengths(rng):
  """Lengths inside the first page, on a page boundary, mid-page, one and the full table; unused
  table entries name the scratch page, holding NaN, or an id past the pool (neither reaches the
  output). 3 splits of few blocks leave some empty (the prefill tests run with 1 split)."""
  k_pages, v_pages = pools(rng, scratch=np.nan)
  decode = jax.jit(functools.partial(paged_decode_attention, num_splits=3, impl="pallas"))
  for lengths, unused in ((np.array([5, 32, 117]), 0), (np.array([1, 128, 80]), NUM_PAGES + 7)):
    table = page_table(rng, lengths, unused)
    q = randn(rng, B, H, D)
    o = decode(jnp.asarray(q), jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(table),
               jnp.asarray(lengths, jnp.int32))
    want = oracle(q[:, None], k_pages, v_pages, table, lengths - 1, np.ones(B, int), lengths)
    assert_rel_close(o, want[:, 0], 1e-5, f"decode lengths {lengths}")


def test_decode_window_softcap_matches_xla(rng):
  k_pages, v_pages = pools(rng)
  lengths = np.array([7, 64, 121])
  table = page_table(rng, lengths)
  q = randn(rng, B, H, D)
  args = [jnp.asarray(x) for x in (q, k_pages, v_pages, table, lengths)]
  o = run(paged_decode_attention, *args, window=40, softcap=3.0, num_splits=2, impl="pallas")
  ref = run(paged_decode_attention, *args, window=40, softcap=3.0, impl="xla")
  want = oracle(q[:, None], k_pages, v_pages, table, lengths - 1, np.ones(B, int), lengths,
                window=40, softcap=3.0)
  assert_rel_close(o, want[:, 0], 1e-5, "decode window softcap vs oracle")
  assert_rel_close(o, ref, 1e-5, "decode window softcap vs xla")


@pytest.mark.parametrize("window,softcap", [(None, None), (24, 5.0)])
def test_chunked_prefill_per_row_offsets(rng, window, softcap):
  """T = 20 new tokens at offsets 0, 37 and 100 (ending 8 keys before the table's end)."""
  t, q_offset = 20, np.array([0, 37, 100])
  k_pages, v_pages = pools(rng)
  table = page_table(rng, q_offset + t)
  q = randn(rng, B, t, H, D)
  args = [jnp.asarray(x) for x in (q, k_pages, v_pages, table, q_offset)]
  o = run(chunked_prefill_attention, *args, window=window, softcap=softcap, impl="pallas")
  ref = run(chunked_prefill_attention, *args, window=window, softcap=softcap, impl="xla")
  want = oracle(q, k_pages, v_pages, table, q_offset, np.full(B, t), q_offset + t, window,
                softcap)
  assert_rel_close(o, want, 1e-5, f"prefill window={window} softcap={softcap} vs oracle")
  assert_rel_close(o, ref, 1e-5, f"prefill window={window} softcap={softcap} vs xla")


def test_ragged_batch_mixes_decode_and_prefill(rng):
  """One call: a decode row (q_length 1), a full chunk and a partial chunk whose kv_length stops
  inside it (its later queries see only the keys before kv_length)."""
  t = 16
  q_offset, q_length = np.array([90, 0, 41]), np.array([1, 16, 7])
  kv_length = q_offset + q_length - np.array([0, 0, 4])
  k_pages, v_pages = pools(rng)
  table = page_table(rng, kv_length)
  q = randn(rng, B, t, H, D)
  args = [jnp.asarray(x) for x in (q, k_pages, v_pages, table, q_offset)]
  rows = dict(q_length=jnp.asarray(q_length), kv_length=jnp.asarray(kv_length))
  o = run(chunked_prefill_attention, *args, **rows, impl="pallas")
  ref = run(chunked_prefill_attention, *args, **rows, impl="xla")
  want = oracle(q, k_pages, v_pages, table, q_offset, q_length, kv_length)
  assert_rel_close(o, want, 1e-5, "ragged batch vs oracle")
  assert_rel_close(o, ref, 1e-5, "ragged batch vs xla")
  assert not np.any(np.asarray(o)[0, 1:]) and not np.any(np.asarray(o)[2, 7:])


def test_small_blocks_many_splits(rng):
  """16-row, 16-key blocks: several row blocks, unmasked middle blocks, 5 splits per row."""
  t, q_offset = 12, np.array([3, 50, 116])
  k_pages, v_pages = pools(rng)
  table = page_table(rng, q_offset + t)
  q = randn(rng, B, t, H, D)
  o = run(paged_kernel.paged_attention, jnp.asarray(q), jnp.asarray(k_pages),
          jnp.asarray(v_pages), jnp.asarray(table), jnp.asarray(q_offset, jnp.int32),
          jnp.full((B,), t, jnp.int32), jnp.asarray(q_offset + t, jnp.int32), scale=D ** -0.5,
          num_splits=5, config=BlockConfig(16, 16, 4, 1), interpret=True)
  want = oracle(q, k_pages, v_pages, table, q_offset, np.full(B, t), q_offset + t)
  assert_rel_close(o, want, 1e-5, "small blocks, 5 splits")


def test_bf16_and_vmap(rng):
  """bf16 queries and pools (<= 1e-2); vmap over two query sets sharing the pools."""
  k_pages, v_pages = pools(rng)
  lengths = np.array([19, 48, 100])
  table = page_table(rng, lengths)
  q = randn(rng, 2, B, H, D)
  decode = functools.partial(paged_decode_attention, num_splits=2, impl="pallas")
  o = jax.jit(jax.vmap(decode, in_axes=(0, None, None, None, None)))(
      jnp.asarray(q, jnp.bfloat16), jnp.asarray(k_pages, jnp.bfloat16),
      jnp.asarray(v_pages, jnp.bfloat16), jnp.asarray(table), jnp.asarray(lengths))
  assert o.dtype == jnp.bfloat16
  for n in range(2):
    want = oracle(q[n][:, None], k_pages, v_pages, table, lengths - 1, np.ones(B, int), lengths)
    assert_rel_close(o[n], want[:, 0], 1e-2, f"bf16 vmapped decode {n}")


@pytest.mark.filterwarnings("ignore:The Pallas Triton backend is deprecated:DeprecationWarning")
@pytest.mark.parametrize("dtype,head_dim,t,group,window,softcap,fold", [
    ("bfloat16", 128, 1, 4, None, None, 1),   # decode, GQA group 4
    ("bfloat16", 64, 1, 1, 32, None, 2),      # decode, 2 kv heads folded per program
    ("float16", 256, 16, 3, 64, None, 1),     # prefill, group 3 (rows not a power of two)
    ("float32", 64, 40, 2, None, 30.0, 1),    # prefill, several row blocks, softcap
])
def test_lowers_to_triton(dtype, head_dim, t, group, window, softcap, fold):
  """The kernel lowers to a Triton call for an abstract H100 (no GPU needed): every primitive and
  load it uses has a Triton lowering."""
  b, kv_heads, num_pages = 2, 2, 17
  shape = jax.ShapeDtypeStruct
  rows = shape((b,), jnp.int32)
  attend = jax.jit(functools.partial(paged_kernel.paged_attention, scale=0.125, window=window,
                                     softcap=softcap, num_splits=4, fold=fold))
  h100 = jax.sharding.AbstractDevice("NVIDIA H100 80GB HBM3", 132, "cuda")
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ("x",),
                                                                abstract_device=h100)):
    lowered = attend.trace(
        shape((b, t, kv_heads * group, head_dim), dtype),
        *[shape((num_pages, PAGE, kv_heads, head_dim), dtype)] * 2,
        shape((b, PAGES_PER_SEQ), jnp.int32), rows, rows, rows).lower(lowering_platforms=("cuda",))
  assert "__gpu$xla.gpu.triton" in lowered.as_text()


def test_folded_heads_match_unfolded(rng):
  """Decode with 1 and 2 kv heads per program (block-diagonal queries against side-by-side keys)
  gives the same output; default_fold picks the most heads that fit 16 rows and 256 key columns,
  for one query token and batches that fill the GPU without split-K."""
  k_pages, v_pages = pools(rng)
  lengths = np.array([9, 70, 128])
  table = page_table(rng, lengths)
  q = jnp.asarray(randn(rng, B, 1, H, D))
  args = (q, jnp.asarray(k_pages), jnp.asarray(v_pages), jnp.asarray(table),
          jnp.asarray(lengths - 1, jnp.int32), jnp.ones(B, jnp.int32), jnp.asarray(lengths))
  options = dict(scale=D ** -0.5, window=50, num_splits=2, interpret=True)
  folded, unfolded = (run(paged_kernel.paged_attention, *args, fold=f, **options) for f in (2, 1))
  assert_rel_close(folded, unfolded, 1e-6, "fold 2 vs 1")
  want = oracle(np.asarray(q), k_pages, v_pages, table, lengths - 1, np.ones(B, int), lengths,
                window=50)
  assert_rel_close(folded, want, 1e-5, "fold 2 vs oracle")
  fold = functools.partial(paged_kernel.default_fold, num_sms=132)
  assert fold(1, 64, 16, 1, 64) == 4    # MHA, D=64: 4 x 64 columns
  assert fold(1, 64, 8, 4, 128) == 2    # GQA 4, D=128: 8 rows, 256 columns
  assert fold(1, 64, 8, 16, 128) == 1   # a full row block already
  assert fold(16, 64, 16, 1, 64) == 1   # prefill chunks are not folded
  assert fold(1, 16, 8, 4, 128) == 1    # 128 programs: split-K, not folding
  with pytest.raises(ValueError, match="fold"):
    paged_kernel.paged_attention(*args, fold=3, **options)


def test_default_num_splits():
  """Splits make SPLIT_WAVES programs per SM for few programs, keep MIN_BLOCKS_PER_SPLIT blocks
  each, and vanish for many programs."""
  assert paged_kernel.SPLIT_WAVES == 2
  assert paged_kernel.default_num_splits(8, 512, num_sms=132) == 33
  assert paged_kernel.default_num_splits(128, 512, num_sms=132) == 2
  assert paged_kernel.default_num_splits(3, 512, num_sms=132) == 88
  most = 16 // paged_kernel.MIN_BLOCKS_PER_SPLIT
  assert paged_kernel.default_num_splits(8, 16, num_sms=132) == most
  assert paged_kernel.default_num_splits(1024, 512, num_sms=132) == 1
  assert paged_kernel.default_num_splits(4, 2, num_sms=132) == 1


def test_dispatch_and_bad_arguments(rng):
  k_pages, v_pages = (jnp.asarray(x) for x in pools(rng))
  table = jnp.asarray(page_table(rng, [16, 16, 16]))
  q = jnp.asarray(randn(rng, B, H, D))
  lengths = jnp.array([3, 9, 16])
  args = (q, k_pages, v_pages, table, lengths)
  auto = "pallas" if jax.default_backend() == "gpu" else "xla"
  assert_rel_close(run(paged_decode_attention, *args), run(paged_decode_attention, *args,
                                                           impl=auto), 0.0, f"auto: {auto}")
  small = (jnp.asarray(randn(rng, NUM_PAGES, PAGE, HK, 32)),) * 2
  with pytest.raises(NotImplementedError, match="head_dim 32"):
    paged_decode_attention(q[..., :32], *small, table, lengths, impl="pallas")
  with pytest.raises(NotImplementedError, match="float64|int32"):
    paged_decode_attention(q, k_pages.astype(jnp.int32), v_pages.astype(jnp.int32), table,
                           lengths, impl="pallas")
  with pytest.raises(ValueError, match="q_length"):
    chunked_prefill_attention(q[:, None], k_pages, v_pages, table, lengths - 1,
                              q_length=jnp.ones((B + 1,), jnp.int32), impl="pallas")
  with pytest.raises(ValueError, match="num_splits"):
    paged_decode_attention(q, k_pages, v_pages, table, lengths, num_splits=0, impl="pallas")
  with pytest.raises(ValueError, match="window"):
    paged_decode_attention(q, k_pages, v_pages, table, lengths, window=0, impl="pallas")
  with pytest.raises(ValueError, match="k_pages"):
    paged_decode_attention(q[..., :32], k_pages, v_pages, table, lengths, impl="pallas")
