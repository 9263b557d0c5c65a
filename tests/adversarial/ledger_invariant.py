"""The ledger's invariants, read straight from a platform database (SQLite or PostgreSQL).

For every account, to the micro-unit:

- `balance == credited - spent` and `credited == sum(credits.amount)`;
- `spent == sum(usage.cost)` (usage retention must not have trimmed anything yet);
- `reserved == sum(reservations.amount)` and `0 <= reserved <= balance`;
- once every request has ended (`settled=True`): no live reservation, `reserved == 0`.

`read_ledger` returns the books and every violation found; `assert_ledger_holds` fails a
test with all of them at once. `money_unaccounted` is the figure the suite reports: the sum
of every difference above, in micro-units (0 when the books balance).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass, field

from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql import ColumnElement

from modelyard.platform.database import Database
from modelyard.platform.tables import accounts, credits, reservations, usage


@dataclass(frozen=True)
class AccountBooks:
    """One account's running totals and the sums of the rows behind them (micro-units)."""

    id: str
    name: str
    balance: int
    reserved: int
    credited: int
    spent: int
    credits_sum: int
    usage_cost: int
    usage_records: int
    reservations_sum: int
    live_reservations: int


@dataclass
class Ledger:
    """Every account's books, the usage records per `user`, and what does not add up."""

    books: dict[str, AccountBooks]
    """By account name."""
    records_by_user: Counter[str]
    """How many usage records carry each `user` value (the requests' own ids)."""
    violations: list[str] = field(default_factory=list)
    money_unaccounted: int = 0
    """Micro-units the books do not explain (0 when they balance)."""
    uncollected: int = 0
    """Cost the usage records say the accounts could not cover (recorded, not lost)."""

    def account(self, name: str) -> AccountBooks:
        return self.books[name]


def _sums(connection: Connection, amount: ColumnElement[int],
          account_id: ColumnElement[str]) -> dict[str, int]:
    rows = connection.execute(select(account_id, func.coalesce(func.sum(amount), 0))
                              .group_by(account_id)).all()
    return {str(account_id): int(total) for account_id, total in rows}


def _uncollected(connection: Connection) -> int:
    column = usage.c.get("uncollected")
    if column is None:
        return 0
    return int(connection.execute(select(func.coalesce(func.sum(column), 0))).scalar_one())


def _read(connection: Connection) -> tuple[list[AccountBooks], Counter[str], int]:
    credited = _sums(connection, credits.c.amount, credits.c.account_id)
    cost = _sums(connection, usage.c.cost, usage.c.account_id)
    held = _sums(connection, reservations.c.amount, reservations.c.account_id)
    records = {str(a): int(n) for a, n in connection.execute(
        select(usage.c.account_id, func.count()).group_by(usage.c.account_id)).all()}
    live = {str(a): int(n) for a, n in connection.execute(
        select(reservations.c.account_id, func.count())
        .group_by(reservations.c.account_id)).all()}
    books = [AccountBooks(
        id=row.id, name=row.name, balance=int(row.balance), reserved=int(row.reserved),
        credited=int(row.credited), spent=int(row.spent), credits_sum=credited.get(row.id, 0),
        usage_cost=cost.get(row.id, 0), usage_records=records.get(row.id, 0),
        reservations_sum=held.get(row.id, 0), live_reservations=live.get(row.id, 0))
        for row in connection.execute(select(accounts)).all()]
    users: Counter[str] = Counter()
    for user, count in connection.execute(
            select(usage.c.user, func.count()).where(usage.c.user.is_not(None))
            .group_by(usage.c.user)).all():
        users[str(user)] = int(count)
    return books, users, _uncollected(connection)


async def _read_async(url: str) -> tuple[list[AccountBooks], Counter[str], int]:
    db = Database(url, pool_size=1)
    try:
        read: tuple[list[AccountBooks], Counter[str], int] = await db.read(_read)
        return read
    finally:
        await db.close()


def _judge(account: AccountBooks, settled: bool) -> tuple[list[str], int]:
    checks = [
        ("balance != credited - spent", account.balance, account.credited - account.spent),
        ("credited != sum of credits", account.credited, account.credits_sum),
        ("spent != sum of usage costs", account.spent, account.usage_cost),
        ("reserved != sum of reservations", account.reserved, account.reservations_sum),
    ]
    if settled:
        checks.append(("reservation still held after every request ended",
                       account.reservations_sum, 0))
    violations: list[str] = []
    unaccounted = 0
    for what, found, expected in checks:
        if found != expected:
            violations.append(f"account {account.name}: {what} ({found} vs {expected})")
            unaccounted += abs(found - expected)
    if not 0 <= account.reserved <= account.balance:
        violations.append(f"account {account.name}: reserved {account.reserved} outside "
                          f"0..balance {account.balance}")
    return violations, unaccounted


def read_ledger(url: str, *, settled: bool = True) -> Ledger:
    """The books of every account in the database at `url`, judged. `settled`: every
    request has ended, so no reservation may be left."""
    books, users, uncollected = asyncio.run(_read_async(url))
    ledger = Ledger({b.name: b for b in books}, users, uncollected=uncollected)
    for account in books:
        violations, unaccounted = _judge(account, settled)
        ledger.violations += violations
        ledger.money_unaccounted += unaccounted
    return ledger


def wait_for_ledger(url: str, *, settled: bool = True, wait_s: float = 0.0) -> Ledger:
    """`read_ledger`, waiting up to `wait_s` for its violations to clear (a settlement still
    being written, a reservation not yet swept); the last reading either way."""
    deadline = time.monotonic() + wait_s
    while True:
        ledger = read_ledger(url, settled=settled)
        if not ledger.violations or time.monotonic() >= deadline:
            return ledger
        time.sleep(0.25)


def assert_ledger_holds(url: str, *, settled: bool = True, wait_s: float = 0.0) -> Ledger:
    """`wait_for_ledger`, failing with every violation that did not clear."""
    ledger = wait_for_ledger(url, settled=settled, wait_s=wait_s)
    assert not ledger.violations, "the ledger does not add up:\n" + "\n".join(ledger.violations)
    return ledger
