"""Authentication as a plain ASGI middleware (no buffering of streamed bodies).

It asks the app's `Gate` who the caller is and puts the answer in the request state
(`request.state.caller`); a refusal is answered here in SPEC.md's error shape.
"""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from modelyard.api.errors import as_api_error
from modelyard.platform.gate import Gate, PlatformError

OPEN_PATHS = frozenset({"/health", "/metrics"})


class AuthMiddleware:
    def __init__(self, app: ASGIApp, gate: Gate) -> None:
        self.app = app
        self.gate = gate

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        header: str | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value.decode("latin-1")
                break
        try:
            caller = await self.gate.authenticate(header)
        except PlatformError as exc:
            error = as_api_error(exc)
            body = orjson.dumps(error.body())
            headers = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode()),
                       (b"www-authenticate", b"Bearer")]
            headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
            await send({"type": "http.response.start", "status": error.status,
                        "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)
