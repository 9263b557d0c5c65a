"""SlotCache: the KV-slot bookkeeping, on its own (no scheduler, no model)."""

from __future__ import annotations

import numpy as np
import pytest

from modelyard.engine.slot_cache import KEEP_CACHED_MIN, SlotCache, Tokens, common_prefix


def arr(tokens: list[int]) -> Tokens:
    return np.asarray(tokens, dtype=np.int32)


def hold(cache: SlotCache, tokens: list[int], scope: str | None = None,
         reservation: int = 0) -> int:
    """Take the preferred free slot, write `tokens` into it and free it again (cached)."""
    slot = cache.allocate(reservation, 0)
    cache.written(slot, len(tokens))
    cache.release(slot, reservation, tokens, len(tokens), scope)
    return slot


def test_allocation_needs_a_free_slot_and_room_for_the_reservation() -> None:
    cache = SlotCache(2, kv_capacity=100)
    assert cache.can_allocate(100) and not cache.can_allocate(101)
    cache.allocate(60, 0)
    assert cache.kv_reserved == 60
    assert cache.can_allocate(40) and not cache.can_allocate(41)
    cache.allocate(10, 0)
    assert not cache.can_allocate(1)          # no free slot left, though cells are
    cache.release(0, 60, [], 0, None)
    assert cache.kv_reserved == 10 and cache.can_allocate(90)


def test_the_slot_freed_longest_ago_is_taken_first_unless_low_slots_first() -> None:
    for low_first, expected in ((False, 2), (True, 0)):
        cache = SlotCache(3, kv_capacity=100, low_slots_first=low_first)
        slots = [cache.allocate(1, 0) for _ in range(3)]
        for slot in (2, 0, 1):
            cache.release(slot, 1, [], 0, None)
        assert slots == [0, 1, 2]
        assert cache.free_slots == [2, 0, 1]
        assert cache.search_order() == ([0, 1, 2] if low_first else [2, 0, 1])
        assert cache.allocate(1, 0) == expected


def test_a_released_slot_keeps_its_computed_tokens_for_its_scope_only() -> None:
    cache = SlotCache(2, kv_capacity=100)
    slot = cache.allocate(10, 0)
    cache.written(slot, 5)
    cache.release(slot, 10, [1, 2, 3, 4, 5, 6], 5, "acct-a")   # token 6 was never computed
    assert cache.cached[slot].tolist() == [1, 2, 3, 4, 5]
    prompt = arr([1, 2, 3, 4, 9, 9])
    assert cache.longest_cached(prompt, "acct-a", cap=5) == (4, slot)
    assert cache.longest_cached(prompt, "acct-a", cap=3) == (3, slot)
    other = cache.search_order()[0]
    assert cache.longest_cached(prompt, "acct-b", cap=5) == (0, other)
    assert cache.longest_cached(prompt, None, cap=5) == (0, other)


def test_taking_a_cached_slot_truncates_only_the_cells_past_the_reused_prefix() -> None:
    cache = SlotCache(1, kv_capacity=100)
    hold(cache, [1, 2, 3, 4, 5])
    assert cache.take_pending() == ([], [])
    assert cache.allocate(10, 3, slot=0) == 0
    assert cache.cached == {}
    assert cache.take_pending() == ([(0, 3)], [])
    cache.release(0, 10, [1, 2, 3], 3, None)
    cache.allocate(10, 3, slot=0)             # holds exactly what is reused: no truncation
    assert cache.take_pending() == ([], [])


def test_a_copy_clears_the_target_slot_first_when_it_holds_cells() -> None:
    cache = SlotCache(3, kv_capacity=100)
    source = cache.allocate(10, 0)
    cache.written(source, 20)
    assert cache.allocate(10, 15, copy_from=source) == 1    # never used: copy only
    assert cache.take_pending() == ([], [(source, 1, 15)])
    hold(cache, [7, 7, 7])                    # slot 2 now holds 3 cells
    assert cache.allocate(10, 15, slot=2, copy_from=source) == 2
    assert cache.take_pending() == ([(2, 0)], [(source, 2, 15)])
    assert cache.has_pending() is False


def test_without_prefix_caching_a_released_slot_is_cleared() -> None:
    cache = SlotCache(1, kv_capacity=100, prefix_caching=False)
    slot = cache.allocate(10, 0)
    cache.written(slot, 7)
    cache.release(slot, 10, list(range(7)), 7, None)
    assert cache.cached == {}
    assert cache.take_pending() == ([(slot, 0)], [])
    assert cache.longest_cached(arr(list(range(7))), None, cap=6) == (0, slot)


def test_cached_cells_beyond_the_bound_are_cleared_oldest_first() -> None:
    cache = SlotCache(3, kv_capacity=1000, max_cached_cells=10)
    slots = [cache.allocate(1, 0) for _ in range(3)]
    for slot in slots:
        cache.written(slot, 6)
    cache.release(0, 1, [1] * 6, 6, None)
    assert cache.take_pending() == ([], [])   # 6 cached cells: within the bound
    cache.release(1, 1, [2] * 6, 6, None)
    assert cache.take_pending() == ([(0, 0)], [])
    assert set(cache.cached) == {1}
    cache.release(2, 1, [3] * 6, 6, None)
    assert cache.take_pending() == ([(1, 0)], [])
    assert set(cache.cached) == {2}


def test_an_admission_clears_cached_cells_the_reservations_need_oldest_first() -> None:
    cache = SlotCache(3, kv_capacity=20)
    hold(cache, [1] * 8)                      # slot 0
    hold(cache, [2] * 8)                      # slot 1
    assert cache.free_slots == [2, 0, 1]
    cache.allocate(4, 0)                      # slot 2: 4 + 16 cached = 20, fits
    assert cache.take_pending() == ([], [])
    cache.allocate(5, 0, slot=1)              # slot 1 gives its 8 up: 9 + 8 cached = 17
    assert cache.take_pending() == ([(1, 0)], [])
    cache.release(1, 5, [], 0, None)
    cache.allocate(12, 0, slot=1)             # 16 reserved + 8 cached > 20: slot 0 goes
    assert cache.take_pending() == ([(0, 0)], [])
    assert cache.cached == {}
    assert cache.kv_reserved == 16


def test_drop_cached_clears_free_slots_holding_cells_and_forget_clears_everything() -> None:
    cache = SlotCache(3, kv_capacity=100)
    assert hold(cache, [1, 2]) == 0
    running = cache.allocate(10, 0)
    cache.written(running, 4)
    cache.drop_cached()                       # the running slot keeps its cells
    assert cache.cached == {}
    assert cache.take_pending() == ([(0, 0)], [])
    assert hold(cache, [3, 4]) == 2
    cache.allocate(10, 1, slot=2)             # a truncation is pending ...
    cache.release(2, 10, [3, 4], 2, None)
    assert cache.has_pending()
    cache.forget([running])                   # ... and the cache was cleared outside
    assert cache.cached == {} and not cache.has_pending()
    assert cache.allocate(10, 0, slot=2) == 2  # its cells are gone: nothing to truncate
    assert cache.take_pending() == ([], [])


@pytest.mark.parametrize(("a", "b", "shared"), [
    ([], [1], 0), ([1, 2, 3], [1, 2, 3], 3), ([1, 2, 3], [1, 2], 2),
    ([1, 2, 3], [1, 9, 3], 1), ([5], [6], 0),
])
def test_common_prefix(a: list[int], b: list[int], shared: int) -> None:
    assert common_prefix(arr(a), arr(b)) == shared


# -- a conversation cached in a slot outlives a prompt that shares only its start -----------


def test_a_prompt_sharing_only_the_start_copies_it_and_leaves_the_conversation_cached() -> None:
    cache = SlotCache(2, kv_capacity=1000)
    template = list(range(1, 11))
    conversation = template + list(range(100, 100 + KEEP_CACHED_MIN))
    slot = hold(cache, conversation)
    prompt = arr([*template, 500, 501])
    reused, source = cache.longest_cached(prompt, None, len(prompt) - 1)
    assert (reused, source) == (10, slot)
    taken = cache.allocate(20, reused, slot=source)
    assert taken != slot
    truncations, copies = cache.take_pending()
    assert copies == [(slot, taken, 10)] and (slot, 10) not in truncations
    assert cache.cached[slot].tolist() == conversation
    # The conversation's next turn still finds all of its cells.
    follow_up = arr([*conversation, 7, 8])
    assert cache.longest_cached(follow_up, None, len(follow_up) - 1) == (len(conversation), slot)


def test_a_slot_is_taken_when_it_loses_little_or_no_other_slot_loses_less() -> None:
    template = list(range(1, 11))
    # Little past the shared start: the slot is taken, its cells truncated to the start.
    cache = SlotCache(2, kv_capacity=1000)
    slot = hold(cache, template + list(range(100, 100 + KEEP_CACHED_MIN - 1)))
    assert cache.allocate(20, 10, slot=slot) == slot
    assert cache.take_pending() == ([(slot, 10)], [])
    # Every other free slot holds more than would be lost: the slot is taken too.
    cache = SlotCache(2, kv_capacity=1000)
    slot = hold(cache, template + list(range(100, 140)))
    other = hold(cache, list(range(200, 300)))
    assert cache.free_slots == [slot, other]
    assert cache.allocate(20, 10, slot=slot) == slot


def test_a_copied_free_slot_is_neither_taken_nor_cleared_before_the_copy() -> None:
    template = list(range(1, 11))
    cache = SlotCache(3, kv_capacity=200)
    slot = hold(cache, template + list(range(100, 140)))   # 50 cells
    taken = cache.allocate(60, 10, slot=slot)
    assert taken != slot
    # The next admission of the step may not take the copied slot, and counts its cells as
    # kept: 60 reserved + 50 kept leave room for 90, not 140.
    assert not cache.can_allocate(91) and cache.can_allocate(90)
    third = cache.allocate(90, 0)
    assert third not in (slot, taken)
    truncations, copies = cache.take_pending()
    assert copies == [(slot, taken, 10)]
    assert all(truncated != slot for truncated, _ in truncations)
    # Once the copies are made, the slot is free to take and clear again.
    assert cache.can_allocate(1) and cache.search_order() == [slot]
