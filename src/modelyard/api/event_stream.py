"""A server-sent-events response as a plain ASGI app.

Starlette's `StreamingResponse` runs every stream inside an anyio task group with a second
task listening for the client's disconnect; on the gateway's hot path that machinery cost
more CPU than the rest of the response. Here: one `send` per chunk, nothing buffered, and a
plain asyncio task waiting on `receive` that cancels the stream when the client goes away,
so the chunk generator's own cleanup (settlement, stopping the model) runs at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class EventStream(StreamingResponse):
    """`text/event-stream` from an async generator of ready-made SSE chunks."""

    def __init__(self, chunks: AsyncGenerator[bytes, None], headers: dict[str, str]) -> None:
        super().__init__(chunks, headers=headers, media_type="text/event-stream")
        self.chunks = chunks

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        client_gone = False
        finished = False

        async def watch() -> None:
            nonlocal client_gone
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    if not finished:
                        client_gone = True
                        task.cancel()
                    return

        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            async for chunk in self.chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finished = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not client_gone or task.uncancel() > 0:
                raise
        finally:
            finished = True
            watcher.cancel()
            await self.chunks.aclose()
