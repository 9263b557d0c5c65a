"""POST /v1/messages (Anthropic's Messages API) on the request pipeline (api/exchange.py):
a translation onto the chat core, admitted, billed and limited as chat completions are.

The request becomes a `ChatRequest` (translate.py) and takes the chat route's admission
(`admit_chat`); the answer is built from the core's deltas (answer.py). Errors, from the
key's check-in on, are answered in Anthropic's shape (errors.py); one after a stream
started is its last event, `event: error`.
"""

from __future__ import annotations

import os

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from modelyard.api.anthropic.answer import Collected, EventWriter, Head
from modelyard.api.anthropic.count_tokens import count_tokens_work
from modelyard.api.anthropic.errors import ANTHROPIC
from modelyard.api.anthropic.native import native_model, relay_messages
from modelyard.api.anthropic.schema import CountTokensRequest, MessagesRequest
from modelyard.api.anthropic.translate import to_chat_request
from modelyard.api.chat import admit_chat
from modelyard.api.dialects import COUNT_TOKENS_PATHS, MESSAGES_PATHS
from modelyard.api.errors import APIError, from_validation_error
from modelyard.api.exchange import Bill, Exchange, Run
from modelyard.api.openapi import request_body
from modelyard.api.tokens import UnbilledExchange
from modelyard.providers.base import ChatStream

router = APIRouter()

__all__ = ["COUNT_TOKENS_PATHS", "MESSAGES_PATHS", "answer_messages", "router"]


@router.post("/v1/messages", openapi_extra=request_body(MessagesRequest))
async def messages(request: Request) -> Response:
    """The route as FastAPI sees it (its schema, its 405s); requests themselves take the
    lane (api/lane.py)."""
    return Exchange(request.app.state.modelyard, answer_messages, ANTHROPIC)


@router.post("/v1/messages/count_tokens", openapi_extra=request_body(CountTokensRequest))
async def count_tokens(request: Request) -> Response:
    return UnbilledExchange(request.app.state.modelyard, count_tokens_work, ANTHROPIC)


def _parse(body: bytes) -> MessagesRequest:
    try:
        return MessagesRequest.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def answer_messages(run: Run, body: bytes) -> None:
    """The Messages endpoint's part of the pipeline."""
    payload = _parse(body)
    provider = run.model(payload.model)
    message_id = f"msg_{os.urandom(12).hex()}"
    # Only a model this server runs can end its text with the stop string it matched.
    report_stop = bool(payload.stop_sequences) and provider.tokenizer() is not None
    request = to_chat_request(payload, message_id, run.ticket.caller.account_id, report_stop)
    user = payload.metadata.user_id if payload.metadata else None
    native = native_model(provider)
    if native is not None:  # Anthropic's own deployments: the body relayed as it is
        await relay_messages(run, native, body, request, payload.model, user)
        return
    prepared, bill = await admit_chat(run, provider, request, len(body), payload.model, user)
    run.stream = await prepared.start()
    head = Head(message_id, payload.model, request.stop if report_stop else ())
    if payload.stream:
        await _stream(run, head, run.stream, prepared.prompt_tokens, bill)
    else:
        await _collect(run, head, run.stream, bill)


async def _collect(run: Run, head: Head, deltas: ChatStream, bill: Bill) -> None:
    collected = Collected(head)
    async for delta in deltas:
        collected.add(delta)
        bill.sent(delta.usage)
    used = bill.used
    if used is None:
        raise APIError(500, "the model produced no output", code="server_error")
    bill.status = 200
    await bill.settle_now()
    await run.reply.json(collected.body(used), headers=run.headers)


async def _stream(run: Run, head: Head, deltas: ChatStream, prompt_tokens: int,
                  bill: Bill) -> None:
    reply = run.reply
    writer = EventWriter(head)
    await reply.open_stream(run.headers)
    # the prompt's count as prepared (an upstream's bound); message_delta has the final one
    await reply.chunk(writer.start(prompt_tokens))
    async for delta in deltas:
        events = writer.delta(delta)
        if events:
            await reply.chunk(events)
        bill.sent(delta.usage)  # reached only once the events were handed to the client
    used = bill.used
    if used is None:
        raise APIError(500, "the model produced no output", code="server_error")
    bill.status = 200
    await bill.settle_now()
    await reply.close_stream(writer.finish(used))
