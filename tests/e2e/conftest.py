"""One real server process per test session, shared by the e2e tests.

The server runs with the platform on (a fresh SQLite database) and prices its model at
1 micro-unit per prompt token (cached or not) and 2 per completion token, so each test can
work out what a request costs; `client` uses a key of an account with plenty of balance.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.server import RunningServer, running_server

MODEL = "qwen2.5-coder-0.5b-instruct"

INPUT_MICROS_PER_TOKEN = 1
OUTPUT_MICROS_PER_TOKEN = 2

SERVER_CONFIG = f"""
[model]
input_price = {INPUT_MICROS_PER_TOKEN}
output_price = {OUTPUT_MICROS_PER_TOKEN}

[model.defaults]
temperature = 0.0

[engine]
max_sequences = 8
context_per_sequence = 2048
step_token_budget = 256
max_waiting = 64

[embedding]
input_price = {INPUT_MICROS_PER_TOKEN}

[platform]
# the race of test_platform.py sends 200 requests of one key at once
max_concurrent_per_key = 1000
max_concurrent_per_account = 1000
"""


@pytest.fixture(scope="session")
def server(data_dir: Path, default_model_path: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(data_dir, SERVER_CONFIG, tmp_path_factory.mktemp("server")) as running:
        yield running


@pytest.fixture(scope="session")
def api_key(server: RunningServer) -> str:
    """A key of the `e2e` account, which can pay for everything the tests ask."""
    return server.create_key("e2e", balance="1000")


@pytest.fixture
def client(server: RunningServer, api_key: str) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.api_url, api_key=api_key, max_retries=0,
                       timeout=120) as sdk:
        yield sdk
