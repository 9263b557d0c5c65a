"""End-to-end: a real `modelyard serve` process on the real default model, through the SDK."""

from __future__ import annotations

import concurrent.futures
import time

import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.server import RunningServer, metric_value

QUESTION = [{"role": "user", "content": "Write a Python function that adds two numbers."}]


def _answer(client: openai.OpenAI, **kwargs: object) -> openai.types.chat.ChatCompletion:
    params: dict[str, object] = {"model": MODEL, "messages": QUESTION, "temperature": 0,
                                 "max_tokens": 48}
    params.update(kwargs)
    return client.chat.completions.create(**params)  # type: ignore[call-overload, no-any-return]


def test_plain_answer(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0, max_tokens=32)
    choice = reply.choices[0]
    assert choice.message.role == "assistant"
    assert "Paris" in (choice.message.content or "")
    assert choice.finish_reason == "stop"
    assert reply.object == "chat.completion"
    assert reply.model == MODEL
    assert reply.id.startswith("chatcmpl-")
    usage = reply.usage
    assert usage is not None
    assert usage.prompt_tokens > 5
    assert 0 < usage.completion_tokens < 32
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_api_alias_path_answers(server: RunningServer, api_key: str) -> None:
    with openai.OpenAI(base_url=f"{server.base_url}/api/v1", api_key=api_key,
                       max_retries=0) as sdk:
        reply = sdk.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
    assert reply.choices[0].finish_reason == "length"


def test_stream_concatenates_to_the_non_streamed_answer(client: openai.OpenAI) -> None:
    whole = _answer(client)
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, temperature=0, max_tokens=48, stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    ids = {chunk.id for chunk in chunks}
    assert ids == {chunks[0].id}
    assert len({chunk.created for chunk in chunks}) == 1
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content_chunks) > 3
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1
    assert finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens  # type: ignore[union-attr]


def test_stop_string_ends_the_answer_before_it(client: openai.OpenAI) -> None:
    full = _answer(client).choices[0].message.content or ""
    words = [w for w in full.split() if len(w) > 3]
    assert len(words) > 4, full
    stop = words[len(words) // 2]
    stopped = _answer(client, stop=[stop, "@@never@@"])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].message.content == full[: full.index(stop)]


def test_stop_string_in_a_stream_is_never_sent(client: openai.OpenAI) -> None:
    full = _answer(client).choices[0].message.content or ""
    stop = full[len(full) // 2: len(full) // 2 + 5]
    stream = client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=0,
                                            max_tokens=48, stop=stop, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == full[: full.index(stop)]


def test_max_tokens_gives_length(client: openai.OpenAI) -> None:
    reply = _answer(client, max_tokens=5)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage is not None and reply.usage.completion_tokens == 5
    wins = _answer(client, max_tokens=40, max_completion_tokens=3)
    assert wins.usage is not None and wins.usage.completion_tokens == 3


def test_concurrent_requests_share_decode_steps(client: openai.OpenAI,
                                                server: RunningServer) -> None:
    before = server.metrics()
    prompts = [f"Write a haiku about the number {i}." for i in range(8)]

    def ask(prompt: str) -> openai.types.chat.ChatCompletion:
        return client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=24,
            temperature=0)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(ask, prompts))
    assert all(r.choices[0].message.content for r in replies)
    after = server.metrics()
    name = "modelyard_sequences_per_step_bucket"
    steps = metric_value(after, "modelyard_sequences_per_step_count") - metric_value(
        before, "modelyard_sequences_per_step_count")
    at_most_four = metric_value(after, name, 'le="4.0"') - metric_value(before, name, 'le="4.0"')
    at_most_eight = metric_value(after, name, 'le="8.0"') - metric_value(before, name, 'le="8.0"')
    # Steps that held more than four sequences at once: the requests were decoded together.
    assert steps - at_most_four >= 5, after
    assert at_most_eight == steps
    generated = metric_value(after, "modelyard_generated_tokens_total") - metric_value(
        before, "modelyard_generated_tokens_total")
    assert generated == sum(r.usage.completion_tokens for r in replies)  # type: ignore[union-attr]
    # With 8 sequences sharing steps, far fewer steps than tokens were needed.
    assert steps < generated / 3


def test_client_that_disconnects_frees_its_sequence(client: openai.OpenAI,
                                                    server: RunningServer) -> None:
    aborted = 'reason="abort"'
    before = metric_value(server.metrics(), "modelyard_finished_sequences_total", aborted)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 500, one per line."}],
        max_tokens=1500, temperature=0, stream=True)
    received = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
        if received >= 3:
            break
    stream.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = server.metrics()
        done = metric_value(metrics, "modelyard_finished_sequences_total", aborted) > before
        if done and metric_value(metrics, "modelyard_running_sequences") == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the sequence was not freed after the client left:\n{server.metrics()}")
    assert metric_value(metrics, "modelyard_kv_cells_reserved") == 0


def test_models_lists_the_default_model(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "all-minilm-l6-v2"]  # and the embedder
    entry = models.data[0].model_dump()
    assert entry["object"] == "model"
    assert entry["context_length"] == 2048


def test_repeated_prompt_reuses_the_cached_prefix(client: openai.OpenAI) -> None:
    system = {"role": "system", "content": "You are a terse assistant. " * 40}
    messages = [system, {"role": "user", "content": "Name one prime number."}]
    first = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                           temperature=0, max_tokens=12)
    again = client.chat.completions.create(model=MODEL, messages=messages,  # type: ignore[arg-type]
                                           temperature=0, max_tokens=12)
    assert first.usage is not None and again.usage is not None
    cached = again.usage.prompt_tokens_details.cached_tokens  # type: ignore[union-attr]
    assert cached is not None
    assert cached >= 200
    assert cached == again.usage.prompt_tokens - 1
    assert again.choices[0].message.content == first.choices[0].message.content
