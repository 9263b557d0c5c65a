"""The built-in engine's tokenizer: the model's vocabulary, with a chat prompt rendered
and tokenized by the same calls as a chat completion's (`LocalProvider.render_prompt`,
`LocalProvider.tokenize_prompt`), so `/tokenize` counts what chat bills."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from modelyard.providers.local import LocalProvider


class LocalTokenizer:
    def __init__(self, provider: LocalProvider) -> None:
        self._provider = provider

    @property
    def vocab_size(self) -> int:
        return self._provider.runner.n_vocab

    @property
    def max_model_len(self) -> int:
        return self._provider.context_per_sequence

    def tokenize_text(self, text: str, add_special: bool) -> list[int]:
        # Special-token text is parsed, as vLLM's (Hugging Face's) tokenizers parse it in
        # a plain prompt: `<|im_end|>` in the text is that token.
        return self._provider.runner.tokenize(text, add_special=add_special, special=True)

    def tokenize_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                          add_special: bool, tools: list[dict[str, Any]] | None = None,
                          enable_thinking: bool | None = None) -> list[int]:
        provider = self._provider
        # the template's arguments as a chat request's plan (providers/constraints.py) sets
        kwargs: dict[str, Any] = {"tools": tools} if tools else {}
        if enable_thinking is not None and provider.think_tags is not None:
            kwargs["enable_thinking"] = enable_thinking
        prompt = provider.render_prompt(messages, add_generation_prompt=add_generation_prompt,
                                        **kwargs)
        if not add_special:
            return provider.tokenize_prompt(prompt)  # the chat route's prompt, token for token
        ids: list[int] = []
        for index, piece in enumerate(prompt.pieces):
            ids += provider.runner.tokenize(piece.text, add_special=index == 0,
                                            special=piece.special)
        return ids

    def detokenize(self, ids: list[int]) -> str:
        runner = self._provider.runner
        # A control token has no bytes of its own (`token_bytes` gives b''): it is written
        # as its text (`<|im_end|>`), as vLLM's decode writes it.
        raw = b"".join(runner.token_bytes(token) or runner.token_text(token).encode("utf-8")
                       for token in ids)
        return raw.decode("utf-8", errors="replace")
