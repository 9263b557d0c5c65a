"""KV-slot bookkeeping beside the scheduler: which slot holds which cells, for whom.

The KV cache has one slot (a llama.cpp sequence id) per running sequence. A free slot
keeps the cells its last sequence computed, so a later prompt that starts the same way
reads only the rest (prefix caching). `SlotCache` tracks, with no llama.cpp:

- the free slots, the one freed longest ago first;
- the tokens whose cells each free slot still holds, from position 0, and the cache scope
  of the sequence that left them (cells are reused only within one scope);
- how many cells each slot may hold, and the cells reserved by running sequences;
- the truncations and copies the runner must apply before the next batch.

The scheduler decides who runs; it asks this class for room, for the longest cached
prefix and for a slot, and hands slots back when sequences finish.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import numpy.typing as npt

Tokens = npt.NDArray[np.int32]

KEEP_CACHED_MIN = 32
"""Cached cells a free slot would lose past a new prompt's shared prefix that are worth
keeping: the prompt goes to another free slot with a copy of the prefix instead."""


class SlotCache:
    def __init__(self, num_slots: int, kv_capacity: int, *, prefix_caching: bool = True,
                 max_cached_cells: int | None = None, low_slots_first: bool = False,
                 min_copy_tokens: int = 0) -> None:
        self.kv_capacity = kv_capacity
        self.min_copy_tokens = min_copy_tokens
        """Shortest prefix worth copying into another slot instead of taking its slot."""
        self.prefix_caching = prefix_caching
        self.max_cached_cells = max_cached_cells
        """Most KV cells free slots may keep (None: no bound)."""
        self.low_slots_first = low_slots_first
        """Prefer the lowest free slot over the one freed longest ago."""
        self.free_slots: list[int] = list(range(num_slots))
        """Free slots, the one freed longest ago first."""
        self.cached: dict[int, Tokens] = {}
        """Tokens whose KV cells a free slot still holds, from position 0."""
        self._scope: dict[int, str | None] = {}
        """The cache scope of the sequence that left a free slot's cells."""
        self._cells: dict[int, int] = {}
        """KV cells a slot may hold, at most: more than its sequence computed when it was
        aborted while a step ran, since that step's chunk wrote cells nobody recorded."""
        self._truncations: list[tuple[int, int]] = []
        self._copies: list[tuple[int, int, int]] = []
        self._pinned: set[int] = set()
        """Free slots a pending copy reads: nobody takes or clears them before it is made
        (the runner applies the truncations before the copies)."""
        self.kv_reserved = 0
        """KV cells reserved by the sequences holding a slot (prompt + max_tokens each)."""

    # -- questions -----------------------------------------------------------------------

    def can_allocate(self, reservation: int) -> bool:
        """Whether a slot is free and the cache can hold `reservation` more cells."""
        pinned_cells = sum(self._cells.get(slot, 0) for slot in self._pinned)
        return (len(self.free_slots) > len(self._pinned)
                and self.kv_reserved + reservation + pinned_cells <= self.kv_capacity)

    def has_pending(self) -> bool:
        """Whether truncations or copies wait for the next step."""
        return bool(self._truncations or self._copies)

    def search_order(self) -> list[int]:
        """Free slots that may be taken now, in the order they are preferred on ties."""
        order = sorted(self.free_slots) if self.low_slots_first else self.free_slots
        return [slot for slot in order if slot not in self._pinned]

    def longest_cached(self, prompt: Tokens, scope: str | None, cap: int) -> tuple[int, int]:
        """(tokens, slot): the free slot of `scope` whose cells share the longest prefix
        with `prompt`, at most `cap` tokens; (0, the preferred free slot) when none does.
        There must be a free slot."""
        order = self.search_order()
        best, source = 0, order[0]
        if not self.prefix_caching:
            return best, source
        for slot in order:
            cached = self.cached.get(slot)
            if cached is None or self._scope.get(slot) != scope:
                continue
            shared = min(common_prefix(cached, prompt), cap)
            if shared > best:
                best, source = shared, slot
        return best, source

    # -- changes -------------------------------------------------------------------------

    def allocate(self, reservation: int, reused: int, *, slot: int | None = None,
                 copy_from: int | None = None) -> int:
        """Take a free slot for a sequence reserving `reservation` cells whose first
        `reused` prompt tokens have cells: in `slot` itself (a free slot's cached prefix),
        or in the running slot `copy_from` (copied). Without `slot`, the preferred free
        slot. Returns the slot."""
        if slot is None:
            slot = self.search_order()[0]
        elif copy_from is None and reused > 0:
            slot, copy_from = self._spare_for(slot, reused, reservation)
        self.free_slots.remove(slot)
        self.cached.pop(slot, None)
        self._scope.pop(slot, None)
        if copy_from is not None and reused > 0:
            if self._cells.get(slot, 0) > 0:
                self._truncations.append((slot, 0))
            self._copies.append((copy_from, slot, reused))
            if copy_from in self.free_slots:
                self._pinned.add(copy_from)
        elif self._cells.get(slot, 0) > reused:
            self._truncations.append((slot, reused))
        self._cells[slot] = reused
        self._make_room(reservation)
        self.kv_reserved += reservation
        return slot

    def _spare_for(self, slot: int, reused: int, reservation: int) -> tuple[int, int | None]:
        """Where a sequence reusing the first `reused` cells of free `slot` should go:
        (slot, None) to take it, or (another free slot, slot) to copy the prefix there.

        Taking the slot drops the rest of its cells: a conversation cached there loses
        everything past the prefix the new prompt shares with it (often just the chat
        template's first tokens). When that is at least `KEEP_CACHED_MIN` cells and another
        free slot holds nothing, or holds fewer cells than would be lost and was freed
        longest ago, that slot is taken instead and gets a copy of the prefix (in the one
        unified KV stream a copy shares the cells, it does not duplicate them). Only when
        the cache has room for the new reservation with the copied slots' cells kept, since
        those cannot be cleared before the copies are made."""
        lost = self._cells.get(slot, 0) - reused
        if lost < KEEP_CACHED_MIN or reused < self.min_copy_tokens:
            return slot, None
        kept = sum(self._cells.get(pinned, 0) for pinned in self._pinned | {slot})
        if self.kv_reserved + reservation + kept > self.kv_capacity:
            return slot, None
        others = [other for other in self.search_order() if other != slot]
        empty = [other for other in others if not self._cells.get(other, 0)]
        if empty:
            return empty[0], slot
        if others and self._cells.get(others[0], 0) < lost:
            return others[0], slot
        return slot, None

    def written(self, slot: int, cells: int) -> None:
        """A scheduled chunk makes the slot hold `cells` cells from position 0."""
        self._cells[slot] = cells

    def rewind(self, slot: int, keep: int) -> None:
        """A running sequence's slot keeps only its cells at positions < keep (draft tokens
        not kept): they are dropped before the next batch."""
        self._truncations.append((slot, keep))
        self._cells[slot] = keep

    def release(self, slot: int | None, reservation: int, token_ids: list[int],
                num_computed: int, scope: str | None) -> None:
        """A sequence ended: its reservation goes back and its slot is free, keeping the
        cells of its first `num_computed` tokens for `scope` when prefix caching is on."""
        self.kv_reserved -= reservation
        if slot is None:
            return
        if self.prefix_caching:
            self.cached[slot] = np.asarray(token_ids[:num_computed], dtype=np.int32)
            self._scope[slot] = scope
        else:
            self._clear(slot)
        self.free_slots.append(slot)
        self._trim()

    def take_pending(self) -> tuple[list[tuple[int, int]], list[tuple[int, int, int]]]:
        """The truncations (slot, keep) and copies (source, slot, n) to apply before the
        next batch, truncations first; the pending lists are emptied."""
        truncations, self._truncations = self._truncations, []
        copies, self._copies = self._copies, []
        self._pinned.clear()
        return truncations, copies

    def forget(self, running_slots: Iterable[int]) -> None:
        """The KV cache was cleared outside: no slot holds cells, nothing is pending."""
        self.cached.clear()
        self._scope.clear()
        self._cells = dict.fromkeys(running_slots, 0)
        self._truncations.clear()
        self._copies.clear()

    def drop_cached(self) -> None:
        """Clear every free slot's cells (the prefix cache) before the next step."""
        for slot in self.free_slots:
            if self._cells.get(slot, 0):
                self._clear(slot)
        self.cached.clear()
        self._scope.clear()

    def _clear(self, slot: int) -> None:
        self._truncations.append((slot, 0))
        self._cells[slot] = 0

    def _trim(self) -> None:
        """Clear the oldest free slots' cells while they hold more than max_cached_cells."""
        limit = self.max_cached_cells
        if limit is None:
            return
        self._evict(sum(self._cells.get(slot, 0) for slot in self.free_slots) - limit)

    def _make_room(self, reservation: int) -> None:
        """Clear free slots' cached cells, the slot freed longest ago first, until the KV
        cache holds them next to every reservation, the one being admitted included."""
        self._evict(self.kv_reserved + reservation - self.kv_capacity
                    + sum(self._cells.get(slot, 0) for slot in self.free_slots))

    def _evict(self, excess: int) -> None:
        """Clear free slots' cells, the slot freed longest ago first, until `excess`
        cells are gone (or none is left); never a slot a pending copy reads."""
        for slot in self.free_slots:
            if excess <= 0:
                break
            if slot in self._pinned:
                continue
            cells = self._cells.get(slot, 0)
            if cells:
                self._clear(slot)
                self.cached.pop(slot, None)
                excess -= cells


def common_prefix(a: Tokens, b: Tokens) -> int:
    """How many tokens `a` and `b` share from the start."""
    n = min(len(a), len(b))
    if n == 0 or a[0] != b[0]:
        return 0
    mismatches = np.flatnonzero(a[:n] != b[:n])
    return int(mismatches[0]) if len(mismatches) else n
