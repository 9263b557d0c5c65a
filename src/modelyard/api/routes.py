"""The HTTP routes: chat completions (and its /api alias), models, health, metrics."""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from modelyard.api.state import AppState

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
    data = [{"id": model_id, "object": "model", "created": state.started, "owned_by": "modelyard",
             **provider.describe(), **_pricing(state, model_id)}
            for model_id, provider in state.providers.items()
            if state.gate.may_use(caller, model_id)]
    return json_response({"object": "list", "data": data})


def _pricing(state: AppState, model_id: str) -> dict[str, Any]:
    """The configured prices (per million tokens, currency units) over the provider's own."""
    price = state.prices.get(model_id)
    return {} if price is None else {"pricing": price.as_units()}


@router.get("/health")
async def health(request: Request) -> Response:
    return json_response({"status": "ok", "models": list(_state(request).providers)})


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(_state(request).registry), media_type=CONTENT_TYPE_LATEST)
