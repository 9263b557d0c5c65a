"""POST /v1/responses (and GET/DELETE /v1/responses/{id}) through the official `openai`
SDK against the session's server: whole and streamed answers, a function tool's round
trip, `text.format` json_schema, `previous_response_id`, stored responses per account."""

from __future__ import annotations

import json
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.server import RunningServer

WEATHER = {
    "type": "function", "name": "get_weather",
    "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False},
    "strict": True,
}


def test_whole_answer(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Say hello in one word.",
                                       instructions="Answer briefly.", max_output_tokens=16,
                                       metadata={"case": "whole"})
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status in ("completed", "incomplete")
    assert response.output_text
    message = response.output[0]
    assert message.type == "message" and message.role == "assistant"
    assert response.instructions == "Answer briefly."
    assert response.metadata == {"case": "whole"}
    usage = response.usage
    assert usage is not None and usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens >= 0
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_stream_events(client: openai.OpenAI) -> None:
    stream = client.responses.create(model=MODEL, input="Count from 1 to 5.",
                                     max_output_tokens=24, stream=True)
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[2:4] == ["response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    assert deltas == done.text and deltas
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output_text == deltas
    assert final.usage is not None and final.usage.output_tokens > 0


def test_the_sdks_stream_helper_assembles_the_same_answer(client: openai.OpenAI) -> None:
    """`responses.stream` rebuilds the response from the events alone (items, parts and
    deltas must agree): its result is the final event's response."""
    with client.responses.stream(model=MODEL, input="Name three colors.",
                                 max_output_tokens=24, store=False) as stream:
        texts = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert final.output_text == "".join(texts) and texts
    assert final.output[0].type == "message"


def test_function_tool_round_trip(client: openai.OpenAI) -> None:
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.responses.create(model=MODEL, input=question,  # type: ignore[arg-type]
                                    tools=[WEATHER], tool_choice="required",  # type: ignore[list-item]
                                    store=False, max_output_tokens=64)
    calls = [item for item in first.output if item.type == "function_call"]
    assert calls, first.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id
    assert isinstance(json.loads(call.arguments)["city"], str)
    follow: list[Any] = [*question, call.model_dump(exclude_none=True),
                         {"type": "function_call_output", "call_id": call.call_id,
                          "output": json.dumps({"temperature_c": 21, "sky": "sunny"})}]
    second = client.responses.create(model=MODEL, input=follow, tools=[WEATHER],  # type: ignore[list-item]
                                     max_output_tokens=48, store=False)
    # the tool's answer reached the model: it answers (or calls again), and the prompt
    # holds the call and its output
    assert second.output
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens


def test_streamed_function_call(client: openai.OpenAI) -> None:
    stream = client.responses.create(
        model=MODEL, input="What is the weather in Oslo?", tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"}, stream=True,
        max_output_tokens=64, store=False)
    events = list(stream)
    kinds = [event.type for event in events]
    assert "response.function_call_arguments.delta" in kinds
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert json.loads(done.arguments)["city"]
    final = events[-1].response  # type: ignore[union-attr]
    assert final.output[-1].type == "function_call"
    assert final.output[-1].arguments == done.arguments


def test_json_schema_format(client: openai.OpenAI) -> None:
    schema = {"type": "object",
              "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    response = client.responses.create(
        model=MODEL, input="Invent a person with a name and an age.", max_output_tokens=64,
        text={"format": {"type": "json_schema", "name": "person", "schema": schema,
                         "strict": True}}, store=False)
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text is not None and response.text.format is not None
    assert response.text.format.type == "json_schema"


def test_previous_response_and_storage(client: openai.OpenAI) -> None:
    first = client.responses.create(
        model=MODEL, input="My name is Zanthor. Reply with OK.", max_output_tokens=8)
    second = client.responses.create(
        model=MODEL, input="What is my name? Answer with the name only.",
        previous_response_id=first.id, max_output_tokens=8)
    assert "Zanthor" in second.output_text
    assert second.previous_response_id == first.id
    # the continuation's prompt holds the first exchange: more input tokens than alone
    assert second.usage is not None and first.usage is not None
    assert second.usage.input_tokens > first.usage.input_tokens
    read = client.responses.retrieve(second.id)
    assert read.id == second.id and read.output_text == second.output_text
    deleted = client.responses.delete(second.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(second.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model=MODEL, input="hi", previous_response_id=second.id)


def test_store_false_keeps_nothing(client: openai.OpenAI) -> None:
    response = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4,
                                       store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(response.id)


def test_another_accounts_response_is_not_found(server: RunningServer,
                                                client: openai.OpenAI) -> None:
    mine = client.responses.create(model=MODEL, input="Hi", max_output_tokens=4)
    other_key = server.create_key("e2e-responses-other", balance="10")
    with openai.OpenAI(base_url=server.api_url, api_key=other_key, max_retries=0) as other:
        for call in (lambda: other.responses.retrieve(mine.id),
                     lambda: other.responses.delete(mine.id),
                     lambda: other.responses.create(model=MODEL, input="Hi",
                                                    previous_response_id=mine.id)):
            with pytest.raises(openai.NotFoundError) as caught:
                call()
            assert caught.value.body["code"] == "response_not_found"  # type: ignore[index]
    assert client.responses.retrieve(mine.id).id == mine.id


@pytest.mark.parametrize("response_id", ["resp_x", "resp_" + "0" * 32, "a%00b", "x" * 300])
def test_unknown_or_invalid_ids_are_not_found(server: RunningServer, api_key: str,
                                              response_id: str) -> None:
    headers = {"Authorization": f"Bearer {api_key}"}
    for method in ("GET", "DELETE"):
        answer = httpx.request(method, f"{server.api_url}/responses/{response_id}",
                               headers=headers, timeout=30)
        assert answer.status_code == 404, answer.text
        error = answer.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
        assert "\x00" not in error["message"]


@pytest.mark.parametrize(("body", "status", "param"), [
    ({"input": "hi", "temperature": "hot"}, 400, "temperature"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, 422, "tools[0].type"),
    ({"input": [{"type": "message", "role": "user",
                 "content": [{"type": "input_image", "image_url": "x"}]}]}, 422,
     "input[0].content"),
    ({"input": "hi", "tool_choice": "required"}, 422, "tool_choice"),
    ({"input": "hi", "metadata": {str(i): "v" for i in range(17)}}, 422, "metadata"),
    ({"input": "hi", "previous_response_id": "resp_\x01"}, 422, "previous_response_id"),
    ({"input": [{"role": "user", "content": "x"}] * 3000}, 422, "input"),
    ({"input": "hi", "background": True}, 422, "background"),
    ({}, 422, "input"),
])
def test_refusals(server: RunningServer, api_key: str, body: dict[str, Any], status: int,
                  param: str) -> None:
    answer = httpx.post(f"{server.api_url}/responses", json={"model": MODEL, **body},
                        headers={"Authorization": f"Bearer {api_key}"}, timeout=30)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["param"] == param
