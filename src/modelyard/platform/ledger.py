"""Reserve, then settle: the only code that moves money.

- `reserve`: one conditional UPDATE (`balance - reserved >= amount`) holds a request's
  maximum cost; the database serializes concurrent reservations on the account's row, so
  no interleaving of requests, threads or gateways can hold more than the balance.
- `settle`: deletes the reservation, charges the real cost (never more than was
  reserved), releases the rest and writes the usage record, in one transaction. The
  DELETE decides who releases a reservation: the sweeper never releases one that was
  settled, and a settle that finds its reservation swept charges only what the free
  balance covers.
- `release_expired`: the sweeper. A reservation carries an expiry that its gateway keeps
  pushing forward (`extend`) while the request runs; one left by a crashed gateway
  expires and is released here, by whichever gateway sweeps first.

Invariants: `0 <= reserved <= balance`, and `balance == credited - spent` where `spent` is
the sum of every usage record's `cost`.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.engine import Connection

from modelyard.platform.database import Database
from modelyard.platform.sqlite_fast import RawConnection
from modelyard.platform.tables import accounts, reservations, usage, utcnow

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class UsageRecord:
    """One request's line in the ledger, before its cost is settled."""

    key_id: str
    account_id: str
    model: str
    user: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    reasoning_tokens: int
    cost: int
    """The real cost in micro-units; the charge is capped at the reservation."""
    latency_s: float
    ttft_s: float | None
    status: int
    estimated: bool = False
    client_disconnected: bool = False


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
_CHARGE_FREE = (update(accounts)
                .where(accounts.c.id == bindparam("account"),
                       accounts.c.balance - accounts.c.reserved >= bindparam("charge"))
                .values(balance=accounts.c.balance - bindparam("charge"),
                        spent=accounts.c.spent + bindparam("charge")))
_RECORD = insert(usage)
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
            record: UsageRecord) -> int:
    held: int | None = None
    if reservation_id is not None:
        held = connection.execute(_TAKE_RESERVATION,
                                  {"reservation": reservation_id}).scalar_one_or_none()
    if held is not None:
        charge = min(record.cost, held)
        connection.execute(_CHARGE_HELD, {"account": record.account_id, "charge": charge,
                                          "held": held})
    elif record.cost > 0:
        # No reservation (free at admission, or released by the sweeper after its gateway
        # stalled past the expiry): charge only what the account can cover.
        charged = connection.execute(_CHARGE_FREE, {"account": record.account_id,
                                                    "charge": record.cost})
        charge = record.cost if charged.rowcount == 1 else 0
        if charge != record.cost:
            logger.warning("usage of key %s (cost %d) left unbilled: its reservation had "
                           "expired and the balance could not cover it", record.key_id,
                           record.cost)
    else:
        charge = 0
    connection.execute(_RECORD, {
        "created_at": utcnow(), "key_id": record.key_id, "account_id": record.account_id,
        "model": record.model, "user": record.user, "prompt_tokens": record.prompt_tokens,
        "cached_tokens": record.cached_tokens, "completion_tokens": record.completion_tokens,
        "reasoning_tokens": record.reasoning_tokens, "cost": charge, "reserved": held or 0,
        "latency_ms": record.latency_s * 1000,
        "ttft_ms": None if record.ttft_s is None else record.ttft_s * 1000,
        "status": record.status, "estimated": record.estimated,
        "client_disconnected": record.client_disconnected})
    return charge


async def settle(db: Database, reservation_id: str | None, record: UsageRecord) -> int:
    """Charge the real cost, release the reservation, write the usage row; the charge."""
    return await db.hot_write(_settle, reservation_id, record)


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
