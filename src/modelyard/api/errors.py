"""Errors in SPEC.md's shape: `{"error": {"message", "type", "param", "code"}}`."""

from __future__ import annotations

import logging
import os
from typing import Any, Protocol

import orjson
from pydantic import ValidationError

from modelyard.errors import ModelyardError, Refusal

logger = logging.getLogger(__name__)

# pydantic error types that mean "a value out of range or inconsistent" (422); every
# other validation failure is about JSON types or missing fields (400).
_VALUE_ERROR_TYPES = frozenset({
    "greater_than", "greater_than_equal", "less_than", "less_than_equal", "multiple_of",
    "too_short", "too_long", "string_too_short", "string_too_long", "literal_error",
    "enum", "value_error", "finite_number", "string_pattern_mismatch",
})

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_balance",
    404: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    502: "server_error",
    503: "server_overloaded",
    504: "server_error",
}


class APIError(Refusal):
    """An error the API answers with; raised anywhere below the routes."""

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, param=self.param, code=self.code)


def as_api_error(exc: BaseException) -> APIError:
    """The one mapping from an exception to its answer: an exposed `ModelyardError` with
    its own status, message, param, code and headers; anything else (an internal error, a
    bug) as a 500 naming only a request id, logged with that id and its traceback."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ModelyardError) and exc.exposed:
        return APIError(exc.status, exc.message, param=exc.param, code=exc.code,
                        headers=exc.headers)
    request_id = os.urandom(16).hex()
    logger.error("request %s failed", request_id, exc_info=exc)
    return APIError(500, f"internal server error (request {request_id})", code="server_error")


class ErrorStyle(Protocol):
    """How an API dialect writes an error: SPEC.md's (OpenAI's) shape by default,
    Anthropic's on its paths (api/dialects.py says which path takes which)."""

    def answer(self, error: APIError) -> tuple[int, dict[str, Any]]:
        """The status and JSON body of an error answered before anything was sent."""
        ...

    def event(self, error: APIError) -> bytes:
        """The last bytes of a stream that fails after it started."""
        ...


class _OpenAIStyle:
    def answer(self, error: APIError) -> tuple[int, dict[str, Any]]:
        return error.status, error.body()

    def event(self, error: APIError) -> bytes:
        return b"data: " + orjson.dumps(error.body()) + b"\n\ndata: [DONE]\n\n"


OPENAI: ErrorStyle = _OpenAIStyle()
"""SPEC.md's shape: `{"error": {...}}`; a failed stream's last event, then `[DONE]`."""


def error_body(
    status: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


# Fields that are maps: an error in one of their values names the field, not the key.
_MAP_FIELDS = frozenset({"logit_bias"})


def _location(loc: tuple[int | str, ...]) -> str | None:
    if loc and loc[0] in _MAP_FIELDS:
        return str(loc[0])
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif (part in ("str", "int", "function-after", "function-before") or "[" in part
              or part.startswith("constrained-") or part[:1].isupper()):
            continue  # union-branch labels pydantic adds (types, model classes), not fields
        else:
            text += f".{part}" if text else part
    return text or None


def from_validation_error(exc: ValidationError) -> APIError:
    """Map the first pydantic error to a 400 (type / missing) or 422 (value) APIError."""
    errors = exc.errors(include_url=False)
    # A union such as `"auto" | {object}` reports both branches: for an object, the error
    # inside the object says more than "should be 'auto'".
    value_errors = sorted((e for e in errors if e["type"] in _VALUE_ERROR_TYPES),
                          key=lambda e: e["type"] == "literal_error"
                          and isinstance(e.get("input"), dict | list))
    first = value_errors[0] if value_errors else errors[0]
    status = 422 if value_errors else 400
    if first["type"] == "json_invalid":
        reason = str(first.get("ctx", {}).get("error", "")) or first["msg"]
        return APIError(400, f"the request body is not valid JSON: {reason[:200]}",
                        code="invalid_json")
    if first["type"] in ("model_type", "model_attributes_type") and not first["loc"]:
        return APIError(400, "the request body must be a JSON object", code="invalid_json")
    param = _location(tuple(first["loc"]))
    message = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        message = f"missing required field '{param}'"
    elif param:
        message = f"invalid value for '{param}': {message}"
    return APIError(status, message, param=param,
                    code="invalid_value" if status == 422 else "invalid_type")
