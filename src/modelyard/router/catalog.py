"""A catalog model served by upstream deployments (and possibly the built-in engine as
one of them, `router/local_route.py`): the Provider the chat route calls.

`start_chat` picks a deployment by weight among those whose breaker lets requests
through and that have a free slot, opens the upstream stream (up to its first event) and
hands it on. A connection error, timeout, 429 or 5xx before that point is retried on
another deployment; once the stream is handed on nothing is retried. No deployment
available: 503 with Retry-After.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from modelyard.config import CatalogModelConfig, RouterConfig
from modelyard.providers.base import (
    ChatDelta,
    ChatRequest,
    PreparedChat,
    Provider,
    ProviderError,
)
from modelyard.providers.openai_compat import UpstreamDeployment, UpstreamError
from modelyard.providers.profiles import build_body
from modelyard.providers.upstream_stream import estimate_tokens
from modelyard.router.balancer import choose
from modelyard.router.breaker import Breaker
from modelyard.router.local_route import LocalDeployment
from modelyard.router.metrics import RouterMetrics

logger = logging.getLogger(__name__)


class Route:
    """One deployment with its breaker."""

    def __init__(self, deployment: UpstreamDeployment | LocalDeployment,
                 router: RouterConfig) -> None:
        self.deployment = deployment
        self.breaker = Breaker(router.breaker_failures, router.breaker_cooldown_seconds)

    @property
    def weight(self) -> float:
        return self.deployment.config.weight

    def active_requests(self) -> int:
        return self.deployment.active

    def ended(self, failed: bool) -> None:
        """The stream of one request on this route ended (first event already seen)."""
        self.deployment.active -= 1
        if failed:
            self.breaker.failure(time.monotonic())


class RoutedModel(Provider):
    def __init__(self, config: CatalogModelConfig, router: RouterConfig,
                 deployments: Sequence[UpstreamDeployment | LocalDeployment],
                 rng: random.Random | None = None,
                 metrics: RouterMetrics | None = None) -> None:
        self.model_id = config.id
        self.config = config
        self.router = router
        self.routes = [Route(d, router) for d in deployments]
        self._rng = rng or random.Random()
        self.metrics = metrics or RouterMetrics()
        for route in self.routes:
            self.metrics.watch(self.model_id, route.deployment.name, route.breaker,
                               route.active_requests)

    def describe(self) -> dict[str, Any]:
        capabilities = {name: name in self.config.capabilities
                        for name in ("tools", "json_schema", "reasoning", "vision")}
        return {"context_length": self.config.context_length, "capabilities": capabilities,
                "deployments": [{"name": r.deployment.name, "breaker": r.breaker.state}
                                for r in self.routes]}

    async def prepare_chat(self, request: ChatRequest) -> PreparedChat:
        prompt = estimate_tokens(orjson.dumps(request.messages).decode()) + (
            estimate_tokens(orjson.dumps(request.tools).decode()) if request.tools else 0)
        context = self.config.context_length
        if prompt >= context:
            raise ProviderError(422, f"the prompt (about {prompt} tokens) does not fit the "
                                f"context of {context} tokens", param="messages",
                                code="context_length_exceeded")
        max_tokens = request.max_tokens or self.config.default_max_tokens or context - prompt
        if prompt + max_tokens > context:
            if not request.truncate_to_context:
                raise ProviderError(422, f"prompt (about {prompt} tokens) + max_tokens "
                                    f"({max_tokens}) exceed the context of {context} tokens",
                                    param="max_tokens", code="context_length_exceeded")
            max_tokens = context - prompt
        work: dict[str, Any] = {}
        for route in self.routes:  # a parameter no upstream can take is refused now
            deployment = route.deployment
            if isinstance(deployment, LocalDeployment):
                local = work[deployment.name] = await deployment.prepare(request)
                if local is not None:  # the reservation covers whichever runs it
                    prompt = max(prompt, local.prompt_tokens)
                    max_tokens = max(max_tokens, local.max_tokens)
                continue
            config = deployment.config
            work[deployment.name] = build_body(
                config.profile, request, config.upstream_model or self.model_id, max_tokens,
                self.config.defaults, self.config.drop_unsupported_params)
        return PreparedChat(request, prompt, max_tokens, work=work)

    async def start_chat(self, prepared: PreparedChat) -> AsyncIterator[ChatDelta]:
        tried: set[int] = set()
        last: UpstreamError | None = None
        for _ in range(self.router.max_attempts):
            now = time.monotonic()
            candidates = [r for i, r in enumerate(self.routes) if i not in tried
                          and prepared.work[r.deployment.name] is not None
                          and not r.deployment.full and r.breaker.available(now)]
            route = choose(candidates, lambda r: r.weight, self._rng)
            if route is None or not route.breaker.acquire(now):
                break
            tried.add(self.routes.index(route))
            route.deployment.active += 1
            try:
                stream = await route.deployment.open(prepared.work[route.deployment.name],
                                                     prepared.prompt_tokens, route.ended)
            except UpstreamError as exc:
                route.deployment.active -= 1
                last = exc
                if exc.retriable:
                    route.breaker.failure(time.monotonic())
                    self.metrics.tried(self.model_id, route.deployment.name, "retried")
                    logger.warning("%s: %s", self.model_id, exc.message)
                    continue
                route.breaker.success()  # the upstream answered; the request was refused
                self.metrics.tried(self.model_id, route.deployment.name, "refused")
                raise ProviderError(400 if exc.status == 400 else 422, exc.message,
                                    code="upstream_refused") from None
            except BaseException:
                route.deployment.active -= 1
                route.breaker.release()
                raise
            route.breaker.success()
            self.metrics.tried(self.model_id, route.deployment.name, "ok")
            return stream
        if last is not None:
            raise ProviderError(503, f"no deployment of {self.model_id} could answer: "
                                f"{last.message}", code="upstream_unavailable", retry_after=1)
        raise ProviderError(503, f"no deployment of {self.model_id} is available: all are "
                            "unhealthy or at their concurrency limit",
                            code="no_healthy_deployment", retry_after=self._retry_after())

    def _retry_after(self) -> int:
        now = time.monotonic()
        waits = [r.breaker.retry_after(now) for r in self.routes]
        return max(1, math.ceil(min(waits, default=1.0)))

    async def close(self) -> None:
        for route in self.routes:
            await route.deployment.close()


class AliasProvider(Provider):
    """A catalog id served by the built-in engine's model (a `kind = "local"` deployment)."""

    def __init__(self, model_id: str, target: Provider) -> None:
        self.model_id = model_id
        self.target = target

    def describe(self) -> dict[str, Any]:
        return self.target.describe()

    async def prepare_chat(self, request: ChatRequest) -> PreparedChat:
        return await self.target.prepare_chat(request)

    async def start_chat(self, prepared: PreparedChat) -> AsyncIterator[ChatDelta]:
        return await self.target.start_chat(prepared)


def build_catalog(models: tuple[CatalogModelConfig, ...], router: RouterConfig,
                  environ: Any, local: Provider | None,
                  registry: CollectorRegistry | None = None) -> dict[str, Provider]:
    """The catalog's providers by model id (the built-in engine's own model not included)."""
    catalog: dict[str, Provider] = {}
    metrics = RouterMetrics(registry)
    for model in models:
        if len(model.deployments) == 1 and model.deployments[0].kind == "local":
            assert local is not None
            catalog[model.id] = AliasProvider(model.id, local)
            continue
        deployments: list[UpstreamDeployment | LocalDeployment] = []
        for d in model.deployments:
            if d.kind == "local":
                assert local is not None
                deployments.append(LocalDeployment(d, local))
            else:
                deployments.append(UpstreamDeployment(
                    d, environ.get(d.api_key_env) if d.api_key_env else None))
        catalog[model.id] = RoutedModel(model, router, deployments, metrics=metrics)
    return catalog
