"""The engine loop with a scripted stand-in for the llama.cpp runner (no model needed).

The stand-in replaces only the runner, the one module that calls llama.cpp; the scheduler,
sampler, detokenizer and stop strings are the real ones.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence as Seq

import numpy as np
import numpy.typing as npt
import pytest

from modelyard.engine.engine import Engine, EngineOutput
from modelyard.engine.runner import BatchItem, RunnerError
from modelyard.engine.scheduler import SchedulerConfig
from modelyard.engine.sequence import FinishReason, SamplingParams

VOCAB = 32
EOG = 0
LETTERS = {i: chr(ord("a") + i - 1).encode() for i in range(1, 27)}


class ScriptedRunner:
    """Greedy logits that spell `script` for every sequence; can be told to fail once."""

    eog_ids = frozenset({EOG})

    def __init__(self, script: str) -> None:
        self.script = [ord(ch) - ord("a") + 1 for ch in script] + [EOG]
        self.fail_next = False
        self.decoded_batches: list[list[BatchItem]] = []
        self.cleared = 0
        self.truncations: list[tuple[int, int]] = []

    def token_bytes(self, token: int) -> bytes:
        return LETTERS.get(token, b"")

    def decode(self, items: list[BatchItem]) -> npt.NDArray[np.float32]:
        if self.fail_next:
            self.fail_next = False
            raise RunnerError("scripted failure")
        self.decoded_batches.append(items)
        rows = []
        for item in items:
            if item.want_logits:
                produced = item.start + len(item.tokens) - PROMPT_LEN
                row = np.zeros(VOCAB, dtype=np.float32)
                row[self.script[min(produced, len(self.script) - 1)]] = 10.0
                rows.append(row)
        return np.array(rows, dtype=np.float32).reshape(len(rows), VOCAB)

    def truncate_slot(self, slot: int, keep: int) -> None:
        self.truncations.append((slot, keep))

    def clear_all(self) -> None:
        self.cleared += 1


PROMPT_LEN = 3


def _engine(runner: ScriptedRunner, max_sequences: int = 4) -> Engine:
    config = SchedulerConfig(max_sequences=max_sequences, step_token_budget=16,
                             kv_capacity=max_sequences * 64, context_per_sequence=64,
                             max_waiting=8)
    return Engine(runner, config)  # type: ignore[arg-type]


async def _collect(queue: asyncio.Queue[EngineOutput]) -> list[EngineOutput]:
    outputs = []
    while True:
        output = await asyncio.wait_for(queue.get(), timeout=10)
        outputs.append(output)
        if output.finish_reason is not None or output.error is not None:
            return outputs


def _run(engine: Engine, prompts: Seq[list[int]], params: SamplingParams
         ) -> list[list[EngineOutput]]:
    async def main() -> list[list[EngineOutput]]:
        queues = [engine.submit(f"r{i}", p, params) for i, p in enumerate(prompts)]
        engine.start()  # after every submit, so they are all waiting for the first step
        return list(await asyncio.gather(*(_collect(q) for q in queues)))

    try:
        return asyncio.run(main())
    finally:
        engine.stop()


def _text(outputs: list[EngineOutput]) -> str:
    return "".join(o.text for o in outputs)


def test_sequences_are_decoded_together_and_end_on_eog() -> None:
    runner = ScriptedRunner("hello")
    results = _run(_engine(runner), [[30, 31, i] for i in range(3)],
                   SamplingParams(temperature=0, max_tokens=20))
    for outputs in results:
        assert _text(outputs) == "hello"
        assert outputs[-1].finish_reason is FinishReason.STOP
        assert outputs[-1].num_output_tokens == 6  # five letters and the end-of-turn token
    assert max(len(batch) for batch in runner.decoded_batches) == 3


def test_stop_string_across_tokens_is_cut_and_never_sent() -> None:
    results = _run(_engine(ScriptedRunner("abcdefgh")), [[30, 31, 29]],
                   SamplingParams(temperature=0, max_tokens=20, stop=("def",)))
    assert _text(results[0]) == "abc"
    assert results[0][-1].finish_reason is FinishReason.STOP


def test_max_tokens_gives_length() -> None:
    results = _run(_engine(ScriptedRunner("abcdefgh")), [[30, 31, 29]],
                   SamplingParams(temperature=0, max_tokens=4))
    assert _text(results[0]) == "abcd"
    assert results[0][-1].finish_reason is FinishReason.LENGTH


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on() -> None:
    runner = ScriptedRunner("abc")
    runner.fail_next = True
    engine = _engine(runner)

    async def main() -> tuple[list[EngineOutput], list[EngineOutput]]:
        failed = await _collect(engine.submit("doomed", [30, 31, 29], SamplingParams(
            temperature=0, max_tokens=8)))
        after = await _collect(engine.submit("after", [30, 31, 28], SamplingParams(
            temperature=0, max_tokens=8)))
        return failed, after

    engine.start()
    try:
        failed, after = asyncio.run(main())
    finally:
        engine.stop()
    assert failed[-1].error == "the engine failed: RunnerError"
    assert runner.cleared == 1
    assert _text(after) == "abc"


def test_full_queue_is_refused_at_submit() -> None:
    from modelyard.engine.scheduler import QueueFullError

    engine = _engine(ScriptedRunner("a"), max_sequences=1)  # not started: nothing is admitted

    async def main() -> None:
        for i in range(8):
            engine.submit(f"r{i}", [30, 31, 29], SamplingParams(max_tokens=2))
        with pytest.raises(QueueFullError):
            engine.submit("one-too-many", [30, 31, 29], SamplingParams(max_tokens=2))

    asyncio.run(main())
