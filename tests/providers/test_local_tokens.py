"""The built-in engine's tokenizer on the real default model: messages count exactly what a
chat completion's prompt counts, special-token text a client wrote stays text, text
round-trips through detokenize, and the catalog's alias forwards it."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from modelyard.config import Config
from modelyard.providers.base import ChatRequest
from modelyard.providers.local import LocalProvider
from modelyard.providers.local_tokens import LocalTokenizer
from modelyard.router.catalog import AliasProvider

MESSAGES: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "Be brief."},
     {"role": "user", "content": "Say <|im_start|>system and <|im_end|> as text, 🌞"}],
    [{"role": "user", "content": [{"type": "text", "text": "part one"},
                                  {"type": "text", "text": "part two"}]},
     {"role": "assistant", "content": "ok"}, {"role": "user", "content": "again"}],
]


@pytest.fixture(scope="module")
def provider(default_model_path: Path) -> Iterator[LocalProvider]:
    config = Config()
    config = dataclasses.replace(config, engine=dataclasses.replace(
        config.engine, max_sequences=1, context_per_sequence=512, step_token_budget=64,
        threads=1))
    local = LocalProvider(config, default_model_path)
    try:
        yield local
    finally:
        asyncio.run(local.close())


@pytest.mark.parametrize("messages", MESSAGES)
def test_messages_count_what_chat_counts(provider: LocalProvider,
                                         messages: list[dict[str, Any]]) -> None:
    tokenizer = provider.tokenizer()
    prepared = asyncio.run(provider.prepare_chat(ChatRequest("r", messages)))
    ids = tokenizer.tokenize_messages(messages, add_generation_prompt=True, add_special=False)
    assert len(ids) == prepared.prompt_tokens
    assert ids == provider.tokenize_prompt(provider.render_prompt(messages))
    without = tokenizer.tokenize_messages(messages, add_generation_prompt=False,
                                          add_special=False)
    assert ids[:len(without)] == without and len(without) < len(ids)


def test_special_text_in_messages_stays_text(provider: LocalProvider) -> None:
    tokenizer = provider.tokenizer()
    im_start = provider.runner.tokenize("<|im_start|>", add_special=False)
    assert len(im_start) == 1
    plain = tokenizer.tokenize_messages([{"role": "user", "content": "hi"}], True, False)
    written = tokenizer.tokenize_messages(
        [{"role": "user", "content": "hi <|im_start|>"}], True, False)
    assert written.count(im_start[0]) == plain.count(im_start[0])
    # a plain prompt parses it, as vLLM's tokenizers do
    assert tokenizer.tokenize_text("<|im_start|>", add_special=False) == im_start


@pytest.mark.parametrize("text", ["Hello, world!", "  spaces\n\ttabs", "émojis 🌞 日本語",
                                  "<|im_end|> and text", "a\x00b", ""])
def test_detokenize_round_trips(provider: LocalProvider, text: str) -> None:
    tokenizer = provider.tokenizer()
    ids = tokenizer.tokenize_text(text, add_special=True)
    assert tokenizer.detokenize(ids) == text


def test_sizes_and_special_tokens(provider: LocalProvider) -> None:
    tokenizer = provider.tokenizer()
    assert tokenizer.vocab_size == provider.runner.n_vocab > 100_000
    assert tokenizer.max_model_len == 512
    assert tokenizer.detokenize([tokenizer.vocab_size - 1]) is not None  # last id is valid
    messages = [{"role": "user", "content": "hi"}]
    # Qwen adds no BOS: asking for special tokens changes nothing
    assert tokenizer.tokenize_messages(messages, True, True) == \
        tokenizer.tokenize_messages(messages, True, False)


def test_the_alias_forwards_the_tokenizer(provider: LocalProvider) -> None:
    alias = AliasProvider("my-alias", provider)
    forwarded = alias.tokenizer()
    assert isinstance(forwarded, LocalTokenizer)
    assert forwarded.tokenize_text("hi", True) == provider.tokenizer().tokenize_text("hi", True)
