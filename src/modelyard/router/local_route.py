"""The built-in engine as one deployment among a catalog model's upstreams.

A `kind = "local"` deployment next to `kind = "openai"` ones: the router weighs it like
any other. The engine reads the prompt itself (its own template and tokens), so the
request is prepared for it separately (`prepare`); a request it cannot take (its context,
a parameter) leaves it out of that request's candidates. A full engine queue (503) counts
as a retriable failure, so the request goes to an upstream instead.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

from modelyard.config import DeploymentConfig
from modelyard.providers.base import (
    ChatDelta,
    ChatModel,
    ChatRequest,
    ChatStream,
    Prepared,
    ProviderError,
    StreamError,
)
from modelyard.providers.managed import ManagedModel
from modelyard.providers.openai_compat import UpstreamError
from modelyard.usage import Usage


class LocalDeployment:
    """The `UpstreamDeployment` interface over the built-in engine's provider."""

    def __init__(self, config: DeploymentConfig, provider: ChatModel) -> None:
        self.config = config
        self.provider = provider
        self.name = config.name or f"local#{provider.model_id}"
        self.active = 0

    @property
    def full(self) -> bool:
        return self.active >= self.config.max_concurrency

    async def prepare(self, request: ChatRequest) -> Prepared | None:
        """The request as the engine reads it, or None when the engine cannot take it (or
        is a pooled model not loaded yet: its load starts, the other deployments answer)."""
        if isinstance(self.provider, ManagedModel) and not self.provider.load_soon():
            return None
        try:
            return await self.provider.prepare_chat(request)
        except ProviderError:
            return None

    async def open(self, work: Prepared, prompt_estimate: int, on_end: Callable[[bool], None],
                   request_id: str = "") -> ChatStream:
        try:
            deltas = await work.start()
        except ProviderError as exc:
            # The engine's own refusals are modelyard's words: a client may read them.
            retriable = exc.status >= 500
            raise UpstreamError(exc.status, exc.message, retriable=retriable,
                                public=None if retriable else exc.message, param=exc.param,
                                code=exc.code) from None
        return _Tracked(deltas, on_end)

    async def close(self) -> None:
        """The engine belongs to the server; it is closed as a provider of its own."""


class _Tracked:
    """The engine's deltas, with `on_end(failed)` called once when they end."""

    def __init__(self, deltas: ChatStream, on_end: Callable[[bool], None]) -> None:
        self._stream = deltas
        self._deltas = aiter(deltas)
        self._on_end: Callable[[bool], None] | None = on_end

    def __aiter__(self) -> AsyncIterator[ChatDelta]:
        return self

    async def __anext__(self) -> ChatDelta:
        try:
            return await anext(self._deltas)
        except StopAsyncIteration:
            self._end(False)
            raise
        except StreamError:
            self._end(True)
            raise

    async def aclose(self) -> None:
        await self._stream.aclose()
        self._end(False)

    async def drain_usage(self, seconds: float) -> Usage | None:
        return await self._stream.drain_usage(seconds)

    def _end(self, failed: bool) -> None:
        if self._on_end is not None:
            on_end, self._on_end = self._on_end, None
            on_end(failed)
