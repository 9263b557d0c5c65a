"""PostgreSQL and Redis for the tests: a fresh database and a fresh key prefix per session.

They run on the development and CI machines at their standard local ports (override with
MODELYARD_TEST_POSTGRES_URL / MODELYARD_TEST_REDIS_URL). When one is unreachable its tests
skip, saying why, unless MODELYARD_REQUIRE_SERVICES=1 (CI), where they fail.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from typing import NoReturn

import asyncpg
import pytest
import redis
from sqlalchemy.engine import make_url

POSTGRES_URL = os.environ.get("MODELYARD_TEST_POSTGRES_URL",
                              "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("MODELYARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def unavailable(reason: str) -> NoReturn:
    if os.environ.get("MODELYARD_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} (MODELYARD_REQUIRE_SERVICES=1)")
    pytest.skip(reason)


async def _admin(statement: str) -> None:
    url = make_url(POSTGRES_URL)
    connection = await asyncpg.connect(host=url.host, port=url.port or 5432,
                                       user=url.username, password=url.password,
                                       database=url.database, timeout=5)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


STALE = """
SELECT datname FROM pg_database d
WHERE datname LIKE 'modelyard\\_test\\_%'
  AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.datname = d.datname)
  AND (pg_stat_file('base/' || d.oid || '/PG_VERSION')).modification
      < now() - interval '1 hour'
"""


async def _drop_stale() -> None:
    """Drop test databases left by runs that were killed (unused for over an hour)."""
    url = make_url(POSTGRES_URL)
    connection = await asyncpg.connect(host=url.host, port=url.port or 5432,
                                       user=url.username, password=url.password,
                                       database=url.database, timeout=5)
    try:
        for row in await connection.fetch(STALE):
            await connection.execute(f'DROP DATABASE IF EXISTS "{row["datname"]}"')
    except asyncpg.PostgresError:
        pass  # not allowed to look (pg_stat_file needs privileges): leave them
    finally:
        await connection.close()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of its own for this test session, dropped at the end."""
    name = f"modelyard_test_{secrets.token_hex(6)}"
    try:
        asyncio.run(_drop_stale())
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
        unavailable(f"PostgreSQL at {POSTGRES_URL} is unavailable: {exc}")
    try:
        yield make_url(POSTGRES_URL).set(drivername="postgresql", database=name) \
            .render_as_string(hide_password=False)
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def redis_prefix() -> Iterator[str]:
    """A key prefix of its own for this test session; its keys are deleted at the end."""
    prefix = f"modelyard-test-{secrets.token_hex(6)}"
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=5)
    try:
        client.ping()
    except redis.RedisError as exc:
        client.close()
        unavailable(f"Redis at {REDIS_URL} is unavailable: {exc}")
    try:
        yield prefix
    finally:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        if keys:
            client.delete(*keys)
        client.close()
