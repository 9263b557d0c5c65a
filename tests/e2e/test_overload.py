"""End-to-end: a full waiting queue answers 503 with Retry-After, on its own small server."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import MODEL
from tests.e2e.server import RunningServer, metric_value, running_server

ONE_SLOT_ONE_WAITING = """
[engine]
max_sequences = 1
context_per_sequence = 1024
step_token_budget = 64
max_waiting = 1
"""


@pytest.fixture(scope="module")
def small_server(data_dir: Path, default_model_path: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    workdir = tmp_path_factory.mktemp("small-server")
    with running_server(data_dir, ONE_SLOT_ONE_WAITING, workdir) as running:
        yield running


def _wait_for(server: RunningServer, name: str, value: float) -> None:
    deadline = time.monotonic() + 30
    while metric_value(server.metrics(), name) != value:
        if time.monotonic() > deadline:
            pytest.fail(f"{name} never reached {value}:\n{server.metrics()}")
        time.sleep(0.05)


def test_full_queue_answers_503_with_retry_after(small_server: RunningServer) -> None:
    with openai.OpenAI(base_url=small_server.api_url, api_key=small_server.admin_key, max_retries=0,
                       timeout=120) as client:
        running = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count to 300."}],
            max_tokens=400, temperature=0, stream=True)
        next(iter(running))
        _wait_for(small_server, "modelyard_running_sequences", 1)
        waiting_result: list[str] = []
        waiter = threading.Thread(target=lambda: waiting_result.append(
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4,
            ).choices[0].finish_reason or ""))
        waiter.start()
        _wait_for(small_server, "modelyard_queue_depth", 1)
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "Say hi."}], max_tokens=4)
        assert caught.value.status_code == 503
        assert caught.value.response.headers["retry-after"] == "2"
        assert caught.value.response.json()["error"]["code"] == "server_overloaded"
        running.close()
        waiter.join(timeout=60)
        assert waiting_result and waiting_result[0] in ("stop", "length")
