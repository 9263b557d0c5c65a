"""Bearer-key authentication as a plain ASGI middleware (no buffering of streamed bodies).

For now any non-empty Bearer key is accepted and a request without one is refused; the
key backend that checks keys against accounts plugs in here.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from modelyard.api.errors import error_body

OPEN_PATHS = frozenset({"/health", "/metrics"})


class BearerKeyMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value
                break
        if header[:7].lower() == b"bearer " and header[7:].strip():
            await self.app(scope, receive, send)
            return
        body = orjson.dumps(error_body(401, "missing API key: send 'Authorization: Bearer <key>'",
                                       code="invalid_api_key"))
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode()),
                                (b"www-authenticate", b"Bearer")]})
        await send({"type": "http.response.body", "body": body})
