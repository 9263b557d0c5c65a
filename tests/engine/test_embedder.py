"""The embedding worker without a model: batching, the queue's bound, abandoned requests,
failures and shutdown, with a fake encoder."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from modelyard.engine.embedder import (
    Embedder,
    EmbedderFull,
    EmbedderStopped,
    Vectors,
    _Job,
    plan_batch,
)
from modelyard.engine.metrics import EmbeddingMetrics

DIMENSIONS = 4


class FakeEncoder:
    """Each input's vector is [first token, length, call number, 0]; `gate` holds calls."""

    dimensions = DIMENSIONS

    def __init__(self, max_sequences: int = 64, fail: bool = False) -> None:
        self.max_sequences = max_sequences
        self.calls: list[list[list[int]]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = fail
        self.closed = False

    def encode(self, inputs: Sequence[Sequence[int]]) -> Vectors:
        self.entered.set()
        self.gate.wait(10)
        self.calls.append([list(tokens) for tokens in inputs])
        if self.fail:
            raise RuntimeError("llama.cpp broke")
        return np.array([[tokens[0], len(tokens), len(self.calls), 0] for tokens in inputs],
                        dtype=np.float32)

    def close(self) -> None:
        self.closed = True


def run(test: Callable[[], Coroutine[Any, Any, None]]) -> Callable[[], None]:
    """The async test run on its own event loop (as the other engine tests do)."""
    def sync() -> None:
        asyncio.run(test())
    sync.__name__ = test.__name__
    return sync


def job(*lengths: int, scheduled: int = 0) -> _Job:
    loop = asyncio.new_event_loop()
    try:
        return _Job([[1] * n for n in lengths], loop, loop.create_future(),
                    np.empty((len(lengths), DIMENSIONS), np.float32), scheduled=scheduled)
    finally:
        loop.close()


@pytest.mark.parametrize(("jobs", "budget", "max_sequences", "expected"), [
    # one request's inputs while they fit
    ([(3, 3, 3)], 6, 64, [(0, 0, 2)]),
    # several requests share a call, in order
    ([(2,), (2, 2), (2,)], 100, 64, [(0, 0, 1), (1, 0, 2), (2, 0, 1)]),
    # the first input that does not fit ends the plan: no later request overtakes it
    ([(2,), (9,), (1,)], 10, 64, [(0, 0, 1)]),
    # the sequence cap
    ([(1, 1, 1), (1,)], 100, 2, [(0, 0, 2)]),
    # a request part-scheduled goes on from where it was
    ([(4, 4, 4)], 8, 64, [(0, 0, 2)]),
])
def test_plan_batch(jobs: list[tuple[int, ...]], budget: int, max_sequences: int,
                    expected: list[tuple[int, int, int]]) -> None:
    waiting = [job(*lengths) for lengths in jobs]
    plan = plan_batch(waiting, budget, max_sequences)
    assert [(waiting.index(p.job), p.start, p.stop) for p in plan] == expected


def test_plan_batch_resumes_a_part_scheduled_request() -> None:
    waiting = [job(4, 4, 4, scheduled=2)]
    [part] = plan_batch(waiting, 8, 64)
    assert (part.start, part.stop) == (2, 3)


@run
async def test_one_request_gets_its_vectors_in_order() -> None:
    encoder = FakeEncoder()
    embedder = Embedder(encoder, batch_tokens=8)
    try:
        vectors = await embedder.embed([[5, 1], [6, 1, 1], [7], [8, 1, 1, 1, 1]])
        assert vectors[:, 0].tolist() == [5, 6, 7, 8]
        assert vectors[:, 1].tolist() == [2, 3, 1, 5]
        assert len(encoder.calls) == 2  # 6 tokens, then 5: the budget is 8
    finally:
        await embedder.close()
    assert encoder.closed


@run
async def test_concurrent_requests_are_encoded_together() -> None:
    encoder = FakeEncoder()
    embedder = Embedder(encoder, batch_tokens=512)
    try:
        encoder.gate.clear()
        first = asyncio.create_task(embedder.embed([[1]]))
        await asyncio.to_thread(encoder.entered.wait, 5)  # the worker is busy with it
        others = [asyncio.create_task(embedder.embed([[i, 0], [i, 0, 0]])) for i in range(10)]
        await asyncio.sleep(0.05)
        encoder.gate.set()
        await first
        results = await asyncio.gather(*others)
        assert len(encoder.calls) == 2  # the ten waited together: one call
        for i, vectors in enumerate(results):
            assert vectors[:, 0].tolist() == [i, i]
            assert vectors[:, 2].tolist() == [2, 2]
    finally:
        await embedder.close()


@run
async def test_a_full_queue_refuses_at_once() -> None:
    encoder = FakeEncoder()
    embedder = Embedder(encoder, batch_tokens=512, max_waiting=3)
    try:
        encoder.gate.clear()
        busy = asyncio.create_task(embedder.embed([[1]]))
        await asyncio.to_thread(encoder.entered.wait, 5)
        waiting = asyncio.create_task(embedder.embed([[1], [2]]))
        await asyncio.sleep(0.01)
        with pytest.raises(EmbedderFull):
            await embedder.embed([[1], [2]])
        encoder.gate.set()
        await busy
        assert len(await waiting) == 2
        # an empty queue takes a request larger than the bound
        assert len(await embedder.embed([[1]] * 5)) == 5
    finally:
        await embedder.close()


@run
async def test_an_abandoned_request_is_not_encoded() -> None:
    encoder = FakeEncoder()
    embedder = Embedder(encoder, batch_tokens=512)
    try:
        encoder.gate.clear()
        busy = asyncio.create_task(embedder.embed([[1]]))
        await asyncio.to_thread(encoder.entered.wait, 5)
        abandoned = asyncio.create_task(embedder.embed([[99]]))
        await asyncio.sleep(0.01)
        abandoned.cancel()
        await asyncio.sleep(0.01)
        encoder.gate.set()
        await busy
        assert (await embedder.embed([[2]]))[0, 0] == 2
        assert [99] not in [tokens for call in encoder.calls for tokens in call]
    finally:
        await embedder.close()


@run
async def test_an_encoder_failure_fails_its_requests_only() -> None:
    encoder = FakeEncoder(fail=True)
    embedder = Embedder(encoder, batch_tokens=512)
    try:
        with pytest.raises(RuntimeError, match="broke"):
            await embedder.embed([[1]])
        encoder.fail = False
        assert (await embedder.embed([[3]]))[0, 0] == 3
    finally:
        await embedder.close()


@run
async def test_close_fails_what_waits_and_refuses_more() -> None:
    encoder = FakeEncoder()
    embedder = Embedder(encoder, batch_tokens=512)
    encoder.gate.clear()
    busy = asyncio.create_task(embedder.embed([[1]]))
    await asyncio.to_thread(encoder.entered.wait, 5)
    waiting = asyncio.create_task(embedder.embed([[2]]))
    await asyncio.sleep(0.01)
    closing = asyncio.create_task(embedder.close())
    await asyncio.sleep(0.01)
    encoder.gate.set()
    await closing
    assert (await busy)[0, 0] == 1  # the call in progress finishes
    with pytest.raises(EmbedderStopped):
        await waiting
    with pytest.raises(EmbedderStopped):
        await embedder.embed([[3]])
    assert encoder.closed


@run
async def test_inputs_beyond_the_batch_are_refused() -> None:
    embedder = Embedder(FakeEncoder(), batch_tokens=4)
    try:
        with pytest.raises(ValueError, match="1 to 4 tokens"):
            await embedder.embed([[1] * 5])
        with pytest.raises(ValueError):
            await embedder.embed([[]])
    finally:
        await embedder.close()


@run
async def test_a_failure_mid_request_drops_the_rest_of_it_and_frees_the_queue() -> None:
    encoder = FakeEncoder(fail=True)
    embedder = Embedder(encoder, batch_tokens=2, max_waiting=4)
    try:
        with pytest.raises(RuntimeError, match="broke"):
            await embedder.embed([[1, 1], [2, 2], [3, 3], [4, 4]])  # four calls' worth
        assert len(encoder.calls) == 1  # its other inputs were not encoded
        encoder.fail = False
        encoder.gate.clear()
        encoder.entered.clear()
        busy = asyncio.create_task(embedder.embed([[5]]))
        await asyncio.to_thread(encoder.entered.wait, 5)
        # the queue counts nothing of the failed request (once): four inputs may wait again
        waiting = asyncio.create_task(embedder.embed([[6]] * 4))
        await asyncio.sleep(0.01)
        with pytest.raises(EmbedderFull):  # and no more than four
            await embedder.embed([[7]])
        encoder.gate.set()
        await busy
        assert len(await waiting) == 4
    finally:
        await embedder.close()


@run
async def test_calls_are_counted_in_its_metrics() -> None:
    registry = CollectorRegistry()
    embedder = Embedder(FakeEncoder(), batch_tokens=4, metrics=EmbeddingMetrics(registry))
    try:
        await embedder.embed([[1, 1, 1], [2, 2], [3]])
    finally:
        await embedder.close()
    assert registry.get_sample_value("modelyard_embedded_tokens_total") == 6
    assert registry.get_sample_value("modelyard_embedding_inputs_per_call_count") == 2
    assert registry.get_sample_value("modelyard_embedding_inputs_per_call_sum") == 3
    assert registry.get_sample_value("modelyard_embedding_waiting_inputs") == 0
