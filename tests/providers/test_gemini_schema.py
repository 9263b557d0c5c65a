"""JSON Schemas in the Gemini API's Schema terms (providers/gemini_schema.py)."""

from __future__ import annotations

from typing import Any

import pytest

from modelyard.providers.base import ProviderError
from modelyard.providers.gemini_schema import gemini_schema


def test_nullable_forms_const_and_kept_keywords() -> None:
    schema = {"type": "object", "title": "T", "properties": {
        "a": {"anyOf": [{"type": "string", "maxLength": 5}, {"type": "null"}]},
        "b": {"anyOf": [{"type": "integer"}, {"type": "number", "minimum": 0}]},
        "c": {"const": "x", "description": "fixed"},
        "d": {"type": "array", "items": {"type": "boolean"}, "minItems": 1}},
        "required": ["a"], "$schema": "https://json-schema.org/draft/2020-12/schema"}
    assert gemini_schema(schema, "p") == {"type": "OBJECT", "title": "T", "properties": {
        "a": {"nullable": True, "type": "STRING", "maxLength": 5},
        "b": {"anyOf": [{"type": "INTEGER"}, {"type": "NUMBER", "minimum": 0}]},
        "c": {"enum": ["x"], "description": "fixed"},
        "d": {"type": "ARRAY", "items": {"type": "BOOLEAN"}, "minItems": 1}},
        "required": ["a"]}


@pytest.mark.parametrize("schema, words", [
    ({"type": "object", "oneOf": [{}]}, "'oneOf'"),
    ({"type": "object", "additionalProperties": {"type": "string"}}, "'additionalProperties'"),
    ({"type": ["string", "integer"]}, "schema type"),
    ({"$ref": "#/$defs/node", "$defs": {"node": {"type": "object", "properties": {
        "next": {"$ref": "#/$defs/node"}}}}}, "recursive"),
    ({"$ref": "https://example.com/schema"}, "local $refs"),
    ({"$ref": "#/$defs/missing"}, "names nothing"),
])
def test_what_gemini_cannot_hold_is_a_422_naming_the_schema(schema: dict[str, Any],
                                                            words: str) -> None:
    with pytest.raises(ProviderError) as refused:
        gemini_schema(schema, "response_format.json_schema.schema")
    assert refused.value.status == 422 and words in refused.value.message
    assert refused.value.param == "response_format.json_schema.schema"
