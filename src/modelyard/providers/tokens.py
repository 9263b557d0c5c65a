"""The Tokenizer interface: a model's own tokenizer, for `/tokenize` and `/detokenize`.

A provider that can count tokens exactly as it bills them answers `Provider.tokenizer()`
with one of these; a provider that cannot (an upstream deployment, whose tokenizer lives
on its server) answers None. Every method is plain CPU work that must not wait on
anything: the HTTP layer runs a large input in a worker thread.
"""

from __future__ import annotations

from typing import Any, Protocol


class Tokenizer(Protocol):
    @property
    def vocab_size(self) -> int:
        """Token ids run from 0 to vocab_size - 1."""

    @property
    def max_model_len(self) -> int:
        """The most tokens one request may hold, prompt and completion."""

    def tokenize_text(self, text: str, add_special: bool) -> list[int]:
        """`text` as token ids; `add_special`: the tokenizer's own special tokens (a BOS)
        added around it, as a completion prompt would be."""

    def tokenize_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                          add_special: bool, tools: list[dict[str, Any]] | None = None,
                          enable_thinking: bool | None = None) -> list[int]:
        """Chat messages (the chat route's template dicts) rendered through the model's chat
        template and tokenized exactly as a chat completion's prompt is, so that the count
        is the prompt tokens that request would be billed for; `add_special`: the
        tokenizer's special tokens added at the start as well, whatever the template wrote;
        `tools` (OpenAI function tools) and `enable_thinking` rendered as a chat request's
        are. Raises a `ProviderError` (422) when the template refuses the messages."""

    def detokenize(self, ids: list[int]) -> str:
        """The text of `ids` (each within the vocabulary), special tokens written out."""
