"""Errors in Anthropic's shape: `{"type": "error", "error": {"type", "message"}}`, with
Anthropic's types and statuses.

The statuses Anthropic documents keep their number (400, 401, 402 `billing_error`, 403,
404, 413 `request_too_large`, 429 with `retry-after`, 500, 504); a 422 (a value out of
range, as SPEC.md words it) is Anthropic's 400 `invalid_request_error`, and an overload
(SPEC.md's 503) is Anthropic's 529 `overloaded_error`, which its SDKs retry.
"""

from __future__ import annotations

from typing import Any

import orjson

from modelyard.api.errors import APIError, ErrorStyle

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}

_STATUSES = {422: 400, 503: 529}
"""SPEC.md's statuses that Anthropic's API spells otherwise."""


def anthropic_status(status: int) -> int:
    return _STATUSES.get(status, status)


def error_type(status: int) -> str:
    """Anthropic's error type for an (Anthropic) status."""
    return _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_error_body(status: int, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


class _AnthropicStyle:
    def answer(self, error: APIError) -> tuple[int, dict[str, Any]]:
        status = anthropic_status(error.status)
        return status, anthropic_error_body(status, _message(error))

    def event(self, error: APIError) -> bytes:
        body = anthropic_error_body(anthropic_status(error.status), _message(error))
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"


def _message(error: APIError) -> str:
    # Anthropic's error has no `param`: the field goes into the message, if not there.
    if error.param and error.param not in error.message:
        return f"{error.param}: {error.message}"
    return error.message


ANTHROPIC: ErrorStyle = _AnthropicStyle()
