"""Interrupting a heavy account's step for a light account's request (scheduler side, and
the rule the engine applies on its event loop), driven by hand-made model outputs."""

from __future__ import annotations

import itertools

import pytest

from modelyard.engine.fair_share import InterruptRule
from modelyard.engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from modelyard.engine.sequence import SamplingParams, Sequence, Share

PLAIN = 7
HEAVY, LIGHT = Share("heavy"), Share("light")
_ids = itertools.count()
_bases = itertools.count(1)


def make_seq(share: Share, prompt_len: int, max_tokens: int) -> Sequence:
    base = 10_000 * next(_bases)
    return Sequence(f"{share.key}-{next(_ids)}", [base + i for i in range(prompt_len)],
                    SamplingParams(max_tokens=max_tokens), eog_ids=frozenset({2}), share=share)


def step(scheduler: Scheduler) -> SchedulerOutput:
    output = scheduler.schedule()
    scheduler.update_from_output(output, {c.seq.seq_id: PLAIN for c in output.chunks
                                          if c.sample})
    return output


def make_flooded(*, every: int = 4, interrupts: bool = True, slots: int = 4,
                 reserved: int = 1) -> Scheduler:
    """The heavy account decodes long answers in every slot but the reserved one; a light
    account had one short request before it came."""
    scheduler = Scheduler(SchedulerConfig(
        max_sequences=slots, step_token_budget=64, kv_capacity=64 * 1024,
        context_per_sequence=1024, max_waiting=1000, reserved_slots=reserved,
        pause_heavy_every=every, interrupt_heavy_steps=interrupts))
    scheduler.add(make_seq(LIGHT, 4, max_tokens=1))
    for _ in range(40):
        while len(scheduler.waiting.queue(HEAVY.key)) < 4:
            scheduler.add(make_seq(HEAVY, 20, max_tokens=500))
        step(scheduler)
    assert len(scheduler.running) == slots - reserved
    assert not any(seq.is_prefilling for seq in scheduler.running)
    return scheduler


def rule_of(scheduler: Scheduler) -> tuple[SchedulerOutput, InterruptRule | None]:
    output = scheduler.schedule()
    return output, scheduler.interrupt_rule(output)


def test_a_light_accounts_request_may_interrupt_a_heavy_step_and_nobody_elses() -> None:
    scheduler = make_flooded()
    _, rule = rule_of(scheduler)
    assert rule is not None
    assert rule.interrupts_for("light", 1.0)
    assert rule.interrupts_for("newcomer", 1.0)
    assert not rule.interrupts_for("heavy", 1.0)        # its own step
    assert not rule.interrupts_for("light", 0.001)      # a share below one slot is held


def test_the_step_is_undone_and_the_light_prompt_goes_first() -> None:
    scheduler = make_flooded()
    heavy = list(scheduler.running)
    before = [(seq.slot, list(seq.token_ids), seq.num_computed) for seq in heavy]
    service = dict(scheduler.waiting.service)
    output, rule = rule_of(scheduler)
    assert rule is not None and [c.seq for c in output.chunks] == heavy
    scheduler.interrupted(output)          # the engine's decode was stopped
    assert [(seq.slot, list(seq.token_ids), seq.num_computed) for seq in heavy] == before
    assert scheduler.waiting.service == service   # charged nothing for a step not run
    assert scheduler.interrupted_steps == 1
    mine = make_seq(LIGHT, 10, max_tokens=4)
    scheduler.add(mine)
    for _ in range(2):   # its prompt, then its last token, each alone (paused, not dropped)
        assert [c.seq for c in step(scheduler).chunks] == [mine]
    output = step(scheduler)   # the heavy step again, from where it was
    assert [c.seq for c in output.chunks] == [*heavy, mine]
    assert [c.start for c in output.chunks[:len(heavy)]] == [n for _, _, n in before]


def test_an_undone_step_leaves_the_slot_cells_as_before() -> None:
    scheduler = make_flooded()
    output, _ = rule_of(scheduler)
    scheduler.interrupted(output)
    for chunk in output.chunks:
        assert chunk.seq.slot is not None
        assert scheduler.slots._cells[chunk.seq.slot] == chunk.start


@pytest.mark.parametrize("every", [2, 4, 8])
def test_interrupts_are_bounded_to_one_step_in_n(every: int) -> None:
    scheduler = make_flooded(every=every)
    allowed = []
    for _ in range(80):
        output, rule = rule_of(scheduler)
        allowed.append(rule is not None)
        if rule is not None:
            scheduler.interrupted(output)
        else:
            scheduler.update_from_output(output, {c.seq.seq_id: PLAIN for c in output.chunks
                                                  if c.sample})
    assert sum(allowed) == pytest.approx(80 / every, abs=1)
    assert scheduler.interrupted_steps == sum(allowed)


@pytest.mark.parametrize(("config", "reason"), [
    ({"interrupts": False}, "off"),
    ({"every": 0}, "pauses off"),
    ({"reserved": 0}, "no free slot to start the light request in"),
])
def test_no_interrupts(config: dict[str, int], reason: str) -> None:
    scheduler = make_flooded(**config)  # type: ignore[arg-type]
    assert rule_of(scheduler)[1] is None, reason


def test_a_step_reading_the_newcomers_prompt_is_not_interrupted_for_it() -> None:
    scheduler = make_flooded(reserved=2, slots=5)
    scheduler.add(make_seq(LIGHT, 200, max_tokens=4))    # read in several chunks
    step(scheduler)
    _, rule = rule_of(scheduler)
    assert rule is not None
    assert not rule.interrupts_for("light", 1.0)
    assert rule.interrupts_for("other", 1.0)


def test_a_lone_account_never_interrupts_itself() -> None:
    rule = InterruptRule({"a": 3}, {"a": 1.0}, frozenset({"a"}), frozenset({"a"}),
                         frozenset(), 4)
    assert not rule.interrupts_for("a", 1.0)
    assert rule.interrupts_for("b", 1.0)
    # Weighted: b at weight 1 beside a at weight 9 has a share of 0.4 slots; it holds 0.
    weighted = InterruptRule({"a": 3, "b": 1}, {"a": 9.0, "b": 1.0}, frozenset({"a", "b"}),
                             frozenset({"a"}), frozenset(), 4)
    assert not weighted.interrupts_for("b", 1.0)
