"""The platform's database: SQLite (the embedded default) or PostgreSQL, and its migrations.

Every database operation is a plain function of a SQLAlchemy `Connection` that runs as
one transaction: `await db.write(fn, ...)`, `await db.read(fn, ...)`. Where it runs:

- SQLite: on one connection owned by one thread, so a whole transaction costs one hop
  from the event loop, requests queue for the connection instead of spinning in SQLite's
  busy handler, and the event loop never blocks on the file. WAL mode; every write
  transaction starts with `BEGIN IMMEDIATE`, so it holds the write lock from its first
  statement (other processes on the file, such as the CLI, wait up to the busy timeout).
  Reads run without a transaction.
- PostgreSQL: asyncpg through a connection pool, the function run with `run_sync`.
  READ COMMITTED; every money-moving statement is a single conditional UPDATE, which is
  atomic there.

Migrations (Alembic, shipped in this package) run at start under a lock: a PostgreSQL
advisory lock, or SQLite's write lock, so that gateways starting together migrate once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar, cast

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from modelyard.errors import ModelyardError
from modelyard.platform.sqlite_fast import Busy, FastSQLite, RawConnection

MIGRATIONS = "modelyard.platform:migrations"
_SETUP_LOCK = 0x6D79_6172_6400  # an arbitrary constant: "myard"
_READ_ONLY = "modelyard_read_only"
BUSY_TIMEOUT_MS = 10_000
_LOCK = text("SELECT pg_advisory_xact_lock(:key)")
_RELAXED = text("SET LOCAL synchronous_commit = off")

P = ParamSpec("P")
T = TypeVar("T")
Operation = Callable[Concatenate[Connection, P], T]
HotOperation = Callable[Concatenate[Connection | RawConnection, P], T]
"""An operation that runs on SQLAlchemy or, on SQLite's hot path, on a raw connection."""


class DatabaseError(ModelyardError, RuntimeError):
    """The database URL is not one modelyard can use."""


def normalize_url(url: str) -> str:
    """Accept plain `sqlite:///…` / `postgresql://…` URLs; the drivers modelyard uses."""
    try:
        parsed = make_url(url)
    except Exception as exc:  # sqlalchemy raises ArgumentError, ValueError, ...
        raise DatabaseError(f"database_url is not a database URL: {url!r}") from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        parsed = parsed.set(drivername="sqlite")
    elif backend in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise DatabaseError(f"database_url must be sqlite or postgresql, got {backend!r}")
    return parsed.render_as_string(hide_password=False)


POSTGRES_CONNECT_TIMEOUT_S = 5.0
POSTGRES_STATEMENT_TIMEOUT_S = 5.0
POSTGRES_POOL_TIMEOUT_S = 5.0
POSTGRES_OPERATION_TIMEOUT_S = 5.0
"""How long a PostgreSQL connect, statement, wait for a pooled connection, or a whole
operation (a transaction from checkout to commit) may take."""


class Database:
    """Runs operations (functions of a Connection) as transactions; see the module doc."""

    def __init__(self, url: str, *, pool_size: int = 10) -> None:
        self.url = normalize_url(url)
        self.dialect = make_url(self.url).get_backend_name()
        self._sqlite: Engine | None = None
        self._postgres: AsyncEngine | None = None
        self._thread: ThreadPoolExecutor | None = None
        self._fast: FastSQLite | None = None
        self._sqlite_file: str | None = None
        self._checkpointing: asyncio.Future[None] | None = None
        self._abandoned: set[asyncio.Future[Any]] = set()
        """Timed-out PostgreSQL operations still cancelling (held so they finish)."""
        if self.dialect == "sqlite":
            database = make_url(self.url).database or ""
            if database and database != ":memory:":
                self._sqlite_file = str(_private_file(Path(database).expanduser()))
            self._sqlite = create_engine(
                self.url, pool_size=1, max_overflow=0,
                connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})
            _sqlite_hooks(self._sqlite)
            self._thread = ThreadPoolExecutor(1, thread_name_prefix="modelyard-sqlite")
        else:
            # Bounded waits: a database that goes silent (a partition, not a refusal) must
            # turn into a 503 within seconds, not hold requests until TCP gives up.
            self._postgres = create_async_engine(
                self.url, pool_size=pool_size, max_overflow=pool_size,
                pool_timeout=POSTGRES_POOL_TIMEOUT_S,
                connect_args={"timeout": POSTGRES_CONNECT_TIMEOUT_S,
                              "command_timeout": POSTGRES_STATEMENT_TIMEOUT_S})
            # Reads are single statements: no BEGIN / ROLLBACK round trips around them.
            self._postgres_reader = self._postgres.execution_options(
                isolation_level="AUTOCOMMIT")

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    async def write(self, operation: Operation[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `operation(connection, ...)` in a write transaction, committed if it returns."""
        return await self._run(partial(operation, **kwargs), args, read=False, lock=False)

    async def write_relaxed(self, operation: Operation[P, T], *args: P.args,
                            **kwargs: P.kwargs) -> T:
        """A write transaction whose loss in a database crash is harmless (a balance hold):
        PostgreSQL commits it without waiting for the WAL flush (`synchronous_commit` off),
        which still never reorders it or loses it half."""
        return await self._run(partial(operation, **kwargs), args, read=False, lock=False,
                               relaxed=True)

    async def hot_read(self, operation: HotOperation[..., T], *args: Any) -> T:
        """A read every request makes: on SQLite, on the event loop (`sqlite_fast`)."""
        fast = self._fast_sqlite()
        if fast is not None:
            try:
                return cast(T, fast.read(operation, args))
            except Busy:
                pass
        return await self._run(operation, args, read=True, lock=False)

    async def hot_write(self, operation: HotOperation[..., T], *args: Any,
                        relaxed: bool = False) -> T:
        """A write transaction every request makes: on SQLite, on the event loop unless the
        file is locked (`sqlite_fast`); `relaxed` as in `write_relaxed`."""
        fast = self._fast_sqlite()
        if fast is not None:
            try:
                return cast(T, fast.write(operation, args))
            except Busy:
                pass
        return await self._run(operation, args, read=False, lock=False, relaxed=relaxed)

    def _fast_sqlite(self) -> FastSQLite | None:
        if self._fast is None and self._sqlite is not None and self._sqlite_file:
            self._fast = FastSQLite(self._sqlite_file, self._checkpoint_soon)
        return self._fast

    def _checkpoint_soon(self) -> None:
        """Copy the WAL into the database file and start it over, on the platform thread
        (never on the event loop: it fsyncs); one at a time."""
        if self._checkpointing is not None and not self._checkpointing.done():
            return
        assert self._thread is not None
        self._checkpointing = asyncio.get_running_loop().run_in_executor(
            self._thread, self._run_sqlite, _checkpoint, (), True)

    async def read(self, operation: Operation[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a read-only `operation(connection, ...)`."""
        return await self._run(partial(operation, **kwargs), args, read=True, lock=False)

    async def exclusive(self, operation: Operation[P, T], *args: P.args,
                        **kwargs: P.kwargs) -> T:
        """A write transaction no other process runs at the same time (setup work)."""
        return await self._run(partial(operation, **kwargs), args, read=False, lock=True)

    async def migrate(self) -> None:
        """Bring the schema to the newest revision."""
        await self.exclusive(_upgrade)

    async def close(self) -> None:
        if self._fast is not None:
            self._fast.close()
            self._fast = None
        if self._checkpointing is not None:
            await asyncio.wait([self._checkpointing])
        if self._postgres is not None:
            await self._postgres.dispose()
        if self._sqlite is not None and self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread,
                                                             self._sqlite.dispose)
            self._thread.shutdown(wait=True)

    async def _run(self, operation: Callable[..., T], args: tuple[Any, ...], *, read: bool,
                   lock: bool, relaxed: bool = False) -> T:
        if self._sqlite is not None:
            assert self._thread is not None
            return await asyncio.get_running_loop().run_in_executor(
                self._thread, self._run_sqlite, operation, args, read)
        if lock:  # setup work (migrations, which may wait for another gateway's): unbounded
            return await self._run_postgres(operation, args, read, lock, relaxed)
        # The whole operation is bounded, not only each statement: the driver's timeouts do
        # not cover every wait, and a cancelled operation's own cleanup (its ROLLBACK, the
        # connection's return to the pool) can wait on a silent server too. So it runs as a
        # task of its own that a timeout cancels and leaves behind; the caller gets a
        # TimeoutError (an OSError, which callers treat as the database being away) at once.
        task = asyncio.ensure_future(self._run_postgres(operation, args, read, lock, relaxed))
        try:
            done, _ = await asyncio.wait({task}, timeout=POSTGRES_OPERATION_TIMEOUT_S)
        except asyncio.CancelledError:
            _abandon(task, self._abandoned)
            raise
        if not done:
            _abandon(task, self._abandoned)
            raise TimeoutError(f"the database did not answer within "
                               f"{POSTGRES_OPERATION_TIMEOUT_S:g} s")
        return task.result()

    async def _run_postgres(self, operation: Callable[..., T], args: tuple[Any, ...],
                            read: bool, lock: bool, relaxed: bool) -> T:
        assert self._postgres is not None
        if read:
            async with self._postgres_reader.connect() as connection:
                return await connection.run_sync(operation, *args)
        async with self._postgres.begin() as connection:
            if lock:
                await connection.execute(_LOCK, {"key": _SETUP_LOCK})
            if relaxed:
                await connection.execute(_RELAXED)
            return await connection.run_sync(operation, *args)

    def _run_sqlite(self, operation: Callable[..., T], args: tuple[Any, ...],
                    read: bool) -> T:
        assert self._sqlite is not None
        if read:
            with self._sqlite.connect() as connection:
                connection = connection.execution_options(**{_READ_ONLY: True})
                return operation(connection, *args)
        with self._sqlite.begin() as connection:
            return operation(connection, *args)


def _abandon(task: asyncio.Future[Any], held: set[asyncio.Future[Any]]) -> None:
    """Cancel an operation without waiting for it; its outcome is read so that it is
    never reported as an unretrieved exception."""
    task.cancel()
    held.add(task)

    def finished(done: asyncio.Future[Any]) -> None:
        held.discard(done)
        if not done.cancelled():
            done.exception()

    task.add_done_callback(finished)


def _private_file(path: Path) -> Path:
    """Create the database file readable by its owner only (0600), in a directory of its
    own user's (0700) if it has to create that too; SQLite gives the `-wal` and `-shm`
    files it makes beside it the database file's mode."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    return path


def _checkpoint(connection: Connection) -> None:
    # Under a steady stream of writes a passive checkpoint alone never finds the log
    # fully copied when the next write begins, so the log never starts over and grows
    # without bound. RESTART does, but holds writers off while it copies (the event
    # loop's writes go to the platform thread meanwhile): so a passive checkpoint copies
    # the bulk first, and RESTART only what was written since.
    connection.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)").all()
    connection.exec_driver_sql("PRAGMA wal_checkpoint(RESTART)").all()


def _upgrade(connection: Connection) -> None:
    config = AlembicConfig()
    config.set_main_option("script_location", MIGRATIONS)
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


def _sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def on_connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # modelyard emits BEGIN itself
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def on_begin(connection: Connection) -> None:
        if not connection.get_execution_options().get(_READ_ONLY):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
