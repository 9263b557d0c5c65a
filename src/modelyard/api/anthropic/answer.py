"""An Anthropic message built from the chat core's deltas: one JSON body, or the stream of
Anthropic's events.

Content blocks come in the order the model produced them: its reasoning as a `thinking`
block (with a `signature`: a digest of the thinking text, since nothing here signs), its
text as a `text` block, each tool call as a `tool_use` block. A stream is the exact
sequence Anthropic sends: `message_start`, a `ping`, per block `content_block_start`,
its `content_block_delta`s (`thinking_delta` then one `signature_delta`, `text_delta`,
`input_json_delta`) and `content_block_stop`, then `message_delta` with the stop reason
and the final usage, and `message_stop`.

With `stop_sequences`, a model whose engine can end its text with the stop string it
matched does so (`report_stop`); the string is cut off again here and named in
`stop_sequence`. A stream holds back the text's last characters that could be a stop
string until the next delta shows they are not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from modelyard.api.anthropic.translate import (
    anthropic_usage,
    split_stop,
    stop_reason,
    tool_input,
)
from modelyard.providers.base import ChatDelta, ToolCallDelta
from modelyard.usage import Usage

SIGNATURE_PREFIX = "modelyard-sha256:"


def signature(digest: Any) -> str:
    """A thinking block's signature: what a client passes back untouched."""
    return SIGNATURE_PREFIX + str(digest.hexdigest()[:32])


@dataclass(frozen=True)
class Head:
    """What every form of one message shares."""

    id: str
    model: str
    stops: tuple[str, ...] = ()
    """The stop strings the engine reports at the end of the text (empty: none)."""

    def message(self, content: list[dict[str, Any]], stop_reason: str | None,
                stop_sequence: str | None, usage: dict[str, int]) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model,
                "content": content, "stop_reason": stop_reason,
                "stop_sequence": stop_sequence, "usage": usage}


@dataclass
class Collected:
    """A whole message, assembled from its deltas."""

    head: Head
    reasoning: list[str] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    calls: list[ToolCallDelta] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, delta: ChatDelta) -> None:
        if delta.reasoning:
            self.reasoning.append(delta.reasoning)
        if delta.text:
            self.text.append(delta.text)
        for call in delta.tool_calls:
            last = self.calls[-1] if self.calls else None
            if last is not None and last.index == call.index:  # an upstream's fragment
                self.calls[-1] = ToolCallDelta(call.index, last.id or call.id,
                                               last.name or call.name,
                                               last.arguments + call.arguments)
            else:
                self.calls.append(call)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason

    def body(self, usage: Usage) -> dict[str, Any]:
        content: list[dict[str, Any]] = []
        if self.reasoning:
            thinking = "".join(self.reasoning)
            content.append({"type": "thinking", "thinking": thinking,
                            "signature": signature(hashlib.sha256(thinking.encode()))})
        text, matched = split_stop("".join(self.text), self.head.stops)
        if text:
            content.append({"type": "text", "text": text})
        content += [{"type": "tool_use", "id": call.id, "name": call.name,
                     "input": tool_input(call.arguments)} for call in self.calls]
        return self.head.message(content, stop_reason(self.finish_reason, matched), matched,
                                 anthropic_usage(usage))


def event(name: bytes, body: dict[str, Any]) -> bytes:
    return b"event: " + name + b"\ndata: " + orjson.dumps(body) + b"\n\n"


_PING = event(b"ping", {"type": "ping"})
_STOP = event(b"message_stop", {"type": "message_stop"})


class EventWriter:
    """Anthropic's stream events of one message, delta by delta."""

    def __init__(self, head: Head) -> None:
        self.head = head
        self.index = -1
        self.open: str | None = None
        """The type of the block being written (None: no block open)."""
        self.thinking = hashlib.sha256()
        self.held = ""
        """The text's tail that could still be the start of a stop string."""
        self.hold = max(map(len, head.stops), default=0)
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None

    def start(self, input_tokens: int) -> bytes:
        usage = {"input_tokens": input_tokens, "output_tokens": 0,
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
        return event(b"message_start", {"type": "message_start", "message":
                                        self.head.message([], None, None, usage)}) + _PING

    def delta(self, delta: ChatDelta) -> bytes:
        out = b""
        if delta.reasoning:
            out += self._flush_text() + self._open("thinking", {"thinking": "", "signature": ""})
            self.thinking.update(delta.reasoning.encode())
            out += self._delta({"type": "thinking_delta", "thinking": delta.reasoning})
        if delta.text:
            out += self._text(delta.text)
        for call in delta.tool_calls:
            if call.id or call.name or self.open != "tool_use":
                out += self._flush_text() + self._close()
                out += self._open("tool_use", {"id": call.id, "name": call.name, "input": {}})
            if call.arguments:
                out += self._delta({"type": "input_json_delta", "partial_json": call.arguments})
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            text, self.stop_sequence = split_stop(self.held, self.head.stops)
            self.held = ""
            out += self._emit_text(text) + self._close()
        return out

    def finish(self, usage: Usage) -> bytes:
        """The last events, once the final usage is known."""
        text, self.held = self.held, ""
        body = {"type": "message_delta",
                "delta": {"stop_reason": stop_reason(self.finish_reason, self.stop_sequence),
                          "stop_sequence": self.stop_sequence},
                "usage": anthropic_usage(usage)}
        return self._emit_text(text) + self._close() + event(b"message_delta", body) + _STOP

    def _text(self, text: str) -> bytes:
        if not self.hold:
            return self._emit_text(text)
        text = self.held + text
        cut = max(0, len(text) - self.hold)
        self.held = text[cut:]
        return self._emit_text(text[:cut])

    def _flush_text(self) -> bytes:
        text, self.held = self.held, ""
        return self._emit_text(text)

    def _emit_text(self, text: str) -> bytes:
        if not text:
            return b""
        return self._open("text", {"text": ""}) + self._delta(
            {"type": "text_delta", "text": text})

    def _open(self, kind: str, fields: dict[str, Any]) -> bytes:
        if self.open == kind:
            return b""
        out = self._close()
        self.index += 1
        self.open = kind
        return out + event(b"content_block_start", {
            "type": "content_block_start", "index": self.index,
            "content_block": {"type": kind, **fields}})

    def _delta(self, delta: dict[str, Any]) -> bytes:
        return event(b"content_block_delta", {"type": "content_block_delta",
                                              "index": self.index, "delta": delta})

    def _close(self) -> bytes:
        if self.open is None:
            return b""
        out = b""
        if self.open == "thinking":
            out = self._delta({"type": "signature_delta",
                               "signature": signature(self.thinking)})
            self.thinking = hashlib.sha256()
        self.open = None
        return out + event(b"content_block_stop", {"type": "content_block_stop",
                                                   "index": self.index})
