"""Console sessions: an API key exchanged for a cookie, kept in the platform database.

Why a table and not a signed cookie: a row can be deleted (sign-out ends the session on
every gateway at once, not only in this browser), it needs no signing secret shared by the
gateways and kept across restarts, and it holds the session's CSRF token. The cookie holds
32 random bytes; the table only their SHA-256, so a copy of the database signs nobody in.

Every request reads the session joined with its key: a revoked or expired key, or an
expired session, is no session (the same check as a Bearer key, so revoking the key ends
the session at the next request). Expired rows are deleted when someone signs in.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, insert, select
from sqlalchemy.engine import Connection

from modelyard.platform.accounts import Account
from modelyard.platform.database import Database
from modelyard.platform.gate import Caller
from modelyard.platform.tables import accounts, api_keys, console_sessions, storable, utcnow

SESSION_HOURS = 12
COOKIE = "modelyard_session"
CSRF_HEADER = "x-csrf-token"


@dataclass(frozen=True)
class Session:
    """A signed-in browser: the key it signed in with, its account, its CSRF token."""

    key_id: str
    account_id: str
    account: str
    """The account's name."""
    csrf: str
    is_admin: bool
    models: frozenset[str] | None
    rpm: int | None
    tpm: int | None
    max_concurrent: int | None
    expires_at: datetime
    key_expires_at: datetime | None = None
    balance: Account | None = None
    """The account's money as read with the session (one query for both)."""

    def caller(self) -> Caller:
        """The caller of the API as the key itself would be."""
        return Caller(self.key_id, self.account_id, self.is_admin, self.models, self.rpm,
                      self.tpm, self.max_concurrent)

    def csrf_ok(self, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(token.encode(), self.csrf.encode())


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _create(connection: Connection, digest: str, caller: Caller, csrf: str,
            expires_at: datetime) -> None:
    now = utcnow()
    connection.execute(delete(console_sessions).where(console_sessions.c.expires_at < now))
    connection.execute(insert(console_sessions).values(
        id=digest, key_id=caller.key_id, account_id=caller.account_id, csrf=csrf,
        created_at=now, expires_at=expires_at))


async def create(db: Database, caller: Caller) -> tuple[str, datetime]:
    """A new session for an authenticated key: (the cookie's value, when it expires)."""
    token = secrets.token_urlsafe(32)
    expires_at = utcnow() + timedelta(hours=SESSION_HOURS)
    await db.write(_create, _digest(token), caller, secrets.token_urlsafe(32), expires_at)
    return token, expires_at


_FIND = select(console_sessions.c.key_id, console_sessions.c.account_id,
               console_sessions.c.csrf, console_sessions.c.expires_at,
               accounts.c.name.label("account"), accounts.c.balance, accounts.c.reserved,
               accounts.c.credited, accounts.c.spent,
               accounts.c.created_at.label("account_created_at"),
               api_keys.c.is_admin, api_keys.c.models,
               api_keys.c.rpm, api_keys.c.tpm, api_keys.c.max_concurrent,
               api_keys.c.expires_at.label("key_expires_at"), api_keys.c.revoked_at).select_from(
    console_sessions.join(api_keys, api_keys.c.id == console_sessions.c.key_id)
    .join(accounts, accounts.c.id == api_keys.c.account_id))


def _find(connection: Connection, digest: str) -> Session | None:
    row = connection.execute(_FIND.where(console_sessions.c.id == digest)).first()
    now = utcnow()
    if row is None or row.expires_at <= now or row.revoked_at is not None or (
            row.key_expires_at is not None and row.key_expires_at <= now):
        return None
    models = None if row.models is None else frozenset(json.loads(row.models))
    return Session(row.key_id, row.account_id, row.account, row.csrf, bool(row.is_admin),
                   models, row.rpm, row.tpm, row.max_concurrent, row.expires_at,
                   row.key_expires_at,
                   Account(row.account_id, row.account, row.balance, row.reserved,
                           row.credited, row.spent, row.account_created_at))


async def find(db: Database, token: str | None) -> Session | None:
    """The live session of a cookie's value, or None (unknown, expired, key revoked)."""
    if not token or not storable(token, 128, control=True):
        return None
    return await db.read(_find, _digest(token))


def _end(connection: Connection, digest: str) -> None:
    connection.execute(delete(console_sessions).where(console_sessions.c.id == digest))


async def end(db: Database, token: str) -> None:
    await db.write(_end, _digest(token))
