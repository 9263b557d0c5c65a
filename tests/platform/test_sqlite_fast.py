"""SQLite's hot path (`platform/sqlite_fast.py`) on real SQLite files: what it writes is
what SQLAlchemy reads, a locked file sends the work to the platform thread without
blocking the event loop, and the WAL is checkpointed and starts over under steady writes."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.engine import Connection

from modelyard.platform import accounts as ops
from modelyard.platform import ledger, sqlite_fast
from modelyard.platform.database import Database
from modelyard.platform.tables import reservations, usage, utcnow
from tests.platform.harness import with_db
from tests.platform.test_ledger import balance_of, record


def _run(path: Path, body: Callable[[Database], Awaitable[None]]) -> None:
    with_db(f"sqlite:///{path}", body)


def test_rows_written_on_the_hot_path_read_back_through_sqlalchemy(tmp_path: Path) -> None:
    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 1000)
        created = await ops.create_key(db, "acme", models=["m"], rpm=5,
                                       expires_at=utcnow() + timedelta(days=1))
        found = await ops.find_key(db, created.info.id)
        assert db._fast is not None  # the lookup went the fast way
        assert found is not None and found.account_id == account.id
        assert found.models == frozenset({"m"}) and found.rpm == 5 and not found.revoked
        assert found.expires_at == created.info.expires_at
        held = await ledger.reserve(db, account.id, created.info.id, 300, 60)
        assert held is not None

        def reservation(connection: Connection) -> tuple[object, object]:
            row = connection.execute(select(reservations)).one()
            return row.expires_at, row.created_at
        expires_at, created_at = await db.read(reservation)
        # Stored in SQLAlchemy's format: read back as times, and compared as such by the
        # sweeper (which must not release a live reservation).
        assert expires_at - created_at == timedelta(seconds=60)  # type: ignore[operator]
        assert await ledger.release_expired(db) == 0
        assert (await ledger.settle(db, held, record(account.id, 120, 5))).charged == 120

        def usage_row(connection: Connection) -> tuple[object, ...]:
            row = connection.execute(select(usage)).one()
            return row.created_at, row.estimated, row.client_disconnected, row.ttft_ms
        created, estimated, disconnected, ttft = await db.read(usage_row)
        assert abs((utcnow() - created).total_seconds()) < 60  # type: ignore[operator]
        assert (estimated, disconnected, ttft) == (False, False, 100.0)
        assert await balance_of(db, account.id) == (880, 0, 1000, 120)
    _run(tmp_path / "platform.db", body)


def test_a_locked_file_sends_writes_to_the_platform_thread(tmp_path: Path) -> None:
    path = tmp_path / "platform.db"

    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 1000)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1
        beat = asyncio.get_running_loop().create_task(ticker())
        reserving = asyncio.get_running_loop().create_task(
            ledger.reserve(db, account.id, "k0", 100, 60))
        started = time.monotonic()
        await asyncio.sleep(0.3)
        assert not reserving.done()  # waiting for the lock, on the platform thread
        other.execute("COMMIT")
        held = await reserving
        beat.cancel()
        other.close()
        assert held is not None and time.monotonic() - started >= 0.3
        assert ticks >= 10  # the event loop kept running while the write waited
        assert await balance_of(db, account.id) == (1000, 100, 1000, 0)
    _run(path, body)


def test_the_wal_is_checkpointed_and_starts_over(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sqlite_fast, "CHECKPOINT_EVERY", 20)
    path = tmp_path / "platform.db"
    sizes: list[int] = []

    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 10**12)
        for round_ in range(6):
            for _ in range(50):
                held = await ledger.reserve(db, account.id, "k0", 10, 60)
                await ledger.settle(db, held, record(account.id, 5))
            await asyncio.sleep(0.05)  # let a requested checkpoint finish
            sizes.append(Path(f"{path}-wal").stat().st_size)
            assert round_ < 1 or db._checkpointing is not None
        assert await balance_of(db, account.id) == (10**12 - 1500, 0, 10**12, 1500)
    _run(path, body)
    # 600 commits, checkpointed every 20: the log is reused instead of growing with them.
    # Without checkpoints it grows by the same amount every round (round 6 would be 3x
    # round 2); with them it may grow once or twice more, when a checkpoint could not
    # start the log over while writes went on, and then stays.
    assert max(sizes) < 2.5 * sizes[1], sizes


def test_the_database_file_and_its_directory_are_private(tmp_path: Path) -> None:
    """Finding 10: they were created readable by every local user (umask 022: 0644/0755)."""
    folder = tmp_path / "data" / "platform"

    async def body(db: Database) -> None:
        account = await ops.create_account(db, "acme", 1000)
        held = await ledger.reserve(db, account.id, "k0", 10, 60)  # the hot path's files too
        await ledger.settle(db, held, record(account.id, 5))
        files = {path.name: path.stat().st_mode & 0o777 for path in folder.iterdir()}
        assert {"platform.db", "platform.db-wal", "platform.db-shm"} <= set(files), files
        assert set(files.values()) == {0o600}, files

    previous = os.umask(0o022)
    try:
        _run(folder / "platform.db", body)
    finally:
        os.umask(previous)
    assert folder.stat().st_mode & 0o777 == 0o700
