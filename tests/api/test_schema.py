"""Request validation: raw bytes in, the SPEC.md status, param and code out."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from modelyard.api.errors import APIError, error_body, from_validation_error
from modelyard.api.schema import ChatCompletionRequest

MESSAGES = [{"role": "user", "content": "hi"}]


def body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", "messages": MESSAGES, **fields}).encode()


def parse(raw: bytes) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate_json(raw)


def error_for(raw: bytes) -> APIError:
    """The APIError a route would answer with for this body."""
    try:
        request = parse(raw)
    except ValidationError as exc:
        return from_validation_error(exc)
    except APIError as exc:
        return exc
    raise AssertionError(f"the request was accepted: {request!r}")


# -- 400: not JSON, not an object, wrong types, missing fields -------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "not valid JSON"),
        (b'{"model": "m", "messages": [', "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'[{"model": "m", "messages": []}]', "must be a JSON object"),
        (b'"a string"', "must be a JSON object"),
        (b"42", "must be a JSON object"),
        (b"null", "must be a JSON object"),
    ],
)
def test_body_that_is_not_a_json_object_is_400(raw: bytes, message: str) -> None:
    error = error_for(raw)
    assert (error.status, error.code, error.param) == (400, "invalid_json", None)
    assert message in error.message


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "0.5"}, "temperature"),
        ({"top_p": "1"}, "top_p"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": 5.5}, "max_tokens"),
        ({"seed": 1.5}, "seed"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"n": True}, "n"),
        ({"stop": 5}, "stop"),
        ({"stop": [1, 2]}, "stop"),
        ({"model": 5}, "model"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ],
)
def test_wrong_type_is_400_naming_the_param(fields: dict[str, Any], param: str) -> None:
    error = error_for(body(**fields))
    assert (error.status, error.param, error.code) == (400, param, "invalid_type")
    assert f"'{param}'" in error.message


@pytest.mark.parametrize("missing", ["model", "messages"])
def test_missing_required_field_is_400(missing: str) -> None:
    fields: dict[str, Any] = {"model": "m", "messages": MESSAGES}
    del fields[missing]
    error = error_for(json.dumps(fields).encode())
    assert (error.status, error.param) == (400, missing)
    assert error.message == f"missing required field '{missing}'"


# -- 422: values out of range or inconsistent ------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": 3}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.0001}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
        ({"messages": [*MESSAGES, {"role": "function", "content": "x"}]}, "messages[1].role"),
        ({"messages": [{"role": "user"}]}, "messages[0]"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": -5}, "max_tokens"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"context_length_exceeded_behavior": "explode"}, "context_length_exceeded_behavior"),
    ],
)
def test_value_out_of_range_is_422_naming_the_param(fields: dict[str, Any], param: str) -> None:
    error = error_for(body(**fields))
    assert (error.status, error.param, error.code) == (422, param, "invalid_value")
    assert error.message.startswith(f"invalid value for '{param}'")


def test_a_value_error_wins_over_a_type_error() -> None:
    error = error_for(body(temperature=3, seed="x"))
    assert (error.status, error.param) == (422, "temperature")


def test_stream_options_without_stream_is_422() -> None:
    with pytest.raises(APIError) as info:
        parse(body(stream_options={"include_usage": True}))
    assert (info.value.status, info.value.param) == (422, "stream_options")
    assert parse(body(stream=True, stream_options={"include_usage": True})).stream


def test_image_part_is_422() -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [
            {"type": "text", "text": "what is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        ]},
    ]
    with pytest.raises(APIError) as info:
        parse(body(messages=messages))
    assert (info.value.status, info.value.param) == (422, "messages[1].content")
    assert "image" in info.value.message


def test_error_body_shape() -> None:
    error = error_for(body(temperature=3))
    assert error.body() == {"error": {
        "message": error.message, "type": "invalid_request_error",
        "param": "temperature", "code": "invalid_value",
    }}
    assert error_body(503, "busy")["error"]["type"] == "server_overloaded"


# -- tools, response formats and reasoning ----------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}],
          "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"thinking_budget": 100}, "thinking_budget"),
        ({"reasoning_effort": "extreme"}, "reasoning_effort"),
        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]},
         "tools[0].function.name"),
    ],
)
def test_inconsistent_tool_and_format_fields_are_422(fields: dict[str, Any], param: str) -> None:
    error = error_for(body(**fields))
    assert (error.status, error.param) == (422, param)


@pytest.mark.parametrize(
    "fields",
    [
        {"n": 1},
        {"logprobs": False},
        {"top_k": 0},
        {"top_k": -1},
        {"response_format": {"type": "text"}},
        {"response_format": {"type": "json_schema",
                             "json_schema": {"name": "x", "schema": {}, "strict": True}}},
        {"min_p": 0, "frequency_penalty": 0.0, "presence_penalty": 0, "repetition_penalty": 1},
        {"tools": [], "tool_choice": "auto", "parallel_tool_calls": True, "logit_bias": {}},
        {"tool_choice": "none", "include_stop_str_in_output": False},
        {"top_k": 5, "n": 3, "logprobs": True, "top_logprobs": 2, "min_p": 0.1},
        {"frequency_penalty": 0.5, "presence_penalty": -1, "repetition_penalty": 1.1},
        {"logit_bias": {"42": 5}, "include_stop_str_in_output": True},
        {"enable_thinking": False, "thinking_budget": 128, "reasoning_effort": "low",
         "separate_reasoning": False},
        {"top_k": None, "logprobs": None, "tools": None},
    ],
)
def test_valid_parameters_are_accepted(fields: dict[str, Any]) -> None:
    parse(body(**fields))


# -- accepted requests -------------------------------------------------------------------------


def test_a_full_valid_request() -> None:
    request = parse(body(
        temperature=1, top_p=1, max_tokens=10, stop="END", seed=3, user="u", stream=True,
        stream_options={"include_usage": True},
        messages=[
            {"role": "developer", "content": "d"},
            {"role": "user", "content": [{"type": "text", "text": "a"}]},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": "c1", "type": "function",
                             "function": {"name": "f", "arguments": "{}"}}]},
            {"role": "tool", "content": "r", "tool_call_id": "c1"},
        ],
    ))
    assert request.temperature == 1.0   # an integer is fine where a number belongs
    assert request.stop_strings == ("END",)
    assert request.stream_options is not None and request.stream_options.include_usage


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, None),
        ({"max_tokens": 10}, 10),
        ({"max_completion_tokens": 20}, 20),
        ({"max_tokens": 10, "max_completion_tokens": 20}, 20),
        ({"max_tokens": 30, "max_completion_tokens": 20}, 20),
    ],
)
def test_max_completion_tokens_wins_over_max_tokens(
    fields: dict[str, Any], expected: int | None
) -> None:
    assert parse(body(**fields)).requested_max_tokens == expected


@pytest.mark.parametrize(
    ("stop", "expected"),
    [(None, ()), ("x", ("x",)), (["a", "b"], ("a", "b")), ([], ())],
)
def test_stop_strings(stop: Any, expected: tuple[str, ...]) -> None:
    assert parse(body(stop=stop)).stop_strings == expected


def test_unknown_extra_fields_are_accepted() -> None:
    request = parse(body(some_vendor_field={"x": 1}, another=True))
    assert request.model_extra == {"some_vendor_field": {"x": 1}, "another": True}


def test_template_dict_of_messages() -> None:
    request = parse(body(messages=[
        {"role": "user", "content": [{"type": "text", "text": "a"}], "name": "bob"},
        {"role": "assistant", "tool_calls": [
            {"id": "c1", "function": {"name": "f", "arguments": "{}"}}]},
    ]))
    first, second = (m.to_template_dict() for m in request.messages)
    assert first == {"role": "user", "content": [{"type": "text", "text": "a"}], "name": "bob"}
    assert second == {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
