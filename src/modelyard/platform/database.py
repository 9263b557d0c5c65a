"""The platform's database: SQLite (the embedded default) or PostgreSQL, and its migrations.

SQLite runs in WAL mode through one connection per process: requests queue for it in
asyncio instead of spinning in SQLite's busy handler, and every write transaction starts
with `BEGIN IMMEDIATE`, so it holds the write lock from its first statement (other
processes on the same file, such as the CLI, wait up to the busy timeout). Reads run
outside a transaction. PostgreSQL uses a connection pool and READ COMMITTED; every
money-moving statement is a single conditional UPDATE, which is atomic there.

Migrations (Alembic, shipped in this package) run at start under a lock: a PostgreSQL
advisory lock, or SQLite's write lock, so that gateways starting together migrate once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

MIGRATIONS = "modelyard.platform:migrations"
_SETUP_LOCK = 0x6D79_6172_6400  # an arbitrary constant: "myard"
_READ_ONLY = "modelyard_read_only"
BUSY_TIMEOUT_MS = 10_000


class DatabaseError(RuntimeError):
    """The database URL is not one modelyard can use."""


def normalize_url(url: str) -> str:
    """Accept plain `sqlite:///…` / `postgresql://…` URLs and pick the asyncio drivers."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError, ValueError, ...
        raise DatabaseError(f"database_url is not a database URL: {url!r}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername="sqlite+aiosqlite")
    elif backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise DatabaseError(f"database_url must be sqlite or postgresql, got {backend!r}")
    return parsed.render_as_string(hide_password=False)


def sqlite_url(path: Path) -> str:
    return f"sqlite+aiosqlite:///{path}"


class Database:
    """An async engine with the two ways the platform talks to it: `begin()` and `read()`."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = normalize_url(url)
        parsed = make_url(self.url)
        self.dialect = parsed.get_backend_name()
        if self.dialect == "sqlite":
            database = parsed.database or ""
            if database and database != ":memory:":
                Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
            self.engine: AsyncEngine = create_async_engine(
                self.url, pool_size=1, max_overflow=0, pool_timeout=60,
                connect_args={"timeout": BUSY_TIMEOUT_MS / 1000})
            _sqlite_hooks(self.engine)
        else:
            self.engine = create_async_engine(self.url, pool_size=pool_size, max_overflow=pool_size,
                                              pool_pre_ping=False)
        self._reader = self.engine.execution_options(**{_READ_ONLY: True})

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @asynccontextmanager
    async def begin(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction, committed when the block ends without an exception."""
        async with self.engine.begin() as connection:
            yield connection

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A connection for reads (no write lock taken on SQLite)."""
        async with self._reader.connect() as connection:
            yield connection

    @asynccontextmanager
    async def exclusive(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction that no other process runs at the same time (setup work)."""
        async with self.engine.begin() as connection:
            if self.dialect == "postgresql":
                await connection.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                         {"key": _SETUP_LOCK})
            yield connection

    async def migrate(self) -> None:
        """Bring the schema to the newest revision."""
        async with self.exclusive() as connection:
            await connection.run_sync(_upgrade)

    async def close(self) -> None:
        await self.engine.dispose()


def _upgrade(connection: Connection) -> None:
    config = AlembicConfig()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _sqlite_hooks(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # modelyard emits BEGIN itself
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def on_begin(connection: Connection) -> None:
        if not connection.get_execution_options().get(_READ_ONLY):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
