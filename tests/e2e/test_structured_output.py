"""End-to-end: response_format and tools, enforced by constrained decoding, through the SDK."""

from __future__ import annotations

import enum
import json
from typing import Any

import jsonschema
import openai
import pydantic
import pytest

from tests.e2e.conftest import MODEL

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["engineer", "artist", "doctor"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 30},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "skills": {"type": "array", "items": {"type": "string", "maxLength": 20},
                   "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "role", "address", "skills"],
    "additionalProperties": False,
}

TOOLS: list[dict[str, Any]] = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                       "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "description": "Add two numbers.",
        "parameters": {"type": "object",
                       "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
                       "required": ["a", "b"], "additionalProperties": False}}},
]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}


def _valid_call(call: Any) -> None:
    assert call.type == "function"
    assert call.id
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_json_schema_is_met_on_twenty_prompts_at_temperature_one(client: openai.OpenAI) -> None:
    jobs = ["a painter", "a surgeon", "a pilot", "a chef", "a poet", "a nurse", "a coder",
            "a farmer", "a judge", "a sailor", "a singer", "a baker", "a teacher", "a miner",
            "a dancer", "a writer", "a welder", "a monk", "a clerk", "a guard"]
    for job in jobs:
        reply = client.chat.completions.create(
            model=MODEL, temperature=1.0, max_tokens=200,
            messages=[{"role": "user", "content": f"Invent {job}, as JSON."}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "person", "schema": PERSON,
                                             "strict": True}})
        assert reply.choices[0].finish_reason == "stop", reply
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), PERSON)


def test_json_object_parses(client: openai.OpenAI) -> None:
    for seed in range(3):
        reply = client.chat.completions.create(
            model=MODEL, temperature=0.7, seed=seed, max_tokens=400,
            response_format={"type": "json_object"},
            messages=[{"role": "user", "content": "Describe a cat as a JSON object."}])
        assert reply.choices[0].finish_reason == "stop"
        assert isinstance(json.loads(reply.choices[0].message.content or ""), dict)


def test_strict_schema_with_an_unsupported_keyword_is_422(client: openai.OpenAI) -> None:
    schema = {"type": "object", "properties": {"x": {"type": "string", "format": "weird"}}}
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema",
                             "json_schema": {"name": "x", "schema": schema, "strict": True}})
    error = caught.value.response.json()["error"]
    assert error["param"] == "response_format"
    assert "weird" in error["message"]


@pytest.mark.parametrize("question", [
    "What is the weather in Paris?", "Hello there!", "Add 2 and 3.", "Tell me a joke.",
])
def test_required_tool_choice_always_gives_a_valid_call(client: openai.OpenAI,
                                                        question: str) -> None:
    reply = client.chat.completions.create(
        model=MODEL, temperature=1.0, max_tokens=100, tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required", messages=[{"role": "user", "content": question}])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        _valid_call(call)


def test_named_tool_choice_calls_that_function(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, temperature=1.0, max_tokens=100, tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "add"}},
        messages=[{"role": "user", "content": "What is the weather in Rome?"}])
    calls = reply.choices[0].message.tool_calls
    assert calls and [c.function.name for c in calls] == ["add"]
    _valid_call(calls[0])


def test_auto_tool_choice_calls_a_tool_for_a_tool_worthy_question(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=100, tools=TOOLS,  # type: ignore[arg-type]
        messages=[{"role": "system", "content": "Use the tools to answer."},
                  {"role": "user", "content": "Use get_weather: what is the weather in Tokyo?"}])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    assert choice.message.tool_calls is not None
    assert choice.message.tool_calls[0].function.name == "get_weather"
    _valid_call(choice.message.tool_calls[0])


def test_none_tool_choice_never_calls(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=60, tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="none",
        messages=[{"role": "user", "content": "Use get_weather: what is the weather in Tokyo?"}])
    assert reply.choices[0].message.tool_calls is None
    assert reply.choices[0].finish_reason != "tool_calls"


def test_streamed_tool_call_fragments_concatenate_to_valid_json(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=100, tools=TOOLS,  # type: ignore[arg-type]
        tool_choice="required", stream=True,
        messages=[{"role": "user", "content": "What is the weather in Oslo?"}])
    ids: list[str] = []
    names: list[str] = []
    arguments: dict[int, str] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for call in choice.delta.tool_calls or []:
                if call.id:
                    ids.append(call.id)
                if call.function and call.function.name:
                    names.append(call.function.name)
                arguments[call.index] = arguments.get(call.index, "") + (
                    call.function.arguments or "" if call.function else "")
    assert finish == "tool_calls"
    assert len(ids) == len(names) == len(arguments) >= 1
    for index, name in enumerate(names):
        jsonschema.validate(json.loads(arguments[index]), PARAMETERS[name])


def test_a_second_turn_with_the_tool_result_is_a_text_answer(client: openai.OpenAI) -> None:
    first = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=100, tools=TOOLS,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    second = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=60, tools=TOOLS,  # type: ignore[arg-type]
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees."},
        ])  # type: ignore[list-item]
    message = second.choices[0].message
    assert message.tool_calls is None
    assert message.content


# -- tools generated from pydantic models: nested types and enums under `$defs` -------------------


class _Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


class _Place(pydantic.BaseModel):
    city: str = pydantic.Field(max_length=30)
    country: str = pydantic.Field(max_length=30)


class _Forecast(pydantic.BaseModel):
    place: _Place
    unit: _Unit
    days: int = pydantic.Field(ge=1, le=7)


class _Trip(pydantic.BaseModel):
    start: _Place
    end: _Place


DEFS_TOOLS = [
    {"type": "function", "function": {"name": "forecast", "description": "Weather forecast",
                                      "parameters": _Forecast.model_json_schema()}},
    {"type": "function", "function": {"name": "plan_trip", "description": "Plan a trip",
                                      "parameters": _Trip.model_json_schema()}},
]
DEFS_PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"]
                   for tool in DEFS_TOOLS}


@pytest.mark.parametrize("choice", [
    "auto", "required", {"type": "function", "function": {"name": "forecast"}},
    {"type": "function", "function": {"name": "plan_trip"}},
])
def test_tools_with_defs_give_valid_calls_under_every_tool_choice(
        client: openai.OpenAI, choice: Any) -> None:
    assert all("$defs" in parameters for parameters in DEFS_PARAMETERS.values())
    reply = client.chat.completions.create(
        model=MODEL, temperature=0, max_tokens=150, tools=DEFS_TOOLS,  # type: ignore[arg-type]
        tool_choice=choice,
        messages=[{"role": "system", "content": "Use the tools to answer."},
                  {"role": "user", "content": "Use forecast: 3-day weather in Oslo, Norway, "
                                              "in celsius."}])
    calls = reply.choices[0].message.tool_calls
    if choice == "auto":
        # Served (it was a 422 before). "auto" may answer in text, or write a call as bare
        # JSON without the tags, which is read as a call but was never constrained, so only
        # the function's name is certain here; the grammar itself is checked in
        # tests/providers/test_constraints.py.
        for call in calls or []:
            assert call.function.name in DEFS_PARAMETERS
            assert isinstance(json.loads(call.function.arguments), dict)
        return
    assert calls
    if isinstance(choice, dict):
        assert [call.function.name for call in calls] == [choice["function"]["name"]]
    for call in calls:
        assert call.type == "function"
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, DEFS_PARAMETERS[call.function.name])
        model = _Forecast if call.function.name == "forecast" else _Trip
        model.model_validate(arguments)   # and pydantic reads them back as its own types
