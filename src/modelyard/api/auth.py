"""Authentication as a plain ASGI middleware (no buffering of streamed bodies).

It asks the app's `Gate` who the caller is and puts the answer in the request state
(`request.state.caller`); a refusal is answered here in the error shape of the path's
dialect (api/dialects.py). The key comes as `Authorization: Bearer <key>` or, as
Anthropic's clients send it, `x-api-key: <key>` (the same keys; Authorization wins when
both are sent).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import orjson
from starlette.types import ASGIApp, Receive, Scope, Send

from modelyard.api.dialects import error_style
from modelyard.api.errors import as_api_error
from modelyard.platform.gate import Caller, Gate, PlatformError

OPEN_PATHS = frozenset({"/health", "/metrics"})
SessionCaller = Callable[[Gate, Scope], Awaitable[Caller | None]]
"""The caller of a request that carries no key but a console session (console/__init__)."""


class AuthMiddleware:
    def __init__(self, app: ASGIApp, gate: Gate, *,
                 own_auth: Callable[[str], bool] | None = None,
                 session_caller: SessionCaller | None = None) -> None:
        self.app = app
        self.gate = gate
        self.own_auth = own_auth
        """Paths that authenticate by themselves (the console's pages, by their cookie)."""
        self.session_caller = session_caller

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or (
                self.own_auth is not None and self.own_auth(scope["path"])):
            await self.app(scope, receive, send)
            return
        header: str | None = None
        api_key: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                header = value.decode("latin-1")
                break
            if name == b"x-api-key":
                api_key = value
        if header is None and api_key is not None:
            header = "Bearer " + api_key.decode("latin-1")
        try:
            caller = None
            if header is None and self.session_caller is not None:
                caller = await self.session_caller(self.gate, scope)
            if caller is None:
                caller = await self.gate.authenticate(header)
        except PlatformError as exc:
            error = as_api_error(exc)
            status, payload = error_style(scope["path"]).answer(error)
            body = orjson.dumps(payload)
            headers = [(b"content-type", b"application/json"),
                       (b"content-length", str(len(body)).encode()),
                       (b"www-authenticate", b"Bearer")]
            headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
            await send({"type": "http.response.start", "status": status,
                        "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)
