"""The HTTP routes: chat completions (and its /api alias), models, health, metrics."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError

from modelyard.api.errors import APIError, error_body, from_validation_error
from modelyard.api.responses import SSE_DONE, Completion, sse, usage
from modelyard.api.schema import ChatCompletionRequest, check_supported
from modelyard.api.state import AppState
from modelyard.providers.base import ChatDelta, ChatRequest, ProviderError, StreamError

logger = logging.getLogger(__name__)
router = APIRouter()


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.modelyard
    return state


def json_response(body: dict[str, Any], status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers,
                    media_type="application/json")


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        payload = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    check_supported(payload)
    return payload


def _to_chat_request(payload: ChatCompletionRequest, request_id: str) -> ChatRequest:
    return ChatRequest(
        request_id=request_id,
        messages=[m.to_template_dict() for m in payload.messages],
        max_tokens=payload.requested_max_tokens,
        temperature=payload.temperature,
        top_p=payload.top_p,
        stop=payload.stop_strings,
        seed=payload.seed,
        truncate_to_context=payload.context_length_exceeded_behavior == "truncate",
    )


@router.post("/v1/chat/completions")
@router.post("/api/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = _state(request)
    payload = _parse(await request.body())
    provider = state.providers.get(payload.model)
    if provider is None:
        raise APIError(404, f"the model '{payload.model}' does not exist or you do not have "
                       f"access to it", param="model", code="model_not_found")
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    try:
        deltas = await provider.start_chat(_to_chat_request(payload, request_id))
    except ProviderError as exc:
        headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
        raise APIError(exc.status, exc.message, param=exc.param, code=exc.code,
                       headers=headers) from None
    completion = Completion(request_id, int(time.time()), payload.model,
                            state.system_fingerprint)
    if payload.stream:
        include_usage = bool(payload.stream_options and payload.stream_options.include_usage)
        return StreamingResponse(_stream(completion, deltas, include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    return await _collect(completion, deltas)


async def _collect(completion: Completion, deltas: AsyncIterator[ChatDelta]) -> Response:
    parts: list[str] = []
    last: ChatDelta | None = None
    try:
        async for delta in deltas:
            parts.append(delta.text)
            last = delta
    except StreamError as exc:
        raise APIError(500, str(exc), code="server_error") from None
    if last is None:
        raise APIError(500, "the model produced no output", code="server_error")
    return json_response(completion.body("".join(parts), last.finish_reason,
                                         usage(last.prompt_tokens, last.completion_tokens,
                                               last.cached_tokens)))


async def _stream(completion: Completion, deltas: AsyncIterator[ChatDelta],
                  include_usage: bool) -> AsyncIterator[bytes]:
    yield completion.chunk({"role": "assistant", "content": ""})
    last: ChatDelta | None = None
    try:
        async for delta in deltas:
            last = delta
            if delta.text:
                yield completion.chunk({"content": delta.text})
            if delta.finish_reason is not None:
                yield completion.chunk({}, delta.finish_reason)
    except StreamError as exc:
        yield sse(error_body(500, str(exc), code="server_error"))
        yield SSE_DONE
        return
    if include_usage and last is not None:
        yield completion.usage_chunk(usage(last.prompt_tokens, last.completion_tokens,
                                                  last.cached_tokens))
    yield SSE_DONE


@router.get("/v1/models")
@router.get("/api/v1/models")
async def list_models(request: Request) -> Response:
    state = _state(request)
    data = [{"id": model_id, "object": "model", "created": state.started, "owned_by": "modelyard",
             **provider.describe()} for model_id, provider in state.providers.items()]
    return json_response({"object": "list", "data": data})


@router.get("/health")
async def health(request: Request) -> Response:
    return json_response({"status": "ok", "models": list(_state(request).providers)})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).registry), media_type=CONTENT_TYPE_LATEST)
