"""Request bodies in the OpenAPI document, for routes that read their body themselves.

The chat and admin routes parse their raw body with a pydantic model (their errors in
SPEC.md's shape), so FastAPI does not see a body parameter; `request_body(Model)` is the
`openapi_extra` that describes it anyway. The model's JSON schema has its `$defs` inlined:
inside an OpenAPI document a `#/$defs/...` reference would point at the document's root.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def _inline(node: Any, defs: dict[str, Any], seen: tuple[str, ...]) -> Any:
    if isinstance(node, list):
        return [_inline(item, defs, seen) for item in node]
    if not isinstance(node, dict):
        return node
    ref = node.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        name = ref.removeprefix("#/$defs/")
        if name in seen:  # a recursive model: leave it open rather than loop
            return {}
        siblings = {k: v for k, v in node.items() if k != "$ref"}
        return {**_inline(defs[name], defs, (*seen, name)), **_inline(siblings, defs, seen)}
    return {key: _inline(value, defs, seen) for key, value in node.items()
            if key != "$defs" and not (key == "discriminator" and isinstance(value, dict))}


def json_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The model's JSON schema (as it validates input) with every `$ref` resolved."""
    schema = model.model_json_schema(mode="validation")
    inlined: dict[str, Any] = _inline(schema, schema.get("$defs", {}), ())
    return inlined


def request_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body `model` validates."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": json_schema(model)}}}}
