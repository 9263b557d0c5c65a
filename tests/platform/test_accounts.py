"""Accounts, keys and usage reports against real SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

from modelyard.platform import accounts as ops
from modelyard.platform import keys, ledger, usage
from modelyard.platform.accounts import AdminError
from modelyard.platform.database import Database, DatabaseError, normalize_url
from modelyard.platform.tables import metadata, utcnow
from modelyard.usage import Usage
from tests.platform.harness import with_db


def test_migrations_create_exactly_the_tables_the_code_uses(db_url: str) -> None:
    def differences(connection: Connection) -> list[Any]:
        return list(compare_metadata(MigrationContext.configure(connection), metadata))

    async def body(db: Database) -> list[Any]:
        return await db.read(differences)
    assert with_db(db_url, body) == []


def test_accounts_and_top_ups(db_url: str) -> None:
    async def body(db: Database) -> None:
        created = await ops.create_account(db, "acme", 1_500_000)
        assert (created.balance, created.credited, created.available) == (1_500_000,) * 3
        with pytest.raises(AdminError) as duplicate:
            await ops.create_account(db, "acme")
        assert duplicate.value.status == 409
        topped = await ops.top_up(db, "acme", 250_000)
        assert (topped.balance, topped.credited, topped.spent) == (1_750_000, 1_750_000, 0)
        with pytest.raises(AdminError) as missing:
            await ops.top_up(db, "nobody", 1)
        assert missing.value.status == 404
        with pytest.raises(AdminError):
            await ops.top_up(db, "acme", 0)
        assert [a.name for a in await ops.list_accounts(db)] == ["acme"]
        assert (await ops.get_account(db, "acme")).balance == 1_750_000
    with_db(db_url, body)


def test_keys_are_found_by_id_and_checked_against_their_digest(db_url: str) -> None:
    async def body(db: Database) -> None:
        await ops.create_account(db, "acme")
        expires = datetime(2031, 1, 2, 3, 4, 5)
        created = await ops.create_key(db, "acme", models=["b", "a", "a"], rpm=5, tpm=100,
                                       expires_at=expires, name="ci")
        assert created.info.models == ("a", "b")
        found = await ops.find_key(db, created.info.id)
        assert found is not None
        assert keys.matches(created.text, found.digest)
        assert (found.models, found.rpm, found.tpm, found.expires_at, found.revoked) == (
            frozenset({"a", "b"}), 5, 100, expires, False)
        assert await ops.find_key(db, "000000000000") is None
        listed = await ops.list_keys(db, "acme")
        assert [k.id for k in listed] == [created.info.id]
        assert listed[0].account == "acme"
        revoked = await ops.revoke_key(db, created.info.id)
        assert revoked.revoked_at is not None
        again = await ops.find_key(db, created.info.id)
        assert again is not None and again.revoked
        with pytest.raises(AdminError):
            await ops.revoke_key(db, "nope")
        with pytest.raises(AdminError):
            await ops.create_key(db, "nobody")
        with pytest.raises(AdminError):
            await ops.create_key(db, "acme", rpm=0)
        with pytest.raises(AdminError):
            await ops.create_key(db, "acme", tpm=2**31)
    with_db(db_url, body)


def test_the_admin_key_is_created_once_even_by_gateways_starting_together(
        db_url: str) -> None:
    async def body(db: Database) -> None:
        others = [Database(db.url) for _ in range(3)]
        try:
            created = await asyncio.gather(*[ops.bootstrap_admin(d) for d in [db, *others]])
        finally:
            for other in others:
                await other.close()
        made = [key for key in created if key is not None]
        assert len(made) == 1
        admin_keys = [k for k in await ops.list_keys(db) if k.is_admin]
        assert len(admin_keys) == 1 and admin_keys[0].account == ops.ADMIN_ACCOUNT
        assert keys.key_id_of(made[0]) == admin_keys[0].id
        assert await ops.bootstrap_admin(db) is None
    with_db(db_url, body)


def test_concurrent_migrations_are_harmless(db_url: str) -> None:
    async def body(db: Database) -> None:
        others = [Database(db.url) for _ in range(3)]
        try:
            await asyncio.gather(*[d.migrate() for d in others])
        finally:
            for other in others:
                await other.close()
    with_db(db_url, body)


def test_usage_totals_by_day_model_key_and_account(db_url: str) -> None:
    async def body(db: Database) -> None:
        acme = await ops.create_account(db, "acme", 10_000)
        beta = await ops.create_account(db, "beta", 10_000)
        for account, model, cost in ((acme, "m1", 100), (acme, "m2", 50), (beta, "m1", 7)):
            held = await ledger.reserve(db, account.id, "k1", cost, 60)
            await ledger.settle(db, held, ledger.UsageRecord(
                "k1", account.id, model, None, Usage(10, 4, 3, 1), cost, 0.2, None, 200))
        by_model = await usage.totals(db, "model")
        assert [(r.group, r.requests, r.cost) for r in by_model] == [("m1", 2, 107),
                                                                     ("m2", 1, 50)]
        by_account = await usage.totals(db, "account")
        assert [(r.group, r.cost) for r in by_account] == [("acme", 150), ("beta", 7)]
        by_day = await usage.totals(db, "day", account="acme")
        assert [(r.group, r.requests, r.usage) for r in by_day] == [
            (utcnow().date().isoformat(), 2, Usage(20, 8, 6, 2))]
        assert [r.group for r in await usage.totals(db, "key")] == ["k1"]
        later = utcnow() + timedelta(minutes=1)
        assert await usage.totals(db, "day", since=later) == []
        assert len(await usage.records(db, account="beta")) == 1
        with pytest.raises(AdminError):
            await usage.totals(db, "day", account="nobody")
    with_db(db_url, body)


@pytest.mark.parametrize(("text", "expected"), [
    ("2027-01-31", datetime(2027, 1, 31)),
    ("2027-01-31T10:00:00", datetime(2027, 1, 31, 10)),
    ("2027-01-31T10:00:00+02:00", datetime(2027, 1, 31, 8)),
    ("2027-01-31T10:00:00Z", datetime(2027, 1, 31, 10)),
])
def test_times_are_read_as_utc(text: str, expected: datetime) -> None:
    assert ops.parse_when(text) == expected


def test_bad_times_and_urls_are_refused() -> None:
    with pytest.raises(AdminError):
        ops.parse_when("tomorrow")
    with pytest.raises(DatabaseError):
        normalize_url("mysql://x/y")
    with pytest.raises(DatabaseError):
        normalize_url("not a url")
    assert normalize_url("postgres://u@h/db") == "postgresql+asyncpg://u@h/db"
    assert normalize_url("sqlite+aiosqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
