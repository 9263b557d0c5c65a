"""Hostile and invalid Messages requests: each a 400 (Anthropic has no 422) naming its field."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from modelyard.api import bounds
from modelyard.api.anthropic.errors import ANTHROPIC
from modelyard.api.anthropic.schema import MessagesRequest
from modelyard.api.errors import APIError, from_validation_error

BASE: dict[str, Any] = {"model": "m", "max_tokens": 10,
                        "messages": [{"role": "user", "content": "hi"}]}


def _refusal(body: dict[str, Any] | bytes) -> tuple[int, str]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        MessagesRequest.model_validate_json(raw)
    except ValidationError as exc:
        error = from_validation_error(exc)
    except APIError as exc:
        error = exc
    else:
        raise AssertionError("accepted")
    status, answer = ANTHROPIC.answer(error)
    assert answer["type"] == "error" and set(answer["error"]) == {"type", "message"}
    assert answer["error"]["type"] == "invalid_request_error"
    return status, answer["error"]["message"]


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


@pytest.mark.parametrize(("change", "named"), [
    ({"tools": [{"name": "f", "input_schema": {"type": "object", "maximum": 2**64}}]},
     "tools"),
    ({"extra": [2**70]}, "extra"),
    ({"max_tokens": None}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "10"}, "max_tokens"),
    ({"temperature": 1.5}, "temperature"),
    ({"top_k": -1}, "top_k"),
    ({"model": "a\x00b"}, "model"),
    ({"model": "m" * (bounds.MAX_ID_CHARS + 1)}, "model"),
    ({"stop_sequences": ["a"] * (bounds.MAX_STOP_STRINGS + 1)}, "stop_sequences"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "system", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": "x"}] * (bounds.MAX_MESSAGES + 1)}, "messages"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * (
        bounds.MAX_TEXT_PARTS + 1)}]}, "content"),
    ({"messages": [{"role": "user", "content": "x" * (bounds.MAX_MESSAGE_CHARS + 1)}]},
     "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]}, "image"),
    ({"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                                 "content": [{"type": "image"}]}]}]}, "image"),
    ({"messages": [{"role": "user", "content": [{"type": "server_tool_use"}]}]}, "content"),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t\n1", "name": "f", "input": {}}]}]}, "id"),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": _nested(80)}]}]}, "input"),
    ({"messages": [{"role": "assistant", "content": [
        {"type": "tool_use", "id": "t", "name": "f", "input": {"n": 2**70}}]}]}, "input"),
    ({"tools": [{"name": "f", "input_schema": _nested(80)}]}, "input_schema"),
    ({"tools": [{"name": "bad name", "input_schema": {}}]}, "name"),
    ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "type"),
    ({"tools": [{"name": "f", "input_schema": {}}] * (bounds.MAX_TOOLS + 1)}, "tools"),
    ({"tool_choice": {"type": "tool"}}, "tool_choice"),
    ({"tools": [{"name": "f", "input_schema": {}}],
      "tool_choice": {"type": "tool", "name": "g"}}, "tool_choice"),
    ({"thinking": {"type": "enabled", "budget_tokens": 100}}, "budget_tokens"),
    ({"max_tokens": 2000, "thinking": {"type": "enabled", "budget_tokens": 4000}},
     "budget_tokens"),
    ({"metadata": {"user_id": "x\x1b"}}, "user_id"),
    ({"system": [{"type": "text", "text": "x" * bounds.MAX_MESSAGE_CHARS}] * 2}, "system"),
])
def test_refused_with_a_400_naming_the_field(change: dict[str, Any], named: str) -> None:
    body = {**BASE, **change}
    body = {k: v for k, v in body.items() if v is not None}
    status, message = _refusal(body)
    assert status == 400
    assert named in message


def test_not_json_and_not_an_object() -> None:
    assert _refusal(b"{not json")[0] == 400
    assert _refusal(b"[1]")[0] == 400


def test_cache_control_and_unknown_fields_are_accepted() -> None:
    MessagesRequest.model_validate_json(orjson.dumps({
        **BASE, "service_tier": "auto", "cache_control": {"type": "ephemeral"},
        "system": [{"type": "text", "text": "s", "cache_control": {"type": "ephemeral"}}],
        "messages": [{"role": "user", "content": [
            {"type": "text", "text": "hi",
             "cache_control": {"type": "ephemeral", "ttl": "1h"}}]}]}))
