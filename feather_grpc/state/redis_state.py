"""The hot shared state in Redis, so replicas hold limits, budgets and circuits together.

Every decision is ONE Lua script, so ONE round trip: called by EVALSHA, and by EVAL (which loads it)
only when Redis answers NOSCRIPT, e.g. after a restart. All decisions of one event-loop turn leave in
one write on one connection (`resp.RedisClient`; one per master on Redis Cluster, `resp_cluster`), so
under load many decisions share a round trip.
Scripts read the clock with `redis.call('TIME')`, so replicas with skewed clocks agree. Needs Redis
>= 5 (script effects replication); tested against 6.2.

Keys are namespaced and hash-tagged so that every key one script touches lives in one Redis Cluster slot:

    feather:{rl:<bucket>}                              GCRA theoretical arrival time (µs, server clock)
    feather:{tenant:<t>}:budget:<window>:<instance>    hash {spent, reserved} in nano-dollars
    feather:{tenant:<t>}:budget:leases / :lease-data   open reservations: expiry, and amount + windows
    feather:{cb:<provider:model>}                      hash {opened_at} (µs)
    feather:{cb:<provider:model>}:fails                sorted set of failure times in the rolling window
    feather:{cb:<provider:model>}:probe                the half-open probe flag (a token, with a TTL)

Failure handling: connects and replies are bounded by a short timeout (0.25 s by default); nothing is
retried (a retried reservation whose reply was lost would reserve twice) but budget settlements, which are
idempotent (a lease settles once) and must not hold their reservation; any Redis error or timeout
surfaces as `StateUnavailable`, and the next call reconnects, so after Redis comes back the same
objects work again. Note that a call that timed out may still have been applied.

Wiring — one connection for all three:

    state = RedisState.from_url(os.environ["REDIS_URL"], breaker=config.breaker)
    feather = Feather(config, limiter=state.limiter, budgets=state.budgets)  # + state.circuits
    ...
    await state.aclose()
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import os
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from feather_grpc.engine.breaker import BreakerSettings, CircuitState, Permit
from feather_grpc.state.limits import (
    BucketSpec,
    BudgetExceeded,
    BudgetWindow,
    RateLimited,
    Reservation,
    StateUnavailable,
)
from feather_grpc.state.memory_limits import BurstExceeded, check_request
from feather_grpc.state.resp import RedisCommands, RedisUnavailable, ReplyError, connect

log = logging.getLogger(__name__)

__all__ = [
    "BurstExceeded",
    "LeasedReservation",
    "RedisBudgetStore",
    "RedisCircuitStore",
    "RedisRateLimiter",
    "RedisState",
]

# Longest wait a caller may ask for (keeps the Lua arithmetic finite): a day.
_MAX_WAIT_CAP_S = 86_400.0
# A reservation finding its windows missing restores them and asks again at most this often.
_MAX_RESTORES = 3
# Failed budget settlements kept for re-sending, and the longest pause between two re-sends.
_MAX_UNSETTLED = 100_000
_MAX_SETTLE_RETRY_S = 2.0

# Shared Lua prelude: the server clock in microseconds (an exact integer in a double until year 2255),
# and number formatting that keeps full precision (Lua's default tostring keeps only 14 digits).
_PRELUDE = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function fmt(x) return string.format('%.17g', x) end
"""

# GCRA reserve. KEYS[1] bucket. ARGV: rate/s, burst, amount, max_wait_s.
# Returns {1, wait_us} when reserved, {0, wait_us} when the wait exceeds max_wait (nothing reserved).
_RL_RESERVE = (
    _PRELUDE
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
    _PRELUDE
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

# Budget reserve. KEYS[1] leases zset (lease id -> expiry, µs), KEYS[2] leases hash (lease id -> JSON
# [amount, window keys...], or '0' for a lease given back unsettled), KEYS[3..] one hash per window.
# ARGV[1] amount, ARGV[2] lease id, ARGV[3] lease µs, ARGV[4] lease keys' ttl ms, ARGV[4+i] cap of window i,
# ARGV[4+n+i] ttl_s of window i.
# First gives back the reservations of holders that never settled (a crashed replica) once their lease
# is over, leaving a tombstone for a day so that a late settle still adds its real cost, once. Then:
# {2, i...} when windows i were never restored (their hash has no `restored` field: a new window, or one
# Redis lost in a restart without persistence, a failover or an eviction): nothing is judged or reserved
# until the gateway has lifted their spend to the ledger's (_BUDGET_RAISE_SPENT) and asks again.
# Otherwise it reserves in all windows or none: {1}, or {0, i, spent, reserved} of the first overflow.
# Money stays in strings on the way in and out: Lua numbers are doubles (exact below 2^53 nano-dollars,
# about 9 million dollars, which bounds the comparison only).
_BUDGET_RESERVE = (
    _PRELUDE
    + """
local now = now_us()
local n = #KEYS - 2
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', fmt(now), 'LIMIT', 0, 64)) do
  local data = redis.call('HGET', KEYS[2], id)
  if data and data ~= '0' then
    local lease = cjson.decode(data)
    for j = 2, #lease do
      if redis.call('EXISTS', lease[j]) == 1 and redis.call('HINCRBY', lease[j], 'reserved', '-' .. lease[1]) < 0 then
        redis.call('HSET', lease[j], 'reserved', '0')
      end
    end
    redis.call('HSET', KEYS[2], id, '0')
    redis.call('ZADD', KEYS[1], fmt(now + 86400000000), id)
  else
    redis.call('HDEL', KEYS[2], id)
    redis.call('ZREM', KEYS[1], id)
  end
end
local amount = tonumber(ARGV[1])
local missing = {2}
local held = {}
for i = 1, n do
  local v = redis.call('HMGET', KEYS[2 + i], 'spent', 'reserved', 'restored')
  if not v[3] then missing[#missing + 1] = i end
  held[i] = v
end
if #missing > 1 then return missing end
for i = 1, n do
  local spent, reserved = held[i][1] or '0', held[i][2] or '0'
  if tonumber(spent) + tonumber(reserved) + amount > tonumber(ARGV[4 + i]) then
    return {0, i, spent, reserved}
  end
end
if amount == 0 then return {1} end
local lease = {ARGV[1]}
for i = 1, n do
  redis.call('HINCRBY', KEYS[2 + i], 'reserved', ARGV[1])
  redis.call('EXPIRE', KEYS[2 + i], ARGV[4 + n + i])
  lease[i + 1] = KEYS[2 + i]
end
redis.call('ZADD', KEYS[1], fmt(now + tonumber(ARGV[3])), ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], cjson.encode(lease))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {1}
"""
)

# Budget restore. KEYS[1] the window's hash. ARGV: spent (decimal string), ttl_s. Raises `spent` to ARGV[1]
# if that is more, and marks the window restored (reservations may be judged against it). Compared as digit
# strings, so amounts past 2^53 stay exact.
_BUDGET_RAISE_SPENT = """
local cur = redis.call('HGET', KEYS[1], 'spent') or '0'
local new = ARGV[1]
if #new > #cur or (#new == #cur and new > cur) then
  redis.call('HSET', KEYS[1], 'spent', new)
end
redis.call('HSET', KEYS[1], 'restored', '1')
redis.call('EXPIRE', KEYS[1], ARGV[2])
return 1
"""

# Budget settle. KEYS as for reserve. ARGV[1] lease id ('' for a charge no reservation covers), ARGV[2]
# -reserved, ARGV[3] actual, ARGV[3+i] ttl_s of window i.
# A lease settles once: a retry whose first try landed finds it gone and changes nothing (returns 0, as
# when Redis lost the lease: the gateway then reconciles the spend with its ledger). A lease given back
# unsettled (tombstone '0') releases nothing more: only the cost is added.
_BUDGET_SETTLE = """
local held = false
if ARGV[1] ~= '' then
  local data = redis.call('HGET', KEYS[2], ARGV[1])
  if not data then return 0 end
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[1], ARGV[1])
  held = data ~= '0'
end
for i = 3, #KEYS do
  if held and ARGV[2] ~= '0' and redis.call('HINCRBY', KEYS[i], 'reserved', ARGV[2]) < 0 then
    redis.call('HSET', KEYS[i], 'reserved', '0')
  end
  if ARGV[3] ~= '0' then
    redis.call('HINCRBY', KEYS[i], 'spent', ARGV[3])
    redis.call('EXPIRE', KEYS[i], ARGV[1 + i])
  end
end
return 1
"""

# Circuit keys in every script: KEYS[1] state hash, KEYS[2] probe flag, KEYS[3] failures zset.

# ARGV: cooldown_us, probe_ttl_ms, probe token. Returns 'call', 'probe', or 'open'.
_CB_ACQUIRE = (
    _PRELUDE
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
    _PRELUDE
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
    _PRELUDE
    + """
return {redis.call('HGET', KEYS[1], 'opened_at') or '', fmt(now_us())}
"""
)


@dataclass(frozen=True, slots=True)
class _Script:
    lua: str
    sha: str

    @staticmethod
    def of(lua: str) -> _Script:
        return _Script(lua, hashlib.sha1(lua.encode()).hexdigest())


class ScriptRunner:
    """Runs Lua decisions by EVALSHA, and by EVAL (which loads the script) when Redis answers NOSCRIPT,
    e.g. after a restart. Decisions issued in one event-loop turn leave in one write (RedisClient), so
    at high concurrency many share a network round trip; each script stays atomic on its own, and
    Redis runs them in arrival order, so a replica's waiters stay first-in-first-out."""

    def __init__(self, client: RedisCommands) -> None:
        self.client = client
        self.decisions = 0  # scripts run

    @property
    def round_trips(self) -> int:
        """Writes to Redis so far (a batch of decisions counts once)."""
        return self.client.round_trips

    def start(self, script: _Script, keys: Sequence[str], args: Sequence[str]) -> Coroutine[Any, Any, Any]:
        """Sends the decision now (with the others of this loop turn) and returns a coroutine for its
        reply: a caller that starts several decisions before awaiting any pays one round trip. Always
        await the coroutine."""
        self.decisions += 1
        argv: tuple[str | int, ...] = (len(keys), *keys, *args)
        return self._reply(self.client.call("EVALSHA", script.sha, *argv), script, argv)

    async def _reply(self, sent: Awaitable[Any], script: _Script, argv: tuple[str | int, ...]) -> Any:
        try:
            reply = await sent
            if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
                reply = await self.client.call("EVAL", script.lua, *argv)
        except RedisUnavailable as e:
            raise StateUnavailable(str(e)) from e
        if isinstance(reply, ReplyError):  # e.g. OOM, or a script error: no verdict
            raise StateUnavailable(f"redis: {reply}")
        return reply


async def _nothing() -> None:
    return None


class _RedisStore:
    def __init__(self, runner: ScriptRunner, *, namespace: str) -> None:
        self._runner = runner
        self._client = runner.client
        self._ns = namespace

    def _run(self, script: _Script, keys: Sequence[str], args: Sequence[str]) -> Coroutine[Any, Any, Any]:
        """One decision: one round trip, shared with the other decisions of this loop turn."""
        return self._runner.start(script, keys, args)

    async def aclose(self) -> None:
        return None  # the client belongs to RedisState


def _f(x: float) -> str:
    return repr(float(x))


class RedisRateLimiter(_RedisStore):
    """GCRA token buckets in Redis (same semantics as MemoryRateLimiter, on the server's clock)."""

    def __init__(self, runner: ScriptRunner, *, namespace: str = "feather") -> None:
        super().__init__(runner, namespace=namespace)
        self._reserve = _Script.of(_RL_RESERVE)
        self._adjust = _Script.of(_RL_ADJUST)

    def key(self, bucket: str) -> str:
        return f"{self._ns}:{{rl:{bucket}}}"

    # reserve, adjust (and the budget store's reserve, settle) send their decision when called and
    # return a coroutine for the verdict (ScriptRunner.start), so callers can overlap them.

    def reserve(self, key: str, spec: BucketSpec, amount: float, max_wait_s: float) -> Coroutine[Any, Any, float]:
        check_request(key, spec, amount)
        max_wait = min(max(max_wait_s, 0.0), _MAX_WAIT_CAP_S)
        args = [_f(spec.rate), _f(spec.burst), _f(amount), _f(max_wait)]
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
            return _nothing()
        return self._runner.start(self._adjust, [self.key(key)], [_f(spec.rate), _f(delta)])


@dataclass(frozen=True, slots=True)
class LeasedReservation(Reservation):
    """A Redis budget reservation: its lease id lets a crashed holder's reservation be given back."""

    lease_id: str


class RedisBudgetStore(_RedisStore):
    """Per-tenant spend windows in Redis hashes; reserve and settle are atomic across all windows.

    Each reservation is a lease of `lease_s` seconds (longer than any call should take): if its holder
    never settles (the replica crashed), the next reserve of that tenant gives the amount back, so a
    crash cannot shrink a budget for the rest of its window. A settle after the lease ran out still
    records the real cost, once.

    A window Redis does not know (a new one, or one it lost: restarted without persistence, failed over,
    evicted) is judged only once `restore(tenant, window)` has lifted its spend to what the ledger recorded
    (the gateway's WindowRestorer; without one, to what Redis itself counts): every reservation that found it
    missing waits for that, then asks again, so no call racing the restore is admitted against an empty
    counter. Only those reservations pay the extra round trips.

    A settlement that does not reach Redis (reset, timeout) keeps its reservation only until Redis answers
    again: it is re-sent every `settle_retry_s` (backing off to 2 s) until it lands. A lease settles once, so
    a re-sent settlement whose first try did land changes nothing. A settlement whose lease Redis no longer
    knows calls `on_lost_settlement(tenant, windows)`, so the gateway reconciles those windows with its
    ledger (their spend may be missing this call's cost)."""

    def __init__(
        self, runner: ScriptRunner, *, lease_s: float = 900.0, namespace: str = "feather", settle_retry_s: float = 0.1
    ) -> None:
        super().__init__(runner, namespace=namespace)
        self.restore: Callable[[str, BudgetWindow], Awaitable[None]] = self._restore_from_redis
        self.on_lost_settlement: Callable[[str, tuple[BudgetWindow, ...]], None] | None = None
        self.settle_retry_s = settle_retry_s
        self._unsettled: list[tuple[Reservation, int]] = []  # settlements to re-send
        self._retrier: asyncio.Task[None] | None = None
        self._lease_us = str(max(int(lease_s * 1e6), 1))
        self._lease_ms = int(lease_s * 1000)
        self._reserve = _Script.of(_BUDGET_RESERVE)
        self._settle = _Script.of(_BUDGET_SETTLE)
        self._raise_spent = _Script.of(_BUDGET_RAISE_SPENT)

    def key(self, tenant: str, window: BudgetWindow) -> str:
        return f"{self._ns}:{{tenant:{tenant}}}:budget:{window.name}:{window.key}"

    def _keys(self, tenant: str, windows: tuple[BudgetWindow, ...]) -> list[str]:
        base = f"{self._ns}:{{tenant:{tenant}}}:budget"
        return [f"{base}:leases", f"{base}:lease-data", *(self.key(tenant, w) for w in windows)]

    def reserve(
        self, tenant: str, windows: tuple[BudgetWindow, ...], amount_nanos: int
    ) -> Coroutine[Any, Any, Reservation]:
        if amount_nanos < 0:
            raise ValueError(f"budget reservation must be >= 0 nano-dollars, got {amount_nanos}")
        return self._reserved(tenant, windows, amount_nanos, self._start_reserve(tenant, windows, amount_nanos))

    def _start_reserve(
        self, tenant: str, windows: tuple[BudgetWindow, ...], amount_nanos: int
    ) -> tuple[str, Awaitable[Any]] | None:
        if not windows:
            return None
        lease_id = os.urandom(16).hex()
        keep_ms = max(max(w.ttl_s for w in windows) * 1000, self._lease_ms + 60_000)
        args = [str(int(amount_nanos)), lease_id, self._lease_us, str(int(keep_ms))]
        args += [str(int(w.cap_nanos)) for w in windows]
        args += [str(max(int(w.ttl_s), 1)) for w in windows]
        return lease_id, self._runner.start(self._reserve, self._keys(tenant, windows), args)

    async def _reserved(
        self,
        tenant: str,
        windows: tuple[BudgetWindow, ...],
        amount_nanos: int,
        sent: tuple[str, Awaitable[Any]] | None,
    ) -> Reservation:
        if sent is None:
            return Reservation(tenant, windows, amount_nanos)
        lease_id, pending = sent
        reply = await pending
        restores = 0
        while reply[0] == 2:  # windows Redis does not know: restore them, then be judged
            restores += 1
            if restores > _MAX_RESTORES:
                raise StateUnavailable(f"redis: the budget windows of {tenant!r} keep disappearing")
            await asyncio.gather(*(self.restore(tenant, windows[int(i) - 1]) for i in reply[1:]))
            lease_id, pending = self._start_reserve(tenant, windows, amount_nanos) or ("", _nothing())
            reply = await pending
        if not reply[0]:
            w = windows[int(reply[1]) - 1]
            raise BudgetExceeded(tenant, w.name, w.cap_nanos, int(reply[2]) + int(reply[3]))
        if not amount_nanos:  # nothing held, so no lease: its settle only adds the cost
            return Reservation(tenant, windows, amount_nanos)
        return LeasedReservation(tenant, windows, amount_nanos, lease_id)

    async def _restore_from_redis(self, tenant: str, window: BudgetWindow) -> None:
        """Without a ledger to ask, a window starts from what Redis itself counts."""
        await self.raise_spent_to(tenant, window, 0)

    def settle(self, reservation: Reservation, actual_nanos: int) -> Coroutine[Any, Any, None]:
        if actual_nanos < 0:
            raise ValueError(f"actual cost must be >= 0 nano-dollars, got {actual_nanos}")
        if not reservation.windows:
            return _nothing()
        return self._settled(reservation, actual_nanos, self._start_settle(reservation, actual_nanos))

    def _start_settle(self, reservation: Reservation, actual_nanos: int) -> Awaitable[Any]:
        lease_id = reservation.lease_id if isinstance(reservation, LeasedReservation) else ""
        args = [lease_id, str(-int(reservation.amount_nanos)), str(int(actual_nanos))]
        args += [str(max(int(w.ttl_s), 1)) for w in reservation.windows]
        return self._runner.start(self._settle, self._keys(reservation.tenant, reservation.windows), args)

    async def _settled(self, reservation: Reservation, actual_nanos: int, sent: Awaitable[Any]) -> None:
        try:
            landed = await sent
        except StateUnavailable:
            self._settle_later(reservation, actual_nanos)
            raise
        self._check_landed(reservation, landed)

    def _check_landed(self, reservation: Reservation, landed: Any) -> None:
        if landed == 0 and self.on_lost_settlement is not None:
            self.on_lost_settlement(reservation.tenant, reservation.windows)

    def _settle_later(self, reservation: Reservation, actual_nanos: int) -> None:
        if len(self._unsettled) >= _MAX_UNSETTLED:  # Redis gone for long: the leases' expiry gives these back
            log.warning("%d budget settlements waiting for Redis; dropping the oldest", len(self._unsettled))
            del self._unsettled[0]
        self._unsettled.append((reservation, actual_nanos))
        if self._retrier is None or self._retrier.done():
            self._retrier = asyncio.get_running_loop().create_task(self._resend_unsettled())

    async def _resend_unsettled(self) -> None:
        """Re-sends failed settlements, all in one write, until every one has landed."""
        delay = self.settle_retry_s
        while self._unsettled:
            await asyncio.sleep(delay)
            batch, self._unsettled = self._unsettled, []
            sent = [(r, cost, self._start_settle(r, cost)) for r, cost in batch]
            for reservation, cost, pending in sent:
                try:
                    landed = await pending
                except StateUnavailable:
                    self._unsettled.append((reservation, cost))
                    continue
                self._check_landed(reservation, landed)
            delay = min(delay * 2, _MAX_SETTLE_RETRY_S)

    async def aclose(self) -> None:
        if self._retrier is not None:
            self._retrier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retrier
        if self._unsettled:  # one last try: one left behind holds its reservation for the whole lease
            batch, self._unsettled = self._unsettled, []
            await asyncio.gather(*(self._start_settle(r, cost) for r, cost in batch), return_exceptions=True)

    async def raise_spent_to(self, tenant: str, window: BudgetWindow, spent_nanos: int) -> None:
        """Sets the window's spend to `spent_nanos` unless Redis already counts more, and marks the window
        restored (reconciling with the ledger: a window Redis lost, or an outage during which replicas
        decided locally)."""
        args = [str(int(spent_nanos)), str(max(int(window.ttl_s), 1))]
        await self._run(self._raise_spent, [self.key(tenant, window)], args)

    async def spent(self, tenant: str, window: BudgetWindow) -> int:
        value = await _command(self._client, "HGET", self.key(tenant, window), "spent")
        return 0 if value is None else int(value)


class RedisCircuitStore(_RedisStore):
    """`CircuitBreakers` semantics shared between replicas (see breaker_store.CircuitStore).

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
        self._acquire = _Script.of(_CB_ACQUIRE)
        self._succeeded = _Script.of(_CB_SUCCEEDED)
        self._failed = _Script.of(_CB_FAILED)
        self._released = _Script.of(_CB_RELEASED)
        self._peek = _Script.of(_CB_PEEK)

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
        cooldown_us = _f(self.settings.cooldown_s * 1e6)
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
            self._failed, self.keys(key), [permit.value, token, _f(s.window_s * 1e6), str(s.failure_threshold)]
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

    async def reopens_in(self, key: str) -> float | None:
        elapsed = await self._opened_for(key)
        return None if elapsed is None else max(self.settings.cooldown_s - elapsed, 0.0)


# The health probe's write: what any decision needs Redis to allow (a script, a write, a key in the namespace).
_PROBE = _Script.of("redis.call('SET', KEYS[1], ARGV[1], 'PX', 10000) return 1")


async def _command(client: RedisCommands, *args: str) -> Any:
    """A plain command (not a decision), with Redis trouble as StateUnavailable."""
    try:
        reply = await client.call(*args)
    except RedisUnavailable as e:
        raise StateUnavailable(str(e)) from e
    if isinstance(reply, ReplyError):
        raise StateUnavailable(f"redis: {reply}")
    return reply


class RedisState:
    """The three Redis-backed stores on ONE shared client: all their decisions of one loop turn leave in
    one write (one per master on Redis Cluster)."""

    def __init__(
        self,
        client: RedisCommands,
        *,
        breaker: BreakerSettings | None = None,
        probe_ttl_s: float = 30.0,
        budget_lease_s: float = 900.0,
        namespace: str = "feather",
    ) -> None:
        self.client = client
        self.runner = ScriptRunner(client)
        self._probe_key = f"{namespace}:{{health}}:probe"
        self.limiter = RedisRateLimiter(self.runner, namespace=namespace)
        self.budgets = RedisBudgetStore(self.runner, lease_s=budget_lease_s, namespace=namespace)
        self.circuits = RedisCircuitStore(
            self.runner, breaker or BreakerSettings(), probe_ttl_s=probe_ttl_s, namespace=namespace
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = 0.25,
        connect_timeout_s: float | None = None,
        breaker: BreakerSettings | None = None,
        probe_ttl_s: float = 30.0,
        budget_lease_s: float = 900.0,
        namespace: str = "feather",
    ) -> RedisState:
        """`redis://[user:pass@]host:port/db`, `rediss://...` (TLS) or `unix://...` (see resp.RedisAddress);
        `?cluster=true` for Redis Cluster, with any one node as the address (see resp_cluster).

        `timeout_s` bounds each batch of replies and (unless `connect_timeout_s` is given) each connect.
        `probe_ttl_s`: how long a half-open probe holds its circuit if its replica dies; `budget_lease_s`:
        how long a budget reservation holds its amount if its replica dies."""
        client = connect(url, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
        return cls(client, breaker=breaker, probe_ttl_s=probe_ttl_s, budget_lease_s=budget_lease_s, namespace=namespace)

    async def ping(self) -> None:
        """Raises StateUnavailable unless Redis answers and takes a decision (for health checks).

        A `PING` alone passes while every decision fails: a read-only replica (READONLY), a full Redis
        with `noeviction` (OOM), failed snapshots with `stop-writes-on-bgsave-error` (MISCONF), an ACL
        without scripts or keys (NOPERM). So a one-key script writes under the namespace too, sent as
        every decision is (EVALSHA, EVAL on NOSCRIPT); on Redis Cluster it reaches the master that owns
        the probe's slot, and every master must answer the PING."""
        try:
            await self.client.ping()
        except RedisUnavailable as e:
            raise StateUnavailable(str(e)) from e
        await self.runner.start(_PROBE, [self._probe_key], ["1"])

    async def aclose(self) -> None:
        await self.budgets.aclose()
        await self.client.aclose()
