"""The chat lane (`api/lane.py`) in front of FastAPI, driven in process with the real app:
bodies past the cap, other methods, and unexpected failures all answer in SPEC.md's shape."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from modelyard.api import lane
from modelyard.providers.base import ChatRequest, PreparedChat
from tests.platform.harness import Backend, Harness, scenario


def _with_app(tmp_path: Path, body: Callable[[Harness], Awaitable[None]]) -> None:
    scenario(Backend(f"sqlite:///{tmp_path / 'platform.db'}"), body)


def test_a_body_past_the_cap_is_refused_with_413(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lane, "MAX_BODY_BYTES", 1000)

    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000)
        response = await platform.chat(key, content="word " * 400)
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "request_too_large"
        assert (await platform.chat(key, content="short")).status_code == 200
    _with_app(tmp_path, body)


def test_other_methods_on_the_chat_path_reach_fastapi(tmp_path: Path) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000)
        response = await platform.client.get("/v1/chat/completions",
                                             headers={"Authorization": f"Bearer {key}"})
        assert response.status_code == 405
        assert "error" in response.json()
    _with_app(tmp_path, body)


def test_an_unexpected_failure_is_a_500_without_a_stack_trace(tmp_path: Path) -> None:
    async def body(platform: Harness) -> None:
        key = await platform.key("acme", 1000)

        async def broken(request: ChatRequest) -> PreparedChat:
            raise RuntimeError("secret internals")
        platform.provider.prepare_chat = broken  # type: ignore[method-assign]
        response = await platform.chat(key)
        assert response.status_code == 500
        error = response.json()["error"]
        assert error["code"] == "server_error" and "secret" not in error["message"]
        assert "Traceback" not in response.text
    _with_app(tmp_path, body)
