"""Settling requests whatever the database does.

A settlement is tried at once, a few times with a short backoff. One that still fails (the
database is down or unreachable) is not dropped: it is kept in memory and retried by the
gate's maintenance loop until the database takes it, and its reservation is kept alive
meanwhile so that no sweeper releases it (which would make the request free). Every retry
names the settlement (`UsageRecord.settlement_id`), so a try that committed without its
answer arriving is never charged twice.

The queue is bounded (`limit`): past it a failed settlement is dropped, logged and counted.
Its metrics: settlements pending, dropped, usage records degraded or lost, and cost the
accounts could not cover.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.exc import SQLAlchemyError

from modelyard.platform import ledger
from modelyard.platform.database import Database

logger = logging.getLogger(__name__)

SETTLE_ATTEMPTS = 5
"""Tries at once, before a settlement waits for the maintenance loop."""
PENDING_LIMIT = 100_000


class SettlementMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = registry or CollectorRegistry()
        self.pending = Gauge("modelyard_settlements_pending",
                             "Settlements the database refused, kept to be retried.",
                             registry=r)
        self.dropped = Counter("modelyard_settlements_dropped",
                               "Settlements given up because too many were pending "
                               "(their requests went unbilled).", registry=r)
        self.degraded = Counter("modelyard_usage_records_degraded",
                                "Usage records written without optional fields the "
                                "database refused (such as user).", registry=r)
        self.lost = Counter("modelyard_usage_records_lost",
                            "Usage records that could not be written at all (their "
                            "charge stands).", registry=r)
        self.uncollected = Counter("modelyard_uncollected_micros",
                                   "Cost above what the accounts could cover, in "
                                   "micro-units.", registry=r)

    def count(self, settlement: ledger.Settlement) -> None:
        if settlement.already:
            return
        if settlement.degraded:
            self.degraded.inc()
        if not settlement.recorded:
            self.lost.inc()
        if settlement.uncollected > 0:
            self.uncollected.inc(settlement.uncollected)


@dataclass
class _Pending:
    reservation_id: str | None
    record: ledger.UsageRecord
    failures: int = 0
    next_try: float = 0.0


class SettlementQueue:
    def __init__(self, db: Database, metrics: SettlementMetrics | None = None, *,
                 attempts: int = SETTLE_ATTEMPTS, limit: int = PENDING_LIMIT,
                 backoff_s: float = 0.5, max_backoff_s: float = 10.0) -> None:
        self.db = db
        self.metrics = metrics or SettlementMetrics()
        self.attempts = attempts
        self.limit = limit
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self._pending: dict[str, _Pending] = {}
        """By settlement id, oldest first."""
        self.metrics.pending.set_function(lambda: len(self._pending))

    def __len__(self) -> int:
        return len(self._pending)

    def held(self) -> list[str]:
        """The reservations of pending settlements: to keep alive until they land."""
        return [p.reservation_id for p in self._pending.values()
                if p.reservation_id is not None]

    async def settle(self, reservation_id: str | None,
                     record: ledger.UsageRecord) -> ledger.Settlement | None:
        """Settle now, or keep the settlement for `retry`; what it did, None if kept."""
        for attempt in range(1, self.attempts + 1):
            try:
                return self._landed(await ledger.settle(self.db, reservation_id, record,
                                                        retry=attempt > 1))
            except (SQLAlchemyError, OSError) as exc:
                if attempt == self.attempts:
                    self._keep(_Pending(reservation_id, record), exc)
                    return None
                await asyncio.sleep(0.05 * 2 ** attempt)
        return None  # pragma: no cover - the loop returns

    def _landed(self, settlement: ledger.Settlement) -> ledger.Settlement:
        self.metrics.count(settlement)
        return settlement

    def _keep(self, pending: _Pending, exc: BaseException) -> None:
        if len(self._pending) >= self.limit:
            self.metrics.dropped.inc()
            logger.error("settling a request of key %s failed (%s) and %d settlements are "
                         "already pending: this one is dropped, its request unbilled",
                         pending.record.key_id, exc, len(self._pending))
            return
        self._failed(pending, time.monotonic())
        self._pending[pending.record.settlement_id] = pending
        logger.error("settling a request of key %s failed (%s); it is kept and retried "
                     "until the database takes it (%d pending)", pending.record.key_id,
                     exc, len(self._pending))

    def _failed(self, pending: _Pending, now: float) -> None:
        pending.next_try = now + min(self.backoff_s * 2 ** pending.failures,
                                     self.max_backoff_s)
        pending.failures += 1

    async def retry(self, *, everything: bool = False) -> int:
        """Retry the pending settlements that are due (`everything`: all), oldest first,
        until one fails (the database is likely still away); how many landed."""
        landed = 0
        now = time.monotonic()
        for settlement_id, pending in list(self._pending.items()):
            if not everything and pending.next_try > now:
                continue
            try:
                self._landed(await ledger.settle(self.db, pending.reservation_id,
                                                 pending.record, retry=True))
            except (SQLAlchemyError, OSError) as exc:
                self._failed(pending, now)
                logger.warning("%d settlement(s) still pending: %s", len(self._pending), exc)
                break
            del self._pending[settlement_id]
            landed += 1
        if landed:
            logger.info("%d pending settlement(s) landed, %d left", landed, len(self._pending))
        return landed

    async def flush(self, timeout_s: float = 5.0) -> None:
        """At shutdown: one last try of every pending settlement, within `timeout_s`."""
        if not self._pending:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.retry(everything=True), timeout_s)
        if self._pending:
            logger.error("%d settlement(s) could not be written before shutdown; their "
                         "requests go unbilled", len(self._pending))
