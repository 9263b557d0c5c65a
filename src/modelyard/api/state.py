"""What the routes share: the providers by model id, the platform gate and prices, the
metrics."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry

from modelyard.api.preparation import Preparation
from modelyard.api.reply import body_cap
from modelyard.platform.gate import Gate, OpenGate
from modelyard.platform.response_store import MemoryResponses, ResponseStore
from modelyard.providers.base import ChatModel
from modelyard.providers.embeddings import EmbeddingService


@dataclass
class AppState:
    providers: dict[str, ChatModel]
    registry: CollectorRegistry
    gate: Gate = field(default_factory=OpenGate)
    system_fingerprint: str = "fp_modelyard"
    usage_drain_seconds: float = 10.0
    """After a client went away, how long an upstream is read on for its usage."""
    started: int = field(default_factory=lambda: int(time.time()))
    engine: ChatModel | None = None
    """The built-in engine's provider when it runs, listed under its own id or not."""
    max_requests_in_flight: int = 0
    """Requests answered at once (past it a 503 in SPEC.md's shape); 0: no limit."""
    max_body_bytes: int = 0
    """The largest chat request body read (a 413 beyond); 0: derived from the contexts."""
    body_timeout_s: float = 30.0
    """How long a chat request's body may take to arrive (a 408 beyond)."""
    max_request_tokens: int = 32768
    """The most completion tokens a request with several choices may ask for in all."""
    preparation: Preparation = field(default_factory=Preparation)
    embeddings: dict[str, EmbeddingService] = field(default_factory=dict)
    """The models /v1/embeddings answers for (the built-in one and the catalog's)."""
    responses: ResponseStore = field(default_factory=MemoryResponses)
    """Where /v1/responses keeps stored responses (the platform database when it runs)."""
    _background: set[asyncio.Task[Any]] = field(default_factory=set)

    def __post_init__(self) -> None:
        if self.max_body_bytes == 0:
            contexts = [provider.context_limit() for provider in self.closing_order()]
            self.max_body_bytes = body_cap([c for c in contexts if c is not None])

    def run_in_background(self, coroutine: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run work that must finish even if the request's own task is cancelled."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    def closing_order(self) -> list[ChatModel]:
        """Every provider to close at shutdown, each once (the engine included)."""
        every = [*self.providers.values(), *([self.engine] if self.engine else [])]
        return list({id(provider): provider for provider in every}.values())

    async def drain(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
