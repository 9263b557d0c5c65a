"""The engine loop with a scripted stand-in for the llama.cpp runner (no model needed).

The stand-in (tests/engine/fakes.py) replaces only the runner, the one module that calls
llama.cpp; the scheduler, sampler, detokenizer and stop strings are the real ones.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from collections.abc import Sequence as Seq

import numpy as np
import numpy.typing as npt
import pytest

from modelyard.engine.engine import Engine, EngineOutput
from modelyard.engine.runner import BatchItem, RunnerError
from modelyard.engine.scheduler import SchedulerConfig
from modelyard.engine.sequence import FinishReason, SamplingParams
from tests.engine.fakes import ScriptedRunner

PROMPT_LEN = 3
"""The length of every prompt the tests send, after which the runner spells its script."""


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
    runner = ScriptedRunner("hello", PROMPT_LEN)
    results = _run(_engine(runner), [[30, 31, i] for i in range(3)],
                   SamplingParams(temperature=0, max_tokens=20))
    for outputs in results:
        assert _text(outputs) == "hello"
        assert outputs[-1].finish_reason is FinishReason.STOP
        assert outputs[-1].num_output_tokens == 6  # five letters and the end-of-turn token
    assert max(len(batch) for batch in runner.decoded_batches) == 3


def test_stop_string_across_tokens_is_cut_and_never_sent() -> None:
    results = _run(_engine(ScriptedRunner("abcdefgh", PROMPT_LEN)), [[30, 31, 29]],
                   SamplingParams(temperature=0, max_tokens=20, stop=("def",)))
    assert _text(results[0]) == "abc"
    assert results[0][-1].finish_reason is FinishReason.STOP


def test_max_tokens_gives_length() -> None:
    results = _run(_engine(ScriptedRunner("abcdefgh", PROMPT_LEN)), [[30, 31, 29]],
                   SamplingParams(temperature=0, max_tokens=4))
    assert _text(results[0]) == "abcd"
    assert results[0][-1].finish_reason is FinishReason.LENGTH


def test_a_failed_step_fails_its_requests_and_the_engine_goes_on() -> None:
    runner = ScriptedRunner("abc", PROMPT_LEN)
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

    # not started: nothing is admitted
    engine = _engine(ScriptedRunner("a", PROMPT_LEN), max_sequences=1)

    async def main() -> None:
        for i in range(8):
            engine.submit(f"r{i}", [30, 31, 29], SamplingParams(max_tokens=2))
        with pytest.raises(QueueFullError):
            engine.submit("one-too-many", [30, 31, 29], SamplingParams(max_tokens=2))

    asyncio.run(main())


# -- the inbox: submit and abort never wait on a step -----------------------------------------


class BlockingRunner(ScriptedRunner):
    """Each decode waits until the test releases it, so the test acts while a step runs."""

    def __init__(self, script: str) -> None:
        super().__init__(script, PROMPT_LEN)
        self.in_decode = threading.Event()
        self.release = threading.Event()

    def decode(self, items: list[BatchItem]) -> npt.NDArray[np.float32]:
        self.in_decode.set()
        if not self.release.wait(timeout=30):
            raise RunnerError("the test never released the step")
        return super().decode(items)


async def _wait_for(event: threading.Event) -> None:
    assert await asyncio.to_thread(event.wait, 10), "the engine never reached the step"


def test_submit_and_abort_return_while_a_step_is_blocked() -> None:
    runner = BlockingRunner("abc")
    engine = _engine(runner)
    params = SamplingParams(temperature=0, max_tokens=8)

    async def main() -> tuple[list[EngineOutput], list[EngineOutput], bool]:
        first = engine.submit("first", [30, 31, 29], params)
        engine.start()
        await _wait_for(runner.in_decode)
        # The step is inside decode and stays there until released: none of these calls
        # could return if they waited for it.
        second = engine.submit("second", [30, 31, 28], params)
        doomed = engine.submit("doomed", [30, 31, 27], params)
        engine.abort("doomed")
        engine.abort("never-submitted")
        assert not runner.release.is_set()
        runner.release.set()
        results = await asyncio.gather(_collect(first), _collect(second))
        await asyncio.sleep(0.05)
        return results[0], results[1], doomed.empty()

    try:
        first, second, nothing_for_doomed = asyncio.run(main())
    finally:
        runner.release.set()
        engine.stop()
    assert _text(first) == _text(second) == "abc"
    assert nothing_for_doomed
    assert all(item.slot is not None for batch in runner.decoded_batches for item in batch)
    assert "doomed" not in {i for i in engine._requests}


def test_an_aborted_requests_outputs_are_never_delivered_even_from_a_running_step() -> None:
    runner = BlockingRunner("abcdef")
    engine = _engine(runner)

    async def main() -> asyncio.Queue[EngineOutput]:
        queue = engine.submit("r", [30, 31, 29], SamplingParams(temperature=0, max_tokens=8))
        engine.start()
        await _wait_for(runner.in_decode)
        engine.abort("r")         # the step in progress will still sample for "r"
        runner.release.set()
        for _ in range(50):
            await asyncio.sleep(0.01)
            if not engine.scheduler.has_work():
                break
        return queue

    try:
        queue = asyncio.run(main())
    finally:
        runner.release.set()
        engine.stop()
    assert queue.empty()
    assert not engine.scheduler.has_work()


def test_a_full_queue_is_refused_at_once_while_a_step_is_blocked() -> None:
    from modelyard.engine.scheduler import QueueFullError

    runner = BlockingRunner("a")
    engine = _engine(runner, max_sequences=1)

    async def main() -> None:
        params = SamplingParams(temperature=0, max_tokens=2)
        engine.submit("running", [30, 31, 29], params)
        engine.start()
        await _wait_for(runner.in_decode)
        # Eight wait (max_waiting), most still in the inbox since the step is blocked.
        for i in range(8):
            engine.submit(f"r{i}", [30, 31, 29], params)
        with pytest.raises(QueueFullError):
            engine.submit("one-too-many", [30, 31, 29], params)
        with pytest.raises(QueueFullError):
            engine.submit("a-group-too-many", [30, 31, 29], params, n=2)
        runner.release.set()

    try:
        asyncio.run(main())
    finally:
        runner.release.set()
        engine.stop()


def test_aborted_waiting_requests_free_their_place_in_the_queue() -> None:
    from modelyard.engine.scheduler import QueueFullError

    runner = BlockingRunner("a")
    engine = _engine(runner, max_sequences=1)

    async def main() -> list[EngineOutput]:
        params = SamplingParams(temperature=0, max_tokens=2)
        engine.submit("running", [30, 31, 29], params)
        engine.start()
        await _wait_for(runner.in_decode)
        for i in range(8):
            engine.submit(f"r{i}", [30, 31, 29], params)
        for i in range(8):
            engine.abort(f"r{i}")
        runner.release.set()
        for _ in range(200):  # the engine thread drains the aborts at its next step
            try:
                return await _collect(engine.submit("later", [30, 31, 29], params))
            except QueueFullError:
                await asyncio.sleep(0.01)
        raise AssertionError("the aborted requests kept their places")

    try:
        later = asyncio.run(main())
    finally:
        runner.release.set()
        engine.stop()
    assert _text(later) == "a"


# -- shutdown ---------------------------------------------------------------------------------


def test_stop_ends_every_request_after_the_grace_period() -> None:
    runner = ScriptedRunner("a" * 60, PROMPT_LEN)
    engine = _engine(runner, max_sequences=1)
    params = SamplingParams(temperature=0, max_tokens=60)
    loop = asyncio.new_event_loop()

    async def submit() -> list[asyncio.Queue[EngineOutput]]:
        return [engine.submit(f"r{i}", [30, 31, 29], params) for i in range(3)]

    runner.slow = 0.05   # each step takes a while: 60 tokens outlast the grace period
    queues = loop.run_until_complete(submit())
    engine.start()
    stopper = threading.Thread(target=engine.stop, kwargs={"grace_s": 0.3})
    stopper.start()

    async def collect_all() -> list[list[EngineOutput]]:
        return list(await asyncio.gather(*(_collect(q) for q in queues)))

    results = loop.run_until_complete(collect_all())
    stopper.join(timeout=10)
    loop.close()
    assert not stopper.is_alive()
    assert engine.stopped
    running, *queued = results
    assert running[-1].error == "the server is shutting down"
    assert 0 < running[-1].num_output_tokens < 60
    assert all(r[-1].error == "the server is shutting down" for r in queued)


def test_stop_lets_work_that_ends_within_the_grace_period_finish() -> None:
    runner = ScriptedRunner("abc", PROMPT_LEN)
    engine = _engine(runner)

    async def main() -> list[EngineOutput]:
        queue = engine.submit("r", [30, 31, 29], SamplingParams(temperature=0, max_tokens=8))
        engine.start()
        await asyncio.to_thread(engine.stop, 10.0)
        outputs = []
        while not queue.empty():
            outputs.append(queue.get_nowait())
        return outputs

    outputs = asyncio.run(main())
    assert _text(outputs) == "abc"
    assert outputs[-1].finish_reason is FinishReason.STOP


def test_after_stop_submit_is_refused_and_a_never_started_engine_fails_its_queue() -> None:
    from modelyard.engine.scheduler import QueueFullError

    engine = _engine(ScriptedRunner("a", PROMPT_LEN))

    async def main() -> list[EngineOutput]:
        queue = engine.submit("r", [30, 31, 29], SamplingParams(max_tokens=2))
        engine.stop(grace_s=0)
        with pytest.raises(QueueFullError, match="shutting down"):
            engine.submit("late", [30, 31, 29], SamplingParams(max_tokens=2))
        return [await asyncio.wait_for(queue.get(), timeout=5)]

    [output] = asyncio.run(main())
    assert output.error == "the server is shutting down"


# -- seeds ------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [-1, -(2**63), 2**64 - 1, 0, 2**63])
@pytest.mark.parametrize("n", [1, 3])
def test_every_64_bit_seed_is_accepted(seed: int, n: int) -> None:
    results = _run_n(_engine(ScriptedRunner("abc", PROMPT_LEN)),
                     SamplingParams(max_tokens=4, seed=seed), n)
    assert len(results) == n
    assert all(outputs[-1].finish_reason is not None for outputs in results)


def _run_n(engine: Engine, params: SamplingParams, n: int) -> list[list[EngineOutput]]:
    async def main() -> list[list[EngineOutput]]:
        queue = engine.submit("r", [30, 31, 29], params, n)
        engine.start()
        by_choice: dict[int, list[EngineOutput]] = {}
        while sum(o[-1].finish_reason is not None for o in by_choice.values()) < n:
            output = await asyncio.wait_for(queue.get(), timeout=10)
            by_choice.setdefault(output.index, []).append(output)
        return [by_choice[i] for i in range(n)]

    try:
        return asyncio.run(main())
    finally:
        engine.stop()


def _gauge(engine: Engine) -> Callable[[str], float]:
    def gauge(name: str) -> float:
        value = engine.metrics.registry.get_sample_value(name)
        assert value is not None
        return value
    return gauge


def test_gauges_follow_an_abort_that_leaves_the_engine_idle() -> None:
    runner = BlockingRunner("abcdefgh")
    engine = _engine(runner)
    gauge = _gauge(engine)

    async def main() -> None:
        engine.submit("r", [30, 31, 29], SamplingParams(temperature=0, max_tokens=8))
        engine.start()
        await _wait_for(runner.in_decode)
        engine.abort("r")
        runner.release.set()
        for _ in range(200):
            await asyncio.sleep(0.01)
            if gauge("modelyard_running_sequences") == 0:
                break

    try:
        asyncio.run(main())
    finally:
        runner.release.set()
        engine.stop()
    assert gauge("modelyard_running_sequences") == 0
    assert gauge("modelyard_kv_cells_reserved") == 0
    assert gauge("modelyard_queue_depth") == 0


def test_the_gauges_sum_the_engines_that_share_the_metrics() -> None:
    """One engine per local model, one set of metrics: each engine adds its own part."""
    runners = [BlockingRunner("abcdefgh"), BlockingRunner("abcdefgh")]
    first = _engine(runners[0])
    second = Engine(runners[1], first.scheduler.config, first.metrics)  # type: ignore[arg-type]
    gauge = _gauge(first)

    async def main() -> None:
        first.submit("a", [30, 31, 29], SamplingParams(temperature=0, max_tokens=8))
        second.submit("b", [30, 31, 29], SamplingParams(temperature=0, max_tokens=8))
        second.submit("c", [30, 31, 29], SamplingParams(temperature=0, max_tokens=8))
        first.start()
        second.start()
        for runner in runners:   # both in their first step: what each drained, waiting
            await _wait_for(runner.in_decode)
        assert gauge("modelyard_queue_depth") == 3
        runners[0].release.set()   # the first engine's request runs to its end
        for _ in range(500):
            await asyncio.sleep(0.01)
            if gauge("modelyard_queue_depth") == 2:
                break
        assert gauge("modelyard_queue_depth") == 2   # the second engine's, still there
        assert gauge("modelyard_running_sequences") == 0

    try:
        asyncio.run(main())
    finally:
        for runner in runners:
            runner.release.set()
        first.stop()
        second.stop()
    assert gauge("modelyard_running_sequences") == 0
    assert gauge("modelyard_kv_cells_reserved") == 0
