"""In-process rate limiter and budget store: one process, no I/O, decisions atomic on the event loop.

The rate limiter is GCRA (virtual scheduling). Each bucket keeps one number, its *theoretical arrival
time* `tat`: the moment the bucket would be full again if nothing else arrived. With `T = 1/rate` seconds
per token and a tolerance `tau = burst * T`, a reservation of `n` tokens at `now` moves
`tat' = max(tat, now) + n*T` and may proceed at `tat' - tau`, so it waits `max(0, tat' - tau - now)`.
A fresh bucket (`tat <= now`) is full: `burst` tokens go at once, the next one exactly `T` later.
Because every reservation pushes `tat` forward, waits are handed out strictly in arrival order: a
newcomer is always scheduled after everyone who reserved before it (first-in-first-out by construction).

The same arithmetic runs in Lua in `redis_limiter.py`, on the Redis server's clock.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

from feather_grpc.state.limits import (
    BucketSpec,
    BudgetExceeded,
    BudgetWindow,
    RateLimited,
    Reservation,
)

# Waits shorter than this are float noise from summing 1/rate steps, not a real wait.
_EPSILON_S = 1e-9
# Sweep full (idle) buckets and expired budget windows every this many operations.
_SWEEP_EVERY = 4096


class BurstExceeded(RateLimited):
    """More tokens asked for at once than the bucket can ever hold: waiting will never help.

    `retry_after_s` is `math.inf`; map it to a rejection without RetryInfo (e.g. a prompt plus
    `max_tokens` larger than the tenant's whole tokens-per-minute allowance)."""

    def __init__(self, key: str, amount: float, burst: float) -> None:
        super().__init__(key, math.inf)
        self.args = (f"rate limit {key!r}: {amount:g} tokens requested but the bucket holds at most {burst:g}",)
        self.amount = amount
        self.burst = burst


def check_request(key: str, spec: BucketSpec, amount: float) -> None:
    """Validates a reservation before it reaches any store (shared by the memory and Redis limiters)."""
    if not spec.rate > 0 or not math.isfinite(spec.rate):
        raise ValueError(f"bucket {key!r}: rate must be a positive number, got {spec.rate!r}")
    if not spec.burst > 0 or not math.isfinite(spec.burst):
        raise ValueError(f"bucket {key!r}: burst must be a positive number, got {spec.burst!r}")
    if amount < 0 or not math.isfinite(amount):
        raise ValueError(f"bucket {key!r}: amount must be a finite number >= 0, got {amount!r}")
    if amount > spec.burst:
        raise BurstExceeded(key, amount, spec.burst)


class MemoryRateLimiter:
    """GCRA token buckets in a dict. `clock` is monotonic seconds (injectable for tests)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tat: dict[str, float] = {}
        self._ops = 0

    async def reserve(self, key: str, spec: BucketSpec, amount: float, max_wait_s: float) -> float:
        check_request(key, spec, amount)
        now = self._clock()
        self._maybe_sweep(now)
        interval = 1.0 / spec.rate
        tat = max(self._tat.get(key, now), now)
        new_tat = tat + amount * interval
        wait = new_tat - spec.burst * interval - now
        if wait < _EPSILON_S:
            wait = 0.0
        if wait > max(max_wait_s, 0.0):
            raise RateLimited(key, wait)
        self._tat[key] = new_tat
        return wait

    async def adjust(self, key: str, spec: BucketSpec, delta: float) -> None:
        if not spec.rate > 0 or not math.isfinite(delta):
            raise ValueError(f"bucket {key!r}: bad adjust (rate={spec.rate!r}, delta={delta!r})")
        now = self._clock()
        new_tat = max(self._tat.get(key, now), now) + delta / spec.rate
        if new_tat <= now:  # a refund never fills the bucket beyond burst: full is tat == now
            self._tat.pop(key, None)
        else:
            self._tat[key] = new_tat

    async def aclose(self) -> None:
        self._tat.clear()

    def _maybe_sweep(self, now: float) -> None:
        self._ops += 1
        if self._ops % _SWEEP_EVERY == 0:
            # A bucket whose tat has passed is full: forgetting it changes nothing.
            for k in [k for k, tat in self._tat.items() if tat <= now]:
                del self._tat[k]


@dataclass(slots=True)
class _Window:
    spent: int = 0
    reserved: int = 0
    expires_at: float = 0.0


class MemoryBudgetStore:
    """Spend counters per (tenant, window). `clock` is wall-clock seconds, used only for counter expiry."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._windows: dict[tuple[str, str, str], _Window] = {}
        self._ops = 0

    async def reserve(self, tenant: str, windows: tuple[BudgetWindow, ...], amount_nanos: int) -> Reservation:
        if amount_nanos < 0:
            raise ValueError(f"budget reservation must be >= 0 nano-dollars, got {amount_nanos}")
        now = self._clock()
        self._maybe_sweep(now)
        for w in windows:
            c = self._live(tenant, w, now)
            held = 0 if c is None else c.spent + c.reserved
            if held + amount_nanos > w.cap_nanos:
                raise BudgetExceeded(tenant, w.name, w.cap_nanos, held)
        for w in windows:
            c = self._counter(tenant, w, now)
            c.reserved += amount_nanos
        return Reservation(tenant, windows, amount_nanos)

    async def settle(self, reservation: Reservation, actual_nanos: int) -> None:
        if actual_nanos < 0:
            raise ValueError(f"actual cost must be >= 0 nano-dollars, got {actual_nanos}")
        now = self._clock()
        for w in reservation.windows:
            c = self._counter(reservation.tenant, w, now)
            c.reserved = max(c.reserved - reservation.amount_nanos, 0)
            c.spent += actual_nanos

    async def spent(self, tenant: str, window: BudgetWindow) -> int:
        c = self._live(tenant, window, self._clock())
        return 0 if c is None else c.spent

    async def aclose(self) -> None:
        self._windows.clear()

    def _live(self, tenant: str, w: BudgetWindow, now: float) -> _Window | None:
        k = (tenant, w.name, w.key)
        c = self._windows.get(k)
        if c is not None and c.expires_at <= now:
            del self._windows[k]
            return None
        return c

    def _counter(self, tenant: str, w: BudgetWindow, now: float) -> _Window:
        c = self._live(tenant, w, now)
        if c is None:
            c = self._windows[(tenant, w.name, w.key)] = _Window()
        c.expires_at = now + w.ttl_s  # like Redis EXPIRE on every write
        return c

    def _maybe_sweep(self, now: float) -> None:
        self._ops += 1
        if self._ops % _SWEEP_EVERY == 0:
            for k in [k for k, c in self._windows.items() if c.expires_at <= now]:
                del self._windows[k]
