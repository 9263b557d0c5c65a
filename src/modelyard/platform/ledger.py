"""Reserve, then settle: the only code that moves money.

- `reserve`: one conditional UPDATE (`balance - reserved >= amount`) holds a request's
  maximum cost; the database serializes concurrent reservations on the account's row, so
  no interleaving of requests, threads or gateways can hold more than the balance.
- `settle`: deletes the reservation, charges the real cost, releases the rest and writes
  the usage record, in one transaction. The DELETE decides who releases a reservation: the
  sweeper never releases one that was settled. A cost above the reservation (an estimate
  that fell short, or a reservation the sweeper released) is charged from the account's
  free balance as far as it goes: a balance never goes below zero, and what it could not
  cover is recorded as `uncollected` on the usage record, never dropped silently.
- The usage record cannot undo the charge: it is written in a savepoint, and one the
  database refuses (a `user` too long for its column, a NUL) is written again without its
  optional fields, marked `degraded`.
- A settlement retried after a failure whose commit went unseen finds its own usage
  record (by `settlement_id`) and does nothing: a request is charged once.
- `release_expired`: the sweeper. A reservation carries an expiry that its gateway keeps
  pushing forward (`extend`) while the request runs; one left by a crashed gateway
  expires and is released here, by whichever gateway sweeps first.

Invariants: `0 <= reserved <= balance`, and `balance == credited - spent` where `spent` is
the sum of every usage record's `cost`.
"""

from __future__ import annotations

import logging
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.engine import Connection

from modelyard.platform.database import Database
from modelyard.platform.sqlite_fast import RawConnection
from modelyard.platform.tables import accounts, reservations, storable, usage, utcnow
from modelyard.usage import Usage

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsageRecord:
    """One request's line in the ledger, before its cost is settled."""

    key_id: str
    account_id: str
    model: str
    user: str | None
    usage: Usage
    cost: int
    """The real cost in micro-units; the charge is capped at what the account can cover."""
    latency_s: float
    ttft_s: float | None
    status: int
    client_disconnected: bool = False
    settlement_id: str = field(default_factory=lambda: os.urandom(16).hex())
    """Names this settlement in the ledger, so that a retry of it charges nothing twice."""


@dataclass(frozen=True)
class Settlement:
    """What a settlement did."""

    charged: int
    uncollected: int = 0
    """Cost the account could not cover, in micro-units."""
    degraded: bool = False
    """The usage record was written without its optional fields."""
    recorded: bool = True
    """False only when not even the reduced usage record could be written."""
    already: bool = False
    """A retry that found the settlement already done (its first try had committed)."""


_HOLD = (update(accounts)
         .where(accounts.c.id == bindparam("account"),
                accounts.c.balance - accounts.c.reserved >= bindparam("amount"))
         .values(reserved=accounts.c.reserved + bindparam("amount")))
_NEW_RESERVATION = insert(reservations)
_TAKE_RESERVATION = (delete(reservations).where(reservations.c.id == bindparam("reservation"))
                     .returning(reservations.c.amount))
_CHARGE_HELD = (update(accounts).where(accounts.c.id == bindparam("account"))
                .values(balance=accounts.c.balance - bindparam("charge"),
                        reserved=accounts.c.reserved - bindparam("held"),
                        spent=accounts.c.spent + bindparam("charge")))
_AVAILABLE = (select((accounts.c.balance - accounts.c.reserved).label("available"))
              .where(accounts.c.id == bindparam("account")).with_for_update())
_CHARGE_FREE = (update(accounts)
                .where(accounts.c.id == bindparam("account"),
                       accounts.c.balance - accounts.c.reserved >= bindparam("charge"))
                .values(balance=accounts.c.balance - bindparam("charge"),
                        spent=accounts.c.spent + bindparam("charge")))
_SETTLED = (select(usage.c.cost, usage.c.uncollected)
            .where(usage.c.settlement_id == bindparam("settlement")))
_RECORD = insert(usage)
USER_MAX = 256
"""The usage record's `user` column."""
MODEL_MAX = 200
_EXTEND = (update(reservations).where(reservations.c.id.in_(bindparam("ids", expanding=True)))
           .values(expires_at=bindparam("until")))


def _reserve(connection: Connection | RawConnection, account_id: str, key_id: str, amount: int,
             ttl_s: float) -> str | None:
    held = connection.execute(_HOLD, {"account": account_id, "amount": amount})
    if held.rowcount != 1:
        return None
    reservation_id = os.urandom(16).hex()
    now = utcnow()
    connection.execute(_NEW_RESERVATION, {
        "id": reservation_id, "account_id": account_id, "key_id": key_id, "amount": amount,
        "expires_at": now + timedelta(seconds=ttl_s), "created_at": now})
    return reservation_id


async def reserve(db: Database, account_id: str, key_id: str, amount: int,
                  ttl_s: float) -> str | None:
    """Hold `amount` of the account's balance; the reservation id, or None if it can't."""
    return await db.hot_write(_reserve, account_id, key_id, amount, ttl_s, relaxed=True)


def _settle(connection: Connection | RawConnection, reservation_id: str | None,
            record: UsageRecord, retry: bool) -> Settlement:
    if retry:
        done = connection.execute(_SETTLED, {"settlement": record.settlement_id}).first()
        if done is not None:
            return Settlement(int(done.cost), int(done.uncollected), already=True)
    held: int | None = None
    if reservation_id is not None:
        held = connection.execute(_TAKE_RESERVATION,
                                  {"reservation": reservation_id}).scalar_one_or_none()
    charged = 0
    if held is not None:
        charged = min(record.cost, held)
        connection.execute(_CHARGE_HELD, {"account": record.account_id, "charge": charged,
                                          "held": held})
    if record.cost > charged:
        # More than was held (an estimate that fell short), or nothing held (free at
        # admission, or released by the sweeper after its gateway stalled past the
        # expiry): the rest comes from the free balance, as far as it goes. The row is
        # locked (FOR UPDATE; SQLite's write lock), so what was read is what is charged.
        available = connection.execute(
            _AVAILABLE, {"account": record.account_id}).scalar_one_or_none()
        extra = min(record.cost - charged, max(int(available or 0), 0))
        if extra > 0:
            connection.execute(_CHARGE_FREE, {"account": record.account_id, "charge": extra})
            charged += extra
    uncollected = record.cost - charged
    if uncollected:
        logger.warning("usage of key %s cost %d, %d more than its account could cover",
                       record.key_id, record.cost, uncollected)
    degraded, recorded = _record(connection, _usage_row(record, charged, held, uncollected))
    return Settlement(charged, uncollected, degraded, recorded)


def _usage_row(record: UsageRecord, charged: int, held: int | None,
               uncollected: int) -> dict[str, Any]:
    return {
        "created_at": utcnow(), "key_id": record.key_id, "account_id": record.account_id,
        "model": record.model, "user": record.user, **record.usage.as_json(),
        "cost": charged, "reserved": held or 0,
        "latency_ms": record.latency_s * 1000,
        "ttft_ms": None if record.ttft_s is None else record.ttft_s * 1000,
        "status": record.status, "estimated": record.usage.estimated,
        "client_disconnected": record.client_disconnected,
        "settlement_id": record.settlement_id, "uncollected": uncollected, "degraded": False}


@contextmanager
def _savepoint(connection: Connection | RawConnection) -> Iterator[None]:
    if isinstance(connection, RawConnection):
        with connection.savepoint():
            yield
    else:
        with connection.begin_nested():
            yield


def _record(connection: Connection | RawConnection, row: dict[str, Any]) -> tuple[bool, bool]:
    """Write the usage row without ever undoing the charge before it: (degraded, written).

    A `user` the column cannot hold is left out up front; any other refusal of the row
    is undone alone (a savepoint) and the row written again with only what the ledger
    needs. A connection that broke fails the whole transaction, charge included, which
    its caller retries."""
    degraded = row["user"] is not None and not storable(row["user"], USER_MAX)
    if degraded:
        row = {**row, "user": None, "degraded": True}
    try:
        with _savepoint(connection):
            connection.execute(_RECORD, row)
        return degraded, True
    except Exception as exc:  # whatever the row's fault, the money stands
        logger.warning("usage record of key %s refused (%s); writing it without its "
                       "optional fields", row["key_id"], exc)
    latency = float(row["latency_ms"])
    reduced = {**row, "user": None, "ttft_ms": None, "degraded": True,
               "model": "".join(c for c in row["model"][:MODEL_MAX] if c.isprintable()),
               "latency_ms": latency if math.isfinite(latency) else 0.0}
    try:
        with _savepoint(connection):
            connection.execute(_RECORD, reduced)
        return True, True
    except Exception:
        logger.exception("usage record of key %s could not be written; its charge of %d "
                         "stands", row["key_id"], row["cost"])
        return True, False


async def settle(db: Database, reservation_id: str | None, record: UsageRecord, *,
                 retry: bool = False) -> Settlement:
    """Charge the real cost, release the reservation, write the usage row. `retry`: an
    earlier try may have committed unseen; if it did, do nothing again."""
    return await db.hot_write(_settle, reservation_id, record, retry)


def _extend(connection: Connection, ids: list[str], ttl_s: float) -> None:
    until = utcnow() + timedelta(seconds=ttl_s)
    for start in range(0, len(ids), 500):
        connection.execute(_EXTEND, {"ids": ids[start:start + 500], "until": until})


async def extend(db: Database, reservation_ids: Iterable[str], ttl_s: float) -> None:
    """Push the expiry of running requests' reservations forward (the gateway is alive)."""
    ids = list(reservation_ids)
    if ids:
        await db.write_relaxed(_extend, ids, ttl_s)


def _release_expired(connection: Connection, now: datetime) -> int:
    expired = (select(reservations.c.id).where(reservations.c.expires_at < now)
               .with_for_update(skip_locked=True).scalar_subquery())
    released = connection.execute(
        delete(reservations).where(reservations.c.id.in_(expired))
        .returning(reservations.c.account_id, reservations.c.amount)).all()
    per_account: dict[str, int] = defaultdict(int)
    for account_id, amount in released:
        per_account[account_id] += amount
    for account_id in sorted(per_account):  # one lock order for every sweeper
        connection.execute(update(accounts).where(accounts.c.id == account_id)
                           .values(reserved=accounts.c.reserved - per_account[account_id]))
    return len(released)


async def release_expired(db: Database, now: datetime | None = None) -> int:
    """Release every reservation whose expiry has passed; how many were released."""
    released = await db.write(_release_expired, now or utcnow())
    if released:
        logger.info("released %d expired reservation(s)", released)
    return released


def _purge_usage(connection: Connection, before: datetime) -> int:
    return int(connection.execute(delete(usage).where(usage.c.created_at < before)).rowcount)


async def purge_usage(db: Database, before: datetime) -> int:
    """Delete usage records older than `before` (retention); how many were deleted."""
    return await db.write(_purge_usage, before)
