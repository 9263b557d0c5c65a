"""Response bodies and SSE chunks in SPEC.md's shape, built as dicts and encoded by orjson."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from modelyard.providers.base import TokenLogprobs


@dataclass
class ChoiceResult:
    """One choice of a non-streamed response, assembled from its deltas."""

    index: int
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None


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

    def body(self, choices: list[ChoiceResult], usage: dict[str, Any]) -> dict[str, Any]:
        body = self._head("chat.completion")
        body["choices"] = [{
            "index": choice.index,
            "message": {"role": "assistant", "content": "".join(choice.parts)},
            "logprobs": logprobs_body(choice.logprobs),
            "finish_reason": choice.finish_reason,
        } for choice in sorted(choices, key=lambda c: c.index)]
        body["usage"] = usage
        return body

    def chunk(self, delta: dict[str, Any], finish_reason: str | None = None, *, index: int = 0,
              logprobs: tuple[TokenLogprobs, ...] | list[TokenLogprobs] | None = None) -> bytes:
        body = self._head("chat.completion.chunk")
        body["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs_body(logprobs),
                            "finish_reason": finish_reason}]
        return sse(body)

    def usage_chunk(self, usage: dict[str, Any]) -> bytes:
        body = self._head("chat.completion.chunk")
        body["choices"] = []
        body["usage"] = usage
        return sse(body)


def logprobs_body(
    entries: tuple[TokenLogprobs, ...] | list[TokenLogprobs] | None,
) -> dict[str, Any] | None:
    """OpenAI's `logprobs` object: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    if entries is None:
        return None
    return {"content": [{
        "token": entry.token,
        "logprob": entry.logprob,
        "bytes": entry.bytes,
        "top_logprobs": [{"token": token, "logprob": logprob, "bytes": raw}
                         for token, raw, logprob in entry.top],
    } for entry in entries]}


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
