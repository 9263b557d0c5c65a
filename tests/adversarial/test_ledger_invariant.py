"""The invariant checker itself, on SQLite and PostgreSQL: books that balance pass, and each
kind of money gone astray is named."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert, text, update
from sqlalchemy.engine import Connection

from modelyard.platform import accounts as ops
from modelyard.platform import ledger
from modelyard.platform.database import Database
from modelyard.platform.tables import accounts, reservations, utcnow
from modelyard.usage import Usage
from tests.adversarial.ledger_invariant import read_ledger
from tests.platform.services import postgres_url

__all__ = ["postgres_url"]


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'platform.db'}"
    database: str = request.getfixturevalue("postgres_url")
    return database


async def _books(url: str, tamper: Callable[[Connection, str], object] | None) -> None:
    db = Database(url)
    try:
        await db.migrate()
        if not db.is_sqlite:  # the session's PostgreSQL database, emptied
            await db.write(lambda c: c.execute(text(
                "TRUNCATE usage, reservations, api_keys, credits, accounts")))
        account = await ops.create_account(db, "acme", 1_000_000)
        held = await ledger.reserve(db, account.id, "k1", 500, 60)
        assert held is not None
        record = ledger.UsageRecord("k1", account.id, "m", "req-1",
                                    Usage(10, 0, 5, 0), 20, 0.1, None, 200)
        await ledger.settle(db, held, record)
        if tamper is not None:
            await db.write(tamper, account.id)
    finally:
        await db.close()


def _spend_unrecorded(connection: Connection, account_id: str) -> None:
    connection.execute(update(accounts).where(accounts.c.id == account_id)
                       .values(balance=accounts.c.balance - 7, spent=accounts.c.spent + 7))


def _leak_reservation(connection: Connection, account_id: str) -> None:
    now = utcnow()
    connection.execute(insert(reservations).values(
        id="r" * 32, account_id=account_id, key_id="k1", amount=30,
        expires_at=now + timedelta(seconds=60), created_at=now))
    connection.execute(update(accounts).where(accounts.c.id == account_id)
                       .values(reserved=accounts.c.reserved + 30))


def _mint_money(connection: Connection, account_id: str) -> None:
    connection.execute(update(accounts).where(accounts.c.id == account_id)
                       .values(balance=accounts.c.balance + 3))


def test_books_that_balance_pass(url: str) -> None:
    asyncio.run(_books(url, None))
    books = read_ledger(url)
    assert books.violations == [] and books.money_unaccounted == 0
    assert books.records_by_user == {"req-1": 1}
    acme = books.account("acme")
    assert (acme.balance, acme.spent, acme.usage_cost, acme.reserved) == (999_980, 20, 20, 0)


@pytest.mark.parametrize(("tamper", "named", "unaccounted"), [
    (_spend_unrecorded, "spent != sum of usage costs", 7),
    (_leak_reservation, "reservation still held", 30),
    (_mint_money, "balance != credited - spent", 3),
])
def test_money_gone_astray_is_named(url: str, tamper: Callable[[Connection, str], object],
                                    named: str, unaccounted: int) -> None:
    asyncio.run(_books(url, tamper))
    books = read_ledger(url)
    assert any(named in violation for violation in books.violations), books.violations
    assert books.money_unaccounted == unaccounted
    if tamper is _leak_reservation:  # while requests run, a held reservation is fine
        assert read_ledger(url, settled=False).violations == []
