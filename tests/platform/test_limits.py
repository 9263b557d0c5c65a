"""Rate limits: token buckets for RPM and TPM, in memory and in Redis, and their headers."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable

import pytest

from modelyard.platform import redis_limits
from modelyard.platform.limits import (
    Concurrency,
    Decision,
    Limiter,
    Limits,
    MemoryLimiter,
    format_duration,
    headers,
)
from modelyard.platform.redis_limits import RedisLimiter
from tests.platform.services import REDIS_URL


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def run(coroutine: Awaitable[Decision]) -> Decision:
    async def wrapped() -> Decision:
        return await coroutine
    return asyncio.run(wrapped())


def test_requests_per_minute_burst_then_refill() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock)
    limits = Limits(rpm=3)
    assert [run(limiter.acquire("k", limits, 0)).allowed for _ in range(4)] == [
        True, True, True, False]
    refused = run(limiter.acquire("k", limits, 0))
    assert refused.retry_after_s == pytest.approx(20.0)
    clock.now += 19.9
    assert not run(limiter.acquire("k", limits, 0)).allowed
    clock.now += 0.1
    allowed = run(limiter.acquire("k", limits, 0))
    assert allowed.allowed
    assert allowed.requests is not None and allowed.requests.remaining == pytest.approx(0)


@pytest.mark.parametrize(("spent", "ask", "wait", "allowed"), [
    (0, 100, 0.0, True),
    (60, 40, 0.0, True),
    (60, 41, 0.6, False),
    (100, 1, 0.6, False),
    (0, 101, None, False),   # more than the whole limit: never
])
def test_tokens_per_minute(spent: int, ask: int, wait: float | None, allowed: bool) -> None:
    limiter = MemoryLimiter(Clock())
    limits = Limits(tpm=100)
    if spent:
        assert run(limiter.acquire("k", limits, spent)).allowed
    decision = run(limiter.acquire("k", limits, ask))
    assert decision.allowed is allowed
    if wait is not None:
        assert decision.retry_after_s == pytest.approx(wait)
    assert decision.too_large is (ask > 100)


def test_both_buckets_or_neither() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock)
    limits = Limits(rpm=10, tpm=100)
    assert run(limiter.acquire("k", limits, 90)).allowed
    refused = run(limiter.acquire("k", limits, 20))
    assert not refused.allowed
    assert refused.requests is not None and refused.requests.remaining == pytest.approx(9)
    assert run(limiter.acquire("k", limits, 10)).requests.remaining == pytest.approx(8)  # type: ignore[union-attr]


def test_refunds_return_unused_tokens_up_to_the_limit() -> None:
    clock = Clock()
    limiter = MemoryLimiter(clock)
    limits = Limits(tpm=100)
    assert run(limiter.acquire("k", limits, 100)).allowed
    asyncio.run(limiter.refund("k", limits, 30))
    assert run(limiter.acquire("k", limits, 30)).allowed
    asyncio.run(limiter.refund("k", limits, 500))
    decision = run(limiter.acquire("k", limits, 0))
    assert decision.tokens is not None and decision.tokens.remaining == pytest.approx(100)


def test_keys_have_their_own_buckets() -> None:
    limiter = MemoryLimiter(Clock())
    limits = Limits(rpm=1)
    assert run(limiter.acquire("a", limits, 0)).allowed
    assert run(limiter.acquire("b", limits, 0)).allowed
    assert not run(limiter.acquire("a", limits, 0)).allowed


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0ms"), (0.0201, "21ms"), (1, "1s"), (1.5, "1.5s"), (8.6401, "8.64s"), (60, "1m0s"),
    (90.5, "1m30.5s"),
])
def test_durations_read_like_openais(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_headers_name_each_limit_and_retry_after_on_refusal() -> None:
    limiter = MemoryLimiter(Clock())
    limits = Limits(rpm=2, tpm=1000)
    first = run(limiter.acquire("k", limits, 100))
    assert headers(first) == {
        "x-ratelimit-limit-requests": "2", "x-ratelimit-remaining-requests": "1",
        "x-ratelimit-reset-requests": "30s", "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900", "x-ratelimit-reset-tokens": "6s"}
    run(limiter.acquire("k", limits, 100))
    refused = headers(run(limiter.acquire("k", limits, 100)))
    assert refused["Retry-After"] == "30"
    assert refused["x-ratelimit-remaining-requests"] == "0"
    only_rpm = headers(run(MemoryLimiter(Clock()).acquire("k", Limits(rpm=5), 10)))
    assert set(only_rpm) == {"x-ratelimit-limit-requests", "x-ratelimit-remaining-requests",
                             "x-ratelimit-reset-requests"}


# -- the same behaviour in Redis, on Redis's own clock -------------------------------------


@pytest.fixture(params=["memory", "redis"])
def make_limiter(request: pytest.FixtureRequest) -> Callable[[], Limiter]:
    if request.param == "memory":
        return MemoryLimiter
    prefix: str = request.getfixturevalue("redis_prefix")
    return lambda: RedisLimiter(REDIS_URL, prefix)


def test_limits_hold_in_both_limiters(make_limiter: Callable[[], Limiter]) -> None:
    key = secrets.token_hex(6)

    async def scenario() -> None:
        limiter = make_limiter()
        try:
            limits = Limits(rpm=3, tpm=60)
            decisions = [await limiter.acquire(key, limits, 10) for _ in range(4)]
            assert [d.allowed for d in decisions] == [True, True, True, False]
            assert decisions[2].requests is not None
            assert decisions[2].requests.remaining == pytest.approx(0, abs=0.01)
            assert decisions[2].tokens is not None
            assert decisions[2].tokens.remaining == pytest.approx(30, abs=0.5)
            assert decisions[3].retry_after_s == pytest.approx(20, abs=0.5)
            too_large = await limiter.acquire(secrets.token_hex(6), limits, 61)
            assert not too_large.allowed and too_large.too_large
            tokens_only = Limits(tpm=60)  # one token per second
            other = secrets.token_hex(6)
            assert (await limiter.acquire(other, tokens_only, 60)).allowed
            assert not (await limiter.acquire(other, tokens_only, 1)).allowed
            await limiter.refund(other, tokens_only, 5)
            assert (await limiter.acquire(other, tokens_only, 5)).allowed
            started = time.monotonic()
            await asyncio.sleep(1.2)
            assert time.monotonic() - started >= 1.2
            assert (await limiter.acquire(other, tokens_only, 1)).allowed
        finally:
            await limiter.close()

    asyncio.run(scenario())


def test_redis_limits_are_atomic_across_clients(redis_prefix: str) -> None:
    """Many clients (as many gateways would) racing for one key's 25 requests."""
    key = secrets.token_hex(6)

    async def scenario() -> int:
        limiters = [RedisLimiter(REDIS_URL, redis_prefix) for _ in range(4)]
        try:
            decisions = await asyncio.gather(*[
                limiters[i % 4].acquire(key, Limits(rpm=25), 1) for i in range(100)])
            return sum(d.allowed for d in decisions)
        finally:
            for limiter in limiters:
                await limiter.close()

    assert asyncio.run(scenario()) == 25


# -- requests in flight, per key and per account ---------------------------------------------


def test_requests_in_flight_are_counted_per_key_and_per_account(
        make_limiter: Callable[[], Limiter]) -> None:
    account, key, other_key = (secrets.token_hex(6) for _ in range(3))

    async def scenario() -> None:
        limiter = make_limiter()
        try:
            limits = Concurrency(key=2, account=3)
            first = await limiter.enter(key, account, limits)
            second = await limiter.enter(key, account, limits)
            assert first.slot is not None and second.slot is not None
            refused = await limiter.enter(key, account, limits)
            assert (refused.slot, refused.full, refused.limit) == (None, "key", 2)
            third = await limiter.enter(other_key, account, limits)
            assert third.slot is not None  # another key of the account: the account's third
            by_account = await limiter.enter(secrets.token_hex(6), account, limits)
            assert (by_account.slot, by_account.full, by_account.limit) == (None, "account", 3)
            await limiter.leave(first.slot)
            again = await limiter.enter(key, account, limits)
            assert again.slot is not None  # the slot given back is free again
            for slot in (second.slot, third.slot, again.slot):
                await limiter.leave(slot)
            unlimited = [await limiter.enter(key, account, Concurrency()) for _ in range(10)]
            assert all(entry.slot is not None for entry in unlimited)
        finally:
            await limiter.close()

    asyncio.run(scenario())


def test_a_crashed_gateways_slots_expire_in_redis(redis_prefix: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A gateway that dies never calls `leave`: its slots go after their TTL, unless a
    running gateway keeps them."""
    monkeypatch.setattr(redis_limits, "SLOT_TTL_S", 1)
    account, key = secrets.token_hex(6), secrets.token_hex(6)

    async def scenario() -> None:
        crashed = RedisLimiter(REDIS_URL, redis_prefix)
        alive = RedisLimiter(REDIS_URL, redis_prefix)
        try:
            limits = Concurrency(key=1)
            held = await alive.enter(key, account, Concurrency())
            assert held.slot is not None
            lost = await crashed.enter(secrets.token_hex(6), account, Concurrency())
            assert lost.slot is not None
            assert (await crashed.enter(key, account, limits)).slot is None  # held's
            for _ in range(3):
                await asyncio.sleep(0.5)
                await alive.keep([held.slot], 1)
            assert (await crashed.enter(key, account, limits)).slot is None  # kept alive
            await alive.leave(held.slot)
            entry = await crashed.enter(key, account, Concurrency(account=1))
            assert entry.slot is not None  # `lost` expired: the account has room for one
        finally:
            await crashed.close()
            await alive.close()

    asyncio.run(scenario())
