"""Pydantic's validation errors in the file's own terms (`engine.max_sequences must be >=
1`, `models[0] (its id).deployments[1].weight ...`)."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from pydantic_core import ErrorDetails

_EXPECTED = {"int_type": "must be an integer", "int_from_float": "must be an integer",
             "int_parsing": "must be an integer", "float_type": "must be a number",
             "float_parsing": "must be a number", "bool_type": "must be true or false",
             "bool_parsing": "must be true or false", "string_type": "must be a string",
             "dataclass_type": "must be a table", "dataclass_exact_type": "must be a table",
             "dict_type": "must be a table", "tuple_type": "must be an array",
             "list_type": "must be an array", "path_type": "must be a string"}
_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=",
           "less_than": "<"}


def describe(exc: ValidationError, raw: dict[str, Any],
             section: tuple[str, ...] = ()) -> str:
    """A pydantic error in the file's own terms: `engine.max_sequences must be >= 1`."""
    errors = exc.errors()
    # A list whose entries are wrong is not also "too short" (pydantic says both).
    errors = [e for e in errors if e["type"] != "too_short" or not any(
        len(o["loc"]) > len(e["loc"]) and o["loc"][:len(e["loc"])] == e["loc"] for o in errors)]
    return "; ".join(_describe_one(error, raw, section) for error in errors)


def _describe_one(error: ErrorDetails, raw: dict[str, Any], section: tuple[str, ...]) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    loc = section + error["loc"]
    if kind in ("unexpected_keyword_argument", "extra_forbidden"):
        return f"unknown key in {_where(loc[:-1], raw) or 'config'}: {loc[-1]}"
    key = _where(loc, raw)
    if kind in _EXPECTED:
        text = f"{_EXPECTED[kind]}, got {error['input']!r}"
    elif kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        text = f"must be {_BOUNDS[kind]} {bound}"
    elif kind in ("missing", "missing_argument"):
        text = "is required"
    elif kind == "too_short" and loc[-1:] == ("deployments",):
        text = "needs at least one [[models.deployments]]"
    elif kind in ("too_short", "string_too_short"):
        text = "must not be empty"
    elif kind == "literal_error":
        text = f"must be one of {ctx['expected']}, got {error['input']!r}"
    elif kind == "value_error":
        text = str(ctx["error"])
    else:
        text = error["msg"]
    return f"{key} {text}" if key else text


def _where(loc: tuple[int | str, ...], raw: Any) -> str:
    """`("models", 0, "deployments", 1, "weight")` -> `models[0] (its id).deployments[1].weight`."""
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
            entry = raw[part] if isinstance(raw, list) and part < len(raw) else None
            if isinstance(entry, dict) and isinstance(entry.get("id"), str) and entry["id"]:
                text += f" ({entry['id']})"
            raw = entry
        else:
            text += f".{part}" if text else str(part)
            raw = raw.get(part) if isinstance(raw, dict) else None
    return text
