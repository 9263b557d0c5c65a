"""Drafts from an account's own recent outputs: the store and its index, the lookup order
beside the sequence's own text, and the engine with the scripted runner of
tests/engine/fakes.py (no model): a second answer of one account is drafted from its
first, and another account's request never is."""

from __future__ import annotations

import asyncio

from modelyard.engine.account_history import AccountHistories, HistoryConfig, OutputHistory
from modelyard.engine.engine import Engine, EngineOutput
from modelyard.engine.scheduler import SchedulerConfig
from modelyard.engine.sequence import SamplingParams, Share
from modelyard.engine.speculation import PromptLookup, SpeculationConfig
from tests.engine.fakes import ScriptedRunner, spell


def test_the_last_ngram_drafts_what_followed_it_in_the_latest_output() -> None:
    history = OutputHistory(HistoryConfig(ngram=2))
    history.add([1, 2, 3, 4, 5])
    history.add([9, 2, 3, 7, 8])
    assert history.propose([6, 2, 3], 4) == [7, 8]   # the latest occurrence wins
    assert history.propose([6, 3, 4], 1) == [5]      # the limit holds
    assert history.propose([6, 4, 9], 4) == []       # never seen
    assert history.propose([3], 4) == [] and history.propose([2, 3], 0) == []


def test_old_outputs_are_dropped_whole_past_the_token_bound() -> None:
    history = OutputHistory(HistoryConfig(ngram=2, max_tokens=8))
    history.add([1, 2, 3, 4, 5])
    history.add([6, 7, 8, 9, 10])       # 10 tokens kept > 8: the first output goes
    assert history.num_tokens == 5
    assert history.propose([1, 2], 3) == []
    assert history.propose([6, 7], 3) == [8, 9, 10]
    history.add([1, 1])                 # no longer than the n-gram: nothing to index
    assert history.num_tokens == 5


def test_the_index_forgets_dropped_outputs_as_it_grows() -> None:
    history = OutputHistory(HistoryConfig(ngram=2, max_tokens=20))
    for start in range(0, 400, 10):
        history.add(list(range(start, start + 10)))
    assert history.num_tokens <= 20
    assert len(history._index) <= 2 * 20 + 10
    assert history.propose([391, 392], 2) == [393, 394]


def test_each_account_has_its_own_history_and_none_has_none() -> None:
    histories = AccountHistories(HistoryConfig(max_accounts=2))
    a = histories.for_account("acct-a")
    assert a is not None and histories.for_account("acct-a") is a
    assert histories.for_account("acct-b") is not a
    assert histories.for_account(None) is None
    histories.for_account("acct-a")     # a used last: b is the least recent
    histories.for_account("acct-c")
    assert len(histories) == 2
    assert histories.for_account("acct-a") is a
    assert histories.for_account("acct-b") is not None  # made again, empty


def test_the_sequences_own_long_match_goes_before_the_history() -> None:
    history = OutputHistory(HistoryConfig(ngram=3))
    history.add([1, 2, 3, 40, 41])
    drafter = PromptLookup(SpeculationConfig(max_ngram=4, min_ngram=2), history)
    # its own text has [1, 2, 3] followed by 30: a match as long as the history's
    assert drafter.propose([1, 2, 3, 30, 9, 1, 2, 3], 2) == [30, 9]
    other = PromptLookup(SpeculationConfig(max_ngram=4, min_ngram=2), history)
    # only [2, 3] repeats in its own text, shorter than the history's 3-gram
    assert other.propose([5, 2, 3, 31, 1, 2, 3], 2) == [40, 41]
    alone = PromptLookup(SpeculationConfig(max_ngram=4, min_ngram=2))
    assert alone.propose([5, 2, 3, 31, 1, 2, 3], 2) == [31, 1]


ANSWER = "packedcratesshipfromthenorthdock"


def test_an_accounts_second_answer_is_drafted_from_its_first_and_no_one_elses() -> None:
    prompt = spell("zz")   # nothing of the answer is in the prompt
    runner = ScriptedRunner(ANSWER, len(prompt))
    engine = Engine(runner, SchedulerConfig(  # type: ignore[arg-type]
        max_sequences=2, step_token_budget=64, kv_capacity=512, context_per_sequence=256,
        max_waiting=8, speculation=SpeculationConfig(max_draft=8, token_cost=0.1,
                                                     first_rate=0.9, next_rate=0.9)))
    params = SamplingParams(temperature=0.0, max_tokens=64)

    async def answer(request_id: str, account: str | None) -> tuple[str, int]:
        before = len(runner.decoded_batches)
        queue = engine.submit(request_id, prompt, params, share=Share(account))
        outputs: list[EngineOutput] = []
        while not outputs or outputs[-1].finish_reason is None:
            outputs.append(await asyncio.wait_for(queue.get(), timeout=10))
        return "".join(o.text for o in outputs), len(runner.decoded_batches) - before

    async def main() -> list[tuple[str, int]]:
        engine.start()
        return [await answer("a1", "acct-a"), await answer("a2", "acct-a"),
                await answer("b1", "acct-b"), await answer("n1", None),
                await answer("n2", None)]

    try:
        first_a, second_a, first_b, first_none, second_none = asyncio.run(main())
    finally:
        engine.stop()
    assert {text for text, _ in (first_a, second_a, first_b, first_none, second_none)} == {
        ANSWER}
    # (the first request reads its prompt in a step of its own; the later ones find it
    # in the prefix cache)
    assert second_a[1] < first_b[1] / 2      # drafted from acct-a's first answer
    assert first_b[1] == first_none[1] == second_none[1] == first_a[1] - 1
    # acct-b sees none of acct-a's outputs; a request of no account has no history
