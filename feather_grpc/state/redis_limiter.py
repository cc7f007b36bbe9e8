"""RedisRateLimiter: GCRA token buckets in Redis, shared by replicas (see memory_limits for the arithmetic).

Key: `feather:{rl:<bucket>}`, the bucket's theoretical arrival time (µs, on the Redis server's clock).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Coroutine
from typing import Any

from feather_grpc.state.limits import BucketSpec, RateLimited
from feather_grpc.state.memory_limits import check_request
from feather_grpc.state.redis_scripts import PRELUDE, RedisStore, Script, ScriptRunner, float_arg, nothing

# Longest wait a caller may ask for (keeps the Lua arithmetic finite): a day.
_MAX_WAIT_CAP_S = 86_400.0

# Returns {1, wait_us} when reserved, {0, wait_us} when the wait exceeds max_wait (nothing reserved).
_RL_RESERVE = (
    PRELUDE
    + """
local now = now_us()
local interval = 1000000 / tonumber(ARGV[1])
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
local new_tat = tat + tonumber(ARGV[3]) * interval
local wait = new_tat - tonumber(ARGV[2]) * interval - now
if wait < 0.001 then wait = 0 end
if wait > tonumber(ARGV[4]) * 1000000 then return {0, fmt(wait)} end
if new_tat > now then
  redis.call('SET', KEYS[1], fmt(new_tat), 'PX', string.format('%d', math.ceil((new_tat - now) / 1000) + 1000))
end
return {1, fmt(wait)}
"""
)

# GCRA charge/refund. KEYS[1] bucket. ARGV: rate/s, delta tokens. A refund never fills beyond burst.
_RL_ADJUST = (
    PRELUDE
    + """
local now = now_us()
local tat = tonumber(redis.call('GET', KEYS[1]) or 0)
if tat < now then tat = now end
local new_tat = tat + tonumber(ARGV[2]) * 1000000 / tonumber(ARGV[1])
if new_tat <= now then
  redis.call('DEL', KEYS[1])
else
  redis.call('SET', KEYS[1], fmt(new_tat), 'PX', string.format('%d', math.ceil((new_tat - now) / 1000) + 1000))
end
return 1
"""
)


class RedisRateLimiter(RedisStore):
    """GCRA token buckets in Redis (same semantics as MemoryRateLimiter, on the server's clock)."""

    def __init__(self, runner: ScriptRunner, *, namespace: str = "feather") -> None:
        super().__init__(runner, namespace=namespace)
        self._reserve = Script.of(_RL_RESERVE)
        self._adjust = Script.of(_RL_ADJUST)

    def key(self, bucket: str) -> str:
        return f"{self._ns}:{{rl:{bucket}}}"

    # reserve, adjust (and the budget store's reserve, settle) send their decision when called and
    # return a coroutine for the verdict (ScriptRunner.start), so callers can overlap them.

    def reserve(self, key: str, spec: BucketSpec, amount: float, max_wait_s: float) -> Coroutine[Any, Any, float]:
        check_request(key, spec, amount)
        max_wait = min(max(max_wait_s, 0.0), _MAX_WAIT_CAP_S)
        args = [float_arg(spec.rate), float_arg(spec.burst), float_arg(amount), float_arg(max_wait)]
        return self._verdict(key, self._runner.start(self._reserve, [self.key(key)], args))

    @staticmethod
    async def _verdict(key: str, reply: Awaitable[Any]) -> float:
        ok, wait_us = await reply
        wait = float(wait_us) / 1e6
        if not ok:
            raise RateLimited(key, wait)
        return wait

    def adjust(self, key: str, spec: BucketSpec, delta: float) -> Coroutine[Any, Any, None]:
        if not spec.rate > 0 or not math.isfinite(delta):
            raise ValueError(f"bucket {key!r}: bad adjust (rate={spec.rate!r}, delta={delta!r})")
        if not delta:
            return nothing()
        return self._runner.start(self._adjust, [self.key(key)], [float_arg(spec.rate), float_arg(delta)])
