"""Response bodies and SSE chunks in SPEC.md's shape, built as dicts and encoded by orjson."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


@dataclass(frozen=True)
class Completion:
    """What is the same in every chunk of one response."""

    id: str
    created: int
    model: str
    system_fingerprint: str

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": self.system_fingerprint}

    def body(self, text: str, finish_reason: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        body = self._head("chat.completion")
        body["choices"] = [{
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }]
        body["usage"] = usage
        return body

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None) -> bytes:
        body = self._head("chat.completion.chunk")
        body["choices"] = [{"index": 0, "delta": delta, "logprobs": None,
                            "finish_reason": finish_reason}]
        return sse(body)

    def usage_chunk(self, usage: dict[str, Any]) -> bytes:
        body = self._head("chat.completion.chunk")
        body["choices"] = []
        body["usage"] = usage
        return sse(body)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
