"""The console's reads and writes that `platform/accounts.py` and `usage.py` do not have:
each scoped by the signed-in account's id (None only on operator pages), paginated."""

from __future__ import annotations

from sqlalchemy import select, update
from sqlalchemy.engine import Connection

from modelyard.platform import accounts as ops
from modelyard.platform.accounts import Account, KeyInfo
from modelyard.platform.database import Database
from modelyard.platform.tables import accounts, api_keys, storable, usage, utcnow
from modelyard.platform.usage import UsageRow, _usage

LOG_PAGE = 50


def _account(connection: Connection, account_id: str) -> Account | None:
    row = connection.execute(select(accounts).where(accounts.c.id == account_id)).first()
    return None if row is None else ops._account(row)


async def account(db: Database, account_id: str) -> Account | None:
    return await db.read(_account, account_id)


def _keys(connection: Connection, account_id: str | None, key_id: str | None) -> list[KeyInfo]:
    query = select(*ops._KEY_COLUMNS).join(accounts, accounts.c.id == api_keys.c.account_id)
    if account_id is not None:
        query = query.where(api_keys.c.account_id == account_id)
    if key_id is not None:
        query = query.where(api_keys.c.id == key_id)
    rows = connection.execute(query.order_by(api_keys.c.created_at.desc(),
                                             api_keys.c.id).limit(1000))
    return [ops._key_info(row) for row in rows]


async def keys(db: Database, account_id: str | None) -> list[KeyInfo]:
    """The account's keys (every key for None), newest first, at most 1000."""
    return await db.read(_keys, account_id, None)


def _revoke(connection: Connection, key_id: str, account_id: str | None) -> KeyInfo | None:
    statement = update(api_keys).where(api_keys.c.id == key_id,
                                       api_keys.c.revoked_at.is_(None))
    if account_id is not None:
        statement = statement.where(api_keys.c.account_id == account_id)
    connection.execute(statement.values(revoked_at=utcnow()))
    found = _keys(connection, account_id, key_id)
    return found[0] if found else None


async def revoke(db: Database, key_id: str, account_id: str | None) -> KeyInfo | None:
    """Revoke a key of the account (any key for None); None when it has no such key."""
    if not storable(key_id, 12, control=True):
        return None
    return await db.write(_revoke, key_id, account_id)


def _records(connection: Connection, account_id: str | None, before: int | None,
             limit: int) -> list[UsageRow]:
    query = select(usage)
    if account_id is not None:
        query = query.where(usage.c.account_id == account_id)
    if before is not None:
        query = query.where(usage.c.id < before)
    rows = connection.execute(query.order_by(usage.c.id.desc()).limit(limit)).all()
    return [UsageRow(row.id, row.created_at, row.key_id, row.account_id, row.model, row.user,
                     _usage(row, bool(row.estimated)), row.cost, row.reserved, row.latency_ms,
                     row.ttft_ms, row.status, bool(row.client_disconnected),
                     int(row.uncollected), bool(row.degraded))
            for row in rows]


async def records(db: Database, account_id: str | None, before: int | None = None,
                  limit: int = LOG_PAGE) -> list[UsageRow]:
    """Usage records newest first, those with ids below `before` (keyset pagination: a
    page costs the same however deep)."""
    return await db.read(_records, account_id, before, limit)
