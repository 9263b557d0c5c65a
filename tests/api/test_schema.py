"""Request validation: raw bytes in, the SPEC.md status, param and code out."""

from __future__ import annotations

import json
import time
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
        {"tools": [], "parallel_tool_calls": True, "logit_bias": {}},
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


# -- hostile values and size caps --------------------------------------------------------------

MiB = 1024 * 1024


def _nested(depth: int) -> Any:
    value: Any = {"type": "string"}
    for _ in range(depth):
        value = {"type": "array", "items": value}
    return value


def _tools(count: int, **function: Any) -> list[dict[str, Any]]:
    return [{"type": "function", "function": {"name": f"f{i}", **function}}
            for i in range(count)]


def _history(**call: Any) -> list[dict[str, Any]]:
    return [*MESSAGES, {"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}, **call}]}]


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        # `user` is stored with the usage record: bounded, printable
        ({"user": "u" * 257}, "user"),
        ({"user": "a\x00b"}, "user"),
        ({"user": "line\nbreak"}, "user"),
        ({"user": "del\x7f"}, "user"),
        ({"model": "m\x00"}, "model"),
        ({"model": "m" * 257}, "model"),
        # 64-bit seeds only
        ({"seed": 2**64}, "seed"),
        ({"seed": -(2**63) - 1}, "seed"),
        ({"seed": 10**30}, "seed"),
        # counts stay within int32
        ({"max_tokens": 2**31}, "max_tokens"),
        ({"max_tokens": 10**30}, "max_tokens"),
        ({"max_completion_tokens": 10**100}, "max_completion_tokens"),
        ({"n": 10**30}, "n"),
        ({"top_k": 10**30}, "top_k"),
        ({"top_logprobs": 10**30, "logprobs": True}, "top_logprobs"),
        ({"thinking_budget": 10**30}, "thinking_budget"),
        # logit_bias keys: ASCII digits naming an int32, at most 300 entries
        ({"logit_bias": {"²": 1}}, "logit_bias"),
        ({"logit_bias": {"٣": 1}}, "logit_bias"),
        ({"logit_bias": {"1" * 4300: 1}}, "logit_bias"),
        ({"logit_bias": {"2147483648": 1}}, "logit_bias"),
        ({"logit_bias": {"-1": 1}}, "logit_bias"),
        ({"logit_bias": {" 1": 1}}, "logit_bias"),
        ({"logit_bias": {"": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
        # stop strings
        ({"stop": "s" * 257}, "stop"),
        ({"stop": ["a", "s" * 257]}, "stop[1]"),
        # messages: count, characters per message and in all, parts, names, ids
        ({"messages": MESSAGES * 2049}, "messages"),
        ({"messages": [{"role": "user", "content": "x" * (2 * MiB + 1)}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": "x" * (2 * MiB)}] * 3}, "messages[2].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}] * 257}]},
         "messages[0].content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "x" * MiB}] * 3}]},
         "messages[0].content"),
        ({"messages": [{"role": "user", "content": "hi", "name": "n" * 65}]}, "messages[0].name"),
        ({"messages": [{"role": "user", "content": "hi", "name": "<|im_start|>"}]},
         "messages[0].name"),
        ({"messages": [{"role": "user", "content": "hi", "name": "two words"}]},
         "messages[0].name"),
        ({"messages": [{"role": "tool", "content": "r", "tool_call_id": "i" * 257}]},
         "messages[0].tool_call_id"),
        ({"messages": [{"role": "tool", "content": "r", "tool_call_id": "a\x00"}]},
         "messages[0].tool_call_id"),
        ({"messages": _history(id="i" * 257)}, "messages[1].tool_calls[0].id"),
        ({"messages": _history(function={"name": "f" * 65, "arguments": "{}"})},
         "messages[1].tool_calls[0].function.name"),
        ({"messages": _history(function={"name": "f", "arguments": "x" * (2 * MiB + 1)})},
         "messages[1].content"),
        # tools: count, description, parameters size and depth
        ({"tools": _tools(129)}, "tools"),
        ({"tools": _tools(1, description="d" * (16 * 1024 + 1))}, "tools[0].function.description"),
        ({"tools": _tools(1, parameters={"type": "object", "description": "d" * 70_000})},
         "tools[0].function.parameters"),
        ({"tools": _tools(2, parameters=_nested(70))}, "tools[0].function.parameters"),
        ({"tools": _tools(1), "tool_choice": {"type": "function", "function": {"name": "f" * 65}}},
         "tool_choice.function.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": _nested(70)}}},
         "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "schema": {"description": "d" * (256 * 1024)}}}}, "response_format.json_schema.schema"),
        # tool_choice other than "none" needs tools, as OpenAI answers
        ({"tool_choice": "auto"}, "tool_choice"),
        ({"tools": [], "tool_choice": "auto"}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ],
)
def test_hostile_or_oversized_values_are_422_naming_the_param(
        fields: dict[str, Any], param: str) -> None:
    error = error_for(body(**fields))
    assert (error.status, error.param, error.code) == (422, param, "invalid_value")
    assert error.body()["error"]["type"] == "invalid_request_error"
    assert len(error.message) < 300   # the offending value is not echoed back in full


@pytest.mark.parametrize(
    "fields",
    [
        {"seed": -1}, {"seed": -(2**63)}, {"seed": 2**64 - 1}, {"seed": 0},
        {"user": "u" * 256}, {"user": "ünïcode user ✓"},
        {"logit_bias": {str(i): 1 for i in range(300)}},
        {"logit_bias": {"0": -100, "2147483647": 100, "007": 1}},
        {"tool_choice": "none"},
        {"stop": "s" * 256}, {"stop": ["s" * 256] * 4},
        {"messages": MESSAGES * 2048},
        {"messages": [{"role": "user", "content": "x" * (2 * MiB)}] * 2},
        {"messages": [{"role": "user", "content": "hi", "name": "bob_1.x-y"}]},
        {"tools": _tools(128, description="d" * 16 * 1024, parameters=_nested(30))},
        {"max_tokens": 2**31 - 1, "top_k": 2**31 - 1},
    ],
)
def test_values_at_the_caps_are_accepted(fields: dict[str, Any]) -> None:
    parse(body(**fields))


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'"max_tokens": "\xd9\xa3"', "max_tokens"),      # an Arabic-Indic digit, as a string
        (b'"seed": "\xc2\xb2"', "seed"),                    # superscript two, as a string
        (b'"temperature": "1e309"', "temperature"),
        (b'"n": "10"', "n"),
    ],
)
def test_numbers_given_as_strings_are_400(raw: bytes, param: str) -> None:
    error = error_for(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
                      + raw + b"}")
    assert (error.status, error.param, error.code) == (400, param, "invalid_type")


@pytest.mark.parametrize(
    ("raw", "status", "param"),
    [
        (b'"temperature": 1e309', 422, "temperature"),
        (b'"temperature": -1e309', 422, "temperature"),
        (b'"top_p": 1e-400', 422, "top_p"),
        (b'"logit_bias": {"1": 1e309}', 422, "logit_bias"),
        (b'"max_tokens": 1e309', 400, "max_tokens"),
        (b'"max_tokens": 1' + b"0" * 4000, 422, "max_tokens"),
        (b'"max_tokens": 1' + b"0" * 5000, 400, None),   # past the JSON parser's range
        (b'"temperature": 1' + b"0" * 5000, 400, None),
        (b'"seed": -1' + b"0" * 5000, 400, None),
        (b'"temperature": NaN', 422, "temperature"),
        (b'"temperature": Infinity', 422, "temperature"),
        (b'"top_p": NaN', 422, "top_p"),
        (b'"logit_bias": {"1": NaN}', 422, "logit_bias"),
        (b'"frequency_penalty": -Infinity', 422, "frequency_penalty"),
    ],
)
def test_extreme_numbers_are_errors_not_crashes(raw: bytes, status: int,
                                                param: str | None) -> None:
    error = error_for(b'{"model": "m", "messages": [{"role": "user", "content": "hi"}], '
                      + raw + b"}")
    assert (error.status, error.param) == (status, param)


@pytest.mark.parametrize("where", ["content", "extra", "parameters", "schema", "logit_bias"])
def test_deeply_nested_json_is_refused_quickly(where: str) -> None:
    deep = b"[" * 10_000 + b"]" * 10_000
    hi = b'"messages": [{"role": "user", "content": "hi"}], '
    fields = {
        "content": b'"messages": [{"role": "user", "content": ' + deep + b"}]",
        "extra": hi + b'"vendor": ' + deep,
        "parameters": hi + b'"tools": [{"type": "function", "function": {"name": "f", '
                           b'"parameters": {"a": ' + deep + b"}}}]",
        "schema": hi + b'"response_format": {"type": "json_schema", "json_schema": '
                       b'{"schema": {"a": ' + deep + b"}}}",
        "logit_bias": hi + b'"logit_bias": ' + deep,
    }[where]
    started = time.monotonic()
    error = error_for(b'{"model": "m", ' + fields + b"}")
    assert time.monotonic() - started < 1
    assert error.status in (400, 422)
    assert error.body()["error"]["type"] == "invalid_request_error"


def test_a_nul_in_any_string_is_an_error_or_text_never_a_crash() -> None:
    request = parse(body(messages=[{"role": "user", "content": "a\x00b"}]))
    assert request.messages[0].content == "a\x00b"   # content is text: NUL is a character
