"""Usage totals for the console without reading every record: daily sums kept in SQL.

`usage_daily` holds the usage records summed per account, UTC day, model and key, for every
record up to `usage_rollup.last_id`. A totals query reads those sums and adds the few
records past `last_id` (the last minute or so, an index range), so a page costs the same
with 100 or 100,000 records. A page that reads totals starts moving `last_id` forward
(`roll`, in the background), at most every `ROLL_INTERVAL_S` per process, `CHUNK` records a
transaction, taking records older than `GRACE_S` only: ids
are handed out before their transaction commits, and a settlement's transaction ends within
seconds (the database's operation timeout), so by then no record with a smaller id can
still appear. Rolling is one transaction holding the rollup row (`FOR UPDATE` on
PostgreSQL, SQLite's write lock), so gateways sharing a database never add a record twice.
Days past the usage retention are dropped with the records.

A record inserted later with an id below `last_id` would be missed; the ledger never does
that (its records get new ids as they settle).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import String, cast, delete, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.sql.elements import ColumnElement

from modelyard.platform.database import Database
from modelyard.platform.tables import usage, usage_daily, usage_rollup, utcnow

logger = logging.getLogger(__name__)
ROLL_INTERVAL_S = 10.0
GRACE_S = 60.0
CHUNK = 20_000
SUMS = ("prompt_tokens", "cached_tokens", "completion_tokens", "reasoning_tokens", "cost",
        "uncollected")
Group = Literal["day", "model", "key_id", "account_id"]
_KEY = ("account_id", "day", "model", "key_id")
_last_roll: dict[str, float] = {}
_rolling: set[str] = set()
ANSWERS_KEPT = 256
_answers: OrderedDict[tuple[Any, ...], list[tuple[Any, ...]]] = OrderedDict()


@dataclass(frozen=True)
class Totals:
    """One group's sums; `group` holds the grouped columns' values by name."""

    group: dict[str, str]
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost: int
    uncollected: int

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def _day(column: Any) -> ColumnElement[str]:
    """YYYY-MM-DD of a timestamp, on SQLite (text) and PostgreSQL alike."""
    return func.substr(cast(column, String), 1, 10)


def _roll(connection: Connection, before: datetime, keep_from: str | None) -> bool:
    """Sum the next `CHUNK` records into `usage_daily`; whether more are waiting."""
    last = int(connection.execute(select(usage_rollup.c.last_id)
                                  .where(usage_rollup.c.id == 1).with_for_update()).scalar_one())
    eligible = (usage.c.id > last, usage.c.created_at < before)
    upto = connection.execute(select(usage.c.id).where(*eligible).order_by(usage.c.id)
                              .offset(CHUNK - 1).limit(1)).scalar()
    more = upto is not None
    if upto is None:
        upto = connection.execute(select(func.max(usage.c.id)).where(*eligible)).scalar()
    if upto is None:
        return False
    # One statement: the database sums the records and adds them to the daily rows itself
    # (nothing travels to Python and back).
    day = _day(usage.c.created_at)
    summed = (select(usage.c.account_id, day.label("day"), usage.c.model, usage.c.key_id,
                     func.count().label("requests"),
                     *(func.coalesce(func.sum(usage.c[name]), 0).label(name)
                       for name in SUMS))
              .where(usage.c.id > last, usage.c.id <= upto)
              .group_by(usage.c.account_id, day, usage.c.model, usage.c.key_id))
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    statement = dialect.insert(usage_daily).from_select([*_KEY, "requests", *SUMS], summed)
    connection.execute(statement.on_conflict_do_update(
        index_elements=list(_KEY),
        set_={name: usage_daily.c[name] + statement.excluded[name]
              for name in ("requests", *SUMS)}))
    connection.execute(update(usage_rollup).where(usage_rollup.c.id == 1)
                       .values(last_id=upto))
    if keep_from is not None:
        connection.execute(delete(usage_daily).where(usage_daily.c.day < keep_from))
    return more


async def roll(db: Database, *, retention_days: int = 0, force: bool = False) -> None:
    """Bring `usage_daily` up to the records older than `GRACE_S`, `CHUNK` records a
    transaction (each well inside the database's operation timeout, and SQLite's reads
    get their turn between them); at most every `ROLL_INTERVAL_S` and one at a time in
    this process unless `force`. Pages start it without waiting for it: their totals are
    right either way (they read the records not summed yet), only slower until it ends."""
    now = time.monotonic()
    if not force and (db.url in _rolling or
                      now - _last_roll.get(db.url, -ROLL_INTERVAL_S) < ROLL_INTERVAL_S):
        return
    _last_roll[db.url] = now
    _rolling.add(db.url)
    wall = utcnow()
    keep_from = None if retention_days <= 0 else (
        wall - timedelta(days=retention_days)).date().isoformat()
    try:
        while await db.write(_roll, wall - timedelta(seconds=GRACE_S), keep_from):
            pass
    except (SQLAlchemyError, OSError) as exc:
        logger.warning("summing usage records for the console failed: %s", exc)
    finally:
        _rolling.discard(db.url)


def _grouped(connection: Connection, groups: tuple[Group, ...], account_id: str | None,
             since: str | None, until: str | None) -> list[Totals]:
    last = int(connection.execute(select(usage_rollup.c.last_id)
                                  .where(usage_rollup.c.id == 1)).scalar_one())
    rolled_columns = [usage_daily.c[name].label(name) for name in groups]
    where: list[ColumnElement[bool]] = []
    if account_id is not None:
        where.append(usage_daily.c.account_id == account_id)
    if since is not None:
        where.append(usage_daily.c.day >= since)
    if until is not None:
        where.append(usage_daily.c.day <= until)
    rolled = select(*rolled_columns, func.sum(usage_daily.c.requests).label("requests"),
                    *(func.sum(usage_daily.c[name]).label(name) for name in SUMS)
                    ).where(*where).group_by(*rolled_columns)
    # `usage_daily` changes only in a roll, which moves `last_id` in the same transaction
    # (on whichever gateway): the sums of the same question at the same `last_id` are the
    # same, so they are kept (a few hundred answers) instead of summed again at each page.
    version = (connection.engine.url.render_as_string(), last, groups, account_id, since,
               until)
    rolled_rows = _answers.get(version)
    if rolled_rows is None:
        rolled_rows = [tuple(row) for row in connection.execute(rolled)]
        _answers[version] = rolled_rows
        while len(_answers) > ANSWERS_KEPT:
            _answers.popitem(last=False)
    # The records not summed yet: found by id alone (and account), so that the database
    # reads that short id range, never the time index over every record; their days are
    # filtered here.
    day = _day(usage.c.created_at).label("day")
    fresh_columns = [day, *(usage.c[name].label(name) for name in groups if name != "day")]
    fresh_where: list[ColumnElement[bool]] = [usage.c.id > last]
    if account_id is not None:
        fresh_where.append(usage.c.account_id == account_id)
    fresh = select(*fresh_columns, func.count().label("requests"),
                   *(func.sum(usage.c[name]).label(name) for name in SUMS)
                   ).where(*fresh_where).group_by(*fresh_columns)
    merged: dict[tuple[str, ...], list[int]] = {}

    def add(key: tuple[str, ...], sums: list[int]) -> None:
        held = merged.get(key)
        merged[key] = sums if held is None else [a + b for a, b in zip(held, sums,
                                                                      strict=True)]

    width = len(groups)
    for values in rolled_rows:
        add(tuple(str(value) for value in values[:width]),
            [int(value or 0) for value in values[width:]])
    for row in connection.execute(fresh):
        if (since is not None and row.day < since) or (until is not None and row.day > until):
            continue
        add(tuple(str(getattr(row, name)) for name in groups),
            [int(row.requests or 0), *(int(getattr(row, name) or 0) for name in SUMS)])
    return [Totals(dict(zip(groups, key, strict=True)), *sums)
            for key, sums in merged.items()]


async def totals(db: Database, groups: tuple[Group, ...], *, account_id: str | None,
                 since: str | None = None, until: str | None = None) -> list[Totals]:
    """Sums per group (e.g. `("day", "model")`), days from `since` to `until` inclusive
    (YYYY-MM-DD, UTC), of one account or (None) every account; unordered."""
    return await db.read(_grouped, groups, account_id, since, until)
