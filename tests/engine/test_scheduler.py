"""The scheduler as a pure state machine, driven by hand-made model outputs."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from modelyard.engine.scheduler import (
    QueueFullError,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from modelyard.engine.sequence import FinishReason, SamplingParams, Sequence, SequenceStatus

EOG = 2
PLAIN = 7  # a token that ends nothing


def make_scheduler(
    *,
    max_sequences: int = 2,
    step_token_budget: int = 8,
    kv_capacity: int = 256,
    context_per_sequence: int = 64,
    max_waiting: int = 8,
) -> Scheduler:
    return Scheduler(SchedulerConfig(
        max_sequences=max_sequences,
        step_token_budget=step_token_budget,
        kv_capacity=kv_capacity,
        context_per_sequence=context_per_sequence,
        max_waiting=max_waiting,
    ))


def make_seq(request_id: str, prompt_len: int, max_tokens: int = 4) -> Sequence:
    prompt = [100 + i for i in range(prompt_len)]
    return Sequence(request_id, prompt, SamplingParams(max_tokens=max_tokens),
                    eog_ids=frozenset({EOG}))


def run_step(
    scheduler: Scheduler,
    token_for: Callable[[Sequence], int] = lambda seq: PLAIN,
) -> tuple[SchedulerOutput, list[Sequence]]:
    """One engine step: schedule, 'decode', sample a token for every chunk that asks."""
    output = scheduler.schedule()
    sampled = {c.seq.request_id: token_for(c.seq) for c in output.chunks if c.sample}
    finished = scheduler.update_from_output(output, sampled)
    return output, finished


def chunk_ids(output: SchedulerOutput) -> list[str]:
    return [c.seq.request_id for c in output.chunks]


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
    assert [s.request_id for s in scheduler.waiting] == ["a", "b"]

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
    assert [s.request_id for s in scheduler.waiting] == ["c"]
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

    assert chunk_ids(output) == [s.request_id for s in seqs[:admitted]]
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
    assert [(x.seq.request_id, x.start, len(x.tokens), x.sample) for x in output.chunks] == [
        ("a", 0, 6, True), ("b", 0, 4, False),
    ]
    assert list(scheduler.waiting) == [c]   # budget spent: "c" is not admitted this step

    output, _ = run_step(scheduler)
    assert [(x.seq.request_id, x.start, len(x.tokens), x.sample) for x in output.chunks] == [
        ("a", 6, 1, True), ("b", 4, 2, True), ("c", 0, 6, True),
    ]
    assert output.num_tokens == 9 <= 10


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


def test_finish_by_caller_frees_the_slot_once() -> None:
    scheduler = make_scheduler(max_sequences=1)
    seq = make_seq("a", 2, max_tokens=10)
    scheduler.add(seq)
    run_step(scheduler)
    slot = seq.slot
    assert slot is not None

    scheduler.finish(seq, FinishReason.STOP)   # a stop string found by the engine
    scheduler.finish(seq, FinishReason.ABORT)  # a second call changes nothing
    assert seq.finish_reason is FinishReason.STOP
    assert scheduler.schedule().freed_slots == [slot]
    assert scheduler.schedule().freed_slots == []


# -- freeing and reusing slots ----------------------------------------------------------------


def test_finished_slot_is_freed_exactly_once_and_reused() -> None:
    scheduler = make_scheduler(max_sequences=1, step_token_budget=8)
    a = make_seq("a", 3, max_tokens=1)
    b = make_seq("b", 3, max_tokens=1)
    scheduler.add(a)
    scheduler.add(b)

    output, finished = run_step(scheduler)
    assert finished == [a]
    assert output.freed_slots == []
    assert scheduler.has_work()  # "b" waits, and the slot still has to be cleared

    output, finished = run_step(scheduler)
    assert output.freed_slots == [0]       # cleared before this step's batch ...
    assert chunk_ids(output) == ["b"]      # ... which already reuses the slot
    assert finished == [b]

    output, _ = run_step(scheduler)
    assert output.freed_slots == [0]       # "b"'s turn to be cleared, once
    assert output.chunks == []
    assert not scheduler.has_work()
    assert scheduler.schedule().freed_slots == []


def test_has_work_until_the_last_slot_is_cleared() -> None:
    scheduler = make_scheduler()
    assert not scheduler.has_work()
    seq = make_seq("a", 2, max_tokens=1)
    scheduler.add(seq)
    assert scheduler.has_work()
    output = scheduler.schedule()
    slot = seq.slot
    assert slot is not None
    assert scheduler.update_from_output(output, {"a": PLAIN}) == [seq]
    assert scheduler.has_work()            # the slot is not cleared yet
    assert scheduler.schedule().freed_slots == [slot]
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
    assert not scheduler.waiting
    assert scheduler.kv_reserved == kv_before
    output, _ = run_step(scheduler)
    assert output.freed_slots == []        # it never held a slot
    assert chunk_ids(output) == ["running"]


def test_abort_a_running_sequence_frees_its_slot_and_kv() -> None:
    scheduler = make_scheduler(max_sequences=2)
    a, b = make_seq("a", 2, 8), make_seq("b", 2, 8)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    slot = a.slot
    assert slot is not None

    assert scheduler.abort("a") is a

    assert a.status is SequenceStatus.FINISHED
    assert a.finish_reason is FinishReason.ABORT
    assert a.slot is None
    assert scheduler.running == [b]
    assert scheduler.kv_reserved == b.kv_reservation
    output, _ = run_step(scheduler)
    assert output.freed_slots == [slot]
    assert chunk_ids(output) == ["b"]
    assert scheduler.abort("a") is None    # already gone
    assert run_step(scheduler)[0].freed_slots == []


def test_abort_unknown_request_returns_none() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_seq("a", 2))
    assert scheduler.abort("nope") is None
    assert len(scheduler.waiting) == 1


def test_abort_while_a_step_is_in_flight_ignores_its_results() -> None:
    scheduler = make_scheduler(max_sequences=2)
    a, b = make_seq("a", 2, 8), make_seq("b", 2, 8)
    scheduler.add(a)
    scheduler.add(b)
    output = scheduler.schedule()
    scheduler.abort("a")                   # the client left while llama_decode ran

    finished = scheduler.update_from_output(output, {"b": PLAIN})  # no token for "a"

    assert finished == []
    assert a.output_ids == []
    assert a.num_computed == 0
    assert b.output_ids == [PLAIN]
    assert scheduler.schedule().freed_slots == [0]


# -- invariants over random workloads ---------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_random_workload_keeps_the_invariants(seed: int) -> None:
    rng = random.Random(seed)
    config = SchedulerConfig(max_sequences=3, step_token_budget=rng.choice([3, 5, 16]),
                             kv_capacity=rng.choice([30, 60, 200]), context_per_sequence=30,
                             max_waiting=4)
    scheduler = Scheduler(config)
    cleared: list[int] = []
    admitted: set[str] = set()
    finished_ids: list[str] = []
    next_id = 0
    for _ in range(150):
        if rng.random() < 0.3:
            seq = make_seq(f"r{next_id}", rng.randint(1, 20), rng.randint(1, 10))
            next_id += 1
            try:
                scheduler.add(seq)
            except QueueFullError:
                assert len(scheduler.waiting) == config.max_waiting
        if rng.random() < 0.05 and next_id:
            victim = scheduler.abort(f"r{rng.randrange(next_id)}")
            if victim is not None:
                finished_ids.append(victim.request_id)

        decoding = [s for s in scheduler.running if not s.is_prefilling]
        output = scheduler.schedule()
        cleared.extend(output.freed_slots)
        admitted.update(c.seq.request_id for c in output.chunks)

        assert output.num_tokens <= config.step_token_budget
        assert [c.seq for c in output.chunks[:len(decoding)]] == decoding
        slots = [s.slot for s in scheduler.running]
        assert None not in slots and len(set(slots)) == len(slots)
        assert scheduler.kv_reserved == sum(s.kv_reservation for s in scheduler.running)
        assert scheduler.kv_reserved <= config.kv_capacity
        for chunk in output.chunks:
            assert chunk.start == chunk.seq.num_computed
            assert chunk.tokens
            end = chunk.start + len(chunk.tokens)
            assert chunk.tokens == chunk.seq.token_ids[chunk.start:end]
            assert chunk.sample == (end == len(chunk.seq.token_ids))

        tokens = {c.seq.request_id: rng.choice([PLAIN, PLAIN, PLAIN, EOG])
                  for c in output.chunks if c.sample}
        for seq in scheduler.update_from_output(output, tokens):
            finished_ids.append(seq.request_id)
            assert len(seq.token_ids) <= config.context_per_sequence
            assert seq.num_output <= seq.params.max_tokens

    while scheduler.running or scheduler.waiting:  # drain
        output, finished = run_step(scheduler)
        cleared.extend(output.freed_slots)
        admitted.update(c.seq.request_id for c in output.chunks)
        finished_ids.extend(s.request_id for s in finished)
    cleared.extend(scheduler.schedule().freed_slots)

    assert len(finished_ids) == len(set(finished_ids))
    # Every sequence that got a slot gave it back exactly once, and every slot is free again.
    assert len(cleared) == len(admitted) >= 1
    assert sorted(scheduler._free_slots) == list(range(config.max_sequences))
    assert not scheduler.has_work()
