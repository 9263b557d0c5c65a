"""Response bodies and SSE chunks in SPEC.md's shape, built as dicts and encoded by orjson."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from modelyard.providers.base import TokenLogprobs, ToolCallDelta


@dataclass
class ChoiceResult:
    """One choice of a non-streamed response, assembled from its deltas."""

    index: int
    parts: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    finish_reason: str | None = None
    logprobs: list[TokenLogprobs] | None = None

    def add_tool_calls(self, calls: tuple[ToolCallDelta, ...]) -> None:
        """Whole calls, or the fragments of one that an upstream streams (same index:
        the arguments are joined)."""
        for call in calls:
            last = self.tool_calls[-1] if self.tool_calls else None
            if last is not None and last.index == call.index:
                self.tool_calls[-1] = ToolCallDelta(call.index, last.id or call.id,
                                                    last.name or call.name,
                                                    last.arguments + call.arguments)
            else:
                self.tool_calls.append(call)

    def message(self) -> dict[str, Any]:
        content = "".join(self.parts)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if self.tool_calls and not content.strip() else content,
        }
        if self.reasoning:
            message["reasoning_content"] = "".join(self.reasoning)
        if self.tool_calls:
            message["tool_calls"] = [tool_call_body(call, with_index=False)
                                     for call in self.tool_calls]
        return message


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
            "message": choice.message(),
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


def tool_call_body(call: ToolCallDelta, *, with_index: bool = True) -> dict[str, Any]:
    """A call in OpenAI's shape; streamed (`with_index`), a fragment that continues a call
    (no id, no name) carries only its index and more arguments, as OpenAI streams them."""
    if with_index and not call.id and not call.name:
        return {"index": call.index, "function": {"arguments": call.arguments}}
    body: dict[str, Any] = {"index": call.index} if with_index else {}
    body.update({"id": call.id, "type": "function",
                 "function": {"name": call.name, "arguments": call.arguments}})
    return body


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


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0,
          reasoning_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": reasoning_tokens},
    }


def sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"
