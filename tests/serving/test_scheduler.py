"""Host-side pieces of the engine: power-of-two prefill pieces, the page pool, the scheduler's
token budget, and the sampler's top-k / top-p / temperature behaviour."""

import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.serving.pages import PagePool, PageTables
from jaxchunk.serving.sampling import SamplingParams, sample_tokens
from jaxchunk.serving.scheduler import Request, Scheduler, power_of_two_pieces


@pytest.mark.parametrize("n", [1, 5, 16, 23, 64, 77])
def test_power_of_two_pieces(n):
  pieces = power_of_two_pieces(n, 16)
  assert sum(pieces) == n
  assert all(p <= 16 and p & (p - 1) == 0 for p in pieces)
  assert pieces == sorted(pieces, reverse=True)


def test_page_pool_alloc_free():
  pool = PagePool(5, 4)
  assert pool.alloc(5) is None and pool.num_free == 4  # all or nothing
  pages = pool.alloc(3)
  assert 0 not in pages and pool.num_free == 1
  pool.free(pages)
  with pytest.raises(ValueError, match="double free"):
    pool.free(pages[:1])
  tables = PageTables(pool, num_slots=2, pages_per_seq=3)
  assert tables.ensure(0, 9) and tables.table[0].min() > 0
  with pytest.raises(ValueError, match="pages of a sequence"):
    tables.ensure(1, 13)
  tables.release(0)
  assert pool.num_free == 4 and (tables.table == 0).all()


def test_budget_puts_decodes_first_then_one_prefill_piece():
  scheduler = Scheduler(2, max_len=64, chunk_size=8, token_budget=7, tables=None)
  params = SamplingParams(max_tokens=4)
  running = Request(0, [1, 2], params, 0, 0.0, tokens=[1, 2])
  scheduler.add(running)
  first = scheduler.schedule()
  assert [p.length for p in first.prefills] == [2] and running.slot == 0
  running.tokens.append(3)
  running.status = running.status.DECODE
  scheduler.add(Request(1, list(range(20)), params, 0, 0.0, tokens=list(range(20))))
  second = scheduler.schedule()
  assert second.decodes == [running]
  # 7 - 1 decode = 6 prompt tokens fit; a step that decodes takes the largest piece only.
  assert [p.length for p in second.prefills] == [4]
  scheduler.finish(running, "stop")
  third = scheduler.schedule()  # nothing decodes: as many pieces as the budget holds
  assert not third.decodes and [(p.start, p.length) for p in third.prefills] == [(4, 4), (8, 2),
                                                                                  (10, 1)]


def test_mixed_chunk_size_caps_only_the_piece_of_a_step_that_decodes():
  scheduler = Scheduler(2, max_len=64, chunk_size=8, token_budget=9, tables=None)
  scheduler.mixed_chunk_size = 2
  params = SamplingParams(max_tokens=4)
  running = Request(0, [1, 2, 3], params, 0, 0.0, tokens=[1, 2, 3])
  scheduler.add(running)
  # No decodes yet: pieces up to chunk_size fill the budget.
  assert [p.length for p in scheduler.schedule().prefills] == [2, 1]
  running.tokens.append(4)
  running.status = running.status.DECODE
  scheduler.add(Request(1, list(range(20)), params, 0, 0.0, tokens=list(range(20))))
  second = scheduler.schedule()
  assert second.decodes == [running] and [p.length for p in second.prefills] == [2]
  scheduler.finish(running, "stop")
  assert [p.length for p in scheduler.schedule().prefills] == [8, 1]


def test_sampler_filters():
  logits = jnp.asarray(np.log(np.array([[0.5, 0.3, 0.15, 0.05]] * 2000, np.float32)))
  n = logits.shape[0]
  ones = jnp.ones((n,), jnp.float32)
  seeds = jnp.arange(n, dtype=jnp.uint32)
  counters = jnp.zeros((n,), jnp.int32)
  top2, _ = sample_tokens(logits, ones, jnp.full((n,), 2, jnp.int32), ones, seeds, counters)
  assert set(np.asarray(top2).tolist()) == {0, 1}
  nucleus, lp = sample_tokens(logits, ones, jnp.zeros((n,), jnp.int32), 0.7 * ones, seeds, counters)
  assert set(np.asarray(nucleus).tolist()) == {0, 1}
  np.testing.assert_allclose(np.exp(np.asarray(lp)), np.where(np.asarray(nucleus) == 0, 0.5, 0.3),
                             rtol=1e-5)
  full, _ = sample_tokens(logits, ones, jnp.zeros((n,), jnp.int32), ones, seeds, counters)
  freq = np.bincount(np.asarray(full), minlength=4) / n
  np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.04)
  greedy, _ = sample_tokens(logits, 0 * ones, jnp.zeros((n,), jnp.int32), ones, seeds, counters)
  assert (np.asarray(greedy) == 0).all()
