"""The circuit-breaker store protocol: `CircuitBreakers` semantics, async, so the state can live in Redis.

`MemoryCircuitStore` (state/memory_circuits.py) adapts the in-process `CircuitBreakers` to it;
`RedisCircuitStore` (state/redis_circuits.py) shares the same state between replicas. Both take a `BreakerSettings`.
"""

from __future__ import annotations

from typing import Protocol

from feather_grpc.core.breaker import BreakerSettings, CircuitState, Permit


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

    def local_state(self, key: str) -> CircuitState | None:
        """The state read without I/O when this process holds it (then it is exact); None when the state lives
        elsewhere (Redis): `state()` reads that, and the engine shows the state it read last."""
        ...

    async def reopens_in(self, key: str) -> float | None:
        """Seconds until an open circuit lets a probe through; None when it is not open."""
        ...

    async def aclose(self) -> None: ...
