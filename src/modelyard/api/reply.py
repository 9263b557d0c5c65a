"""The chat lane's side of the HTTP exchange as plain ASGI: reading the body (capped, with a
deadline) and answering with JSON or server-sent events.

Starlette's responses run a stream inside an anyio task group with a second task listening
for the client's disconnect; on the gateway's hot path that machinery cost more CPU than the
rest of the response. Here: one `send` per chunk, nothing buffered.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.types import Receive, Send

from modelyard.api.errors import OPENAI, APIError, ErrorStyle
from modelyard.api.responses import SSE_DONE

JSON = b"application/json"
MIN_BODY_CAP = 1024 * 1024
BODY_BYTES_PER_TOKEN = 16
"""Generous: a token of JSON text is 3-4 bytes, one escaped as \\uXXXX at most ~12."""


def body_cap(context_lengths: list[int]) -> int:
    """The largest body worth reading: the largest context served, at 16 bytes a token,
    plus 1 MiB for tools and schemas; at least 1 MiB."""
    largest = max(context_lengths, default=0)
    return max(MIN_BODY_CAP, largest * BODY_BYTES_PER_TOKEN + MIN_BODY_CAP)


async def read_body(receive: Receive, headers: list[tuple[bytes, bytes]], cap: int,
                    timeout_s: float) -> bytes:
    """The request body: a 413 past `cap` bytes (before reading any when Content-Length
    says so), a 408 when it has not all come within `timeout_s`."""
    for name, value in headers:
        if name == b"content-length" and value.isdigit() and int(value) > cap:
            raise _too_large(cap)
    try:
        async with asyncio.timeout(timeout_s):
            return await _read(receive, cap)
    except TimeoutError:
        raise APIError(408, f"the request body did not arrive within {timeout_s:g} s",
                       code="request_timeout") from None


async def _read(receive: Receive, cap: int) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise APIError(400, "the client closed the connection before sending its body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:
            raise _too_large(cap)
        parts.append(chunk)
        if not message.get("more_body", False):
            return parts[0] if len(parts) == 1 else b"".join(parts)


def _too_large(cap: int) -> APIError:
    return APIError(413, f"the request body exceeds {cap} bytes", code="request_too_large")


def _raw(headers: dict[str, str]) -> list[tuple[bytes, bytes]]:
    return [(name.lower().encode("latin-1"), value.encode("latin-1"))
            for name, value in headers.items()]


class Reply:
    """One response, sent once: a JSON body, or a stream of SSE chunks. `finished` turns
    true just before the last byte is handed over (a disconnect after it is no longer the
    client giving up). Errors are written in the `errors` style of the endpoint's dialect."""

    def __init__(self, send: Send, errors: ErrorStyle = OPENAI) -> None:
        self._send = send
        self.errors = errors
        self.started = False
        self.streaming = False
        self.finished = False

    async def json(self, body: dict[str, Any], status: int = 200,
                   headers: dict[str, str] | None = None) -> None:
        payload = orjson.dumps(body)
        raw = [(b"content-type", JSON), (b"content-length", str(len(payload)).encode())]
        if headers:
            raw += _raw(headers)
        self.started = True
        self.finished = True
        await self._send({"type": "http.response.start", "status": status, "headers": raw})
        await self._send({"type": "http.response.body", "body": payload})

    async def open_stream(self, headers: dict[str, str]) -> None:
        raw = [(b"content-type", b"text/event-stream; charset=utf-8"),
               (b"cache-control", b"no-cache"), *_raw(headers)]
        self.started = self.streaming = True
        await self._send({"type": "http.response.start", "status": 200, "headers": raw})

    async def chunk(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def close_stream(self, last: bytes = SSE_DONE) -> None:
        self.finished = True
        await self._send({"type": "http.response.body", "body": last, "more_body": False})

    async def error(self, error: APIError) -> None:
        """The error as a response, or, once a stream has started, as its last event."""
        if self.finished:
            return
        if not self.started:
            status, body = self.errors.answer(error)
            await self.json(body, status, error.headers)
        elif self.streaming:
            await self.close_stream(self.errors.event(error))
