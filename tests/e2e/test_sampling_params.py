"""End-to-end: every sampling and output parameter has its effect, through the SDK."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import openai
import pytest

from tests.e2e.conftest import MODEL

QUESTION = [{"role": "user", "content": "Write a short poem about the sea."}]


class Vocabulary:
    """The default model's tokenizer, loaded without weights (vocab_only)."""

    def __init__(self, model_path: Path) -> None:
        self._llama = llama_cpp.Llama(str(model_path), vocab_only=True, verbose=False)

    def ids(self, text: str) -> list[int]:
        return list(self._llama.tokenize(text.encode(), add_bos=False, special=False))

    def text(self, token: int) -> str:
        return self._llama.detokenize([token]).decode()

    def close(self) -> None:
        self._llama.close()


@pytest.fixture(scope="module")
def vocab(default_model_path: Path) -> Iterator[Vocabulary]:
    vocabulary = Vocabulary(default_model_path)
    yield vocabulary
    vocabulary.close()


def _ask(client: openai.OpenAI, **kwargs: object) -> openai.types.chat.ChatCompletion:
    params: dict[str, object] = {"model": MODEL, "messages": QUESTION, "max_tokens": 24}
    params.update(kwargs)
    return client.chat.completions.create(**params)  # type: ignore[call-overload, no-any-return]


def _text(reply: openai.types.chat.ChatCompletion, index: int = 0) -> str:
    return reply.choices[index].message.content or ""


def test_positive_bias_forces_a_token(client: openai.OpenAI, vocab: Vocabulary) -> None:
    [token] = vocab.ids(" banana")
    reply = _ask(client, temperature=1.0, max_tokens=4, logit_bias={str(token): 100})
    assert _text(reply) == vocab.text(token) * 4


def test_negative_bias_bans_a_token(client: openai.OpenAI, vocab: Vocabulary) -> None:
    greedy = _text(_ask(client, temperature=0))
    first = vocab.ids(greedy)[0]
    banned = _text(_ask(client, temperature=0, logit_bias={str(first): -100}))
    assert first not in vocab.ids(banned)


def test_top_k_one_and_min_p_one_equal_greedy(client: openai.OpenAI) -> None:
    _ask(client, temperature=0)  # fills the prefix cache: every compared request reuses it
    greedy = _text(_ask(client, temperature=0))
    assert _text(_ask(client, temperature=1.0, seed=1, extra_body={"top_k": 1})) == greedy
    assert _text(_ask(client, temperature=1.5, seed=2, extra_body={"min_p": 1.0})) == greedy


def test_seed_makes_sampling_reproducible(client: openai.OpenAI) -> None:
    first = _text(_ask(client, temperature=1.0, seed=42))
    again = _text(_ask(client, temperature=1.0, seed=42))
    assert first == again
    others = {_text(_ask(client, temperature=1.0, seed=seed)) for seed in (1, 2, 3)}
    assert len(others | {first}) >= 3


def test_n_choices_are_indexed_and_count_the_prompt_once(client: openai.OpenAI) -> None:
    one = _ask(client, temperature=0, max_tokens=8)
    four = _ask(client, temperature=1.0, seed=7, max_tokens=8, n=4)
    assert [c.index for c in four.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason in ("stop", "length") for c in four.choices)
    assert four.usage is not None and one.usage is not None
    assert four.usage.prompt_tokens == one.usage.prompt_tokens
    assert four.usage.completion_tokens > one.usage.completion_tokens
    assert len({_text(four, i) for i in range(4)}) >= 2


def test_n_choices_stream_with_their_own_chunks(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=8, n=2, temperature=0, stream=True,  # type: ignore[arg-type]
        stream_options={"include_usage": True})
    texts = {0: "", 1: ""}
    finishes: dict[int, str] = {}
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index] = choice.finish_reason
    assert set(finishes) == {0, 1}
    assert texts[0] == texts[1] == _text(_ask(client, temperature=0, max_tokens=8))
    assert usage is not None


def test_top_logprobs_are_sorted_and_contain_the_chosen_token(client: openai.OpenAI) -> None:
    reply = _ask(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=5)
    content = reply.choices[0].logprobs.content  # type: ignore[union-attr]
    assert content is not None and len(content) == reply.usage.completion_tokens  # type: ignore[union-attr]
    for entry in content:
        assert len(entry.top_logprobs) == 5
        values = [alt.logprob for alt in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert all(v <= 0 for v in values)
        # Greedy: the chosen token is the most likely one, with the same logprob.
        assert entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token
    assert "".join(entry.token for entry in content) == _text(reply)


def test_logprobs_in_a_stream(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=6, temperature=0, stream=True,  # type: ignore[arg-type]
        logprobs=True, top_logprobs=2)
    entries = [entry for chunk in stream for choice in chunk.choices
               if choice.logprobs and choice.logprobs.content
               for entry in choice.logprobs.content]
    assert len(entries) == 6
    assert all(len(entry.top_logprobs) == 2 for entry in entries)


def test_frequency_and_repetition_penalties_reduce_repetition(client: openai.OpenAI) -> None:
    repeat = [{"role": "user", "content": "Repeat the word dog 40 times, separated by spaces."}]
    plain = _text(_ask(client, messages=repeat, temperature=0, max_tokens=40))
    assert plain.lower().count("dog") >= 10
    for penalty in ({"frequency_penalty": 2.0}, {"extra_body": {"repetition_penalty": 2.0}}):
        penalised = _text(_ask(client, messages=repeat, temperature=0, max_tokens=40,
                               **penalty))
        assert penalised.lower().count("dog") < plain.lower().count("dog") / 2, penalty


def test_presence_penalty_moves_the_choice_away_from_or_towards_repeats(
        client: openai.OpenAI) -> None:
    """Reported log-probabilities come after the penalties. While the greedy texts agree, a
    token already generated is less likely with presence_penalty 2 (more likely with -2);
    where they first part, the penalized text takes a new token where the plain one
    repeats (a repeat where the plain one does not). Counting distinct words instead hung
    on near ties that the batch a sequence is decoded in can flip."""
    animals = [{"role": "user",
                "content": "List ten animals, one word each, separated by commas."}]

    def entries(**penalty: object) -> list[Any]:
        reply = _ask(client, messages=animals, temperature=0, max_tokens=32, logprobs=True,
                     **penalty)
        assert reply.choices[0].logprobs is not None
        return list(reply.choices[0].logprobs.content or [])

    plain = entries()
    for penalty, sign in ((2.0, -1), (-2.0, 1)):
        seen: set[str] = set()
        evidence = 0
        for base, other in zip(plain, entries(presence_penalty=penalty), strict=False):
            if base.token != other.token:  # where the texts part
                repeats = (base.token in seen, other.token in seen)
                wrong = (True, False) if sign > 0 else (False, True)
                assert repeats != wrong, (penalty, base.token, other.token)
                evidence += repeats == wrong[::-1]
                break
            if base.token in seen and base.logprob < -1e-3:
                assert sign * (other.logprob - base.logprob) > 0, (penalty, base.token)
                evidence += 1
            seen.add(base.token)
        assert evidence >= 1, f"presence_penalty {penalty} left no trace"


def test_include_stop_str_in_output_keeps_the_stop(client: openai.OpenAI) -> None:
    full = _text(_ask(client, temperature=0))
    stop = full[len(full) // 2: len(full) // 2 + 4]
    kept = _ask(client, temperature=0, stop=stop,
                extra_body={"include_stop_str_in_output": True})
    assert _text(kept) == full[: full.index(stop) + len(stop)]
    assert kept.choices[0].finish_reason == "stop"


@pytest.mark.parametrize(("fields", "param"), [
    ({"extra_body": {"top_logprobs": 3}}, "top_logprobs"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"logit_bias": {"1": 101}}, "logit_bias"),
    ({"logit_bias": {"999999999": 5}}, "logit_bias"),
    ({"extra_body": {"top_k": -2}}, "top_k"),
    ({"extra_body": {"min_p": 1.5}}, "min_p"),
    ({"frequency_penalty": 2.5}, "frequency_penalty"),
    ({"extra_body": {"repetition_penalty": 0}}, "repetition_penalty"),
])
def test_invalid_values_are_422_naming_the_field(client: openai.OpenAI, fields: dict[str, object],
                                                 param: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as caught:
        _ask(client, **fields)
    assert caught.value.response.json()["error"]["param"] == param
