"""The Responses request: its validation (hostile input included) and its translation onto
the chat core's `ChatRequest`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from modelyard.api import bounds
from modelyard.api.errors import APIError
from modelyard.api.responses_api.endpoint import _parse
from modelyard.api.responses_api.translate import (
    conversation,
    item_dicts,
    stored_items,
    to_chat_request,
)

TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        "strict": True}


def _request(**fields: Any) -> Any:
    return _parse(json.dumps({"model": "m", **fields}).encode())


def _chat(**fields: Any) -> Any:
    payload = _request(**fields)
    return to_chat_request(payload, conversation([], payload), "resp_x", "acct")


def _refused(status: int, param: str, **fields: Any) -> None:
    with pytest.raises(APIError) as caught:
        _chat(**fields)
    assert (caught.value.status, caught.value.param) == (status, param), caught.value.message


def test_a_string_input_is_one_user_message_after_the_instructions() -> None:
    chat = _chat(input="hi", instructions="be brief", max_output_tokens=20,
                 temperature=0.5, top_p=0.9, user="u1")
    assert chat.messages == [{"role": "system", "content": "be brief"},
                             {"role": "user", "content": "hi"}]
    assert chat.max_tokens == 20
    assert (chat.sampling.temperature, chat.sampling.top_p) == (0.5, 0.9)
    assert chat.cache_scope == "acct" and chat.request_id == "resp_x"


def test_items_become_chat_messages() -> None:
    chat = _chat(input=[
        {"role": "developer", "content": "rules"},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "weather "},
                     {"type": "input_text", "text": "in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "call the tool"}]},
        {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
         "content": [{"type": "output_text", "text": "Let me look.", "annotations": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "get_weather",
         "arguments": "{\"city\":\"Paris\"}", "status": "completed"},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather",
         "arguments": "{\"city\":\"Lyon\"}"},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_2",
         "output": [{"type": "input_text", "text": "rain"}]},
    ], tools=[TOOL])
    assert chat.messages == [
        {"role": "developer", "content": "rules"},
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Lyon\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
    ]


def test_a_function_call_without_an_assistant_message_opens_one() -> None:
    chat = _chat(input=[{"role": "user", "content": "x"},
                        {"type": "function_call", "call_id": "c", "name": "f",
                         "arguments": "{}"}])
    assert chat.messages[-1] == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


def test_tools_choice_and_formats() -> None:
    chat = _chat(input="x", tools=[TOOL], tool_choice={"type": "function",
                                                       "name": "get_weather"},
                 parallel_tool_calls=False,
                 text={"format": {"type": "json_schema", "name": "w",
                                  "schema": {"type": "object"}, "strict": True}},
                 reasoning={"effort": "xhigh", "summary": "auto"})
    assert chat.tools == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather in a city",
        "parameters": TOOL["parameters"], "strict": True}}]
    assert chat.tool_choice == {"type": "function", "function": {"name": "get_weather"}}
    assert chat.parallel_tool_calls is False
    assert chat.response_format == {"type": "json_schema", "json_schema": {
        "name": "w", "schema": {"type": "object"}, "strict": True}}
    assert chat.reasoning_effort == "high"
    assert _chat(input="x", text={"format": {"type": "json_object"}}).response_format == {
        "type": "json_object"}
    assert _chat(input="x", text={"format": {"type": "text"}}).response_format is None
    assert _chat(input="x", tools=[TOOL], tool_choice="required").tool_choice == "required"


def test_a_previous_conversation_comes_first_and_round_trips_through_storage() -> None:
    first = _request(input=[{"role": "user", "content": "hi"}], instructions="old rules")
    output = [{"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
               "content": [{"type": "output_text", "text": "hello", "annotations": [],
                            "logprobs": []}]},
              {"id": "fc_1", "type": "function_call", "call_id": "call_1", "name": "f",
               "arguments": "{}", "status": "completed"},
              {"id": "rs_1", "type": "reasoning", "summary": [], "status": "completed",
               "content": [{"type": "reasoning_text", "text": "hmm"}]}]
    stored = item_dicts(conversation([], first))
    previous = stored_items([*stored, *output])
    second = _request(input=[{"type": "function_call_output", "call_id": "call_1",
                              "output": "42"}], instructions="new rules")
    chat = to_chat_request(second, conversation(previous, second), "resp_y", None)
    assert chat.messages == [
        {"role": "system", "content": "new rules"},  # instructions are not carried over
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f",
                                                             "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    # what is stored holds only the fields the caps counted
    assert item_dicts(previous)[1] == {"type": "message", "role": "assistant",
                                       "content": [{"type": "output_text", "text": "hello"}]}


@pytest.mark.parametrize(("fields", "status", "param"), [
    ({"input": "x", "temperature": "1"}, 400, "temperature"),
    ({"input": "x", "temperature": 2.5}, 422, "temperature"),
    ({"input": "x", "max_output_tokens": 0}, 422, "max_output_tokens"),
    ({"input": 5}, 400, "input"),
    ({"input": [{"type": "message", "role": "robot", "content": "x"}]}, 422, "input[0].role"),
    ({"input": [{"type": "nonsense"}]}, 422, "input[0].type"),
    ({"input": [{"content": "no role nor type"}]}, 400, "input[0]"),
    ({"input": [{"type": "item_reference", "id": "x"}]}, 422, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     422, "input[0].content"),
    ({"input": "x", "tools": [{"type": "file_search"}]}, 422, "tools[0].type"),
    ({"input": "x", "tools": [dict(TOOL, name="bad name")]}, 422, "tools[0].name"),
    ({"input": "x", "tools": [TOOL] * (bounds.MAX_TOOLS + 1)}, 422, "tools"),
    ({"input": "x", "tools": [TOOL], "tool_choice": {"type": "function", "name": "other"}},
     422, "tool_choice"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "n"}}}, 422,
     "text.format.schema"),
    ({"input": "x", "text": {"format": {"type": "yaml"}}}, 422, "text.format.type"),
    ({"input": "x", "reasoning": {"effort": "max"}}, 422, "reasoning.effort"),
    ({"input": "x", "metadata": {"k" * 65: "v"}}, 422, "metadata"),
    ({"input": "x", "metadata": {"k": "v" * 513}}, 422, "metadata"),
    ({"input": "x", "metadata": {"k": 1}}, 422, "metadata"),
    ({"input": "x", "user": "a\nb"}, 422, "user"),
    ({"input": "x", "previous_response_id": "r" * 65}, 422, "previous_response_id"),
    ({"input": "x", "tools": [dict(TOOL, parameters={"a": 2**70})]}, 422, "tools"),
    ({"input": [{"role": "user", "content": "x"}] * (bounds.MAX_MESSAGES + 1)}, 422, "input"),
    ({"input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}] * 300}]},
     422, "input[0].content"),
    ({"input": "x", "instructions": "y" * (bounds.MAX_TOTAL_CHARS + 1)}, 422, "input"),
    ({"input": []}, 422, "input"),
])
def test_refusals(fields: dict[str, Any], status: int, param: str) -> None:
    _refused(status, param, **fields)


def test_deep_schemas_are_refused() -> None:
    deep: dict[str, Any] = {"type": "object"}
    for _ in range(bounds.MAX_SCHEMA_DEPTH + 2):
        deep = {"type": "object", "properties": {"a": deep}}
    _refused(422, "text.format.schema", input="x",
             text={"format": {"type": "json_schema", "name": "n", "schema": deep}})


def test_a_long_conversation_with_its_previous_items_is_refused() -> None:
    payload = _request(input="x" * 1000)
    previous = stored_items([{"type": "message", "role": "user",
                              "content": [{"type": "input_text",
                                           "text": "y" * bounds.MAX_TOTAL_CHARS}]}])
    with pytest.raises(APIError) as caught:
        conversation(previous, payload)
    assert caught.value.status == 422


def test_unknown_fields_are_accepted() -> None:
    chat = _chat(input="x", include=["reasoning.encrypted_content"], truncation="auto",
                 service_tier="auto", prompt_cache_key="k")
    assert chat.messages == [{"role": "user", "content": "x"}]
