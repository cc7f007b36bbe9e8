"""Circuit breakers per provider:model: stop sending calls to what is failing, probe it after a cooldown.

Closed: calls flow; N failures within the rolling window open the circuit. Open: calls are refused
(routing skips to the next candidate) until the cooldown ends. Half-open: exactly one probe call is
let through; its success closes the circuit and clears old failures, its failure reopens it.
Cancellations and the caller's own bad requests never count.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum


class CircuitState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Permit(StrEnum):
    """What `acquire` grants: a normal call, or the single half-open probe."""

    CALL = "call"
    PROBE = "probe"


@dataclass(frozen=True, slots=True)
class BreakerSettings:
    enabled: bool = True
    failure_threshold: int = 5
    window_s: float = 10.0
    cooldown_s: float = 5.0


@dataclass(slots=True)
class _Circuit:
    failures: deque[float] = field(default_factory=deque)
    opened_at: float | None = None
    probe_in_flight: bool = False


class CircuitBreakers:
    def __init__(self, settings: BreakerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self._clock = clock
        self._circuits: dict[str, _Circuit] = {}

    def acquire(self, key: str) -> Permit | None:
        """A permit to call `key`, or None while its circuit is open (or its probe is out)."""
        if not self.settings.enabled:
            return Permit.CALL
        c = self._circuits.get(key)
        if c is None or c.opened_at is None:
            return Permit.CALL
        if self._clock() - c.opened_at < self.settings.cooldown_s or c.probe_in_flight:
            return None
        c.probe_in_flight = True
        return Permit.PROBE

    def succeeded(self, key: str, permit: Permit) -> None:
        """A successful probe closes the circuit and forgets old failures. Successes while closed change
        nothing: the circuit counts failures in a rolling window, however many calls succeed between them."""
        c = self._circuits.get(key)
        if c is None or permit is not Permit.PROBE:
            return
        c.opened_at = None
        c.probe_in_flight = False
        c.failures.clear()

    def failed(self, key: str, permit: Permit) -> None:
        if not self.settings.enabled:
            return
        now = self._clock()
        c = self._circuits.setdefault(key, _Circuit())
        if permit is Permit.PROBE:
            c.opened_at, c.probe_in_flight = now, False
            return
        if c.opened_at is not None:
            return  # a call that started before the circuit opened: already counted as open
        c.failures.append(now)
        while c.failures and now - c.failures[0] > self.settings.window_s:
            c.failures.popleft()
        if len(c.failures) >= self.settings.failure_threshold:
            c.opened_at = now
            c.failures.clear()

    def released(self, key: str, permit: Permit) -> None:
        """The call ended without a verdict (cancelled, or the caller's own fault): a probe may go again."""
        if permit is Permit.PROBE and (c := self._circuits.get(key)) is not None:
            c.probe_in_flight = False

    def state(self, key: str) -> CircuitState:
        c = self._circuits.get(key)
        if not self.settings.enabled or c is None or c.opened_at is None:
            return CircuitState.CLOSED
        if self._clock() - c.opened_at < self.settings.cooldown_s:
            return CircuitState.OPEN
        return CircuitState.HALF_OPEN

    def reopens_in(self, key: str) -> float | None:
        """Seconds until an open circuit lets a probe through; None when it is not open."""
        c = self._circuits.get(key)
        if c is None or c.opened_at is None:
            return None
        return max(self.settings.cooldown_s - (self._clock() - c.opened_at), 0.0)
