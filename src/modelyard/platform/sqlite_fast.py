"""SQLite's hot path: the statements every request runs (key lookup, reserve, settle) on
one raw sqlite3 connection, on the event loop.

On the gateway benchmark, SQLAlchemy's execution machinery and a hop to the database
thread per transaction cost about 2 ms of CPU per request on SQLite; the same statements
through the DB-API directly cost about a tenth of that. They stay SQLAlchemy Core (one
definition, the same on PostgreSQL): each is compiled once for SQLite here and run with
the values SQLite stores (times in SQLAlchemy's text format, booleans as 0/1). The
operations themselves are the ledger's and the key lookup's own functions: they are
handed a `RawConnection` instead of a SQLAlchemy `Connection`.

The event loop never waits on the file lock: write transactions begin with `BEGIN
IMMEDIATE` under a zero busy timeout, and one that finds the lock taken (the CLI, another
gateway, the platform thread's maintenance) raises `Busy`, so that the caller runs it on
the platform thread, which waits. Reads never wait in WAL mode. Commits do not fsync
(synchronous=NORMAL, as on the platform thread). This connection never checkpoints the
WAL itself (a checkpoint copies pages and fsyncs): every `CHECKPOINT_EVERY` commits (a
few MB of log) it asks its owner to run one on the platform thread.
"""

from __future__ import annotations

import sqlite3
from collections import namedtuple
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import DateTime
from sqlalchemy.dialects import sqlite as sqlite_dialect
from sqlalchemy.sql.elements import ClauseElement
from sqlalchemy.types import NullType

from modelyard.errors import ModelyardError

DIALECT = sqlite_dialect.dialect()
CHECKPOINT_EVERY = 200
"""Commits between two WAL checkpoints asked of the platform thread."""


class Busy(ModelyardError):
    """The database is locked (or failed): run the operation on the platform thread."""


def sqlite_time(value: datetime) -> str:
    """A naive UTC time as SQLAlchemy's SQLite DATETIME stores it (sortable text)."""
    return (f"{value.year:04d}-{value.month:02d}-{value.day:02d} {value.hour:02d}:"
            f"{value.minute:02d}:{value.second:02d}.{value.microsecond:06d}")


def _time(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


class _Compiled:
    """One statement compiled for SQLite: its SQL, its parameter order, its row shape."""

    def __init__(self, statement: ClauseElement, keys: Sequence[str]) -> None:
        compiled = statement.compile(dialect=DIALECT, column_keys=list(keys))
        self.sql = compiled.string
        self.names: tuple[str, ...] = tuple(getattr(compiled, "positiontup", None) or ())
        # Parameters that may carry a time: typed DateTime, or untyped (a bare bindparam).
        binds = getattr(compiled, "binds", {})
        self.time_params = [i for i, name in enumerate(self.names) if name not in binds
                            or isinstance(binds[name].type, DateTime | NullType)]
        columns = list(getattr(statement, "exported_columns", ()))
        self.row = namedtuple("Row", [c.key for c in columns], rename=True)  # type: ignore[misc]
        self.times = [i for i, c in enumerate(columns) if isinstance(c.type, DateTime)]

    def convert(self, raw: tuple[Any, ...]) -> Any:
        if self.times:
            values = list(raw)
            for i in self.times:
                values[i] = _time(values[i])
            raw = tuple(values)
        return self.row(*raw)


class RawResult:
    """The part of SQLAlchemy's `CursorResult` the hot-path operations use."""

    def __init__(self, cursor: sqlite3.Cursor, compiled: _Compiled) -> None:
        self.rowcount = cursor.rowcount
        self._rows = cursor.fetchall()
        self._compiled = compiled

    def first(self) -> Any:
        return self._compiled.convert(self._rows[0]) if self._rows else None

    def scalar_one_or_none(self) -> Any:
        if len(self._rows) > 1:
            raise sqlite3.ProgrammingError("more than one row where at most one was expected")
        return self._rows[0][0] if self._rows else None


class RawConnection:
    """Runs SQLAlchemy Core statements on a sqlite3 connection, each compiled once."""

    def __init__(self, connection: sqlite3.Connection) -> None:
        self.connection = connection
        self._cache: dict[tuple[int, tuple[str, ...]], _Compiled] = {}

    def execute(self, statement: ClauseElement, parameters: dict[str, Any]) -> RawResult:
        keys = tuple(parameters)
        compiled = self._cache.get((id(statement), keys))
        if compiled is None:
            compiled = self._cache[(id(statement), keys)] = _Compiled(statement, keys)
        values = [parameters[name] for name in compiled.names]
        for i in compiled.time_params:
            if isinstance(values[i], datetime):
                values[i] = sqlite_time(values[i])
        return RawResult(self.connection.execute(compiled.sql, values), compiled)

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """What `Connection.begin_nested` is: statements undone alone if the block raises."""
        self.connection.execute("SAVEPOINT modelyard_nested")
        try:
            yield
        except BaseException:
            self.connection.execute("ROLLBACK TO modelyard_nested")
            self.connection.execute("RELEASE modelyard_nested")
            raise
        self.connection.execute("RELEASE modelyard_nested")


class FastSQLite:
    """The event loop's own connection to the platform's SQLite file."""

    def __init__(self, path: str, checkpoint: Callable[[], None]) -> None:
        connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False,
                                     timeout=0)
        connection.execute("PRAGMA busy_timeout=0")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("PRAGMA foreign_keys=ON")
        connection.execute("PRAGMA wal_autocheckpoint=0")
        self._raw = RawConnection(connection)
        self._checkpoint = checkpoint
        self._commits = 0

    def read(self, operation: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        try:
            return operation(self._raw, *args)
        except sqlite3.OperationalError as exc:
            raise Busy(str(exc)) from None

    def write(self, operation: Callable[..., Any], args: tuple[Any, ...]) -> Any:
        connection = self._raw.connection
        try:
            connection.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as exc:
            raise Busy(str(exc)) from None
        try:
            result = operation(self._raw, *args)
            connection.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            self._rollback()
            raise Busy(str(exc)) from None
        except BaseException:
            self._rollback()
            raise
        self._commits += 1
        if self._commits % CHECKPOINT_EVERY == 0:
            self._checkpoint()
        return result

    def _rollback(self) -> None:
        if self._raw.connection.in_transaction:
            self._raw.connection.execute("ROLLBACK")

    def close(self) -> None:
        self._raw.connection.close()
