"""The generating routes on a lane of their own, in front of FastAPI.

`POST /v1/chat/completions` is the gateway's hot path. Through FastAPI's middleware
stack and router it paid about 0.3 ms of CPU per request before any of its own work;
here it (and the text completions beside it) goes straight to the request pipeline
(`exchange.handle`), which reads the body and answers in plain ASGI. Every other request,
and every other method on those paths, goes to the FastAPI app as before.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Receive, Scope, Send

from modelyard.api.anthropic.messages import MESSAGES_PATHS, answer_messages
from modelyard.api.chat import CHAT_PATHS, answer_chat
from modelyard.api.completions import COMPLETION_PATHS, answer_completions
from modelyard.api.dialects import error_style
from modelyard.api.embeddings import EMBEDDING_PATHS, answer_embeddings
from modelyard.api.exchange import Endpoint, handle
from modelyard.api.responses_api.endpoint import RESPONSES_PATHS, answer_responses
from modelyard.api.state import AppState

logger = logging.getLogger(__name__)

LANES: dict[str, Endpoint] = {
    **dict.fromkeys(CHAT_PATHS, answer_chat),
    **dict.fromkeys(COMPLETION_PATHS, answer_completions),
    **dict.fromkeys(EMBEDDING_PATHS, answer_embeddings),
    **dict.fromkeys(RESPONSES_PATHS, answer_responses),
    **dict.fromkeys(MESSAGES_PATHS, answer_messages),
}


class ChatLane:
    def __init__(self, app: ASGIApp, state: AppState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = LANES.get(scope["path"]) if scope["type"] == "http" else None
        if endpoint is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        await handle(self.state, scope, receive, send, endpoint, error_style(scope["path"]))
