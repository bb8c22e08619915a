"""The page pool and page tables of the paged KV cache (host side).

Page 0 is a scratch page: idle slots and unused page-table entries point at it, so writes of idle
rows land there and never in a page another request owns. Pages 1 .. num_pages - 1 are handed out
all-or-nothing by `PagePool.alloc`; a page is owned by one slot until freed, and freeing a page that
is not allocated raises instead of corrupting the free list.

When every attention layer of the model is a sliding window of `window` tokens, `PageTables.trim`
frees a slot's pages that no query from a given position on can see (all their positions at least
`window` before it); their table entries point back at the scratch page, which the windowed
attention masks out.
"""

from __future__ import annotations

import numpy as np

SCRATCH_PAGE = 0


def pages_needed(num_tokens: int, page_size: int) -> int:
  """Pages holding `num_tokens` positions."""
  return -(-num_tokens // page_size)


class PagePool:
  """Free list of pages 1 .. num_pages - 1 (page 0 is the scratch page)."""

  def __init__(self, num_pages: int, page_size: int):
    if num_pages < 2:
      raise ValueError(f"num_pages must be >= 2 (page 0 is scratch), got {num_pages}")
    if page_size < 1:
      raise ValueError(f"page_size must be >= 1, got {page_size}")
    self.num_pages = num_pages
    self.page_size = page_size
    self._free = list(range(num_pages - 1, 0, -1))  # pop() hands out low pages first
    self._allocated: set[int] = set()

  @property
  def num_free(self) -> int:
    return len(self._free)

  @property
  def capacity(self) -> int:
    """Pages a request may ever own (all but the scratch page)."""
    return self.num_pages - 1

  def alloc(self, n: int) -> list[int] | None:
    """n fresh pages, or None (and nothing taken) when fewer than n are free."""
    if n > len(self._free):
      return None
    pages = [self._free.pop() for _ in range(n)]
    self._allocated.update(pages)
    return pages

  def free(self, pages: list[int]) -> None:
    """Returns `pages` to the pool; each must be allocated."""
    for page in pages:
      if page not in self._allocated:
        raise ValueError(f"page {page} is not allocated (double free?)")
      self._allocated.remove(page)
      self._free.append(page)


class PageTables:
  """The host copy of the page table [num_slots, pages_per_seq] and the pages each slot owns.

  `owned[slot][i]` is the page at table entry i, or None once `trim` freed it. `window`: the
  attention window of every paged layer (None: some layer attends to all keys).
  """

  def __init__(self, pool: PagePool, num_slots: int, pages_per_seq: int,
               window: int | None = None):
    self.pool = pool
    self.window = window
    self.table = np.full((num_slots, pages_per_seq), SCRATCH_PAGE, np.int32)
    self.owned: list[list[int | None]] = [[] for _ in range(num_slots)]

  def ensure(self, slot: int, num_tokens: int) -> bool:
    """Gives `slot` pages for its first `num_tokens` positions; False (nothing taken) if short."""
    missing = pages_needed(num_tokens, self.pool.page_size) - len(self.owned[slot])
    if missing <= 0:
      return True
    if len(self.owned[slot]) + missing > self.table.shape[1]:
      raise ValueError(f"{num_tokens} tokens need more than the {self.table.shape[1]} pages of a "
                       "sequence")
    pages = self.pool.alloc(missing)
    if pages is None:
      return False
    start = len(self.owned[slot])
    self.table[slot, start:start + missing] = pages
    self.owned[slot].extend(pages)
    return True

  def trim(self, slot: int, first_position: int) -> None:
    """With a window: frees the pages of `slot` that queries at `first_position` and later cannot
    see (every position < first_position - window + 1)."""
    if self.window is None:
      return
    dead = max(0, first_position - self.window + 1) // self.pool.page_size
    owned = self.owned[slot]
    for i in range(min(dead, len(owned))):
      if owned[i] is not None:
        self.pool.free([owned[i]])
        owned[i] = None
        self.table[slot, i] = SCRATCH_PAGE

  def release(self, slot: int) -> None:
    """Frees every page of `slot` and points its table row back at the scratch page."""
    self.pool.free([page for page in self.owned[slot] if page is not None])
    self.owned[slot] = []
    self.table[slot] = SCRATCH_PAGE
