"""Speculative decoding by prompt lookup without a model: the drafter, the plan of draft
tokens per step, the scheduler's chunks and bookkeeping with drafts (hand-made outputs), and
the engine's verification with the scripted runner of tests/engine/fakes.py, which gives
logits for every position asked for."""

from __future__ import annotations

import asyncio

import pytest

from modelyard.engine.engine import Engine, EngineOutput
from modelyard.engine.scheduler import Scheduler, SchedulerConfig
from modelyard.engine.sequence import FinishReason, SamplingParams, Sequence
from modelyard.engine.speculation import (
    PromptLookup,
    SpeculationConfig,
    StepCost,
    plan_drafts,
)
from tests.engine.fakes import EOG, ScriptedRunner, spell

SPEC = SpeculationConfig(max_draft=4, token_cost=0.1, first_rate=0.9, next_rate=0.9)

# -- the drafter --------------------------------------------------------------------------


def test_the_longest_suffix_seen_before_drafts_what_followed_its_latest_occurrence() -> None:
    drafter = PromptLookup(SpeculationConfig(max_ngram=3, min_ngram=2))
    tokens = [5, 6, 7, 8, 9, 1, 6, 7, 2, 3, 5, 6, 7]
    # [5, 6, 7] occurred at the start (then 8, 9); [6, 7] also later (then 2) but the
    # 3-gram match comes first
    assert drafter.propose(tokens, 3) == [8, 9, 1]
    tokens += [4]
    assert drafter.propose(tokens, 3) == []  # [7, 4] and [6, 7, 4] were never seen
    tokens += [6, 7]
    # now the latest earlier occurrence of [4, 6, 7] is none, of [6, 7] the one just before
    # ... [5, 6, 7] at 10..12 followed by 4
    assert drafter.propose(tokens, 2) == [4, 6]


def test_a_draft_stops_at_the_end_of_the_text_and_at_the_limit() -> None:
    drafter = PromptLookup(SpeculationConfig(max_ngram=2, min_ngram=2))
    tokens = [1, 2, 3, 1, 2]
    assert drafter.propose(tokens, 10) == [3, 1, 2]
    assert drafter.propose(tokens, 1) == [3]
    assert drafter.propose(tokens, 0) == []


def test_the_index_grows_with_the_text_without_reading_it_again() -> None:
    drafter = PromptLookup(SpeculationConfig(max_ngram=2, min_ngram=2))
    tokens = list(range(100))
    assert drafter.propose(tokens, 4) == []
    tokens += [10, 11]
    assert drafter.propose(tokens, 4) == [12, 13, 14, 15]
    assert drafter._indexed == len(tokens)


def test_acceptance_estimates_follow_the_outcomes() -> None:
    drafter = PromptLookup(SpeculationConfig(first_rate=0.5, next_rate=0.5))
    assert drafter.record([1, 2, 3], [1, 2, 9]) == 2
    assert drafter.first_rate > 0.5
    for _ in range(20):
        drafter.record([1, 2], [7])
    assert drafter.first_rate < 0.01
    assert drafter.value(2) < drafter.value(1)
    drafter.shadow_draft([4])
    drafter.record_shadow(4)
    assert drafter.first_rate > 0.2
    assert drafter.shadow is None


def test_a_draft_not_made_is_followed_over_the_next_steps() -> None:
    drafter = PromptLookup(SpeculationConfig(first_rate=0.5, next_rate=0.5))
    drafter.shadow_draft([4, 5, 6])
    drafter.shadow_draft([9, 9])   # one shadow at a time: this one is not followed
    drafter.record_shadow(4)       # step 1: the first token would have been kept
    assert drafter.first_rate > 0.5 and drafter.next_rate == 0.5
    drafter.record_shadow(5)       # step 2: and the second
    assert drafter.next_rate > 0.5
    following = drafter.next_rate
    drafter.record_shadow(7)       # step 3: the third would have failed; the shadow ends
    assert drafter.next_rate < following and drafter.shadow is None
    first = drafter.first_rate
    drafter.record_shadow(7)       # nothing followed: nothing changes
    assert drafter.first_rate == first
    drafter.shadow_draft([1, 2])
    drafter.drop_shadow()          # the sequence drafts for real: no shadow
    assert drafter.shadow is None


# -- the plan -----------------------------------------------------------------------------


def _drafter(first: float, following: float) -> PromptLookup:
    drafter = PromptLookup(SPEC)
    drafter.first_rate, drafter.next_rate = first, following
    return drafter


def test_likely_drafts_are_taken_and_unlikely_ones_are_not() -> None:
    likely, unlikely = _drafter(0.95, 0.95), _drafter(0.05, 0.5)
    counts = plan_drafts([(likely, [1] * 8), (unlikely, [1] * 8)], 2, 64, 0.1)
    assert counts[0] == 8 and counts[1] == 0


def test_the_bar_rises_with_the_tokens_already_in_the_step() -> None:
    drafter = _drafter(0.5, 0.9)
    alone = plan_drafts([(drafter, [1] * 8)], 1, 64, 0.2)
    crowded = plan_drafts([(drafter, [1] * 8)], 8, 64, 0.2)
    assert alone[0] > 0
    assert crowded[0] == 0


def test_the_plan_keeps_to_the_budget() -> None:
    drafters = [(_drafter(0.99, 0.99), [1] * 8) for _ in range(4)]
    assert sum(plan_drafts(drafters, 4, 5, 0.01)) == 5
    assert plan_drafts(drafters, 4, 0, 0.01) == [0, 0, 0, 0]


STEEP = StepCost(((1, 1.0), (2, 1.78), (3, 2.22), (5, 3.45), (9, 5.07), (17, 7.19)))
"""A step's time by tokens as measured on a 2-core AMD EPYC: a second token costs 0.78."""


def test_a_measured_cost_curve_is_followed_between_and_past_its_points() -> None:
    assert [STEEP(n) for n in (1, 2, 3)] == [1.0, 1.78, 2.22]
    assert STEEP(4) == pytest.approx((2.22 + 3.45) / 2)
    assert STEEP(21) == pytest.approx(7.19 + 4 * (7.19 - 5.07) / 8)
    assert StepCost((), 0.25)(5) == 2.0   # no points: linear
    assert StepCost(((1, 1.0),), 0.5)(3) == 2.0


def test_where_a_second_token_costs_most_of_a_step_only_sure_drafts_pay() -> None:
    doubtful, sure = _drafter(0.6, 0.9), _drafter(0.95, 0.95)
    assert plan_drafts([(doubtful, [1] * 8)], 1, 64, 0.25)[0] > 0   # the linear model's
    assert plan_drafts([(doubtful, [1] * 8)], 1, 64, STEEP) == [0]
    assert plan_drafts([(sure, [1] * 8)], 1, 64, STEEP)[0] > 0


def test_the_configured_costs_reach_the_plan() -> None:
    config = SpeculationConfig(step_costs=STEEP.points)
    assert config.cost() == STEEP
    assert SpeculationConfig().cost() == StepCost((), 0.25)


# -- the scheduler --------------------------------------------------------------------------


def _scheduler(budget: int = 32, context: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(
        max_sequences=2, step_token_budget=budget, kv_capacity=256,
        context_per_sequence=context, max_waiting=8, last_prompt_token_alone=False,
        speculation=SPEC))


def _decoding(scheduler: Scheduler, prompt: list[int], max_tokens: int = 32) -> Sequence:
    """A sequence whose prompt was read in one step that sampled 5."""
    seq = Sequence("a", prompt, SamplingParams(max_tokens=max_tokens),
                   eog_ids=frozenset({EOG}), drafter=PromptLookup(SPEC))
    scheduler.add(seq)
    while seq.is_prefilling:
        output = scheduler.schedule()
        assert all(c.num_draft == 0 for c in output.chunks)
        scheduler.update_from_output(output, {"a": 5})
    assert seq.output_ids == [5]
    return seq


PROMPT = [3, 4, 5, 6, 7, 8, 9, 3, 4]


def test_a_decode_chunk_carries_the_drafts_and_kept_ones_become_computed() -> None:
    scheduler = _scheduler()
    seq = _decoding(scheduler, PROMPT)
    # text ... 3 4 | 5: the suffix [3, 4, 5] was seen, followed by 6 7 8 9
    output = scheduler.schedule()
    [chunk] = output.chunks
    assert chunk.tokens == [5, 6, 7, 8, 9] and chunk.num_draft == 4
    assert chunk.draft == [6, 7, 8, 9]
    # 6 and 7 kept, 1 drawn instead of 8
    assert scheduler.update_from_output(output, {"a": [6, 7, 1]}) == []
    assert seq.output_ids == [5, 6, 7, 1]
    assert seq.num_computed == len(seq.token_ids) - 1
    truncations, _ = scheduler.slots.take_pending()
    assert truncations == [(seq.slot, seq.num_computed)]
    # the next chunk starts at the token drawn instead of the draft
    [chunk] = scheduler.schedule().chunks
    assert chunk.start == seq.num_computed and chunk.tokens[0] == 1


def test_a_fully_kept_draft_leaves_nothing_to_truncate() -> None:
    scheduler = _scheduler()
    seq = _decoding(scheduler, PROMPT)
    output = scheduler.schedule()
    scheduler.update_from_output(output, {"a": [6, 7, 8, 9, 3]})
    assert seq.output_ids == [5, 6, 7, 8, 9, 3]
    assert seq.num_computed == len(seq.token_ids) - 1
    assert scheduler.slots.take_pending() == ([], [])


def test_drafts_never_pass_max_tokens_and_an_end_mid_draft_ends_the_sequence() -> None:
    scheduler = _scheduler()
    seq = _decoding(scheduler, PROMPT, max_tokens=3)
    output = scheduler.schedule()
    [chunk] = output.chunks
    assert chunk.num_draft == 1  # 1 output + 1 draft + 1 drawn after it = max_tokens
    finished = scheduler.update_from_output(output, {"a": [6, 7]})
    assert finished == [seq] and seq.finish_reason is FinishReason.LENGTH
    assert seq.num_output == 3

    scheduler = _scheduler()
    seq = _decoding(scheduler, PROMPT)
    output = scheduler.schedule()
    # an end-of-generation token kept as a draft ends the sequence; nothing after it counts
    finished = scheduler.update_from_output(output, {"a": [6, EOG, 8]})
    assert finished == [seq] and seq.output_ids == [5, 6, EOG]
    assert seq.finish_reason is FinishReason.STOP


def test_drafts_come_out_of_the_step_budget_before_prefill() -> None:
    scheduler = _scheduler(budget=4)
    _decoding(scheduler, PROMPT)
    scheduler.add(Sequence("b", [20, 21, 22, 23, 24], SamplingParams(max_tokens=4)))
    output = scheduler.schedule()
    assert [(c.seq.seq_id, len(c.tokens)) for c in output.chunks] == [("a", 4)]


def test_a_sequence_without_a_drafter_gets_no_drafts() -> None:
    scheduler = _scheduler()
    seq = Sequence("a", PROMPT, SamplingParams(max_tokens=8))
    scheduler.add(seq)
    scheduler.update_from_output(scheduler.schedule(), {"a": 5})
    [chunk] = scheduler.schedule().chunks
    assert chunk.tokens == [5] and chunk.num_draft == 0


# -- the engine, with a runner that spells a script ----------------------------------------

def _generate(runner: ScriptedRunner, prompt: list[int], params: SamplingParams,
              speculation: SpeculationConfig | None) -> list[EngineOutput]:
    engine = Engine(runner, SchedulerConfig(  # type: ignore[arg-type]
        max_sequences=2, step_token_budget=64, kv_capacity=512, context_per_sequence=256,
        max_waiting=8, speculation=speculation))

    async def main() -> list[EngineOutput]:
        queue = engine.submit("r", prompt, params)
        engine.start()
        outputs = []
        while True:
            output = await asyncio.wait_for(queue.get(), timeout=10)
            outputs.append(output)
            if output.finish_reason is not None or output.error is not None:
                return outputs

    try:
        return asyncio.run(main())
    finally:
        engine.stop()


QUOTE = "thequickbrownfoxjumpsoverthelazydog"


def test_a_repeated_text_is_written_in_fewer_steps_and_is_the_same_text() -> None:
    prompt = spell(QUOTE + "x" + "the")
    params = SamplingParams(temperature=0.0, max_tokens=64, logprobs=True)
    plain = ScriptedRunner(QUOTE[3:], len(prompt))
    fast = ScriptedRunner(QUOTE[3:], len(prompt))
    without = _generate(plain, prompt, params, None)
    with_drafts = _generate(fast, prompt, params, SPEC)
    assert "".join(o.text for o in with_drafts) == "".join(o.text for o in without) \
        == QUOTE[3:]
    assert [lp for o in with_drafts for lp in o.logprobs] == \
        [lp for o in without for lp in o.logprobs]
    assert with_drafts[-1].num_output_tokens == without[-1].num_output_tokens
    assert len(fast.decoded_batches) < len(plain.decoded_batches) / 2
    assert any(item.num_logits > 1 for batch in fast.decoded_batches for item in batch)


def test_a_stop_string_inside_the_kept_drafts_ends_the_text_there() -> None:
    prompt = spell(QUOTE + "x" + "the")
    params = SamplingParams(temperature=0.0, max_tokens=64, stop=("fox",))
    plain = _generate(ScriptedRunner(QUOTE[3:], len(prompt)), prompt, params, None)
    fast = _generate(ScriptedRunner(QUOTE[3:], len(prompt)), prompt, params, SPEC)
    assert "".join(o.text for o in fast) == "".join(o.text for o in plain) == "quickbrown"
    assert fast[-1].finish_reason is FinishReason.STOP
    assert fast[-1].num_output_tokens == plain[-1].num_output_tokens


def test_max_tokens_is_exact_with_drafts() -> None:
    prompt = spell(QUOTE + "x" + "the")
    params = SamplingParams(temperature=0.0, max_tokens=7)
    fast = _generate(ScriptedRunner(QUOTE[3:], len(prompt)), prompt, params, SPEC)
    assert "".join(o.text for o in fast) == QUOTE[3:10]
    assert fast[-1].finish_reason is FinishReason.LENGTH
    assert fast[-1].num_output_tokens == 7


def test_a_wrong_draft_costs_nothing_but_its_rows() -> None:
    # the text diverges from the prompt's copy after "quick": the drafts after it fail
    prompt = spell(QUOTE + "x" + "the")
    script = "quickredfoxjumpsoverthelazycat"
    params = SamplingParams(temperature=0.0, max_tokens=64)
    runner = ScriptedRunner(script, len(prompt))
    fast = _generate(runner, prompt, params, SPEC)
    assert "".join(o.text for o in fast) == script
    assert runner.truncations  # the cells of drafts not kept were dropped


def test_a_copy_in_progress_continues_where_its_lines_repeat() -> None:
    drafter = PromptLookup(SpeculationConfig(max_ngram=2, min_ngram=1))
    first, second = [10, 1, 2, 3, 7], [11, 1, 2, 3, 8]  # lines alike but for their ends
    tokens = first + second + [10]
    assert drafter.propose(tokens, 4) == [1, 2, 3, 7]  # the text starts copying `first`
    tokens += [1, 2, 3]  # three of them kept, the next one not yet known
    # [2, 3] last came in `second` (then 8); the copy of `first` goes on with 7
    assert drafter.propose(tokens, 2) == [7, 11]
    tokens += [9]  # the text leaves the copy: back to the index
    assert drafter.propose(tokens, 2) == []
