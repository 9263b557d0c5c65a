"""Deployments of kind "anthropic" and "gemini" against the recording fakes in
tests/router/native_fake_server.py (a real process behind real sockets, no gateway): the
bodies each API is sent, field by field; answers streamed and whole read back as deltas;
errors, rate limits and retries."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from modelyard.config import CatalogModelConfig, DeploymentConfig, RouterConfig
from modelyard.providers.anthropic_upstream import AnthropicDeployment, AnthropicRelay
from modelyard.providers.base import (
    ChatDelta,
    ChatRequest,
    ProviderError,
    StreamError,
    ToolCallDelta,
)
from modelyard.providers.gemini_upstream import GeminiDeployment
from modelyard.providers.openai_compat import UpstreamDeployment
from modelyard.router.catalog import RoutedModel
from modelyard.sampling import Sampling
from modelyard.usage import Usage
from tests.router.native_fake_process import clear, received, running_native_fake

LEAKED = ("10.9.8.7", "gpu-7", "sk-ant", "http", "127.0.0.1", "\n")

WEATHER: dict[str, Any] = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"], "additionalProperties": False}}}
IMAGE = "data:image/png;base64,iVBORw0KGgo="
CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be brief."},
    {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"},
                                 {"type": "image_url", "image_url": {"url": IMAGE}}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
    {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
]


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with running_native_fake() as url:
        yield url


def _routed(kind: str, url: str, *upstreams: str, drop: bool = False) -> RoutedModel:
    base = f"{url}/v1" if kind == "anthropic" else f"{url}/v1beta"
    # the first deployment is tried first (the others only as its retries)
    deployments = tuple(DeploymentConfig(kind=kind, base_url=base,
                                         upstream_model=upstream, name=f"d{i}",
                                         weight=1e9 if i == 0 else 1.0)
                        for i, upstream in enumerate(upstreams))
    config = CatalogModelConfig(id="m", deployments=deployments, drop_unsupported_params=drop)
    native = AnthropicDeployment if kind == "anthropic" else GeminiDeployment
    return RoutedModel(config, RouterConfig(), [native(d, "secret-key") for d in deployments])


def _request(stream: bool, **fields: Any) -> ChatRequest:
    messages = fields.pop("messages", [{"role": "user", "content": "hi"}])
    return ChatRequest("req-1", messages, stream=stream, **{"max_tokens": 64, **fields})


async def _answer(model: RoutedModel, request: ChatRequest,
                  ) -> tuple[list[ChatDelta], BaseException | None]:
    deltas: list[ChatDelta] = []
    try:
        async with asyncio.timeout(5):
            prepared = await model.prepare_chat(request)
            async for delta in await model.start_chat(prepared):
                deltas.append(delta)
    except (ProviderError, StreamError) as exc:
        return deltas, exc
    finally:
        await model.close()
    return deltas, None


def _run(model: RoutedModel, request: ChatRequest) -> list[ChatDelta]:
    deltas, error = asyncio.run(_answer(model, request))
    assert error is None, error
    return deltas


def _calls(deltas: list[ChatDelta]) -> list[ToolCallDelta]:
    return [call for delta in deltas for call in delta.tool_calls]


def _arguments(deltas: list[ChatDelta], index: int = 0) -> str:
    return "".join(c.arguments for c in _calls(deltas) if c.index == index)


def _finishes(deltas: list[ChatDelta]) -> list[str]:
    return [d.finish_reason for d in deltas if d.finish_reason]


# -- Anthropic ------------------------------------------------------------------------

def test_anthropic_is_sent_every_field_it_can_express(fake: str) -> None:
    clear(fake)
    request = _request(True, messages=CONVERSATION, tools=[WEATHER], tool_choice="required",
                       parallel_tool_calls=False, stop=("END",), thinking_budget=2048,
                       sampling=Sampling(temperature=0.5, top_p=0.9, top_k=40))
    _run(_routed("anthropic", fake, "ok:hi"), request)
    [call] = received(fake)
    assert call["path"] == "/v1/messages"
    assert call["headers"]["x-api-key"] == "secret-key"
    assert call["headers"]["anthropic-version"] == "2023-06-01"
    assert "authorization" not in call["headers"]
    body = call["body"]
    assert body["model"] == "ok:hi" and body["max_tokens"] == 64 and body["stream"] is True
    assert body["system"] == [{"type": "text", "text": "Be brief."},
                              {"type": "text", "text": "Use tools."}]
    assert body["messages"] == [
        {"role": "user", "content": [
            {"type": "text", "text": "Weather in Paris and Rome?"},
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "get_weather",
             "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather",
             "input": {"city": "Rome"}}]},
        {"role": "user", "content": [  # both results in one turn
            {"type": "tool_result", "tool_use_id": "call_1", "content": '{"sky": "clear"}'},
            {"type": "tool_result", "tool_use_id": "call_2", "content": "rain"}]}]
    assert body["tools"] == [{"name": "get_weather", "description": "The weather in a city",
                              "input_schema": WEATHER["function"]["parameters"]}]
    assert body["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert body["stop_sequences"] == ["END"]
    assert (body["temperature"], body["top_p"], body["top_k"]) == (0.5, 0.9, 40)
    assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    assert set(body) == {"model", "max_tokens", "stream", "system", "messages", "tools",
                         "tool_choice", "stop_sequences", "temperature", "top_p", "top_k",
                         "thinking"}


def test_anthropic_tool_choice_thinking_and_model_defaults(fake: str) -> None:
    clear(fake)
    named = {"type": "function", "function": {"name": "get_weather"}}
    model = _routed("anthropic", fake, "ok")
    schema = {"type": "object", "properties": {"n": {"type": "integer"}},
              "additionalProperties": False}
    _run(model, _request(False, tools=[WEATHER], tool_choice=named, enable_thinking=False,
                         response_format={"type": "json_schema",
                                          "json_schema": {"name": "x", "schema": schema}}))
    _run(model, _request(False, reasoning_effort="high", messages=[
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]))
    first, second = (r["body"] for r in received(fake))
    assert first["tool_choice"] == {"type": "tool", "name": "get_weather"}
    assert first["thinking"] == {"type": "disabled"} and first["stream"] is False
    assert first["messages"] == [{"role": "user", "content": "hi"}]
    assert first["output_config"] == {"format": {"type": "json_schema", "schema": schema}}
    assert second["thinking"] == {"type": "enabled", "budget_tokens": 16384}
    assert second["messages"] == [{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]


@pytest.mark.parametrize("fields, param", [
    ({"logit_bias": {5: 1.0}}, "logit_bias"), ({"logprobs": True}, "logprobs"),
    ({"n": 2}, "n"), ({"seed": 7}, "seed"),
    ({"sampling": Sampling(frequency_penalty=0.5)}, "frequency_penalty"),
    ({"sampling": Sampling(min_p=0.1)}, "min_p"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"sampling": Sampling(temperature=1.5)}, "temperature"),
])
def test_anthropic_refuses_what_it_cannot_express_unless_dropped(
        fake: str, fields: dict[str, Any], param: str) -> None:
    clear(fake)
    _, error = asyncio.run(_answer(_routed("anthropic", fake, "ok"), _request(False, **fields)))
    assert isinstance(error, ProviderError) and error.status == 422 and error.param == param
    assert received(fake) == []
    _run(_routed("anthropic", fake, "ok", drop=True), _request(False, **fields))
    [call] = received(fake)
    if param == "temperature":  # clamped to Anthropic's range
        assert call["body"]["temperature"] == 1.0
    else:
        assert param not in call["body"]


@pytest.mark.parametrize("stream", [True, False])
def test_anthropic_answers_are_read_back(fake: str, stream: bool) -> None:
    deltas = _run(_routed("anthropic", fake, "ok:Hello"), _request(stream))
    assert "".join(d.text for d in deltas) == "Hello" and _finishes(deltas) == ["stop"]
    assert deltas[-1].usage == Usage(16, 3, 7, 0, False)  # 11 + 3 read + 2 written

    deltas = _run(_routed("anthropic", fake, "thinking:Yes"), _request(stream))
    assert "".join(d.reasoning for d in deltas) == "Let me think."
    assert "".join(d.text for d in deltas) == "Yes"

    deltas = _run(_routed("anthropic", fake, "tools"), _request(stream, tools=[WEATHER]))
    assert "".join(d.text for d in deltas) == "Checking."
    first = _calls(deltas)[0]
    assert (first.index, first.id, first.name) == (0, "toolu_01", "get_weather")
    assert _arguments(deltas) == '{"city":"Paris"}' and _finishes(deltas) == ["tool_calls"]
    if stream:  # input_json_delta fragments pass on as they come
        assert [c.arguments for c in _calls(deltas)] == ["", "", '{"city":"', 'Paris"}']

    deltas = _run(_routed("anthropic", fake, "noargs"), _request(stream, tools=[WEATHER]))
    assert _arguments(deltas) == "{}"
    deltas = _run(_routed("anthropic", fake, "max:Cut"), _request(stream))
    assert _finishes(deltas) == ["length"]


def test_anthropic_errors_and_rate_limits(fake: str) -> None:
    for status in (400, 413):  # the client's request refused: passed on, sanitized
        _, error = asyncio.run(_answer(_routed("anthropic", fake, f"leak={status}"),
                                       _request(False)))
        assert isinstance(error, ProviderError) and error.status == 400
        assert error.message.startswith("the upstream rejected the request: ")
        assert not any(word in error.message for word in LEAKED), error.message
    for status in (401, 403):  # our key: a 502, nothing of theirs
        _, error = asyncio.run(_answer(_routed("anthropic", fake, f"leak={status}"),
                                       _request(False)))
        assert isinstance(error, ProviderError) and error.status == 502
        assert error.message == "the upstream deployment failed (request req-1)"
    for status in (429, 529, 500):  # retried on the next deployment
        clear(fake)
        deltas = _run(_routed("anthropic", fake, f"status={status}", "ok:B"), _request(True))
        assert "".join(d.text for d in deltas) == "B"
        assert [r["body"]["model"] for r in received(fake)] == [f"status={status}", "ok:B"]
    _, error = asyncio.run(_answer(_routed("anthropic", fake, "status=529", "status=429"),
                                   _request(True)))
    assert isinstance(error, ProviderError) and error.status == 503
    assert error.retry_after == 7 and error.headers == {"Retry-After": "7"}

    deltas, error = asyncio.run(_answer(_routed("anthropic", fake, "streamerror:Partial"),
                                        _request(True)))
    assert "".join(d.text for d in deltas) == "Partial"
    assert isinstance(error, StreamError) and str(error) == \
        "the upstream deployment failed (request req-1)"


# -- Gemini ---------------------------------------------------------------------------

def test_gemini_is_sent_every_field_it_can_express(fake: str) -> None:
    clear(fake)
    schema = {"type": "object", "additionalProperties": False, "required": ["n"],
              "properties": {"n": {"type": ["integer", "null"]},
                             "tag": {"$ref": "#/$defs/tag"}},
              "$defs": {"tag": {"type": "string", "enum": ["a", "b"]}}}
    request = _request(True, messages=CONVERSATION, tools=[WEATHER], tool_choice="required",
                       stop=("END",), thinking_budget=1024, n=2, seed=7,
                       response_format={"type": "json_schema",
                                        "json_schema": {"name": "x", "schema": schema}},
                       sampling=Sampling(temperature=0.5, top_p=0.9, top_k=40,
                                         presence_penalty=0.25, frequency_penalty=0.5))
    _run(_routed("gemini", fake, "multi:hi"), request)
    [call] = received(fake)
    assert call["path"] == "/v1beta/models/multi%3Ahi:streamGenerateContent?alt=sse"
    assert call["headers"]["x-goog-api-key"] == "secret-key"
    assert "authorization" not in call["headers"]
    body = call["body"]
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."},
                                                   {"text": "Use tools."}]}
    assert body["contents"] == [
        {"role": "user", "parts": [
            {"text": "Weather in Paris and Rome?"},
            {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}}]},
        {"role": "model", "parts": [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}},
            {"functionCall": {"name": "get_weather", "args": {"city": "Rome"}}}]},
        {"role": "user", "parts": [
            {"functionResponse": {"name": "get_weather", "response": {"sky": "clear"}}},
            {"functionResponse": {"name": "get_weather", "response": {"result": "rain"}}}]}]
    assert body["generationConfig"] == {
        "temperature": 0.5, "topP": 0.9, "topK": 40, "frequencyPenalty": 0.5,
        "presencePenalty": 0.25, "maxOutputTokens": 64, "stopSequences": ["END"],
        "candidateCount": 2, "seed": 7, "responseMimeType": "application/json",
        "responseSchema": {"type": "OBJECT", "required": ["n"], "properties": {
            "n": {"type": "INTEGER", "nullable": True},
            "tag": {"type": "STRING", "enum": ["a", "b"]}}},
        "thinkingConfig": {"thinkingBudget": 1024, "includeThoughts": True}}
    assert body["tools"] == [{"functionDeclarations": [{
        "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "OBJECT", "properties": {"city": {"type": "STRING"}},
                       "required": ["city"]}}]}]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}
    assert set(body) == {"contents", "systemInstruction", "generationConfig", "tools",
                         "toolConfig"}


def test_gemini_whole_path_tool_choice_and_thinking_off(fake: str) -> None:
    clear(fake)
    named = {"type": "function", "function": {"name": "get_weather"}}
    _run(_routed("gemini", fake, "models/ok"), _request(
        False, tools=[WEATHER], tool_choice=named, enable_thinking=False,
        response_format={"type": "json_object"}))
    [call] = received(fake)
    assert call["path"] == "/v1beta/models/ok:generateContent"
    body = call["body"]
    assert body["toolConfig"] == {"functionCallingConfig": {
        "mode": "ANY", "allowedFunctionNames": ["get_weather"]}}
    assert body["generationConfig"] == {"maxOutputTokens": 64,
                                        "responseMimeType": "application/json",
                                        "thinkingConfig": {"thinkingBudget": 0}}
    assert body["contents"] == [{"role": "user", "parts": [{"text": "hi"}]}]


@pytest.mark.parametrize("fields, param", [
    ({"logit_bias": {5: 1.0}}, "logit_bias"), ({"logprobs": True}, "logprobs"),
    ({"sampling": Sampling(repetition_penalty=1.1)}, "repetition_penalty"),
    ({"tools": [WEATHER], "parallel_tool_calls": False}, "parallel_tool_calls"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {
        "type": "object", "not": {}}}}}, "response_format.json_schema.schema"),
])
def test_gemini_refuses_what_it_cannot_express(fake: str, fields: dict[str, Any],
                                               param: str) -> None:
    clear(fake)
    _, error = asyncio.run(_answer(_routed("gemini", fake, "ok"), _request(False, **fields)))
    assert isinstance(error, ProviderError) and error.status == 422 and error.param == param
    assert received(fake) == []


@pytest.mark.parametrize("stream", [True, False])
def test_gemini_answers_are_read_back(fake: str, stream: bool) -> None:
    deltas = _run(_routed("gemini", fake, "ok:Hello"), _request(stream))
    assert "".join(d.text for d in deltas) == "Hello" and _finishes(deltas) == ["stop"]
    assert deltas[-1].usage == Usage(11, 3, 5, 0, False)

    deltas = _run(_routed("gemini", fake, "thinking:Yes"), _request(stream))
    assert "".join(d.reasoning for d in deltas) == "Thinking it over."
    assert "".join(d.text for d in deltas) == "Yes"
    assert deltas[-1].usage == Usage(11, 3, 7, 2, False)  # thoughts count as completion

    deltas = _run(_routed("gemini", fake, "tools"), _request(stream, tools=[WEATHER]))
    [call] = _calls(deltas)
    assert call.name == "get_weather" and call.id.startswith("call_")
    assert call.arguments == '{"city":"Paris"}' and _finishes(deltas) == ["tool_calls"]

    deltas = _run(_routed("gemini", fake, "multi:A"), _request(stream, n=2))
    assert ["".join(d.text for d in deltas if d.index == i) for i in (0, 1)] == ["A", "AA"]
    assert _finishes(deltas) == ["stop", "stop"] and not deltas[-1].usage.estimated

    for mode, finish in (("max:Cut", "length"), ("safety", "content_filter"),
                         ("blocked", "content_filter")):
        assert _finishes(_run(_routed("gemini", fake, mode), _request(stream))) == [finish]


def test_gemini_errors_and_rate_limits(fake: str) -> None:
    _, error = asyncio.run(_answer(_routed("gemini", fake, "leak=400"), _request(False)))
    assert isinstance(error, ProviderError) and error.status == 400
    assert not any(word in error.message for word in LEAKED), error.message
    _, error = asyncio.run(_answer(_routed("gemini", fake, "leak=403"), _request(True)))
    assert isinstance(error, ProviderError) and error.status == 502
    clear(fake)
    deltas = _run(_routed("gemini", fake, "status=429", "ok:B"), _request(True))
    assert "".join(d.text for d in deltas) == "B" and len(received(fake)) == 2
    _, error = asyncio.run(_answer(_routed("gemini", fake, "status=429"), _request(True)))
    assert isinstance(error, ProviderError) and error.status == 503 and error.retry_after == 7
    deltas, error = asyncio.run(_answer(_routed("gemini", fake, "streamerror:Partial"),
                                        _request(True)))
    assert "".join(d.text for d in deltas) == "Pa" and isinstance(error, StreamError)


def test_a_text_completion_is_refused_by_native_kinds(fake: str) -> None:
    from modelyard.providers.base import RawPrompt
    for kind in ("anthropic", "gemini"):
        _, error = asyncio.run(_answer(_routed(kind, fake, "ok"), ChatRequest(
            "req-1", [], prompt=RawPrompt(text="Once"), max_tokens=8)))
        assert isinstance(error, ProviderError) and error.param == "prompt"


def test_openai_deployments_still_send_a_bearer_key() -> None:
    deployment = UpstreamDeployment(DeploymentConfig(base_url="http://127.0.0.1:9/v1"), "k")
    assert deployment.key_headers("k") == {"Authorization": "Bearer k"}
    assert GeminiDeployment.key_headers(deployment, None) == {}


# -- /v1/messages relayed to Anthropic deployments -------------------------------------

def _relayed(model: RoutedModel, body: dict[str, Any],
             ) -> tuple[list[bytes], dict[str, Any] | None, Usage, BaseException | None]:
    """The relayed events (or whole message), the final usage and what ended it."""
    async def main() -> tuple[list[bytes], dict[str, Any] | None, Usage,
                              BaseException | None]:
        events: list[bytes] = []
        request = _request(bool(body.get("stream")), max_tokens=body["max_tokens"])
        try:
            relay = await model.start_chat(model.prepare_native(request, body))
            assert isinstance(relay, AnthropicRelay)
            async for event in relay.events():
                events.append(event)
            return events, relay.message, relay.usage, None
        except (ProviderError, StreamError) as exc:
            return events, None, Usage(0, 0, 0), exc
        finally:
            await model.close()
    return asyncio.run(main())


def test_a_messages_request_is_relayed_as_it_came(fake: str) -> None:
    clear(fake)
    body = {"model": "claude", "max_tokens": 99, "stream": True, "system": "Be brief.",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi",
                                                       "cache_control": {"type": "ephemeral"}}]}],
            "thinking": {"type": "enabled", "budget_tokens": 1024},
            "metadata": {"user_id": "u1"}}
    model = _routed("anthropic", fake, "thinking:Yes")
    events, message, usage, error = _relayed(model, body)
    assert error is None and message is None
    [call] = received(fake)
    assert call["body"] == {**body, "model": "thinking:Yes"}  # nothing else changed
    assert call["headers"]["x-api-key"] == "secret-key"
    names = [event.split(b"\n", 1)[0] for event in events]
    assert names == [b"event: " + name for name in (
        b"message_start", b"ping", b"content_block_start", b"content_block_delta",
        b"content_block_delta", b"content_block_stop", b"content_block_start",
        b"content_block_delta", b"content_block_delta", b"content_block_stop",
        b"message_delta", b"message_stop")]
    assert b'"model":"m"' in events[0] and b"thinking:Yes" not in b"".join(events)
    assert b'"signature_delta"' in events[4] and events[-1].endswith(b"\n\n")
    assert usage == Usage(16, 3, 7, 0, False)

    clear(fake)
    events, message, usage, error = _relayed(model, {**body, "stream": False})
    assert error is None and events == [] and message is not None
    assert message["model"] == "m" and message["content"][0]["type"] == "thinking"
    assert usage == Usage(16, 3, 7, 0, False)


def test_a_relayed_request_is_retried_and_fails_like_any(fake: str) -> None:
    body = {"model": "claude", "max_tokens": 10, "stream": True,
            "messages": [{"role": "user", "content": "hi"}]}
    clear(fake)
    events, _, _, error = _relayed(_routed("anthropic", fake, "status=529", "ok:B"), body)
    assert error is None and b'"text":"B"' in b"".join(events)
    assert [r["body"]["model"] for r in received(fake)] == ["status=529", "ok:B"]
    events, _, _, error = _relayed(_routed("anthropic", fake, "streamerror:Part"), body)
    assert isinstance(error, StreamError) and b'"text":"Pa"' in b"".join(events)
    _, _, _, error = _relayed(_routed("anthropic", fake, "leak=400"), body)
    assert isinstance(error, ProviderError) and error.status == 400
    assert not any(word in error.message for word in LEAKED)


def test_anthropic_thinking_leaves_the_models_sampling_defaults_out(fake: str) -> None:
    clear(fake)
    deployment = DeploymentConfig(kind="anthropic", base_url=f"{fake}/v1", upstream_model="ok")
    config = CatalogModelConfig(id="m", deployments=(deployment,),
                                defaults=Sampling(temperature=0.6, top_k=20))
    model = RoutedModel(config, RouterConfig(), [AnthropicDeployment(deployment, None)])
    _run(model, _request(False, thinking_budget=1024))
    model = RoutedModel(config, RouterConfig(), [AnthropicDeployment(deployment, None)])
    _run(model, _request(False))
    thinking, plain = (r["body"] for r in received(fake))
    assert "temperature" not in thinking and "top_k" not in thinking
    assert (plain["temperature"], plain["top_k"]) == (0.6, 20)
