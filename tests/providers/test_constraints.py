"""Tool-call schemas: tools whose `parameters` use `$defs` (as pydantic writes them) compile
under every tool_choice, and the combined call schema accepts exactly the valid calls."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from pydantic import BaseModel

from modelyard.engine.grammar import GrammarCompiler
from modelyard.engine.runner import LlamaRunner, RunnerConfig
from modelyard.providers.base import ChatRequest, ProviderError
from modelyard.providers.constraints import ToolTokens, _call_schema, plan


class Unit(enum.Enum):
    CELSIUS = "celsius"
    FAHRENHEIT = "fahrenheit"


class Place(BaseModel):
    city: str
    country: str


class WeatherQuery(BaseModel):
    place: Place
    unit: Unit
    days: list[Place] = []


class Unit2(enum.Enum):   # the same definition name in a second tool, another meaning
    METERS = "m"


class Distance(BaseModel):
    start: Place
    unit: Unit2


def _tool(name: str, parameters: dict[str, Any]) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": parameters}}


def _colliding_distance_schema() -> dict[str, Any]:
    """Distance's schema with its enum renamed to `Unit`, so both tools define `Unit`."""
    schema = Distance.model_json_schema()
    schema["$defs"]["Unit"] = schema["$defs"].pop("Unit2")
    schema["properties"]["unit"] = {"$ref": "#/$defs/Unit"}
    return schema


WEATHER = _tool("get_weather", WeatherQuery.model_json_schema())
DISTANCE = _tool("distance", _colliding_distance_schema())


def _request(tools: list[dict[str, Any]], choice: Any = None,
             fmt: dict[str, Any] | None = None) -> ChatRequest:
    return ChatRequest("r", [{"role": "user", "content": "hi"}], tools=tools, tool_choice=choice,
                       response_format=fmt)


VALID_WEATHER = {"name": "get_weather", "arguments": {
    "place": {"city": "Paris", "country": "FR"}, "unit": "celsius",
    "days": [{"city": "Lyon", "country": "FR"}]}}
VALID_DISTANCE = {"name": "distance", "arguments": {
    "start": {"city": "Oslo", "country": "NO"}, "unit": "m"}}


def test_pydantic_schemas_use_defs() -> None:
    assert "$defs" in WEATHER["function"]["parameters"]
    assert "$ref" in str(WEATHER["function"]["parameters"])


@pytest.mark.parametrize("only", [None, "get_weather"])
def test_call_schema_hoists_defs_and_keeps_meaning(only: str | None) -> None:
    schema = _call_schema(_request([WEATHER, DISTANCE]), only)
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid(VALID_WEATHER)
    assert validator.is_valid(VALID_DISTANCE) is (only is None)
    bad_unit = {**VALID_WEATHER, "arguments": {**VALID_WEATHER["arguments"], "unit": "m"}}
    assert not validator.is_valid(bad_unit)   # each tool keeps its own `Unit`
    if only is None:
        bad_distance = {**VALID_DISTANCE,
                        "arguments": {**VALID_DISTANCE["arguments"], "unit": "celsius"}}
        assert not validator.is_valid(bad_distance)


def test_root_and_local_pointers_are_rewritten() -> None:
    recursive = {"type": "object", "properties": {
        "value": {"type": "integer"},
        "child": {"anyOf": [{"$ref": "#"}, {"type": "null"}]},
        "same": {"$ref": "#/properties/value"},
    }, "required": ["value"], "additionalProperties": False}
    schema = _call_schema(_request([_tool("tree", recursive), WEATHER]), None)
    validator = jsonschema.Draft202012Validator(schema)
    call = {"name": "tree", "arguments": {"value": 1, "same": 2,
                                          "child": {"value": 2, "child": None}}}
    assert validator.is_valid(call)
    assert not validator.is_valid({"name": "tree", "arguments": {"value": 1, "same": "x"}})
    assert not validator.is_valid({"name": "tree", "arguments": {"value": 1,
                                                                  "child": {"same": 1}}})


def test_definitions_keyword_is_hoisted_too() -> None:
    legacy = {"type": "object", "properties": {"u": {"$ref": "#/definitions/U"}},
              "definitions": {"U": {"enum": ["a", "b"]}}, "required": ["u"]}
    schema = _call_schema(_request([_tool("f", legacy)]), None)
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"name": "f", "arguments": {"u": "a"}})
    assert not validator.is_valid({"name": "f", "arguments": {"u": "c"}})


# -- the real grammar compiler -------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiler(default_model_path: Path) -> Iterator[tuple[GrammarCompiler, ToolTokens]]:
    runner = LlamaRunner(RunnerConfig(default_model_path, n_seq_max=1, n_ctx=256, n_batch=32,
                                      threads=1))
    try:
        tokens = ToolTokens(runner.tokenize("<tool_call>", add_special=False)[0],
                            runner.tokenize("</tool_call>", add_special=False)[0])
        yield GrammarCompiler(runner.grammar_tokenizer(), runner.n_vocab), tokens
    finally:
        runner.close()


@pytest.mark.parametrize("choice", [
    "auto", "required", {"type": "function", "function": {"name": "get_weather"}},
    {"type": "function", "function": {"name": "distance"}},
])
def test_tools_with_defs_compile_under_every_tool_choice(
        compiler: tuple[GrammarCompiler, ToolTokens], choice: Any) -> None:
    grammar, tokens = compiler
    work = plan(_request([WEATHER, DISTANCE], choice), grammar, tokens, False)
    assert work.constraint is not None


def test_required_with_a_response_format_compiles(
        compiler: tuple[GrammarCompiler, ToolTokens]) -> None:
    grammar, tokens = compiler
    fmt = {"type": "json_schema", "json_schema": {"schema": WeatherQuery.model_json_schema()}}
    assert plan(_request([WEATHER], "required", fmt), grammar, tokens, False).constraint


def test_a_tool_schema_the_engine_cannot_enforce_names_tools(
        compiler: tuple[GrammarCompiler, ToolTokens]) -> None:
    grammar, tokens = compiler
    broken = _tool("f", {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}})
    with pytest.raises(ProviderError) as caught:
        plan(_request([broken], "required"), grammar, tokens, False)
    assert (caught.value.status, caught.value.param) == (422, "tools")
