"""A catalog model mixing the built-in engine with an upstream: the router's own code
against the real fault upstream process. The engine here is the platform tests'
in-process fake model (`tests/platform/fakes.py`), which answers like the engine's
provider without loading a model; the engine itself is covered by the e2e tests."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator

import pytest

from modelyard.config import CatalogModelConfig, DeploymentConfig, RouterConfig
from modelyard.providers.base import ChatRequest, ChatStream, PreparedChat, ProviderError
from modelyard.router.catalog import RoutedModel, build_catalog
from tests.platform.fakes import FakeProvider
from tests.router.fault_process import running_fault_server


@pytest.fixture(scope="module")
def fault() -> Iterator[str]:
    with running_fault_server() as url:
        yield url


def _model(fault: str, local_weight: float = 1.0) -> CatalogModelConfig:
    return CatalogModelConfig(id="mixed", deployments=(
        DeploymentConfig(kind="local", weight=local_weight, name="engine"),
        DeploymentConfig(base_url=f"{fault}/v1", upstream_model="ok:UP", name="upstream")))


def _request(**fields: object) -> ChatRequest:
    return ChatRequest("r", [{"role": "user", "content": "one two three"}],
                       **{"max_tokens": 4, **fields})  # type: ignore[arg-type]


async def _answer(model: RoutedModel, request: ChatRequest) -> str:
    prepared = await model.prepare_chat(request)
    text = ""
    async for delta in await model.start_chat(prepared):
        text += delta.text
    return text


def _catalog(fault: str, engine: FakeProvider, local_weight: float = 1.0) -> RoutedModel:
    catalog = build_catalog((_model(fault, local_weight),), RouterConfig(), {}, engine)
    model = catalog["mixed"]
    assert isinstance(model, RoutedModel)
    return model


def test_requests_are_weighed_between_the_engine_and_the_upstream(fault: str) -> None:
    async def main() -> Counter[str]:
        model = _catalog(fault, FakeProvider(model_id="engine"), local_weight=3.0)
        try:
            answers = [await _answer(model, _request()) for _ in range(400)]
        finally:
            await model.close()
        return Counter("upstream" if a == "UP" else "engine" for a in answers)
    counts = asyncio.run(main())
    # weight 3 : 1 -> 300 expected on the engine; binomial sd ~8.7, so 5 sd is ~43.
    assert abs(counts["engine"] - 300) < 45, counts


def test_a_full_engine_sends_the_request_upstream(fault: str) -> None:
    class Full(FakeProvider):
        async def start_chat(self, prepared: PreparedChat[None]) -> ChatStream:
            raise ProviderError(503, "the engine's queue is full", retry_after=1)

    async def main() -> list[str]:
        model = _catalog(fault, Full(model_id="engine"), local_weight=1000.0)
        try:
            return [await _answer(model, _request()) for _ in range(5)]
        finally:
            await model.close()
    assert asyncio.run(main()) == ["UP"] * 5


def test_a_request_the_engine_cannot_take_goes_upstream_and_reserves_for_both(
        fault: str) -> None:
    class Small(FakeProvider):
        async def prepare_chat(self, request: ChatRequest) -> PreparedChat[None]:
            if request.max_tokens and request.max_tokens > 100:
                raise ProviderError(422, "does not fit the engine's context")
            return PreparedChat(request, 5000, request.max_tokens or 8, None, self)

    async def main() -> tuple[list[str], int, int]:
        model = _catalog(fault, Small(model_id="engine"), local_weight=1000.0)
        try:
            big = [await _answer(model, _request(max_tokens=500)) for _ in range(3)]
            prepared = await model.prepare_chat(_request())
            return big, prepared.prompt_tokens, prepared.max_tokens
        finally:
            await model.close()
    answers, prompt, _ = asyncio.run(main())
    assert answers == ["UP"] * 3
    assert prompt == 5000  # the engine's count is above the upstream's bound: it is held
