"""Size caps on a chat request, so that no single body can make the server work long.

The numbers follow OpenAI's where OpenAI documents or enforces one (2048 messages, 128
tools, 64-character function names, 4 stop strings, 300 logit_bias entries); the rest are
generous bounds on what a real client sends. Each cap is a 422 naming the field.
"""

from __future__ import annotations

import json
import re
from typing import Any

MAX_MESSAGES = 2048
MAX_MESSAGE_CHARS = 2 * 1024 * 1024
"""Characters of one message: its content (string or text parts) and tool call arguments."""
MAX_TOTAL_CHARS = 4 * 1024 * 1024
"""Characters of all messages together, counted as for MAX_MESSAGE_CHARS."""
MAX_TEXT_PARTS = 256
"""Content parts of one message."""
MAX_TOOLS = 128
MAX_TOOL_CALLS = 128
"""Tool calls of one assistant message in the history."""
MAX_SCHEMA_BYTES = 64 * 1024
"""A tool's `parameters`, as compact JSON."""
MAX_RESPONSE_SCHEMA_BYTES = 256 * 1024
"""`response_format.json_schema.schema`, as compact JSON."""
MAX_SCHEMA_DEPTH = 64
"""Nesting of JSON objects and arrays in a schema (OpenAI allows 10 levels of schema
nesting, each of which takes up to about 4 JSON levels)."""
MAX_DESCRIPTION_CHARS = 16 * 1024
MAX_STOP_CHARS = 256
MAX_STOP_STRINGS = 4
MAX_NAME_CHARS = 64
MAX_ID_CHARS = 256
"""Tool call ids, `user`, `model`."""
MAX_LOGIT_BIAS = 300
MAX_TOKEN_ID_DIGITS = 10
MAX_TOKEN_ID = 2**31 - 1
MAX_INT = 2**31 - 1
"""Upper bound of every count (max_tokens, top_k)."""
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1
JSON_INT_MIN = -(2**63)
JSON_INT_MAX = 2**64 - 1
"""Integers inside a request's objects and arrays (tool schemas, response formats) must fit
in 64 bits, signed or unsigned: they are written out again (token bounds, upstream
requests) by a JSON encoder that stops there."""

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TOKEN_ID = re.compile(rf"[0-9]{{1,{MAX_TOKEN_ID_DIGITS}}}")


def has_control_characters(text: str) -> bool:
    return _CONTROL.search(text) is not None


def is_token_id(key: str) -> bool:
    """ASCII digits only (str.isdigit also takes '²' and other scripts' digits), at most
    MAX_TOKEN_ID_DIGITS of them, and within int32."""
    return _TOKEN_ID.fullmatch(key) is not None and int(key) <= MAX_TOKEN_ID


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Whether JSON objects and arrays nest deeper than `limit` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children
                     if isinstance(child, dict | list))
    return False


def json_size(value: Any) -> int:
    """Bytes of `value` as compact JSON (call after json_depth_exceeds has passed)."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))


def has_oversized_integer(value: Any) -> bool:
    """Whether an integer outside JSON_INT_MIN..JSON_INT_MAX is anywhere in `value`
    (iterative: no recursion)."""
    stack: list[Any] = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, int) and not JSON_INT_MIN <= item <= JSON_INT_MAX:
            return True
    return False
