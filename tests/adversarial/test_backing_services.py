"""PostgreSQL or Redis taken away mid-load, then brought back, without restarting the
gateway: a TCP proxy (tests/platform/tcp_proxy.py) sits between the gateway and each.

- PostgreSQL unreachable: requests answer 503 with Retry-After in SPEC.md's shape; a
  request that was already running is billed once the database is back; no request the
  upstream served goes unbilled.
- Redis unreachable: fail closed (the default): 503 with Retry-After, nothing billed.
- Both: the gateway serves again within seconds once the service is back.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.adversarial.harness import LONG, fault_model, record
from tests.adversarial.ledger_invariant import Ledger, wait_for_ledger
from tests.adversarial.load import Sent, Steady
from tests.e2e.server import RunningServer, running_server
from tests.platform.services import REDIS_URL, postgres_url, redis_prefix
from tests.platform.tcp_proxy import TcpProxy
from tests.router.fault_process import running_fault_server

__all__ = ["postgres_url", "redis_prefix"]

MODEL = "fault/drip"
RESERVATION_TTL_S = 2.0
OUTAGE_S = float(os.environ.get("MODELYARD_ADVERSARIAL_OUTAGE_S", 10.0 if LONG else 3.0))
RECOVERY_S = 5.0
SILENCE_NOTICED_S = 14.0
"""Within this long after the service is back, every request succeeds again."""
HOW = ["stop", "blackhole"] if LONG or os.environ.get("MODELYARD_ADVERSARIAL_PARTITION") \
    else ["stop"]
"""How a service goes away: its proxy stops (connections refused and reset), or goes
silent (a network partition: nothing arrives, the client's own timeouts must end the wait)."""


@pytest.fixture(scope="module")
def fault() -> Iterator[str]:
    with running_fault_server() as url:
        yield url


@pytest.fixture(scope="module")
def proxies(postgres_url: str) -> Iterator[tuple[TcpProxy, TcpProxy]]:
    with TcpProxy.for_url(postgres_url) as pg, TcpProxy.for_url(REDIS_URL) as redis:
        yield pg, redis


@pytest.fixture(scope="module")
def gateway(postgres_url: str, redis_prefix: str, fault: str,
            proxies: tuple[TcpProxy, TcpProxy], data_dir: Path,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    pg, redis = proxies
    config = f"""
database_url = "{pg.url(postgres_url)}"
redis_url = "{redis.url(REDIS_URL)}"

[platform]
reservation_ttl_seconds = {RESERVATION_TTL_S}
sweep_interval_seconds = 0.5
redis_prefix = "{redis_prefix}"

""" + fault_model(MODEL, "drip=10:D", fault)
    with running_server(data_dir, config, tmp_path_factory.mktemp("services")) as server:
        yield server


def _outage(gateway: RunningServer, proxy: TcpProxy, key: str, prefix: str,
            fault: str, how: str) -> list[Sent]:
    """Steady load; the service away for OUTAGE_S in the middle (the proxy stopped, or
    silent: `how`); load on for a while after it is back."""
    httpx.delete(f"{fault}/requests", timeout=5)

    async def scenario() -> list[Sent]:
        load = Steady(gateway.base_url, key, MODEL, workers=4, prefix=prefix)
        load.start()
        await asyncio.sleep(1.0)
        await asyncio.to_thread(proxy.stop if how == "stop" else proxy.blackhole)
        await asyncio.sleep(OUTAGE_S)
        await asyncio.to_thread(proxy.start)
        await asyncio.sleep(RECOVERY_S + 1.0)
        return await load.stop()

    return asyncio.run(scenario())


def _check_answers(sent: list[Sent], back_at: float, how: str) -> None:
    assert any(s.succeeded for s in sent if s.ended < back_at - OUTAGE_S), "no load before"
    unanswered = [s.id for s in sent if s.status is None]
    assert not unanswered, f"requests never answered: {unanswered[:10]}"
    refused = [s for s in sent if s.status != 200]
    # A silent service is noticed by the gateway's own timeouts (PostgreSQL operations
    # of 5 s at most, Redis's 5 s socket timeout): a partition
    # longer than SILENCE_NOTICED_S must turn into 503s, not requests held until it heals.
    assert refused or (how == "blackhole" and OUTAGE_S < SILENCE_NOTICED_S), \
        f"the outage refused no request; slowest answers (s): " \
        f"{sorted(round(s.ended - s.started, 1) for s in sent)[-5:]}"
    for s in refused:
        assert s.status == 503, (s.status, s.problems)
        assert not s.problems, s.problems
        assert s.retry_after is not None and int(s.retry_after) >= 1
    late = [s for s in sent if s.started > back_at + RECOVERY_S]
    assert late and all(s.succeeded for s in late), "the gateway did not recover by itself"


def _check_books(database_url: str, sent: list[Sent], fault: str, prefix: str) -> None:
    ledger = wait_for_ledger(database_url, wait_s=RESERVATION_TTL_S + 15)
    record(faults_injected=1, requests_under_fault=len(sent),
           money_unaccounted=ledger.money_unaccounted,
           succeeded_unbilled=sum(ledger.records_by_user[s.id] != 1
                                  for s in sent if s.succeeded))
    assert not ledger.violations, ledger.violations
    _check_billed(ledger, sent, fault, prefix)


def _check_billed(ledger: Ledger, sent: list[Sent], fault: str, prefix: str) -> None:
    for s in sent:
        assert ledger.records_by_user[s.id] <= 1, f"{s.id} billed twice"
        if s.succeeded:
            assert ledger.records_by_user[s.id] == 1, f"{s.id} succeeded unbilled"
    # the upstream saw each request's id in its message ("request ID"; `user` is not sent)
    served = [body["messages"][0]["content"].removeprefix("request ")
              for body in httpx.get(f"{fault}/requests", timeout=5).json()]
    ours = [i for i in served if i.startswith(prefix)]
    assert ours, "the upstream served none of the requests"
    unbilled = [i for i in ours if ledger.records_by_user[i] != 1]
    assert not unbilled, f"the upstream served requests that were never billed: {unbilled}"


@pytest.mark.parametrize("how", HOW)
def test_postgres_unreachable_mid_load(gateway: RunningServer, proxies: tuple[TcpProxy, TcpProxy],
                                       postgres_url: str, fault: str, how: str) -> None:
    pg, _ = proxies
    key = gateway.create_key(f"pg-{how}", balance="1000")
    started = time.monotonic()
    sent = _outage(gateway, pg, key, f"pg{how}", fault, how)
    _check_answers(sent, started + 1.0 + OUTAGE_S, how)
    # settlements refused during the outage are written once the database is back
    _check_books(postgres_url, sent, fault, f"pg{how}-")


@pytest.mark.parametrize("how", HOW)
def test_redis_unreachable_mid_load_fails_closed(
        gateway: RunningServer, proxies: tuple[TcpProxy, TcpProxy], postgres_url: str,
        fault: str, how: str) -> None:
    _, redis = proxies
    key = gateway.create_key(f"redis-{how}", balance="1000", rpm=100_000)
    started = time.monotonic()
    sent = _outage(gateway, redis, key, f"redis{how}", fault, how)
    _check_answers(sent, started + 1.0 + OUTAGE_S, how)
    _check_books(postgres_url, sent, fault, f"redis{how}-")
