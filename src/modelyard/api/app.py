"""The application: auth, the chat lane, FastAPI's routes, and errors that never leak a
stack trace."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from modelyard.api.admin import router as admin_router
from modelyard.api.auth import AuthMiddleware
from modelyard.api.chat import router as chat_router
from modelyard.api.errors import APIError, error_body
from modelyard.api.lane import ChatLane
from modelyard.api.routes import json_response, router
from modelyard.api.state import AppState

logger = logging.getLogger(__name__)


def create_app(state: AppState) -> ASGIApp:
    """The whole ASGI app: authentication, then the chat lane, then FastAPI."""
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await state.gate.start()
        yield
        state.preparation.close()
        await state.drain()
        for provider in state.closing_order():
            await provider.close()
        await state.gate.close()

    app = FastAPI(title="modelyard", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.modelyard = state
    app.include_router(chat_router)
    app.include_router(router)
    app.include_router(admin_router)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return json_response(exc.body(), exc.status, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return json_response(error_body(400, "invalid request"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return json_response(error_body(exc.status_code, str(exc.detail)), exc.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        request_id = uuid.uuid4().hex
        logger.error("request %s failed", request_id, exc_info=exc)
        return json_response(error_body(500, f"internal server error (request {request_id})",
                                        code="server_error"), 500)

    return AuthMiddleware(ChatLane(app, state), gate=state.gate)
