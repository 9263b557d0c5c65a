"""Reading the usage ledger: totals by day, model, key or account, and single records."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import String, cast, func, select
from sqlalchemy.engine import Connection, Row
from sqlalchemy.sql.elements import ColumnElement

from modelyard.platform.accounts import AdminError, known_name
from modelyard.platform.database import Database
from modelyard.platform.tables import accounts, storable, usage
from modelyard.usage import Usage

KEY_ID_MAX = 12
Grouping = Literal["day", "model", "key", "account"]
GROUPINGS: tuple[Grouping, ...] = ("day", "model", "key", "account")


@dataclass(frozen=True)
class UsageTotals:
    group: str
    requests: int
    usage: Usage
    """The sums of the group's requests."""
    cost: int
    uncollected: int = 0
    """Cost the accounts could not cover (micro-units), beside the `cost` charged."""


@dataclass(frozen=True)
class UsageRow:
    id: int
    created_at: datetime
    key_id: str
    account_id: str
    model: str
    user: str | None
    usage: Usage
    cost: int
    reserved: int
    latency_ms: float
    ttft_ms: float | None
    status: int
    client_disconnected: bool
    uncollected: int = 0
    degraded: bool = False


def _filters(since: datetime | None, account_id: str | None,
             key_id: str | None = None) -> list[ColumnElement[bool]]:
    where: list[ColumnElement[bool]] = []
    if since is not None:
        where.append(usage.c.created_at >= since)
    if account_id is not None:
        where.append(usage.c.account_id == account_id)
    if key_id is not None:
        where.append(usage.c.key_id == key_id)
    return where


def _account_id(connection: Connection, name: str | None) -> str | None:
    if name is None:
        return None
    found = connection.execute(
        select(accounts.c.id).where(accounts.c.name == known_name(name))).scalar_one_or_none()
    if found is None:
        raise AdminError(404, f"no account named {name!r}")
    return str(found)


async def totals(db: Database, by: Grouping = "day", *, since: datetime | None = None,
                 account: str | None = None) -> list[UsageTotals]:
    """Requests, tokens and cost per group, oldest day / largest cost first."""
    return await db.read(_totals, by, since, account)


def _totals(connection: Connection, by: Grouping, since: datetime | None,
            account: str | None) -> list[UsageTotals]:
    account_id = _account_id(connection, account)
    group: Any
    if by == "day":
        group = cast(func.date(usage.c.created_at), String)
    elif by == "model":
        group = usage.c.model
    elif by == "key":
        group = usage.c.key_id
    else:
        group = accounts.c.name
    query = select(
        group.label("group"), func.count().label("requests"),
        func.coalesce(func.sum(usage.c.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(usage.c.cached_tokens), 0).label("cached_tokens"),
        func.coalesce(func.sum(usage.c.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(usage.c.reasoning_tokens), 0).label("reasoning_tokens"),
        func.coalesce(func.sum(usage.c.cost), 0).label("cost"),
        func.coalesce(func.sum(usage.c.uncollected), 0).label("uncollected"),
    ).where(*_filters(since, account_id)).group_by(group)
    if by == "account":
        query = query.select_from(usage.join(accounts, accounts.c.id == usage.c.account_id))
    query = query.order_by(group if by == "day" else func.sum(usage.c.cost).desc(), group)
    rows = connection.execute(query).all()
    return [UsageTotals(str(row.group), int(row.requests), _usage(row), int(row.cost),
                        int(row.uncollected))
            for row in rows]


async def records(db: Database, *, account: str | None = None, key_id: str | None = None,
                  since: datetime | None = None, limit: int = 100) -> list[UsageRow]:
    """The newest usage records first."""
    return await db.read(_records, account, key_id, since, limit)


def _records(connection: Connection, account: str | None, key_id: str | None,
             since: datetime | None, limit: int) -> list[UsageRow]:
    account_id = _account_id(connection, account)
    if key_id is not None and not storable(key_id, KEY_ID_MAX, control=True):
        return []  # no key has such an id (and PostgreSQL would refuse the text)
    query = (select(usage).where(*_filters(since, account_id, key_id))
             .order_by(usage.c.id.desc()).limit(limit))
    rows = connection.execute(query).all()
    return [UsageRow(row.id, row.created_at, row.key_id, row.account_id, row.model, row.user,
                     _usage(row, bool(row.estimated)), row.cost, row.reserved, row.latency_ms,
                     row.ttft_ms, row.status, bool(row.client_disconnected),
                     int(row.uncollected), bool(row.degraded))
            for row in rows]


def _usage(row: Row[Any], estimated: bool = False) -> Usage:
    return Usage(int(row.prompt_tokens), int(row.cached_tokens), int(row.completion_tokens),
                 int(row.reasoning_tokens), estimated)
