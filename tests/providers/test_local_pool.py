"""The local model pool with a fake loader: loading on demand, waiting for a load, the
memory budget (least recently used first, never a busy model), idle unloads, preloads,
and the leases a request holds through `ManagedModel`."""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from modelyard.api.preparation import drive
from modelyard.providers.base import (
    ChatDelta,
    ChatRequest,
    ChatStream,
    DeltaStream,
    PreparedChat,
    Provider,
    ProviderError,
)
from modelyard.providers.local_pool import LoadState, LocalPool, ModelSpec, PoolError
from modelyard.providers.managed import ManagedModel
from modelyard.usage import Usage


class FakeEngine(Provider[None]):
    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.closed = False

    def describe(self) -> dict[str, Any]:
        return {"context_length": 512, "engine": self.model_id}

    async def prepare_chat(self, request: ChatRequest) -> PreparedChat[None]:
        return PreparedChat(request, 3, 2, None, self)

    async def start_chat(self, prepared: PreparedChat[None]) -> ChatStream:
        async def deltas() -> AsyncGenerator[ChatDelta, None]:
            yield ChatDelta("hi", Usage(3, 0, 1))
            yield ChatDelta("", Usage(3, 0, 2), "stop")
        return DeltaStream(deltas())

    async def close(self) -> None:
        self.closed = True


class Loader:
    """Loads FakeEngines; `gate` (when set) holds every load until it is set."""

    def __init__(self) -> None:
        self.loaded: list[str] = []
        self.gate: threading.Event | None = None
        self.fail: set[str] = set()
        self.engines: dict[str, FakeEngine] = {}

    def __call__(self, spec: ModelSpec) -> FakeEngine:
        if self.gate is not None:
            assert self.gate.wait(10)
        if spec.model_id in self.fail:
            raise RuntimeError("not a GGUF file")
        self.loaded.append(spec.model_id)
        engine = self.engines[spec.model_id] = FakeEngine(spec.model_id)
        return engine


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def pool(loader: Loader, *specs: ModelSpec, budget: int = 0, timeout: float = 5.0,
         clock: Clock | None = None) -> LocalPool:
    return LocalPool(list(specs), loader, memory_budget=budget, load_timeout_s=timeout,
                     clock=clock or Clock())


def spec(model_id: str, memory: int = 100, **options: Any) -> ModelSpec:
    return ModelSpec(model_id, memory, **options)


async def settle(local: LocalPool) -> None:
    """Let the unloads and loads in flight finish."""
    for _ in range(50):
        await asyncio.sleep(0.01)
        if all(local.state(m) in (LoadState.READY, LoadState.UNLOADED)
               for m in ("a", "b", "c") if m in local):
            return


def test_a_model_loads_on_its_first_request_once_for_every_waiter() -> None:
    loader = Loader()
    local = pool(loader, spec("a"), spec("b"))

    async def scenario() -> None:
        assert local.state("a") is LoadState.UNLOADED
        loader.gate = threading.Event()
        waiting = [asyncio.ensure_future(local.acquire("a")) for _ in range(3)]
        await asyncio.sleep(0.05)
        assert local.state("a") is LoadState.LOADING  # all three wait for one load
        assert local.status("a") == {"state": "loading", "memory_bytes": 100}
        loader.gate.set()
        engines = await asyncio.gather(*waiting)
        assert engines[0] is engines[1] is engines[2]
        assert loader.loaded == ["a"]
        assert local.state("a") is LoadState.READY and local.state("b") is LoadState.UNLOADED
        assert local.description("a")["engine"] == "a"  # the engine's own, once loaded
        await local.close()
        assert loader.engines["a"].closed

    asyncio.run(scenario())


def test_a_load_past_the_timeout_is_a_503_with_retry_after_and_goes_on() -> None:
    loader = Loader()
    loader.gate = threading.Event()
    local = pool(loader, spec("a"), timeout=0.2)

    async def scenario() -> None:
        with pytest.raises(ProviderError) as refused:
            await local.acquire("a")
        assert refused.value.status == 503 and refused.value.code == "model_loading"
        assert refused.value.headers == {"Retry-After": "5"}
        assert local.state("a") is LoadState.LOADING
        assert loader.gate is not None
        loader.gate.set()
        await settle(local)
        assert local.state("a") is LoadState.READY  # the next request finds it loaded
        await local.close()

    asyncio.run(scenario())


def test_a_failed_load_refuses_its_waiters_and_the_next_request_tries_again() -> None:
    loader = Loader()
    loader.fail.add("a")
    local = pool(loader, spec("a"))

    async def scenario() -> None:
        with pytest.raises(ProviderError) as refused:
            await local.acquire("a")
        assert refused.value.status == 503 and refused.value.code == "model_unavailable"
        assert local.state("a") is LoadState.UNLOADED
        loader.fail.clear()
        await local.acquire("a")
        assert local.state("a") is LoadState.READY
        metrics = {(s.name, tuple(s.labels.values())): s.value
                   for family in local.collect() for s in family.samples}
        assert metrics["modelyard_local_model_loads_total", ("a", "failed")] == 1
        assert metrics["modelyard_local_model_loads_total", ("a", "ok")] == 1
        await local.close()

    asyncio.run(scenario())


def test_the_budget_unloads_the_least_recently_used_idle_model_first() -> None:
    loader, clock = Loader(), Clock()
    local = pool(loader, spec("a"), spec("b"), spec("c"), budget=250, clock=clock)

    async def scenario() -> None:
        await local.acquire("a")
        clock.now += 1
        await local.acquire("b")
        clock.now += 1
        await local.acquire("a")  # a is now the more recently used
        clock.now += 1
        await local.acquire("c")
        assert [local.state(m) for m in "abc"] == [
            LoadState.READY, LoadState.UNLOADED, LoadState.READY]
        assert loader.engines["b"].closed and not loader.engines["a"].closed
        assert local.used_bytes() == 200
        await local.close()

    asyncio.run(scenario())


def test_a_model_with_a_request_running_is_never_unloaded_for_room() -> None:
    loader, clock = Loader(), Clock()
    local = pool(loader, spec("a"), spec("b"), spec("c"), budget=250, clock=clock,
                 timeout=0.5)

    async def scenario() -> None:
        await local.acquire("a")
        busy_a = local.checkout("a")  # a is the least recently used, but busy
        clock.now += 1
        await local.acquire("b")
        assert busy_a is not None
        await local.acquire("c")  # so b goes
        assert local.state("a") is LoadState.READY
        assert local.state("b") is LoadState.UNLOADED
        busy_c = local.checkout("c")
        assert busy_c is not None
        with pytest.raises(ProviderError) as refused:  # a and c busy: no room for b
            await local.acquire("b")
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "5"}
        assert local.state("a") is LoadState.READY and local.state("c") is LoadState.READY
        waiting = asyncio.ensure_future(local.acquire("b"))
        await asyncio.sleep(0.05)
        busy_c[1].release()  # c's request ends: c makes room for b
        busy_c[1].release()  # (a lease ends once)
        await waiting
        assert local.state("b") is LoadState.READY and local.state("c") is LoadState.UNLOADED
        assert local.state("a") is LoadState.READY
        busy_a[1].release()
        await local.close()

    asyncio.run(scenario())


def test_a_model_larger_than_the_budget_stops_the_start() -> None:
    with pytest.raises(PoolError, match="'big' needs about 300 bytes"):
        LocalPool([spec("big", 300)], Loader(), memory_budget=350, reserved_bytes=100)


def test_idle_models_unload_after_their_idle_time_unless_busy_or_preloaded() -> None:
    loader, clock = Loader(), Clock()
    local = pool(loader, spec("a", idle_unload_seconds=30), spec("b", idle_unload_seconds=30),
                 spec("c", idle_unload_seconds=30, preload=True), clock=clock)
    local.preload()
    assert loader.loaded == ["c"] and local.state("c") is LoadState.READY

    async def scenario() -> None:
        await local.acquire("a")
        await local.acquire("b")
        held = local.checkout("b")
        assert held is not None
        clock.now += 29
        assert local.unload_idle() == []
        clock.now += 2
        assert local.unload_idle() == ["a"]  # b is busy, c preloaded
        await settle(local)
        assert local.state("a") is LoadState.UNLOADED
        held[1].release()
        clock.now += 31
        assert local.unload_idle() == ["b"]
        await settle(local)
        await local.acquire("a")  # loads again on its next request
        assert loader.loaded == ["c", "a", "b", "a"]
        await local.close()

    asyncio.run(scenario())


def test_preloads_that_exceed_the_budget_stop_the_start() -> None:
    local = pool(Loader(), spec("a", preload=True), spec("b", preload=True), budget=150)
    with pytest.raises(PoolError, match="preloaded models need about 200 bytes"):
        local.preload()


def request() -> ChatRequest:
    return ChatRequest("req-1", [{"role": "user", "content": "hi"}])


def test_a_request_holds_its_model_from_preparation_to_the_end_of_its_stream() -> None:
    loader = Loader()
    local = pool(loader, spec("a"))
    model = ManagedModel(local, spec("a"), 512)

    async def scenario() -> None:
        prepared = await model.prepare_chat(request())  # loads the engine first
        assert prepared.prompt_tokens == 3 and local.state("a") is LoadState.READY
        assert _requests(local) == 1
        stream = await prepared.start()
        del prepared
        gc.collect()
        assert _requests(local) == 1  # started: the stream holds it
        texts = [delta.text async for delta in stream]
        assert texts == ["hi", ""]
        assert _requests(local) == 0
        unstarted = await model.prepare_chat(request())
        assert _requests(local) == 1
        del unstarted  # refused before it started (a 402, a 429): the lease goes with it
        gc.collect()
        assert _requests(local) == 0
        described = model.describe()
        assert described["state"] == "ready" and described["memory_bytes"] == 100
        await model.close()

    asyncio.run(scenario())


def test_preparation_in_a_worker_never_waits_for_a_load() -> None:
    loader = Loader()
    local = pool(loader, spec("a"))
    model = ManagedModel(local, spec("a"), 512)

    async def scenario() -> None:
        await model.ready()  # on the loop: the load is waited for
        await local.close()

    with pytest.raises(ProviderError) as refused:  # no event loop: a worker thread
        drive(model.prepare_chat(request()))
    assert refused.value.status == 503 and refused.value.code == "model_loading"
    asyncio.run(scenario())
    assert loader.loaded == ["a"]


def _requests(local: LocalPool) -> float:
    return next(s.value for family in local.collect() for s in family.samples
                if s.name == "modelyard_local_model_requests")


def test_beside_upstreams_an_unloaded_model_starts_loading_and_is_skipped() -> None:
    from modelyard.config import DeploymentConfig
    from modelyard.router.local_route import LocalDeployment

    loader = Loader()
    local = pool(loader, spec("a"))
    deployment = LocalDeployment(DeploymentConfig(kind="local", source="a.gguf"),
                                 ManagedModel(local, spec("a"), 512))

    async def scenario() -> None:
        assert await deployment.prepare(request()) is None  # the upstreams answer this one
        await settle(local)
        assert local.state("a") is LoadState.READY
        prepared = await deployment.prepare(request())
        assert prepared is not None and prepared.prompt_tokens == 3
        del prepared
        await local.close()

    asyncio.run(scenario())
