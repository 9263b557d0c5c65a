"""A JSON Schema (a json_schema response format's, a tool's parameters) as the Gemini API's
`Schema` (an OpenAPI 3.0 subset): types in its enum's spelling, `["T", "null"]` and
`anyOf` with `null` as `nullable`, `const` as a one-value `enum`, local `$ref`s
(`#/$defs/...`, `#/definitions/...`) inlined. Keywords that only restrict what is
already generated (`additionalProperties: false`) or only annotate (`$schema`, `$id`,
`examples`, `strict`) are left out; any other keyword Gemini's Schema lacks is refused
with a 422 naming it, since the answer would not be held to it.
"""

from __future__ import annotations

from typing import Any

from modelyard.providers.native_request import refused

KEPT = frozenset({"description", "format", "title", "enum", "minItems", "maxItems",
                  "minLength", "maxLength", "pattern", "minimum", "maximum", "minProperties",
                  "maxProperties", "default", "example", "propertyOrdering", "nullable"})
LEFT_OUT = frozenset({"$schema", "$id", "$comment", "examples", "strict", "$defs",
                      "definitions", "readOnly", "writeOnly", "deprecated"})
TYPES = {"string": "STRING", "number": "NUMBER", "integer": "INTEGER", "boolean": "BOOLEAN",
         "array": "ARRAY", "object": "OBJECT", "null": "NULL"}
MAX_REF_DEPTH = 16
"""Nested `$ref`s followed at most (a recursive schema cannot be inlined)."""


def gemini_schema(schema: dict[str, Any], param: str) -> dict[str, Any]:
    """`schema` in Gemini's terms; ProviderError (422, naming `param`) when it cannot be."""
    return _convert(schema, schema, param, 0)


def _convert(node: Any, root: dict[str, Any], param: str, depth: int) -> dict[str, Any]:
    if not isinstance(node, dict):
        raise refused("a schema must be an object", param)
    if "$ref" in node:
        if depth >= MAX_REF_DEPTH:
            raise refused("a recursive $ref cannot be sent to this model", param)
        return _convert({**_resolve(node["$ref"], root, param),
                         **{k: v for k, v in node.items() if k != "$ref"}},
                        root, param, depth + 1)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in KEPT:
            out[key] = value
        elif key == "type":
            _type(value, out, param)
        elif key == "const":
            out["enum"] = [value]
        elif key == "properties":
            if not isinstance(value, dict):
                raise refused("properties must be an object", param)
            out["properties"] = {name: _convert(sub, root, param, depth)
                                 for name, sub in value.items()}
        elif key == "required":
            out["required"] = value
        elif key == "items":
            out["items"] = _convert(value, root, param, depth)
        elif key == "anyOf":
            _any_of(value, out, root, param, depth)
        elif key == "additionalProperties" and value in (False, {}):
            continue
        elif key not in LEFT_OUT:
            raise refused(f"the schema keyword {key!r} cannot be sent to this model", param)
    return out


def _type(value: Any, out: dict[str, Any], param: str) -> None:
    names = value if isinstance(value, list) else [value]
    if "null" in names and len(names) > 1:
        out["nullable"] = True
        names = [name for name in names if name != "null"]
    if len(names) != 1 or names[0] not in TYPES:
        raise refused(f"the schema type {value!r} cannot be sent to this model", param)
    out["type"] = TYPES[names[0]]


def _any_of(value: Any, out: dict[str, Any], root: dict[str, Any], param: str,
            depth: int) -> None:
    if not isinstance(value, list) or not value:
        raise refused("anyOf must be a non-empty list", param)
    options = [option for option in value if option != {"type": "null"}]
    if len(options) < len(value):
        out["nullable"] = True
    if len(options) == 1:
        out.update(_convert(options[0], root, param, depth))
    else:
        out["anyOf"] = [_convert(option, root, param, depth) for option in options]


def _resolve(ref: Any, root: dict[str, Any], param: str) -> dict[str, Any]:
    if not isinstance(ref, str) or not ref.startswith("#/"):
        raise refused("only local $refs (#/...) can be sent to this model", param)
    node: Any = root
    for name in ref[2:].split("/"):
        node = node.get(name.replace("~1", "/").replace("~0", "~")) \
            if isinstance(node, dict) else None
    if not isinstance(node, dict):
        raise refused(f"the $ref {ref!r} names nothing in the schema", param)
    return node
