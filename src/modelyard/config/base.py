"""What every configuration section shares: the strict scalar types, the defaults' model ids,
`ConfigError`, and the checks for prices and byte sizes."""

from __future__ import annotations

import re
from typing import Annotated, Literal, get_args

from pydantic import ConfigDict, Field, Strict, ValidationInfo

from modelyard.errors import ModelyardError
from modelyard.units import MAX_PRICE_MICROS, AmountError, to_micros

DEFAULT_MODEL_ID = "qwen2.5-coder-0.5b-instruct"
DEFAULT_MODEL_SOURCE = "pypi:qwen2.5-coder-0.5b-instruct"
DEFAULT_EMBEDDING_ID = "all-minilm-l6-v2"
DEFAULT_EMBEDDING_SOURCE = "pypi:all-minilm-l6-v2"

Profile = Literal["vllm", "sglang", "llamacpp", "ollama", "openai", "passthrough"]
PROFILES: tuple[str, ...] = get_args(Profile)
"""How SPEC.md's parameters reach a family of upstream servers (providers/profiles.py)."""
Capability = Literal["tools", "json_schema", "reasoning", "vision"]
_FORBID = ConfigDict(extra="forbid")


class ConfigError(ModelyardError, ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


# Strict scalar types: an integer is never a bool, a float or text; a number (stored as a
# float) is an integer or a float, never a bool or text; a flag is true or false.
Int = Annotated[int, Strict()]
Num = Annotated[float, Strict()]
Flag = Annotated[bool, Strict()]
Text = Annotated[str, Strict()]
NonEmpty = Annotated[str, Strict(), Field(min_length=1)]
NonNegative = Annotated[int, Strict(), Field(ge=0)]
Positive = Annotated[int, Strict(), Field(ge=1)]
PositiveNum = Annotated[float, Strict(), Field(gt=0)]
Seconds = PositiveNum
PriceUnits = Annotated[float, Strict()]
"""Currency units per million tokens; checked by `_price` (at most 6 decimals, in bounds)."""


def _price(value: float | None, info: ValidationInfo) -> float | None:
    if value is None:
        return None
    name = info.field_name or "price"
    try:
        to_micros(value, what=name, maximum=MAX_PRICE_MICROS)
    except AmountError as exc:
        raise ValueError(str(exc).removeprefix(f"{name} ")) from None
    return value


_BYTES = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text: str) -> int:
    """"4GiB", "512 MB", "1.5GiB" or "1000" as a number of bytes."""
    found = _BYTES.fullmatch(text)
    if found is None:
        raise ValueError(f"must be a number of bytes or text such as '4GiB', got {text!r}")
    return int(float(found.group(1)) * _UNITS[(found.group(2) or "").upper()])
