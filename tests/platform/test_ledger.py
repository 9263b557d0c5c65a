"""The ledger against real SQLite and PostgreSQL: reservations, settlement, the sweeper."""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from modelyard.platform import accounts as ops
from modelyard.platform import ledger
from modelyard.platform.database import Database
from modelyard.platform.tables import accounts, reservations, usage, utcnow
from modelyard.platform.usage import records
from modelyard.usage import Usage
from tests.platform.harness import with_db


def record(account_id: str, cost: int, completion: int = 0) -> ledger.UsageRecord:
    return ledger.UsageRecord("k0", account_id, "m", "someone", Usage(10, 2, completion, 0),
                              cost, 0.5, 0.1, 200)


async def balance_of(db: Database, account_id: str) -> tuple[int, int, int, int]:
    def read(connection: Connection) -> tuple[int, int, int, int]:
        row = connection.execute(
            select(accounts.c.balance, accounts.c.reserved, accounts.c.credited,
                   accounts.c.spent).where(accounts.c.id == account_id)).one()
        return (row.balance, row.reserved, row.credited, row.spent)
    return await db.read(read)


async def usage_costs(db: Database, account_id: str) -> int:
    def read(connection: Connection) -> int:
        return int(connection.execute(
            select(func.coalesce(func.sum(usage.c.cost), 0))
            .where(usage.c.account_id == account_id)).scalar_one())
    return await db.read(read)


async def open_reservations(db: Database) -> int:
    def read(connection: Connection) -> int:
        return int(connection.execute(
            select(func.count()).select_from(reservations)).scalar_one())
    return await db.read(read)


def test_reserve_then_settle_charges_the_real_cost(db_url: str) -> None:
    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 1000)
        held = await ledger.reserve(db, account.id, "k0", 300, 60)
        assert held is not None
        assert await balance_of(db, account.id) == (1000, 300, 1000, 0)
        settled = await ledger.settle(db, held, record(account.id, 120, completion=5))
        assert (settled.charged, settled.uncollected, settled.degraded) == (120, 0, False)
        assert await balance_of(db, account.id) == (880, 0, 1000, 120)
        assert await usage_costs(db, account.id) == 120
        assert await open_reservations(db) == 0
        rows = await records(db)
        assert (rows[0].cost, rows[0].reserved, rows[0].user, rows[0].usage.completion_tokens) == (
            120, 300, "someone", 5)
    with_db(db_url, body)


def test_a_reservation_the_balance_cannot_cover_is_refused(db_url: str) -> None:
    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 500)
        first = await ledger.reserve(db, account.id, "k0", 400, 60)
        assert first is not None
        assert await ledger.reserve(db, account.id, "k0", 101, 60) is None
        assert await ledger.reserve(db, account.id, "k0", 100, 60) is not None
        assert await ledger.reserve(db, account.id, "k0", 1, 60) is None
        assert await balance_of(db, account.id) == (500, 500, 500, 0)
    with_db(db_url, body)


def test_a_cost_above_the_reservation_is_charged_from_the_free_balance(db_url: str) -> None:
    """Finding 5: the charge was capped at the reservation, the rest silently dropped."""
    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 1000)
        held = await ledger.reserve(db, account.id, "k0", 100, 60)
        settled = await ledger.settle(db, held, record(account.id, 250))
        assert (settled.charged, settled.uncollected) == (250, 0)
        assert await balance_of(db, account.id) == (750, 0, 1000, 250)
        assert await usage_costs(db, account.id) == 250
    with_db(db_url, body)


def test_what_the_account_cannot_cover_is_recorded_as_uncollected(db_url: str) -> None:
    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 200)
        held = await ledger.reserve(db, account.id, "k0", 100, 60)
        other = await ledger.reserve(db, account.id, "k0", 80, 60)
        assert held is not None and other is not None
        # 100 held, 20 free (200 - 100 - 80): 120 charged, never the other request's 80.
        settled = await ledger.settle(db, held, record(account.id, 500))
        assert (settled.charged, settled.uncollected) == (120, 380)
        assert await balance_of(db, account.id) == (80, 80, 200, 120)
        row = (await records(db))[0]
        assert (row.cost, row.uncollected, row.reserved) == (120, 380, 100)
        # The balance never goes below zero, and what is held stays held.
        settled = await ledger.settle(db, None, record(account.id, 50))
        assert (settled.charged, settled.uncollected) == (0, 50)
        assert await balance_of(db, account.id) == (80, 80, 200, 120)
        assert await usage_costs(db, account.id) == 120
    with_db(db_url, body)


def test_a_reservation_settles_once(db_url: str) -> None:
    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 1000)
        held = await ledger.reserve(db, account.id, "k0", 100, 60)
        await ledger.settle(db, held, record(account.id, 40))
        # A second settle of the same reservation finds it gone: it charges only what the
        # account can cover on its own and never touches the reserved total.
        await ledger.settle(db, held, record(account.id, 40))
        balance, reserved, credited, spent = await balance_of(db, account.id)
        assert reserved == 0
        assert balance == credited - spent == 1000 - await usage_costs(db, account.id)
    with_db(db_url, body)


def test_the_race_never_overdraws(db_url: str) -> None:
    """200 concurrent requests against an account that can pay for exactly 50."""
    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 50 * 37)

        async def request() -> bool:
            held = await ledger.reserve(db, account.id, "k0", 37, 60)
            if held is None:
                return False
            await asyncio.sleep(0.01)
            await ledger.settle(db, held, record(account.id, 37))
            return True

        outcomes = await asyncio.gather(*[request() for _ in range(200)])
        assert sum(outcomes) == 50
        balance, reserved, credited, spent = await balance_of(db, account.id)
        assert (balance, reserved, spent) == (0, 0, 50 * 37)
        assert balance == credited - await usage_costs(db, account.id)
    with_db(db_url, body)


def test_expired_reservations_are_released_and_live_ones_extended(db_url: str) -> None:
    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 1000)
        crashed = await ledger.reserve(db, account.id, "k0", 300, 0.2)
        alive = await ledger.reserve(db, account.id, "k0", 200, 0.2)
        assert crashed is not None and alive is not None
        await ledger.extend(db, [alive], 60)
        assert await ledger.release_expired(db) == 0
        await asyncio.sleep(0.3)
        assert await ledger.release_expired(db) == 1
        assert await balance_of(db, account.id) == (1000, 200, 1000, 0)
        assert await ledger.release_expired(db, utcnow() + timedelta(minutes=5)) == 1
        assert await balance_of(db, account.id) == (1000, 0, 1000, 0)
        # The request whose reservation was swept still settles, from the free balance.
        assert (await ledger.settle(db, alive, record(account.id, 150))).charged == 150
        assert await balance_of(db, account.id) == (850, 0, 1000, 150)
    with_db(db_url, body)


def test_a_swept_request_is_not_billed_beyond_the_balance(db_url: str) -> None:
    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 100)
        held = await ledger.reserve(db, account.id, "k0", 100, 0.01)
        await asyncio.sleep(0.05)
        assert await ledger.release_expired(db) == 1
        other = await ledger.reserve(db, account.id, "k0", 80, 60)
        assert other is not None
        # 20 free beside the other request's 80: that much is charged, the rest recorded.
        settled = await ledger.settle(db, held, record(account.id, 50))
        assert (settled.charged, settled.uncollected) == (20, 30)
        assert await balance_of(db, account.id) == (80, 80, 100, 20)
    with_db(db_url, body)


def test_concurrent_sweepers_release_each_reservation_once(db_url: str) -> None:
    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 10_000)
        for _ in range(40):
            assert await ledger.reserve(db, account.id, "k0", 100, 0.01) is not None
        await asyncio.sleep(0.05)
        others = [Database(db.url) for _ in range(3)]
        try:
            released = await asyncio.gather(*[ledger.release_expired(d) for d in [db, *others]])
        finally:
            for other in others:
                await other.close()
        assert sum(released) == 40
        assert await balance_of(db, account.id) == (10_000, 0, 10_000, 0)
    with_db(db_url, body)


def test_usage_past_its_retention_is_purged(db_url: str) -> None:
    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 1000)
        await ledger.settle(db, None, record(account.id, 0))
        assert await ledger.purge_usage(db, utcnow() - timedelta(days=1)) == 0
        assert await ledger.purge_usage(db, utcnow() + timedelta(seconds=1)) == 1
    with_db(db_url, body)


def test_a_retried_settlement_charges_once(db_url: str) -> None:
    """A retry after a try that committed unseen (the answer lost with the connection)
    finds its own usage record: without that it would charge the free balance again."""
    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 1000)
        held = await ledger.reserve(db, account.id, "k0", 100, 60)
        once = record(account.id, 40)
        assert (await ledger.settle(db, held, once)).charged == 40
        again = await ledger.settle(db, held, once, retry=True)
        assert (again.already, again.charged) == (True, 40)
        assert await balance_of(db, account.id) == (960, 0, 1000, 40)
        assert len(await records(db)) == 1
    with_db(db_url, body)


@pytest.mark.parametrize("user", ["u" * 300, "nul\x00inside", "\ud800", "ok\x1fcontrol"])
def test_a_usage_record_the_database_refuses_never_undoes_the_charge(
        db_url: str, user: str) -> None:
    """Finding 1: on PostgreSQL such a `user` failed the usage INSERT and rolled the charge
    back with it, every time; the request went free and unrecorded."""
    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 1000)
        held = await ledger.reserve(db, account.id, "k0", 100, 60)
        hostile = dataclasses.replace(record(account.id, 70), user=user)
        settled = await ledger.settle(db, held, hostile)
        storable = "\x00" not in user and "\ud800" not in user and len(user) <= 256
        assert (settled.charged, settled.degraded, settled.recorded) == (70, not storable, True)
        assert await balance_of(db, account.id) == (930, 0, 1000, 70)
        assert await open_reservations(db) == 0
        row = (await records(db))[0]
        assert (row.cost, row.degraded, row.user) == (70, not storable,
                                                      user if storable else None)
    with_db(db_url, body)


def test_a_usage_row_refused_for_any_reason_is_written_reduced(db_url: str) -> None:
    """A refusal the ledger does not foresee (here a model id longer than its column, which
    PostgreSQL enforces and SQLite does not) is undone alone, and the row written again
    with only what the books need."""
    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 1000)
        held = await ledger.reserve(db, account.id, "k0", 100, 60)
        odd = dataclasses.replace(record(account.id, 30), model="m" * 300)
        settled = await ledger.settle(db, held, odd)
        assert (settled.charged, settled.recorded) == (30, True)
        assert settled.degraded == (not db.is_sqlite)
        assert await balance_of(db, account.id) == (970, 0, 1000, 30)
        row = (await records(db))[0]
        assert (row.cost, row.user is None) == (30, not db.is_sqlite)
        assert await usage_costs(db, account.id) == 30
    with_db(db_url, body)
