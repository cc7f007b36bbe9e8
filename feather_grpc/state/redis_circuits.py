"""RedisCircuitStore: circuit breakers shared between replicas (the semantics of breaker_store.CircuitStore).

Keys: `feather:{cb:<provider:model>}` (hash {opened_at}, µs), `...:fails` (sorted set of failure times in
the rolling window) and `...:probe` (the half-open probe flag: a token, with a TTL).
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable

from feather_grpc.core.breaker import BreakerSettings, CircuitState, Permit
from feather_grpc.state.redis_scripts import PRELUDE, RedisStore, Script, ScriptRunner, float_arg

# ARGV: cooldown_us, probe_ttl_ms, probe token. Returns 'call', 'probe', or 'open'.
_CB_ACQUIRE = (
    PRELUDE
    + """
local opened = redis.call('HGET', KEYS[1], 'opened_at')
if not opened then return 'call' end
if now_us() - tonumber(opened) < tonumber(ARGV[1]) then return 'open' end
if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[2]) then return 'probe' end
return 'open'
"""
)

# ARGV: permit. A probe's success closes the circuit and clears failures; successes while closed change
# nothing (failures are counted in a rolling window), so the engine does not even send them.
_CB_SUCCEEDED = """
if ARGV[1] == 'probe' then
  redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
end
return 1
"""

# ARGV: permit, probe token, window_us, threshold. Returns 'open' or 'closed'.
_CB_FAILED = (
    PRELUDE
    + """
local now = now_us()
if ARGV[1] == 'probe' then
  redis.call('HSET', KEYS[1], 'opened_at', fmt(now))
  if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
  return 'open'
end
if redis.call('HEXISTS', KEYS[1], 'opened_at') == 1 then return 'open' end
local window = tonumber(ARGV[3])
redis.call('ZADD', KEYS[3], fmt(now), fmt(now) .. ':' .. redis.call('ZCARD', KEYS[3]))
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. fmt(now - window))
if redis.call('ZCARD', KEYS[3]) >= tonumber(ARGV[4]) then
  redis.call('HSET', KEYS[1], 'opened_at', fmt(now))
  redis.call('DEL', KEYS[3])
  return 'open'
end
redis.call('PEXPIRE', KEYS[3], string.format('%d', math.ceil(window / 1000) + 1000))
return 'closed'
"""
)

# ARGV: probe token. Drops the probe flag if it is still ours.
_CB_RELEASED = """
if redis.call('GET', KEYS[2]) == ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""

# Returns {opened_at or '', now_us}.
_CB_PEEK = (
    PRELUDE
    + """
return {redis.call('HGET', KEYS[1], 'opened_at') or '', fmt(now_us())}
"""
)


class RedisCircuitStore(RedisStore):
    """`CircuitBreakers` semantics shared between replicas (see core.circuits.CircuitStore).

    The half-open probe is an atomic SET NX flag with a TTL (`probe_ttl_s`), so a prober that crashed
    only holds the circuit until the flag expires. The flag's value is a per-acquire token, so a probe
    that outlived its flag never drops another replica's.

    A CLOSED verdict is reused for `closed_cache_s` (0.25 s): a healthy provider costs one Redis read
    per key every quarter second, not one per call. The price is bounded staleness: a circuit another
    replica just opened may still let this replica's calls through for that long, and only until this
    replica reports a failure there itself (a failure forgets the cached verdict). Open and half-open
    circuits are read from Redis on every acquire, so exactly one probe goes out."""

    def __init__(
        self,
        runner: ScriptRunner,
        settings: BreakerSettings,
        *,
        probe_ttl_s: float = 30.0,
        closed_cache_s: float = 0.25,
        namespace: str = "feather",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(runner, namespace=namespace)
        self.settings = settings
        self._closed_cache_s = closed_cache_s
        self._closed_until: dict[str, float] = {}  # key -> until when CLOSED is taken as read (clock)
        self._clock = clock
        self._probe_ttl_ms = max(int(probe_ttl_s * 1000), 1)
        self._probe_tokens: dict[str, str] = {}
        # A probe token names this acquire uniquely across replicas: a random prefix and a counter.
        self._replica = os.urandom(8).hex() + ":"
        self._acquires = itertools.count()
        self._acquire = Script.of(_CB_ACQUIRE)
        self._succeeded = Script.of(_CB_SUCCEEDED)
        self._failed = Script.of(_CB_FAILED)
        self._released = Script.of(_CB_RELEASED)
        self._peek = Script.of(_CB_PEEK)

    def keys(self, key: str) -> list[str]:
        base = f"{self._ns}:{{cb:{key}}}"
        return [base, f"{base}:probe", f"{base}:fails"]

    async def acquire(self, key: str) -> Permit | None:
        if not self.settings.enabled:
            return Permit.CALL
        now = self._clock()
        if self._closed_until.get(key, -math.inf) > now:
            return Permit.CALL
        token = f"{self._replica}{next(self._acquires)}"
        cooldown_us = float_arg(self.settings.cooldown_s * 1e6)
        got = await self._run(self._acquire, self.keys(key), [cooldown_us, str(self._probe_ttl_ms), token])
        if got == b"call":
            self._closed_until[key] = now + self._closed_cache_s
            return Permit.CALL
        if got == b"probe":
            self._probe_tokens[key] = token
            return Permit.PROBE
        return None

    async def succeeded(self, key: str, permit: Permit) -> None:
        if permit is Permit.PROBE:
            self._probe_tokens.pop(key, None)
        await self._run(self._succeeded, self.keys(key), [permit.value])

    async def failed(self, key: str, permit: Permit) -> None:
        if not self.settings.enabled:
            return
        self._closed_until.pop(key, None)
        token = self._probe_tokens.pop(key, "") if permit is Permit.PROBE else ""
        s = self.settings
        await self._run(
            self._failed, self.keys(key), [permit.value, token, float_arg(s.window_s * 1e6), str(s.failure_threshold)]
        )

    async def released(self, key: str, permit: Permit) -> None:
        if permit is Permit.PROBE:
            token = self._probe_tokens.pop(key, "")
            await self._run(self._released, self.keys(key), [token])

    async def _opened_for(self, key: str) -> float | None:
        """Seconds since the circuit opened (server clock), or None when it is closed."""
        opened, now = await self._run(self._peek, self.keys(key), [])
        if not opened:
            return None
        return (float(now) - float(opened)) / 1e6

    async def state(self, key: str) -> CircuitState:
        if not self.settings.enabled:
            return CircuitState.CLOSED
        elapsed = await self._opened_for(key)
        if elapsed is None:
            return CircuitState.CLOSED
        return CircuitState.OPEN if elapsed < self.settings.cooldown_s else CircuitState.HALF_OPEN

    def local_state(self, key: str) -> CircuitState | None:
        return None  # in Redis: only `state()` reads it

    async def reopens_in(self, key: str) -> float | None:
        elapsed = await self._opened_for(key)
        return None if elapsed is None else max(self.settings.cooldown_s - elapsed, 0.0)
