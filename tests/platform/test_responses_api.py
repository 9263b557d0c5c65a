"""POST /v1/responses on the platform (SQLite, and PostgreSQL with Redis): billed and
settled as chat is, stored in the platform database per account, a failure after the
stream started ends it with `response.failed`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from datetime import timedelta
from typing import Any

import httpx
import orjson
from sqlalchemy import update

from modelyard.config import PlatformConfig
from modelyard.platform.response_store import DatabaseResponses, StoredResponse
from modelyard.platform.tables import responses, utcnow
from modelyard.providers.base import ChatDelta, PreparedChat, ProviderError
from modelyard.usage import Usage
from tests.platform.fakes import FakeProvider
from tests.platform.harness import Backend, Harness, scenario


async def _create(platform: Harness, key: str, **body: Any) -> httpx.Response:
    return await platform.client.post("/v1/responses", headers=_auth(key), json={
        "model": "fake", "input": "one two three", "max_output_tokens": 4, **body})


def _auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def _events(text: str) -> list[dict[str, Any]]:
    events = []
    for block in text.strip().split("\n\n"):
        name, data = block.split("\n")
        event = orjson.loads(data.removeprefix("data: "))
        assert name == f"event: {event['type']}"
        events.append(event)
    return events


def test_a_response_is_billed_like_a_chat_completion(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000)
        answer = await _create(platform, key, store=False)
        assert answer.status_code == 200, answer.text
        response = answer.json()
        assert response["output"][0]["content"][0]["text"] == "tok" * 4
        assert response["status"] == "incomplete"  # the fake stops at max_output_tokens
        assert response["usage"]["input_tokens"] == 3
        assert response["usage"]["output_tokens"] == 4
        streamed = await _create(platform, key, stream=True, store=False)
        events = _events(streamed.text)
        assert events[-1]["type"] == "response.incomplete"
        await platform.settled()
        # twice 3 prompt tokens at 1 and 4 completion tokens at 2
        assert await platform.db_account("acme") == (1000 - 2 * 11, 0)
    scenario(backend, body)


def test_stored_in_the_database_per_account(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        platform.state.responses = DatabaseResponses(platform.gate.db)
        mine, theirs = await platform.key("acme", 1000), await platform.key("other", 1000)
        first = (await _create(platform, mine, metadata={"k": "v"})).json()
        read = await platform.client.get(f"/v1/responses/{first['id']}", headers=_auth(mine))
        assert read.status_code == 200 and read.json() == first
        # the continuation's prompt holds the first exchange (3 + 1 words more)
        second = await _create(platform, mine, input="four",
                               previous_response_id=first["id"])
        assert second.json()["usage"]["input_tokens"] == 3 + 1 + 1
        for key, status in ((theirs, 404), (mine, 200)):
            for method in ("GET", "DELETE"):
                answer = await platform.client.request(
                    method, f"/v1/responses/{first['id']}", headers=_auth(key))
                assert answer.status_code == status, (method, answer.text)
            continued = await _create(platform, theirs, previous_response_id=first["id"])
            assert continued.status_code == 404
            assert continued.json()["error"]["param"] == "previous_response_id"
        # deleted: gone for its own account too
        gone = await platform.client.get(f"/v1/responses/{first['id']}", headers=_auth(mine))
        assert gone.status_code == 404
        assert gone.json()["error"]["code"] == "response_not_found"
    scenario(backend, body)


class FailingProvider(FakeProvider):
    """Two tokens, then the upstream fails."""

    async def _answer(self, prepared: PreparedChat[None]) -> AsyncGenerator[ChatDelta, None]:
        yield ChatDelta("tok", Usage(prepared.prompt_tokens, completion_tokens=1))
        yield ChatDelta("tok", Usage(prepared.prompt_tokens, completion_tokens=2))
        raise ProviderError(503, "the upstream went away", code="server_overloaded")


def test_a_failure_after_the_start_is_response_failed_and_billed(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        platform.state.providers["fake"] = FailingProvider()
        key = await platform.key("acme", 1000)
        answer = await _create(platform, key, stream=True)
        events = _events(answer.text)
        assert [e["type"] for e in events][-2:] == ["response.output_text.delta",
                                                     "response.failed"]
        failed = events[-1]["response"]
        assert failed["status"] == "failed"
        assert failed["error"] == {"code": "server_error",
                                   "message": "the upstream went away"}
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        await platform.settled()
        # the 2 tokens sent are paid for, nothing stays reserved
        assert await platform.db_account("acme") == (1000 - 3 - 2 * 2, 0)
        # a failed response is not stored
        gone = await platform.client.get(f"/v1/responses/{failed['id']}", headers=_auth(key))
        assert gone.status_code == 404
    scenario(backend, body)


def test_the_gates_sweep_deletes_responses_past_the_usage_retention(backend: Backend) -> None:
    async def body(platform: Harness) -> None:
        store = DatabaseResponses(platform.gate.db)
        record = StoredResponse("resp_" + "1" * 32, "acct", [], {"id": "resp_" + "1" * 32})
        fresh = StoredResponse("resp_" + "2" * 32, "acct", [], {"id": "resp_" + "2" * 32})
        await store.save(record)
        await store.save(fresh)
        await platform.db.write(lambda connection: connection.execute(
            update(responses).where(responses.c.id == record.id).values(
                created_at=utcnow() - timedelta(days=2))))
        await platform.gate.start()
        for _ in range(100):
            if await store.load("acct", record.id) is None:
                break
            await asyncio.sleep(0.02)
        assert await store.load("acct", record.id) is None
        assert await store.load("acct", fresh.id) is not None
    scenario(backend, body, settings=PlatformConfig(usage_retention_days=1))
