"""Fair share between accounts in the scheduler, driven by hand-made model outputs."""

from __future__ import annotations

import itertools

import pytest

from modelyard.config import EngineConfig
from modelyard.engine.fair_share import RESERVE_MEMORY_STEPS
from modelyard.engine.scheduler import (
    PAUSE_BURST,
    SHARE_MIN_TOKENS,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from modelyard.engine.sequence import (
    COMMON_SHARE,
    SamplingParams,
    Sequence,
    SequenceStatus,
    Share,
)

PLAIN = 7
_ids = itertools.count()
_bases = itertools.count(1)


def make_scheduler(*, max_sequences: int = 4, step_token_budget: int = 32,
                   fair_share: bool = True, max_waiting: int = 1000,
                   pause_heavy_every: int = 0) -> Scheduler:
    return Scheduler(SchedulerConfig(
        max_sequences=max_sequences, step_token_budget=step_token_budget,
        kv_capacity=64 * 1024, context_per_sequence=1024, max_waiting=max_waiting,
        fair_share=fair_share, pause_heavy_every=pause_heavy_every))


def make_seq(share: Share, prompt_len: int = 40, max_tokens: int = 8, *,
             prompt: list[int] | None = None) -> Sequence:
    if prompt is None:
        base = 10_000 * next(_bases)
        prompt = [base + i for i in range(prompt_len)]
    return Sequence(f"{share.key}-{next(_ids)}", prompt, SamplingParams(max_tokens=max_tokens),
                    eog_ids=frozenset({2}), share=share)


def step(scheduler: Scheduler) -> SchedulerOutput:
    output = scheduler.schedule()
    scheduler.update_from_output(output, {c.seq.seq_id: PLAIN for c in output.chunks
                                          if c.sample})
    return output


def admitted_in(output: SchedulerOutput) -> list[Sequence]:
    """The sequences whose first chunk this step holds (their reading starts at 0)."""
    return [c.seq for c in output.chunks if c.start == 0]


@pytest.mark.parametrize("pause_heavy_every", [0, 4])
@pytest.mark.parametrize("weights", [
    {"a": 1.0, "b": 1.0},
    {"a": 1.0, "b": 3.0},
    {"a": 1.0, "b": 2.0, "c": 5.0},
])
def test_shares_of_prefill_tokens_and_slots_converge_to_the_weights(
        weights: dict[str, float], pause_heavy_every: int) -> None:
    """Every account keeps a backlog of the same requests: each one's share of the prompt
    tokens read and of the slots held goes to its weight's share, with the steps of their
    own for the accounts below their share and the pauses of those above it."""
    scheduler = make_scheduler(max_sequences=8, step_token_budget=32,
                               pause_heavy_every=pause_heavy_every)
    shares = {name: Share(name, weight) for name, weight in weights.items()}
    prefill = dict.fromkeys(weights, 0)
    slots = dict.fromkeys(weights, 0)
    for n in range(3000):
        for share in shares.values():   # a sustained load: always 5 waiting per account
            while len(scheduler.waiting.queue(share.key)) < 5:
                scheduler.add(make_seq(share))
        output = step(scheduler)
        if n < 300:
            continue   # the start, before every account's service has caught up
        for chunk in output.chunks:
            key = chunk.seq.share.key
            assert key is not None
            slots[key] += 1
            prefill[key] += max(0, min(chunk.start + len(chunk.tokens),
                                       chunk.seq.num_prompt) - chunk.start)
    total = sum(weights.values())
    for name, weight in weights.items():
        assert prefill[name] / sum(prefill.values()) == pytest.approx(weight / total, abs=0.03)
        assert slots[name] / sum(slots.values()) == pytest.approx(weight / total, abs=0.03)


def test_first_come_first_served_within_an_account() -> None:
    scheduler = make_scheduler(max_sequences=2, step_token_budget=64)
    a, b = Share("a"), Share("b")
    sent = {"a": [make_seq(a, max_tokens=3) for _ in range(6)],
            "b": [make_seq(b, max_tokens=3) for _ in range(6)]}
    for pair in zip(sent["b"], sent["a"], strict=True):   # interleaved, b first
        for seq in pair:
            scheduler.add(seq)
    order: list[Sequence] = []
    while scheduler.has_work():
        order += admitted_in(step(scheduler))
    assert [s for s in order if s.share is a] == sent["a"]
    assert [s for s in order if s.share is b] == sent["b"]
    assert len(order) == 12


def test_a_keys_priority_goes_first_within_its_account_only() -> None:
    scheduler = make_scheduler(max_sequences=1, step_token_budget=64)
    batch, interactive, other = Share("a"), Share("a", priority=1), Share("b")
    backlog = [make_seq(batch, max_tokens=2) for _ in range(4)]
    for seq in backlog:
        scheduler.add(seq)
    step(scheduler)                       # backlog[0] holds the only slot
    urgent = make_seq(interactive, max_tokens=2)
    b = make_seq(other, max_tokens=2)
    scheduler.add(b)
    scheduler.add(urgent)
    assert scheduler.waiting.queue("a") == [urgent, *backlog[1:]]
    order: list[Sequence] = []
    while scheduler.has_work():
        order += admitted_in(step(scheduler))
    # b's turn comes first (a holds the slot); then a's interactive request, then its batch.
    assert order == [b, urgent, *backlog[1:]]


@pytest.mark.parametrize("weight", [0.25, 1.0, 8.0])
def test_an_account_alone_gets_everything(weight: float) -> None:
    """One account, whatever its weight, is scheduled exactly as without fair share: every
    slot, the whole budget, in arrival order."""
    runs = []
    for fair in (True, False):
        global _bases
        _bases = itertools.count(1)
        scheduler = make_scheduler(max_sequences=3, step_token_budget=16, fair_share=fair)
        share = Share("alone", weight)
        shapes = []
        for n in range(200):
            if n % 3 == 0:
                scheduler.add(make_seq(share, 10 + n % 17, max_tokens=1 + n % 5))
            output = step(scheduler)
            shapes.append([(c.seq.seq_id.split("-")[0], c.start, len(c.tokens), c.sample)
                           for c in output.chunks])
            if len(scheduler.waiting) and output.num_tokens < 16:
                assert not scheduler.slots.free_slots   # held back only by the slots
        runs.append(shapes)
    assert runs[0] == runs[1]


@pytest.mark.parametrize(("fair", "admitted_after"), [(True, 0), (False, 20)])
def test_a_light_accounts_request_takes_the_next_free_slot_ahead_of_a_backlog(
        fair: bool, admitted_after: int) -> None:
    scheduler = make_scheduler(max_sequences=4, step_token_budget=64, fair_share=fair)
    heavy, light = Share("heavy"), Share("light")
    for i in range(24):   # 4 running, 20 waiting; one finishes every few steps
        scheduler.add(make_seq(heavy, 40, max_tokens=6 + 3 * i))
    for _ in range(3):
        step(scheduler)
    assert len(scheduler.running) == 4 and len(scheduler.waiting) == 20
    mine = make_seq(light, 20, max_tokens=4)
    scheduler.add(mine)
    heavy_admitted = 0
    while mine.status is SequenceStatus.WAITING:
        heavy_admitted += sum(s.share is heavy for s in admitted_in(step(scheduler)))
    assert heavy_admitted == admitted_after


def test_a_light_accounts_prefill_chunk_goes_before_a_heavy_accounts_prompts() -> None:
    scheduler = make_scheduler(max_sequences=4, step_token_budget=32)
    heavy, light = Share("heavy"), Share("light")
    long = [make_seq(heavy, 300, max_tokens=4) for _ in range(3)]
    for seq in long:
        scheduler.add(seq)
    step(scheduler)   # the first long prompt takes the whole budget
    mine = make_seq(light, 10, max_tokens=4)
    scheduler.add(mine)
    output = step(scheduler)
    assert output.chunks[0].seq is mine   # its whole prompt but the last token, first
    assert (output.chunks[0].start, len(output.chunks[0].tokens)) == (0, 9)
    output = step(scheduler)
    assert output.chunks[0].seq is mine and output.chunks[0].sample


def test_an_idle_account_banks_no_credit() -> None:
    """An account that was alone for a long time and one that was idle share equally from
    the moment both are busy: the idle one does not take every slot to catch up."""
    scheduler = make_scheduler(max_sequences=4, step_token_budget=32)
    a, b = Share("a"), Share("b")
    for _ in range(400):
        while len(scheduler.waiting.queue("a")) < 3:
            scheduler.add(make_seq(a, 20, max_tokens=6))
        step(scheduler)
    order: list[Sequence] = []
    for _ in range(200):
        for share in (a, b):
            while len(scheduler.waiting.queue(share.key)) < 3:
                scheduler.add(make_seq(share, 20, max_tokens=6))
        order += admitted_in(step(scheduler))
    first = order[:20]
    assert 8 <= sum(s.share is a for s in first) <= 12


def test_no_account_left_active_forgets_every_count() -> None:
    scheduler = make_scheduler()
    scheduler.add(make_seq(Share("a"), 10, max_tokens=2))
    while scheduler.has_work():
        step(scheduler)
    assert scheduler.waiting.service == {"a": pytest.approx(scheduler.waiting.service["a"])}
    scheduler.add(make_seq(Share("b"), 10, max_tokens=2))
    assert scheduler.waiting.service == {}
    assert scheduler.waiting.held == {}


def test_the_choices_of_a_request_read_their_prompt_once_beside_another_account() -> None:
    """Both accounts in one cache scope (a shared prefix cache), each with its own share:
    the second choice waits for the first to read the prompt, then copies its cells."""
    scheduler = make_scheduler(max_sequences=6, step_token_budget=64)
    a, b = Share("a"), Share("b")
    theirs = [make_seq(a, 30, max_tokens=20) for _ in range(2)]
    for seq in theirs:
        scheduler.add(seq)
    prompt = [5000 + i for i in range(200)]
    choices = [make_seq(b, prompt=prompt, max_tokens=4) for _ in range(2)]
    scheduler.add_group(choices)
    copies = []
    order: list[Sequence] = []
    while scheduler.has_work():
        output = step(scheduler)
        copies += output.kv_copies
        order += [c.seq for c in output.chunks if c.start == c.seq.num_cached]
    assert order[:3] == [theirs[0], choices[0], theirs[1]]   # turns alternate
    assert order[3] is choices[1]
    # Copied from the first choice (all but what was left to read when it was admitted).
    assert choices[1].num_cached > 200 - SHARE_MIN_TOKENS
    assert len(copies) == 1


def test_fair_share_off_keeps_arrival_order_across_accounts() -> None:
    scheduler = make_scheduler(max_sequences=1, fair_share=False)
    seqs = [make_seq(Share(name), 10, max_tokens=2) for name in "aabba"]
    seqs.append(make_seq(COMMON_SHARE, 10, max_tokens=2))
    for seq in seqs:
        scheduler.add(seq)
    order: list[Sequence] = []
    while scheduler.has_work():
        order += admitted_in(step(scheduler))
    assert order == seqs


def test_reserved_slots_start_a_light_accounts_request_at_once() -> None:
    scheduler = Scheduler(SchedulerConfig(
        max_sequences=4, step_token_budget=64, kv_capacity=64 * 1024,
        context_per_sequence=1024, max_waiting=1000, reserved_slots=1))
    heavy, light = Share("heavy"), Share("light")

    def flood(steps: int) -> None:
        for _ in range(steps):
            while len(scheduler.waiting.queue("heavy")) < 4:
                scheduler.add(make_seq(heavy, 20, max_tokens=30))
            step(scheduler)

    flood(50)
    assert len(scheduler.running) == 4            # alone: every slot
    mine = make_seq(light, 10, max_tokens=2)
    scheduler.add(mine)
    while mine.status is SequenceStatus.WAITING:  # waits for a slot to free, once
        flood(1)
    flood(20)
    assert len(scheduler.running) == 3            # one slot kept for the light account now
    again = make_seq(light, 10, max_tokens=2)
    scheduler.add(again)
    output = step(scheduler)
    assert any(c.seq is again for c in output.chunks)   # admitted in the step it came
    flood(RESERVE_MEMORY_STEPS + 50)              # the light account stays away
    assert len(scheduler.running) == 4


def test_a_reserve_needs_fair_share_and_leaves_a_slot() -> None:
    with pytest.raises(ValueError, match=r"less than engine\.max_sequences"):
        EngineConfig(max_sequences=4, reserved_slots=4)
    assert EngineConfig().reserved_slots == 1
    assert EngineConfig(max_sequences=1).reserved_slots == 1   # one slot: no slot to keep
    scheduler = Scheduler(SchedulerConfig(
        max_sequences=2, step_token_budget=64, kv_capacity=64 * 1024,
        context_per_sequence=1024, max_waiting=1000, reserved_slots=1, fair_share=False))
    for name in ("a", "b", "a"):
        scheduler.add(make_seq(Share(name), 10, max_tokens=50))
    for _ in range(3):
        step(scheduler)
    assert len(scheduler.running) == 2   # first come, first served: no reserve


# -- steps of their own for light accounts' prompts -------------------------------------------


def make_paused_scheduler(*, max_sequences: int = 4, step_token_budget: int = 64,
                          pause_heavy_every: int = 4, reserved_slots: int = 0) -> Scheduler:
    return Scheduler(SchedulerConfig(
        max_sequences=max_sequences, step_token_budget=step_token_budget,
        kv_capacity=64 * 1024, context_per_sequence=1024, max_waiting=1000,
        reserved_slots=reserved_slots, pause_heavy_every=pause_heavy_every))


def prefill_chunks(output: SchedulerOutput) -> list[tuple[str | None, int]]:
    """(account, tokens) of each chunk of a prompt in the step."""
    return [(c.seq.share.key, len(c.tokens)) for c in output.chunks
            if c.start < c.seq.num_prompt]


def test_a_step_that_reads_a_light_accounts_prompt_reads_no_other_accounts() -> None:
    """The heavy account's long prompts wait while the light account's prompt and its last
    token are read: neither step costs more than the light prompt and the decoding."""
    scheduler = make_paused_scheduler(pause_heavy_every=0)
    heavy, light = Share("heavy"), Share("light")
    for _ in range(3):
        scheduler.add(make_seq(heavy, 300, max_tokens=100))
    while len(scheduler.running) < 3:
        step(scheduler)
    def heavy_prefill(output: SchedulerOutput) -> int:
        return sum(n for key, n in prefill_chunks(output) if key == "heavy")

    assert heavy_prefill(step(scheduler)) > 32   # the budget left by the decoding
    mine = make_seq(light, 10, max_tokens=4)
    scheduler.add(mine)
    assert prefill_chunks(step(scheduler)) == [("light", 9)]
    last = step(scheduler)
    assert prefill_chunks(last) == [("light", 1)] and last.chunks[-1].sample
    assert heavy_prefill(step(scheduler)) > 32   # then the heavy's again


def test_a_light_accounts_last_prompt_token_goes_first_whatever_its_service() -> None:
    """A light account's long prompt is read in its turns (fair queuing); its last token,
    which the first sample waits for, goes in the next step, alone, even when it is the
    heavy account's turn by service."""
    scheduler = make_paused_scheduler(max_sequences=4, step_token_budget=32,
                                      pause_heavy_every=0)
    heavy, light = Share("heavy"), Share("light")
    for _ in range(3):
        scheduler.add(make_seq(heavy, 300, max_tokens=500))
    while len(scheduler.running) < 3:
        step(scheduler)
    mine = make_seq(light, 152, max_tokens=4)   # its last chunk ends in its own turn
    scheduler.add(mine)
    shapes = []
    while mine.num_computed < mine.num_prompt - 1:
        shapes.append(prefill_chunks(step(scheduler)))
    owners = [{key for key, _ in chunks} for chunks in shapes]
    assert {"heavy"} in owners and {"light"} in owners   # turns alternate, a step each
    assert scheduler.waiting.turn("heavy") < scheduler.waiting.turn("light")
    assert prefill_chunks(step(scheduler)) == [("light", 1)]


def flood_with_decoding(scheduler: Scheduler, heavy: Share, steps: int) -> None:
    """The heavy account keeps long answers running, with more waiting."""
    for _ in range(steps):
        while len(scheduler.waiting.queue(heavy.key)) < 4:
            scheduler.add(make_seq(heavy, 20, max_tokens=500))
        step(scheduler)


def make_flooded(max_sequences: int, reserved_slots: int, **config: int) -> Scheduler:
    """A light account had one request, then the heavy one floods: it holds every slot
    but the reserved ones, all decoding."""
    scheduler = make_paused_scheduler(max_sequences=max_sequences,
                                      reserved_slots=reserved_slots, **config)
    scheduler.add(make_seq(Share("early"), 4, max_tokens=1))
    flood_with_decoding(scheduler, Share("heavy"), 40)
    assert len(scheduler.running) == max_sequences - reserved_slots
    assert not any(seq.is_prefilling for seq in scheduler.running)
    return scheduler


def test_a_light_accounts_prompt_pauses_the_accounts_above_their_share() -> None:
    scheduler = make_flooded(4, 1)
    heavy, light = Share("heavy"), Share("light")
    theirs = [seq for seq in scheduler.running if seq.share == heavy]
    assert len(theirs) == 3
    before = [(seq.slot, len(seq.token_ids)) for seq in theirs]
    mine = make_seq(light, 10, max_tokens=4)
    scheduler.add(mine)
    for _ in range(2):   # its prompt, then its last token: nothing else in either step
        output = step(scheduler)
        assert [c.seq for c in output.chunks] == [mine]
    assert mine.num_output == 1
    # Paused, not preempted: the same slots, the same tokens, and decoding again now.
    assert [(seq.slot, len(seq.token_ids)) for seq in theirs] == before
    assert all(seq.status is SequenceStatus.RUNNING for seq in theirs)
    output = step(scheduler)
    assert [c.seq for c in output.chunks] == [*theirs, mine]
    assert scheduler.paused_steps == 2


def test_accounts_at_or_below_their_share_are_not_paused() -> None:
    scheduler = make_paused_scheduler(max_sequences=7, step_token_budget=64)
    a, b, c = Share("a"), Share("b"), Share("c")
    for share, n in ((a, 4), (b, 2)):
        for _ in range(n):
            scheduler.add(make_seq(share, 10, max_tokens=500))
    for _ in range(6):
        step(scheduler)
    assert not any(seq.is_prefilling for seq in scheduler.running)
    scheduler.add(make_seq(c, 10, max_tokens=4))   # shares now 2.33 slots each
    output = step(scheduler)
    assert {chunk.seq.share.key for chunk in output.chunks} == {"b", "c"}


def test_without_pauses_the_heavy_account_decodes_beside_the_light_prompt() -> None:
    scheduler = make_flooded(4, 1, pause_heavy_every=0)
    light = Share("light")
    scheduler.add(make_seq(light, 10, max_tokens=4))
    output = step(scheduler)
    assert [c.seq.share.key for c in output.chunks] == ["heavy"] * 3 + ["light"]
    assert scheduler.paused_steps == 0


@pytest.mark.parametrize("every", [2, 4, 8])
def test_light_accounts_spamming_pause_the_heavy_one_at_most_one_step_in_n(every: int) -> None:
    """Light accounts send a short request every step: the heavy account's decoding is
    left out of at most PAUSE_BURST + W / N of any W steps, and of about 1 / N overall."""
    scheduler = make_flooded(8, 2, pause_heavy_every=every)
    heavy = Share("heavy")
    lights = [Share(f"light{i}") for i in range(3)]
    paused: list[bool] = []
    for n in range(600):
        scheduler.add(make_seq(lights[n % 3], 6, max_tokens=2))
        decoding = [s for s in scheduler.running if s.share == heavy and not s.is_prefilling]
        while len(scheduler.waiting.queue("heavy")) < 4:
            scheduler.add(make_seq(heavy, 20, max_tokens=500))
        output = step(scheduler)
        decoded = {c.seq for c in output.chunks}
        paused.append(bool(decoding) and not any(s in decoded for s in decoding))
    assert sum(paused) >= len(paused) / every / 2   # the light ones did take pauses
    # For every window [start, end): paused in it - its length / every <= PAUSE_BURST.
    excess = list(itertools.accumulate((p - 1 / every for p in paused), initial=0.0))
    lowest = excess[0]
    for value in excess[1:]:
        assert value - lowest <= PAUSE_BURST + 1e-9
        lowest = min(lowest, value)


def test_a_light_account_may_take_a_reserved_slot_while_it_holds_one() -> None:
    """The light account's second request, sent while its first still decodes, takes the
    last free slot: the reserve keeps slots from accounts at or above their share only."""
    scheduler = make_flooded(6, 2, pause_heavy_every=0)
    light = Share("light")
    first = make_seq(light, 10, max_tokens=50)
    scheduler.add(first)
    for _ in range(3):
        flood_with_decoding(scheduler, Share("heavy"), 1)
    assert first.status is SequenceStatus.RUNNING and first.num_output > 0
    second = make_seq(light, 10, max_tokens=2)
    scheduler.add(second)
    flood_with_decoding(scheduler, Share("heavy"), 1)
    assert second.status is SequenceStatus.RUNNING
    assert len(scheduler.slots.free_slots) == 0
    flood_with_decoding(scheduler, Share("heavy"), 20)   # the heavy one still takes no slot
    assert sum(seq.share.key == "heavy" for seq in scheduler.running) == 4


def test_the_heavy_accounts_prefill_is_capped_while_another_account_is_about() -> None:
    """Alone, an account reads its prompts with the whole budget; from the moment another
    account has had work (for RESERVE_MEMORY_STEPS), a step reads at most
    heavy_prefill_per_step of its prompt tokens, and none of the light account's are cut."""
    scheduler = Scheduler(SchedulerConfig(
        max_sequences=4, step_token_budget=128, kv_capacity=64 * 1024,
        context_per_sequence=4096, max_waiting=1000, heavy_prefill_per_step=16))
    heavy, light = Share("heavy"), Share("light")

    def heavy_prefill(output: SchedulerOutput) -> int:
        return sum(n for key, n in prefill_chunks(output) if key == "heavy")

    for _ in range(3):
        scheduler.add(make_seq(heavy, 2000, max_tokens=500))
    while len(scheduler.running) < 3:
        output = step(scheduler)   # alone: the whole budget
        assert output.num_tokens == 128 and heavy_prefill(output) > 16
    mine = make_seq(light, 100, max_tokens=2)
    scheduler.add(mine)
    assert prefill_chunks(step(scheduler)) == [("light", 99)]   # uncapped, a step its own
    step(scheduler)                                             # its last token
    while mine.status is not SequenceStatus.FINISHED:
        assert heavy_prefill(step(scheduler)) == 16
    for _ in range(20):
        assert heavy_prefill(step(scheduler)) == 16   # the light account was about lately
    read = []
    for _ in range(RESERVE_MEMORY_STEPS + 100):
        while len(scheduler.waiting.queue("heavy")) < 2:
            scheduler.add(make_seq(heavy, 300, max_tokens=20))
        read.append(heavy_prefill(step(scheduler)))
    assert max(read[:RESERVE_MEMORY_STEPS - 30]) == 16
    assert max(read[RESERVE_MEMORY_STEPS:]) > 16   # alone for long: the whole budget again
