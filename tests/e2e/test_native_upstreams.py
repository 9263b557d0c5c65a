"""Native upstream deployments through the official `openai` SDK against real processes:
a gateway `modelyard serve` whose catalog has kind = "anthropic" and kind = "gemini"
deployments pointing at the recording fakes of tests/router/native_fake_server.py (no
engine: the gateway starts in a second or two)."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.e2e.server import RunningServer, running_server
from tests.router.native_fake_process import clear, received, running_native_fake

KEY_ENV = "MODELYARD_TEST_NATIVE_KEY"
WEATHER: Any = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object",
                                          "properties": {"city": {"type": "string"}}}}}


def _model(model_id: str, kind: str, url: str, upstream: str) -> str:
    base = f"{url}/v1" if kind == "anthropic" else f"{url}/v1beta"
    return (f'[[models]]\nid = "{model_id}"\ninput_price = 1\ncached_input_price = 0\n'
            f'output_price = 2\n[[models.deployments]]\nkind = "{kind}"\n'
            f'base_url = "{base}"\nupstream_model = "{upstream}"\napi_key_env = "{KEY_ENV}"\n\n')


@pytest.fixture(scope="module")
def fake() -> Iterator[str]:
    with running_native_fake() as url:
        yield url


@pytest.fixture(scope="module")
def gateway(fake: str, tmp_path_factory: pytest.TempPathFactory,
            data_dir: Path) -> Iterator[RunningServer]:
    models = [("claude/ok", "anthropic", "ok:Hello"),
              ("claude/thinking", "anthropic", "thinking:Yes"),
              ("claude/tools", "anthropic", "tools"),
              ("claude/busy", "anthropic", "status=529"),
              ("claude/broken", "anthropic", "streamerror:Partial"),
              ("gemini/ok", "gemini", "ok:Hello"),
              ("gemini/thinking", "gemini", "thinking:Yes"),
              ("gemini/tools", "gemini", "tools")]
    config = "[embedding]\nenabled = false\n\n" + "".join(
        _model(model_id, kind, fake, upstream) for model_id, kind, upstream in models)
    os.environ[KEY_ENV] = "native-secret"
    try:
        with running_server(data_dir, config, tmp_path_factory.mktemp("native")) as running:
            yield running
    finally:
        del os.environ[KEY_ENV]


@pytest.fixture(scope="module")
def sdk(gateway: RunningServer) -> Iterator[openai.OpenAI]:
    key = gateway.create_key("native", balance="1000")
    with openai.OpenAI(base_url=gateway.api_url, api_key=key, max_retries=0,
                       timeout=30) as client:
        yield client


def _last_record(gateway: RunningServer, model: str) -> dict[str, Any]:
    deadline = time.monotonic() + 10
    while True:
        records = gateway.admin("GET", "/usage/records?account=native&limit=1")["data"]
        if records and records[0]["model"] == model:
            record: dict[str, Any] = records[0]
            return record
        assert time.monotonic() < deadline
        time.sleep(0.05)


@pytest.mark.parametrize("model, prompt, cached, completion", [
    ("claude/ok", 16, 3, 7), ("gemini/ok", 11, 3, 5)])
def test_whole_and_streamed_answers_are_billed_from_the_upstreams_usage(
        sdk: openai.OpenAI, gateway: RunningServer, fake: str, model: str, prompt: int,
        cached: int, completion: int) -> None:
    clear(fake)
    reply = sdk.chat.completions.create(model=model, max_tokens=20, temperature=0.5,
                                        messages=[{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "Hello"
    assert reply.choices[0].finish_reason == "stop"
    usage = reply.usage
    assert usage is not None and usage.prompt_tokens == prompt
    assert usage.completion_tokens == completion
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == cached
    record = _last_record(gateway, model)
    assert record["cost_micros"] == (prompt - cached) * 1 + completion * 2
    assert record["estimated"] is False
    [call] = received(fake)
    assert call["headers"].get("x-api-key", call["headers"].get("x-goog-api-key")) == \
        "native-secret"
    if model.startswith("claude"):
        assert call["body"]["system"] == [{"type": "text", "text": "Be brief."}]
        assert call["body"]["max_tokens"] == 20 and call["body"]["temperature"] == 0.5
    else:
        assert call["body"]["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
        assert call["body"]["generationConfig"] == {"temperature": 0.5,
                                                    "maxOutputTokens": 20}

    chunks = list(sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "Hello"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == completion
    assert _last_record(gateway, model)["cost_micros"] == (prompt - cached) + completion * 2


@pytest.mark.parametrize("model, thought", [("claude/thinking", "Let me think."),
                                            ("gemini/thinking", "Thinking it over.")])
def test_reasoning_comes_back_as_reasoning_content(sdk: openai.OpenAI, fake: str, model: str,
                                                   thought: str) -> None:
    clear(fake)
    reply = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "?"}],
                                        max_tokens=3000, extra_body={"thinking_budget": 2048})
    message: Any = reply.choices[0].message
    assert message.content == "Yes" and message.reasoning_content == thought
    body = received(fake)[0]["body"]
    if model.startswith("claude"):
        assert body["thinking"] == {"type": "enabled", "budget_tokens": 2048}
    else:
        assert body["generationConfig"]["thinkingConfig"] == {"thinkingBudget": 2048,
                                                              "includeThoughts": True}
    chunks = list(sdk.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "?"}], stream=True,
        extra_body={"enable_thinking": True}))
    deltas: list[Any] = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == thought
    assert "".join(d.content or "" for d in deltas) == "Yes"


@pytest.mark.parametrize("model", ["claude/tools", "gemini/tools"])
def test_a_tool_call_round_trip(sdk: openai.OpenAI, fake: str, model: str) -> None:
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    reply = sdk.chat.completions.create(model=model, messages=messages, tools=[WEATHER],
                                        tool_choice="auto")
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    assert call.function.arguments == '{"city":"Paris"}'

    chunks = list(sdk.chat.completions.create(model=model, messages=messages,
                                              tools=[WEATHER], stream=True))
    fragments = [t for c in chunks if c.choices for t in c.choices[0].delta.tool_calls or ()]
    assert fragments[0].id and fragments[0].function and \
        fragments[0].function.name == "get_weather"
    assert "".join(f.function.arguments or "" for f in fragments if f.function) == \
        '{"city":"Paris"}'
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    clear(fake)  # the call and its result go back in the API's own terms
    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": call.id, "content": "sunny"}]
    sdk.chat.completions.create(model=model, messages=messages, tools=[WEATHER])
    body = received(fake)[0]["body"]
    if model.startswith("claude"):
        assert body["messages"][1]["content"][-1] == {
            "type": "tool_use", "id": call.id, "name": "get_weather", "input": {"city": "Paris"}}
        assert body["messages"][2] == {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call.id, "content": "sunny"}]}
    else:
        assert body["contents"][1]["parts"][-1] == {
            "functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}
        assert body["contents"][2] == {"role": "user", "parts": [{"functionResponse": {
            "name": "get_weather", "response": {"result": "sunny"}}}]}


def test_refusals_and_an_overloaded_upstream(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        sdk.chat.completions.create(model="claude/ok", logprobs=True,
                                    messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["param"] == "logprobs"  # type: ignore[index]
    with pytest.raises(openai.UnprocessableEntityError) as refused:
        sdk.chat.completions.create(model="gemini/ok", logit_bias={"5": 1},
                                    messages=[{"role": "user", "content": "hi"}])
    assert refused.value.body["param"] == "logit_bias"  # type: ignore[index]
    with pytest.raises(openai.APIStatusError) as busy:  # Anthropic's 529, retry-after: 7
        sdk.chat.completions.create(model="claude/busy",
                                    messages=[{"role": "user", "content": "hi"}])
    assert busy.value.status_code == 503
    assert busy.value.response.headers["retry-after"] == "7"


def test_messages_to_an_anthropic_model_are_relayed_natively(
        sdk: openai.OpenAI, gateway: RunningServer, fake: str) -> None:
    """POST /v1/messages through the `anthropic` SDK: the body reaches the deployment as
    the client wrote it (its model name replaced), and the answer comes back as the
    deployment wrote it, billed from its usage."""
    import anthropic

    key = gateway.create_key("native")  # the account the `sdk` fixture created
    client = anthropic.Anthropic(base_url=gateway.base_url, api_key=key, max_retries=0,
                                 timeout=30)
    clear(fake)
    message = client.messages.create(
        model="claude/thinking", max_tokens=2000, system="Be brief.",
        thinking={"type": "enabled", "budget_tokens": 1024}, metadata={"user_id": "u-1"},
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi",
                                                "cache_control": {"type": "ephemeral"}}]}])
    [call] = received(fake)
    assert call["body"] == {
        "model": "thinking:Yes", "max_tokens": 2000, "system": "Be brief.",
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "metadata": {"user_id": "u-1"},
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hi",
                                                   "cache_control": {"type": "ephemeral"}}]}]}
    assert message.id == "msg_fake" and message.model == "claude/thinking"
    thinking, text = message.content
    assert thinking.type == "thinking" and thinking.signature == "c2ln"
    assert text.type == "text" and text.text == "Yes"
    assert message.usage.cache_read_input_tokens == 3
    assert _last_record(gateway, "claude/thinking")["cost_micros"] == 13 + 7 * 2

    with client.messages.stream(model="claude/tools", max_tokens=100,
                                messages=[{"role": "user", "content": "Weather?"}],
                                tools=[{"name": "get_weather", "input_schema": {
                                    "type": "object"}}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use" and final.model == "claude/tools"
    tool = final.content[-1]
    assert tool.type == "tool_use" and tool.input == {"city": "Paris"}
    assert _last_record(gateway, "claude/tools")["estimated"] is False

    with pytest.raises(anthropic.APIStatusError) as busy:  # the upstream's 529, retry-after
        client.messages.create(model="claude/busy", max_tokens=10,
                               messages=[{"role": "user", "content": "hi"}])
    assert busy.value.status_code == 529 and busy.value.response.headers["retry-after"] == "7"
    assert busy.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    text = ""
    with (pytest.raises(anthropic.APIError) as broken,  # the upstream's error event
          client.messages.stream(model="claude/broken", max_tokens=10,
                                 messages=[{"role": "user", "content": "hi"}]) as stream):
        for chunk in stream.text_stream:
            text += chunk
    assert text == "Partial" and "Overloaded" not in str(broken.value)  # ours, opaque
