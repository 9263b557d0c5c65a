"""POST /v1/completions through the official SDK (`client.completions.create`) against the
session's real server: plain, fill-in-the-middle, echo, several prompts, token ids,
legacy logprobs, best_of, streaming, refusals and the bill."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.e2e.conftest import INPUT_MICROS_PER_TOKEN, MODEL, OUTPUT_MICROS_PER_TOKEN
from tests.e2e.server import RunningServer

PREFIX = "def add(a, b):\n    return "
SUFFIX = "\n\n\nprint(add(2, 3))\n"


def test_a_plain_completion(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=8)
    assert reply.object == "text_completion" and reply.id.startswith("cmpl-")
    assert reply.model == MODEL and len(reply.choices) == 1
    choice = reply.choices[0]
    assert choice.text and choice.index == 0 and choice.finish_reason in ("stop", "length")
    assert choice.logprobs is None
    assert reply.usage is not None and reply.usage.prompt_tokens == 4  # no template around it
    assert 0 < reply.usage.completion_tokens <= 8


def test_max_tokens_defaults_to_16(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="Count: 1, 2, 3,")
    assert reply.usage is not None and reply.usage.completion_tokens <= 16
    assert reply.choices[0].finish_reason == "length"


def test_fill_in_the_middle_fits_between_prefix_and_suffix(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt=PREFIX, suffix=SUFFIX,
                                      max_tokens=16)
    middle = reply.choices[0].text
    assert middle.replace("a+b", "a + b").startswith("a + b"), middle
    assert reply.choices[0].finish_reason == "stop"
    # prefix + middle + suffix is a program whose add adds
    namespace: dict[str, Any] = {"print": lambda *args: None}
    exec(compile(PREFIX + middle + SUFFIX, "<fim>", "exec"), namespace)
    assert namespace["add"](2, 3) == 5
    # the FIM tokens and the suffix count as prompt tokens
    assert reply.usage is not None and reply.usage.prompt_tokens > 15


def test_echo_puts_the_prompt_before_the_answer(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="import os\n", max_tokens=4,
                                      echo=True)
    assert reply.choices[0].text.startswith("import os\n")
    assert len(reply.choices[0].text) > len("import os\n")


def test_several_prompts_and_choices_are_numbered_prompt_after_prompt(
        client: openai.OpenAI) -> None:
    prompts = ["The capital of France is", "1 + 1 ="]
    reply = client.completions.create(model=MODEL, prompt=prompts, n=2, max_tokens=4,
                                      temperature=1.0, seed=7)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=1) for p in prompts]
    assert reply.usage is not None
    assert reply.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone if a.usage)
    assert reply.usage.completion_tokens <= 4 * 4


def test_a_prompt_of_token_ids(client: openai.OpenAI, server: RunningServer,
                               api_key: str) -> None:
    text = "def hello_world():"
    ids = httpx.post(f"{server.base_url}/tokenize", json={"model": MODEL, "prompt": text},
                     headers={"Authorization": f"Bearer {api_key}"}, timeout=30).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=6)
    by_text = client.completions.create(model=MODEL, prompt=text, max_tokens=6)
    assert by_ids.choices[0].text == by_text.choices[0].text  # greedy: the same input
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == len(ids)
    both = client.completions.create(model=MODEL, prompt=[ids, ids], max_tokens=2)
    assert len(both.choices) == 2


def test_legacy_logprobs(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="def square(x):", max_tokens=6,
                                      logprobs=2)
    choice = reply.choices[0]
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
    assert logprobs.top_logprobs is not None and logprobs.text_offset is not None
    assert reply.usage is not None
    assert len(logprobs.tokens) == reply.usage.completion_tokens
    assert "".join(logprobs.tokens) == choice.text
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert logprobs.text_offset[0] == 0


def test_best_of_returns_n_and_bills_every_choice(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="My favourite colour is",
                                      max_tokens=5, best_of=3, n=1, temperature=1.0, seed=11)
    assert len(reply.choices) == 1 and reply.choices[0].index == 0
    assert reply.choices[0].logprobs is None  # ranked by them, not shown
    assert reply.usage is not None and reply.usage.completion_tokens > 5  # three were made


def test_streaming_matches_the_whole_answer(client: openai.OpenAI) -> None:
    whole = client.completions.create(model=MODEL, prompt=PREFIX, suffix=SUFFIX, max_tokens=12)
    chunks = list(client.completions.create(model=MODEL, prompt=PREFIX, suffix=SUFFIX,
                                            max_tokens=12, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert chunks[-1].usage is not None and whole.usage is not None
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason


@pytest.mark.parametrize(("fields", "param"), [
    ({"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ({"prompt": "x", "best_of": 2, "stream": True}, "best_of"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [[]]}, "prompt"),
    ({"prompt": [-1]}, "prompt"),
    ({"prompt": [10**9]}, "prompt"),
    ({"prompt": [2**40]}, "prompt"),
    ({"prompt": ["a"] * 129}, "prompt"),
    ({"prompt": "x", "logprobs": 6}, "logprobs"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "temperature": 2.5}, "temperature"),
])
def test_bad_requests_are_refused_naming_the_field(client: openai.OpenAI,
                                                   fields: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.APIStatusError) as refused:
        client.completions.create(model=MODEL, **{"max_tokens": 4, **fields})
    assert refused.value.status_code in (400, 422)
    body: Any = refused.value.body
    assert body["param"] == param or param in body["message"], body


def test_an_unknown_model_is_a_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")


def test_a_completion_is_billed_at_the_models_prices(client: openai.OpenAI,
                                                     server: RunningServer) -> None:
    key = server.create_key("completions-bill", balance="1")
    before = server.admin("GET", "/accounts/completions-bill")["balance_micros"]
    with openai.OpenAI(base_url=server.api_url, api_key=key, max_retries=0) as sdk:
        reply = sdk.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
    after = server.admin("GET", "/accounts/completions-bill")["balance_micros"]
    assert reply.usage is not None
    cost = (reply.usage.prompt_tokens * INPUT_MICROS_PER_TOKEN
            + reply.usage.completion_tokens * OUTPUT_MICROS_PER_TOKEN)
    assert before - after == cost
