"""/v1/messages on the real app and accounts gate (the fake model): keys by x-api-key, every
error from the key check to a failure mid-stream in Anthropic's shape, the bill."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import orjson

from modelyard.api.anthropic.errors import anthropic_error_body
from modelyard.api.request_limit import RequestLimit
from modelyard.platform.usage import records
from modelyard.providers.base import ChatDelta, ChatStream, DeltaStream, PreparedChat
from modelyard.usage import Usage
from tests.platform.harness import Backend, Harness, scenario

BODY: dict[str, Any] = {"model": "fake", "max_tokens": 4,
                        "messages": [{"role": "user", "content": "one two three"}]}


def _with_app(tmp_path: Path, body: Callable[[Harness], Awaitable[None]]) -> None:
    scenario(Backend(f"sqlite:///{tmp_path / 'platform.db'}"), body)


async def _post(platform: Harness, key: str | None, body: Any = None,
                path: str = "/v1/messages", **headers: str) -> httpx.Response:
    if key is not None:
        headers["x-api-key"] = key
    return await platform.client.post(path, headers={"anthropic-version": "2023-06-01",
                                                     **headers},
                                      content=orjson.dumps(BODY if body is None else body))


def _error(response: httpx.Response, status: int, kind: str) -> str:
    assert response.status_code == status, response.text
    payload = response.json()
    assert payload == {"type": "error", "error": {"type": kind,
                                                  "message": payload["error"]["message"]}}
    message: str = payload["error"]["message"]
    return message


def test_an_answer_by_x_api_key_is_billed(tmp_path: Path) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000)
        response = await _post(platform, key, anthropic_beta="x")
        assert response.status_code == 200
        message = response.json()
        assert message["content"] == [{"type": "text", "text": "toktoktoktok"}]
        assert message["stop_reason"] == "max_tokens"
        assert message["usage"]["input_tokens"] == 3 and message["usage"]["output_tokens"] == 4
        bearer = await platform.client.post("/v1/messages", json=BODY,
                                            headers={"Authorization": f"Bearer {key}"})
        assert bearer.status_code == 200
        await platform.settled()
        rows = await records(platform.db, account="acme")
        assert len(rows) == 2 and {row.usage.completion_tokens for row in rows} == {4}
        assert {row.status for row in rows} == {200}
    _with_app(tmp_path, body)


def test_errors_before_the_endpoint_are_anthropics(tmp_path: Path) -> None:
    async def body(platform: Harness) -> None:
        _error(await _post(platform, None), 401, "authentication_error")
        _error(await _post(platform, "sk-wrong"), 401, "authentication_error")
        broke = await platform.key("broke", 0)
        _error(await _post(platform, broke), 402, "billing_error")
        key = await platform.key("acme", 1000, rpm=1)
        assert (await _post(platform, key)).status_code == 200
        limited = await _post(platform, key)
        _error(limited, 429, "rate_limit_error")
        assert limited.headers["retry-after"]
        other = await platform.key("other", 1000)
        platform.state.max_body_bytes = 100
        _error(await _post(platform, other, {**BODY, "system": "x" * 200}), 413,
               "request_too_large")
        platform.state.max_body_bytes = 1 << 20
        _error(await _post(platform, other, {**BODY, "model": "nope"}), 404, "not_found_error")
        bad = await _post(platform, other, {**BODY, "max_tokens": 0})
        assert "max_tokens" in _error(bad, 400, "invalid_request_error")
        _error(await platform.client.get("/v1/messages", headers={"x-api-key": other}), 405,
               "invalid_request_error")
        counted = await _post(platform, other, BODY, "/v1/messages/count_tokens")
        assert "tokenizer" in _error(counted, 400, "invalid_request_error")
        # the chat route keeps SPEC.md's shape
        chat = await platform.chat(other, model="nope")
        assert chat.status_code == 404 and set(chat.json()) == {"error"}
    _with_app(tmp_path, body)


def test_a_failure_mid_stream_is_an_error_event(tmp_path: Path) -> None:
    async def body(platform: Harness) -> None:
        async def failing(prepared: PreparedChat[None]) -> ChatStream:
            async def deltas() -> AsyncGenerator[ChatDelta, None]:
                yield ChatDelta("tok", Usage(3, completion_tokens=1))
                raise RuntimeError("the engine broke")
            return DeltaStream(deltas())

        platform.provider.start_chat = failing  # type: ignore[method-assign]
        key = await platform.key("acme", 1000)
        response = await _post(platform, key, {**BODY, "stream": True})
        assert response.status_code == 200
        blocks = response.text.strip().split("\n\n")
        assert blocks[0].startswith("event: message_start")
        name, data = blocks[-1].split("\n")
        assert name == "event: error"
        error = orjson.loads(data.removeprefix("data: "))
        assert error["type"] == "error" and error["error"]["type"] == "api_error"
        assert "the engine broke" not in error["error"]["message"]
    _with_app(tmp_path, body)


def test_the_request_limit_answers_anthropics_overload() -> None:
    async def scenario_() -> None:
        release = asyncio.Event()

        async def slow(scope: Any, receive: Any, send: Any) -> None:
            await release.wait()

        app = RequestLimit(slow, limit=1)
        held = asyncio.ensure_future(app({"type": "http", "path": "/v1/messages"}, None, None))
        await asyncio.sleep(0)
        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/messages", "headers": []}
        await app(scope, None, send)  # type: ignore[arg-type]
        assert sent[0]["status"] == 529
        assert (b"retry-after", b"1") in sent[0]["headers"]
        body = orjson.loads(sent[1]["body"])
        assert body == anthropic_error_body(529, body["error"]["message"])
        assert body["error"]["type"] == "overloaded_error"
        release.set()
        await held
    asyncio.run(scenario_())
