"""The HTTP routes: chat completions (and its /api alias), models, health, metrics."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelyard.api.errors import APIError
from modelyard.api.state import AppState
from modelyard.providers.base import ChatModel

logger = logging.getLogger(__name__)
router = APIRouter()


def _state(request: Request) -> AppState:
    state: AppState = request.app.state.modelyard
    return state


def json_response(body: dict[str, Any], status: int = 200,
                  headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(body), status_code=status, headers=headers,
                    media_type="application/json")


@router.get("/v1/models")
@router.get("/api/v1/models")
async def list_models(request: Request) -> Response:
    state = _state(request)
    caller = request.state.caller
    data = [_entry(state, model_id, provider) for model_id, provider in state.providers.items()
            if state.gate.may_use(caller, model_id)]
    data += [_embedding_entry(state, model_id) for model_id in state.embeddings
             if state.gate.may_use(caller, model_id)]
    return json_response({"object": "list", "data": data})


@router.get("/v1/models/{model:path}")
@router.get("/api/v1/models/{model:path}")
async def get_model(request: Request, model: str) -> Response:
    """One entry of the list (a model id may hold slashes: `up/qwen`)."""
    state = _state(request)
    provider = state.providers.get(model)
    if (provider is None and model not in state.embeddings) \
            or not state.gate.may_use(request.state.caller, model):
        raise model_not_found(model)
    if provider is None:
        return json_response(_embedding_entry(state, model))
    return json_response(_entry(state, model, provider))


def model_not_found(model: str) -> APIError:
    """SPEC.md's 404 for a model that is not served or that the key may not use (the same
    answer for both, so a key cannot learn which models exist)."""
    return APIError(404, f"the model '{model}' does not exist or you do not have access to "
                    "it", param="model", code="model_not_found")


def _entry(state: AppState, model_id: str, provider: ChatModel) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": state.started,
            "owned_by": "modelyard", **provider.describe(), **_pricing(state, model_id)}


def _embedding_entry(state: AppState, model_id: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": state.started,
            "owned_by": "modelyard", **state.embeddings[model_id].describe(),
            **_pricing(state, model_id)}


def _pricing(state: AppState, model_id: str) -> dict[str, Any]:
    """The price table's prices (per million tokens, currency units; free when the table
    has none)."""
    return {"pricing": state.gate.price(model_id).as_units()}


@router.get("/health")
async def health(request: Request) -> Response:
    return json_response({"status": "ok", "models": list(_state(request).providers)})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).registry), media_type=CONTENT_TYPE_LATEST)
