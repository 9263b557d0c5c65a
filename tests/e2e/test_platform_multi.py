"""End-to-end: two gateway processes sharing one PostgreSQL and one Redis.

The balance race across both, a rate limit that holds across both, and a gateway killed
mid-request whose reservation the other releases once it expires.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from tests.e2e.conftest import INPUT_MICROS_PER_TOKEN, MODEL, OUTPUT_MICROS_PER_TOKEN
from tests.e2e.server import RunningServer, running_servers
from tests.e2e.test_platform import HELLO, check_race, sdk, until_limited
from tests.platform.services import REDIS_URL, postgres_url, redis_prefix

__all__ = ["postgres_url", "redis_prefix"]

RESERVATION_TTL_SECONDS = 2


def gateway_config(database_url: str, prefix: str) -> str:
    return f"""
database_url = "{database_url}"
redis_url = "{REDIS_URL}"

[model]
input_price = {INPUT_MICROS_PER_TOKEN}
output_price = {OUTPUT_MICROS_PER_TOKEN}

[engine]
max_sequences = 4
context_per_sequence = 512
step_token_budget = 128
max_waiting = 64
threads = 1

[platform]
reservation_ttl_seconds = {RESERVATION_TTL_SECONDS}
sweep_interval_seconds = 0.5
redis_prefix = "{prefix}"
# the race sends 200 requests of one key at once
max_concurrent_per_key = 1000
max_concurrent_per_account = 1000
"""


@pytest.fixture(scope="module")
def gateways(data_dir: Path, default_model_path: Path, postgres_url: str, redis_prefix: str,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[RunningServer]]:
    config = gateway_config(postgres_url, redis_prefix)
    workdirs = [tmp_path_factory.mktemp(f"gateway-{i}") for i in range(2)]
    with running_servers(data_dir, [(config, w) for w in workdirs]) as servers:
        assert servers[0].admin_key, "no gateway printed an admin key"
        assert sum("admin key:" in s.log() for s in servers) == 1
        yield servers


def test_the_race_across_two_gateways(gateways: list[RunningServer]) -> None:
    check_race(gateways, "racer", gateways[0])


def test_a_rate_limit_holds_across_gateways(gateways: list[RunningServer]) -> None:
    key = gateways[0].create_key("limited", balance="1", rpm=3)
    clients = [sdk(gateway, key) for gateway in gateways]
    calls = 0

    def ask() -> None:
        nonlocal calls
        calls += 1
        clients[calls % 2].chat.completions.create(model=MODEL, messages=HELLO,  # type: ignore[arg-type]
                                                   max_tokens=1)

    try:
        allowed, _ = until_limited(ask, rpm=3)
    finally:
        for client in clients:
            client.close()
    assert allowed >= 3


def test_a_killed_gateway_leaves_no_reservation_once_it_expires(
        gateways: list[RunningServer]) -> None:
    """Runs last: it kills the first gateway."""
    doomed, survivor = gateways
    key = survivor.create_key("crashy", balance="1")
    with sdk(doomed, key) as client:
        stream = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Count from 1 to 500."}],
            max_tokens=400, stream=True)
        next(iter(stream))
        held = survivor.admin("GET", "/accounts/crashy")
        assert held["reserved_micros"] > 0
        doomed.process.send_signal(signal.SIGKILL)
        doomed.process.wait(timeout=30)
        killed_at = time.monotonic()
        with pytest.raises(openai.APIConnectionError):
            for _ in stream:
                pass
    deadline = killed_at + RESERVATION_TTL_SECONDS + 30
    while survivor.admin("GET", "/accounts/crashy")["reserved_micros"] != 0:
        assert time.monotonic() < deadline, "the reservation was never released"
        time.sleep(0.2)
    assert time.monotonic() - killed_at >= RESERVATION_TTL_SECONDS - 1
    account = survivor.admin("GET", "/accounts/crashy")
    assert (account["balance"], account["spent"]) == ("1.000000", "0.000000")
