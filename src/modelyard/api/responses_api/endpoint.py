"""`POST /v1/responses` on the request pipeline (api/exchange.py), and `GET`/`DELETE
/v1/responses/{id}` on the stored responses.

A request is parsed, its `previous_response_id` read back (a 404 when the account has no
such response), its conversation translated onto a `ChatRequest` and admitted and prepared
as a chat completion (`admit_chat`); its deltas become output items (`output.py`), streamed
as semantic events or answered whole. With `store` (the default) the response is kept
before the answer's last bytes, so that a client can continue it at once; a store that
fails is logged and the answer still goes out (it was generated and billed).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from modelyard.api.chat import admit_chat
from modelyard.api.errors import APIError, from_validation_error
from modelyard.api.exchange import Bill, Exchange, Run
from modelyard.api.openapi import request_body
from modelyard.api.responses_api.output import FailedStream, Output, event_bytes, new_id
from modelyard.api.responses_api.schema import ResponsesRequest
from modelyard.api.responses_api.translate import (
    conversation,
    item_dicts,
    stored_items,
    to_chat_request,
)
from modelyard.api.state import AppState
from modelyard.api.tokens import UnbilledExchange
from modelyard.platform.gate import Caller
from modelyard.platform.response_store import StoredResponse
from modelyard.providers.base import ChatStream

logger = logging.getLogger(__name__)

router = APIRouter()

RESPONSES_PATHS = frozenset({"/v1/responses"})
_RESPONSE_ID = re.compile(r"resp_[0-9a-f]{32}")


@router.post("/v1/responses", openapi_extra=request_body(ResponsesRequest))
async def create_response(request: Request) -> Response:
    """The route as FastAPI sees it (its schema, its 405s); requests themselves take the
    lane (api/lane.py)."""
    return Exchange(request.app.state.modelyard, answer_responses)


@router.get("/v1/responses/{response_id}")
async def get_response(request: Request, response_id: str) -> Response:
    async def work(state: AppState, caller: Caller, body: bytes) -> dict[str, Any]:
        return (await _stored(state, caller, response_id, "response_id")).body
    return UnbilledExchange(request.app.state.modelyard, work)


@router.delete("/v1/responses/{response_id}")
async def delete_response(request: Request, response_id: str) -> Response:
    async def work(state: AppState, caller: Caller, body: bytes) -> dict[str, Any]:
        if not _RESPONSE_ID.fullmatch(response_id) or not await state.responses.delete(
                _account(caller), response_id):
            raise _not_found(response_id, "response_id")
        return {"id": response_id, "object": "response.deleted", "deleted": True}
    return UnbilledExchange(request.app.state.modelyard, work)


def _account(caller: Caller) -> str:
    return caller.account_id or ""


def _not_found(response_id: str, param: str) -> APIError:
    shown = response_id if _RESPONSE_ID.fullmatch(response_id) else "(an invalid id)"
    return APIError(404, f"no response with id '{shown}' was found", param=param,
                    code="response_not_found")


async def _stored(state: AppState, caller: Caller, response_id: str,
                  param: str) -> StoredResponse:
    """The caller's account's stored response (a 404 for any other, unknown or invalid)."""
    if not _RESPONSE_ID.fullmatch(response_id):
        raise _not_found(response_id, param)
    record = await state.responses.load(_account(caller), response_id)
    if record is None:
        raise _not_found(response_id, param)
    return record


def _parse(body: bytes) -> ResponsesRequest:
    try:
        return ResponsesRequest.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _base(payload: ResponsesRequest, response_id: str) -> dict[str, Any]:
    """The response's request-side fields, as OpenAI echoes them."""
    form = payload.text.format if payload.text and payload.text.format else None
    effort = payload.reasoning.effort if payload.reasoning else None
    summary = payload.reasoning.summary if payload.reasoning else None
    return {
        "id": response_id, "object": "response", "created_at": int(time.time()),
        "model": payload.model, "instructions": payload.instructions,
        "max_output_tokens": payload.max_output_tokens,
        "previous_response_id": payload.previous_response_id,
        "parallel_tool_calls": payload.parallel_tool_calls is not False,
        "tool_choice": (payload.tool_choice.model_dump() if payload.tool_choice is not None
                        and not isinstance(payload.tool_choice, str)
                        else payload.tool_choice or "auto"),
        "tools": [tool.model_dump(by_alias=True, exclude_none=True)
                  for tool in payload.function_tools],
        "text": {"format": form.model_dump(by_alias=True, exclude_none=True) if form
                 else {"type": "text"}},
        "reasoning": {"effort": effort, "summary": summary},
        "temperature": payload.temperature, "top_p": payload.top_p,
        "metadata": payload.metadata or {}, "user": payload.user, "store": payload.store,
        "truncation": "disabled",
    }


async def answer_responses(run: Run, body: bytes) -> None:
    """The Responses endpoint's part of the pipeline."""
    state = run.state
    payload = _parse(body)
    provider = run.model(payload.model)
    caller = run.ticket.caller
    previous: list[Any] = []
    if payload.previous_response_id is not None:
        record = await _stored(state, caller, payload.previous_response_id,
                               "previous_response_id")
        previous = stored_items([*record.input, *record.body.get("output", [])])
    items = conversation(previous, payload)
    response_id = new_id("resp")
    request = to_chat_request(payload, items, response_id, caller.account_id)
    prepared, bill = await admit_chat(run, provider, request, len(body), payload.model,
                                      payload.user)
    run.stream = await prepared.start()
    output = Output(_base(payload, response_id))
    stored = item_dicts(items) if payload.store else None
    if payload.stream:
        await _stream(run, output, run.stream, bill, stored)
    else:
        await _collect(run, output, run.stream, bill, stored)


async def _keep(run: Run, stored: list[dict[str, Any]] | None, body: dict[str, Any]) -> None:
    if stored is None:
        return
    record = StoredResponse(body["id"], _account(run.ticket.caller), stored, body)
    try:
        await run.state.responses.save(record)
    except Exception:  # the answer stands: it was generated and billed
        logger.warning("response %s could not be stored", body["id"], exc_info=True)


async def _collect(run: Run, output: Output, deltas: ChatStream, bill: Bill,
                   stored: list[dict[str, Any]] | None) -> None:
    async for delta in deltas:
        output.add(delta)
        bill.sent(delta.usage)
    used = bill.used
    if used is None:
        raise APIError(500, "the model produced no output", code="server_error")
    body, _ = output.finish(used)
    bill.status = 200
    await bill.settle_now()
    await _keep(run, stored, body)
    await run.reply.json(body, headers=run.headers)


async def _stream(run: Run, output: Output, deltas: ChatStream, bill: Bill,
                  stored: list[dict[str, Any]] | None) -> None:
    reply = run.reply
    await reply.open_stream(run.headers)
    reply.errors = FailedStream(output)
    for event in output.start():
        await reply.chunk(event_bytes(event))
    async for delta in deltas:
        events = output.add(delta)
        if events:
            await reply.chunk(b"".join(event_bytes(event) for event in events))
        bill.sent(delta.usage)  # reached only once the events were handed to the client
    used = bill.used
    if used is None:
        raise APIError(500, "the model produced no output", code="server_error")
    body, events = output.finish(used)
    bill.status = 200
    await bill.settle_now()
    await _keep(run, stored, body)
    await reply.close_stream(b"".join(event_bytes(event) for event in events))
