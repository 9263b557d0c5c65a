"""Upstream deployments through the official SDK against real processes: a gateway
`modelyard serve` whose catalog routes to the session's modelyard server (the real
default model) and to the fault-injecting upstream in tests/router/fault_server.py."""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.server import RunningServer, free_port, metric_value, running_server
from tests.router.fault_process import running_fault_server


@pytest.fixture(scope="module")
def fault() -> Iterator[str]:
    with running_fault_server() as url:
        yield url


def _deployment(url: str, upstream: str, **extra: Any) -> str:
    lines = ["[[models.deployments]]", f'base_url = "{url}/v1"', f'upstream_model = "{upstream}"']
    lines += [f"{key} = {value!r}".replace("'", '"') for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def _model(model_id: str, *deployments: str, extra: str = "") -> str:
    return f'[[models]]\nid = "{model_id}"\ninput_price = 1\noutput_price = 2\n{extra}\n' + \
        "".join(deployments)


@pytest.fixture(scope="module")
def gateway(server: RunningServer, api_key: str, fault: str,
            tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Iterator[RunningServer]:
    dead = f"http://127.0.0.1:{free_port()}"
    # The gateway runs the built-in engine too, for the model that mixes it with an
    # upstream (small: it answers only that model's few requests).
    config = "[router]\nbreaker_failures = 2\nbreaker_cooldown_seconds = 1.0\n" \
        "usage_drain_seconds = 5.0\n\n[engine]\nmax_sequences = 2\n" \
        "context_per_sequence = 1024\n\n" + "".join([
            _model("mixed/engine-or-up", '[[models.deployments]]\nkind = "local"\n',
                   _deployment(fault, "ok:UP")),
            _model("up/qwen", _deployment(server.base_url, MODEL, profile="passthrough",
                                          api_key_env="MODELYARD_TEST_UPSTREAM_KEY"),
                   extra="context_length = 2048"),
            _model("up/minilm", _deployment(server.base_url, "all-minilm-l6-v2",
                                            api_key_env="MODELYARD_TEST_UPSTREAM_KEY"),
                   extra='task = "embedding"'),
            _model("fault/weighted", _deployment(fault, "ok:A", weight=1.0),
                   _deployment(fault, "ok:B", weight=3.0)),
            _model("fault/affinity", _deployment(fault, "ok:A") + "prefix_cache = true\n",
                   _deployment(fault, "ok:B") + "prefix_cache = true\n"),
            _model("fault/failover", _deployment(fault, "toggle:T"), _deployment(fault, "ok:B"),
                   _deployment(dead, "ok:dead", connect_timeout=0.5)),
            _model("fault/reset", _deployment(fault, "reset:X"), _deployment(fault, "reset:Y")),
            _model("fault/vllm", _deployment(fault, "reasoning:V", profile="vllm")),
            _model("fault/nousage", _deployment(fault, "nousage:N")),
            _model("fault/malformed", _deployment(fault, "malformed")),
            _model("fault/slow", _deployment(fault, "slow=3:S", first_token_timeout=0.3)),
            _model("fault/slow-whole", _deployment(fault, "slow=3:S", total_timeout=0.3)),
            _model("fault/429", _deployment(fault, "status=429")),
            _model("fault/tools", _deployment(fault, "tools")),
            _model("fault/logprobs", _deployment(fault, "logprobs:L")),
            _model("fault/drip", _deployment(fault, "drip=40:D")),
            _model("fault/capped", _deployment(fault, "drip=40:C", max_concurrency=1)),
            _model("fault/comments", _deployment(fault, "comments:P", total_timeout=1.0)),
            _model("fault/continue", _deployment(fault, "continue:K")),
            _model("fault/hangup", _deployment(fault, "hangup")),
            _model("fault/nulllogprob", _deployment(fault, "nulllogprob:Q")),
            *(_model(f"fault/leak-{status}", _deployment(fault, f"leak={status}"))
              for status in (400, 401, 500)),
        ])
    os.environ["MODELYARD_TEST_UPSTREAM_KEY"] = api_key
    try:
        with running_server(data_dir, config, tmp_path_factory.mktemp("gateway")) as running:
            yield running
    finally:
        del os.environ["MODELYARD_TEST_UPSTREAM_KEY"]


@pytest.fixture(scope="module")
def sdk(gateway: RunningServer) -> Iterator[openai.OpenAI]:
    key = gateway.create_key("upstreams", balance="1000")
    with openai.OpenAI(base_url=gateway.api_url, api_key=key, max_retries=0,
                       timeout=60) as client:
        yield client


def _received(fault: str) -> list[dict[str, Any]]:
    received: list[dict[str, Any]] = httpx.get(f"{fault}/requests", timeout=5).json()
    return received


def _message(error: openai.APIStatusError) -> str:
    """The error body's own message (the SDK's `message` adds the status before it)."""
    message: str = error.body["message"]  # type: ignore[index]
    return message


def _say(sdk: openai.OpenAI, model: str, **kwargs: Any) -> str:
    reply = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}],
                                        **kwargs)
    return reply.choices[0].message.content or ""


def test_catalog_lists_upstream_models(sdk: openai.OpenAI) -> None:
    ids = {model.id for model in sdk.models.list()}
    assert {"up/qwen", "fault/weighted", "fault/vllm"} <= ids
    # [[models]] without [model]: the engine (running for the mixed model's local
    # deployment) is not served under its own id, so it cannot be used at other prices
    assert MODEL not in ids


def test_a_modelyard_upstream_streaming_and_not(sdk: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Say hello in one word."}]
    reply = sdk.chat.completions.create(model="up/qwen", messages=messages, max_tokens=8,
                                        temperature=0)
    assert reply.model == "up/qwen" and reply.choices[0].message.content
    assert reply.usage is not None and reply.usage.completion_tokens >= 1
    chunks = list(sdk.chat.completions.create(model="up/qwen", messages=messages, max_tokens=8,
                                              temperature=0, stream=True,
                                              stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content  # greedy: the same answer
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens


def test_weights_hold_over_a_thousand_requests(sdk: openai.OpenAI) -> None:
    counts = Counter(_say(sdk, "fault/weighted") for _ in range(1000))
    assert set(counts) == {"A", "B"}
    # B has weight 3 of 4: binomial(1000, 0.75), sd 13.7; 5 sd makes a flake ~1e-6
    assert abs(counts["B"] - 750) < 5 * math.sqrt(1000 * 0.75 * 0.25)


def test_a_conversation_stays_on_one_replica_and_accounts_are_placed_apart(
        sdk: openai.OpenAI, gateway: RunningServer) -> None:
    # Two deployments that keep a prefix cache: cache-aware routing ([router] affinity,
    # on by default) sends every turn of a conversation where its first turn went, by the
    # caller's account and the conversation's start.
    other_key = gateway.create_key("affinity-other", balance="1000")

    def placed(client: openai.OpenAI) -> list[list[str]]:
        conversations = []
        for i in range(24):
            messages: Any = [{"role": "user", "content": f"conversation {i}"}]
            tags = []
            for turn in range(3):
                tags.append(client.chat.completions.create(
                    model="fault/affinity", messages=messages).choices[0].message.content)
                messages += [{"role": "assistant", "content": tags[-1]},
                             {"role": "user", "content": f"and then {turn}?"}]
            conversations.append(tags)
        return conversations
    with openai.OpenAI(base_url=gateway.api_url, api_key=other_key, max_retries=0,
                       timeout=60) as other:
        mine, theirs = placed(sdk), placed(other)
    for conversations in (mine, theirs):
        assert all(len(set(tags)) == 1 for tags in conversations), conversations
        assert {tags[0] for tags in conversations} == {"A", "B"}  # 2**-23 to fail
    # the other account's identical conversations are placed by its own key
    assert [tags[0] for tags in mine] != [tags[0] for tags in theirs]


def test_a_dead_deployment_is_routed_around_and_its_breaker_opens_and_closes(
        sdk: openai.OpenAI, fault: str, gateway: RunningServer) -> None:
    def breaker() -> float:
        labels = f'deployment="{fault}/v1#toggle:T",model="fault/failover"'
        return metric_value(gateway.metrics(), "modelyard_deployment_breaker_state", labels)
    httpx.post(f"{fault}/control/T/off", timeout=5)
    httpx.delete(f"{fault}/requests", timeout=5)
    answers = {_say(sdk, "fault/failover") for _ in range(20)}
    assert answers == {"B"}  # every request answered, by the healthy deployment
    toggled = [b for b in _received(fault) if b["model"] == "toggle:T"]
    assert len(toggled) == 2  # breaker_failures = 2, then it stays open
    assert breaker() == 2  # open
    httpx.post(f"{fault}/control/T/on", timeout=5)
    time.sleep(2.2)  # past the cool-down of the switched-off and the dead deployment
    httpx.delete(f"{fault}/requests", timeout=5)
    answers = {_say(sdk, "fault/failover") for _ in range(30)}
    assert answers == {"B", "T"}  # the probe succeeded and the breaker closed
    assert breaker() == 0
    assert metric_value(gateway.metrics(), "modelyard_deployment_tries_total",
                        f'deployment="{fault}/v1#toggle:T",model="fault/failover",'
                        'outcome="retried"') == 2


def test_a_reset_mid_stream_ends_with_an_error_event_and_is_not_retried(
        sdk: openai.OpenAI, fault: str) -> None:
    httpx.delete(f"{fault}/requests", timeout=5)
    text = ""
    stream = sdk.chat.completions.create(model="fault/reset", stream=True,
                                         messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.APIError, match=r"the upstream deployment failed \(request "
                       r"chatcmpl-[0-9a-f]+\)"):
        for chunk in stream:
            text += chunk.choices[0].delta.content or "" if chunk.choices else ""
    assert text == "ab"
    assert len(_received(fault)) == 1


def test_failures_before_the_first_byte(sdk: openai.OpenAI, fault: str) -> None:
    # A stream must start within the first-token timeout; a whole answer (the client did
    # not stream, nor is the upstream asked to) must come within the total timeout. An
    # upstream that hangs up after reading the request is not asked again.
    cases = [("fault/429", False), ("fault/429", True), ("fault/slow", True),
             ("fault/slow-whole", False), ("fault/hangup", False), ("fault/hangup", True)]
    for model, stream in cases:
        httpx.delete(f"{fault}/requests", timeout=5)
        with pytest.raises(openai.APIStatusError) as failed:
            _say(sdk, model, stream=stream) if not stream else list(
                sdk.chat.completions.create(model=model, stream=True,
                                            messages=[{"role": "user", "content": "hi"}]))
        assert failed.value.status_code == 503, model
        assert failed.value.response.headers["retry-after"]
        assert len(_received(fault)) == 1, model
    # An answer that came but cannot be read was generated: a 502, not asked again.
    for stream in (False, True):
        with pytest.raises(openai.APIStatusError) as failed:
            _say(sdk, "fault/malformed", stream=stream) if not stream else list(
                sdk.chat.completions.create(model="fault/malformed", stream=True,
                                            messages=[{"role": "user", "content": "hi"}]))
        assert failed.value.status_code == 502
        assert failed.value.type == "server_error" and failed.value.code == "upstream_error"
        assert _message(failed.value).startswith("the upstream deployment failed (request ")


def test_upstream_errors_reach_clients_without_the_upstreams_details(
        sdk: openai.OpenAI, fault: str) -> None:
    """An upstream's base URL and raw error body stay in the gateway's log: a refusal of
    the client's own request passes on sanitized, our key refused is a 502, a failure a
    503, each naming the request."""
    leaked = ("10.9.8.7", "gpu-7", "sk-live", "http", fault.removeprefix("http://"))
    expected = {400: (400, "the upstream rejected the request: "), 401: (502, "the upstream "
                "deployment failed (request chatcmpl-"), 500: (503, "no deployment of "
                "fault/leak-500 could answer (request chatcmpl-")}
    for status, (answer, prefix) in expected.items():
        with pytest.raises(openai.APIStatusError) as failed:
            _say(sdk, f"fault/leak-{status}")
        assert failed.value.status_code == answer, status
        message = _message(failed.value)
        assert message.startswith(prefix), message
        assert not any(word in message for word in leaked), message
        if status == 400:  # the refusal's own words, sanitized, are kept for the client
            assert message.endswith("max_tokens is too large")
            assert failed.value.body["param"] == "max_tokens"  # type: ignore[index]


def test_an_upstream_breaking_its_stream_ends_it_with_the_error_event(
        sdk: openai.OpenAI, gateway: RunningServer) -> None:
    """SSE comments for ever past the total timeout, and an event with `"logprob": null`:
    the stream ends with SPEC.md's error event, and the request is settled (its usage
    record written), so no reservation is left behind."""
    for model, match in (("fault/comments", "timed out"), ("fault/nulllogprob", "failed")):
        text = ""
        started = time.monotonic()
        stream = sdk.chat.completions.create(model=model, stream=True, logprobs=True,
                                             messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(openai.APIError, match=f"the upstream deployment {match}"):
            for chunk in stream:
                text += chunk.choices[0].delta.content or "" if chunk.choices else ""
        assert text in ("P", "Q") and time.monotonic() - started < 10
        deadline = time.monotonic() + 10
        while True:
            records = gateway.admin("GET", "/usage/records?account=upstreams&limit=1")["data"]
            if records and records[0]["model"] == model:
                break
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert records[0]["status"] >= 500 and records[0]["client_disconnected"] is False
    with pytest.raises(openai.APIStatusError) as failed:  # whole: an unreadable answer
        _say(sdk, "fault/nulllogprob", logprobs=True)
    assert failed.value.status_code == 502
    assert _say(sdk, "fault/continue") == "K"  # 100 Continue and 103 heads skipped


def test_vllm_profile_translation_on_the_upstreams_bytes(sdk: openai.OpenAI,
                                                         fault: str) -> None:
    httpx.delete(f"{fault}/requests", timeout=5)
    reply = sdk.chat.completions.create(
        model="fault/vllm", messages=[{"role": "user", "content": "hi"}], max_tokens=50,
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.05,
                    "enable_thinking": True})
    [body] = _received(fault)
    assert body["model"] == "reasoning:V"
    assert (body["top_k"], body["min_p"], body["repetition_penalty"]) == (20, 0.05, 1.05)
    assert body["chat_template_kwargs"] == {"enable_thinking": True}
    assert "enable_thinking" not in body and body["max_tokens"] == 50
    assert body["stream"] is False and "stream_options" not in body
    message: Any = reply.choices[0].message
    assert message.content == "V" and message.reasoning_content == "thinking it over"
    assert reply.usage is not None and reply.usage.prompt_tokens == 11

    httpx.delete(f"{fault}/requests", timeout=5)
    chunks = list(sdk.chat.completions.create(
        model="fault/vllm", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    [body] = _received(fault)
    assert body["stream"] is True and body["stream_options"] == {"include_usage": True}
    deltas: list[Any] = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == \
        "thinking it over"
    assert "".join(d.content or "" for d in deltas) == "V"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 7


def test_a_model_mixing_the_engine_and_an_upstream_answers_from_both(
        sdk: openai.OpenAI) -> None:
    answers = [_say(sdk, "mixed/engine-or-up", max_tokens=3, temperature=0)
               for _ in range(24)]
    from_upstream = answers.count("UP")
    # weights 1 : 1 over 24 requests: all on one side has probability 2 * 0.5**24
    assert 0 < from_upstream < len(answers), answers
    assert all(a for a in answers)  # the engine's answers are its own text


def test_upstream_tool_calls_stream_as_fragments_and_join_when_whole(
        sdk: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "weather in Paris?"}]
    chunks = list(sdk.chat.completions.create(model="fault/tools", messages=messages,
                                              stream=True))
    fragments = [call for c in chunks if c.choices for call in c.choices[0].delta.tool_calls or ()]
    assert [f.function.arguments for f in fragments if f.function] == \
        ["", '{"city": ', '"Paris"}']
    assert fragments[0].id == "call_up1" and fragments[0].function is not None
    assert fragments[0].function.name == "get_weather"
    assert all(f.id is None and f.index == 0 for f in fragments[1:])
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"

    reply = sdk.chat.completions.create(model="fault/tools", messages=messages)
    [call] = reply.choices[0].message.tool_calls or []
    assert call.id == "call_up1" and call.type == "function"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert call.function.arguments == '{"city": "Paris"}'  # type: ignore[union-attr]
    assert reply.choices[0].finish_reason == "tool_calls"


def test_upstream_logprobs_are_passed_on(sdk: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "hi"}]
    for stream in (False, True):
        if stream:
            chunks = list(sdk.chat.completions.create(
                model="fault/logprobs", messages=messages, stream=True, logprobs=True,
                top_logprobs=2))
            entries = [e for c in chunks if c.choices and c.choices[0].logprobs
                       for e in c.choices[0].logprobs.content or ()]
        else:
            reply = sdk.chat.completions.create(model="fault/logprobs", messages=messages,
                                                logprobs=True, top_logprobs=2)
            assert reply.choices[0].logprobs is not None
            entries = list(reply.choices[0].logprobs.content or ())
        [entry] = entries
        assert (entry.token, entry.logprob, entry.bytes) == ("L", -0.25, [76])
        assert [(t.token, t.logprob) for t in entry.top_logprobs] == [("L", -0.25),
                                                                        ("x", -2.5)]


def test_usage_estimated_without_an_upstream_report(sdk: openai.OpenAI,
                                                    gateway: RunningServer) -> None:
    assert _say(sdk, "fault/nousage") == "N"
    records = gateway.admin("GET", "/usage/records?account=upstreams&limit=1")["data"]
    assert records[0]["model"] == "fault/nousage" and records[0]["estimated"] is True
    # Billed at the catalog model's own prices (1 per prompt token, 2 per completion token).
    assert records[0]["cost_micros"] == (records[0]["prompt_tokens"]
                                         + 2 * records[0]["completion_tokens"]) > 0


def test_a_client_that_goes_away_is_billed_from_the_upstreams_usage(
        gateway: RunningServer, sdk: openai.OpenAI) -> None:
    with httpx.stream("POST", f"{gateway.api_url}/chat/completions", timeout=30,
                      headers={"Authorization": f"Bearer {sdk.api_key}"},
                      json={"model": "fault/drip", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]}) as response:
        for line in response.iter_lines():
            if '"D"' in line:
                break  # leave after the first content event
    deadline = time.monotonic() + 10
    while True:
        records = gateway.admin("GET", "/usage/records?account=upstreams&limit=1")["data"]
        if records and records[0]["model"] == "fault/drip":
            break
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert records[0]["client_disconnected"] is True and records[0]["estimated"] is False
    assert records[0]["completion_tokens"] == 7


def test_a_deployment_at_its_concurrency_cap_takes_no_more(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(model="fault/capped", stream=True,
                                         messages=[{"role": "user", "content": "hi"}])
    with stream:
        next(iter(stream))  # the only slot is taken while this stream runs
        with pytest.raises(openai.APIStatusError) as refused:
            _say(sdk, "fault/capped")
        assert refused.value.status_code == 503
        assert "concurrency limit" in refused.value.message
    deadline = time.monotonic() + 5  # the upstream is read on for its usage, then freed
    while True:
        try:
            assert _say(sdk, "fault/capped") == "C" * 40
            break
        except openai.APIStatusError:
            assert time.monotonic() < deadline
            time.sleep(0.1)


def test_an_upstream_embedding_model_is_passed_through(sdk: openai.OpenAI) -> None:
    texts = ["The cat sits on the mat.", "A cat is sitting on a rug."]
    through = sdk.embeddings.create(model="up/minilm", input=texts)
    # the gateway's own built-in embedding model is the same model as the upstream's
    here = sdk.embeddings.create(model="all-minilm-l6-v2", input=texts)
    assert through.model == "up/minilm"
    assert [d.index for d in through.data] == [0, 1]
    assert through.usage.prompt_tokens == here.usage.prompt_tokens > 0
    for a, b in zip(through.data, here.data, strict=True):
        assert len(a.embedding) == 384
        assert max(abs(x - y) for x, y in zip(a.embedding, b.embedding, strict=True)) < 1e-6
    # the SDK asks for base64 unless told otherwise: floats too
    floats = sdk.embeddings.create(model="up/minilm", input=texts, encoding_format="float")
    assert max(abs(x - y) for x, y in zip(floats.data[1].embedding, here.data[1].embedding,
                                          strict=True)) < 1e-6
    # the upstream's refusal of the client's own request passes on, sanitized
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        sdk.embeddings.create(model="up/minilm", input="x", dimensions=10)
    assert caught.value.body["param"] == "dimensions"  # type: ignore[index]
    assert "upstream rejected" in _message(caught.value)


def test_a_text_completion_through_a_modelyard_upstream(sdk: openai.OpenAI,
                                                        client: openai.OpenAI) -> None:
    prefix, suffix = "def add(a, b):\n    return ", "\n\n\nprint(add(2, 3))\n"
    direct = client.completions.create(model=MODEL, prompt=prefix, suffix=suffix,
                                       max_tokens=12)
    through = sdk.completions.create(model="up/qwen", prompt=prefix, suffix=suffix,
                                     max_tokens=12)
    assert through.model == "up/qwen" and through.object == "text_completion"
    assert through.choices[0].text == direct.choices[0].text  # greedy: the same middle
    assert through.usage is not None and direct.usage is not None
    assert through.usage.prompt_tokens == direct.usage.prompt_tokens  # the upstream's count
    chunks = list(sdk.completions.create(model="up/qwen", prompt=prefix, suffix=suffix,
                                         max_tokens=12, stream=True,
                                         stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == direct.choices[0].text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == direct.usage.completion_tokens
    several = sdk.completions.create(model="up/qwen", prompt=["1, 2, 3,", "a, b, c,"],
                                     max_tokens=3, logprobs=1)
    assert [c.index for c in several.choices] == [0, 1]
    assert all(c.logprobs is not None and c.logprobs.tokens for c in several.choices)
