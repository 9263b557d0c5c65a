"""A catalog model served by upstream deployments (and possibly the built-in engine as
one of them, `router/local_route.py`): the Provider the chat route calls.

`start_chat` picks a deployment by weight among those whose breaker lets requests
through and that have a free slot, opens the upstream stream (up to its first event) and
hands it on. A failure before that point is tried on another deployment when the first
cannot have produced an answer (no connection, an error status, a timeout: see
`UpstreamError.retriable`); once the stream is handed on, or once an answer came that
could not be read, nothing is retried. No deployment available: 503 with Retry-After.

What a client reads of a failure names the request, never the deployment (its URL) or the
upstream's answer: those are logged with the request id. A refusal of the client's own
request (400, 422) passes on with the upstream's message sanitized; our own credentials
refused (401, 403) or any other failure is a 502.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import orjson
from prometheus_client import CollectorRegistry

from modelyard.config import CatalogModelConfig, RouterConfig
from modelyard.providers.anthropic_upstream import AnthropicDeployment
from modelyard.providers.base import (
    ChatModel,
    ChatRequest,
    ChatStream,
    Prepared,
    PreparedChat,
    Provider,
    ProviderError,
)
from modelyard.providers.gemini_upstream import GeminiDeployment
from modelyard.providers.openai_compat import UpstreamCall, UpstreamDeployment, UpstreamError
from modelyard.providers.tokens import Tokenizer
from modelyard.router.affinity import Affinity, keeps_prefix_cache, ring_names
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


RouteWork = dict[str, Prepared | UpstreamCall | None]
"""Per deployment name: the request as the engine prepared it (a local deployment; None
when the engine cannot take it), or what an upstream is sent (in its own API)."""


class RoutedModel(Provider[RouteWork]):
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
        cached = [r for r in self.routes if keeps_prefix_cache(r.deployment.config)]
        self.affinity: Affinity[Route] | None = Affinity(
            list(zip(ring_names([r.deployment.name for r in cached]), cached, strict=True)),
            lambda r: r.weight, Route.active_requests, router.affinity_epsilon,
            router.affinity_prefix_chars) if router.affinity and len(cached) > 1 else None

    def describe(self) -> dict[str, Any]:
        capabilities = {name: name in self.config.capabilities
                        for name in ("tools", "json_schema", "reasoning", "vision")}
        return {"context_length": self.config.context_length, "capabilities": capabilities,
                "deployments": [{"name": r.deployment.name, "breaker": r.breaker.state}
                                for r in self.routes]}

    async def prepare_chat(self, request: ChatRequest) -> PreparedChat[RouteWork]:
        prompt, max_tokens = self._bounds(request)
        work: RouteWork = {}
        for route in self.routes:  # a parameter no upstream can take is refused now
            deployment = route.deployment
            if isinstance(deployment, LocalDeployment):
                local = work[deployment.name] = await deployment.prepare(request)
                if local is not None:  # the reservation covers whichever runs it
                    prompt = max(prompt, local.prompt_tokens)
                    max_tokens = max(max_tokens, local.max_tokens)
                continue
            work[deployment.name] = deployment.build(
                request, deployment.config.upstream_model or self.model_id, max_tokens,
                self.config.defaults, self.config.drop_unsupported_params)
        return PreparedChat(request, prompt, max_tokens, work, self)

    def served_by(self, kind: str) -> bool:
        """Whether every deployment of this model is of this kind ("anthropic", ...)."""
        return all(route.deployment.config.kind == kind for route in self.routes)

    def prepare_native(self, request: ChatRequest, body: dict[str, Any],
                       ) -> PreparedChat[RouteWork]:
        """A Messages API request (`body`, as the client sent it; `request`, its
        translation, for the bounds) for this model's Anthropic deployments only, relayed
        as it is: `body` under each deployment's model name, max_tokens within the
        context, the answer an `AnthropicRelay`."""
        prompt, max_tokens = self._bounds(request)
        work: RouteWork = {}
        for route in self.routes:
            deployment = route.deployment
            work[deployment.name] = UpstreamCall(
                "messages", {**body, "model": deployment.config.upstream_model or self.model_id,
                             "max_tokens": max_tokens}, request.stream,
                relay_as=self.model_id) if isinstance(deployment, AnthropicDeployment) else None
        return PreparedChat(request, prompt, max_tokens, work, self)

    def _bounds(self, request: ChatRequest) -> tuple[int, int]:
        """The prompt's upper bound and max_tokens (a 422 for what cannot fit)."""
        # Whether the prompt fits is the upstream's to say (its tokenizer): refused here
        # only when even a rough estimate (4 characters a token) cannot fit. What is
        # reserved is a true upper bound (UTF-8 bytes), so no prompt costs more than it.
        estimate = _rough_tokens(request)
        prompt = self.prompt_token_bound(request)
        context = self.config.context_length
        if estimate >= context:
            raise ProviderError(422, f"the prompt (about {estimate} tokens) does not fit the "
                                f"context of {context} tokens", param="messages",
                                code="context_length_exceeded")
        max_tokens = request.max_tokens or self.config.default_max_tokens or context - estimate
        if estimate + max_tokens > context:
            if not request.truncate_to_context:
                raise ProviderError(422, f"prompt (about {estimate} tokens) + max_tokens "
                                    f"({max_tokens}) exceed the context of {context} tokens",
                                    param="max_tokens", code="context_length_exceeded")
            max_tokens = context - estimate
        return prompt, max_tokens

    async def start_chat(self, prepared: PreparedChat[RouteWork]) -> ChatStream:
        request_id = prepared.request.request_id
        key = self.affinity.key(prepared.request) if self.affinity is not None else 0
        tried: set[int] = set()
        last: UpstreamError | None = None
        wait = 1.0  # the longest Retry-After a failed deployment asked for
        for _ in range(self.router.max_attempts):
            now = time.monotonic()
            candidates = [r for i, r in enumerate(self.routes) if i not in tried
                          and prepared.work[r.deployment.name] is not None
                          and not r.deployment.full and r.breaker.available(now)]
            route = choose(candidates, lambda r: r.weight, self._rng) \
                if self.affinity is None else self.affinity.choose(candidates, key, self._rng)
            if route is None or not route.breaker.acquire(now):
                break
            tried.add(self.routes.index(route))
            deployment = route.deployment
            deployment.active += 1
            try:
                stream = await _open(deployment, prepared.work[deployment.name],
                                     prepared.prompt_tokens, route.ended, request_id)
            except UpstreamError as exc:
                deployment.active -= 1
                logger.warning("request %s: %s, deployment %s: %s", request_id,
                               self.model_id, deployment.name, exc.message)
                if exc.public is not None:  # the upstream answered: the request is refused
                    route.breaker.success()
                    self.metrics.tried(self.model_id, deployment.name, "refused")
                    raise ProviderError(exc.status, exc.public, param=exc.param,
                                        code=exc.code or "upstream_refused") from None
                route.breaker.failure(time.monotonic())
                if exc.retriable:
                    self.metrics.tried(self.model_id, deployment.name, "retried")
                    last = exc
                    wait = max(wait, exc.retry_after or 0.0)
                    continue
                self.metrics.tried(self.model_id, deployment.name, "failed")
                raise ProviderError(502, _failed(request_id), code="upstream_error") from None
            except BaseException:
                deployment.active -= 1
                route.breaker.release()
                raise
            route.breaker.success()
            self.metrics.tried(self.model_id, deployment.name, "ok")
            return stream
        if last is not None and not last.transient:
            raise ProviderError(502, _failed(request_id), code="upstream_error")
        if last is not None:
            raise ProviderError(503, f"no deployment of {self.model_id} could answer "
                                f"(request {request_id})", code="upstream_unavailable",
                                retry_after=math.ceil(wait))
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


def _rough_tokens(request: ChatRequest) -> int:
    """The prompt's size at 4 characters a token (a token-id prompt: its length): what
    decides whether it fits."""
    raw = request.prompt
    if raw is not None and raw.token_ids is not None:
        return len(raw.token_ids) + (len(raw.suffix or "") + 3) // 4
    if raw is not None:
        return (len(raw.text or "") + len(raw.suffix or "") + 3) // 4
    chars = len(orjson.dumps(request.messages).decode())
    if request.tools:
        chars += len(orjson.dumps(request.tools).decode())
    return (chars + 3) // 4


def _failed(request_id: str) -> str:
    return f"the upstream deployment failed (request {request_id})"


async def _open(deployment: UpstreamDeployment | LocalDeployment,
                work: Prepared | UpstreamCall | None, prompt_tokens: int,
                on_end: Callable[[bool], None], request_id: str) -> ChatStream:
    if isinstance(deployment, LocalDeployment):
        assert work is not None and not isinstance(work, UpstreamCall)
        return await deployment.open(work, prompt_tokens, on_end, request_id)
    assert isinstance(work, UpstreamCall)
    return await deployment.send(work, prompt_tokens, on_end, request_id)


class AliasProvider(Provider[Prepared]):
    """A catalog id served by the built-in engine's model (a `kind = "local"` deployment)."""

    def __init__(self, model_id: str, target: ChatModel) -> None:
        self.model_id = model_id
        self.target = target

    def describe(self) -> dict[str, Any]:
        return self.target.describe()

    async def prepare_chat(self, request: ChatRequest) -> PreparedChat[Prepared]:
        prepared = await self.target.prepare_chat(request)
        return PreparedChat(request, prepared.prompt_tokens, prepared.max_tokens, prepared,
                            self)

    async def start_chat(self, prepared: PreparedChat[Prepared]) -> ChatStream:
        return await prepared.work.start()

    def tokenizer(self) -> Tokenizer | None:
        return self.target.tokenizer()


NATIVE_KINDS: dict[str, type[UpstreamDeployment]] = {
    "anthropic": AnthropicDeployment, "gemini": GeminiDeployment}
"""Deployments that speak their provider's own API instead of OpenAI's."""


def build_catalog(models: tuple[CatalogModelConfig, ...], router: RouterConfig,
                  environ: Any, local: ChatModel | None,
                  registry: CollectorRegistry | None = None,
                  engines: Mapping[str, ChatModel] | None = None) -> dict[str, ChatModel]:
    """The catalog's providers by model id (the built-in engine's own model not included);
    `engines`: the local models with a source of their own, by catalog id (their local
    deployment is that engine, not the [model] one)."""
    catalog: dict[str, ChatModel] = {}
    metrics = RouterMetrics(registry)
    for model in models:
        engine = (engines or {}).get(model.id)
        if len(model.deployments) == 1 and model.deployments[0].kind == "local":
            if engine is not None:
                catalog[model.id] = engine
                continue
            assert local is not None
            catalog[model.id] = AliasProvider(model.id, local)
            continue
        deployments: list[UpstreamDeployment | LocalDeployment] = []
        for d in model.deployments:
            if d.kind == "local":
                target = engine or local
                assert target is not None
                deployments.append(LocalDeployment(d, target))
            else:
                kind = NATIVE_KINDS.get(d.kind, UpstreamDeployment)
                deployments.append(kind(d, environ.get(d.api_key_env) if d.api_key_env
                                        else None))
        catalog[model.id] = RoutedModel(model, router, deployments, metrics=metrics)
    return catalog
