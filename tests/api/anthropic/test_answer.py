"""The core's deltas as an Anthropic message and as Anthropic's stream events."""

from __future__ import annotations

from typing import Any

import orjson

from modelyard.api.anthropic.answer import Collected, EventWriter, Head
from modelyard.providers.base import ChatDelta, ToolCallDelta
from modelyard.usage import Usage

USAGE = Usage(20, 5, 9)


def _events(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in raw.decode().strip().split("\n\n"):
        name, data = block.split("\n")
        events.append((name.removeprefix("event: "), orjson.loads(data.removeprefix("data: "))))
    return events


def _stream(head: Head, deltas: list[ChatDelta]) -> list[tuple[str, dict[str, Any]]]:
    writer = EventWriter(head)
    raw = writer.start(20) + b"".join(writer.delta(d) for d in deltas) + writer.finish(USAGE)
    return _events(raw)


DELTAS = [
    ChatDelta("", USAGE, reasoning="Think"),
    ChatDelta("", USAGE, reasoning="ing."),
    ChatDelta("Hel", USAGE),
    ChatDelta("lo", USAGE),
    ChatDelta("", USAGE, tool_calls=(ToolCallDelta(0, "call_1", "f", '{"a":'),)),
    ChatDelta("", USAGE, tool_calls=(ToolCallDelta(0, "", "", "1}"),)),
    ChatDelta("", USAGE, tool_calls=(ToolCallDelta(1, "call_2", "g", "{}"),),
              finish_reason="tool_calls"),
]


def test_blocks_in_order_with_a_signed_thinking_block() -> None:
    collected = Collected(Head("msg_1", "m"))
    for delta in DELTAS:
        collected.add(delta)
    body = collected.body(USAGE)
    thinking, text, first, second = body["content"]
    assert thinking["type"] == "thinking" and thinking["thinking"] == "Thinking."
    assert thinking["signature"].startswith("modelyard-sha256:")
    assert text == {"type": "text", "text": "Hello"}
    assert first == {"type": "tool_use", "id": "call_1", "name": "f", "input": {"a": 1}}
    assert second == {"type": "tool_use", "id": "call_2", "name": "g", "input": {}}
    assert body["stop_reason"] == "tool_use" and body["stop_sequence"] is None
    assert body["usage"] == {"input_tokens": 15, "output_tokens": 9,
                             "cache_creation_input_tokens": 0, "cache_read_input_tokens": 5}
    assert body["id"] == "msg_1" and body["type"] == "message" and body["role"] == "assistant"


def test_the_stream_is_anthropics_event_sequence() -> None:
    events = _stream(Head("msg_1", "m"), DELTAS)
    names = [name for name, _ in events]
    assert names == [
        "message_start", "ping",
        "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert all(body["type"] == name for name, body in events)
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 20
    deltas = [body["delta"] for name, body in events if name == "content_block_delta"]
    assert [d["type"] for d in deltas] == [
        "thinking_delta", "thinking_delta", "signature_delta", "text_delta", "text_delta",
        "input_json_delta", "input_json_delta", "input_json_delta"]
    assert deltas[2]["signature"] == Collected(Head("x", "m"), reasoning=["Thinking."]).body(
        USAGE)["content"][0]["signature"]
    starts = [body for name, body in events if name == "content_block_start"]
    assert [s["index"] for s in starts] == [0, 1, 2, 3]
    assert starts[2]["content_block"] == {"type": "tool_use", "id": "call_1", "name": "f",
                                          "input": {}}
    assert events[-2][1] == {"type": "message_delta",
                             "delta": {"stop_reason": "tool_use", "stop_sequence": None},
                             "usage": {"input_tokens": 15, "output_tokens": 9,
                                       "cache_creation_input_tokens": 0,
                                       "cache_read_input_tokens": 5}}


def test_a_reported_stop_string_is_cut_and_named() -> None:
    head = Head("msg_1", "m", ("STOP", "P"))
    deltas = [ChatDelta("abc ST", USAGE), ChatDelta("OP", USAGE, finish_reason="stop")]
    events = _stream(head, deltas)
    text = "".join(body["delta"]["text"] for name, body in events
                   if name == "content_block_delta")
    assert text == "abc "
    assert events[-2][1]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}
    collected = Collected(head)
    for delta in deltas:
        collected.add(delta)
    body = collected.body(USAGE)
    assert body["content"] == [{"type": "text", "text": "abc "}]
    assert (body["stop_reason"], body["stop_sequence"]) == ("stop_sequence", "STOP")


def test_held_text_that_is_no_stop_is_released() -> None:
    events = _stream(Head("msg_1", "m", ("STOP",)),
                     [ChatDelta("abc ST", USAGE), ChatDelta("ILL", USAGE, finish_reason="stop")])
    text = "".join(body["delta"]["text"] for name, body in events
                   if name == "content_block_delta")
    assert text == "abc STILL"
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
