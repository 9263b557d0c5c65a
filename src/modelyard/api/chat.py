"""POST /v1/chat/completions, from the key's check-in to the bill.

The order keeps every cost behind the limit that pays for it: the key's request rate and
requests in flight are checked before its body is read (`check_in`); the body is read
within a size cap and a deadline. A small request (a body of at most 16 KiB) without tools
or a response format is then prepared at once (it costs less than a millisecond) and
admitted for its exact counts; any other is admitted first, the token rate and balance
charged for upper bounds of its prompt and completion that cost nothing to compute
(`admit`), and only then prepared (rendered, tokenized, its grammar compiled), off the
event loop, a few at a time, within a time budget (`preparation.py`).

From admission on, one try/finally owns the bill: whatever ends the request (its answer,
a refusal, an error in the model or in modelyard, the client going away, the server
shutting down) settles it exactly once with the status it really ended with, and the ticket
is checked out exactly once after that. A watcher task cancels the work when the client goes
away (stream or not), so an abandoned request stops generating and pays for the tokens
generated until then. Settlement runs as a background task, so a cancelled request cannot
skip it; a complete answer waits for it before its last bytes (the JSON body, a stream's
usage chunk and `[DONE]`), so that a gateway killed just after cannot leave an answer its
client saw complete unbilled.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from modelyard.api.errors import APIError, as_api_error, from_validation_error
from modelyard.api.openapi import request_body
from modelyard.api.preparation import cheap
from modelyard.api.reply import Reply, read_body
from modelyard.api.responses import SSE_DONE, ChoiceResult, Completion, tool_call_body, usage
from modelyard.api.schema import ChatCompletionRequest
from modelyard.api.shutdown import SHUTTING_DOWN
from modelyard.api.state import AppState
from modelyard.platform.gate import Admission, Caller, Outcome, Ticket, Usage
from modelyard.providers.base import ChatDelta, ChatRequest, PreparedChat

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


SETTLE_WAIT_S = 2.0
"""How long a complete answer waits for its settlement before its last bytes go out."""

CLIENT_CLOSED = 499
"""The status recorded for a request whose client went away before its answer was sent
(nginx's "client closed request"); a stream that was cut records the 200 it was sent."""


@dataclass
class _Bill:
    """What a request has used so far and how it ended, for its settlement."""

    state: AppState
    admission: Admission
    user: str | None
    started: float
    first_token_at: float | None = None
    last: ChatDelta | None = None
    status: int = 500
    """How the request ended: until something better is known, a failure of modelyard's."""
    client_disconnected: bool = False
    settled: bool = False

    def sent(self, delta: ChatDelta) -> None:
        if self.first_token_at is None and delta.completion_tokens:
            self.first_token_at = time.monotonic()
        if self.last is not None and self.last.cached_tokens > delta.cached_tokens:
            delta = dataclasses.replace(delta, cached_tokens=self.last.cached_tokens)
        self.last = delta

    async def settle_now(self) -> None:
        """Settle before the answer's last bytes go out, so that no answer a client saw
        complete is lost with a gateway that dies just after it (the settlement goes on if
        the request is cancelled meanwhile), waiting at most SETTLE_WAIT_S."""
        task = self.settle()
        if task is not None:
            # A database that does not answer must not hold the answer: past the wait the
            # settlement goes on (and is kept and retried) while the last bytes go out.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), SETTLE_WAIT_S)

    def settle(self) -> asyncio.Task[None] | None:
        """Settle in the background (once; None when it already was)."""
        if self.settled:
            return None
        self.settled = True
        last = self.last
        used = Usage(last.prompt_tokens, last.cached_tokens, last.completion_tokens,
                     last.reasoning_tokens) if last else Usage()
        ttft = self.first_token_at - self.started if self.first_token_at else None
        outcome = Outcome(used, self.status, time.monotonic() - self.started, ttft, self.user,
                          estimated=bool(last and last.usage_estimated),
                          client_disconnected=self.client_disconnected)
        return self.state.run_in_background(self.state.gate.settle(self.admission, outcome))


CHAT_PATHS = frozenset({"/v1/chat/completions", "/api/v1/chat/completions"})


class _ChatExchange(Response):
    """The whole exchange as an ASGI response (what the FastAPI route answers with)."""

    def __init__(self, state: AppState) -> None:
        super().__init__()
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await handle_chat(self.state, scope, receive, send)


@router.post("/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
@router.post("/api/v1/chat/completions", openapi_extra=request_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    """The route as FastAPI sees it (its schema, its 405s); requests themselves take
    `ChatLane`, which calls `handle_chat` directly."""
    return _ChatExchange(request.app.state.modelyard)


async def handle_chat(state: AppState, scope: Scope, receive: Receive, send: Send) -> None:
    """One chat completion request, from its check-in to its settlement."""
    caller: Caller = scope["state"]["caller"]
    reply = Reply(send)
    try:
        ticket = await state.gate.check_in(caller)
    except Exception as exc:  # a refusal (429), or a failure of modelyard's (a 500)
        await reply.error(as_api_error(exc))
        return
    try:
        try:
            body = await read_body(receive, scope["headers"], state.max_body_bytes,
                                   state.body_timeout_s)
        except APIError as exc:
            await reply.error(exc)
            return
        await _Run(state, ticket, reply).serve(body, receive)
    finally:
        await state.gate.check_out(ticket)


@dataclass
class _Run:
    """One request after its body was read: the work, and the watch for the client."""

    state: AppState
    ticket: Ticket
    reply: Reply
    bill: _Bill | None = None
    deltas: AsyncIterator[ChatDelta] | None = None
    client_gone: bool = False
    failed: bool = False
    headers: dict[str, str] = field(default_factory=dict)

    async def serve(self, body: bytes, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        watch = asyncio.get_running_loop().create_task(self._watch(receive, task))
        try:
            await self._work(body)
        except asyncio.CancelledError:
            # the watcher's cancel is swallowed; any other (the server shutting down) is not
            if not self.client_gone or task.uncancel() > 0:
                self._ended(503)
                raise
            if self.bill is not None:
                self.bill.client_disconnected = True
                if not self.failed:  # an error it was being told keeps its status
                    self.bill.status = 200 if self.reply.started else CLIENT_CLOSED
        finally:
            watch.cancel()
            await self._finish()

    async def _watch(self, receive: Receive, work: asyncio.Task[Any]) -> None:
        """Cancel `work` when the client goes away before its answer was all sent (the
        answer's last send sets `finished` first, so a cancel lands only inside `_work`)."""
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception:  # a server that cannot tell: assume the client stays
            return
        # not when the server stops: its own disconnects and cancels are the shutdown
        if not self.reply.finished and not work.cancelling() and not SHUTTING_DOWN.is_set():
            self.client_gone = True
            work.cancel()

    def _ended(self, status: int) -> None:
        if self.bill is not None and self.bill.status == 500:
            self.bill.status = status

    async def _work(self, body: bytes) -> None:
        try:
            await self._answer(body)
        except Exception as exc:  # a refusal, a failure mid-stream or a bug: billed
            await self._fail(as_api_error(exc))

    async def _fail(self, error: APIError) -> None:
        self.failed = True
        if self.bill is not None:
            self.bill.status = error.status
        error.headers = {**self.headers, **error.headers}
        await self.reply.error(error)

    async def _answer(self, body: bytes) -> None:
        state = self.state
        payload = _parse(body)
        caller = self.ticket.caller
        provider = state.providers.get(payload.model)
        if provider is None or not state.gate.may_use(caller, payload.model):
            raise APIError(404, f"the model '{payload.model}' does not exist or you do not "
                           f"have access to it", param="model", code="model_not_found")
        request_id = f"chatcmpl-{os.urandom(16).hex()}"
        started = time.monotonic()
        request = _to_chat_request(payload, request_id, caller.account_id)
        n = payload.choices
        prepared: PreparedChat | None = None
        if cheap(request, len(body)):  # exact counts for less than a thread costs
            prepared = await provider.prepare_chat(request)
            prompt_tokens, max_tokens = prepared.prompt_tokens, prepared.max_tokens
        else:  # upper bounds now; the work once the request is paid for, off the loop
            prompt_tokens = provider.prompt_token_bound(request)
            max_tokens = provider.max_tokens_bound(request)
        if n > 1 and n * max_tokens > state.max_request_tokens:
            raise APIError(422, f"n ({n}) x max_tokens ({max_tokens}) exceeds the "
                           f"{state.max_request_tokens} completion tokens a request may ask "
                           "for; lower n or max_tokens", param="n", code="request_too_large")
        # n choices may each generate max_tokens: the most the request can cost.
        admission = await state.gate.admit(self.ticket, payload.model, prompt_tokens,
                                           max_tokens * n)
        self.headers = admission.headers
        self.bill = _Bill(state, admission, payload.user, started)
        if prepared is None:
            prepared = await state.preparation.prepare(provider, request)
            if prepared.prompt_tokens > prompt_tokens or prepared.max_tokens > max_tokens:
                logger.warning("%s: %d prompt and %d completion tokens exceed their bounds "
                               "(%d, %d); the charge is capped at the reservation",
                               payload.model, prepared.prompt_tokens, prepared.max_tokens,
                               prompt_tokens, max_tokens)
        self.deltas = await provider.start_chat(prepared)
        completion = Completion(request_id, int(time.time()), payload.model,
                                state.system_fingerprint)
        if payload.stream:
            include_usage = bool(payload.stream_options and payload.stream_options.include_usage)
            await self._stream(completion, self.deltas, n, include_usage, self.bill)
        else:
            await self._collect(completion, self.deltas, n, bool(payload.logprobs), self.bill)

    async def _collect(self, completion: Completion, deltas: AsyncIterator[ChatDelta], n: int,
                       logprobs: bool, bill: _Bill) -> None:
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
            bill.sent(delta)
        last = bill.last
        if last is None:
            raise APIError(500, "the model produced no output", code="server_error")
        bill.status = 200
        await bill.settle_now()
        await self.reply.json(
            completion.body(choices, usage(last.prompt_tokens, last.completion_tokens,
                                           last.cached_tokens, last.reasoning_tokens)),
            headers=self.headers)

    async def _stream(self, completion: Completion, deltas: AsyncIterator[ChatDelta], n: int,
                      include_usage: bool, bill: _Bill) -> None:
        reply = self.reply
        await reply.open_stream(self.headers)
        for index in range(n):
            await reply.chunk(completion.chunk({"role": "assistant", "content": ""},
                                               index=index))
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
            bill.sent(delta)  # reached only once the chunk was handed to the client
        last = bill.last
        bill.status = 200
        await bill.settle_now()
        if include_usage and last is not None:
            await reply.chunk(completion.usage_chunk(usage(
                last.prompt_tokens, last.completion_tokens, last.cached_tokens,
                last.reasoning_tokens)))
        await reply.close_stream(SSE_DONE)

    async def _finish(self) -> None:
        """Settle the bill and stop the model, whatever happened."""
        bill, deltas = self.bill, self.deltas
        if bill is None:
            return
        drain = getattr(deltas, "drain_usage", None)
        if self.client_gone and drain is not None and not bill.settled:
            # an upstream goes on generating: read its usage (bounded) for the bill
            self.state.run_in_background(_settle_after_drain(drain, bill))
            return
        bill.settle()
        if deltas is not None:
            await _close(deltas)


async def _settle_after_drain(drain: Callable[[float], Awaitable[ChatDelta | None]],
                              bill: _Bill) -> None:
    try:
        counts = await drain(bill.state.usage_drain_seconds)
        if counts is not None:
            bill.sent(counts)
    finally:
        bill.settle()


async def _close(deltas: AsyncIterator[ChatDelta]) -> None:
    """Close the provider's stream now (not when it is garbage collected), so a request
    whose client went away stops generating at once."""
    aclose = getattr(deltas, "aclose", None)
    if aclose is not None:
        await aclose()
