"""End-to-end: /v1/messages and /v1/messages/count_tokens through Anthropic's own SDK against
the session's server (and, for thinking, a server whose chat template opens a think block)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.server import RunningServer, running_server

WEATHER = {"name": "get_weather", "description": "Get the current weather in a city.",
           "input_schema": {"type": "object", "properties": {"city": {"type": "string"}},
                            "required": ["city"], "additionalProperties": False}}
HELLO: list[Any] = [{"role": "user", "content": "Say hello in five words."}]


@pytest.fixture
def sdk(server: RunningServer, api_key: str) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=server.base_url, api_key=api_key, max_retries=0,
                             timeout=120) as client:
        yield client


def test_create_answers_a_message_billed_as_count_tokens_counts(
        sdk: anthropic.Anthropic) -> None:
    system = "You are terse."
    message = sdk.messages.create(model=MODEL, max_tokens=40, system=system, messages=HELLO)
    assert message.id.startswith("msg_")
    assert message.type == "message" and message.role == "assistant"
    assert message.model == MODEL
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.stop_sequence is None
    counted = sdk.messages.count_tokens(model=MODEL, system=system, messages=HELLO)
    usage = message.usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == counted.input_tokens
    assert 0 < usage.output_tokens <= 40


def test_max_tokens_and_stop_sequence(sdk: anthropic.Anthropic) -> None:
    counting = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    cut = sdk.messages.create(model=MODEL, max_tokens=5, messages=counting)  # type: ignore[arg-type]
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 5
    stopped = sdk.messages.create(model=MODEL, max_tokens=60, messages=counting,  # type: ignore[arg-type]
                                  stop_sequences=["5"])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == "5"
    text = stopped.content[0].text  # type: ignore[union-attr]
    assert "4" in text and "5" not in text


def test_stream_events_parse_into_the_same_message(sdk: anthropic.Anthropic) -> None:
    kinds: list[str] = []
    with sdk.messages.stream(model=MODEL, max_tokens=40, messages=HELLO) as stream:
        for event in stream:
            kinds.append(event.type)
        text = stream.get_final_text()
        final = stream.get_final_message()
    whole = sdk.messages.create(model=MODEL, max_tokens=40, messages=HELLO)
    assert kinds[0] == "message_start"
    assert kinds[-2:] == ["message_delta", "message_stop"]
    assert "content_block_start" in kinds and "content_block_stop" in kinds
    assert text == whole.content[0].text  # type: ignore[union-attr]  (temperature 0)
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    assert (final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0)
            == whole.usage.input_tokens + (whole.usage.cache_read_input_tokens or 0))


def test_raw_stream_is_anthropics_event_sequence(server: RunningServer, api_key: str) -> None:
    with httpx.stream("POST", f"{server.base_url}/v1/messages", timeout=120,
                      headers={"x-api-key": api_key, "anthropic-version": "2023-06-01"},
                      json={"model": MODEL, "max_tokens": 10, "messages": HELLO,
                            "stream": True}) as response:
        assert response.status_code == 200
        names = [line.removeprefix("event: ") for line in response.iter_lines()
                 if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_tools_round_trip(sdk: anthropic.Anthropic) -> None:
    question: list[Any] = [{"role": "user", "content": "What is the weather in Oslo?"}]
    first = sdk.messages.create(model=MODEL, max_tokens=100, tools=[WEATHER],  # type: ignore[list-item]
                                tool_choice={"type": "any"}, messages=question)
    assert first.stop_reason == "tool_use"
    calls = [block for block in first.content if block.type == "tool_use"]
    assert calls and calls[0].name == "get_weather"
    assert isinstance(calls[0].input, dict) and isinstance(calls[0].input.get("city"), str)
    history = [*question, {"role": "assistant", "content": first.content},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": calls[0].id,
                                             "content": "Sunny, 21 degrees Celsius."}]}]
    answer = sdk.messages.create(model=MODEL, max_tokens=60, tools=[WEATHER],  # type: ignore[list-item]
                                 tool_choice={"type": "none"}, messages=history)
    assert answer.stop_reason in ("end_turn", "max_tokens")
    assert answer.content and answer.content[0].type == "text"
    counted = sdk.messages.count_tokens(model=MODEL, tools=[WEATHER],  # type: ignore[list-item]
                                        messages=history)
    usage = answer.usage
    assert usage.input_tokens + (usage.cache_read_input_tokens or 0) == counted.input_tokens


def test_streamed_tool_call_arrives_as_input_json(sdk: anthropic.Anthropic) -> None:
    with sdk.messages.stream(model=MODEL, max_tokens=100, tools=[WEATHER],  # type: ignore[list-item]
                             tool_choice={"type": "tool", "name": "get_weather"},
                             messages=[{"role": "user", "content": "Weather in Rome?"}]) as stream:
        final = stream.get_final_message()
    assert final.stop_reason == "tool_use"
    call = final.content[-1]
    assert call.type == "tool_use" and call.name == "get_weather"
    assert isinstance(call.input, dict) and "city" in call.input


def test_errors_are_the_sdks_own_classes(server: RunningServer,
                                         sdk: anthropic.Anthropic) -> None:
    with anthropic.Anthropic(base_url=server.base_url, api_key="sk-wrong",
                             max_retries=0) as bad, \
            pytest.raises(anthropic.AuthenticationError) as unauthorized:
        bad.messages.create(model=MODEL, max_tokens=5, messages=HELLO)
    assert unauthorized.value.body["error"]["type"] == "authentication_error"  # type: ignore[index]
    with pytest.raises(anthropic.NotFoundError) as missing:
        sdk.messages.create(model="no-such-model", max_tokens=5, messages=HELLO)
    assert missing.value.body["error"]["type"] == "not_found_error"  # type: ignore[index]
    with pytest.raises(anthropic.BadRequestError) as bad_field:
        sdk.messages.create(model=MODEL, max_tokens=5, messages=HELLO,
                           extra_body={"temperature": 1.5})
    assert bad_field.value.body == {"type": "error", "error": {  # type: ignore[comparison-overlap]
        "type": "invalid_request_error", "message": bad_field.value.body["error"]["message"]}}  # type: ignore[index]
    assert "temperature" in bad_field.value.message
    with pytest.raises(anthropic.BadRequestError, match="image"):
        sdk.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": [
            {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                         "data": "iVBORw0KGgo="}}]}])


def test_bearer_keys_work_too(server: RunningServer, api_key: str) -> None:
    with anthropic.Anthropic(base_url=server.base_url, auth_token=api_key,
                             max_retries=0) as bearer:
        assert bearer.messages.count_tokens(model=MODEL, messages=HELLO).input_tokens > 0


THINK_TEMPLATE = Path(__file__).parent / "fixtures" / "think_template.jinja"


@pytest.fixture(scope="module")
def thinking_sdk(data_dir: Path, default_model_path: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[anthropic.Anthropic]:
    config = f"""
[model]
chat_template = "{THINK_TEMPLATE}"

[engine]
max_sequences = 4
context_per_sequence = 2048
"""
    with running_server(data_dir, config, tmp_path_factory.mktemp("thinking-messages")) as server:
        key = server.create_key("thinker", balance="100")
        with anthropic.Anthropic(base_url=server.base_url, api_key=key, max_retries=0,
                                 timeout=300) as client:
            yield client


def test_thinking_comes_first_with_a_signature(thinking_sdk: anthropic.Anthropic) -> None:
    question: list[Any] = [{"role": "user", "content": "Why is the sky blue? Think first."}]
    # The template opens the block by default; Anthropic's smallest budget (1024 tokens)
    # would take long on a CPU, so the block is cut by max_tokens here.
    with thinking_sdk.messages.stream(model=MODEL, max_tokens=60,
                                      messages=question, extra_body={"temperature": 0}) as stream:
        deltas = [event.delta.type for event in stream if event.type == "content_block_delta"]
        message = stream.get_final_message()
    assert message.content[0].type == "thinking"
    assert message.content[0].thinking and message.content[0].signature
    assert "<think>" not in message.content[0].thinking
    assert deltas[0] == "thinking_delta" and "signature_delta" in deltas
    assert message.usage.output_tokens == 60 and message.stop_reason == "max_tokens"
    whole = thinking_sdk.messages.create(model=MODEL, max_tokens=60,
                                         messages=question, extra_body={"temperature": 0})
    assert whole.content[0].type == "thinking"
    assert whole.content[0].thinking == message.content[0].thinking
    assert whole.content[0].signature == message.content[0].signature
    # passed back in the next turn, as clients do
    again = thinking_sdk.messages.create(
        model=MODEL, max_tokens=20, extra_body={"temperature": 0},
        thinking={"type": "disabled"},
        messages=[*question, {"role": "assistant", "content": message.content},
                  {"role": "user", "content": "Now in one word?"}])
    assert [block.type for block in again.content] == ["text"]
