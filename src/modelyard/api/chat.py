"""POST /v1/chat/completions: validate, authorize, admit, run, stream, settle.

Every admitted request is settled exactly once, however it ends: a full answer, an error,
or a client that went away (billed for the tokens it was sent). Settlement runs as a
background task, so a cancelled request task cannot skip it.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from modelyard.api.errors import APIError, error_body, from_validation_error
from modelyard.api.event_stream import EventStream
from modelyard.api.responses import (
    SSE_DONE,
    ChoiceResult,
    Completion,
    sse,
    tool_call_body,
    usage,
)
from modelyard.api.routes import json_response
from modelyard.api.schema import ChatCompletionRequest
from modelyard.api.state import AppState
from modelyard.platform.gate import Admission, Caller, Outcome, PlatformError, Usage
from modelyard.providers.base import ChatDelta, ChatRequest, ProviderError, StreamError

router = APIRouter()


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        payload = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    return payload


def _to_chat_request(payload: ChatCompletionRequest, request_id: str) -> ChatRequest:
    return ChatRequest(
        request_id=request_id,
        messages=[m.to_template_dict() for m in payload.messages],
        max_tokens=payload.requested_max_tokens,
        temperature=payload.temperature,
        top_p=payload.top_p,
        top_k=payload.top_k,
        min_p=payload.min_p,
        frequency_penalty=payload.frequency_penalty,
        presence_penalty=payload.presence_penalty,
        repetition_penalty=payload.repetition_penalty,
        logit_bias={int(k): v for k, v in (payload.logit_bias or {}).items()},
        stop=payload.stop_strings,
        include_stop_str_in_output=bool(payload.include_stop_str_in_output),
        seed=payload.seed,
        n=payload.choices,
        logprobs=bool(payload.logprobs),
        top_logprobs=payload.top_logprobs or 0,
        tools=[tool.model_dump(exclude_none=True) for tool in payload.tools or []],
        tool_choice=(payload.tool_choice.model_dump() if not isinstance(
            payload.tool_choice, str | None) else payload.tool_choice),
        parallel_tool_calls=payload.parallel_tool_calls is not False,
        response_format=(payload.response_format.model_dump(by_alias=True, exclude_none=True)
                         if payload.response_format else None),
        enable_thinking=payload.enable_thinking,
        thinking_budget=payload.thinking_budget,
        reasoning_effort=payload.reasoning_effort,
        separate_reasoning=payload.separate_reasoning is not False,
        stream=bool(payload.stream),
        truncate_to_context=payload.context_length_exceeded_behavior == "truncate",
    )


@dataclass
class _Bill:
    """What a request has used so far, for its settlement."""

    state: AppState
    admission: Admission
    user: str | None
    started: float
    first_token_at: float | None = None
    last: ChatDelta | None = None
    settled: bool = False

    def sent(self, delta: ChatDelta) -> None:
        if self.first_token_at is None and delta.completion_tokens:
            self.first_token_at = time.monotonic()
        if self.last is not None and self.last.cached_tokens > delta.cached_tokens:
            delta = dataclasses.replace(delta, cached_tokens=self.last.cached_tokens)
        self.last = delta

    def settle(self, status: int, *, client_disconnected: bool = False) -> None:
        if self.settled:
            return
        self.settled = True
        last = self.last
        used = Usage(last.prompt_tokens, last.cached_tokens, last.completion_tokens,
                     last.reasoning_tokens) if last else Usage()
        ttft = self.first_token_at - self.started if self.first_token_at else None
        outcome = Outcome(used, status, time.monotonic() - self.started, ttft, self.user,
                          estimated=bool(last and last.usage_estimated),
                          client_disconnected=client_disconnected)
        self.state.run_in_background(self.state.gate.settle(self.admission, outcome))


def _as_api_error(exc: ProviderError | PlatformError) -> APIError:
    headers = dict(exc.headers) if isinstance(exc, PlatformError) else {}
    if isinstance(exc, ProviderError) and exc.retry_after:
        headers["Retry-After"] = str(exc.retry_after)
    return APIError(exc.status, exc.message, param=exc.param, code=exc.code, headers=headers)


CHAT_PATHS = frozenset({"/v1/chat/completions", "/api/v1/chat/completions"})


@router.post("/v1/chat/completions")
@router.post("/api/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """The route as FastAPI sees it (its schema, its 405s); requests themselves take
    `ChatLane`, which calls `answer_chat` directly."""
    return await answer_chat(request.app.state.modelyard, request.state.caller,
                             await request.body())


async def answer_chat(state: AppState, caller: Caller, body: bytes) -> Response:
    """A chat completion request's answer: a JSON body or an SSE stream."""
    payload = _parse(body)
    provider = state.providers.get(payload.model)
    if provider is None or not state.gate.may_use(caller, payload.model):
        raise APIError(404, f"the model '{payload.model}' does not exist or you do not have "
                       f"access to it", param="model", code="model_not_found")
    request_id = f"chatcmpl-{os.urandom(16).hex()}"
    started = time.monotonic()
    try:
        prepared = await provider.prepare_chat(_to_chat_request(payload, request_id))
        # n choices may each generate max_tokens: the most the request can cost.
        admission = await state.gate.admit(caller, payload.model, prepared.prompt_tokens,
                                           prepared.max_tokens * payload.choices)
    except (ProviderError, PlatformError) as exc:
        raise _as_api_error(exc) from None
    bill = _Bill(state, admission, payload.user, started)
    try:
        deltas = await provider.start_chat(prepared)
    except ProviderError as exc:
        bill.settle(exc.status)
        error = _as_api_error(exc)
        error.headers.update(admission.headers)
        raise error from None
    completion = Completion(request_id, int(time.time()), payload.model,
                            state.system_fingerprint)
    if payload.stream:
        include_usage = bool(payload.stream_options and payload.stream_options.include_usage)
        return EventStream(_stream(completion, deltas, payload.choices, include_usage, bill),
                           headers={"Cache-Control": "no-cache", **admission.headers})
    return await _collect(completion, deltas, payload.choices, bool(payload.logprobs), bill)


async def _collect(completion: Completion, deltas: AsyncIterator[ChatDelta], n: int,
                   logprobs: bool, bill: _Bill) -> Response:
    choices = [ChoiceResult(i, logprobs=[] if logprobs else None) for i in range(n)]
    try:
        async for delta in deltas:
            choice = choices[delta.index]
            choice.parts.append(delta.text)
            if delta.reasoning:
                choice.reasoning.append(delta.reasoning)
            choice.add_tool_calls(delta.tool_calls)
            if delta.finish_reason is not None:
                choice.finish_reason = delta.finish_reason
            if choice.logprobs is not None and delta.logprobs:
                choice.logprobs.extend(delta.logprobs)
            bill.sent(delta)
        bill.settle(200)
    except StreamError as exc:
        bill.settle(500)
        raise APIError(500, str(exc), code="server_error") from None
    finally:
        bill.settle(200, client_disconnected=True)  # cancelled: the client went away
        await _close(deltas)
    last = bill.last
    if last is None:
        raise APIError(500, "the model produced no output", code="server_error")
    return json_response(
        completion.body(choices, usage(last.prompt_tokens, last.completion_tokens,
                                       last.cached_tokens, last.reasoning_tokens)),
        headers=bill.admission.headers)


async def _stream(completion: Completion, deltas: AsyncIterator[ChatDelta], n: int,
                  include_usage: bool, bill: _Bill) -> AsyncGenerator[bytes, None]:
    try:
        for index in range(n):
            yield completion.chunk({"role": "assistant", "content": ""}, index=index)
        try:
            async for delta in deltas:
                if delta.reasoning:
                    yield completion.chunk({"reasoning_content": delta.reasoning},
                                           index=delta.index)
                if delta.text or delta.logprobs:
                    yield completion.chunk({"content": delta.text}, index=delta.index,
                                           logprobs=delta.logprobs)
                if delta.tool_calls:
                    yield completion.chunk(
                        {"tool_calls": [tool_call_body(call) for call in delta.tool_calls]},
                        index=delta.index)
                if delta.finish_reason is not None:
                    yield completion.chunk({}, delta.finish_reason, index=delta.index)
                bill.sent(delta)  # reached only once the chunk was handed to the client
        except StreamError as exc:
            bill.settle(500)
            yield sse(error_body(500, str(exc), code="server_error"))
            yield SSE_DONE
            return
        last = bill.last
        bill.settle(200)
        if include_usage and last is not None:
            yield completion.usage_chunk(usage(last.prompt_tokens, last.completion_tokens,
                                               last.cached_tokens, last.reasoning_tokens))
        yield SSE_DONE
    finally:
        drain = getattr(deltas, "drain_usage", None)
        if drain is not None and not bill.settled:
            # an upstream goes on generating: read its usage (bounded) for the bill
            bill.state.run_in_background(_settle_after_drain(drain, bill))
        else:
            bill.settle(200, client_disconnected=True)  # the client went away mid-stream
            await _close(deltas)


async def _settle_after_drain(drain: Callable[[float], Awaitable[ChatDelta | None]],
                              bill: _Bill) -> None:
    try:
        counts = await drain(bill.state.usage_drain_seconds)
        if counts is not None:
            bill.sent(counts)
    finally:
        bill.settle(200, client_disconnected=True)


async def _close(deltas: AsyncIterator[ChatDelta]) -> None:
    """Close the provider's stream now (not when it is garbage collected), so a request
    whose client went away stops generating at once."""
    aclose = getattr(deltas, "aclose", None)
    if aclose is not None:
        await aclose()
