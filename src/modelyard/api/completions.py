"""POST /v1/completions on the request pipeline (api/exchange.py): OpenAI's legacy text
completions, with fill-in-the-middle (`suffix`), `echo`, legacy `logprobs` and `best_of`.

Each prompt runs as a request of its own on the model (the built-in engine, or an
upstream's /completions) with `best_of` (else `n`) choices; their streams merge into one
answer whose choices are numbered prompt after prompt (`providers/merged.py`). With
`best_of`, each prompt's `n` choices of the highest mean log-probability per token are
returned; all that were generated are billed, as OpenAI bills them.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import ValidationError

from modelyard.api.chat import check_choices, with_share
from modelyard.api.completion_schema import CompletionRequest
from modelyard.api.errors import APIError, from_validation_error
from modelyard.api.exchange import Bill, Exchange, Run
from modelyard.api.openapi import request_body
from modelyard.api.preparation import cheap
from modelyard.api.responses import SSE_DONE, sse
from modelyard.providers.base import ChatRequest, ChatStream, Prepared, TokenLogprobs
from modelyard.providers.merged import MergedStream

logger = logging.getLogger(__name__)

router = APIRouter()

COMPLETION_PATHS = frozenset({"/v1/completions", "/api/v1/completions"})


@router.post("/v1/completions", openapi_extra=request_body(CompletionRequest))
@router.post("/api/v1/completions", openapi_extra=request_body(CompletionRequest))
async def completions(request: Request) -> Response:
    """The route as FastAPI sees it (its schema, its 405s); requests themselves take the
    lane (api/lane.py)."""
    return Exchange(request.app.state.modelyard, answer_completions)


def _parse(body: bytes) -> CompletionRequest:
    try:
        return CompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def _requests(payload: CompletionRequest, request_id: str,
              account_id: str | None) -> list[ChatRequest]:
    best_of = payload.generated_choices > payload.choices
    return [ChatRequest(
        request_id=f"{request_id}-{index}", messages=[], prompt=prompt, cache_scope=account_id,
        max_tokens=payload.max_completion, sampling=payload.sampling(),
        logit_bias={int(k): v for k, v in (payload.logit_bias or {}).items()},
        stop=payload.stop_strings,
        include_stop_str_in_output=bool(payload.include_stop_str_in_output),
        seed=payload.seed, n=payload.generated_choices,
        # best_of ranks the choices by their log-probabilities: computed even if not shown
        logprobs=payload.logprobs is not None or best_of, top_logprobs=payload.logprobs or 0,
        response_format=(payload.response_format.model_dump(by_alias=True, exclude_none=True)
                         if payload.response_format else None),
        separate_reasoning=False, stream=payload.stream,
    ) for index, prompt in enumerate(payload.raw_prompts())]


async def answer_completions(run: Run, body: bytes) -> None:
    """The text completion endpoint's part of the pipeline."""
    state = run.state
    payload = _parse(body)
    provider = run.model(payload.model)
    completion_id = f"cmpl-{os.urandom(16).hex()}"
    caller = run.ticket.caller
    requests = [with_share(r, caller) for r in _requests(payload, completion_id,
                                                         caller.account_id)]
    generated = payload.generated_choices
    prepared: list[Prepared] = []
    if len(requests) == 1 and cheap(requests[0], len(body)):
        prepared = [await provider.prepare_chat(requests[0])]
        prompt_tokens, max_tokens = prepared[0].prompt_tokens, prepared[0].max_tokens
    else:
        prompt_tokens = sum(provider.prompt_token_bound(r) for r in requests)
        max_tokens = provider.max_tokens_bound(requests[0])
    check_choices(state, len(requests) * generated, max_tokens)
    bill = await run.admit(payload.model, prompt_tokens,
                           max_tokens * generated * len(requests), payload.user)
    if not prepared:
        for request in requests:
            prepared.append(await state.preparation.prepare(provider, request))
    streams: list[ChatStream] = []
    try:
        for one in prepared:
            streams.append(await one.start())
    finally:  # whatever started is closed (or drained) when the request ends
        if streams:
            run.stream = streams[0] if len(prepared) == 1 else MergedStream(streams, generated)
    assert run.stream is not None
    head = {"id": completion_id, "object": "text_completion", "created": int(time.time()),
            "model": payload.model, "system_fingerprint": state.system_fingerprint}
    if payload.stream:
        await _stream(run, head, run.stream, payload, bill)
    else:
        await _collect(run, head, run.stream, payload, len(requests), bill)


@dataclass
class _Choice:
    """One generated choice of a text completion."""

    parts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None

    def mean_logprob(self) -> float:
        if not self.logprobs:
            return float("-inf")
        return sum(entry.logprob for entry in self.logprobs) / len(self.logprobs)


def legacy_logprobs(entries: list[TokenLogprobs], offset: int) -> dict[str, Any]:
    """OpenAI's legacy logprobs of some tokens, their text offsets counted from `offset`."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return {"tokens": [entry.token for entry in entries],
            "token_logprobs": [entry.logprob for entry in entries],
            "top_logprobs": [{token: logprob for token, _, logprob in entry.top}
                             for entry in entries],
            "text_offset": offsets}


async def _collect(run: Run, head: dict[str, Any], deltas: ChatStream,
                   payload: CompletionRequest, prompts: int, bill: Bill) -> None:
    generated = payload.generated_choices
    choices = [_Choice() for _ in range(prompts * generated)]
    async for delta in deltas:
        choice = choices[delta.index]
        choice.parts.append(delta.text)
        if delta.logprobs:
            choice.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            choice.finish_reason = delta.finish_reason
        bill.sent(delta.usage)
    used = bill.used
    if used is None:
        raise APIError(500, "the model produced no output", code="server_error")
    returned: list[_Choice] = []
    for first in range(0, len(choices), generated):
        group = choices[first:first + generated]
        if generated > payload.choices:  # best_of: the most likely n, in their order
            best = sorted(range(generated), key=lambda i: group[i].mean_logprob(),
                          reverse=True)[:payload.choices]
            group = [group[i] for i in sorted(best)]
        returned += group
    bill.status = 200
    await bill.settle_now()
    body = {**head, "choices": [{
        "text": "".join(choice.parts), "index": index,
        "logprobs": None if payload.logprobs is None else legacy_logprobs(
            choice.logprobs, len(choice.parts[0]) if payload.echo and choice.parts else 0),
        "finish_reason": choice.finish_reason,
    } for index, choice in enumerate(returned)], "usage": used.as_openai()}
    await run.reply.json(body, headers=run.headers)


async def _stream(run: Run, head: dict[str, Any], deltas: ChatStream,
                  payload: CompletionRequest, bill: Bill) -> None:
    reply = run.reply
    await reply.open_stream(run.headers)
    offsets: dict[int, int] = {}
    async for delta in deltas:
        if delta.text or delta.logprobs or delta.finish_reason is not None:
            offset = offsets.get(delta.index, 0)
            logprobs = (None if payload.logprobs is None or not delta.logprobs
                        else legacy_logprobs(list(delta.logprobs), offset))
            offsets[delta.index] = offset + len(delta.text)
            await reply.chunk(sse({**head, "choices": [{
                "text": delta.text, "index": delta.index, "logprobs": logprobs,
                "finish_reason": delta.finish_reason}]}))
        bill.sent(delta.usage)  # reached only once the chunk was handed to the client
    used = bill.used
    bill.status = 200
    await bill.settle_now()
    if payload.include_usage and used is not None:
        await reply.chunk(sse({**head, "choices": [], "usage": used.as_openai()}))
    await reply.close_stream(SSE_DONE)
