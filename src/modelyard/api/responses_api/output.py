"""A response's output items from the chat core's deltas, and the semantic stream events
that build them.

`Output` is a small state machine fed with `ChatDelta`s: reasoning, text and tool calls
each open an output item (`reasoning`, `message`, `function_call`) that stays open while
deltas of its kind arrive and is closed when another kind (or the end) comes. Each step
returns the events a stream sends for it (`response.output_item.added`,
`response.output_text.delta`, ...) numbered by `sequence_number`; a non-streamed answer
feeds the same machine and keeps only the items.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import orjson

from modelyard.api.errors import OPENAI, APIError
from modelyard.providers.base import ChatDelta, ToolCallDelta
from modelyard.usage import Usage


def new_id(prefix: str) -> str:
    return f"{prefix}_{os.urandom(16).hex()}"


def usage_body(used: Usage) -> dict[str, Any]:
    return {"input_tokens": used.prompt_tokens,
            "input_tokens_details": {"cached_tokens": used.cached_tokens,
                                     "cache_write_tokens": 0},
            "output_tokens": used.completion_tokens,
            "output_tokens_details": {"reasoning_tokens": used.reasoning_tokens},
            "total_tokens": used.prompt_tokens + used.completion_tokens}


def event_bytes(event: dict[str, Any]) -> bytes:
    kind: str = event["type"]
    return b"event: " + kind.encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


@dataclass
class _Item:
    kind: str
    body: dict[str, Any]
    index: int
    text: list[str] = field(default_factory=list)
    call_index: int = -1


@dataclass
class Output:
    """The response under construction: `base` holds its request-side fields (model,
    instructions, tools ...), `items` its finished output items."""

    base: dict[str, Any]
    items: list[dict[str, Any]] = field(default_factory=list)
    sequence: int = 0
    finish_reason: str | None = None
    _open: _Item | None = None

    def response(self, status: str, used: Usage | None = None,
                 error: dict[str, Any] | None = None) -> dict[str, Any]:
        body = {**self.base, "status": status, "output": list(self.items), "error": error,
                "incomplete_details": None, "usage": usage_body(used) if used else None}
        if status == "incomplete":
            body["incomplete_details"] = {"reason": "max_output_tokens"}
        return body

    def _event(self, kind: str, **fields: Any) -> dict[str, Any]:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return event

    def start(self) -> list[dict[str, Any]]:
        snapshot = self.response("in_progress")
        return [self._event("response.created", response=snapshot),
                self._event("response.in_progress", response=snapshot)]

    def add(self, delta: ChatDelta) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        if delta.reasoning:
            events += self._reasoning(delta.reasoning)
        if delta.text:
            events += self._text(delta.text)
        for call in delta.tool_calls:
            events += self._call(call)
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        return events

    def finish(self, used: Usage) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The finished response and the stream's last events."""
        events = self._close()
        status = "incomplete" if self.finish_reason == "length" else "completed"
        body = self.response(status, used)
        events.append(self._event(f"response.{status}", response=body))
        return body, events

    def failed(self, error: APIError) -> dict[str, Any]:
        """The `response.failed` event of a stream that fails after it started."""
        code = "rate_limit_exceeded" if error.status == 429 else "server_error"
        return self._event("response.failed", response=self.response(
            "failed", error={"code": code, "message": error.message}))

    # -- items ---------------------------------------------------------------------------

    def _opened(self, kind: str, body: dict[str, Any]) -> tuple[_Item, list[dict[str, Any]]]:
        events = self._close()
        item = _Item(kind, body, len(self.items))
        self._open = item
        events.append(self._event("response.output_item.added", output_index=item.index,
                                  item={**body, "status": "in_progress"}))
        return item, events

    def _reasoning(self, text: str) -> list[dict[str, Any]]:
        item, events = self._current("reasoning")
        if item is None:
            item, events = self._opened("reasoning", {
                "id": new_id("rs"), "type": "reasoning", "summary": [], "content": []})
            events.append(self._part_event("added", item, {"type": "reasoning_text",
                                                            "text": ""}))
        item.text.append(text)
        events.append(self._event("response.reasoning_text.delta", item_id=item.body["id"],
                                  output_index=item.index, content_index=0, delta=text))
        return events

    def _text(self, text: str) -> list[dict[str, Any]]:
        item, events = self._current("message")
        if item is None:
            item, events = self._opened("message", {
                "id": new_id("msg"), "type": "message", "role": "assistant", "content": []})
            events.append(self._part_event("added", item, _output_text("")))
        item.text.append(text)
        events.append(self._event("response.output_text.delta", item_id=item.body["id"],
                                  output_index=item.index, content_index=0, delta=text,
                                  logprobs=[]))
        return events

    def _call(self, call: ToolCallDelta) -> list[dict[str, Any]]:
        item, events = self._current("function_call")
        if item is None or (call.index != item.call_index and (call.id or call.name)):
            item, events = self._opened("function_call", {
                "id": new_id("fc"), "type": "function_call",
                "call_id": call.id or new_id("call"), "name": call.name, "arguments": ""})
            item.call_index = call.index
        if call.arguments:
            item.text.append(call.arguments)
            events.append(self._event("response.function_call_arguments.delta",
                                      item_id=item.body["id"], output_index=item.index,
                                      delta=call.arguments))
        return events

    def _current(self, kind: str) -> tuple[_Item | None, list[dict[str, Any]]]:
        item = self._open
        return (item if item is not None and item.kind == kind else None), []

    def _part_event(self, when: str, item: _Item, part: dict[str, Any]) -> dict[str, Any]:
        return self._event(f"response.content_part.{when}", item_id=item.body["id"],
                           output_index=item.index, content_index=0, part=part)

    def _close(self) -> list[dict[str, Any]]:
        item, self._open = self._open, None
        if item is None:
            return []
        text = "".join(item.text)
        body = {**item.body, "status": "completed"}
        events: list[dict[str, Any]] = []
        item_id = body["id"]
        if item.kind == "message":
            part = _output_text(text)
            body["content"] = [part]
            events += [self._event("response.output_text.done", item_id=item_id,
                                   output_index=item.index, content_index=0, text=text,
                                   logprobs=[]),
                       self._part_event("done", item, part)]
        elif item.kind == "reasoning":
            part = {"type": "reasoning_text", "text": text}
            body["content"] = [part]
            events += [self._event("response.reasoning_text.done", item_id=item_id,
                                   output_index=item.index, content_index=0, text=text),
                       self._part_event("done", item, part)]
        else:
            body["arguments"] = text
            events.append(self._event("response.function_call_arguments.done",
                                      item_id=item_id, output_index=item.index,
                                      name=body["name"], arguments=text))
        self.items.append(body)
        events.append(self._event("response.output_item.done", output_index=item.index,
                                  item=body))
        return events


def _output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


class FailedStream:
    """The error style of a started Responses stream: a failure ends it with
    `response.failed` (an error before the stream is answered in SPEC.md's shape)."""

    def __init__(self, output: Output) -> None:
        self.output = output

    def answer(self, error: APIError) -> tuple[int, dict[str, Any]]:
        return OPENAI.answer(error)

    def event(self, error: APIError) -> bytes:
        return event_bytes(self.output.failed(error))
