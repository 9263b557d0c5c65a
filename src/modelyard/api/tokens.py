"""POST /tokenize and POST /detokenize, in vLLM's shapes.

`/tokenize` takes `model` and either `prompt` (text; `add_special_tokens` defaults to true)
or `messages` (chat messages, rendered through the model's chat template;
`add_generation_prompt` defaults to true, `add_special_tokens` to false) and answers
`{"count", "max_model_len", "tokens"}`. Messages are tokenized exactly as a chat completion's
prompt is (special-token text a client wrote stays text), so `count` is the
`usage.prompt_tokens` the same messages are billed for. `/detokenize` takes `model` and
`tokens` and answers `{"prompt"}`.

Both are keyed and unbilled, but not free of limits: the key's request rate and requests in
flight are checked before the body is read (`check_in`), the body is read within the chat
route's size cap and deadline, and a large input is tokenized off the event loop. Only a
model whose tokenizer this server holds (the built-in engine's) can answer; an upstream
model is a 422 naming `model`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Request, Response
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from starlette.types import Receive, Scope, Send

from modelyard.api import bounds
from modelyard.api.errors import (
    OPENAI,
    APIError,
    ErrorStyle,
    as_api_error,
    from_validation_error,
)
from modelyard.api.exchange import checked_in
from modelyard.api.openapi import request_body
from modelyard.api.preparation import CHEAP_BODY_BYTES
from modelyard.api.reply import Reply, read_body
from modelyard.api.routes import model_not_found
from modelyard.api.schema import Identifier, ImagePart, Message, few_enough_messages
from modelyard.api.state import AppState
from modelyard.platform.gate import Caller
from modelyard.providers.managed import until_loaded
from modelyard.providers.tokens import Tokenizer

router = APIRouter()

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

MAX_TOKEN_IDS = 262_144
"""Token ids one /detokenize request may hold (more than any context served here)."""

UNSUPPORTED = ("tools", "chat_template", "chat_template_kwargs", "continue_final_message",
               "return_token_strs", "mm_processor_kwargs", "documents")
"""vLLM's fields that would change the answer and that this server does not implement:
refused with a 422 naming them when set (to anything but null or false), never ignored."""


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    @model_validator(mode="after")
    def _nothing_unsupported(self) -> Any:
        for name in UNSUPPORTED:
            if (self.model_extra or {}).get(name) not in (None, False):
                raise APIError(422, f"'{name}' is not supported by this server",
                               param=name, code="unsupported_parameter")
        return self


class TokenizeRequest(_Request):
    model: Identifier
    prompt: Annotated[str, Field(max_length=bounds.MAX_TOTAL_CHARS)] | None = None
    messages: Annotated[list[Message], Field(min_length=1,
                                             max_length=bounds.MAX_MESSAGES)] | None = None
    add_special_tokens: bool | None = None
    """Default: true for a prompt, false for messages (the chat template writes its own)."""
    add_generation_prompt: bool | None = None
    """Messages only; default true (the prompt ends where the assistant's answer starts)."""

    _few_enough_messages = field_validator("messages", mode="before")(few_enough_messages)

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise APIError(422, "give either 'prompt' (text) or 'messages' (chat messages)",
                           param="prompt" if self.prompt is not None else "messages",
                           code="invalid_value")
        if self.prompt is not None and self.add_generation_prompt is not None:
            raise APIError(422, "add_generation_prompt applies to 'messages' only",
                           param="add_generation_prompt", code="invalid_value")
        _check_messages(self.model, self.messages or [])
        return self


def _check_messages(model: str, messages: list[Message]) -> None:
    """The chat route's caps on the messages' text (api/bounds.py), and no images."""
    total = 0
    for index, message in enumerate(messages):
        if isinstance(message.content, list) and any(
                isinstance(part, ImagePart) for part in message.content):
            raise APIError(422, f"model '{model}' does not accept image input",
                           param=f"messages[{index}].content", code="invalid_value")
        chars = message.text_chars()
        total += chars
        if chars > bounds.MAX_MESSAGE_CHARS or total > bounds.MAX_TOTAL_CHARS:
            raise APIError(422, f"a message has at most {bounds.MAX_MESSAGE_CHARS} characters "
                           f"of text, all messages at most {bounds.MAX_TOTAL_CHARS}",
                           param=f"messages[{index}].content", code="invalid_value")


class DetokenizeRequest(_Request):
    model: Identifier
    tokens: list[int]

    @field_validator("tokens", mode="before")
    @classmethod
    def _few_enough_tokens(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_TOKEN_IDS:
            raise APIError(422, f"at most {MAX_TOKEN_IDS} tokens, got {len(value)}",
                           param="tokens", code="invalid_value")
        return value

    @field_validator("tokens")
    @classmethod
    def _token_ids(cls, value: list[int]) -> list[int]:
        for token in value:
            if not 0 <= token <= bounds.MAX_TOKEN_ID:
                raise APIError(422, f"token ids are integers from 0 to {bounds.MAX_TOKEN_ID}, "
                               f"got {_shown(token)}", param="tokens", code="invalid_value")
        return value


def _shown(token: int) -> str:
    # never str() of a huge integer: past 4300 digits Python refuses to convert it
    return str(token) if abs(token) < 10**20 else "an integer of more than 20 digits"


def _parse(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


async def _tokenizer(state: AppState, caller: Caller, model: str) -> Tokenizer:
    provider = state.providers.get(model)
    if provider is None or not state.gate.may_use(caller, model):
        raise model_not_found(model)
    await until_loaded(provider)  # a pooled local model loads on its first request
    tokenizer = provider.tokenizer()
    if tokenizer is None:
        raise APIError(422, f"the model '{model}' is served by an upstream deployment whose "
                       "tokenizer this server does not have; ask the upstream's own "
                       "/tokenize", param="model", code="tokenizer_unavailable")
    return tokenizer


async def _off_the_loop(body: bytes, work: Callable[[], T]) -> T:
    """Small inputs cost less than a thread's hand-over: those run here."""
    if len(body) <= CHEAP_BODY_BYTES:
        return work()
    return await asyncio.to_thread(work)


async def _tokenize(state: AppState, caller: Caller, body: bytes) -> dict[str, Any]:
    payload = _parse(TokenizeRequest, body)
    tokenizer = await _tokenizer(state, caller, payload.model)
    if payload.messages is not None:
        messages = [message.to_template_dict() for message in payload.messages]
        generation = payload.add_generation_prompt is not False
        special = payload.add_special_tokens is True
        ids = await _off_the_loop(body, lambda: tokenizer.tokenize_messages(
            messages, generation, special))
    else:
        text = payload.prompt or ""
        special = payload.add_special_tokens is not False
        ids = await _off_the_loop(body, lambda: tokenizer.tokenize_text(text, special))
    return {"count": len(ids), "max_model_len": tokenizer.max_model_len, "tokens": ids}


async def _detokenize(state: AppState, caller: Caller, body: bytes) -> dict[str, Any]:
    payload = _parse(DetokenizeRequest, body)
    tokenizer = await _tokenizer(state, caller, payload.model)
    vocab = tokenizer.vocab_size
    for token in payload.tokens:
        if token >= vocab:
            raise APIError(422, f"token id {token} is outside this model's vocabulary of "
                           f"{vocab} tokens (0 to {vocab - 1})", param="tokens",
                           code="invalid_value")
    ids = payload.tokens
    return {"prompt": await _off_the_loop(body, lambda: tokenizer.detokenize(ids))}


Work = Callable[[AppState, Caller, bytes], Awaitable[dict[str, Any]]]


async def handle(state: AppState, work: Work, scope: Scope, receive: Receive,
                 send: Send, errors: ErrorStyle = OPENAI) -> None:
    """One request: checked in before its body is read, checked out whatever happens; its
    errors in the `errors` style of its dialect."""
    reply = Reply(send, errors)
    async with checked_in(state, scope, reply) as ticket:
        if ticket is None:
            return
        try:
            body = await read_body(receive, scope["headers"], state.max_body_bytes,
                                   state.body_timeout_s)
            answer = await work(state, ticket.caller, body)
        except Exception as exc:
            error = as_api_error(exc)
            error.headers = {**ticket.headers, **error.headers}
            await reply.error(error)
            return
        await reply.json(answer, headers=ticket.headers)


class UnbilledExchange(Response):
    """The exchange as an ASGI response, so that it reads the body itself (capped, with a
    deadline) after the check-in."""

    def __init__(self, state: AppState, work: Work, errors: ErrorStyle = OPENAI) -> None:
        super().__init__()
        self.state = state
        self.work = work
        self.errors = errors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await handle(self.state, self.work, scope, receive, send, self.errors)


@router.post("/tokenize", openapi_extra=request_body(TokenizeRequest))
async def tokenize(request: Request) -> Response:
    return UnbilledExchange(request.app.state.modelyard, _tokenize)


@router.post("/detokenize", openapi_extra=request_body(DetokenizeRequest))
async def detokenize(request: Request) -> Response:
    return UnbilledExchange(request.app.state.modelyard, _detokenize)
