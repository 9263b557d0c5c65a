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

from sqlalchemy import bindparam, func, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from modelyard.errors import Refusal
from modelyard.platform import keys
from modelyard.platform.database import Database
from modelyard.platform.money import MAX_AMOUNT_MICROS, MAX_CREDITED_MICROS, format_micros
from modelyard.platform.sqlite_fast import RawConnection
from modelyard.platform.tables import accounts, api_keys, credits, storable, utcnow

ADMIN_ACCOUNT = "admin"
MAX_LIMIT = 2**31 - 1
MIN_WEIGHT, MAX_WEIGHT = 0.01, 1000.0
"""Bounds of an account's fair-share weight (1 is the default)."""
MAX_PRIORITY = 100
"""The largest RPM or TPM a key may have (a 32-bit column)."""
NAME_MAX = 200
"""Account, key and model names (their columns)."""


class AdminError(Refusal):
    """A refused admin operation: unknown account or key (404), a duplicate (409), bad input
    (422)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(status, message,
                         code={404: "not_found", 409: "conflict"}.get(status, "invalid_value"))


@dataclass(frozen=True)
class Account:
    id: str
    name: str
    balance: int
    reserved: int
    credited: int
    spent: int
    created_at: datetime
    weight: float = 1.0
    """Its share of the built-in engines' slots and prefill against other accounts'."""

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
    max_concurrent: int | None = None
    """Requests in flight at once; None: the configured default."""
    priority: int = 0
    """Its requests' place among its account's waiting for an engine (higher first)."""


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
    max_concurrent: int | None = None
    priority: int = 0
    weight: float = 1.0
    """Its account's weight."""


def parse_when(value: str, *, what: str = "date") -> datetime:
    """`2027-01-31` or an ISO 8601 time (UTC unless it names its offset) -> naive UTC."""
    try:
        when = datetime.fromisoformat(value.strip())
    except ValueError:
        raise AdminError(422, f"{what} is not an ISO date or time: {value!r}") from None
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    return when


def _text(value: str, what: str) -> str:
    """A name to store: 1 to NAME_MAX characters, no control characters (422)."""
    value = value.strip()
    if not value or not storable(value, NAME_MAX, control=True):
        raise AdminError(422, f"{what} must be 1 to {NAME_MAX} characters, none of them "
                              "control characters")
    return value


def known_name(name: str) -> str:
    """A name to look up: one that could never have been stored names nothing (404),
    without asking a database that might refuse the text itself (PostgreSQL and NUL)."""
    if not storable(name, NAME_MAX, control=True):
        raise AdminError(404, f"no account named {name[:NAME_MAX]!r}")
    return name


def _known_key(key_id: str) -> str:
    if len(key_id) != keys.ID_LENGTH or not storable(key_id, keys.ID_LENGTH, control=True):
        raise AdminError(404, f"no key with id {key_id[:2 * keys.ID_LENGTH]!r}")
    return key_id


def _account(row: Any) -> Account:
    return Account(row.id, row.name, row.balance, row.reserved, row.credited, row.spent,
                   row.created_at, _weight(row.weight))


def _weight(value: float | None) -> float:
    return 1.0 if value is None else float(value)


def _models(raw: str | None) -> tuple[str, ...] | None:
    return None if raw is None else tuple(json.loads(raw))


_KEY_COLUMNS = (api_keys.c.id, api_keys.c.account_id, accounts.c.name.label("account"),
                api_keys.c.name, api_keys.c.is_admin, api_keys.c.models, api_keys.c.rpm,
                api_keys.c.tpm, api_keys.c.expires_at, api_keys.c.revoked_at,
                api_keys.c.created_at, api_keys.c.max_concurrent, api_keys.c.priority)


def _key_info(row: Any) -> KeyInfo:
    return KeyInfo(row.id, row.account_id, row.account, row.name, bool(row.is_admin),
                   _models(row.models), row.rpm, row.tpm, row.expires_at, row.revoked_at,
                   row.created_at, row.max_concurrent, row.priority or 0)


def _account_by_name(connection: Connection, name: str) -> Account:
    row = connection.execute(select(accounts).where(accounts.c.name == name)).first()
    if row is None:
        raise AdminError(404, f"no account named {name!r}")
    return _account(row)


def _new_account(connection: Connection, name: str, balance: int,
                 weight: float | None = None) -> Account:
    account_id = f"acct_{secrets.token_hex(8)}"
    now = utcnow()
    connection.execute(insert(accounts).values(
        id=account_id, name=name, balance=balance, reserved=0, credited=balance, spent=0,
        created_at=now, weight=weight))
    if balance:
        connection.execute(insert(credits).values(
            account_id=account_id, amount=balance, note="initial balance", created_at=now))
    return Account(account_id, name, balance, 0, balance, 0, now, _weight(weight))


def _check_weight(weight: float) -> None:
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        raise AdminError(422, f"the weight must be between {MIN_WEIGHT:g} and {MAX_WEIGHT:g}")


async def create_account(db: Database, name: str, balance: int = 0,
                         weight: float | None = None) -> Account:
    name = _text(name, "an account name")
    if weight is not None:
        _check_weight(weight)
    if balance < 0:
        raise AdminError(422, "the balance must not be negative")
    if balance > MAX_AMOUNT_MICROS:
        raise AdminError(422, f"the balance must be at most {format_micros(MAX_AMOUNT_MICROS)}")
    try:
        return await db.write(_new_account, name, balance, weight)
    except IntegrityError:
        raise AdminError(409, f"an account named {name!r} already exists") from None


def _top_up(connection: Connection, name: str, amount: int, note: str) -> Account:
    # Bounded in the statement itself (no sum computed that could overflow the column):
    # concurrent top-ups cannot carry a balance past the bound between a check and a write.
    account_id = connection.execute(
        update(accounts).where(accounts.c.name == name,
                               accounts.c.balance <= MAX_AMOUNT_MICROS - amount,
                               accounts.c.credited <= MAX_CREDITED_MICROS - amount)
        .values(balance=accounts.c.balance + amount, credited=accounts.c.credited + amount)
        .returning(accounts.c.id)).scalar_one_or_none()
    if account_id is None:
        _account_by_name(connection, name)  # 404 when there is no such account
        raise AdminError(422, f"this top-up would take the account's balance past "
                              f"{format_micros(MAX_AMOUNT_MICROS)}")
    connection.execute(insert(credits).values(
        account_id=account_id, amount=amount, note=note, created_at=utcnow()))
    return _account_by_name(connection, name)


async def top_up(db: Database, name: str, amount: int, note: str = "top-up") -> Account:
    if amount <= 0:
        raise AdminError(422, "a top-up must be a positive amount")
    if amount > MAX_AMOUNT_MICROS:
        raise AdminError(422, f"a top-up must be at most {format_micros(MAX_AMOUNT_MICROS)}")
    return await db.write(_top_up, known_name(name), amount, _text(note, "a note"))


def _set_weight(connection: Connection, name: str, weight: float) -> Account:
    connection.execute(update(accounts).where(accounts.c.name == name).values(weight=weight))
    return _account_by_name(connection, name)


async def set_weight(db: Database, name: str, weight: float) -> Account:
    """Change an account's fair-share weight; its keys take it once their cached lookup
    expires (`key_cache_seconds`)."""
    _check_weight(weight)
    return await db.write(_set_weight, known_name(name), weight)


async def get_account(db: Database, name: str) -> Account:
    return await db.read(_account_by_name, known_name(name))


def _list_accounts(connection: Connection) -> list[Account]:
    rows = connection.execute(select(accounts).order_by(accounts.c.created_at, accounts.c.id))
    return [_account(row) for row in rows]


async def list_accounts(db: Database) -> list[Account]:
    return await db.read(_list_accounts)


def _new_key(connection: Connection, account: str, models: list[str] | None, rpm: int | None,
             tpm: int | None, expires_at: datetime | None, name: str | None,
             is_admin: bool, max_concurrent: int | None = None,
             priority: int | None = None) -> CreatedKey:
    owner = _account_by_name(connection, account)
    created = keys.new_key()
    now = utcnow()
    connection.execute(insert(api_keys).values(
        id=created.id, account_id=owner.id, digest=created.digest, name=name,
        is_admin=is_admin, models=None if models is None else json.dumps(models), rpm=rpm,
        tpm=tpm, max_concurrent=max_concurrent, priority=priority, expires_at=expires_at,
        revoked_at=None, created_at=now))
    info = KeyInfo(created.id, owner.id, owner.name, name, is_admin,
                   None if models is None else tuple(models), rpm, tpm, expires_at, None, now,
                   max_concurrent, priority or 0)
    return CreatedKey(info, created.text)


async def create_key(db: Database, account: str, *, models: list[str] | None = None,
                     rpm: int | None = None, tpm: int | None = None,
                     expires_at: datetime | None = None, name: str | None = None,
                     is_admin: bool = False, max_concurrent: int | None = None,
                     priority: int | None = None) -> CreatedKey:
    for what, limit in (("rpm", rpm), ("tpm", tpm), ("max_concurrent", max_concurrent)):
        if limit is not None and not 1 <= limit <= MAX_LIMIT:
            raise AdminError(422, f"{what} must be between 1 and {MAX_LIMIT}")
    if models is not None:
        models = sorted({_text(m, "a model id") for m in models if m.strip()})
        if not models:
            raise AdminError(422, "models must name at least one model")
    if name is not None:
        name = _text(name, "a key name") if name.strip() else None
    if priority is not None and not -MAX_PRIORITY <= priority <= MAX_PRIORITY:
        raise AdminError(422, f"priority must be between {-MAX_PRIORITY} and {MAX_PRIORITY}")
    return await db.write(_new_key, known_name(account), models, rpm, tpm, expires_at, name,
                          is_admin, max_concurrent, priority)


def _keys(connection: Connection, account: str | None, key_id: str | None) -> list[KeyInfo]:
    query = select(*_KEY_COLUMNS).join(accounts, accounts.c.id == api_keys.c.account_id)
    if account is not None:
        query = query.where(accounts.c.name == account)
    if key_id is not None:
        query = query.where(api_keys.c.id == key_id)
    rows = connection.execute(query.order_by(api_keys.c.created_at, api_keys.c.id))
    return [_key_info(row) for row in rows]


async def list_keys(db: Database, account: str | None = None) -> list[KeyInfo]:
    if account is not None and not storable(account, NAME_MAX, control=True):
        return []
    return await db.read(_keys, account, None)


def _revoke(connection: Connection, key_id: str) -> KeyInfo:
    connection.execute(
        update(api_keys).where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
        .values(revoked_at=utcnow()))
    found = _keys(connection, None, key_id)
    if not found:
        raise AdminError(404, f"no key with id {key_id!r}")
    return found[0]


async def revoke_key(db: Database, key_id: str) -> KeyInfo:
    return await db.write(_revoke, _known_key(key_id))


_AUTH_QUERY = select(api_keys.c.id, api_keys.c.account_id, api_keys.c.digest,
                     api_keys.c.is_admin, api_keys.c.models, api_keys.c.rpm, api_keys.c.tpm,
                     api_keys.c.expires_at, api_keys.c.revoked_at,
                     api_keys.c.max_concurrent, api_keys.c.priority, accounts.c.weight).join(
    accounts, accounts.c.id == api_keys.c.account_id).where(
    api_keys.c.id == bindparam("key_id"))


def _find_key(connection: Connection | RawConnection, key_id: str) -> KeyRecord | None:
    row = connection.execute(_AUTH_QUERY, {"key_id": key_id}).first()
    if row is None:
        return None
    models = _models(row.models)
    return KeyRecord(row.id, row.account_id, row.digest, bool(row.is_admin),
                     None if models is None else frozenset(models), row.rpm, row.tpm,
                     row.expires_at, row.revoked_at is not None, row.max_concurrent,
                     row.priority or 0, _weight(row.weight))


async def find_key(db: Database, key_id: str) -> KeyRecord | None:
    return await db.hot_read(_find_key, key_id)


def _bootstrap_admin(connection: Connection) -> str | None:
    existing = connection.execute(
        select(func.count()).select_from(api_keys).where(api_keys.c.is_admin)).scalar_one()
    if existing:
        return None
    row = connection.execute(
        select(accounts.c.id).where(accounts.c.name == ADMIN_ACCOUNT)).first()
    account_id = row.id if row is not None else _new_account(connection, ADMIN_ACCOUNT, 0).id
    created = keys.new_key()
    connection.execute(insert(api_keys).values(
        id=created.id, account_id=account_id, digest=created.digest, name="admin",
        is_admin=True, models=None, rpm=None, tpm=None, expires_at=None, revoked_at=None,
        created_at=utcnow()))
    return created.text


async def bootstrap_admin(db: Database) -> str | None:
    """On a database without any admin key: create the `admin` account and a key for it.

    Returns the key (to print once), or None when an admin key already exists. Runs under
    the setup lock, so gateways starting together on an empty database create one key.
    """
    return await db.exclusive(_bootstrap_admin)
