"""The Messages request onto ChatRequest, and finish reasons, stops and usage back."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from modelyard.api.anthropic.schema import MessagesRequest
from modelyard.api.anthropic.translate import (
    anthropic_usage,
    split_stop,
    stop_reason,
    to_chat_request,
    tool_input,
)
from modelyard.providers.base import ChatRequest
from modelyard.sampling import Sampling
from modelyard.usage import Usage

TOOL = {"name": "get_weather", "description": "Weather.", "cache_control": {"type": "ephemeral"},
        "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}


def _request(report_stop: bool = True, **fields: Any) -> ChatRequest:
    body = {"model": "m", "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}],
            **fields}
    payload = MessagesRequest.model_validate_json(orjson.dumps(body))
    return to_chat_request(payload, "msg_1", "acct", report_stop)


def test_fields_map_onto_the_chat_core() -> None:
    request = _request(system=[{"type": "text", "text": "Be brief.",
                                "cache_control": {"type": "ephemeral"}},
                               {"type": "text", "text": "Be kind."}],
                       max_tokens=4096, temperature=0.5, top_p=0.9, top_k=40,
                       stop_sequences=["END"],
                       metadata={"user_id": "u-1"}, stream=True,
                       thinking={"type": "enabled", "budget_tokens": 2048},
                       tools=[TOOL], tool_choice={"type": "any",
                                                  "disable_parallel_tool_use": True})
    assert request.messages == [{"role": "system", "content": "Be brief.\nBe kind."},
                                {"role": "user", "content": "hi"}]
    assert request.max_tokens == 4096 and request.stream and request.n == 1
    assert request.sampling == Sampling(temperature=0.5, top_p=0.9, top_k=40)
    assert request.stop == ("END",) and request.include_stop_str_in_output
    assert request.enable_thinking is True and request.thinking_budget == 2048
    assert request.tools == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather.",
        "parameters": TOOL["input_schema"]}}]
    assert request.tool_choice == "required" and request.parallel_tool_calls is False
    assert request.cache_scope == "acct" and request.request_id == "msg_1"


def test_an_upstream_is_not_asked_for_the_stop_string() -> None:
    assert not _request(report_stop=False, stop_sequences=["END"]).include_stop_str_in_output
    assert not _request().include_stop_str_in_output  # no stop sequences


@pytest.mark.parametrize(("choice", "expected", "parallel"), [
    ({"type": "auto"}, "auto", True),
    ({"type": "any"}, "required", True),
    ({"type": "none"}, "none", True),
    ({"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
     {"type": "function", "function": {"name": "get_weather"}}, False),
])
def test_tool_choice(choice: dict[str, Any], expected: Any, parallel: bool) -> None:
    request = _request(tools=[TOOL], tool_choice=choice)
    assert request.tool_choice == expected and request.parallel_tool_calls is parallel


def test_thinking_disabled_adaptive_and_output_config() -> None:
    assert _request(thinking={"type": "disabled"}).enable_thinking is False
    adaptive = _request(thinking={"type": "adaptive"})
    assert adaptive.enable_thinking is True and adaptive.thinking_budget is None
    assert _request().enable_thinking is None  # the model's default
    shaped = _request(output_config={"effort": "max", "format": {
        "type": "json_schema", "schema": {"type": "object"}}})
    assert shaped.reasoning_effort == "high"
    assert shaped.response_format == {"type": "json_schema", "json_schema": {
        "name": "output", "schema": {"type": "object"}, "strict": True}}


def test_a_tool_round_trip_becomes_tool_calls_and_tool_messages() -> None:
    request = _request(messages=[
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
        {"role": "assistant", "content": [
            {"type": "thinking", "thinking": "use the tool", "signature": "sig"},
            {"type": "redacted_thinking", "data": "xyz"},
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Oslo"}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1",
             "content": [{"type": "text", "text": "Sunny"}]},
            {"type": "tool_result", "tool_use_id": "toolu_2", "content": "timeout",
             "is_error": True},
            {"type": "text", "text": "And tomorrow?"}]}])
    assert request.messages == [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "toolu_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: timeout"},
        {"role": "user", "content": "And tomorrow?"}]


def test_stops_finish_reasons_and_usage() -> None:
    assert split_stop("1, 2, 3, 4, 5", ("5", "4, 5")) == ("1, 2, 3, ", "4, 5")
    assert split_stop("no stop", ("5",)) == ("no stop", None)
    assert split_stop("ends with 5", ()) == ("ends with 5", None)
    assert stop_reason("stop", "5") == "stop_sequence"
    assert [stop_reason(r, None) for r in ("stop", "length", "tool_calls", "content_filter",
                                            None)] == [
        "end_turn", "max_tokens", "tool_use", "refusal", "end_turn"]
    assert anthropic_usage(Usage(100, 60, 7, 2)) == {
        "input_tokens": 40, "output_tokens": 7, "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 60}


def test_tool_input_keeps_what_is_not_an_object() -> None:
    assert tool_input('{"city": "Oslo"}') == {"city": "Oslo"}
    assert tool_input("") == {}
    assert tool_input("[1, 2]") == {"arguments": [1, 2]}
    assert tool_input("{broken") == {"arguments": "{broken"}
