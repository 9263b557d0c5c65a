"""POST /v1/chat/completions on the request pipeline (api/exchange.py).

A small request (a body of at most 16 KiB) without tools or a response format is prepared
at once (it costs less than a millisecond) and admitted for its exact counts; any other is
admitted first, the token rate and balance charged for upper bounds of its prompt and
completion that cost nothing to compute, and only then prepared (rendered, tokenized, its
grammar compiled), off the event loop, a few at a time, within a time budget
(`preparation.py`). The answer waits for its settlement before its last bytes (the JSON
body, a stream's usage chunk and `[DONE]`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from modelyard.api.errors import APIError, from_validation_error
from modelyard.api.exchange import Bill, Exchange, Run, handle
from modelyard.api.openapi import request_body
from modelyard.api.preparation import cheap
from modelyard.api.responses import SSE_DONE, ChoiceResult, Completion, tool_call_body
from modelyard.api.schema import ChatCompletionRequest
from modelyard.api.state import AppState
from modelyard.engine.sequence import Share
from modelyard.platform.gate import Caller
from modelyard.providers.base import ChatModel, ChatRequest, ChatStream, Prepared

logger = logging.getLogger(__name__)

router = APIRouter()


def _parse(body: bytes) -> ChatCompletionRequest:
    try:
        payload = ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    return payload


def _to_chat_request(payload: ChatCompletionRequest, request_id: str,
                     account_id: str | None = None) -> ChatRequest:
    return ChatRequest(
        request_id=request_id,
        cache_scope=account_id,
        messages=[m.to_template_dict() for m in payload.messages],
        max_tokens=payload.requested_max_tokens,
        sampling=payload.sampling(),
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


CHAT_PATHS = frozenset({"/v1/chat/completions", "/api/v1/chat/completions"})


@router.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
@router.post("/api/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    """The route as FastAPI sees it (its schema, its 405s); requests themselves take
    `ChatLane`, which calls `handle_chat` directly."""
    return Exchange(request.app.state.modelyard, answer_chat)


async def handle_chat(state: AppState, scope: Scope, receive: Receive, send: Send) -> None:
    """One chat completion request, from its check-in to its settlement."""
    await handle(state, scope, receive, send, answer_chat)


async def answer_chat(run: Run, body: bytes) -> None:
    """The chat endpoint's part of the pipeline."""
    state = run.state
    payload = _parse(body)
    provider = run.model(payload.model)
    caller = run.ticket.caller
    request_id = f"chatcmpl-{os.urandom(16).hex()}"
    request = _to_chat_request(payload, request_id, caller.account_id)
    n = payload.choices
    prepared, bill = await admit_chat(run, provider, request, len(body), payload.model,
                                      payload.user)
    run.stream = await prepared.start()
    completion = Completion(request_id, int(time.time()), payload.model,
                            state.system_fingerprint)
    if payload.stream:
        await _stream(run, completion, run.stream, n, payload.include_usage, bill)
    else:
        await _collect(run, completion, run.stream, n, bool(payload.logprobs), bill)


async def admit_chat(run: Run, provider: ChatModel, request: ChatRequest, body_size: int,
                     model: str, user: str | None) -> tuple[Prepared, Bill]:
    """Admit a request on the chat core and prepare it (see the module's docstring): every
    endpoint that translates onto `ChatRequest` takes this step."""
    state = run.state
    request = with_share(request, run.ticket.caller)
    n = request.n
    prepared: Prepared | None = None
    if cheap(request, body_size):  # exact counts for less than a thread costs
        prepared = await provider.prepare_chat(request)
        prompt_tokens, max_tokens = prepared.prompt_tokens, prepared.max_tokens
    else:  # upper bounds now; the work once the request is paid for, off the loop
        prompt_tokens = provider.prompt_token_bound(request)
        max_tokens = provider.max_tokens_bound(request)
    check_choices(state, n, max_tokens)
    # n choices may each generate max_tokens: the most the request can cost.
    bill = await run.admit(model, prompt_tokens, max_tokens * n, user)
    if prepared is None:
        prepared = await state.preparation.prepare(provider, request)
        if prepared.prompt_tokens > prompt_tokens or prepared.max_tokens > max_tokens:
            logger.warning("%s: %d prompt and %d completion tokens exceed their bounds "
                           "(%d, %d); the charge is capped at the reservation",
                           model, prepared.prompt_tokens, prepared.max_tokens,
                           prompt_tokens, max_tokens)
    return prepared, bill


def with_share(request: ChatRequest, caller: Caller) -> ChatRequest:
    """The request with its caller's share of the built-in engines (fair_share.py): its
    account, the account's weight and the key's priority."""
    if caller.account_id is None or request.share is not None:
        return request
    return dataclasses.replace(request, share=Share(caller.account_id, caller.weight,
                                                    caller.priority))


def check_choices(state: AppState, n: int, max_tokens: int) -> None:
    if n > 1 and n * max_tokens > state.max_request_tokens:
        raise APIError(422, f"n ({n}) x max_tokens ({max_tokens}) exceeds the "
                       f"{state.max_request_tokens} completion tokens a request may ask "
                       "for; lower n or max_tokens", param="n", code="request_too_large")


async def _collect(run: Run, completion: Completion, deltas: ChatStream, n: int,
                   logprobs: bool, bill: Bill) -> None:
    choices = [ChoiceResult(i, logprobs=[] if logprobs else None) for i in range(n)]
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
        bill.sent(delta.usage)
    used = bill.used
    if used is None:
        raise APIError(500, "the model produced no output", code="server_error")
    bill.status = 200
    await bill.settle_now()
    await run.reply.json(completion.body(choices, used.as_openai()), headers=run.headers)


async def _stream(run: Run, completion: Completion, deltas: ChatStream, n: int,
                  include_usage: bool, bill: Bill) -> None:
    reply = run.reply
    await reply.open_stream(run.headers)
    for index in range(n):
        await reply.chunk(completion.chunk({"role": "assistant", "content": ""}, index=index))
    async for delta in deltas:
        if delta.reasoning:
            await reply.chunk(completion.chunk({"reasoning_content": delta.reasoning},
                                               index=delta.index))
        if delta.text or delta.logprobs:
            await reply.chunk(completion.chunk({"content": delta.text}, index=delta.index,
                                               logprobs=delta.logprobs))
        if delta.tool_calls:
            await reply.chunk(completion.chunk(
                {"tool_calls": [tool_call_body(call) for call in delta.tool_calls]},
                index=delta.index))
        if delta.finish_reason is not None:
            await reply.chunk(completion.chunk({}, delta.finish_reason, index=delta.index))
        bill.sent(delta.usage)  # reached only once the chunk was handed to the client
    used = bill.used
    bill.status = 200
    await bill.settle_now()
    if include_usage and used is not None:
        await reply.chunk(completion.usage_chunk(used.as_openai()))
    await reply.close_stream(SSE_DONE)
