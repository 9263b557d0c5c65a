"""Settlement that loses no money: degraded usage records counted, failed settlements kept
and retried across a database outage (a real PostgreSQL made unreachable through a TCP
proxy), their reservations kept alive meanwhile."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable

import pytest
from prometheus_client import CollectorRegistry

from modelyard.config import PlatformConfig
from modelyard.platform import accounts as ops
from modelyard.platform import ledger
from modelyard.platform.database import Database
from modelyard.platform.settlement_queue import SettlementMetrics, SettlementQueue
from modelyard.platform.usage import records
from tests.e2e.server import free_port
from tests.platform.conftest import _clean
from tests.platform.harness import Backend, Harness, harness, with_db
from tests.platform.tcp_proxy import TcpProxy
from tests.platform.test_ledger import balance_of, open_reservations, record


def metric(registry: CollectorRegistry, name: str) -> float:
    return registry.get_sample_value(name) or 0.0


@pytest.fixture
def postgres(postgres_url: str) -> str:
    """The session's PostgreSQL database, emptied."""
    asyncio.run(_clean(postgres_url))
    return postgres_url


def test_degraded_records_and_uncollected_cost_are_counted(db_url: str) -> None:
    async def body(db: Database) -> None:
        registry = CollectorRegistry()
        queue = SettlementQueue(db, SettlementMetrics(registry))
        account = await ops.create_account(db, "acme", 1000)
        for user in ("u" * 300, "a\x00b"):
            held = await ledger.reserve(db, account.id, "k0", 100, 60)
            settled = await queue.settle(held, dataclasses.replace(record(account.id, 60),
                                                                   user=user))
            assert settled is not None and (settled.charged, settled.degraded) == (60, True)
        assert metric(registry, "modelyard_usage_records_degraded_total") == 2
        assert await balance_of(db, account.id) == (880, 0, 1000, 120)
        assert await open_reservations(db) == 0
        # 880 left, 100 held by this request: a cost of 1000 leaves 120 uncollected.
        held = await ledger.reserve(db, account.id, "k0", 100, 60)
        await queue.settle(held, record(account.id, 1000))
        assert metric(registry, "modelyard_uncollected_micros_total") == 120
        assert await balance_of(db, account.id) == (0, 0, 1000, 1000)
    with_db(db_url, body)


def test_the_pending_queue_is_bounded(postgres: str) -> None:
    async def main() -> None:
        registry = CollectorRegistry()
        nowhere = Database(postgres.replace("127.0.0.1:5432", f"127.0.0.1:{free_port()}"))
        queue = SettlementQueue(nowhere, SettlementMetrics(registry), attempts=1, limit=1)
        try:
            assert await queue.settle("r1", record("acct", 10)) is None
            assert await queue.settle("r2", record("acct", 10)) is None
            assert (len(queue), queue.held()) == (1, ["r1"])
            assert metric(registry, "modelyard_settlements_pending") == 1
            assert metric(registry, "modelyard_settlements_dropped_total") == 1
            assert await queue.retry(everything=True) == 0
        finally:
            await nowhere.close()
    asyncio.run(main())


async def until(condition: Callable[[], Awaitable[bool]], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await condition():
            return True
        await asyncio.sleep(0.05)
    return await condition()


def with_proxy(url: str, body: Callable[[Harness, TcpProxy], Awaitable[None]],
               settings: PlatformConfig, **options: object) -> None:
    proxy = TcpProxy.for_url(url)
    proxy.start()

    async def main() -> None:
        async with harness(Backend(proxy.url(url)), settings=settings, start=True,
                           **options) as platform:  # type: ignore[arg-type]
            await body(platform, proxy)
    try:
        asyncio.run(main())
    finally:
        proxy.close()


def assert_unavailable(response_status: int, headers: dict[str, str], body: object) -> None:
    assert response_status == 503, body
    assert headers.get("retry-after") == "1"
    assert isinstance(body, dict) and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "service_unavailable"


def test_a_settlement_survives_a_database_outage(postgres: str) -> None:
    """Before, the settlement was dropped after five quick tries and the reservation
    expired: the request was free. Now it is kept, and lands once the database is back."""
    async def body(platform: Harness, proxy: TcpProxy) -> None:
        key = await platform.key("acme", 1000)
        platform.gate.settlements.attempts = 2
        running = asyncio.create_task(platform.chat(key, max_tokens=20))
        assert await until(lambda: _reserved(platform), 5)  # admitted, running
        proxy.stop()
        answered = await running
        assert answered.status_code == 200
        await platform.settled()
        assert len(platform.gate.settlements) == 1
        registry = platform.state.registry
        assert metric(registry, "modelyard_settlements_pending") == 1
        # Meanwhile: the key lookup answers 503 with Retry-After, never a 500.
        refused = await platform.chat(key)
        assert_unavailable(refused.status_code, dict(refused.headers), refused.json())
        admin = await platform.client.get(
            "/admin/accounts", headers={"Authorization": f"Bearer {platform.admin_key}"})
        assert_unavailable(admin.status_code, dict(admin.headers), admin.json())
        proxy.start()
        assert await until(lambda: _landed(platform), 15)
        assert metric(registry, "modelyard_settlements_pending") == 0
        account = await ops.get_account(platform.db, "acme")
        assert (account.balance, account.reserved, account.spent) == (957, 0, 43)
        assert await open_reservations(platform.db) == 0
    with_proxy(postgres, body, PlatformConfig(reservation_ttl_seconds=3,
                                              sweep_interval_seconds=0.5), delay_s=0.05)


def test_a_reservation_lookup_during_an_outage_answers_503(postgres: str) -> None:
    """With the key cached, the request gets as far as its reservation, which fails; an
    admin call as far as its query."""
    async def body(platform: Harness, proxy: TcpProxy) -> None:
        key = await platform.key("acme", 1000)
        admin = {"Authorization": f"Bearer {platform.admin_key}"}
        assert (await platform.chat(key)).status_code == 200
        assert (await platform.client.get("/admin/accounts", headers=admin)).status_code == 200
        await platform.settled()
        with proxy.down():
            refused = await platform.chat(key)
            assert_unavailable(refused.status_code, dict(refused.headers), refused.json())
            # The admin API too (its key cached as well): a 503, not a 500.
            listed = await platform.client.get("/admin/accounts", headers=admin)
            assert_unavailable(listed.status_code, dict(listed.headers), listed.json())
        assert (await platform.chat(key)).status_code == 200
    with_proxy(postgres, body, PlatformConfig(key_cache_seconds=60))


def test_a_pending_settlement_keeps_its_reservation_alive(postgres: str) -> None:
    """Its reservation (1 s expiry) is extended by the maintenance loop while it waits for
    its retry (3 s backoff), so the sweeper does not release it: it settles from it."""
    async def body(platform: Harness, proxy: TcpProxy) -> None:
        key = await platform.key("acme", 1000)
        queue = platform.gate.settlements
        queue.attempts, queue.backoff_s = 1, 3.0
        running = asyncio.create_task(platform.chat(key, max_tokens=10))
        assert await until(lambda: _reserved(platform), 5)
        proxy.stop()
        assert (await running).status_code == 200
        await platform.settled()
        assert len(queue) == 1
        proxy.start()
        kept_since = time.monotonic()
        await asyncio.sleep(2.0)  # twice the reservation's expiry, sweeping every 0.2 s
        assert len(queue) == 1
        assert await open_reservations(platform.db) == 1
        assert await until(lambda: _landed(platform), 10)
        assert time.monotonic() - kept_since > 2.0
        account = await ops.get_account(platform.db, "acme")
        assert (account.balance, account.reserved, account.spent) == (977, 0, 23)
        row = (await records(platform.db))[0]
        assert row.cost == 23 and row.reserved >= 23  # from its reservation, not swept
    with_proxy(postgres, body, PlatformConfig(reservation_ttl_seconds=1,
                                              sweep_interval_seconds=0.2), delay_s=0.05)


async def _reserved(platform: Harness) -> bool:
    return (await platform.db_account("acme"))[1] > 0


async def _landed(platform: Harness) -> bool:
    return len(platform.gate.settlements) == 0

