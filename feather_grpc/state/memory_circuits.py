"""The circuit store of one process (the shared one is state/redis_circuits.py): the in-process
`CircuitBreakers` behind core.circuits.CircuitStore."""

from __future__ import annotations

from feather_grpc.core.breaker import CircuitBreakers, CircuitState, Permit


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

    def local_state(self, key: str) -> CircuitState | None:
        return self.breakers.state(key)

    async def reopens_in(self, key: str) -> float | None:
        return self.breakers.reopens_in(key)

    async def aclose(self) -> None:
        return None
