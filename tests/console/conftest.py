"""Fixtures of the console tests: the platform on SQLite, or PostgreSQL with Redis, with
the console's tables emptied too."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text

from modelyard.platform.database import Database
from tests.platform.harness import Backend
from tests.platform.services import postgres_url, redis_prefix

__all__ = ["postgres_url", "redis_prefix"]

TABLES = ("usage", "usage_daily", "console_sessions", "reservations", "api_keys", "credits",
          "accounts", "responses")


async def _clean(url: str) -> None:
    db = Database(url)
    try:
        await db.migrate()
        await db.write(lambda connection: connection.execute(
            text(f"TRUNCATE {', '.join(TABLES)}")))
        await db.write(lambda connection: connection.execute(
            text("UPDATE usage_rollup SET last_id = 0")))
    finally:
        await db.close()


@pytest.fixture(params=["sqlite", "postgresql+redis"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "sqlite":
        return Backend(f"sqlite:///{tmp_path / 'platform.db'}")
    url: str = request.getfixturevalue("postgres_url")
    asyncio.run(_clean(url))
    return Backend(url, request.getfixturevalue("redis_prefix"))
