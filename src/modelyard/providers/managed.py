"""A local model of the pool (providers/local_pool.py) as the Provider the routes call.

Its engine may be unloaded: a request on the event loop waits for it to load
(`LocalPool.acquire`, bounded); preparation in a worker thread (api/preparation.py) is
preceded by `ready()` on the loop (`until_loaded`), so it finds the engine loaded. The
request holds a lease on the engine from its preparation to its stream's end, so the
engine is not unloaded under it; a prepared request that never starts gives its lease back
when it is dropped.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from modelyard.providers.base import (
    ChatDelta,
    ChatModel,
    ChatRequest,
    ChatStream,
    Prepared,
    PreparedChat,
    Provider,
    ProviderError,
)
from modelyard.providers.local_pool import RETRY_AFTER_SECONDS, Lease, LocalPool, ModelSpec
from modelyard.providers.tokens import Tokenizer
from modelyard.usage import Usage


@dataclass(eq=False)
class _Work:
    inner: Prepared
    lease: Lease
    finalizer: weakref.finalize = field(init=False)  # type: ignore[type-arg]

    def __post_init__(self) -> None:
        self.finalizer = weakref.finalize(self, self.lease.release)


class ManagedModel(Provider[_Work]):
    def __init__(self, pool: LocalPool, spec: ModelSpec, context_length: int,
                 default_max_tokens: int | None = None) -> None:
        self.pool = pool
        self.model_id = spec.model_id
        self.context_length = context_length
        self.default_max_tokens = default_max_tokens
        self._tokenizer = _ManagedTokenizer(self)

    def describe(self) -> dict[str, Any]:
        return {**self.pool.description(self.model_id), **self.pool.status(self.model_id)}

    def context_limit(self) -> int:
        return self.context_length

    def max_tokens_bound(self, request: ChatRequest) -> int:
        room = self.context_length  # as LocalProvider's, without loading the engine
        return min(request.max_tokens or self.default_max_tokens or room, room)

    def load_soon(self) -> bool:
        """Whether the engine is loaded; if not, start its load (not waited for)."""
        if self.pool.loaded(self.model_id) is not None:
            return True
        if _on_event_loop():
            self.pool.load_in_background(self.model_id)
        else:
            self.pool.request_load(self.model_id)
        return False

    async def ready(self) -> None:
        """Wait until the engine is loaded (loading it now if it is not)."""
        await self.pool.acquire(self.model_id)

    async def prepare_chat(self, request: ChatRequest) -> PreparedChat[_Work]:
        checkout = self.pool.checkout(self.model_id)
        if checkout is None:
            if not _on_event_loop():  # a worker: only the loop may wait for the load
                self.pool.request_load(self.model_id)
                raise ProviderError(503, f"the model '{self.model_id}' is loading; retry "
                                    "shortly", code="model_loading",
                                    retry_after=RETRY_AFTER_SECONDS)
            await self.pool.acquire(self.model_id)
            checkout = self.pool.checkout(self.model_id)  # no wait between: still ready
            if checkout is None:
                raise ProviderError(503, f"the model '{self.model_id}' was unloaded; retry",
                                    code="model_loading", retry_after=RETRY_AFTER_SECONDS)
        provider, lease = checkout
        try:
            inner = await provider.prepare_chat(request)
        except BaseException:
            lease.release()
            raise
        return PreparedChat(request, inner.prompt_tokens, inner.max_tokens,
                            _Work(inner, lease), self)

    async def start_chat(self, prepared: PreparedChat[_Work]) -> ChatStream:
        work = prepared.work
        try:
            stream = await work.inner.start()
        except BaseException:
            work.lease.release()
            raise
        work.finalizer.detach()  # the stream holds the lease now
        return _LeasedStream(stream, work.lease)

    def tokenizer(self) -> Tokenizer:
        return self._tokenizer

    async def close(self) -> None:
        await self.pool.close()


async def until_loaded(provider: ChatModel) -> None:
    """Before work off the event loop (preparation, tokenizing): wait for a pooled
    model's engine to load. Other providers are always ready."""
    if isinstance(provider, ManagedModel):
        await provider.ready()


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


class _LeasedStream:
    """The engine's stream; the lease ends with it."""

    def __init__(self, stream: ChatStream, lease: Lease) -> None:
        self._stream = stream
        self._deltas = aiter(stream)
        self._lease = lease
        weakref.finalize(self, lease.release)

    def __aiter__(self) -> AsyncIterator[ChatDelta]:
        return self

    async def __anext__(self) -> ChatDelta:
        try:
            return await anext(self._deltas)
        except BaseException:
            self._lease.release()
            raise

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            self._lease.release()

    async def drain_usage(self, seconds: float) -> Usage | None:
        return await self._stream.drain_usage(seconds)


class _ManagedTokenizer:
    """The engine's tokenizer, once it is loaded (`/tokenize` waits for the load first:
    api/tokens.py); a 503 with Retry-After if it was unloaded meanwhile."""

    def __init__(self, model: ManagedModel) -> None:
        self._model = model

    def _inner(self) -> Tokenizer:
        provider = self._model.pool.loaded(self._model.model_id)
        tokenizer = provider.tokenizer() if provider is not None else None
        if tokenizer is None:
            self._model.pool.request_load(self._model.model_id)
            raise ProviderError(503, f"the model '{self._model.model_id}' is loading; retry "
                                "shortly", code="model_loading", retry_after=RETRY_AFTER_SECONDS)
        return tokenizer

    @property
    def vocab_size(self) -> int:
        return self._inner().vocab_size

    @property
    def max_model_len(self) -> int:
        return self._model.context_length

    def tokenize_text(self, text: str, add_special: bool) -> list[int]:
        return self._inner().tokenize_text(text, add_special)

    def tokenize_messages(self, messages: list[dict[str, Any]], add_generation_prompt: bool,
                          add_special: bool, tools: list[dict[str, Any]] | None = None,
                          enable_thinking: bool | None = None) -> list[int]:
        return self._inner().tokenize_messages(messages, add_generation_prompt, add_special,
                                               tools, enable_thinking)

    def detokenize(self, ids: list[int]) -> str:
        return self._inner().detokenize(ids)
