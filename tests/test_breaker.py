"""Circuit breaker rules, on a controllable clock."""

from __future__ import annotations

from feather_grpc.core.breaker import BreakerSettings, CircuitBreakers, CircuitState, Permit


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _breakers(clock: Clock) -> CircuitBreakers:
    return CircuitBreakers(BreakerSettings(failure_threshold=3, window_s=10, cooldown_s=5), clock)


def test_opens_after_threshold_within_window_only() -> None:
    clock = Clock()
    b = _breakers(clock)
    b.failed("p:m", Permit.CALL)
    b.failed("p:m", Permit.CALL)
    clock.now += 11  # both fall out of the window
    b.failed("p:m", Permit.CALL)
    assert b.state("p:m") is CircuitState.CLOSED
    b.failed("p:m", Permit.CALL)
    b.failed("p:m", Permit.CALL)
    assert b.state("p:m") is CircuitState.OPEN
    assert b.acquire("p:m") is None
    assert b.reopens_in("p:m") == 5
    assert b.acquire("other:m") is Permit.CALL  # per provider:model


def test_half_open_admits_exactly_one_probe_and_success_closes() -> None:
    clock = Clock()
    b = _breakers(clock)
    for _ in range(3):
        b.failed("p:m", Permit.CALL)
    clock.now += 5
    assert b.state("p:m") is CircuitState.HALF_OPEN
    assert b.acquire("p:m") is Permit.PROBE
    assert b.acquire("p:m") is None  # the probe is out: nobody else
    b.succeeded("p:m", Permit.PROBE)
    assert b.state("p:m") is CircuitState.CLOSED
    # old failures were cleared: it takes a full threshold again
    b.failed("p:m", Permit.CALL)
    b.failed("p:m", Permit.CALL)
    assert b.state("p:m") is CircuitState.CLOSED


def test_failed_probe_reopens_for_a_full_cooldown() -> None:
    clock = Clock()
    b = _breakers(clock)
    for _ in range(3):
        b.failed("p:m", Permit.CALL)
    clock.now += 6
    assert b.acquire("p:m") is Permit.PROBE
    b.failed("p:m", Permit.PROBE)
    assert b.state("p:m") is CircuitState.OPEN
    clock.now += 4.9
    assert b.acquire("p:m") is None
    clock.now += 0.1
    assert b.acquire("p:m") is Permit.PROBE


def test_cancelled_probe_lets_another_probe_go() -> None:
    clock = Clock()
    b = _breakers(clock)
    for _ in range(3):
        b.failed("p:m", Permit.CALL)
    clock.now += 5
    assert b.acquire("p:m") is Permit.PROBE
    b.released("p:m", Permit.PROBE)
    assert b.state("p:m") is CircuitState.HALF_OPEN
    assert b.acquire("p:m") is Permit.PROBE


def test_disabled_never_opens() -> None:
    b = CircuitBreakers(BreakerSettings(enabled=False, failure_threshold=1), Clock())
    b.failed("p:m", Permit.CALL)
    assert b.acquire("p:m") is Permit.CALL and b.state("p:m") is CircuitState.CLOSED


def test_successes_between_failures_do_not_reset_the_rolling_window() -> None:
    clock = Clock()
    b = _breakers(clock)
    for _ in range(3):
        b.failed("p:m", Permit.CALL)
        b.succeeded("p:m", Permit.CALL)
    assert b.state("p:m") is CircuitState.OPEN
