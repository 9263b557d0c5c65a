"""What a request used, in one shape from the model to the ledger.

A provider reports it with every delta (the request's totals so far), the request's bill
settles it, the ledger stores it and the usage queries read it back; the answer's `usage`
object is written from it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Usage:
    """Token counts of one request (or sums over many): the prompt counted once, the
    completion tokens summed over every choice. `prompt_tokens` includes `cached_tokens`
    and `completion_tokens` includes `reasoning_tokens`, as in OpenAI's usage."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    estimated: bool = False
    """Counted by modelyard instead of reported by the model's server."""

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens,
                     self.cached_tokens + other.cached_tokens,
                     self.completion_tokens + other.completion_tokens,
                     self.reasoning_tokens + other.reasoning_tokens,
                     self.estimated or other.estimated)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_openai(self) -> dict[str, Any]:
        """The `usage` object of a chat or text completion."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            "completion_tokens_details": {"reasoning_tokens": self.reasoning_tokens},
        }

    def as_json(self) -> dict[str, int]:
        """The four counts by name (the admin API's usage rows and totals)."""
        return {"prompt_tokens": self.prompt_tokens, "cached_tokens": self.cached_tokens,
                "completion_tokens": self.completion_tokens,
                "reasoning_tokens": self.reasoning_tokens}
