"""Continuous batching over a fixed number of slots with a per-step token budget (Sarathi-Serve).

Every step the scheduler (1) admits waiting requests into free slots, (2) schedules one decode
token for every running request, oldest first, and (3) fills what is left of `token_budget` with
prefill pieces of the admitted requests, oldest first. A piece has a power-of-two length of at most
`chunk_size` tokens (so the engine compiles one prefill shape per power of two and no padding token
ever enters a recurrent state). A step that decodes takes one piece, the largest that fits and at
most `mixed_chunk_size` tokens (the engine runs the decodes and that piece in one jitted call, so
the step's time is one decode plus at most one such piece; the engine may lower
`mixed_chunk_size` below `chunk_size` to keep those steps within a time limit); a step without
decodes fills the budget with as many pieces of up to `chunk_size` as fit. A long prompt therefore
never stalls the decodes for more than one piece per token.

Tokens sampled on the device but not yet fetched by the host count in `Request.pending`: the
engine dispatches a step before it fetches the previous step's tokens, so a request may decode
again while its last token is still on the device (its position and sampling counter include the
pending tokens). A request whose pending tokens reach its `max_tokens` or the engine's `max_len`
is not scheduled again; one that stops on a stop token is known only once fetched, so it may
decode one step more, whose token is discarded.

Pages: before a request computes tokens it must own pages for them. When the pool is short, the
request preempts the most recently admitted request not yet scheduled in this step (its pages are
freed and it goes back to the front of the queue to be recomputed from its prompt and the tokens
it has generated so far); when there is none it waits. The oldest request always fits alone (the
engine checks that every request fits in the pool), so the engine never deadlocks.

`prefill_first=True` is the baseline the benchmark compares against: whenever some admitted request
still has prompt tokens to compute, the step runs all of them (no budget) and no decodes.
"""

from __future__ import annotations

import collections
import dataclasses
import enum

from jaxchunk.serving.pages import PageTables
from jaxchunk.serving.sampling import SamplingParams


class Status(enum.Enum):
  WAITING = "waiting"    # queued, owns no slot
  PREFILL = "prefill"    # owns a slot, some of its tokens are not in the cache yet
  DECODE = "decode"      # all tokens but the last generated one are cached
  FINISHED = "finished"


@dataclasses.dataclass(eq=False)
class Request:
  """One generation request and its progress.

  `tokens` is the prompt followed by the generated tokens; the cache of its slot holds the first
  `num_computed` of them. `pending` more tokens were sampled on the device and are not in `tokens`
  yet (the engine fetches them a step later).
  """

  request_id: int
  prompt: list[int]
  params: SamplingParams
  seed: int
  arrival_time: float
  tokens: list[int] = dataclasses.field(default_factory=list)
  logprobs: list[float] = dataclasses.field(default_factory=list)
  status: Status = Status.WAITING
  slot: int | None = None
  num_computed: int = 0
  admit_order: int = -1
  finish_reason: str | None = None
  num_preemptions: int = 0
  pending: int = 0

  @property
  def generated(self) -> list[int]:
    """The generated tokens (a copy: `num_generated` counts them without one)."""
    return self.tokens[len(self.prompt):]

  @property
  def num_generated(self) -> int:
    return len(self.tokens) - len(self.prompt)

  def will_decode(self, max_len: int) -> bool:
    """Whether a decode step would produce a token this request keeps (not past its max_tokens
    or max_len, counting its pending tokens)."""
    return (self.status is Status.DECODE
            and self.num_generated + self.pending < self.params.max_tokens
            and len(self.tokens) + self.pending < max_len)


@dataclasses.dataclass
class PrefillPiece:
  """Tokens request.tokens[start:start + length] to run through the request's slot."""

  request: Request
  start: int
  length: int

  @property
  def completes(self) -> bool:
    """Whether this piece computes the request's last token (its logits give the next token)."""
    return self.start + self.length == len(self.request.tokens)


@dataclasses.dataclass
class Schedule:
  """The work of one engine step."""

  decodes: list[Request]
  prefills: list[PrefillPiece]      # at most one when there are decodes

  @property
  def empty(self) -> bool:
    return not (self.decodes or self.prefills)


def power_of_two_pieces(n: int, max_piece: int) -> list[int]:
  """Splits n into pieces of `max_piece` (a power of two) and then descending powers of two."""
  pieces = [max_piece] * (n // max_piece)
  rest = n % max_piece
  bit = max_piece
  while rest:
    bit //= 2
    if rest & bit:
      pieces.append(bit)
      rest -= bit
  return pieces


class Scheduler:
  """Slots, the waiting queue and the page tables; see the module docstring."""

  def __init__(self, num_slots: int, *, max_len: int, chunk_size: int, token_budget: int,
               tables: PageTables | None, prefill_first: bool = False):
    self.num_slots = num_slots
    self.max_len = max_len
    self.chunk_size = chunk_size
    self.mixed_chunk_size = chunk_size  # the longest piece of a step that decodes
    self.token_budget = token_budget
    self.tables = tables
    self.prefill_first = prefill_first
    self.waiting: collections.deque[Request] = collections.deque()
    self.slots: list[Request | None] = [None] * num_slots
    self._admissions = 0
    self.num_preemptions = 0

  @property
  def active(self) -> list[Request]:
    """Requests owning a slot, oldest admission first."""
    return sorted((r for r in self.slots if r is not None), key=lambda r: r.admit_order)

  def has_work(self) -> bool:
    return bool(self.waiting) or any(r is not None for r in self.slots)

  def add(self, request: Request) -> None:
    self.waiting.append(request)

  def schedule(self) -> Schedule:
    """Admits requests and picks this step's decodes and prefill pieces."""
    self._admit()
    scheduled: set[int] = set()
    decodes: list[Request] = []
    prefills: list[PrefillPiece] = []
    pending_prefill = any(r.status is Status.PREFILL for r in self.active)
    if not (self.prefill_first and pending_prefill):
      for request in [r for r in self.active if r.will_decode(self.max_len)]:
        if request.slot is not None and self._reserve(request, request.num_computed + 1, scheduled):
          decodes.append(request)
          scheduled.add(request.request_id)
    budget = None if self.prefill_first else self.token_budget - len(decodes)
    for request in [r for r in self.active if r.status is Status.PREFILL]:
      if budget is not None and budget <= 0:
        break
      if request.slot is None:  # preempted by an older request in this loop
        continue
      remaining = len(request.tokens) - request.num_computed
      n = remaining if budget is None else min(remaining, budget)
      if decodes:  # the largest piece that fits
        lengths = power_of_two_pieces(n, self.mixed_chunk_size)[:1]
      else:
        lengths = power_of_two_pieces(n, self.chunk_size)
      n = sum(lengths)
      if not self._reserve(request, request.num_computed + n, scheduled):
        continue
      scheduled.add(request.request_id)
      start = request.num_computed
      for length in lengths:
        prefills.append(PrefillPiece(request, start, length))
        start += length
      if budget is not None:
        budget -= n
      if decodes:
        break
    for request in decodes:
      request.num_computed += 1
    for piece in prefills:
      piece.request.num_computed += piece.length
    return Schedule(decodes, prefills)

  def extend_decodes(self, decodes: list[Request], extra: int) -> bool:
    """Reserves `extra` more decode tokens for each of `decodes` when that can run now.

    Only the decodes of a step without prefills qualify (the caller checks that), with nothing
    waiting and nothing in prefill (more decode tokens would delay an admission or a prefill),
    every request keeping its positions below the engine's `max_len`, and pages for the extra
    tokens free without preempting anyone. On success each request's `num_computed` counts the
    extra tokens; returns whether it succeeded.
    """
    if extra < 1 or not decodes or self.waiting:
      return False
    if any(r.status is Status.PREFILL for r in self.active):
      return False
    if any(r.num_computed + extra > self.max_len for r in decodes):
      return False
    if self.tables is not None and not all(
        self.tables.ensure(r.slot, r.num_computed + extra) for r in decodes):
      return False  # pages that did fit stay reserved for the coming steps
    for request in decodes:
      request.num_computed += extra
    return True

  def finish(self, request: Request, reason: str) -> None:
    """Ends `request` (finished, stopped, cancelled or failed), freeing its slot and pages at once."""
    if request.status is Status.FINISHED:
      return
    if request.status is Status.WAITING:
      self.waiting.remove(request)
    else:
      self._vacate(request)
    request.status = Status.FINISHED
    request.finish_reason = reason

  def _admit(self) -> None:
    for slot, occupant in enumerate(self.slots):
      if occupant is None and self.waiting:
        request = self.waiting.popleft()
        request.status, request.slot, request.num_computed = Status.PREFILL, slot, 0
        request.admit_order = self._admissions
        self._admissions += 1
        self.slots[slot] = request

  def _reserve(self, request: Request, num_tokens: int, scheduled: set[int]) -> bool:
    """Pages for request's first num_tokens positions (with windowed attention, pages before the
    window of its next position are freed first), preempting newer unscheduled requests."""
    if self.tables is None:
      return True
    self.tables.trim(request.slot, request.num_computed)
    while not self.tables.ensure(request.slot, num_tokens):
      victims = [r for r in self.active if r.admit_order > request.admit_order
                 and r.request_id not in scheduled]
      if not victims:
        return False
      self._preempt(victims[-1])
    return True

  def _preempt(self, request: Request) -> None:
    """Frees request's slot and pages; it will recompute its prompt and generated tokens."""
    self._vacate(request)
    request.status, request.num_computed = Status.WAITING, 0
    request.num_preemptions += 1
    self.num_preemptions += 1
    self.waiting.appendleft(request)

  def _vacate(self, request: Request) -> None:
    if self.tables is not None:
      self.tables.release(request.slot)
    self.slots[request.slot] = None
    request.slot = None
