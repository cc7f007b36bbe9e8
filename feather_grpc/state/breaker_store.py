"""The circuit-breaker store protocol: `CircuitBreakers` semantics, async, so the state can live in Redis.

`MemoryCircuitStore` adapts the in-process `CircuitBreakers` to it; `RedisCircuitStore`
(`redis_circuits.py`) shares the same state between replicas. Both take a `BreakerSettings`.
"""

from __future__ import annotations

from typing import Protocol

from feather_grpc.engine.breaker import BreakerSettings, CircuitBreakers, CircuitState, Permit


class CircuitStore(Protocol):
    settings: BreakerSettings

    async def acquire(self, key: str) -> Permit | None:
        """A permit to call `key` (CALL, or the single half-open PROBE), or None while the circuit is open
        or its probe is out."""
        ...

    async def succeeded(self, key: str, permit: Permit) -> None: ...

    async def failed(self, key: str, permit: Permit) -> None: ...

    async def released(self, key: str, permit: Permit) -> None:
        """The call ended without a verdict (cancelled, or the caller's own fault): a probe may go again."""
        ...

    async def state(self, key: str) -> CircuitState: ...

    async def reopens_in(self, key: str) -> float | None:
        """Seconds until an open circuit lets a probe through; None when it is not open."""
        ...

    async def aclose(self) -> None: ...


class MemoryCircuitStore:
    """The in-process breakers behind the async protocol (one replica; no I/O)."""

    def __init__(self, breakers: CircuitBreakers) -> None:
        self.breakers = breakers
        self.settings = breakers.settings

    async def acquire(self, key: str) -> Permit | None:
        return self.breakers.acquire(key)

    async def succeeded(self, key: str, permit: Permit) -> None:
        self.breakers.succeeded(key, permit)

    async def failed(self, key: str, permit: Permit) -> None:
        self.breakers.failed(key, permit)

    async def released(self, key: str, permit: Permit) -> None:
        self.breakers.released(key, permit)

    async def state(self, key: str) -> CircuitState:
        return self.breakers.state(key)

    async def reopens_in(self, key: str) -> float | None:
        return self.breakers.reopens_in(key)

    async def aclose(self) -> None:
        return None
