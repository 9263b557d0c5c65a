"""Output items and stream events from hand-made deltas, each event checked against the
`openai` SDK's own types for it."""

from __future__ import annotations

from typing import Any

import orjson
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from modelyard.api.errors import APIError
from modelyard.api.responses_api.output import FailedStream, Output, event_bytes
from modelyard.providers.base import ChatDelta, ToolCallDelta
from modelyard.usage import Usage

EVENTS: TypeAdapter[Any] = TypeAdapter(ResponseStreamEvent)
BASE = {"id": "resp_1", "object": "response", "created_at": 1, "model": "m",
        "instructions": None, "parallel_tool_calls": True, "tool_choice": "auto",
        "tools": [], "metadata": {}, "store": True}
USED = Usage(prompt_tokens=10, cached_tokens=4, completion_tokens=7, reasoning_tokens=2)


def _run(deltas: list[ChatDelta]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    output = Output(dict(BASE))
    events = output.start()
    for delta in deltas:
        events += output.add(delta)
    body, last = output.finish(USED)
    events += last
    for event in events:
        EVENTS.validate_python(event)
    Response.model_validate(body)
    assert [event["sequence_number"] for event in events] == list(range(len(events)))
    return body, events


def test_reasoning_then_text() -> None:
    body, events = _run([ChatDelta("", Usage(), reasoning="think"),
                         ChatDelta("", Usage(), reasoning="ing"),
                         ChatDelta("Hel", Usage()), ChatDelta("lo", Usage(),
                                                              finish_reason="stop")])
    assert [event["type"] for event in events] == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done",
        "response.output_item.done", "response.completed"]
    reasoning, message = body["output"]
    assert reasoning["type"] == "reasoning"
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "thinking"}]
    assert message["content"][0]["text"] == "Hello"
    assert message["id"].startswith("msg_") and reasoning["id"].startswith("rs_")
    assert [event["output_index"] for event in events[2:-1]] == [0] * 7 + [1] * 7
    assert body["status"] == "completed"
    assert body["usage"] == {"input_tokens": 10,
                             "input_tokens_details": {"cached_tokens": 4,
                                                      "cache_write_tokens": 0},
                             "output_tokens": 7,
                             "output_tokens_details": {"reasoning_tokens": 2},
                             "total_tokens": 17}


def test_whole_and_streamed_tool_calls() -> None:
    body, events = _run([
        ChatDelta("", Usage(), tool_calls=(ToolCallDelta(0, "call_a", "f", '{"x":'),)),
        ChatDelta("", Usage(), tool_calls=(ToolCallDelta(0, "", "", "1}"),)),
        ChatDelta("", Usage(), tool_calls=(ToolCallDelta(1, "call_b", "g", "{}"),),
                  finish_reason="tool_calls")])
    first, second = body["output"]
    assert (first["call_id"], first["name"], first["arguments"]) == ("call_a", "f", '{"x":1}')
    assert (second["call_id"], second["name"], second["arguments"]) == ("call_b", "g", "{}")
    assert first["id"].startswith("fc_") and first["status"] == "completed"
    deltas = [e["delta"] for e in events if e["type"] ==
              "response.function_call_arguments.delta"]
    assert deltas == ['{"x":', "1}", "{}"]
    done = [e for e in events if e["type"] == "response.function_call_arguments.done"]
    assert [e["arguments"] for e in done] == ['{"x":1}', "{}"]


def test_a_cut_answer_is_incomplete() -> None:
    body, events = _run([ChatDelta("abc", Usage(), finish_reason="length")])
    assert body["status"] == "incomplete"
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}
    assert events[-1]["type"] == "response.incomplete"


def test_a_failure_after_the_start_is_response_failed() -> None:
    output = Output(dict(BASE))
    output.start()
    output.add(ChatDelta("partial", Usage()))
    style = FailedStream(output)
    raw = style.event(APIError(503, "no upstream is healthy", code="server_overloaded"))
    name, data = raw.decode().split("\n")[:2]
    assert name == "event: response.failed"
    event = orjson.loads(data.removeprefix("data: "))
    EVENTS.validate_python(event)
    assert event["sequence_number"] == 5  # after created, in_progress, added x2, delta
    assert event["response"]["status"] == "failed"
    assert event["response"]["error"] == {"code": "server_error",
                                          "message": "no upstream is healthy"}
    status, error = style.answer(APIError(404, "gone"))
    assert status == 404 and error["error"]["message"] == "gone"


def test_event_bytes_are_named_server_sent_events() -> None:
    raw = event_bytes({"type": "response.output_text.delta", "delta": "é\n"})
    assert raw == ('event: response.output_text.delta\n'
                   'data: {"type":"response.output_text.delta","delta":"é\\n"}\n\n').encode()
