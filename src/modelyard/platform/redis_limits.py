"""Rate limits shared by every gateway: the token buckets of `limits.py`, kept in Redis.

One Lua script reads, refills, checks and takes from both of a key's buckets, so the
decision is atomic however many gateways ask at once; the clock is Redis's own (`TIME`),
so gateways' clocks never disagree about a refill. Both buckets of a key share a hash tag,
so they live on one Redis Cluster slot. Idle buckets expire after two minutes (a full
bucket needs one).
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from modelyard.platform.limits import Decision, Limiter, Limits, bucket_state

BUCKET_TTL_S = 120

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


class LimiterUnavailable(RuntimeError):
    """Redis could not be reached or answered an error."""


class RedisLimiter(Limiter):
    def __init__(self, url: str, prefix: str = "modelyard") -> None:
        self._redis: Redis = Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        self._prefix = prefix
        self._acquire = self._redis.register_script(ACQUIRE)
        self._refund = self._redis.register_script(REFUND)

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

    async def ping(self) -> None:
        try:
            await self._redis.ping()
        except RedisError as exc:
            raise LimiterUnavailable(str(exc)) from exc

    async def close(self) -> None:
        await self._redis.aclose()

