"""POST /v1/embeddings (and /api/v1/embeddings): OpenAI's Embeddings API on the shared
request path (`exchange.py`).

The request is parsed (`EmbeddingsRequest`, with its caps), its model found (the built-in
embedding model or a catalog one with `task = "embedding"`), its tokens counted by the
model (`prepare`: exact for the built-in model, which tokenizes it; an upper bound for an
upstream) and admitted for them at the model's input price; then it runs, and is settled
for the tokens it embedded (`usage.prompt_tokens`), like a chat prompt.
"""

from __future__ import annotations

import base64
import os
from typing import Annotated, Any, Literal

import numpy as np
import orjson
from fastapi import APIRouter, Request, Response
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from modelyard.api import bounds
from modelyard.api.errors import APIError, from_validation_error
from modelyard.api.exchange import Exchange, Run, model_not_found
from modelyard.api.openapi import request_body
from modelyard.api.schema import Identifier
from modelyard.providers.embeddings import EmbeddingRequest, Embeddings
from modelyard.usage import Usage

router = APIRouter()

EMBEDDING_PATHS = frozenset({"/v1/embeddings", "/api/v1/embeddings"})
MAX_INPUTS = 2048
"""Inputs of one request (OpenAI's cap)."""
MAX_INPUT_CHARS = 256 * 1024
"""Characters of one text input (OpenAI's models take 8192 tokens)."""
MAX_INPUT_TOKEN_IDS = 65536
"""Token ids of one tokenized input."""
MAX_DIMENSIONS = 65536


def _refuse(message: str) -> APIError:
    return APIError(422, message, param="input", code="invalid_value")


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_input(value: Any) -> Any:
    """`input` as OpenAI takes it (a string, strings, token ids, lists of token ids), with
    its caps; a value of another shape is left for the type check (a 400)."""
    if isinstance(value, str):
        return [_check_text(value, 0)]
    if not isinstance(value, list):
        return value
    if not value:
        raise _refuse("input must not be empty")
    if len(value) > MAX_INPUTS:
        raise _refuse(f"at most {MAX_INPUTS} inputs, got {len(value)}")
    if all(isinstance(item, str) for item in value):
        return [_check_text(text, i) for i, text in enumerate(value)]
    if all(_is_token_id(item) for item in value):
        return [_check_tokens(value, 0)]
    if all(isinstance(item, list) for item in value):
        if not all(_is_token_id(token) for tokens in value for token in tokens):
            return value  # a type error: pydantic names it
        return [_check_tokens(tokens, i) for i, tokens in enumerate(value)]
    return value


def _check_text(text: str, index: int) -> str:
    if not text:
        raise _refuse(f"input[{index}] is an empty string")
    if len(text) > MAX_INPUT_CHARS:
        raise _refuse(f"input[{index}] has more than {MAX_INPUT_CHARS} characters")
    return text


def _check_tokens(tokens: list[int], index: int) -> list[int]:
    if not tokens:
        raise _refuse(f"input[{index}] is an empty list of token ids")
    if len(tokens) > MAX_INPUT_TOKEN_IDS:
        raise _refuse(f"input[{index}] has more than {MAX_INPUT_TOKEN_IDS} token ids")
    if any(not 0 <= token <= bounds.MAX_TOKEN_ID for token in tokens):
        raise _refuse(f"input[{index}] holds a token id outside 0 to {bounds.MAX_TOKEN_ID}")
    return tokens


Inputs = Annotated[list[str] | list[list[int]], BeforeValidator(_check_input)]


class EmbeddingsRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: Identifier
    input: Annotated[Inputs, Field(description=(
        "a string, a list of strings, a list of token ids or a list of lists of token ids"),
        json_schema_extra={"anyOf": [
            {"type": "string", "minLength": 1},
            {"type": "array", "minItems": 1, "maxItems": MAX_INPUTS,
             "items": {"type": "string", "minLength": 1}},
            {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
            {"type": "array", "minItems": 1, "maxItems": MAX_INPUTS,
             "items": {"type": "array", "minItems": 1,
                       "items": {"type": "integer", "minimum": 0}}}]})]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Field(ge=1, le=MAX_DIMENSIONS)] | None = None
    user: Identifier | None = None

    def to_request(self, request_id: str) -> EmbeddingRequest:
        inputs: tuple[str, ...] | tuple[tuple[int, ...], ...]
        if self.input and isinstance(self.input[0], str):
            inputs = tuple(text for text in self.input if isinstance(text, str))
        else:
            inputs = tuple(tuple(tokens) for tokens in self.input if isinstance(tokens, list))
        return EmbeddingRequest(request_id, inputs, self.encoding_format, self.dimensions,
                                self.user)


def _parse(body: bytes) -> EmbeddingsRequest:
    try:
        return EmbeddingsRequest.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation_error(exc) from None


def answer_body(model_id: str, result: Embeddings,
                encoding_format: Literal["float", "base64"]) -> dict[str, Any]:
    """OpenAI's answer: the vectors in order (floats, or base64 of little-endian float32)
    and the usage."""
    vectors = result.vectors
    data: list[dict[str, Any]] | orjson.Fragment
    if encoding_format == "base64":
        little = vectors.astype("<f4", copy=False)
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(row.tobytes()).decode("ascii")}
                for i, row in enumerate(little)]
    else:
        # orjson writes float32 arrays with their shortest round-trip text, in C.
        data = orjson.Fragment(orjson.dumps(
            [{"object": "embedding", "index": i, "embedding": row}
             for i, row in enumerate(np.ascontiguousarray(vectors, dtype=np.float32))],
            option=orjson.OPT_SERIALIZE_NUMPY))
    return {"object": "list", "data": data, "model": model_id,
            "usage": {"prompt_tokens": result.prompt_tokens,
                      "total_tokens": result.prompt_tokens}}


async def answer_embeddings(run: Run, body: bytes) -> None:
    """The endpoint on the shared request path (`exchange.handle`)."""
    payload = _parse(body)
    state = run.state
    model = state.embeddings.get(payload.model)
    if model is None or not state.gate.may_use(run.ticket.caller, payload.model):
        raise model_not_found(payload.model)
    request = payload.to_request(f"emb-{os.urandom(16).hex()}")
    prepared = await model.prepare(request)
    bill = await run.admit(payload.model, prepared.prompt_tokens, 0, payload.user)
    result = await prepared.embed()
    bill.sent(Usage(prompt_tokens=result.prompt_tokens, estimated=result.estimated))
    bill.status = 200
    await bill.settle_now()
    await run.reply.json(answer_body(payload.model, result, payload.encoding_format),
                         headers=run.headers)


@router.post("/v1/embeddings", openapi_extra=request_body(EmbeddingsRequest))
@router.post("/api/v1/embeddings", openapi_extra=request_body(EmbeddingsRequest))
async def embeddings(request: Request) -> Response:
    """The route as FastAPI sees it (its schema, its 405s); requests themselves take the
    lane (api/lane.py)."""
    return Exchange(request.app.state.modelyard, answer_embeddings)
