"""The server's limit of requests in flight: past it, SPEC.md's 503 before any work."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson

from modelyard.api.request_limit import RequestLimit


def _scope(path: str) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "path": path, "headers": [], "state": {}}


async def _no_body() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _call(app: RequestLimit, path: str) -> tuple[int, dict[bytes, bytes], bytes]:
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(_scope(path), _no_body, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], dict(start["headers"]), body


def test_requests_past_the_limit_get_a_503_in_spec_shape_and_exempt_paths_still_answer(
) -> None:
    async def scenario() -> None:
        release = asyncio.Event()
        entered = 0

        async def slow_app(scope: Any, receive: Any, send: Any) -> None:
            nonlocal entered
            entered += 1
            if scope["path"] != "/health":
                await release.wait()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"ok"})

        app = RequestLimit(slow_app, limit=2)
        held = [asyncio.ensure_future(_call(app, "/v1/chat/completions")) for _ in range(2)]
        while entered < 2:
            await asyncio.sleep(0)
        status, headers, body = await _call(app, "/v1/chat/completions")
        assert status == 503
        assert headers[b"retry-after"] == b"1"
        error = orjson.loads(body)["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "server_overloaded"
        assert entered == 2  # the refused request never reached the app
        assert (await _call(app, "/health"))[0] == 200  # liveness is never refused
        release.set()
        assert [(await h)[0] for h in held] == [200, 200]
        assert app.in_flight == 0
        assert (await _call(app, "/v1/models"))[0] == 200  # room again

    asyncio.run(scenario())


def test_a_limit_of_zero_is_no_limit() -> None:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    assert asyncio.run(_call(RequestLimit(app, limit=0), "/v1/models"))[0] == 204
