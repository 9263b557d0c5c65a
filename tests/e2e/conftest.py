"""One real server process per test session, shared by the e2e tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.server import RunningServer, running_server

MODEL = "qwen2.5-coder-0.5b-instruct"

SERVER_CONFIG = """
[engine]
max_sequences = 8
context_per_sequence = 2048
step_token_budget = 256
max_waiting = 64
"""


@pytest.fixture(scope="session")
def server(data_dir: Path, default_model_path: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(data_dir, SERVER_CONFIG, tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture
def client(server: RunningServer) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.api_url, api_key="test-key", max_retries=0,
                       timeout=120) as sdk:
        yield sdk
