"""POST /v1/messages for a model every deployment of which is Anthropic's: the client's
own body is relayed to them, with no round trip through Chat Completions.

The request still takes the chat path's admission (`admit_chat`, its translation giving
the bounds to reserve) and its routing, retries and breakers (`RoutedModel.prepare_native`);
the answer is the upstream's, byte for byte (`AnthropicRelay`: each streamed event as it
was written, or the whole message, under the model name the client asked for), and the
bill is the upstream's usage read on the way. The last event (`message_stop`) waits for
the settlement, as every answer's last bytes do.
"""

from __future__ import annotations

from typing import Any

import orjson

from modelyard.api.chat import admit_chat
from modelyard.api.errors import APIError
from modelyard.api.exchange import Run
from modelyard.providers.anthropic_upstream import AnthropicRelay
from modelyard.providers.base import ChatModel, ChatRequest, Prepared
from modelyard.providers.tokens import Tokenizer
from modelyard.router.catalog import RoutedModel


def native_model(provider: ChatModel) -> RoutedModel | None:
    """The model, when a Messages request to it is relayed as it is."""
    if isinstance(provider, RoutedModel) and provider.served_by("anthropic"):
        return provider
    return None


class NativeMessages:
    """The model as the admission sees it, for one relayed request (`body`)."""

    def __init__(self, model: RoutedModel, body: dict[str, Any]) -> None:
        self.model = model
        self.model_id = model.model_id
        self.body = body

    def describe(self) -> dict[str, Any]:
        return self.model.describe()

    def context_limit(self) -> int | None:
        return self.model.context_limit()

    def prompt_token_bound(self, request: ChatRequest) -> int:
        return self.model.prompt_token_bound(request)

    def max_tokens_bound(self, request: ChatRequest) -> int:
        return self.model.max_tokens_bound(request)

    async def prepare_chat(self, request: ChatRequest) -> Prepared:
        return self.model.prepare_native(request, self.body)

    def tokenizer(self) -> Tokenizer | None:
        return None

    async def close(self) -> None:
        return None


async def relay_messages(run: Run, model: RoutedModel, body: bytes, request: ChatRequest,
                         model_name: str, user: str | None) -> None:
    """Answer one Messages request (`body`, `request` its translation) from `model`'s
    Anthropic deployments."""
    raw: dict[str, Any] = orjson.loads(body)
    prepared, bill = await admit_chat(run, NativeMessages(model, raw), request, len(body),
                                      model_name, user)
    relay = run.stream = await prepared.start()
    if not isinstance(relay, AnthropicRelay):
        raise APIError(500, "the model's answer cannot be relayed", code="server_error")
    reply = run.reply
    held = b""
    if request.stream:
        await reply.open_stream(run.headers)
    async for event in relay.events():  # whole: no events, the connection released
        if held:
            await reply.chunk(held)
            bill.sent(relay.usage)
        held = event
    bill.sent(relay.usage)
    bill.status = 200
    await bill.settle_now()
    if request.stream:
        await reply.close_stream(held)
        return
    if relay.message is None:
        raise APIError(500, "the model produced no output", code="server_error")
    await reply.json(relay.message, headers=run.headers)
