"""The chat lane (`api/lane.py`, `api/chat.py`) in front of FastAPI, driven in process with
the real app and a real SQLite ledger: bodies past the cap or too slow to arrive, other
methods, requests too slow to prepare, clients that go away, and unexpected failures all
end in SPEC.md's shape and a settled bill."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from starlette.types import ASGIApp, Message

from modelyard.api.app import create_app
from modelyard.api.preparation import Preparation
from modelyard.api.reply import body_cap
from modelyard.platform.usage import records
from modelyard.providers.base import ChatDelta, ChatRequest, PreparedChat
from tests.platform.harness import Backend, Harness, chat_scope, scenario


def _with_app(tmp_path: Path, body: Callable[[Harness], Awaitable[None]],
              **options: object) -> None:
    scenario(Backend(f"sqlite:///{tmp_path / 'platform.db'}"), body, **options)


def test_a_body_past_the_cap_is_refused_with_413(tmp_path: Path) -> None:
    async def body(platform: Harness) -> None:
        platform.state.max_body_bytes = 1000
        key = await platform.key("acme", 1000)
        response = await platform.chat(key, content="word " * 400)
        assert response.status_code == 413
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "request_too_large")

        async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: counted as read
            for _ in range(100):
                yield b" " * 100
        streamed = await platform.client.post("/v1/chat/completions", content=chunked(),
                                              headers={"Authorization": f"Bearer {key}"})
        assert streamed.status_code == 413
        assert (await platform.chat(key, content="short")).status_code == 200
    _with_app(tmp_path, body)


def test_the_body_cap_follows_the_largest_context_served() -> None:
    assert body_cap([]) == 1024 * 1024
    assert body_cap([4096, 131072]) == 131072 * 16 + 1024 * 1024


async def _asgi(app: ASGIApp, key: str, body: bytes | None, *,
                leave_after_s: float | None = None) -> tuple[int | None, bytes]:
    """POST /v1/chat/completions at the ASGI level: `body` None never sends one; with
    `leave_after_s` the client goes away that long after sending it. The status and body
    the server sent."""
    scope = chat_scope(key)
    sent = False
    status: int | None = None
    received = b""

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if body is not None and not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if body is None or leave_after_s is None:
            await asyncio.sleep(3600)
        await asyncio.sleep(leave_after_s or 0)
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        nonlocal status, received
        if message["type"] == "http.response.start":
            status = message["status"]
        else:
            received += message.get("body", b"")

    await app(scope, receive, send)
    return status, received


def test_a_body_that_trickles_in_is_refused_with_408(tmp_path: Path) -> None:
    async def body(platform: Harness) -> None:
        platform.state.body_timeout_s = 0.2
        key = await platform.key("acme", 1000)
        started = time.monotonic()
        status, sent = await _asgi(create_app(platform.state), key, None)
        assert status == 408 and time.monotonic() - started < 2
        error = json.loads(sent)["error"]
        assert (error["type"], error["code"]) == ("invalid_request_error", "request_timeout")
        assert platform.provider.started == 0
    _with_app(tmp_path, body)


def test_a_client_that_leaves_a_non_streamed_request_stops_it_and_pays_for_it(
        tmp_path: Path) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000)
        closed: list[int] = []
        original = platform.provider._answer

        async def tracked(prepared: PreparedChat[None]) -> AsyncGenerator[ChatDelta, None]:
            count = 0
            try:
                async for delta in original(prepared):
                    count = delta.usage.completion_tokens
                    yield delta
            finally:
                closed.append(count)
        platform.provider._answer = tracked  # type: ignore[method-assign]
        request = json.dumps({"model": "fake", "max_tokens": 200, "messages": [
            {"role": "user", "content": "one two three"}]}).encode()
        started = time.monotonic()
        status, _ = await _asgi(create_app(platform.state), key, request, leave_after_s=0.2)
        assert status is None  # nothing was sent to a client that had gone
        assert time.monotonic() - started < 1  # not the 2 s the whole answer takes
        assert len(closed) == 1 and 0 < closed[0] < 200  # the model stopped early
        await platform.settled()
        [row] = await records(platform.db)
        assert row.client_disconnected and row.status == 499
        assert row.usage.completion_tokens == closed[0]
        assert row.cost == 3 + 2 * closed[0]
        assert await platform.db_account("acme") == (1000 - row.cost, 0)
    _with_app(tmp_path, body, delay_s=0.01)


def test_a_request_too_slow_to_prepare_is_refused_and_settled(tmp_path: Path) -> None:
    async def body(platform: Harness) -> None:
        platform.state.preparation = Preparation(concurrency=1, timeout_s=0.3)
        key = await platform.key("acme", 1000)
        original = platform.provider.prepare_chat

        async def slow(request: ChatRequest) -> PreparedChat:
            time.sleep(1)  # CPU work in the worker thread, not on the event loop
            return await original(request)
        platform.provider.prepare_chat = slow  # type: ignore[method-assign]
        tool = {"type": "function", "function": {"name": "f", "parameters": {
            "type": "object", "properties": {}}}}
        started = time.monotonic()
        slow_one, health = await asyncio.gather(
            platform.chat(key, tools=[tool]), _health_after(platform, 0.05))
        assert health < 0.5  # the event loop stayed free
        assert slow_one.status_code == 422
        assert slow_one.json()["error"]["code"] == "preparation_timeout"
        assert time.monotonic() - started < 1
        queued = await platform.chat(key, tools=[tool])  # the worker is still busy
        assert queued.status_code in (422, 503)
        await platform.settled()
        assert await platform.db_account("acme") == (1000, 0)
        platform.state.preparation.close()
    _with_app(tmp_path, body)


async def _health_after(platform: Harness, delay_s: float) -> float:
    await asyncio.sleep(delay_s)
    started = time.monotonic()
    assert (await platform.client.get("/health")).status_code == 200
    return time.monotonic() - started


def test_other_methods_on_the_chat_path_reach_fastapi(tmp_path: Path) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000)
        auth = {"Authorization": f"Bearer {key}"}
        response = await platform.client.get("/v1/chat/completions", headers=auth)
        assert response.status_code == 405
        unknown = await platform.client.get("/v1/no-such-thing", headers=auth)
        assert unknown.status_code == 404
        denied = await platform.client.get("/admin/accounts", headers=auth)
        assert denied.status_code == 403
        for refused in (response, unknown, denied):
            error = refused.json()["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert error["type"] == "invalid_request_error"
    _with_app(tmp_path, body)


def test_an_unexpected_failure_is_a_500_without_a_stack_trace(tmp_path: Path) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000)

        async def broken(request: ChatRequest) -> PreparedChat:
            raise RuntimeError("secret internals")
        platform.provider.prepare_chat = broken  # type: ignore[method-assign]
        response = await platform.chat(key)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "server_error" and "secret" not in error["message"]
        assert "Traceback" not in response.text
    _with_app(tmp_path, body)
