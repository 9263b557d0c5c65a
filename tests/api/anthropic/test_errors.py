"""SPEC.md's errors in Anthropic's shape, statuses and types."""

from __future__ import annotations

import orjson
import pytest

from modelyard.api.anthropic.errors import ANTHROPIC
from modelyard.api.dialects import error_style
from modelyard.api.errors import OPENAI, APIError


@pytest.mark.parametrize(("status", "answered", "kind"), [
    (400, 400, "invalid_request_error"), (422, 400, "invalid_request_error"),
    (401, 401, "authentication_error"), (402, 402, "billing_error"),
    (403, 403, "permission_error"), (404, 404, "not_found_error"),
    (408, 408, "timeout_error"), (413, 413, "request_too_large"),
    (429, 429, "rate_limit_error"), (500, 500, "api_error"), (502, 502, "api_error"),
    (503, 529, "overloaded_error"), (504, 504, "timeout_error"),
])
def test_statuses_and_types(status: int, answered: int, kind: str) -> None:
    answer = ANTHROPIC.answer(APIError(status, "went wrong", param="messages"))
    assert answer == (answered, {"type": "error", "error": {
        "type": kind, "message": "messages: went wrong"}})


def test_a_failed_stream_ends_with_an_error_event() -> None:
    last = ANTHROPIC.event(APIError(503, "busy"))
    assert last.startswith(b"event: error\ndata: ")
    assert orjson.loads(last.split(b"data: ", 1)[1]) == {
        "type": "error", "error": {"type": "overloaded_error", "message": "busy"}}


def test_paths_pick_their_dialect() -> None:
    assert error_style("/v1/messages") is ANTHROPIC
    assert error_style("/v1/messages/count_tokens") is ANTHROPIC
    assert error_style("/v1/chat/completions") is OPENAI
    assert OPENAI.event(APIError(500, "x")).endswith(b"data: [DONE]\n\n")
