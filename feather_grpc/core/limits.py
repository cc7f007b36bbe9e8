"""Contracts of the shared hot state: rate limits and spend budgets (memory or Redis behind each).

Both are decided in one step per admission (one Lua round trip with Redis), so replicas sharing a store
hold the limits together.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


class RateLimited(Exception):
    """No capacity within the caller's patience. `retry_after_s` says when capacity will be there."""

    def __init__(self, key: str, retry_after_s: float) -> None:
        super().__init__(f"rate limit {key!r} exhausted; retry in {retry_after_s:.3f}s")
        self.key = key
        self.retry_after_s = retry_after_s


class BudgetExceeded(Exception):
    def __init__(self, tenant: str, window: str, budget_nanos: int, spent_nanos: int) -> None:
        super().__init__(f"tenant {tenant!r} {window} budget exhausted")
        self.tenant = tenant
        self.window = window  # "day" | "month"
        self.budget_nanos = budget_nanos
        self.spent_nanos = spent_nanos  # settled spend plus outstanding reservations


class StateUnavailable(Exception):
    """The shared store (Redis) could not be reached in time."""


@dataclass(frozen=True, slots=True)
class BucketSpec:
    """A token bucket: capacity `burst`, refilled at `rate` tokens per second, starting full."""

    rate: float
    burst: float


class RateLimiter(Protocol):
    async def reserve(self, key: str, spec: BucketSpec, amount: float, max_wait_s: float) -> float:
        """Atomically reserves `amount` tokens of bucket `key` and returns how long the caller must wait
        before using them (0 when available now). Reservations are granted strictly in arrival order
        (virtual scheduling), so waiters are first-in-first-out. When the wait would exceed
        `max_wait_s`, nothing is reserved and `RateLimited` says when to come back."""
        ...

    async def adjust(self, key: str, spec: BucketSpec, delta: float) -> None:
        """Charges (delta > 0) or refunds (delta < 0) tokens after the fact: settling an estimate
        against real usage, or returning a reservation a cancelled waiter never used."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True, slots=True)
class BudgetWindow:
    name: str  # "day" | "month"
    key: str  # window instance, e.g. "2026-11-26" or "2026-11" (UTC)
    cap_nanos: int
    ttl_s: int  # how long the store keeps the window's counters


@dataclass(frozen=True, slots=True)
class Reservation:
    tenant: str
    windows: tuple[BudgetWindow, ...]
    amount_nanos: int


class BudgetStore(Protocol):
    async def reserve(self, tenant: str, windows: tuple[BudgetWindow, ...], amount_nanos: int) -> Reservation:
        """Atomically checks every window (spent + reserved + amount <= cap) and reserves `amount` in all
        of them, or raises BudgetExceeded naming the first window that would overflow."""
        ...

    async def settle(self, reservation: Reservation, actual_nanos: int) -> None:
        """Releases the reservation and adds the real cost to spent, in every window, atomically."""
        ...

    async def spent(self, tenant: str, window: BudgetWindow) -> int: ...

    async def aclose(self) -> None: ...
