"""Accounts and API keys: what the admin API and the CLI do, and the key lookup of auth.

Both front ends call these functions, so they behave the same; errors are `AdminError`
with the HTTP status they map to.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from modelyard.platform import keys
from modelyard.platform.database import Database
from modelyard.platform.tables import accounts, api_keys, credits, utcnow

ADMIN_ACCOUNT = "admin"


class AdminError(Exception):
    """A refused admin operation: unknown account or key (404), a duplicate (409), bad input
    (422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    balance: int
    reserved: int
    credited: int
    spent: int
    created_at: datetime

    @property
    def available(self) -> int:
        return self.balance - self.reserved


@dataclass(frozen=True)
class KeyInfo:
    id: str
    account_id: str
    account: str
    name: str | None
    is_admin: bool
    models: tuple[str, ...] | None
    rpm: int | None
    tpm: int | None
    expires_at: datetime | None
    revoked_at: datetime | None
    created_at: datetime


@dataclass(frozen=True)
class CreatedKey:
    info: KeyInfo
    text: str
    """The key itself: shown once, never stored."""


@dataclass(frozen=True)
class KeyRecord:
    """What authentication needs to know about a key."""

    id: str
    account_id: str
    digest: str
    is_admin: bool
    models: frozenset[str] | None
    rpm: int | None
    tpm: int | None
    expires_at: datetime | None
    revoked: bool


def parse_when(value: str, *, what: str = "date") -> datetime:
    """`2027-01-31` or an ISO 8601 time (UTC unless it names its offset) -> naive UTC."""
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise AdminError(422, f"{what} is not an ISO date or time: {value!r}") from None
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    return when


def _account(row: Any) -> Account:
    return Account(row.id, row.name, row.balance, row.reserved, row.credited, row.spent,
                   row.created_at)


def _models(raw: str | None) -> tuple[str, ...] | None:
    return None if raw is None else tuple(json.loads(raw))


_KEY_COLUMNS = (api_keys.c.id, api_keys.c.account_id, accounts.c.name.label("account"),
                api_keys.c.name, api_keys.c.is_admin, api_keys.c.models, api_keys.c.rpm,
                api_keys.c.tpm, api_keys.c.expires_at, api_keys.c.revoked_at,
                api_keys.c.created_at)


def _key_info(row: Any) -> KeyInfo:
    return KeyInfo(row.id, row.account_id, row.account, row.name, bool(row.is_admin),
                   _models(row.models), row.rpm, row.tpm, row.expires_at, row.revoked_at,
                   row.created_at)


async def _account_by_name(connection: AsyncConnection, name: str) -> Account:
    row = (await connection.execute(select(accounts).where(accounts.c.name == name))).first()
    if row is None:
        raise AdminError(404, f"no account named {name!r}")
    return _account(row)


async def create_account(db: Database, name: str, balance: int = 0) -> Account:
    name = name.strip()
    if not name or len(name) > 200:
        raise AdminError(422, "an account name must be 1 to 200 characters")
    if balance < 0:
        raise AdminError(422, "the balance must not be negative")
    account_id = f"acct_{secrets.token_hex(8)}"
    now = utcnow()
    try:
        async with db.begin() as connection:
            await connection.execute(insert(accounts).values(
                id=account_id, name=name, balance=balance, reserved=0, credited=balance,
                spent=0, created_at=now))
            if balance:
                await connection.execute(insert(credits).values(
                    account_id=account_id, amount=balance, note="initial balance",
                    created_at=now))
    except IntegrityError:
        raise AdminError(409, f"an account named {name!r} already exists") from None
    return Account(account_id, name, balance, 0, balance, 0, now)


async def top_up(db: Database, name: str, amount: int, note: str = "top-up") -> Account:
    if amount <= 0:
        raise AdminError(422, "a top-up must be a positive amount")
    async with db.begin() as connection:
        result = await connection.execute(
            update(accounts).where(accounts.c.name == name)
            .values(balance=accounts.c.balance + amount, credited=accounts.c.credited + amount)
            .returning(accounts.c.id))
        account_id = result.scalar_one_or_none()
        if account_id is None:
            raise AdminError(404, f"no account named {name!r}")
        await connection.execute(insert(credits).values(
            account_id=account_id, amount=amount, note=note, created_at=utcnow()))
        return await _account_by_name(connection, name)


async def get_account(db: Database, name: str) -> Account:
    async with db.read() as connection:
        return await _account_by_name(connection, name)


async def list_accounts(db: Database) -> list[Account]:
    async with db.read() as connection:
        rows = await connection.execute(select(accounts).order_by(accounts.c.created_at))
        return [_account(row) for row in rows]


async def create_key(db: Database, account: str, *, models: list[str] | None = None,
                     rpm: int | None = None, tpm: int | None = None,
                     expires_at: datetime | None = None, name: str | None = None,
                     is_admin: bool = False) -> CreatedKey:
    if rpm is not None and rpm < 1:
        raise AdminError(422, "rpm must be at least 1")
    if tpm is not None and tpm < 1:
        raise AdminError(422, "tpm must be at least 1")
    if models is not None:
        models = sorted({m.strip() for m in models if m.strip()})
        if not models:
            raise AdminError(422, "models must name at least one model")
    async with db.begin() as connection:
        owner = await _account_by_name(connection, account)
        created = keys.new_key()
        now = utcnow()
        await connection.execute(insert(api_keys).values(
            id=created.id, account_id=owner.id, digest=created.digest, name=name,
            is_admin=is_admin, models=None if models is None else json.dumps(models),
            rpm=rpm, tpm=tpm, expires_at=expires_at, revoked_at=None, created_at=now))
    info = KeyInfo(created.id, owner.id, owner.name, name, is_admin,
                   None if models is None else tuple(models), rpm, tpm, expires_at, None, now)
    return CreatedKey(info, created.text)


async def list_keys(db: Database, account: str | None = None) -> list[KeyInfo]:
    query = select(*_KEY_COLUMNS).join(accounts, accounts.c.id == api_keys.c.account_id)
    if account is not None:
        query = query.where(accounts.c.name == account)
    async with db.read() as connection:
        rows = await connection.execute(query.order_by(api_keys.c.created_at, api_keys.c.id))
        return [_key_info(row) for row in rows]


async def revoke_key(db: Database, key_id: str) -> KeyInfo:
    async with db.begin() as connection:
        await connection.execute(
            update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
            .values(revoked_at=utcnow()))
        row = (await connection.execute(
            select(*_KEY_COLUMNS).join(accounts, accounts.c.id == api_keys.c.account_id)
            .where(api_keys.c.id == key_id))).first()
    if row is None:
        raise AdminError(404, f"no key with id {key_id!r}")
    return _key_info(row)


_AUTH_QUERY = select(api_keys.c.id, api_keys.c.account_id, api_keys.c.digest,
                     api_keys.c.is_admin, api_keys.c.models, api_keys.c.rpm, api_keys.c.tpm,
                     api_keys.c.expires_at, api_keys.c.revoked_at)


async def find_key(db: Database, key_id: str) -> KeyRecord | None:
    async with db.read() as connection:
        row = (await connection.execute(_AUTH_QUERY.where(api_keys.c.id == key_id))).first()
    if row is None:
        return None
    models = _models(row.models)
    return KeyRecord(row.id, row.account_id, row.digest, bool(row.is_admin),
                     None if models is None else frozenset(models), row.rpm, row.tpm,
                     row.expires_at, row.revoked_at is not None)


async def bootstrap_admin(db: Database) -> str | None:
    """On a database without any admin key: create the `admin` account and a key for it.

    Returns the key (to print once), or None when an admin key already exists. Runs under
    the setup lock, so gateways starting together on an empty database create one key.
    """
    async with db.exclusive() as connection:
        existing = await connection.execute(
            select(func.count()).select_from(api_keys).where(api_keys.c.is_admin))
        if existing.scalar_one():
            return None
        row = (await connection.execute(
            select(accounts.c.id).where(accounts.c.name == ADMIN_ACCOUNT))).first()
        now = utcnow()
        if row is None:
            account_id = f"acct_{secrets.token_hex(8)}"
            await connection.execute(insert(accounts).values(
                id=account_id, name=ADMIN_ACCOUNT, balance=0, reserved=0, credited=0, spent=0,
                created_at=now))
        else:
            account_id = row.id
        created = keys.new_key()
        await connection.execute(insert(api_keys).values(
            id=created.id, account_id=account_id, digest=created.digest, name="admin",
            is_admin=True, models=None, rpm=None, tpm=None, expires_at=None, revoked_at=None,
            created_at=now))
        return created.text
