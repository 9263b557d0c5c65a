"""The scheduler as a pure state machine, driven by hand-made model outputs."""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable

import numpy as np
import pytest

from modelyard.engine.scheduler import (
    SHARE_MIN_TOKENS,
    WAITING_SCAN,
    QueueFullError,
    ScheduledChunk,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from modelyard.engine.sequence import (
    COMMON_SHARE,
    FinishReason,
    SamplingParams,
    Sequence,
    SequenceStatus,
    Share,
)

EOG = 2
PLAIN = 7  # a token that ends nothing

_prompt_bases = itertools.count(1)

SHARES = (Share("x", 1.0), Share("y", 3.0), COMMON_SHARE)
"""The fair-share accounts of the random workloads with shares."""

WHOLE = False
"""`last_prompt_token_alone` for the tests that spell out step shapes with a prompt's end
read in the same chunk as the rest of it (the rule that holds with the option off). The
option's own tests, below, and the random workloads run it on, as the server does."""


def make_scheduler(
    *,
    max_sequences: int = 2,
    step_token_budget: int = 8,
    kv_capacity: int = 256,
    context_per_sequence: int = 64,
    max_waiting: int = 8,
    prefix_caching: bool = True,
    last_prompt_token_alone: bool = WHOLE,
) -> Scheduler:
    return Scheduler(SchedulerConfig(
        max_sequences=max_sequences,
        step_token_budget=step_token_budget,
        kv_capacity=kv_capacity,
        context_per_sequence=context_per_sequence,
        max_waiting=max_waiting,
        prefix_caching=prefix_caching,
        last_prompt_token_alone=last_prompt_token_alone,
    ))


def make_seq(seq_id: str, prompt_len: int = 0, max_tokens: int = 4, *,
             prompt: list[int] | None = None, scope: str | None = None,
             share: Share = COMMON_SHARE) -> Sequence:
    """A sequence; without `prompt`, its prompt shares no token with any other sequence's."""
    if prompt is None:
        prompt = fresh(prompt_len)
    return Sequence(seq_id, prompt, SamplingParams(max_tokens=max_tokens),
                    eog_ids=frozenset({EOG}), cache_scope=scope, share=share)


def fresh(n: int) -> list[int]:
    """`n` tokens that no other call returns (at most 1000 of them)."""
    base = 1000 * next(_prompt_bases)
    return [base + i for i in range(n)]


def toks(text: str) -> list[int]:
    """A readable prompt: one token per character (never EOG or PLAIN)."""
    return [ord(ch) for ch in text]


def run_step(
    scheduler: Scheduler,
    token_for: Callable[[Sequence], int] = lambda seq: PLAIN,
    *,
    kv: KVModel | None = None,
) -> tuple[SchedulerOutput, list[Sequence]]:
    """One engine step: schedule, 'decode' (into `kv` when given), sample for every chunk
    that asks."""
    output = scheduler.schedule()
    if kv is not None:
        kv.apply(output)
    sampled = {c.seq.seq_id: token_for(c.seq) for c in output.chunks if c.sample}
    finished = scheduler.update_from_output(output, sampled)
    return output, finished


def chunk_ids(output: SchedulerOutput) -> list[str]:
    return [c.seq.seq_id for c in output.chunks]


def slot_cache(scheduler: Scheduler) -> dict[int, list[int]]:
    """The free slots' cached tokens, as lists (the scheduler keeps int32 arrays)."""
    for tokens in scheduler.slots.cached.values():
        assert isinstance(tokens, np.ndarray) and tokens.dtype == np.int32
    return {slot: tokens.tolist() for slot, tokens in scheduler.slots.cached.items()}


class KVModel:
    """The runner's KV cache as the scheduler must see it: per slot, the tokens of its cells.

    `apply` does what the engine does with one step's output: the truncations, then the
    copies (the destination gets the source's first n cells), then the batch, which writes
    every chunk's tokens at their positions. It checks that a copy lands in an empty slot
    and copies cells that exist, and that every chunk continues its slot exactly, over
    cells that hold the sequence's own tokens.
    """

    def __init__(self, kv_capacity: int | None = None) -> None:
        self.slots: dict[int, list[int]] = {}
        self.kv_capacity = kv_capacity

    def apply(self, output: SchedulerOutput) -> None:
        for slot, keep in output.kv_truncations:
            assert keep >= 0
            del self.slots.setdefault(slot, [])[keep:]
        for src, dst, n in output.kv_copies:
            assert src != dst
            assert 0 < n <= len(self.slots.get(src, [])), "a copy of cells that do not exist"
            assert self.slots.get(dst, []) == [], "a copy into a slot that still holds cells"
            self.slots[dst] = self.slots[src][:n]
        for chunk in output.chunks:
            assert chunk.seq.slot is not None
            cells = self.slots.setdefault(chunk.seq.slot, [])
            assert chunk.start == len(cells), "a chunk must continue its slot's cells"
            assert cells == chunk.seq.token_ids[:chunk.start], "stale cells in the slot"
            cells.extend(chunk.tokens)
        if self.kv_capacity is not None:
            assert self.num_cells <= self.kv_capacity

    @property
    def num_cells(self) -> int:
        return sum(len(cells) for cells in self.slots.values())


def warm(scheduler: Scheduler, prompts: list[str]) -> KVModel:
    """Run a one-token sequence per prompt, side by side: slot i then caches prompts[i]."""
    seqs = [make_seq(f"warm{i}", prompt=toks(p), max_tokens=1) for i, p in enumerate(prompts)]
    for seq in seqs:
        scheduler.add(seq)
    kv = KVModel()
    slots: dict[str, int | None] = {}
    finished: list[Sequence] = []
    while len(finished) < len(seqs):
        output = scheduler.schedule()
        kv.apply(output)
        slots.update((c.seq.seq_id, c.seq.slot) for c in output.chunks if c.start == 0)
        finished += scheduler.update_from_output(output, {s.seq_id: PLAIN for s in seqs})
    assert [slots[s.seq_id] for s in seqs] == list(range(len(prompts)))
    assert slot_cache(scheduler) == {i: toks(p) for i, p in enumerate(prompts)}
    return kv


# -- construction and add() -------------------------------------------------------------------


def test_budget_smaller_than_max_sequences_is_rejected() -> None:
    with pytest.raises(ValueError, match="step_token_budget"):
        make_scheduler(max_sequences=4, step_token_budget=3)


@pytest.mark.parametrize(
    ("kv_capacity", "context_per_sequence", "prompt_len", "max_tokens", "fits"),
    [
        (256, 64, 60, 4, True),     # exactly the context
        (256, 64, 60, 5, False),    # one over the context
        (256, 64, 10, 55, False),   # max_tokens alone pushes it over
        (40, 64, 30, 10, True),     # exactly the whole KV cache
        (40, 64, 30, 11, False),    # more than the whole KV cache
    ],
)
def test_add_rejects_a_reservation_larger_than_one_sequence_may_hold(
    kv_capacity: int, context_per_sequence: int, prompt_len: int, max_tokens: int, fits: bool
) -> None:
    scheduler = make_scheduler(kv_capacity=kv_capacity, context_per_sequence=context_per_sequence)
    seq = make_seq("a", prompt_len, max_tokens)
    if fits:
        scheduler.add(seq)
        assert list(scheduler.waiting) == [seq]
    else:
        with pytest.raises(ValueError, match="KV cells"):
            scheduler.add(seq)
        assert not scheduler.waiting


def test_add_past_max_waiting_raises_queue_full() -> None:
    scheduler = make_scheduler(max_sequences=1, max_waiting=2)
    scheduler.add(make_seq("a", 2))
    scheduler.add(make_seq("b", 2))
    with pytest.raises(QueueFullError):
        scheduler.add(make_seq("c", 2))
    assert [s.seq_id for s in scheduler.waiting] == ["a", "b"]

    run_step(scheduler)  # admits "a" into the only slot: one place frees up in the queue
    scheduler.add(make_seq("c", 2))
    with pytest.raises(QueueFullError):
        scheduler.add(make_seq("d", 2))


def test_max_waiting_zero_refuses_everything() -> None:
    scheduler = make_scheduler(max_waiting=0)
    with pytest.raises(QueueFullError):
        scheduler.add(make_seq("a", 2))
    assert not scheduler.has_work()


# -- admission ----------------------------------------------------------------------------


def test_admission_is_limited_by_free_slots() -> None:
    scheduler = make_scheduler(max_sequences=2, step_token_budget=32)
    for rid in "abc":
        scheduler.add(make_seq(rid, 3))

    output, _ = run_step(scheduler)

    assert chunk_ids(output) == ["a", "b"]
    assert [s.seq_id for s in scheduler.waiting] == ["c"]
    assert sorted(s.slot for s in scheduler.running if s.slot is not None) == [0, 1]
    assert all(s.status is SequenceStatus.RUNNING for s in scheduler.running)
    assert scheduler.waiting[0].status is SequenceStatus.WAITING


@pytest.mark.parametrize(
    ("kv_capacity", "reservations", "admitted"),
    [
        (64, [(4, 8), (4, 8), (4, 8)], 3),   # plenty of room
        (24, [(4, 8), (4, 8), (4, 8)], 2),   # 12 + 12 == 24 fits exactly, the third does not
        (23, [(4, 8), (4, 8), (4, 8)], 1),   # 12 + 12 > 23
        (20, [(4, 16), (2, 2)], 1),          # the first takes the whole cache
    ],
)
def test_admission_is_limited_by_kv_capacity(
    kv_capacity: int, reservations: list[tuple[int, int]], admitted: int
) -> None:
    scheduler = make_scheduler(max_sequences=4, step_token_budget=64, kv_capacity=kv_capacity,
                               context_per_sequence=64)
    seqs = [make_seq(f"r{i}", p, m) for i, (p, m) in enumerate(reservations)]
    for seq in seqs:
        scheduler.add(seq)

    output, _ = run_step(scheduler)

    assert chunk_ids(output) == [s.seq_id for s in seqs[:admitted]]
    assert scheduler.kv_reserved == sum(s.kv_reservation for s in seqs[:admitted])
    assert scheduler.kv_reserved <= kv_capacity
    assert list(scheduler.waiting) == seqs[admitted:]


def test_admission_is_first_come_first_served() -> None:
    # The head of the queue does not fit yet; a smaller request behind it must not jump it.
    scheduler = make_scheduler(max_sequences=3, step_token_budget=32, kv_capacity=40,
                               context_per_sequence=40)
    first = make_seq("first", 4, 16)    # 20 cells
    big = make_seq("big", 4, 26)        # 30 cells: does not fit next to "first"
    small = make_seq("small", 2, 2)     # 4 cells: would fit, but is behind "big"
    for seq in (first, big, small):
        scheduler.add(seq)

    output, _ = run_step(scheduler)
    assert chunk_ids(output) == ["first"]
    assert list(scheduler.waiting) == [big, small]


def test_kv_capacity_frees_up_when_a_sequence_finishes() -> None:
    # Three slots, so only the KV cache can hold "c" back.
    scheduler = make_scheduler(max_sequences=3, step_token_budget=16, kv_capacity=12,
                               context_per_sequence=12)
    a, b = make_seq("a", 4, 2), make_seq("b", 4, 2)   # 6 cells each: 12 fits ...
    c = make_seq("c", 4, 8)                            # ... 12 cells: needs the whole cache
    for seq in (a, b, c):
        scheduler.add(seq)

    output, _ = run_step(scheduler)           # a and b prefill and sample their 1st token
    assert chunk_ids(output) == ["a", "b"]
    assert scheduler.kv_reserved == 12
    _, finished = run_step(scheduler)         # a and b sample their 2nd: max_tokens reached
    assert finished == [a, b]
    assert scheduler.kv_reserved == 0

    output, _ = run_step(scheduler)
    assert chunk_ids(output) == ["c"]
    assert scheduler.kv_reserved == 12


# -- chunked prefill ------------------------------------------------------------------------


def test_long_prompt_is_prefilled_in_chunks_and_sampled_only_at_the_end() -> None:
    scheduler = make_scheduler(max_sequences=1, step_token_budget=8, context_per_sequence=64)
    seq = make_seq("a", 20, max_tokens=4)
    scheduler.add(seq)

    shapes = []
    for _ in range(3):
        output, _ = run_step(scheduler)
        [chunk] = output.chunks
        shapes.append((chunk.start, len(chunk.tokens), chunk.sample))
        assert chunk.tokens == seq.prompt_ids[chunk.start:chunk.start + len(chunk.tokens)]

    assert shapes == [(0, 8, False), (8, 8, False), (16, 4, True)]
    assert seq.num_computed == 20
    assert seq.output_ids == [PLAIN]   # exactly one token sampled, after the last chunk

    output, _ = run_step(scheduler)    # then plain decode: the sampled token, at position 20
    [chunk] = output.chunks
    assert (chunk.start, chunk.tokens, chunk.sample) == (20, [PLAIN], True)


def test_decode_is_never_stalled_by_a_long_prefill() -> None:
    budget = 8
    scheduler = make_scheduler(max_sequences=2, step_token_budget=budget,
                               context_per_sequence=64)
    decoder = make_seq("decoder", 2, max_tokens=20)
    scheduler.add(decoder)
    run_step(scheduler)  # the decoder is now past its prompt
    assert not decoder.is_prefilling

    long = make_seq("long", 40, max_tokens=4)
    scheduler.add(long)
    produced_before = decoder.num_output
    prefill_steps = 0
    while long.is_prefilling:
        output, _ = run_step(scheduler)
        prefill_steps += 1
        first, *rest = output.chunks
        # The decode token comes first, then the prefill gets what is left of the budget.
        assert first.seq is decoder
        assert len(first.tokens) == 1 and first.sample
        assert [c.seq for c in rest] == [long]
        assert output.num_tokens <= budget
        assert len(rest[0].tokens) == budget - 1 or not long.is_prefilling
    assert prefill_steps == 6  # ceil(40 / 7)
    assert decoder.num_output == produced_before + prefill_steps


def test_several_prefills_share_the_budget_in_arrival_order() -> None:
    scheduler = make_scheduler(max_sequences=3, step_token_budget=10, context_per_sequence=64)
    a, b, c = make_seq("a", 6), make_seq("b", 6), make_seq("c", 6)
    for seq in (a, b, c):
        scheduler.add(seq)

    output, _ = run_step(scheduler)
    assert [(x.seq.seq_id, x.start, len(x.tokens), x.sample) for x in output.chunks] == [
        ("a", 0, 6, True), ("b", 0, 4, False),
    ]
    assert list(scheduler.waiting) == [c]   # budget spent: "c" is not admitted this step

    output, _ = run_step(scheduler)
    assert [(x.seq.seq_id, x.start, len(x.tokens), x.sample) for x in output.chunks] == [
        ("a", 6, 1, True), ("b", 4, 2, True), ("c", 0, 6, True),
    ]
    assert output.num_tokens == 9 <= 10


def prompt_shapes(scheduler: Scheduler, seq: Sequence, kv: KVModel | None = None
                  ) -> list[tuple[int, int, bool]]:
    """(start, length, sample) of each chunk of `seq` until its first sample."""
    shapes = []
    while seq.num_output == 0:
        output, _ = run_step(scheduler, kv=kv)
        shapes += [(c.start, len(c.tokens), c.sample) for c in output.chunks if c.seq is seq]
    return shapes


@pytest.mark.parametrize(
    ("prompt_len", "budget", "shapes"),
    [
        (20, 8, [(0, 8, False), (8, 8, False), (16, 3, False), (19, 1, True)]),
        (20, 64, [(0, 19, False), (19, 1, True)]),
        (9, 8, [(0, 8, False), (8, 1, True)]),   # the prefix fills the budget exactly
        (2, 8, [(0, 1, False), (1, 1, True)]),
        (1, 8, [(0, 1, True)]),                  # nothing before it: one chunk
    ],
)
def test_a_prompts_last_token_is_read_alone_after_the_rest(
    prompt_len: int, budget: int, shapes: list[tuple[int, int, bool]]
) -> None:
    scheduler = make_scheduler(max_sequences=1, step_token_budget=budget,
                               last_prompt_token_alone=True)
    seq = make_seq("a", prompt_len)
    scheduler.add(seq)
    assert prompt_shapes(scheduler, seq) == shapes
    assert seq.num_computed == prompt_len


def test_without_the_option_the_prompt_ends_inside_its_last_chunk() -> None:
    scheduler = make_scheduler(max_sequences=1, step_token_budget=64,
                               last_prompt_token_alone=False)
    seq = make_seq("a", 20)
    scheduler.add(seq)
    assert prompt_shapes(scheduler, seq) == [(0, 20, True)]


@pytest.mark.parametrize("cached", ["", "abc", "abcdefgh", "abcdefghij", "abcdefghijXYZ"])
def test_cold_and_warm_reads_sample_from_the_same_one_token_chunk(cached: str) -> None:
    """Whatever the prefix cache holds, the logits sampled from come from the last prompt
    token read alone at the same position: cold and warm reads take the same path."""
    scheduler = make_scheduler(max_sequences=1, step_token_budget=4,
                               last_prompt_token_alone=True)
    kv = warm(scheduler, [cached]) if cached else KVModel()
    seq = make_seq("new", prompt=toks("abcdefghij"))
    scheduler.add(seq)
    shapes = prompt_shapes(scheduler, seq, kv)
    assert shapes[-1] == (9, 1, True)
    assert all(not sample and start + n <= 9 for start, n, sample in shapes[:-1])
    assert seq.num_cached == min(len(cached), 9) if cached else seq.num_cached == 0


def test_the_last_prompt_token_joins_the_decode_tokens_of_the_next_step() -> None:
    scheduler = make_scheduler(max_sequences=2, step_token_budget=16,
                               last_prompt_token_alone=True)
    decoder = make_seq("decoder", 1, max_tokens=20)
    scheduler.add(decoder)
    run_step(scheduler)
    new = make_seq("new", 6)
    scheduler.add(new)
    output, _ = run_step(scheduler)
    assert [(c.seq.seq_id, c.start, len(c.tokens), c.sample) for c in output.chunks] == [
        ("decoder", 1, 1, True), ("new", 0, 5, False)]
    output, _ = run_step(scheduler)
    assert [(c.seq.seq_id, c.start, len(c.tokens), c.sample) for c in output.chunks] == [
        ("decoder", 2, 1, True), ("new", 5, 1, True)]


# -- finishing ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "tokens", "reason", "num_output"),
    [
        (3, 10, [PLAIN, PLAIN, EOG], FinishReason.STOP, 3),    # end-of-generation token
        (3, 10, [EOG], FinishReason.STOP, 1),                  # EOG as the very first token
        (3, 3, [PLAIN, PLAIN, PLAIN], FinishReason.LENGTH, 3),  # max_tokens
        (3, 1, [PLAIN], FinishReason.LENGTH, 1),               # max_tokens on the prefill sample
        (3, 2, [PLAIN, EOG], FinishReason.STOP, 2),            # EOG wins when both apply
        (12, 4, [PLAIN] * 4, FinishReason.LENGTH, 4),          # fills the context exactly
    ],
)
def test_finish_conditions(
    prompt_len: int, max_tokens: int, tokens: list[int], reason: FinishReason, num_output: int
) -> None:
    scheduler = make_scheduler(max_sequences=1, step_token_budget=16, context_per_sequence=16)
    seq = make_seq("a", prompt_len, max_tokens)
    scheduler.add(seq)
    feed = iter(tokens)

    finished: list[Sequence] = []
    for step in range(len(tokens)):
        assert seq.finish_reason is None, f"finished early, at step {step}"
        _, finished = run_step(scheduler, lambda _seq: next(feed))

    assert finished == [seq]
    assert seq.status is SequenceStatus.FINISHED
    assert seq.finish_reason is reason
    assert seq.num_output == num_output
    assert seq.output_ids == tokens
    assert seq.slot is None
    assert scheduler.running == []
    assert scheduler.kv_reserved == 0


def test_context_per_sequence_guard_ends_a_sequence_whose_context_is_full() -> None:
    # add() keeps prompt + max_tokens within the context, so this guard is defensive: check
    # it directly on a sequence whose max_tokens alone would let it run past the context.
    scheduler = make_scheduler(context_per_sequence=8)
    seq = make_seq("a", 5, max_tokens=100)
    seq.token_ids.extend([PLAIN, PLAIN])        # 7 tokens: one cell left
    assert scheduler._stop_reason(seq, PLAIN) is None
    seq.token_ids.append(PLAIN)                 # 8 tokens: the context is full
    assert scheduler._stop_reason(seq, PLAIN) is FinishReason.LENGTH



@pytest.mark.parametrize("prefix_caching", [True, False])
def test_finish_by_caller_frees_the_slot_once(prefix_caching: bool) -> None:
    scheduler = make_scheduler(max_sequences=1, prefix_caching=prefix_caching)
    seq = make_seq("a", 2, max_tokens=10)
    scheduler.add(seq)
    run_step(scheduler)
    slot = seq.slot
    assert slot is not None

    scheduler.finish(seq, FinishReason.STOP)   # a stop string found by the engine
    scheduler.finish(seq, FinishReason.ABORT)  # a second call changes nothing
    assert seq.finish_reason is FinishReason.STOP
    assert seq.slot is None
    assert scheduler.slots.free_slots == [slot]
    assert scheduler.kv_reserved == 0
    if prefix_caching:
        # The cells stay for a later prompt; the sampled token has none yet.
        assert slot_cache(scheduler) == {slot: seq.prompt_ids}
        assert scheduler.schedule().kv_truncations == []
    else:
        assert slot_cache(scheduler) == {}
        assert scheduler.schedule().kv_truncations == [(slot, 0)]
    assert scheduler.schedule().kv_truncations == []


# -- freeing and reusing slots ----------------------------------------------------------------


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_finished_slot_is_cleared_exactly_once_before_reuse(prefix_caching: bool) -> None:
    scheduler = make_scheduler(max_sequences=1, step_token_budget=8,
                               prefix_caching=prefix_caching)
    kv = KVModel()
    a = make_seq("a", 3, max_tokens=1)
    b = make_seq("b", 3, max_tokens=1)   # shares nothing with "a"
    scheduler.add(a)
    scheduler.add(b)

    output, finished = run_step(scheduler, kv=kv)
    assert finished == [a]
    assert output.kv_truncations == []
    assert scheduler.has_work()  # "b" waits

    output, finished = run_step(scheduler, kv=kv)
    assert output.kv_truncations == [(0, 0)]   # cleared before this step's batch ...
    assert chunk_ids(output) == ["b"]          # ... which already reuses the slot
    assert b.num_cached == 0
    assert finished == [b]

    if prefix_caching:
        assert not scheduler.has_work()        # "b"'s cells stay cached
        assert kv.slots == {0: b.prompt_ids}
    else:
        assert scheduler.has_work()            # "b"'s turn to be cleared, once
        output, _ = run_step(scheduler, kv=kv)
        assert output.kv_truncations == [(0, 0)]
        assert output.chunks == []
        assert kv.slots == {0: []}
        assert not scheduler.has_work()
    assert scheduler.schedule().kv_truncations == []


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_has_work_until_the_last_slot_is_cleared(prefix_caching: bool) -> None:
    scheduler = make_scheduler(prefix_caching=prefix_caching)
    assert not scheduler.has_work()
    seq = make_seq("a", 2, max_tokens=1)
    scheduler.add(seq)
    assert scheduler.has_work()
    output = scheduler.schedule()
    slot = seq.slot
    assert slot is not None
    assert scheduler.update_from_output(output, {"a": PLAIN}) == [seq]
    if prefix_caching:
        assert not scheduler.has_work()        # nothing to clear: the cells stay cached
        assert scheduler.schedule().kv_truncations == []
    else:
        assert scheduler.has_work()            # the slot is not cleared yet
        assert scheduler.schedule().kv_truncations == [(slot, 0)]
    assert not scheduler.has_work()


# -- abort ----------------------------------------------------------------------------------


def test_abort_a_waiting_sequence() -> None:
    scheduler = make_scheduler(max_sequences=1)
    running, waiting = make_seq("running", 2, 8), make_seq("waiting", 2, 8)
    scheduler.add(running)
    scheduler.add(waiting)
    run_step(scheduler)
    kv_before = scheduler.kv_reserved

    assert scheduler.abort("waiting") is waiting

    assert waiting.status is SequenceStatus.FINISHED
    assert waiting.finish_reason is FinishReason.ABORT
    assert waiting.slot is None
    assert not scheduler.waiting
    assert scheduler.kv_reserved == kv_before
    output, _ = run_step(scheduler)
    assert output.kv_truncations == []     # it never held a slot
    assert chunk_ids(output) == ["running"]
    assert slot_cache(scheduler) == {}


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_abort_a_running_sequence_frees_its_slot_and_kv(prefix_caching: bool) -> None:
    scheduler = make_scheduler(max_sequences=2, prefix_caching=prefix_caching)
    kv = KVModel()
    a, b = make_seq("a", 2, 8), make_seq("b", 2, 8)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler, kv=kv)
    slot = a.slot
    assert slot is not None

    assert scheduler.abort("a") is a

    assert a.status is SequenceStatus.FINISHED
    assert a.finish_reason is FinishReason.ABORT
    assert a.slot is None
    assert scheduler.running == [b]
    assert scheduler.kv_reserved == b.kv_reservation
    assert scheduler.slots.free_slots == [slot]
    output, _ = run_step(scheduler, kv=kv)
    assert output.kv_truncations == ([] if prefix_caching else [(slot, 0)])
    assert chunk_ids(output) == ["b"]
    assert scheduler.abort("a") is None    # already gone
    assert run_step(scheduler, kv=kv)[0].kv_truncations == []

    c = make_seq("c", 2, 8)                # shares nothing with "a": gets a clean slot
    scheduler.add(c)
    output, _ = run_step(scheduler, kv=kv)
    assert c.slot == slot
    assert output.kv_truncations == ([(slot, 0)] if prefix_caching else [])


def test_abort_unknown_request_returns_none() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_seq("a", 2))
    assert scheduler.abort("nope") is None
    assert len(scheduler.waiting) == 1


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_abort_while_a_step_is_in_flight_ignores_its_results(prefix_caching: bool) -> None:
    scheduler = make_scheduler(max_sequences=2, prefix_caching=prefix_caching)
    kv = KVModel()
    a, b = make_seq("a", 2, 8), make_seq("b", 2, 8)
    scheduler.add(a)
    scheduler.add(b)
    output = scheduler.schedule()
    kv.apply(output)                       # llama_decode writes the cells ...
    scheduler.abort("a")                   # ... while the client leaves

    finished = scheduler.update_from_output(output, {"b": PLAIN})  # no token for "a"

    assert finished == []
    assert a.output_ids == []
    assert a.num_computed == 0
    assert b.output_ids == [PLAIN]
    # The cells the aborted chunk wrote are never taken for "a"'s, and are cleared.
    again = make_seq("again", prompt=[*a.prompt_ids, 11])
    scheduler.add(again)
    output, _ = run_step(scheduler, kv=kv)
    assert output.kv_truncations == [(0, 0)]
    assert again.slot == 0
    assert again.num_cached == 0


@pytest.mark.parametrize(("prefix_caching", "keep", "reused"), [(True, 4, 4), (False, 0, 0)])
def test_cells_of_a_chunk_in_flight_at_abort_are_dropped_before_reuse(
    prefix_caching: bool, keep: int, reused: int
) -> None:
    scheduler = make_scheduler(max_sequences=1, step_token_budget=4,
                               prefix_caching=prefix_caching)
    kv = KVModel()
    prompt = toks("abcdefgh")
    a = make_seq("a", prompt=prompt, max_tokens=4)
    scheduler.add(a)
    run_step(scheduler, kv=kv)             # cells 0..3: computed
    output = scheduler.schedule()
    kv.apply(output)                       # cells 4..7: written by the step in flight ...
    scheduler.abort("a")                   # ... that the abort makes the scheduler ignore
    assert scheduler.update_from_output(output, {"a": -1}) == []
    assert a.num_computed == 4

    b = make_seq("b", prompt=prompt + toks("xy"))
    scheduler.add(b)
    output, _ = run_step(scheduler, kv=kv)
    assert output.kv_truncations == [(0, keep)]
    assert b.num_cached == reused
    assert output.chunks[0].start == reused
    assert kv.slots[0] == b.token_ids[:b.num_computed]


# -- prefix caching -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_sequences", "cached", "prompt", "slot", "reused", "truncations"),
    [
        # the longest shared prefix wins; the slot's cells past it are dropped
        (3, ["abcx", "abcdefg", "zzz"], "abcdeq", 1, 5, [(1, 5)]),
        (2, ["xyz", "abc"], "abd", 1, 2, [(1, 2)]),
        # the slot holds exactly the shared prefix: nothing to drop
        (3, ["abcd", "ab", "a"], "abcdef", 0, 4, []),
        (3, ["ab", "abcd", "abc"], "abcdef", 1, 4, []),
        (1, ["abc"], "abcd", 0, 3, []),
        # the whole prompt is cached: its last token is read again for its logits
        (1, ["abcd"], "abcd", 0, 3, [(0, 3)]),
        (1, ["abcdef"], "abcd", 0, 3, [(0, 3)]),
        (1, ["a"], "a", 0, 0, [(0, 0)]),
        # a tie goes to the slot freed longest ago
        (2, ["abq", "abr"], "abc", 0, 2, [(0, 2)]),
        # nothing shared: the slot freed longest ago, cleared if it holds cells
        (2, ["xyz", "uvw"], "abc", 0, 0, [(0, 0)]),
        (3, ["xyz", "uvw"], "abc", 2, 0, []),
    ],
)
def test_admission_reuses_the_longest_cached_prefix(
    max_sequences: int, cached: list[str], prompt: str, slot: int, reused: int,
    truncations: list[tuple[int, int]],
) -> None:
    scheduler = make_scheduler(max_sequences=max_sequences, step_token_budget=32)
    kv = warm(scheduler, cached)
    seq = make_seq("new", prompt=toks(prompt), max_tokens=2)
    scheduler.add(seq)

    output, _ = run_step(scheduler, kv=kv)

    assert output.kv_truncations == truncations   # in the step that reads the prompt
    assert seq.slot == slot
    assert seq.num_cached == reused
    [chunk] = output.chunks
    assert (chunk.start, chunk.tokens, chunk.sample) == (reused, toks(prompt)[reused:], True)
    assert seq.num_computed == len(prompt)
    assert all(kv.slots[s] == toks(p) for s, p in enumerate(cached) if s != slot)

    output, finished = run_step(scheduler, kv=kv)  # truncated once, never again
    assert finished == [seq]
    assert output.kv_truncations == []
    assert seq.num_cached == reused
    assert slot_cache(scheduler)[slot] == [*toks(prompt), PLAIN]
    assert not scheduler.has_work()


@pytest.mark.parametrize(
    ("finish_order", "slots"),
    [(["a", "b"], [0, 1]), (["b", "a"], [1, 0])],
)
def test_with_nothing_shared_the_slot_freed_longest_ago_is_taken(
    finish_order: list[str], slots: list[int]
) -> None:
    scheduler = make_scheduler(max_sequences=2, step_token_budget=16)
    seqs = {rid: make_seq(rid, 3, 10) for rid in "ab"}
    for seq in seqs.values():
        scheduler.add(seq)
    run_step(scheduler)
    assert [seqs["a"].slot, seqs["b"].slot] == [0, 1]
    for rid in finish_order:
        scheduler.finish(seqs[rid], FinishReason.STOP)

    c, d = make_seq("c", 3), make_seq("d", 3)
    scheduler.add(c)
    scheduler.add(d)
    output = scheduler.schedule()

    assert [c.slot, d.slot] == slots
    assert output.kv_truncations == [(slots[0], 0), (slots[1], 0)]
    assert c.num_cached == d.num_cached == 0


@pytest.mark.parametrize(
    ("cached", "prompt", "shapes"),
    [
        ("abcdefghij", "abcdefXYZWVU", [(6, 4, False), (10, 2, True)]),
        ("abcdefghij", "abcdefghijXY", [(10, 2, True)]),
        ("abcdefghij", "abcdefghij", [(9, 1, True)]),
        ("abcdefghij", "Xbcdefghij", [(0, 4, False), (4, 4, False), (8, 2, True)]),
    ],
)
def test_a_reused_prefix_shortens_the_prefill(
    cached: str, prompt: str, shapes: list[tuple[int, int, bool]]
) -> None:
    scheduler = make_scheduler(max_sequences=1, step_token_budget=4)
    kv = warm(scheduler, [cached])
    seq = make_seq("new", prompt=toks(prompt))
    scheduler.add(seq)

    seen = []
    while seq.num_output == 0:
        output, _ = run_step(scheduler, kv=kv)
        [chunk] = output.chunks
        seen.append((chunk.start, len(chunk.tokens), chunk.sample))
    assert seen == shapes
    assert seq.num_cached == shapes[0][0]


def test_a_follow_up_prompt_reuses_the_previous_answer() -> None:
    scheduler = make_scheduler(max_sequences=1, step_token_budget=16)
    kv = KVModel()
    first = make_seq("first", prompt=toks("hello"), max_tokens=3)
    scheduler.add(first)
    answer = iter([11, 12, 13])
    while first.finish_reason is None:
        run_step(scheduler, lambda _seq: next(answer), kv=kv)
    assert first.output_ids == [11, 12, 13]
    assert slot_cache(scheduler) == {0: [*toks("hello"), 11, 12]}   # 13 was never decoded

    second = make_seq("second", prompt=[*toks("hello"), 11, 12, 13, *toks("more")])
    scheduler.add(second)
    output, _ = run_step(scheduler, kv=kv)

    assert output.kv_truncations == []
    assert second.num_cached == 7
    [chunk] = output.chunks
    assert (chunk.start, chunk.tokens) == (7, [13, *toks("more")])


@pytest.mark.parametrize(
    ("steps_before_abort", "reused"),
    [
        (0, 0),    # still waiting: it never held a slot
        (1, 4),    # one prefill chunk computed
        (2, 8),
        (3, 12),   # the whole prompt, and its first token sampled (no cell yet)
        (4, 13),   # that token decoded too
    ],
)
def test_an_aborted_sequences_computed_cells_are_reused(
    steps_before_abort: int, reused: int
) -> None:
    scheduler = make_scheduler(max_sequences=1, step_token_budget=4)
    kv = KVModel()
    prompt = toks("abcdefghijkl")
    a = make_seq("a", prompt=prompt, max_tokens=4)
    scheduler.add(a)
    for _ in range(steps_before_abort):
        run_step(scheduler, kv=kv)
    assert scheduler.abort("a") is a
    assert a.num_computed == reused

    b = make_seq("b", prompt=[*prompt, PLAIN, PLAIN, PLAIN, *toks("xy")])
    scheduler.add(b)
    output, _ = run_step(scheduler, kv=kv)

    assert output.kv_truncations == []     # the slot holds exactly the computed cells
    assert b.num_cached == reused
    assert output.chunks[0].start == reused


@pytest.mark.parametrize(
    ("prefix_caching", "at_finish", "at_admission", "reused"),
    [
        (True, [], [(0, 5)], 5),
        (False, [(0, 0)], [], 0),
    ],
)
def test_prefix_caching_can_be_turned_off(
    prefix_caching: bool, at_finish: list[tuple[int, int]],
    at_admission: list[tuple[int, int]], reused: int,
) -> None:
    scheduler = make_scheduler(max_sequences=1, step_token_budget=16,
                               prefix_caching=prefix_caching)
    kv = KVModel()
    a = make_seq("a", prompt=toks("abcdef"), max_tokens=1)
    scheduler.add(a)
    assert run_step(scheduler, kv=kv)[1] == [a]
    assert scheduler.has_work() is not prefix_caching
    output, _ = run_step(scheduler, kv=kv)
    assert output.kv_truncations == at_finish
    assert not scheduler.has_work()

    b = make_seq("b", prompt=toks("abcdef"), max_tokens=1)   # the very same prompt
    scheduler.add(b)
    output, _ = run_step(scheduler, kv=kv)
    assert output.kv_truncations == at_admission
    assert b.num_cached == reused
    assert output.chunks[0].start == reused


def test_without_prefix_caching_the_slot_is_cleared_in_the_admitting_step() -> None:
    scheduler = make_scheduler(max_sequences=1, step_token_budget=16, prefix_caching=False)
    kv = KVModel()
    a = make_seq("a", prompt=toks("abcdef"), max_tokens=1)
    b = make_seq("b", prompt=toks("abcdef"), max_tokens=1)
    scheduler.add(a)
    scheduler.add(b)
    assert run_step(scheduler, kv=kv)[1] == [a]

    output, _ = run_step(scheduler, kv=kv)

    assert output.kv_truncations == [(0, 0)]
    assert chunk_ids(output) == ["b"]
    assert b.num_cached == 0
    assert output.chunks[0].start == 0


@pytest.mark.parametrize(
    ("cached", "prompt_len", "max_tokens", "truncations"),
    [
        # kv_capacity 20; 5 cells cached per warmed slot; the new sequence takes a slot
        # never used
        (["abcde"], 5, 10, []),                         # 5 + 15 fits exactly
        (["abcde"], 5, 11, [(0, 0)]),                   # 5 + 16 does not: slot 0 is cleared
        (["abcde", "fghij"], 5, 5, []),                 # 10 + 10 fits
        (["abcde", "fghij"], 5, 6, [(0, 0)]),           # freed longest ago goes first ...
        (["abcde", "fghij"], 5, 11, [(0, 0), (1, 0)]),  # ... then the next, as needed
    ],
)
def test_cached_cells_give_way_when_the_kv_cache_needs_room(
    cached: list[str], prompt_len: int, max_tokens: int, truncations: list[tuple[int, int]]
) -> None:
    scheduler = make_scheduler(max_sequences=3, step_token_budget=16, kv_capacity=20,
                               context_per_sequence=20)
    kv = warm(scheduler, cached)
    kv.kv_capacity = 20
    seq = make_seq("new", prompt_len, max_tokens)
    scheduler.add(seq)

    output, _ = run_step(scheduler, kv=kv)

    assert seq.slot == len(cached)
    assert output.kv_truncations == truncations
    assert kv.num_cells + max_tokens - 1 <= 20     # room for every token it may still add
    assert set(scheduler.slots.cached) == {s for s in range(len(cached))
                                          if (s, 0) not in truncations}


def test_a_prefix_in_the_admitted_slot_needs_no_extra_room() -> None:
    scheduler = make_scheduler(max_sequences=2, step_token_budget=32, kv_capacity=20,
                               context_per_sequence=20)
    kv = warm(scheduler, ["abcdefghij"])
    kv.kv_capacity = 20
    seq = make_seq("new", prompt=toks("abcdefghijklmno"), max_tokens=5)  # 20 cells
    scheduler.add(seq)

    output, _ = run_step(scheduler, kv=kv)

    assert (seq.slot, seq.num_cached) == (0, 10)
    assert output.kv_truncations == []


# -- reuse from running sequences ---------------------------------------------------------------


def prompt_tokens_read(chunk: ScheduledChunk) -> int:
    return max(0, min(chunk.start + len(chunk.tokens), chunk.seq.num_prompt) - chunk.start)


SOURCE = "abcdefghijklmnopqrst"   # 20 tokens


@pytest.mark.parametrize(
    ("source_steps", "prompt", "copies", "reused"),
    [
        # the source has read 16 of its 20 prompt tokens: only those 16 are copied
        (1, SOURCE + "XY", [(0, 1, 16)], 16),
        (1, SOURCE[:10] + "XY", [(0, 1, 10)], 10),
        (1, SOURCE[:16], [(0, 1, 15)], 15),       # capped at the new prompt - 1
        # the source has read its whole prompt (and sampled one token)
        (2, SOURCE + "XY", [(0, 1, 20)], 20),
        (2, SOURCE, [(0, 1, 19)], 19),            # the last prompt token is read again
        (2, SOURCE[:1], [], 0),                   # a one-token prompt reuses nothing
        # the source is decoding: its cells past the prompt are never copied
        (3, SOURCE + "\x07Z", [(0, 1, 20)], 20),  # \x07 == PLAIN, the source's output
        # nothing shared
        (2, "XYZ", [], 0),
    ],
)
def test_admission_copies_the_computed_prompt_of_a_running_sequence(
    source_steps: int, prompt: str, copies: list[tuple[int, int, int]], reused: int
) -> None:
    scheduler = make_scheduler(max_sequences=2, step_token_budget=16)
    kv = KVModel()
    source = make_seq("source", prompt=toks(SOURCE), max_tokens=10)
    scheduler.add(source)
    for _ in range(source_steps):
        run_step(scheduler, kv=kv)
    computed = source.num_computed
    assert source.slot == 0 and computed == {1: 16, 2: 20, 3: 21}[source_steps]

    seq = make_seq("new", prompt=toks(prompt), max_tokens=2)
    scheduler.add(seq)
    output, _ = run_step(scheduler, kv=kv)

    assert output.kv_copies == copies
    assert output.kv_truncations == []       # slot 1 was never used: nothing to clear
    for _src, _dst, n in output.kv_copies:
        assert n <= min(computed, source.num_prompt)
    assert (seq.slot, seq.num_cached) == (1, reused)
    new_chunk = next(c for c in output.chunks if c.seq is seq)
    assert (new_chunk.start, new_chunk.tokens) == (reused, toks(prompt)[reused:])
    assert kv.slots[1] == seq.token_ids[:seq.num_computed]
    assert kv.slots[0] == source.token_ids[:source.num_computed]   # the source is untouched


@pytest.mark.parametrize(
    ("running", "cached", "prompt", "slot", "copies", "truncations", "reused"),
    [
        # as long as the running sequence's prefix: the free slot's cells are taken
        ("abcdefghXY", "abcdefghZW", "abcdefghQQ", 1, [], [(1, 8)], 8),
        ("abcdefghij", "abcdefghij", "abcdefghijQ", 1, [], [], 10),
        # longer: the free slot's cells are taken
        ("abcdefghXY", "abcdefghijZW", "abcdefghijQQ", 1, [], [(1, 10)], 10),
        # shorter: the running sequence's cells are copied into the slot freed longest ago
        ("abcdefghijXY", "abcdefghZW", "abcdefghijQQ", 2, [(0, 2, 10)], [], 10),
    ],
)
def test_a_free_slots_cells_are_preferred_when_at_least_as_long(
    running: str, cached: str, prompt: str, slot: int,
    copies: list[tuple[int, int, int]], truncations: list[tuple[int, int]], reused: int,
) -> None:
    scheduler = make_scheduler(max_sequences=3, step_token_budget=32)
    kv = KVModel()
    keeps_running = make_seq("running", prompt=toks(running), max_tokens=10)
    leaves_cells = make_seq("cached", prompt=toks(cached), max_tokens=1)
    scheduler.add_group([keeps_running, leaves_cells])
    assert run_step(scheduler, kv=kv)[1] == [leaves_cells]
    assert (keeps_running.slot, scheduler.slots.free_slots) == (0, [2, 1])
    assert slot_cache(scheduler) == {1: toks(cached)}

    seq = make_seq("new", prompt=toks(prompt), max_tokens=2)
    scheduler.add(seq)
    output, _ = run_step(scheduler, kv=kv)

    assert (seq.slot, seq.num_cached) == (slot, reused)
    assert output.kv_copies == copies
    assert output.kv_truncations == truncations
    assert kv.slots[slot] == seq.token_ids[:seq.num_computed]


@pytest.mark.parametrize(
    "cached",
    [
        "XYZW",         # unrelated cells
        "abcXYZ",       # cells sharing a shorter prefix than the running sequence's ...
        "abcdefghij",   # ... however long: they all go, not just their tail
    ],
)
def test_a_copy_goes_into_a_slot_cleared_first(cached: str) -> None:
    scheduler = make_scheduler(max_sequences=2, step_token_budget=32)
    kv = KVModel()
    source = make_seq("source", prompt=toks("abcdefghijklmn"), max_tokens=10)
    leaves_cells = make_seq("cached", prompt=toks(cached), max_tokens=1)
    scheduler.add_group([source, leaves_cells])
    run_step(scheduler, kv=kv)
    assert (source.slot, scheduler.slots.free_slots) == (0, [1])
    assert kv.slots[1] == toks(cached)

    # The running source shares 14 tokens with the prompt, more than slot 1's cells do.
    seq = make_seq("new", prompt=toks("abcdefghijklmnopq"), max_tokens=2)
    scheduler.add(seq)
    output, _ = run_step(scheduler, kv=kv)

    assert output.kv_truncations == [(1, 0)]   # the whole slot, before the copy
    assert output.kv_copies == [(0, 1, 14)]
    assert (seq.slot, seq.num_cached) == (1, 14)
    assert kv.slots[1] == seq.token_ids[:seq.num_computed]

    _, finished = run_step(scheduler, kv=kv)
    assert finished == [seq]
    output, _ = run_step(scheduler, kv=kv)     # cleared once, copied once
    assert output.kv_truncations == []
    assert output.kv_copies == []


# -- waiting for a shared prefix another sequence is reading -------------------------------------


@pytest.mark.parametrize(
    ("budget", "tail", "admit_step", "copied"),
    [
        # the first reads 50 a step; the second waits until it has read all 200
        (50, 0, 5, 199),    # the same prompt (the n choices of a request): 1 token to read
        (50, 5, 5, 200),    # its own 5 tokens after the shared 200
        # 64 a step: the first's last chunk (192..200) leaves room, and what is still to
        # read (8 tokens) is less than SHARE_MIN_TOKENS: admitted alongside, copying 192
        (64, 0, 4, 192),
        (64, 5, 4, 192),
    ],
)
def test_a_sequence_waits_for_the_prompt_prefix_another_is_reading(
    budget: int, tail: int, admit_step: int, copied: int
) -> None:
    scheduler = make_scheduler(max_sequences=2, step_token_budget=budget, kv_capacity=1024,
                               context_per_sequence=256)
    kv = KVModel()
    shared = fresh(200)
    first = make_seq("first", prompt=shared, max_tokens=8)
    second = make_seq("second", prompt=shared + fresh(tail), max_tokens=8)
    scheduler.add_group([first, second])
    read = {"first": 0, "second": 0}

    for step in range(1, admit_step):
        output, _ = run_step(scheduler, kv=kv)
        read["first"] += prompt_tokens_read(output.chunks[0])
        assert chunk_ids(output) == ["first"], f"step {step}"
        assert output.kv_copies == []
        assert list(scheduler.waiting) == [second]
        assert second.status is SequenceStatus.WAITING and second.slot is None

    output, _ = run_step(scheduler, kv=kv)
    assert chunk_ids(output) == ["first", "second"]
    assert output.kv_copies == [(0, 1, copied)]
    assert output.kv_truncations == []
    assert (second.slot, second.num_cached) == (1, copied)
    chunk = output.chunks[1]
    assert (chunk.start, chunk.tokens, chunk.sample) == (copied, second.prompt_ids[copied:], True)
    assert second.num_output == 1
    for chunk in output.chunks:
        read[chunk.seq.seq_id] += prompt_tokens_read(chunk)
    assert read == {"first": 200, "second": 200 + tail - copied}

    while scheduler.running:
        output, _ = run_step(scheduler, kv=kv)
        assert output.kv_copies == []
    assert first.num_output == second.num_output == 8


@pytest.mark.parametrize(
    ("budget", "first_len", "steps_before", "shared", "tail", "deferred"),
    [
        # both added together: nothing is computed yet when the second is looked at
        (128, 40, 0, SHARE_MIN_TOKENS - 1, 5, False),
        (128, 40, 0, SHARE_MIN_TOKENS, 5, True),
        # the same prompt: its last token is read anyway, so one token less is shared
        (128, SHARE_MIN_TOKENS, 0, SHARE_MIN_TOKENS, 0, False),
        (128, SHARE_MIN_TOKENS + 1, 0, SHARE_MIN_TOKENS + 1, 0, True),
        # the first has read 40 tokens before the step: only what it still has to read counts
        (40, 60, 1, 60, 5, False),
        (40, 40 + SHARE_MIN_TOKENS - 1, 1, 40 + SHARE_MIN_TOKENS - 1, 5, False),
        (40, 40 + SHARE_MIN_TOKENS, 1, 40 + SHARE_MIN_TOKENS, 5, True),
    ],
)
def test_only_a_shared_prefix_of_share_min_tokens_more_is_waited_for(
    budget: int, first_len: int, steps_before: int, shared: int, tail: int, deferred: bool
) -> None:
    scheduler = make_scheduler(max_sequences=2, step_token_budget=budget, kv_capacity=1024,
                               context_per_sequence=256)
    kv = KVModel()
    first = make_seq("first", prompt=fresh(first_len), max_tokens=8)
    second = make_seq("second", prompt=first.prompt_ids[:shared] + fresh(tail), max_tokens=8)
    scheduler.add(first)
    for _ in range(steps_before):
        run_step(scheduler, kv=kv)
    computed = first.num_computed
    scheduler.add(second)

    output, _ = run_step(scheduler, kv=kv)

    assert not first.is_prefilling   # in every case, its prompt is read by now
    if deferred:
        assert list(scheduler.waiting) == [second]
        assert chunk_ids(output) == ["first"]
        output, _ = run_step(scheduler, kv=kv)
        reused = min(shared, second.num_prompt - 1)   # all of it, from the first's cells
    else:
        assert not scheduler.waiting
        reused = min(shared, computed, second.num_prompt - 1)
    assert chunk_ids(output) == ["first", "second"]
    assert second.num_cached == reused
    assert output.kv_copies == ([(0, 1, reused)] if reused else [])


@pytest.mark.parametrize(
    ("num_deferred", "admitted"),
    [
        (1, True),
        # the step looks at the first WAITING_SCAN waiting sequences ("first" included)
        (WAITING_SCAN - 2, True),
        (WAITING_SCAN - 1, False),
    ],
)
def test_sequences_behind_one_that_waits_for_a_prefix_are_admitted(
    num_deferred: int, admitted: bool
) -> None:
    scheduler = make_scheduler(max_sequences=3, step_token_budget=256, kv_capacity=1024,
                               context_per_sequence=256, max_waiting=WAITING_SCAN + 1)
    kv = KVModel()
    shared = fresh(200)
    first = make_seq("first", prompt=shared)
    deferred = [make_seq(f"choice{i}", prompt=shared) for i in range(num_deferred)]
    unrelated = make_seq("unrelated", 10)
    scheduler.add_group([first, *deferred])
    scheduler.add(unrelated)

    output, _ = run_step(scheduler, kv=kv)

    assert chunk_ids(output) == (["first", "unrelated"] if admitted else ["first"])
    assert list(scheduler.waiting) == deferred + ([] if admitted else [unrelated])
    assert output.kv_copies == []

    output, _ = run_step(scheduler, kv=kv)   # the waiting choices copy the prompt, as slots free
    free = [2] if admitted else [1, 2]
    assert output.kv_copies == [(0, slot, 199) for slot in free]
    assert [seq.num_cached for seq in deferred[:len(free)]] == [199] * len(free)
    assert list(scheduler.waiting) == deferred[len(free):] + ([] if admitted else [unrelated])


@pytest.mark.parametrize(
    ("prefix_caching", "copies", "second_reads"),
    [(True, [(0, 1, 199)], 1), (False, [], 200)],
)
def test_choices_of_a_request_read_their_prompt_once_only_with_prefix_caching(
    prefix_caching: bool, copies: list[tuple[int, int, int]], second_reads: int
) -> None:
    scheduler = make_scheduler(max_sequences=2, step_token_budget=256, kv_capacity=1024,
                               context_per_sequence=256, prefix_caching=prefix_caching)
    kv = KVModel()
    shared = fresh(200)
    first, second = make_seq("first", prompt=shared), make_seq("second", prompt=shared)
    scheduler.add_group([first, second])

    all_copies: list[tuple[int, int, int]] = []
    read = {"first": 0, "second": 0}
    while scheduler.has_work():
        output, _ = run_step(scheduler, kv=kv)
        all_copies += output.kv_copies
        for chunk in output.chunks:
            read[chunk.seq.seq_id] += prompt_tokens_read(chunk)
    assert all_copies == copies
    assert read == {"first": 200, "second": second_reads}
    assert first.finish_reason is second.finish_reason is FinishReason.LENGTH


# -- cache scopes: no reuse across accounts ---------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "reused"),
    [("acct-a", "acct-a", 9), ("acct-a", "acct-b", 0), ("acct-a", None, 0),
     (None, "acct-a", 0), (None, None, 9)],
)
def test_a_free_slots_cells_are_reused_only_within_their_scope(
    first: str | None, second: str | None, reused: int
) -> None:
    scheduler = make_scheduler(max_sequences=2, step_token_budget=64)
    kv = KVModel()
    prompt = toks("a system prompt")
    owner = make_seq("owner", prompt=prompt, max_tokens=1, scope=first)
    scheduler.add(owner)
    run_step(scheduler, kv=kv)
    assert owner.finish_reason is FinishReason.LENGTH

    probe = make_seq("probe", prompt=[*prompt[:9], *toks("!!!")], scope=second)
    scheduler.add(probe)
    output, _ = run_step(scheduler, kv=kv)
    assert probe.num_cached == reused
    assert output.chunks[0].start == reused
    if not reused:   # another scope's cells are left alone, in their own slot
        assert probe.slot == 1
        assert slot_cache(scheduler)[0] == prompt


def test_a_scope_does_not_see_cells_another_scope_left_in_any_free_slot() -> None:
    scheduler = make_scheduler(max_sequences=3, step_token_budget=64)
    kv = KVModel()
    for rid, scope, text in [("a", "acct-a", "shared prefix, then a"),
                             ("b", "acct-b", "shared prefix, then b")]:
        seq = make_seq(rid, prompt=toks(text), max_tokens=1, scope=scope)
        scheduler.add(seq)
        run_step(scheduler, kv=kv)
    probe = make_seq("probe", prompt=toks("shared prefix, then b!"), scope="acct-a")
    scheduler.add(probe)
    run_step(scheduler, kv=kv)
    assert probe.num_cached == len("shared prefix, then ")   # its own cells, not b's longer
    assert probe.slot == 0


@pytest.mark.parametrize(("scope", "copied"), [("acct-a", True), ("acct-b", False)])
def test_running_sequences_cells_are_copied_only_within_their_scope(
    scope: str, copied: bool
) -> None:
    scheduler = make_scheduler(max_sequences=2, step_token_budget=64, kv_capacity=1024,
                               context_per_sequence=256)
    common = fresh(40)
    first = make_seq("first", prompt=[*common, 1], max_tokens=8, scope="acct-a")
    scheduler.add(first)
    run_step(scheduler)
    second = make_seq("second", prompt=[*common, 2], max_tokens=8, scope=scope)
    scheduler.add(second)
    output = scheduler.schedule()
    assert bool(output.kv_copies) is copied
    assert second.num_cached == (40 if copied else 0)


@pytest.mark.parametrize(("scope", "waits"), [("acct-a", True), ("acct-b", False)])
def test_a_sequence_waits_only_for_a_prefix_its_own_scope_is_reading(
    scope: str, waits: bool
) -> None:
    scheduler = make_scheduler(max_sequences=2, step_token_budget=64, kv_capacity=1024,
                               context_per_sequence=256)
    common = fresh(100)
    reader = make_seq("reader", prompt=[*common, 1], scope="acct-a")
    scheduler.add(reader)
    run_step(scheduler)   # reads the first 64 of 101 tokens; the next step leaves room
    other = make_seq("other", prompt=[*common, 2], scope=scope)
    scheduler.add(other)
    output, _ = run_step(scheduler)
    assert (other in scheduler.waiting) is waits
    assert ("other" in chunk_ids(output)) is not waits


# -- add_group ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("already_waiting", "group_size", "max_waiting", "fits"),
    [
        (0, 3, 3, True),
        (0, 4, 3, False),
        (2, 2, 4, True),
        (2, 3, 4, False),    # two of the three would fit: none is queued
        (4, 1, 4, False),
        (1, 0, 1, True),     # an empty group queues nothing
    ],
)
def test_add_group_queues_all_or_none(
    already_waiting: int, group_size: int, max_waiting: int, fits: bool
) -> None:
    scheduler = make_scheduler(max_waiting=max_waiting)
    before = [make_seq(f"w{i}", 2) for i in range(already_waiting)]
    for seq in before:
        scheduler.add(seq)
    group = [make_seq(f"g{i}", 2) for i in range(group_size)]

    if fits:
        scheduler.add_group(group)
        assert list(scheduler.waiting) == before + group
        assert all(seq.status is SequenceStatus.WAITING for seq in group)
    else:
        with pytest.raises(QueueFullError):
            scheduler.add_group(group)
        assert list(scheduler.waiting) == before


def test_add_group_with_an_oversized_sequence_queues_none() -> None:
    scheduler = make_scheduler(context_per_sequence=64)
    group = [make_seq("fits", 10, 4), make_seq("too_big", 61, 4), make_seq("fits_too", 10, 4)]
    with pytest.raises(ValueError, match="KV cells"):
        scheduler.add_group(group)
    assert not scheduler.waiting
    assert not scheduler.has_work()


# -- invariants over random workloads ---------------------------------------------------------


def shared_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def run_random_workload(seed: int, prefix_caching: bool,
                        alone: bool = True, shares: bool = False) -> dict[str, int]:
    """Drive a random workload, checking the invariants at every step; count what it did.
    Requests come from three cache scopes (two accounts and the shared None); with `shares`,
    also from three fair-share accounts (of weights 1, 3 and the common share), drawn
    independently of the cache scopes, and then admission is first come, first served
    within each account only."""
    rng = random.Random(seed)
    config = SchedulerConfig(max_sequences=rng.choice([3, 4]),
                             step_token_budget=rng.choice([4, 7, 16, 64, 64]),
                             kv_capacity=rng.choice([64, 128, 400]), context_per_sequence=64,
                             max_waiting=6, prefix_caching=prefix_caching,
                             last_prompt_token_alone=alone,
                             reserved_slots=rng.choice([0, 1]) if shares else 0,
                             pause_heavy_every=rng.choice([0, 2]) if shares else 0)
    scheduler = Scheduler(config)
    kv = KVModel(config.kv_capacity)
    # Prompts share prefixes: a few short system prompts, long ones (worth waiting for while
    # another sequence reads them), and follow-ups of earlier conversations; the n choices of
    # a request share their whole prompt.
    systems = [[rng.randint(10, 60) for _ in range(rng.randint(3, 12))] for _ in range(3)]
    long_systems = [[rng.randint(10, 60) for _ in range(rng.randint(SHARE_MIN_TOKENS + 1, 50))]
                    for _ in range(2)]
    history: list[list[int]] = [[]]

    def random_prompt() -> list[int]:
        start = rng.choice([[], rng.choice(systems), rng.choice(long_systems),
                            rng.choice(long_systems), rng.choice(history)])
        prompt = start[:rng.randint(0, len(start))]
        if rng.random() < 0.5:
            prompt = list(start)
        prompt += [rng.randint(10, 60) for _ in range(rng.randint(0, 8))]
        return prompt[:54] or [rng.randint(10, 60)]

    stats = {"copies": 0, "deferrals": 0, "groups": 0, "reuses": 0, "kept": 0}
    occupant_scope: dict[int, str | None] = {}
    """The cache scope of the last sequence admitted to each slot."""
    cleared = 0
    admitted: set[str] = set()
    finished_ids: list[str] = []
    next_id = 0

    def check_step(output: SchedulerOutput, waiting_before: list[Sequence]) -> None:
        nonlocal cleared
        new = [c.seq for c in output.chunks if c.seq.seq_id not in admitted]
        running = {seq.slot: seq for seq in scheduler.running}
        destinations: set[int] = set()
        for src, dst, n in output.kv_copies:
            assert prefix_caching
            dest = running[dst]
            assert dest in new and dest.num_cached == n
            if src in running:
                # From a running sequence's computed prompt, into a sequence admitted now.
                source = running[src]
                assert source not in new or source.num_computed == source.num_cached
                assert 0 < n <= min(source.num_computed, source.num_prompt)
                assert source.cache_scope == dest.cache_scope
                assert dest.prompt_ids[:n] == source.prompt_ids[:n]
            else:
                # From a free slot's cached cells, which it keeps (the copy shares them).
                assert src in scheduler.slots.free_slots
                assert occupant_scope[src] == dest.cache_scope
                assert 0 < n <= len(scheduler.slots.cached[src])
                assert dest.prompt_ids[:n] == scheduler.slots.cached[src][:n].tolist()
                stats["kept"] += 1
            assert dst not in destinations
            destinations.add(dst)
        stats["copies"] += len(output.kv_copies)
        kv.apply(output)   # every chunk continues its slot, over its own tokens only
        cleared += len(output.kv_truncations)
        if not prefix_caching:
            assert all(keep == 0 for _, keep in output.kv_truncations)
        for chunk in output.chunks:
            seq = chunk.seq
            assert seq.slot is not None
            if seq.seq_id not in admitted:
                admitted.add(seq.seq_id)
                assert chunk.start == seq.num_cached
                assert 0 <= seq.num_cached < seq.num_prompt
                assert seq.num_cached == 0 or prefix_caching
                if seq.num_cached and seq.slot not in destinations:
                    # A free slot's cells: left by a sequence of the same scope.
                    assert occupant_scope[seq.slot] == seq.cache_scope
                    stats["reuses"] += 1
                occupant_scope[seq.slot] = seq.cache_scope
            if alone and chunk.start < seq.num_prompt:
                # The last prompt token is read alone; no prompt chunk reaches it otherwise.
                end = chunk.start + len(chunk.tokens)
                assert end < seq.num_prompt or (chunk.start, end) == (seq.num_prompt - 1,
                                                                       seq.num_prompt)
        # Admission is first come, first served, but for a sequence left waiting while
        # another sequence reads a long prefix of its prompt: one passed over, or one left
        # with budget, a slot and KV room to spare (there were at least as many when it
        # was looked at).
        def waits_for_a_prefix(seq: Sequence) -> bool:
            return any(other.is_prefilling and other.cache_scope == seq.cache_scope
                       and min(shared_prefix(other.prompt_ids, seq.prompt_ids),
                               seq.num_prompt - 1) >= SHARE_MIN_TOKENS
                       for other in scheduler.running)

        queues = ([[s for s in waiting_before if s.share == share] for share in SHARES]
                  if shares else [waiting_before])
        for queue in queues:
            passed_over = max((i for i, seq in enumerate(queue) if seq in new), default=0)
            for seq in queue[:passed_over]:
                if seq.status is SequenceStatus.WAITING:
                    assert prefix_caching
                    assert waits_for_a_prefix(seq)
        # Free slots whose cells this step copies stay as they are until the copy is made:
        # they are neither taken nor cleared in the step.
        copied = {src for src, _, _ in output.kv_copies if src not in running}
        copied_cells = sum(len(scheduler.slots.cached[src]) for src in copied)
        for seq in ([] if shares else waiting_before[:WAITING_SCAN]):
            if seq.status is not SequenceStatus.WAITING:
                continue
            if (output.num_tokens == config.step_token_budget
                    or len(scheduler.slots.free_slots) <= len(copied)
                    or scheduler.kv_reserved + seq.kv_reservation + copied_cells
                    > config.kv_capacity):
                break
            assert prefix_caching
            assert waits_for_a_prefix(seq)
            stats["deferrals"] += 1

    def check_free_slots() -> None:
        for slot in scheduler.slots.free_slots:
            cache = slot_cache(scheduler).get(slot, [])
            assert kv.slots.get(slot, [])[:len(cache)] == cache

    def schedule() -> SchedulerOutput:
        waiting_before = list(scheduler.waiting)
        output = scheduler.schedule()
        check_step(output, waiting_before)
        return output

    for _ in range(200):
        if rng.random() < 0.3:
            prompt = random_prompt()
            scope = rng.choice(["a", "b", None])
            share = rng.choice(SHARES) if shares else COMMON_SHARE
            group = [make_seq(f"r{next_id + i}", prompt=list(prompt),
                              max_tokens=rng.randint(1, 10), scope=scope, share=share)
                     for i in range(rng.choice([1, 1, 1, 2, 3]))]
            next_id += len(group)
            waiting = list(scheduler.waiting)
            try:
                scheduler.add_group(group)
                stats["groups"] += len(group) > 1
            except QueueFullError:
                assert len(waiting) + len(group) > config.max_waiting
                assert list(scheduler.waiting) == waiting
        if rng.random() < 0.05 and next_id:
            victim = scheduler.abort(f"r{rng.randrange(next_id)}")
            if victim is not None:
                finished_ids.append(victim.seq_id)
                history.append(victim.token_ids)

        decoding = [s for s in scheduler.running if not s.is_prefilling]
        output = schedule()

        assert output.num_tokens <= config.step_token_budget
        kept = [seq for seq in decoding if any(c.seq is seq for c in output.chunks)]
        assert [c.seq for c in output.chunks[:len(kept)]] == kept
        if len(kept) < len(decoding):   # paused while a lighter account's prompt is read
            assert config.pause_heavy_every > 0
            paused = {seq.share for seq in decoding if seq not in kept}
            assert all(c.seq.share not in paused for c in output.chunks[len(kept):])
            assert any(c.start < c.seq.num_prompt for c in output.chunks[len(kept):])
        slots = [s.slot for s in scheduler.running]
        assert None not in slots and len(set(slots)) == len(slots)
        assert not set(slots) & set(scheduler.slots.free_slots)
        assert scheduler.kv_reserved == sum(s.kv_reservation for s in scheduler.running)
        assert scheduler.kv_reserved <= config.kv_capacity
        for chunk in output.chunks:
            assert chunk.start == chunk.seq.num_computed
            assert chunk.tokens
            end = chunk.start + len(chunk.tokens)
            assert chunk.tokens == chunk.seq.token_ids[chunk.start:end]
            assert chunk.sample == (end == len(chunk.seq.token_ids))

        if rng.random() < 0.05 and next_id:   # the client leaves while the step runs
            victim = scheduler.abort(f"r{rng.randrange(next_id)}")
            if victim is not None:
                finished_ids.append(victim.seq_id)
                history.append(victim.token_ids)

        tokens = {c.seq.seq_id: rng.choice([PLAIN, PLAIN, PLAIN, EOG])
                  for c in output.chunks if c.sample}
        for seq in scheduler.update_from_output(output, tokens):
            finished_ids.append(seq.seq_id)
            history.append(seq.token_ids)
            assert len(seq.token_ids) <= config.context_per_sequence
            assert seq.num_output <= seq.params.max_tokens
        check_free_slots()

    for _ in range(2000):   # drain: every sequence ends, none waits forever
        if not (scheduler.running or scheduler.waiting):
            break
        output = schedule()
        tokens = {c.seq.seq_id: PLAIN for c in output.chunks if c.sample}
        finished_ids.extend(s.seq_id for s in scheduler.update_from_output(output, tokens))
        check_free_slots()
    else:
        pytest.fail("the workload did not drain")
    schedule()

    assert len(finished_ids) == len(set(finished_ids))
    assert admitted <= set(finished_ids)
    assert len(admitted) >= 1
    assert sorted(scheduler.slots.free_slots) == list(range(config.max_sequences))
    assert not scheduler.has_work()
    if not prefix_caching:
        # Every sequence that got a slot had it cleared exactly once.
        assert cleared == len(admitted)
        assert all(cells == [] for cells in kv.slots.values())
    return stats


@pytest.mark.parametrize("alone", [True, False])
@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("seed", range(20))
def test_random_workload_keeps_the_invariants(seed: int, prefix_caching: bool,
                                              alone: bool) -> None:
    run_random_workload(seed, prefix_caching, alone)


@pytest.mark.parametrize("prefix_caching", [True, False])
@pytest.mark.parametrize("seed", range(20))
def test_random_workload_with_fair_shares_keeps_the_invariants(
        seed: int, prefix_caching: bool) -> None:
    run_random_workload(seed, prefix_caching, shares=True)


def test_random_workloads_copy_and_wait_only_with_prefix_caching() -> None:
    """The workloads above do exercise copies and deferrals, and only with prefix caching."""
    with_caching = [run_random_workload(seed, True) for seed in range(20)]
    without = [run_random_workload(seed, False) for seed in range(20)]
    assert sum(s["groups"] for s in with_caching) > 0
    assert sum(s["copies"] for s in with_caching) > 0
    assert sum(s["deferrals"] for s in with_caching) > 0
    assert sum(s["reuses"] for s in with_caching) > 0
    assert sum(s["kept"] for s in with_caching) > 0
    assert sum(s["copies"] + s["deferrals"] for s in without) == 0


def test_forgetting_cached_cells_stops_reuse() -> None:
    """After the engine clears the whole KV cache (a failed step), nothing is reused."""
    scheduler = make_scheduler(max_sequences=2, step_token_budget=64)
    warm(scheduler, ["system prompt A", "system prompt B"])
    assert not scheduler.running   # warm() leaves free slots' cells, no running sequence
    scheduler.forget_cached_cells()
    seq = make_seq("after", prompt=toks("system prompt A, again"))
    scheduler.add(seq)
    output = scheduler.schedule()
    assert output.kv_truncations == []
    assert output.kv_copies == []
    assert seq.num_cached == 0
    assert output.chunks[0].start == 0


def test_after_a_failed_step_a_running_sequences_cells_are_not_copied() -> None:
    """The engine aborts every sequence, then forgets the cells: a sequence that was
    running when the step failed is no source of cells either."""
    scheduler = make_scheduler(max_sequences=2, step_token_budget=64)
    kv = KVModel()
    running = make_seq("running", prompt=toks("system prompt A"), max_tokens=10)
    scheduler.add(running)
    run_step(scheduler, kv=kv)
    probe = make_seq("probe", prompt=toks("system prompt A, again"))
    assert scheduler._best_prefix(probe) == (15, ("running", 0))   # a source until now

    assert scheduler.abort("running") is running
    scheduler.forget_cached_cells()
    kv.slots.clear()
    seq = make_seq("after", prompt=toks("system prompt A, again"))
    scheduler.add(seq)
    output, _ = run_step(scheduler, kv=kv)

    assert output.kv_truncations == []
    assert output.kv_copies == []
    assert seq.num_cached == 0
    assert output.chunks[0].start == 0


@pytest.mark.parametrize(("shared", "min_copy", "copied"), [
    (40, 0, True), (40, 40, True), (40, 41, False), (10, 64, False),
])
def test_copies_from_running_sequences_need_min_copy_tokens(
        shared: int, min_copy: int, copied: bool) -> None:
    scheduler = Scheduler(SchedulerConfig(
        max_sequences=2, step_token_budget=256, kv_capacity=1024, context_per_sequence=512,
        max_waiting=8, min_copy_tokens=min_copy, last_prompt_token_alone=WHOLE))
    common = [500 + i for i in range(shared)]
    first = make_seq("first", prompt=[*common, 1, 2, 3], max_tokens=8)
    scheduler.add(first)
    run_step(scheduler)  # the first reads its whole prompt
    second = make_seq("second", prompt=[*common, 4, 5, 6], max_tokens=8)
    scheduler.add(second)
    output = scheduler.schedule()
    assert bool(output.kv_copies) is copied
    assert second.num_cached == (shared if copied else 0)


def test_low_slots_first_packs_sequences_into_the_lowest_free_slots() -> None:
    scheduler = Scheduler(SchedulerConfig(
        max_sequences=4, step_token_budget=64, kv_capacity=1024, context_per_sequence=256,
        max_waiting=8, low_slots_first=True, last_prompt_token_alone=WHOLE))
    seqs = [make_seq(f"s{i}", 4, max_tokens=1) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    run_step(scheduler)  # all four run one token and finish: slots freed 0, 1, 2, 3
    late = make_seq("late", 4, max_tokens=4)
    scheduler.add(late)
    scheduler.schedule()
    assert late.slot == 0
    # With no preference the slot freed longest ago is taken, which is also 0 here; free
    # slot 0 again last and check the preference still wins over the freeing order.
    scheduler.abort("late")
    again = make_seq("again", 4, max_tokens=4)
    scheduler.add(again)
    scheduler.schedule()
    assert again.slot == 0


def test_free_slots_keep_at_most_max_cached_cells() -> None:
    scheduler = Scheduler(SchedulerConfig(
        max_sequences=4, step_token_budget=256, kv_capacity=4096, context_per_sequence=1024,
        max_waiting=8, max_cached_cells=25, last_prompt_token_alone=WHOLE))
    seqs = [make_seq(f"s{i}", 10, max_tokens=1) for i in range(4)]
    for seq in seqs:
        scheduler.add(seq)
    run_step(scheduler)  # each computes 10 cells and finishes: 40 cells kept, 25 allowed
    output = scheduler.schedule()
    cleared = {slot for slot, keep in output.kv_truncations if keep == 0}
    assert len(cleared) == 2  # the two freed first go, the last two (20 cells) stay
    assert sum(len(v) for v in slot_cache(scheduler).values()) == 20
