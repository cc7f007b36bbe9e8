"""`stateFailureMode: open`: while the shared store (Redis) is unreachable, decide with local state.

Each wrapper tries the shared store and, on `StateUnavailable`, answers from an in-process fallback, so
the gateway keeps serving with per-replica limits. Spend recorded only locally during the outage is in
the ledger of record; counters in Redis are not back-filled (see README: operations notes).

`reserve`, `adjust` and `settle` send the shared store's decision when called, as the Redis stores do,
and return a coroutine for the verdict: admission starts several before awaiting any, so with this mode
too they share one round trip.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Coroutine
from typing import Any

from feather_grpc.core.breaker import CircuitState, Permit
from feather_grpc.core.circuits import CircuitStore
from feather_grpc.core.limits import BucketSpec, BudgetStore, BudgetWindow, RateLimiter, Reservation, StateUnavailable

log = logging.getLogger(__name__)


class Outage:
    """Shared by the wrappers: whether local state was used since the last reconciliation, and a log
    line at most every 30 s."""

    def __init__(self) -> None:
        self.seen = False
        self._last_log = 0.0

    def note(self, what: str, error: StateUnavailable) -> None:
        self.seen = True
        now = time.monotonic()
        if now - self._last_log > 30:
            self._last_log = now
            log.warning("%s: shared state unreachable (%s); deciding with local state", what, error)


class FailOpenRateLimiter:
    def __init__(self, shared: RateLimiter, local: RateLimiter, outage: Outage) -> None:
        self._shared, self._local, self._outage = shared, local, outage

    def reserve(self, key: str, spec: BucketSpec, amount: float, max_wait_s: float) -> Coroutine[Any, Any, float]:
        return self._reserved(self._shared.reserve(key, spec, amount, max_wait_s), key, spec, amount, max_wait_s)

    async def _reserved(
        self, sent: Awaitable[float], key: str, spec: BucketSpec, amount: float, max_wait_s: float
    ) -> float:
        try:
            return await sent
        except StateUnavailable as e:
            self._outage.note("rate limits", e)
            return await self._local.reserve(key, spec, amount, max_wait_s)

    def adjust(self, key: str, spec: BucketSpec, delta: float) -> Coroutine[Any, Any, None]:
        return self._adjusted(self._shared.adjust(key, spec, delta), key, spec, delta)

    async def _adjusted(self, sent: Awaitable[None], key: str, spec: BucketSpec, delta: float) -> None:
        try:
            await sent
        except StateUnavailable as e:
            self._outage.note("rate limits", e)
            await self._local.adjust(key, spec, delta)

    async def aclose(self) -> None:
        await self._local.aclose()


class FailOpenBudgetStore:
    def __init__(self, shared: BudgetStore, local: BudgetStore, outage: Outage) -> None:
        self._shared, self._local, self._outage = shared, local, outage
        self._local_reservations: set[int] = set()  # id() of reservations made locally

    def reserve(
        self, tenant: str, windows: tuple[BudgetWindow, ...], amount_nanos: int
    ) -> Coroutine[Any, Any, Reservation]:
        return self._reserved(self._shared.reserve(tenant, windows, amount_nanos), tenant, windows, amount_nanos)

    async def _reserved(
        self, sent: Awaitable[Reservation], tenant: str, windows: tuple[BudgetWindow, ...], amount_nanos: int
    ) -> Reservation:
        try:
            return await sent
        except StateUnavailable as e:
            self._outage.note("budgets", e)
            reservation = await self._local.reserve(tenant, windows, amount_nanos)
            self._local_reservations.add(id(reservation))
            return reservation

    def settle(self, reservation: Reservation, actual_nanos: int) -> Coroutine[Any, Any, None]:
        if id(reservation) in self._local_reservations:
            self._local_reservations.discard(id(reservation))
            return self._local.settle(reservation, actual_nanos)
        return self._settled(self._shared.settle(reservation, actual_nanos))

    async def _settled(self, sent: Awaitable[None]) -> None:
        try:
            await sent
        except StateUnavailable as e:
            self._outage.note("budgets", e)

    async def spent(self, tenant: str, window: BudgetWindow) -> int:
        try:
            return await self._shared.spent(tenant, window)
        except StateUnavailable:
            return await self._local.spent(tenant, window)

    async def aclose(self) -> None:
        await self._local.aclose()


class FailOpenCircuitStore:
    def __init__(self, shared: CircuitStore, local: CircuitStore, outage: Outage) -> None:
        self._shared, self._local, self._outage = shared, local, outage
        self.settings = shared.settings

    async def acquire(self, key: str) -> Permit | None:
        try:
            return await self._shared.acquire(key)
        except StateUnavailable as e:
            self._outage.note("circuit breakers", e)
            return await self._local.acquire(key)

    async def succeeded(self, key: str, permit: Permit) -> None:
        await self._both("succeeded", key, permit)

    async def failed(self, key: str, permit: Permit) -> None:
        await self._both("failed", key, permit)

    async def released(self, key: str, permit: Permit) -> None:
        await self._both("released", key, permit)

    async def _both(self, method: str, key: str, permit: Permit) -> None:
        await getattr(self._local, method)(key, permit)
        try:
            await getattr(self._shared, method)(key, permit)
        except StateUnavailable as e:
            self._outage.note("circuit breakers", e)

    async def state(self, key: str) -> CircuitState:
        try:
            return await self._shared.state(key)
        except StateUnavailable:
            return await self._local.state(key)

    async def reopens_in(self, key: str) -> float | None:
        try:
            return await self._shared.reopens_in(key)
        except StateUnavailable:
            return await self._local.reopens_in(key)

    def local_state(self, key: str) -> CircuitState | None:
        return None  # the shared state is the one to show; the local breakers stand in only while it is unreachable

    async def aclose(self) -> None:
        await self._local.aclose()
