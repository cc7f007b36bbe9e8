"""RedisBudgetStore: per-tenant spend windows in Redis, reserved and settled atomically across windows.

Keys: `feather:{tenant:<t>}:budget:<window>:<instance>` (hash {spent, reserved, restored} in nano-dollars),
and `feather:{tenant:<t>}:budget:leases` / `:lease-data` (open reservations: expiry, and amount + windows).
Budget settlements are the one decision that is retried: a lease settles once, so a re-sent one is
idempotent, and a settlement left unsent would hold its reservation.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from feather_grpc.core.limits import BudgetExceeded, BudgetWindow, Reservation, StateUnavailable
from feather_grpc.state.redis_scripts import PRELUDE, RedisStore, Script, ScriptRunner, command, nothing

log = logging.getLogger(__name__)

# A reservation finding its windows missing restores them and asks again at most this often.
_MAX_RESTORES = 3
# Failed budget settlements kept for re-sending, and the longest pause between two re-sends.
_MAX_UNSETTLED = 100_000
_MAX_SETTLE_RETRY_S = 2.0
# Lease ids per renewal script: a tenant with thousands of calls in flight renews in a few bounded commands.
_RENEW_BATCH = 1_000

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
    PRELUDE
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

# Lease renewal. KEYS[1] leases zset, KEYS[2] leases hash. ARGV[1] lease µs, ARGV[2] lease keys' ttl ms,
# ARGV[3..] lease ids. Pushes the expiry of each lease still held (not settled, not given back) to now + the
# lease; a settled one stays gone and a tombstone keeps its day. Returns how many were renewed.
_BUDGET_RENEW = (
    PRELUDE
    + """
local expiry = fmt(now_us() + tonumber(ARGV[1]))
local renewed = 0
for i = 3, #ARGV do
  local data = redis.call('HGET', KEYS[2], ARGV[i])
  if data and data ~= '0' then
    redis.call('ZADD', KEYS[1], 'XX', expiry, ARGV[i])
    renewed = renewed + 1
  end
end
for k = 1, 2 do
  if redis.call('PTTL', KEYS[k]) < tonumber(ARGV[2]) then redis.call('PEXPIRE', KEYS[k], ARGV[2]) end
end
return renewed
"""
)

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


@dataclass(frozen=True, slots=True)
class LeasedReservation(Reservation):
    """A Redis budget reservation: its lease id lets a crashed holder's reservation be given back."""

    lease_id: str


class RedisBudgetStore(RedisStore):
    """Per-tenant spend windows in Redis hashes; reserve and settle are atomic across all windows.

    Each reservation is a lease of `lease_s` seconds that its holder renews every quarter of that while the
    call lives (one round trip per tenant with open reservations, never on a call's path), up to
    `max_hold_s`: if the holder never settles (the replica crashed), the next reserve of that tenant gives
    the amount back once the lease is over, so a crash holds a budget for about a minute, not for the
    longest call there could be. A settle after the lease ran out still records the real cost, once.

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
        self,
        runner: ScriptRunner,
        *,
        lease_s: float = 60.0,
        max_hold_s: float = 900.0,
        namespace: str = "feather",
        settle_retry_s: float = 0.1,
    ) -> None:
        super().__init__(runner, namespace=namespace)
        self.restore: Callable[[str, BudgetWindow], Awaitable[None]] = self._restore_from_redis
        self.on_lost_settlement: Callable[[str, tuple[BudgetWindow, ...]], None] | None = None
        self.settle_retry_s = settle_retry_s
        self._unsettled: list[tuple[Reservation, int]] = []  # settlements to re-send
        self._retrier: asyncio.Task[None] | None = None
        self._lease_us = str(max(int(lease_s * 1e6), 1))
        self._lease_ms = int(lease_s * 1000)
        # Renewed four times a lease, so that a late or lost renewal (a Redis blip, a busy loop) does not let
        # a live call's reservation run out; a reservation held past max_hold_s (a settle that never came:
        # a bug) is no longer renewed and runs out like a crashed holder's.
        self._renew_every_s = lease_s / 4
        self._max_hold_s = max_hold_s
        self.renewals = 0  # rounds of renewal sent (tests wait on it)
        self._held: dict[str, tuple[str, float]] = {}  # open lease id -> (tenant, renew until: loop time)
        self._renewer: asyncio.Task[None] | None = None
        self._reserve = Script.of(_BUDGET_RESERVE)
        self._renew = Script.of(_BUDGET_RENEW)
        self._settle = Script.of(_BUDGET_SETTLE)
        self._raise_spent = Script.of(_BUDGET_RAISE_SPENT)

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
            lease_id, pending = self._start_reserve(tenant, windows, amount_nanos) or ("", nothing())
            reply = await pending
        if not reply[0]:
            w = windows[int(reply[1]) - 1]
            raise BudgetExceeded(tenant, w.name, w.cap_nanos, int(reply[2]) + int(reply[3]))
        if not amount_nanos:  # nothing held, so no lease: its settle only adds the cost
            return Reservation(tenant, windows, amount_nanos)
        self._hold(tenant, lease_id)
        return LeasedReservation(tenant, windows, amount_nanos, lease_id)

    def _hold(self, tenant: str, lease_id: str) -> None:
        loop = asyncio.get_running_loop()
        self._held[lease_id] = (tenant, loop.time() + self._max_hold_s)
        if self._renewer is None or self._renewer.done():
            self._renewer = loop.create_task(self._renew_leases())

    async def _renew_leases(self) -> None:
        """While this replica holds reservations, renews their leases, one round trip per tenant."""
        loop = asyncio.get_running_loop()
        while self._held:
            await asyncio.sleep(self._renew_every_s)
            now = loop.time()
            by_tenant: dict[str, list[str]] = {}
            for lease_id, (tenant, until) in list(self._held.items()):
                if now > until:
                    del self._held[lease_id]
                    log.warning(
                        "a budget reservation of %r was held past %.0f s; it is no longer renewed",
                        tenant,
                        self._max_hold_s,
                    )
                else:
                    by_tenant.setdefault(tenant, []).append(lease_id)
            keep_ms = str(self._lease_ms + 60_000)
            sent = [
                self._runner.start(
                    self._renew, self._keys(tenant, ())[:2], [self._lease_us, keep_ms, *ids[i : i + _RENEW_BATCH]]
                )
                for tenant, ids in by_tenant.items()
                for i in range(0, len(ids), _RENEW_BATCH)
            ]
            for failed in await asyncio.gather(*sent, return_exceptions=True):
                if isinstance(failed, StateUnavailable):  # the next round tries again, well inside the lease
                    log.debug("budget lease renewal: %s", failed)
                elif isinstance(failed, BaseException):
                    raise failed
            self.renewals += 1

    async def _restore_from_redis(self, tenant: str, window: BudgetWindow) -> None:
        """Without a ledger to ask, a window starts from what Redis itself counts."""
        await self.raise_spent_to(tenant, window, 0)

    def settle(self, reservation: Reservation, actual_nanos: int) -> Coroutine[Any, Any, None]:
        if actual_nanos < 0:
            raise ValueError(f"actual cost must be >= 0 nano-dollars, got {actual_nanos}")
        if not reservation.windows:
            return nothing()
        return self._settled(reservation, actual_nanos, self._start_settle(reservation, actual_nanos))

    def _start_settle(self, reservation: Reservation, actual_nanos: int) -> Awaitable[Any]:
        lease_id = reservation.lease_id if isinstance(reservation, LeasedReservation) else ""
        self._held.pop(lease_id, None)  # settled, or re-sent until it lands: either way no longer renewed
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
        if self._renewer is not None:
            self._renewer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._renewer
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
        value = await command(self._client, "HGET", self.key(tenant, window), "spent")
        return 0 if value is None else int(value)
