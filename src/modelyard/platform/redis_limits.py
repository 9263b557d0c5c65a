"""Rate limits shared by every gateway: the token buckets of `limits.py`, kept in Redis.

One Lua script reads, refills, checks and takes from both of a key's buckets, so the
decision is atomic however many gateways ask at once; the clock is Redis's own (`TIME`),
so gateways' clocks never disagree about a refill. Both buckets of a key share a hash tag,
so they live on one Redis Cluster slot. Idle buckets expire after two minutes (a full
bucket needs one).

Requests in flight are members of two sorted sets (the key's and its account's, which share
the account's hash tag), scored by when they expire: a gateway keeps pushing its own
requests' expiry forward (`keep`), so one that crashed leaves nothing behind for longer
than `SLOT_TTL_S`.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from modelyard.errors import ModelyardError
from modelyard.platform.limits import (
    Concurrency,
    Decision,
    Entry,
    Limiter,
    Limits,
    Slot,
    bucket_state,
    slot_id,
)

BUCKET_TTL_S = 120
SLOT_TTL_S = 60
"""How long a request's slot outlives the last sign of life of its gateway."""

_REFILL = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local function level(key, limit)
  local stored = redis.call('HMGET', key, 'level', 'updated')
  local lvl = tonumber(stored[1])
  if lvl == nil then return limit end
  local elapsed = math.max(0, now - tonumber(stored[2]))
  return math.min(limit, lvl + elapsed * limit / 60)
end
local function store(key, lvl)
  redis.call('HSET', key, 'level', string.format('%.6f', lvl), 'updated',
             string.format('%.6f', now))
  redis.call('EXPIRE', key, ARGV[4])
end
"""

ACQUIRE = _REFILL + """
local rpm = tonumber(ARGV[1])
local tpm = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local requests, tokens, wait = -1, -1, 0
if rpm > 0 then
  requests = level(KEYS[1], rpm)
  if requests < 1 then wait = math.max(wait, (1 - requests) * 60 / rpm) end
end
if tpm > 0 then
  tokens = level(KEYS[2], tpm)
  if tokens < cost then wait = math.max(wait, (cost - tokens) * 60 / tpm) end
end
local allowed = 0
if wait == 0 then
  allowed = 1
  if rpm > 0 then requests = requests - 1; store(KEYS[1], requests) end
  if tpm > 0 then tokens = tokens - cost; store(KEYS[2], tokens) end
end
return {allowed, string.format('%.6f', requests), string.format('%.6f', tokens),
        string.format('%.6f', wait)}
"""

REFUND = _REFILL + """
local tpm = tonumber(ARGV[2])
store(KEYS[2], math.min(tpm, level(KEYS[2], tpm) + tonumber(ARGV[3])))
return 1
"""

ENTER = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local limits = {tonumber(ARGV[1]), tonumber(ARGV[2])}
for i = 1, 2 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', string.format('%.6f', now))
end
for i = 1, 2 do
  if limits[i] > 0 and redis.call('ZCARD', KEYS[i]) >= limits[i] then return i end
end
local ttl = tonumber(ARGV[4])
for i = 1, 2 do
  redis.call('ZADD', KEYS[i], string.format('%.6f', now + ttl), ARGV[3])
  redis.call('EXPIRE', KEYS[i], math.ceil(ttl) + 1)
end
return 0
"""

KEEP = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local ttl = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', string.format('%.6f', now + ttl), ARGV[i + 1])
  redis.call('EXPIRE', KEYS[i], math.ceil(ttl) + 1)
end
return 1
"""


class LimiterUnavailable(ModelyardError, RuntimeError):
    """Redis could not be reached or answered an error."""


class RedisLimiter(Limiter):
    def __init__(self, url: str, prefix: str = "modelyard") -> None:
        self._redis: Redis = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._prefix = prefix
        self._acquire = self._redis.register_script(ACQUIRE)
        self._refund = self._redis.register_script(REFUND)
        self._enter = self._redis.register_script(ENTER)
        self._keep = self._redis.register_script(KEEP)

    def _keys(self, key_id: str) -> list[str]:
        tag = f"{self._prefix}:ratelimit:{{{key_id}}}"
        return [f"{tag}:requests", f"{tag}:tokens"]

    async def acquire(self, key_id: str, limits: Limits, tokens: int) -> Decision:
        try:
            reply: list[Any] = await self._acquire(
                keys=self._keys(key_id),
                args=[limits.rpm or 0, limits.tpm or 0, tokens, BUCKET_TTL_S])
        except RedisError as exc:
            raise LimiterUnavailable(str(exc)) from exc
        allowed = int(reply[0]) == 1
        requests_level, tokens_level, wait = (float(v) for v in reply[1:4])
        too_large = limits.tpm is not None and tokens > limits.tpm
        return Decision(
            allowed and not too_large, 0.0 if allowed else wait,
            None if limits.rpm is None else bucket_state(limits.rpm, requests_level),
            None if limits.tpm is None else bucket_state(limits.tpm, tokens_level),
            too_large)

    async def refund(self, key_id: str, limits: Limits, tokens: int) -> None:
        if limits.tpm is None or tokens <= 0:
            return
        try:
            await self._refund(keys=self._keys(key_id),
                               args=[0, limits.tpm, tokens, BUCKET_TTL_S])
        except RedisError as exc:
            raise LimiterUnavailable(str(exc)) from exc

    def _slot_keys(self, key_id: str, account_id: str) -> list[str]:
        tag = f"{self._prefix}:inflight:{{{account_id}}}"
        return [f"{tag}:key:{key_id}", f"{tag}:account"]

    async def enter(self, key_id: str, account_id: str, limits: Concurrency) -> Entry:
        slot = Slot(key_id, account_id, slot_id())
        try:
            full = int(await self._enter(
                keys=self._slot_keys(key_id, account_id),
                args=[limits.key or 0, limits.account or 0, slot.id, SLOT_TTL_S]))
        except RedisError as exc:
            raise LimiterUnavailable(str(exc)) from exc
        if full == 1:
            return Entry(None, "key", limits.key or 0)
        if full == 2:
            return Entry(None, "account", limits.account or 0)
        return Entry(slot)

    async def leave(self, slot: Slot) -> None:
        key_set, account_set = self._slot_keys(slot.key_id, slot.account_id)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.zrem(key_set, slot.id)
                pipe.zrem(account_set, slot.id)
                await pipe.execute()
        except RedisError as exc:
            raise LimiterUnavailable(str(exc)) from exc

    async def keep(self, slots: list[Slot], ttl_s: float = SLOT_TTL_S) -> None:
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for slot in slots:
                    keys = self._slot_keys(slot.key_id, slot.account_id)
                    await self._keep(keys=keys, args=[ttl_s, slot.id, slot.id],
                                     client=pipe)
                await pipe.execute()
        except RedisError as exc:
            raise LimiterUnavailable(str(exc)) from exc

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as exc:
            raise LimiterUnavailable(str(exc)) from exc

    async def close(self) -> None:
        await self._redis.aclose()

