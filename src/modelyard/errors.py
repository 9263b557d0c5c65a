"""The one base of modelyard's errors, with what the HTTP edge needs to answer one.

Every layer raises its own subclass of `ModelyardError` (this module imports nothing of
modelyard's, so any layer may import it); `modelyard.api.errors.as_api_error` is the one
place that turns any exception into an answer in SPEC.md's shape. An error whose message is
`exposed` (a refusal worded for the client: a 4xx, an overload, a failure modelyard
describes itself) is answered with its status, message, param, code and headers; any other
(an internal failure, whose message may name files, addresses or upstreams, or an
exception that is no `ModelyardError` at all: a bug) is answered as a 500 that names only
a request id, its message going to the log.
"""

from __future__ import annotations

from collections.abc import Mapping


class ModelyardError(Exception):
    """An error of modelyard's; internal (a 500 with a message for the log) unless a
    subclass or the raiser says its message may be shown."""

    status: int = 500
    code: str | None = None
    exposed: bool = False
    """Whether `message` may be shown to the client (else only the log reads it)."""

    def __init__(self, message: str = "", *, status: int | None = None,
                 param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None,
                 exposed: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = self.status if status is None else status
        self.param = param
        self.code = self.code if code is None else code
        self.headers: dict[str, str] = dict(headers or {})
        self.exposed = self.exposed if exposed is None else exposed


class Refusal(ModelyardError):
    """An answer in SPEC.md's terms, worded for the client (401, 402, 404, 422, 429, 503
    with Retry-After, ...)."""

    exposed = True

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message, status=status, param=param, code=code, headers=headers)
