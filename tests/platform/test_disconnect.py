"""A client that goes away mid-stream is billed for exactly the tokens it was sent.

Driven at the ASGI level, so the test knows exactly which chunks were handed to the
client before it went away.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from fastapi import FastAPI

from modelyard.api.app import create_app
from modelyard.platform.usage import records
from tests.platform.harness import Backend, Harness, chat_scope, harness


async def stream_then_leave(app: FastAPI, key: str, leave_after: int) -> int:
    """POST a streaming request; disconnect once `leave_after` tokens were sent. Returns
    the number of content tokens the server sent."""
    body = json.dumps({"model": "fake", "stream": True, "max_tokens": 50,
                       "messages": [{"role": "user", "content": "one two three"}]}).encode()
    scope = chat_scope(key)
    gone = asyncio.Event()
    sent_tokens = 0
    requested = False

    async def receive() -> dict[str, Any]:
        nonlocal requested
        if not requested:
            requested = True
            return {"type": "http.request", "body": body, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        nonlocal sent_tokens
        if message["type"] != "http.response.body":
            assert message["status"] == 200
            return
        for line in message.get("body", b"").decode().splitlines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    sent_tokens += 1
        if sent_tokens >= leave_after:
            gone.set()

    await app(scope, receive, send)
    return sent_tokens


def test_a_client_that_leaves_mid_stream_pays_for_what_it_was_sent(backend: Backend) -> None:
    async def main() -> None:
        async with harness(backend, delay_s=0.005) as platform:
            await check(platform)

    async def check(platform: Harness) -> None:
        key = await platform.key("acme", 1000)
        app = create_app(platform.state)
        for leave_after in (1, 7, 20):
            sent = await stream_then_leave(app, key, leave_after)
            assert sent == leave_after
            await platform.settled()
            row = (await records(platform.db, limit=1))[0]
            assert row.client_disconnected
            assert row.usage.completion_tokens == sent
            assert row.cost == 3 * 1 + sent * 2
            assert row.reserved == 3 + 50 * 2
        account = await platform.db_account("acme")
        assert account == (1000 - (3 * 3 + 28 * 2), 0)

    asyncio.run(main())
