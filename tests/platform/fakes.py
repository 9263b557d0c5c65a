"""An instant in-process model for the platform's tests: one token per delta."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from modelyard.engine.sequence import Share
from modelyard.providers.base import (
    ChatDelta,
    ChatRequest,
    ChatStream,
    DeltaStream,
    PreparedChat,
    Provider,
)
from modelyard.usage import Usage


class FakeProvider(Provider[None]):
    """Counts one prompt token per word and answers `max_tokens` tokens ("tok" each),
    `delay_s` apart; or stops by itself after `answer_tokens`."""

    def __init__(self, model_id: str = "fake", delay_s: float = 0.0,
                 default_max_tokens: int = 8, answer_tokens: int | None = None) -> None:
        self.model_id = model_id
        self.delay_s = delay_s
        self.answer_tokens = answer_tokens
        self.default_max_tokens = default_max_tokens
        self.started = 0
        self.shares: list[Share | None] = []
        """The fair share each started request carried."""

    def describe(self) -> dict[str, Any]:
        return {"context_length": 4096}

    def prompt_token_bound(self, request: ChatRequest) -> int:
        """Exact here (what prepare_chat counts), so tests can work out reservations."""
        return sum(len(str(m.get("content") or "").split()) for m in request.messages)

    def max_tokens_bound(self, request: ChatRequest) -> int:
        return request.max_tokens or self.default_max_tokens

    async def prepare_chat(self, request: ChatRequest) -> PreparedChat[None]:
        return PreparedChat(request, self.prompt_token_bound(request),
                            self.max_tokens_bound(request), None, self)

    async def start_chat(self, prepared: PreparedChat[None]) -> ChatStream:
        self.started += 1
        self.shares.append(prepared.request.share)
        return DeltaStream(self._answer(prepared))

    async def _answer(self, prepared: PreparedChat[None]) -> AsyncGenerator[ChatDelta, None]:
        length = prepared.max_tokens
        if self.answer_tokens is not None and self.answer_tokens < length:
            length = self.answer_tokens
        for i in range(1, length + 1):
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            finish = None if i < length else "length" if i == prepared.max_tokens else "stop"
            yield ChatDelta("tok", Usage(prepared.prompt_tokens, completion_tokens=i), finish)
