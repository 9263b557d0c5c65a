"""Fixtures of the platform tests: databases (SQLite and PostgreSQL) and Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text

from modelyard.platform.database import Database
from tests.platform.harness import Backend
from tests.platform.services import postgres_url, redis_prefix

__all__ = ["postgres_url", "redis_prefix"]

TABLES = ("usage", "reservations", "api_keys", "credits", "accounts", "responses")


async def _clean(url: str) -> None:
    db = Database(url)
    try:
        await db.migrate()
        await db.write(lambda connection: connection.execute(
            text(f"TRUNCATE {', '.join(TABLES)}")))
    finally:
        await db.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty platform database: a new SQLite file, or the session's PostgreSQL
    database emptied."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'platform.db'}"
    url: str = request.getfixturevalue("postgres_url")
    asyncio.run(_clean(url))
    return url


@pytest.fixture(params=["sqlite", "postgresql+redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    """SQLite with limits in memory (the embedded default), or PostgreSQL with Redis."""
    if request.param == "sqlite":
        return Backend(f"sqlite:///{tmp_path / 'platform.db'}")
    url: str = request.getfixturevalue("postgres_url")
    asyncio.run(_clean(url))
    return Backend(url, request.getfixturevalue("redis_prefix"))
