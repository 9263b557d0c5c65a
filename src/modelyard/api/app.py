"""The application: auth, the chat lane, FastAPI's routes, and errors that never leak a
stack trace."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp

from modelyard.api.admin import router as admin_router
from modelyard.api.anthropic.messages import router as anthropic_router
from modelyard.api.auth import AuthMiddleware
from modelyard.api.chat import router as chat_router
from modelyard.api.completions import router as completions_router
from modelyard.api.dialects import error_style
from modelyard.api.embeddings import router as embeddings_router
from modelyard.api.errors import APIError, as_api_error, error_body
from modelyard.api.lane import ChatLane
from modelyard.api.request_limit import RequestLimit
from modelyard.api.responses_api.endpoint import router as responses_router
from modelyard.api.routes import json_response, router
from modelyard.api.state import AppState
from modelyard.api.tokens import router as tokens_router
from modelyard.console import api_caller, is_console_path
from modelyard.console import router as console_router
from modelyard.errors import ModelyardError


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
        for embedding_model in state.embeddings.values():
            await embedding_model.close()
        await state.gate.close()

    app = FastAPI(title="modelyard", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.modelyard = state
    app.include_router(chat_router)
    app.include_router(completions_router)
    app.include_router(router)
    app.include_router(admin_router)
    app.include_router(tokens_router)
    app.include_router(embeddings_router)
    app.include_router(responses_router)
    app.include_router(anthropic_router)
    # The web console's HTML pages: kept out of the OpenAPI document (include_in_schema=False
    # on its routers), so tests/adversarial/test_fuzz.py's OPERATIONS need not list them.
    app.include_router(console_router)

    async def answer_error(request: Request, exc: Exception) -> Response:
        error = as_api_error(exc)
        status, body = error_style(request.url.path).answer(error)
        return json_response(body, status, error.headers)

    # One answer for every error: Starlette's exception middleware answers a
    # ModelyardError; its outermost one any other exception (and re-raises it to the log).
    app.add_exception_handler(ModelyardError, answer_error)
    app.add_exception_handler(Exception, answer_error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return json_response(error_body(400, "invalid request"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = APIError(exc.status_code, str(exc.detail))
        status, body = error_style(request.url.path).answer(error)
        return json_response(body, status)

    return RequestLimit(AuthMiddleware(ChatLane(app, state), gate=state.gate,
                                       own_auth=is_console_path, session_caller=api_caller),
                        state.max_requests_in_flight)
