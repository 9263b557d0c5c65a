"""POST /v1/messages/count_tokens: `{"input_tokens"}` of a Messages request's prompt.

The request is translated as /v1/messages translates it (system, messages, tools) and
counted by the model's own tokenizer through its chat template (`Provider.tokenizer()`,
as /tokenize counts), so the count is the prompt a /v1/messages request with the same
fields is billed for (its `input_tokens` plus `cache_read_input_tokens`). Keyed and
unbilled, checked in and out as /tokenize is (api/tokens.py); a model served by an
upstream, whose tokenizer this server does not hold, is a 400 naming `model`.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import ValidationError

from modelyard.api.anthropic.schema import CountTokensRequest
from modelyard.api.anthropic.translate import chat_messages, chat_tools, thinking_fields
from modelyard.api.errors import APIError, from_validation_error
from modelyard.api.exchange import model_not_found
from modelyard.api.preparation import CHEAP_BODY_BYTES
from modelyard.api.state import AppState
from modelyard.platform.gate import Caller
from modelyard.providers.managed import until_loaded


async def count_tokens_work(state: AppState, caller: Caller, body: bytes) -> dict[str, Any]:
    try:
        payload = CountTokensRequest.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None
    provider = state.providers.get(payload.model)
    if provider is None or not state.gate.may_use(caller, payload.model):
        raise model_not_found(payload.model)
    await until_loaded(provider)  # a pooled local model loads on its first request
    tokenizer = provider.tokenizer()
    if tokenizer is None:
        raise APIError(400, f"the model '{payload.model}' is served by an upstream deployment "
                       "whose tokenizer this server does not have, so its tokens cannot be "
                       "counted here", param="model", code="tokenizer_unavailable")
    messages = chat_messages(payload)
    tools = chat_tools(payload)
    enable_thinking, _ = thinking_fields(payload)

    def count() -> int:
        return len(tokenizer.tokenize_messages(messages, True, False, tools=tools,
                                               enable_thinking=enable_thinking))

    # Small inputs cost less than a thread's hand-over: those run here.
    tokens = count() if len(body) <= CHEAP_BODY_BYTES else await asyncio.to_thread(count)
    return {"input_tokens": tokens}
