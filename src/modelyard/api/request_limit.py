"""The server's limit of requests in flight, answered in SPEC.md's shape.

uvicorn's own `limit_concurrency` answers a plain-text 503 and counts idle keep-alive
connections too; this limit counts HTTP requests being answered and refuses the ones past
it with SPEC.md's 503 and `Retry-After`, before anything else runs (no key lookup, no body
read). uvicorn's limit stays behind it as a backstop for connections. `/health` and
`/metrics` are never refused: an overloaded server is still alive and still observable.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from modelyard.api.dialects import error_style
from modelyard.api.errors import APIError
from modelyard.api.routes import json_response

EXEMPT_PATHS = frozenset({"/health", "/metrics"})
RETRY_AFTER_SECONDS = 1


class RequestLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        """The most requests answered at once; 0: no limit."""
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.limit or scope["path"] in EXEMPT_PATHS:
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limit:
            error = APIError(503, f"the server is answering {self.limit} requests, its limit; "
                             "retry shortly", code="server_overloaded")
            status, body = error_style(scope["path"]).answer(error)
            response = json_response(body, status, {"Retry-After": str(RETRY_AFTER_SECONDS)})
            await response(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
