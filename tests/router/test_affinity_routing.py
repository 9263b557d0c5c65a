"""Cache-aware routing through the router's own code against the real fault upstream process
(tests/router/fault_server.py): each deployment answers with its tag, so each turn shows
where it went."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from modelyard.config import CatalogModelConfig, DeploymentConfig, RouterConfig
from modelyard.providers.base import ChatRequest
from modelyard.providers.openai_compat import UpstreamDeployment
from modelyard.router.catalog import RoutedModel
from tests.router.fault_process import running_fault_server


@pytest.fixture(scope="module")
def fault() -> Iterator[str]:
    with running_fault_server() as url:
        yield url


def _routed(fault: str, *upstreams: str, router: RouterConfig | None = None) -> RoutedModel:
    deployments = tuple(DeploymentConfig(base_url=f"{fault}/v1", upstream_model=upstream,
                                         name=upstream, prefix_cache=True)
                        for upstream in upstreams)
    config = CatalogModelConfig(id="m", deployments=deployments)
    return RoutedModel(config, router or RouterConfig(breaker_failures=1),
                       [UpstreamDeployment(d, None) for d in deployments])


async def _answer(model: RoutedModel, messages: list[dict[str, Any]], account: str) -> str:
    request = ChatRequest("r", messages, max_tokens=4, cache_scope=account)
    text = ""
    async for delta in await model.start_chat(await model.prepare_chat(request)):
        text += delta.text
    return text


async def _converse(model: RoutedModel, topic: str, turns: int, account: str) -> list[str]:
    """Where each turn of one conversation went (each turn repeats the earlier ones)."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Answer briefly."}]
    tags = []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"{topic}, question {turn}"})
        tags.append(await _answer(model, messages, account))
        messages.append({"role": "assistant", "content": tags[-1]})
    return tags


def test_a_conversations_turns_stay_on_one_deployment_per_account(fault: str) -> None:
    async def main() -> dict[str, list[list[str]]]:
        model = _routed(fault, "ok:A", "ok:B", "ok:C")
        try:
            return {account: [await _converse(model, f"topic {i}", 4, account)
                              for i in range(16)] for account in ("acct-1", "acct-2")}
        finally:
            await model.close()
    placed = asyncio.run(main())
    for conversations in placed.values():
        assert all(len(set(tags)) == 1 for tags in conversations), conversations
        assert len({tags[0] for tags in conversations}) == 3  # spread over the replicas
    # the same conversations of another account are placed by its own key
    assert [t[0] for t in placed["acct-1"]] != [t[0] for t in placed["acct-2"]]


def test_a_failing_or_open_deployment_hands_its_conversations_to_the_next(fault: str) -> None:
    httpx.post(f"{fault}/control/T/on", timeout=5)

    async def main() -> tuple[list[str], list[str], list[str]]:
        model = _routed(fault, "toggle:T", "ok:B", "ok:C")
        try:
            topics = [f"subject {i}" for i in range(12)]
            before = [(await _converse(model, t, 1, "acct"))[0] for t in topics]
            httpx.post(f"{fault}/control/T/off", timeout=5)
            # T fails (500): each request retried on the next on its ring, and T's breaker
            # opens after one failure, so later conversations skip it without trying
            during = [(await _converse(model, t, 1, "acct"))[0] for t in topics]
            httpx.post(f"{fault}/control/T/on", timeout=5)
            time.sleep(0.01)
            return before, during, [(await _converse(model, t, 1, "acct"))[0] for t in topics]
        finally:
            await model.close()
    before, during, again = asyncio.run(main())
    assert "T" in before
    assert "T" not in during
    # only T's conversations moved; the others stayed where they were
    assert all(b == d for b, d in zip(before, during, strict=True) if b != "T")
    assert "T" not in again  # the breaker is still open (30 s cooldown)


def test_without_affinity_turns_are_spread_at_random(fault: str) -> None:
    async def main() -> list[list[str]]:
        model = _routed(fault, "ok:A", "ok:B", router=RouterConfig(affinity=False))
        try:
            return [await _converse(model, f"topic {i}", 4, "acct") for i in range(8)]
        finally:
            await model.close()
    conversations = asyncio.run(main())
    assert any(len(set(tags)) > 1 for tags in conversations)  # 1 - 2**-24 likely
