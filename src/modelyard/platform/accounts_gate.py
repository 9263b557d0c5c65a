"""The gate backed by accounts: keys (401), rate limits (429), balances (402), the ledger.

Keys are read from the database on every request unless `key_cache_seconds` is set, so a
revocation takes effect at once on every gateway (with the cache: within that many
seconds). A background task keeps this gateway's running reservations (and, with Redis, its
requests' in-flight slots) alive, releases expired ones (left by any gateway that crashed)
at start and every `sweep_interval_seconds`, and deletes usage records past their
retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from datetime import timedelta

from prometheus_client import CollectorRegistry
from sqlalchemy.exc import SQLAlchemyError

from modelyard.config import PlatformConfig
from modelyard.platform import keys, ledger, response_store
from modelyard.platform.accounts import KeyRecord, find_key
from modelyard.platform.database import Database
from modelyard.platform.gate import Admission, Caller, Gate, Outcome, PlatformError, Ticket
from modelyard.platform.limits import Concurrency, Limiter, Limits, Slot, headers
from modelyard.platform.money import FREE, Price, format_micros
from modelyard.platform.redis_limits import SLOT_TTL_S, LimiterUnavailable
from modelyard.platform.settlement_queue import SettlementMetrics, SettlementQueue
from modelyard.platform.tables import utcnow

logger = logging.getLogger(__name__)

PURGE_INTERVAL_S = 3600.0


def _unauthorized(message: str) -> PlatformError:
    return PlatformError(401, message, code="invalid_api_key")


def _unavailable(what: str) -> PlatformError:
    return PlatformError(503, f"{what} is unavailable; try again shortly",
                         code="service_unavailable", headers={"Retry-After": "1"})


class AccountsGate(Gate):
    def __init__(self, db: Database, limiter: Limiter, prices: Mapping[str, Price],
                 settings: PlatformConfig, registry: CollectorRegistry | None = None) -> None:
        self.db = db
        self.settlements = SettlementQueue(db, SettlementMetrics(registry))
        """Settlements the database refused, retried by the maintenance loop."""
        self.limiter = limiter
        self.prices = dict(prices)
        """The price table: every priced model by id (see service.price_table)."""
        self.settings = settings
        self._live: set[str] = set()
        self._slots: set[Slot] = set()
        """Slots of running requests that expire unless kept (a shared limiter's)."""
        self.concurrency = Concurrency(settings.max_concurrent_per_key or None,
                                       settings.max_concurrent_per_account or None)
        self._key_cache: dict[str, tuple[float, KeyRecord | None]] = {}
        self._maintenance: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._maintenance is None:
            self._maintenance = asyncio.get_running_loop().create_task(self._maintain())

    async def close(self) -> None:
        if self._maintenance is not None:
            self._maintenance.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._maintenance
            self._maintenance = None
        await self.settlements.flush()
        await self.limiter.close()
        await self.db.close()

    def price(self, model: str) -> Price:
        return self.prices.get(model, FREE)

    # -- who is calling ---------------------------------------------------------------------

    async def authenticate(self, authorization: str | None) -> Caller:
        token = keys.bearer_token(authorization)
        if token is None:
            raise _unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        key_id = keys.key_id_of(token)
        record = None if key_id is None else await self._find(key_id)
        if record is None or not keys.matches(token, record.digest):
            raise _unauthorized("invalid API key")
        if record.revoked:
            raise _unauthorized("this API key has been revoked")
        if record.expires_at is not None and record.expires_at <= utcnow():
            raise _unauthorized("this API key has expired")
        return Caller(record.id, record.account_id, record.is_admin, record.models,
                      record.rpm, record.tpm, record.max_concurrent, record.weight,
                      record.priority)

    async def _find(self, key_id: str) -> KeyRecord | None:
        ttl = self.settings.key_cache_seconds
        now = time.monotonic()
        if ttl > 0:
            cached = self._key_cache.get(key_id)
            if cached is not None and cached[0] > now:
                return cached[1]
        try:
            record = await find_key(self.db, key_id)
        except (SQLAlchemyError, OSError) as exc:
            logger.error("key lookup failed: %s", exc)
            raise _unavailable("the platform database") from None
        if ttl > 0:
            if len(self._key_cache) > 10_000:
                self._key_cache.clear()
            self._key_cache[key_id] = (now + ttl, record)
        return record

    # -- may this come in, may it run now, and who pays -------------------------------------

    async def check_in(self, caller: Caller) -> Ticket:
        if caller.key_id is None or caller.account_id is None:
            raise _unauthorized("invalid API key")
        ticket = Ticket(caller)
        try:
            concurrency = self.concurrency if caller.max_concurrent is None else Concurrency(
                caller.max_concurrent, self.concurrency.account)
            if concurrency.any:
                entry = await self.limiter.enter(caller.key_id, caller.account_id, concurrency)
                if entry.slot is None:
                    whose = "API key" if entry.full == "key" else "account"
                    raise PlatformError(
                        429, f"too many requests in flight for this {whose}: at most "
                        f"{entry.limit} at once; retry when one has ended",
                        code="concurrency_limit_exceeded", headers={"Retry-After": "1"})
                ticket.slot = entry.slot
                if entry.slot.id:
                    self._slots.add(entry.slot)
            if caller.rpm is not None or caller.tpm is not None:
                # one request now, no tokens yet (their bound is known once the body is);
                # the answer tells the state of both buckets for the headers
                decision = await self.limiter.acquire(caller.key_id,
                                                      Limits(caller.rpm, caller.tpm), 0)
                rate_headers = headers(decision)
                if not decision.allowed:
                    raise PlatformError(
                        429, "rate limit reached for this API key; retry after "
                        f"{rate_headers['Retry-After']} s", code="rate_limit_exceeded",
                        headers=rate_headers)
                ticket.headers = rate_headers
        except LimiterUnavailable as exc:
            logger.error("rate limiter failed: %s", exc)
            await self.check_out(ticket)
            raise _unavailable("the rate limiter") from None
        except BaseException:
            await self.check_out(ticket)
            raise
        return ticket

    async def check_out(self, ticket: Ticket) -> None:
        if ticket.checked_out:
            return
        ticket.checked_out = True
        slot: Slot | None = ticket.slot
        if slot is None:
            return
        self._slots.discard(slot)
        try:
            await self.limiter.leave(slot)
        except LimiterUnavailable as exc:
            logger.warning("could not free a request's slot (it expires by itself): %s", exc)

    async def admit(self, ticket: Ticket, model: str, prompt_tokens: int,
                    max_tokens: int) -> Admission:
        caller = ticket.caller
        if caller.key_id is None or caller.account_id is None:
            raise _unauthorized("invalid API key")
        limits = Limits(tpm=caller.tpm)
        rate_headers = dict(ticket.headers)
        tokens = prompt_tokens + max_tokens
        if limits.any:
            try:
                decision = await self.limiter.acquire(caller.key_id, limits, tokens)
            except LimiterUnavailable as exc:
                logger.error("rate limiter failed: %s", exc)
                raise _unavailable("the rate limiter") from None
            rate_headers.update(headers(decision))
            if not decision.allowed:
                message = (f"this request may need {tokens} tokens, more than the key's limit "
                           f"of {caller.tpm} tokens per minute" if decision.too_large else
                           "token rate limit reached for this API key; retry after "
                           f"{rate_headers['Retry-After']} s")
                raise PlatformError(429, message, code="rate_limit_exceeded",
                                    headers=rate_headers)
            rate_headers.pop("Retry-After", None)
        amount = self.price(model).max_cost(prompt_tokens, max_tokens)
        reservation_id: str | None = None
        if amount > 0:
            try:
                reservation_id = await ledger.reserve(self.db, caller.account_id,
                                                      caller.key_id, amount,
                                                      self.settings.reservation_ttl_seconds)
            except (SQLAlchemyError, OSError) as exc:
                logger.error("reservation failed: %s", exc)
                await self._refund(caller, limits, tokens)
                raise _unavailable("the platform database") from None
            if reservation_id is None:
                await self._refund(caller, limits, tokens)
                raise PlatformError(
                    402, f"insufficient balance: this request may cost up to "
                    f"{format_micros(amount)} and the account cannot cover it",
                    code="insufficient_balance", headers=rate_headers)
            self._live.add(reservation_id)
        return Admission(caller, model, reservation_id, rate_headers, reserved=amount,
                         max_tokens=max_tokens, prompt_tokens=prompt_tokens)

    async def _refund(self, caller: Caller, limits: Limits, tokens: int) -> None:
        if caller.key_id is None or limits.tpm is None:
            return
        try:
            await self.limiter.refund(caller.key_id, limits, tokens)
        except LimiterUnavailable as exc:
            logger.warning("could not return %d tokens to the rate limiter: %s", tokens, exc)

    # -- what it cost ----------------------------------------------------------------------

    async def settle(self, admission: Admission, outcome: Outcome) -> None:
        caller = admission.caller
        if caller.key_id is None or caller.account_id is None:
            return
        used = outcome.usage
        cost = self.price(admission.model).cost(
            used.prompt_tokens, used.cached_tokens, used.completion_tokens)
        record = ledger.UsageRecord(
            caller.key_id, caller.account_id, admission.model, outcome.user, used, cost,
            outcome.latency_s, outcome.ttft_s, outcome.status, outcome.client_disconnected)
        try:
            await self._settle(admission.reservation_id, record)
        finally:
            if admission.reservation_id is not None:
                self._live.discard(admission.reservation_id)
        unused = (max(0, admission.prompt_tokens - used.prompt_tokens)
                  + max(0, admission.max_tokens - used.completion_tokens))
        await self._refund(caller, Limits(tpm=caller.tpm), unused)

    async def _settle(self, reservation_id: str | None, record: ledger.UsageRecord) -> None:
        await self.settlements.settle(reservation_id, record)  # kept and retried if it fails

    # -- background work --------------------------------------------------------------------

    async def _maintain(self) -> None:
        ttl = self.settings.reservation_ttl_seconds
        sweep_every = self.settings.sweep_interval_seconds
        tick = min(sweep_every, ttl / 3)
        next_sweep = next_purge = 0.0
        while True:
            now = time.monotonic()
            try:
                await self.settlements.retry()
                held = [*self._live, *self.settlements.held()]  # pending ones kept alive too
                if held:
                    await ledger.extend(self.db, held, ttl)
                if self._slots:
                    await self.limiter.keep(list(self._slots), max(SLOT_TTL_S, 3 * tick))
                if now >= next_sweep:
                    await ledger.release_expired(self.db)
                    next_sweep = now + sweep_every
                days = self.settings.usage_retention_days
                if days > 0 and now >= next_purge:
                    before = utcnow() - timedelta(days=days)
                    purged = await ledger.purge_usage(self.db, before)
                    if purged:
                        logger.info("deleted %d usage record(s) older than %d days", purged,
                                    days)
                    purged = await response_store.purge(self.db, before)
                    if purged:
                        logger.info("deleted %d stored response(s) older than %d days",
                                    purged, days)
                    next_purge = now + PURGE_INTERVAL_S
            except (SQLAlchemyError, OSError, LimiterUnavailable) as exc:
                logger.warning("platform maintenance failed, will retry: %s", exc)
            await asyncio.sleep(tick)
