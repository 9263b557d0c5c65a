"""A catalog embedding model (`task = "embedding"`) served by OpenAI-compatible upstreams:
`POST {base_url}/embeddings`, passed through.

The request goes upstream as the client sent it (its inputs, `encoding_format`,
`dimensions`, `user`), under the deployment's model name; the answer is read whole
(capped), its vectors decoded (floats or base64) and answered in modelyard's own shape
under the catalog id, with the upstream's token count (or, when it reports none, the
bound the request was admitted for). Deployments are chosen by weight among those whose
circuit breaker lets requests through; a failure that cannot have produced an answer (no
connection, a 5xx or 429, a timeout) is tried on another one, up to the router's
`max_attempts`. Errors are sanitized as for chat (`openai_compat`): a 400/413/422 passes
on with the upstream's message cleaned of URLs, addresses and keys; anything else is a
502 or 503 naming only the request.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import random
import time
from typing import Any

import numpy as np
import orjson

from modelyard.config import CatalogModelConfig, DeploymentConfig, RouterConfig
from modelyard.providers.base import ProviderError
from modelyard.providers.embeddings import (
    EmbeddingModel,
    EmbeddingRequest,
    Embeddings,
    PreparedEmbedding,
    utf8_bound,
)
from modelyard.providers.http1 import HTTPError, Pool, ResponseTooLarge
from modelyard.providers.openai_compat import UpstreamError, _error_body, _status_error
from modelyard.router.balancer import choose
from modelyard.router.breaker import Breaker

logger = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 256 * 1024 * 1024
"""2048 vectors of 3072 floats as JSON text is about 150 MB."""


class _Deployment:
    def __init__(self, config: DeploymentConfig, api_key: str | None,
                 router: RouterConfig) -> None:
        self.config = config
        self.name = config.name or f"{config.base_url}#{config.upstream_model or ''}"
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self.pool = Pool(config.base_url, connect_timeout=config.connect_timeout,
                         max_idle=config.max_concurrency, headers=headers,
                         max_body=MAX_ANSWER_BYTES)
        self.breaker = Breaker(router.breaker_failures, router.breaker_cooldown_seconds)
        self.active = 0

    async def post(self, body: dict[str, Any]) -> bytes:
        """The upstream's 200 answer, whole; UpstreamError otherwise."""
        limit = self.config.total_timeout
        try:
            async with asyncio.timeout(limit):
                response = await self.pool.post("embeddings", orjson.dumps(body),
                                                read_timeout=limit,
                                                deadline=time.monotonic() + limit)
                try:
                    if response.status != 200:
                        raw = await _error_body(response)
                        raise _status_error(response.status, raw)
                    answer = await response.read()
                    response.release()
                    return answer
                except BaseException:
                    response.close()
                    raise
        except TimeoutError:
            raise UpstreamError(504, f"no answer within {limit} s", retriable=True) from None
        except ResponseTooLarge as exc:
            raise UpstreamError(502, str(exc), retriable=False) from None
        except HTTPError as exc:
            raise UpstreamError(502, str(exc), retriable=True) from None


class UpstreamEmbeddings(EmbeddingModel[dict[str, Any]]):
    def __init__(self, config: CatalogModelConfig, router: RouterConfig, environ: Any,
                 rng: random.Random | None = None) -> None:
        self.model_id = config.id
        self.config = config
        self.router = router
        self.deployments = [
            _Deployment(d, environ.get(d.api_key_env) if d.api_key_env else None, router)
            for d in config.deployments]
        self._rng = rng or random.Random()

    def describe(self) -> dict[str, Any]:
        return {"task": "embedding", "context_length": self.config.context_length,
                "deployments": [{"name": d.name, "breaker": d.breaker.state}
                                for d in self.deployments]}

    async def prepare(self, request: EmbeddingRequest) -> PreparedEmbedding[dict[str, Any]]:
        if request.tokenized:
            bound = sum(len(tokens) for tokens in request.inputs)
            inputs: list[Any] = [list(tokens) for tokens in request.inputs]
        else:
            texts = [text for text in request.inputs if isinstance(text, str)]
            bound, inputs = utf8_bound(texts), texts
        body: dict[str, Any] = {"input": inputs, "encoding_format": request.encoding_format}
        if request.dimensions is not None:
            body["dimensions"] = request.dimensions
        if request.user is not None:
            body["user"] = request.user
        return PreparedEmbedding(request, bound, body, self)

    async def embed(self, prepared: PreparedEmbedding[dict[str, Any]]) -> Embeddings:
        request_id = prepared.request.request_id
        tried: set[int] = set()
        last: UpstreamError | None = None
        for _ in range(self.router.max_attempts):
            now = time.monotonic()
            candidates = [d for i, d in enumerate(self.deployments) if i not in tried
                          and d.active < d.config.max_concurrency and d.breaker.available(now)]
            deployment = choose(candidates, lambda d: d.config.weight, self._rng)
            if deployment is None or not deployment.breaker.acquire(now):
                break
            tried.add(self.deployments.index(deployment))
            body = {**prepared.work,
                    "model": deployment.config.upstream_model or self.model_id}
            deployment.active += 1
            try:
                raw = await deployment.post(body)
            except UpstreamError as exc:
                logger.warning("request %s: %s, deployment %s: %s", request_id,
                               self.model_id, deployment.name, exc.message)
                if exc.public is not None:  # the upstream refused the request itself
                    deployment.breaker.success()
                    raise ProviderError(exc.status, exc.public, param=exc.param,
                                        code=exc.code or "upstream_refused") from None
                deployment.breaker.failure(time.monotonic())
                if exc.retriable:
                    last = exc
                    continue
                raise ProviderError(502, _failed(request_id), code="upstream_error") from None
            except BaseException:
                deployment.breaker.release()
                raise
            finally:
                deployment.active -= 1
            deployment.breaker.success()
            try:
                return _read_answer(raw, len(prepared.request.inputs), prepared.prompt_tokens)
            except ValueError as exc:
                logger.warning("request %s: %s, deployment %s: a malformed answer: %s",
                               request_id, self.model_id, deployment.name, exc)
                raise ProviderError(502, _failed(request_id),
                                    code="upstream_error") from None
        if last is not None and not last.transient:
            raise ProviderError(502, _failed(request_id), code="upstream_error")
        raise ProviderError(503, f"no deployment of {self.model_id} could answer (request "
                            f"{request_id})", code="upstream_unavailable", retry_after=1)

    async def close(self) -> None:
        for deployment in self.deployments:
            deployment.pool.close()


def _read_answer(raw: bytes, count: int, bound: int) -> Embeddings:
    """An OpenAI embeddings answer: `count` vectors of one length, by index."""
    try:
        answer = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    data = answer.get("data") if isinstance(answer, dict) else None
    if not isinstance(data, list) or len(data) != count:
        raise ValueError(f"expected {count} embeddings")
    rows: list[np.ndarray[Any, np.dtype[np.float32]] | None] = [None] * count
    for item in data:
        index = item.get("index") if isinstance(item, dict) else None
        if not isinstance(index, int) or not 0 <= index < count or rows[index] is not None:
            raise ValueError("an embedding with a missing, repeated or wrong index")
        rows[index] = _vector(item.get("embedding"))
    width = {len(row) for row in rows if row is not None}
    if len(width) != 1 or 0 in width:
        raise ValueError("embeddings of different or no lengths")
    vectors = np.stack([row for row in rows if row is not None])
    if not np.isfinite(vectors).all():
        raise ValueError("an embedding that is not finite")
    usage = answer.get("usage")
    tokens = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    if isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 0:
        return Embeddings(vectors, min(tokens, bound) if bound else tokens)
    return Embeddings(vectors, bound, estimated=True)


def _vector(value: Any) -> np.ndarray[Any, np.dtype[np.float32]]:
    if isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValueError(f"bad base64: {exc}") from None
        if len(data) % 4:
            raise ValueError("base64 that is not float32s")
        return np.frombuffer(data, dtype="<f4").astype(np.float32)
    if isinstance(value, list) and all(
            isinstance(x, int | float) and not isinstance(x, bool) for x in value):
        return np.asarray(value, dtype=np.float32)
    raise ValueError("an embedding that is neither floats nor base64")


def _failed(request_id: str) -> str:
    return f"the upstream deployment failed (request {request_id})"
