"""Per-key rate limits: requests per minute (RPM) and tokens per minute (TPM).

Each limit is a token bucket holding up to one minute's allowance and refilling
continuously (RPM/60 requests and TPM/60 tokens per second), so a key may burst up to its
limit and then proceeds at the steady rate; there is no window edge to game. A request
takes 1 from the request bucket and `prompt_tokens + max_tokens` from the token bucket,
from both or from neither; after it ends, the tokens it did not generate go back.

Besides the rates, a key and its account may each have only so many requests in flight
at once: `enter` takes a `Slot` in both counts (or refuses), `leave` gives it back.

`MemoryLimiter` keeps the buckets and counts in the process (the default, one gateway). The
Redis limiter (`redis_limits.py`) runs the same arithmetic in Lua scripts, so the limits
hold across gateways.
"""

from __future__ import annotations

import math
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

SECONDS_PER_MINUTE = 60.0


@dataclass(frozen=True)
class Limits:
    rpm: int | None = None
    tpm: int | None = None

    @property
    def any(self) -> bool:
        return self.rpm is not None or self.tpm is not None


@dataclass(frozen=True)
class Concurrency:
    """The most requests in flight at once for a key and for its account (None: any)."""

    key: int | None = None
    account: int | None = None

    @property
    def any(self) -> bool:
        return self.key is not None or self.account is not None


@dataclass(frozen=True)
class Slot:
    """One request's place in its key's and its account's in-flight counts."""

    key_id: str
    account_id: str
    id: str


@dataclass(frozen=True)
class Entry:
    """What `enter` answered: a slot, or which count is full ("key" or "account")."""

    slot: Slot | None
    full: str | None = None
    limit: int = 0


@dataclass(frozen=True)
class BucketState:
    limit: int
    remaining: float
    reset_s: float
    """Seconds until the bucket is full again."""


@dataclass(frozen=True)
class Decision:
    allowed: bool
    retry_after_s: float
    """0 when allowed; else how long until the request would fit."""
    requests: BucketState | None = None
    tokens: BucketState | None = None
    too_large: bool = False
    """The request alone needs more tokens than the key's TPM: it can never run."""


@dataclass
class Bucket:
    level: float
    updated: float


def refill(bucket: Bucket | None, limit: int, now: float) -> float:
    """The bucket's level at `now` (a missing bucket is full)."""
    if bucket is None:
        return float(limit)
    elapsed = max(0.0, now - bucket.updated)
    return min(float(limit), bucket.level + elapsed * limit / SECONDS_PER_MINUTE)


def bucket_state(limit: int, level: float) -> BucketState:
    return BucketState(limit, level, (limit - level) * SECONDS_PER_MINUTE / limit)


def decide(requests_level: float | None, tokens_level: float | None, limits: Limits,
           cost: int) -> tuple[Decision, float | None, float | None]:
    """Given the refilled levels, whether the request fits; and the levels after it."""
    wait = 0.0
    too_large = limits.tpm is not None and cost > limits.tpm
    if limits.rpm is not None and requests_level is not None and requests_level < 1:
        wait = max(wait, (1 - requests_level) * SECONDS_PER_MINUTE / limits.rpm)
    if limits.tpm is not None and tokens_level is not None and tokens_level < cost:
        wait = max(wait, (cost - tokens_level) * SECONDS_PER_MINUTE / limits.tpm)
    allowed = wait == 0.0 and not too_large
    if allowed:
        requests_level = None if requests_level is None else requests_level - 1
        tokens_level = None if tokens_level is None else tokens_level - cost
    requests = None if limits.rpm is None or requests_level is None else bucket_state(
        limits.rpm, requests_level)
    tokens = None if limits.tpm is None or tokens_level is None else bucket_state(
        limits.tpm, tokens_level)
    return Decision(allowed, wait, requests, tokens, too_large), requests_level, tokens_level


class Limiter(ABC):
    @abstractmethod
    async def acquire(self, key_id: str, limits: Limits, tokens: int) -> Decision:
        """Take one request and `tokens` tokens from the key's buckets, or refuse."""

    @abstractmethod
    async def refund(self, key_id: str, limits: Limits, tokens: int) -> None:
        """Give back tokens a request took but did not use."""

    @abstractmethod
    async def enter(self, key_id: str, account_id: str, limits: Concurrency) -> Entry:
        """Count one more request in flight for the key and its account, or refuse."""

    @abstractmethod
    async def leave(self, slot: Slot) -> None:
        """The request holding `slot` ended (call once per slot)."""

    async def keep(self, slots: list[Slot], ttl_s: float) -> None:  # noqa: B027
        """Keep running requests' slots from expiring (only slots kept elsewhere expire)."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections at shutdown."""


class MemoryLimiter(Limiter):
    """Buckets in this process; every call runs without awaiting, so it is atomic."""

    def __init__(self, clock: Callable[[], float] | None = None) -> None:
        self._clock = clock or time.monotonic
        self._requests: dict[str, Bucket] = {}
        self._tokens: dict[str, Bucket] = {}
        self._in_flight: dict[str, int] = {}
        """By key id and by "account:" + account id."""

    def in_flight(self, key_id: str) -> int:
        return self._in_flight.get(key_id, 0)

    async def enter(self, key_id: str, account_id: str, limits: Concurrency) -> Entry:
        counts = self._in_flight
        account = "account:" + account_id
        if limits.key is not None and counts.get(key_id, 0) >= limits.key:
            return Entry(None, "key", limits.key)
        if limits.account is not None and counts.get(account, 0) >= limits.account:
            return Entry(None, "account", limits.account)
        counts[key_id] = counts.get(key_id, 0) + 1
        counts[account] = counts.get(account, 0) + 1
        return Entry(Slot(key_id, account_id, ""))

    async def leave(self, slot: Slot) -> None:
        counts = self._in_flight
        for name in (slot.key_id, "account:" + slot.account_id):
            left = counts.get(name, 0) - 1
            if left > 0:
                counts[name] = left
            else:
                counts.pop(name, None)

    async def acquire(self, key_id: str, limits: Limits, tokens: int) -> Decision:
        now = self._clock()
        requests_level = None if limits.rpm is None else refill(
            self._requests.get(key_id), limits.rpm, now)
        tokens_level = None if limits.tpm is None else refill(
            self._tokens.get(key_id), limits.tpm, now)
        decision, requests_after, tokens_after = decide(requests_level, tokens_level, limits,
                                                        tokens)
        if decision.allowed:
            if requests_after is not None:
                self._requests[key_id] = Bucket(requests_after, now)
            if tokens_after is not None:
                self._tokens[key_id] = Bucket(tokens_after, now)
        return decision

    async def refund(self, key_id: str, limits: Limits, tokens: int) -> None:
        if limits.tpm is None or tokens <= 0:
            return
        now = self._clock()
        level = refill(self._tokens.get(key_id), limits.tpm, now)
        self._tokens[key_id] = Bucket(min(float(limits.tpm), level + tokens), now)


def format_duration(seconds: float) -> str:
    """OpenAI's style for x-ratelimit-reset-*: "20ms", "1.5s", "1m0s"."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:
        return f"{round(seconds, 3):g}s"
    minutes, rest = divmod(seconds, 60)
    return f"{int(minutes)}m{round(rest, 3):g}s"


def headers(decision: Decision) -> dict[str, str]:
    """The x-ratelimit-* headers for the limits a key has (and Retry-After on a refusal)."""
    out: dict[str, str] = {}
    for kind, state in (("requests", decision.requests), ("tokens", decision.tokens)):
        if state is None:
            continue
        out[f"x-ratelimit-limit-{kind}"] = str(state.limit)
        out[f"x-ratelimit-remaining-{kind}"] = str(max(0, math.floor(state.remaining)))
        out[f"x-ratelimit-reset-{kind}"] = format_duration(state.reset_s)
    if not decision.allowed:
        retry = SECONDS_PER_MINUTE if decision.too_large else decision.retry_after_s
        out["Retry-After"] = str(max(1, math.ceil(retry)))
    return out


def slot_id() -> str:
    """A new slot's id (for limiters that name their slots)."""
    return os.urandom(8).hex()
