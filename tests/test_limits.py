"""Rate limiter, budget store and circuit store: the in-memory and the Redis implementations run the SAME
cases (parametrized rigs), the Redis ones against a real redis-server (tests/redis_server.py).

The memory rigs run on a controllable clock; the Redis rigs on the Redis server's own clock, where
`advance` really sleeps and assertions allow for the real time that passed beyond what was advanced,
measured (`Timeline.slack`): waits can only come out *shorter* than on a frozen clock, never longer,
so the upper bounds stay exact.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from redis.crc import key_slot

from feather_grpc import config
from feather_grpc.config import GatewayConfig, parse_file_config, resolve
from feather_grpc.core.breaker import BreakerSettings, CircuitBreakers, CircuitState, Permit
from feather_grpc.core.circuits import CircuitStore
from feather_grpc.core.errors import RateLimitExceeded
from feather_grpc.core.ledger import UsageRecord
from feather_grpc.core.limits import (
    BucketSpec,
    BudgetExceeded,
    BudgetStore,
    BudgetWindow,
    RateLimited,
    RateLimiter,
    Reservation,
    StateUnavailable,
)
from feather_grpc.core.types import ChatRequest, Message, Role
from feather_grpc.engine.call import CallContext
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.server.app import GatewayServer
from feather_grpc.server.assembly import assemble
from feather_grpc.state.memory_circuits import MemoryCircuitStore
from feather_grpc.state.memory_ledger import MemoryLedger
from feather_grpc.state.memory_limits import BurstExceeded, MemoryBudgetStore, MemoryRateLimiter
from feather_grpc.state.redis_budgets import RedisBudgetStore
from feather_grpc.state.redis_circuits import RedisCircuitStore
from feather_grpc.state.redis_state import RedisState
from feather_grpc.state.resp import RedisClient
from tests.gateway_harness import MOCK_CONFIG, running_gateway
from tests.redis_cluster import RedisCluster
from tests.redis_server import RedisServer


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as cluster:
        yield cluster


def _shared_url(request: pytest.FixtureRequest, kind: str) -> str:
    """The REDIS_URL of the module's single server, or of its three-master cluster."""
    return str(request.getfixturevalue("redis_cluster" if kind == "redis-cluster" else "redis_server").url)


class Timeline:
    """How a test lets time pass: fake clocks for memory, real sleeps for Redis (server clock)."""

    def __init__(self, kind: str, *clocks: Clock) -> None:
        self.kind = kind
        self._clocks = clocks
        self._t0 = time.monotonic()
        self._advanced = 0.0

    async def advance(self, dt: float) -> None:
        if self.kind == "memory":
            for c in self._clocks:
                c.now += dt
        else:
            await asyncio.sleep(dt)
        self._advanced += dt

    @property
    def slack(self) -> float:
        """Upper bound of the time that went by beyond what was advanced (0 on a fake clock)."""
        if self.kind == "memory":
            return 0.0
        return time.monotonic() - self._t0 - self._advanced + 1e-3

    def assert_wait(self, actual: float, expected: float) -> None:
        # Real time passing between calls only shortens a wait: the upper bound is exact.
        assert expected - self.slack - 1e-9 <= actual <= expected + 1e-6, (actual, expected)


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def rig(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Timeline, RateLimiter, BudgetStore]]:
    if request.param == "memory":
        clock, wall = Clock(), Clock(1_700_000_000.0)
        yield Timeline("memory", clock, wall), MemoryRateLimiter(clock), MemoryBudgetStore(wall)
    else:
        # The rules are under test here, not the 0.25 s decision timeout: a busy CI machine may take longer
        # than that to connect to the cluster's three masters.
        url = _shared_url(request, request.param)
        state = RedisState.from_url(url, namespace=f"t{uuid.uuid4().hex[:8]}", timeout_s=5.0)
        yield Timeline("redis"), state.limiter, state.budgets
        await state.aclose()


# ---------------------------------------------------------------- rate limiter


async def test_bucket_starts_full_then_refills_at_rate(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    r, limiter, _ = rig
    spec = BucketSpec(rate=1, burst=5)
    for _ in range(5):
        assert await limiter.reserve("k", spec, 1, 0) == 0
    with pytest.raises(RateLimited) as e:
        await limiter.reserve("k", spec, 1, 0)
    assert e.value.key == "k"
    r.assert_wait(e.value.retry_after_s, 1.0)


async def test_refill_is_exact_second_token_at_1000ms_not_850(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    r, limiter, _ = rig
    spec = BucketSpec(rate=1, burst=1)
    assert await limiter.reserve("k", spec, 1, 0) == 0
    await r.advance(0.85)
    with pytest.raises(RateLimited) as e:  # the original library granted it here
        await limiter.reserve("k", spec, 1, 0)
    r.assert_wait(e.value.retry_after_s, 0.15)
    await r.advance(0.15)
    assert await limiter.reserve("k", spec, 1, 0) == 0
    with pytest.raises(RateLimited):  # and it is the only one
        await limiter.reserve("k", spec, 1, 0)


async def test_sequential_waiters_are_scheduled_first_in_first_out(
    rig: tuple[Timeline, RateLimiter, BudgetStore],
) -> None:
    r, limiter, _ = rig
    spec = BucketSpec(rate=2, burst=2)
    waits = [await limiter.reserve("k", spec, 1, 60) for _ in range(10)]
    assert waits[:2] == [0, 0]
    for i, w in enumerate(waits[2:], start=1):
        r.assert_wait(w, i * 0.5)
    assert all(a < b for a, b in itertools.pairwise(waits[1:]))


async def test_concurrent_reservers_each_get_their_own_slot_in_arrival_order(
    rig: tuple[Timeline, RateLimiter, BudgetStore],
) -> None:
    r, limiter, _ = rig
    spec = BucketSpec(rate=10, burst=1)
    n = 40
    waits = await asyncio.gather(*(limiter.reserve("k", spec, 1, 60) for _ in range(n)))
    if r.kind == "memory":
        # Arrival order is task order here: strictly increasing, one interval apart.
        assert waits == sorted(waits) and len(set(waits)) == n
        for i, w in enumerate(waits):
            r.assert_wait(w, i * 0.1)
    # In any arrival order: no two callers share a slot, and slots are one interval apart
    # (minus the real time between their arrivals).
    ordered = sorted(waits)
    assert ordered[0] == 0
    for a, b in itertools.pairwise(ordered):
        assert 0.1 - r.slack - 1e-9 <= b - a <= 0.1 + 1e-6
    # A newcomer can never jump ahead of a reserved waiter.
    last = await limiter.reserve("k", spec, 1, 60)
    assert last > ordered[-1]
    r.assert_wait(last, n * 0.1)


async def test_max_wait_rejects_with_exact_retry_after_and_reserves_nothing(
    rig: tuple[Timeline, RateLimiter, BudgetStore],
) -> None:
    r, limiter, _ = rig
    spec = BucketSpec(rate=1, burst=1)
    assert await limiter.reserve("k", spec, 1, 0) == 0
    r.assert_wait(await limiter.reserve("k", spec, 1, 5), 1.0)  # a waiter takes the next slot
    for _ in range(3):
        with pytest.raises(RateLimited) as e:
            await limiter.reserve("k", spec, 1, 1.5)  # its slot would be at 2 s
        r.assert_wait(e.value.retry_after_s, 2.0)
    r.assert_wait(await limiter.reserve("k", spec, 1, 2.5), 2.0)  # the rejections took nothing


async def test_multi_token_amounts_like_tokens_per_minute(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    r, limiter, _ = rig
    spec = BucketSpec(rate=600 / 60, burst=600)  # 600 tokens per minute
    assert await limiter.reserve("tpm", spec, 500, 0) == 0
    with pytest.raises(RateLimited) as e:
        await limiter.reserve("tpm", spec, 200, 0)
    r.assert_wait(e.value.retry_after_s, 10.0)  # 100 missing tokens at 10/s
    assert await limiter.reserve("tpm", spec, 100, 0) == 0  # what is there can still be had
    r.assert_wait(await limiter.reserve("tpm", spec, 0.5, 1), 0.05)


async def test_amount_larger_than_burst_can_never_be_satisfied(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    _, limiter, _ = rig
    spec = BucketSpec(rate=100, burst=10)
    with pytest.raises(RateLimited) as e:
        await limiter.reserve("k", spec, 11, 3600)
    assert isinstance(e.value, BurstExceeded)
    assert math.isinf(e.value.retry_after_s)
    assert "at most 10" in str(e.value) and "11 tokens" in str(e.value)
    assert await limiter.reserve("k", spec, 10, 0) == 0  # nothing was taken


async def test_adjust_charges_and_refunds_but_never_past_burst(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    r, limiter, _ = rig
    spec = BucketSpec(rate=1, burst=10)
    # A refund on a full bucket does not grow it beyond burst.
    await limiter.adjust("k", spec, -100)
    assert await limiter.reserve("k", spec, 10, 0) == 0
    with pytest.raises(RateLimited) as e:
        await limiter.reserve("k", spec, 1, 0)
    r.assert_wait(e.value.retry_after_s, 1.0)
    # Refund 4 (the estimate was too high): 4 tokens are back at once.
    await limiter.adjust("k", spec, -4)
    assert await limiter.reserve("k", spec, 4, 0) == 0
    # Charge 3 more than reserved (real usage was higher): the debt pushes the next grant out.
    await limiter.adjust("k", spec, 3)
    with pytest.raises(RateLimited) as e:
        await limiter.reserve("k", spec, 1, 0)
    r.assert_wait(e.value.retry_after_s, 4.0)


async def test_cancelled_waiter_refund_frees_its_slot(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    r, limiter, _ = rig
    spec = BucketSpec(rate=1, burst=1)
    assert await limiter.reserve("k", spec, 1, 0) == 0
    r.assert_wait(await limiter.reserve("k", spec, 1, 10), 1.0)  # a waiter, who then gives up
    await limiter.adjust("k", spec, -1)
    r.assert_wait(await limiter.reserve("k", spec, 1, 10), 1.0)  # the next caller gets that slot


async def test_buckets_are_independent(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    _, limiter, _ = rig
    spec = BucketSpec(rate=1, burst=1)
    assert await limiter.reserve("provider:a:m", spec, 1, 0) == 0
    assert await limiter.reserve("provider:b:m", spec, 1, 0) == 0
    with pytest.raises(RateLimited):
        await limiter.reserve("provider:a:m", spec, 1, 0)


async def test_invalid_specs_are_refused(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    _, limiter, _ = rig
    for spec, amount in [(BucketSpec(0, 1), 1.0), (BucketSpec(1, 0), 0.0), (BucketSpec(1, 1), -1.0)]:
        with pytest.raises(ValueError):
            await limiter.reserve("k", spec, amount, 0)


async def test_memory_limiter_forgets_idle_full_buckets() -> None:
    clock = Clock()
    limiter = MemoryRateLimiter(clock)
    for i in range(10_000):
        await limiter.reserve(f"tenant:t{i}:rpm", BucketSpec(1, 1), 1, 0)
        clock.now += 0.01  # each bucket is full again one second after its reservation
    assert len(limiter._tat) < 5_000


# ---------------------------------------------------------------- budgets


def day(cap: int, key: str = "2026-11-26", ttl: int = 2 * 86_400) -> BudgetWindow:
    return BudgetWindow("day", key, cap, ttl)


def month(cap: int, key: str = "2026-11", ttl: int = 32 * 86_400) -> BudgetWindow:
    return BudgetWindow("month", key, cap, ttl)


async def test_budget_reserve_settle_and_refuse(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    _, _, budgets = rig
    windows = (day(1_000),)
    r1 = await budgets.reserve("acme", windows, 600)
    assert r1.amount_nanos == 600 and r1.tenant == "acme"
    with pytest.raises(BudgetExceeded) as e:
        await budgets.reserve("acme", windows, 500)
    assert (e.value.tenant, e.value.window, e.value.budget_nanos, e.value.spent_nanos) == ("acme", "day", 1_000, 600)
    assert await budgets.spent("acme", windows[0]) == 0  # reserved is not spent
    await budgets.settle(r1, 100)
    assert await budgets.spent("acme", windows[0]) == 100
    r2 = await budgets.reserve("acme", windows, 900)  # exactly the cap
    with pytest.raises(BudgetExceeded):
        await budgets.reserve("acme", windows, 1)
    await budgets.settle(r2, 0)
    assert await budgets.spent("acme", windows[0]) == 100
    assert await budgets.spent("other", windows[0]) == 0


async def test_budget_windows_are_all_or_nothing(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    _, _, budgets = rig
    windows = (day(1_000), month(500))
    with pytest.raises(BudgetExceeded) as e:
        await budgets.reserve("acme", windows, 600)
    assert (e.value.window, e.value.budget_nanos, e.value.spent_nanos) == ("month", 500, 0)
    # The day window was not touched by the refused reservation: 1000 fits it alone.
    r = await budgets.reserve("acme", (day(1_000),), 1_000)
    await budgets.settle(r, 1_000)
    with pytest.raises(BudgetExceeded) as e:
        await budgets.reserve("acme", windows, 1)
    assert (e.value.window, e.value.spent_nanos) == ("day", 1_000)
    assert await budgets.spent("acme", windows[1]) == 0


async def test_settle_records_the_real_cost_even_past_the_cap(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    _, _, budgets = rig
    windows = (day(1_000), month(10_000))
    r = await budgets.reserve("acme", windows, 800)
    await budgets.settle(r, 1_250)  # the call cost more than its worst-case estimate
    assert await budgets.spent("acme", windows[0]) == 1_250
    assert await budgets.spent("acme", windows[1]) == 1_250
    with pytest.raises(BudgetExceeded) as e:
        await budgets.reserve("acme", windows, 1)
    assert (e.value.window, e.value.spent_nanos) == ("day", 1_250)


async def test_budget_money_is_exact_at_large_values(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    _, _, budgets = rig
    cap = 8_000_000 * 10**9  # 8 million dollars in nano-dollars, beyond 14 significant digits
    windows = (month(cap),)
    r = await budgets.reserve("big", windows, 1_234_567_890_123_457)
    await budgets.settle(r, 1_234_567_890_123_457)
    r = await budgets.reserve("big", windows, 3)
    await budgets.settle(r, 3)
    assert await budgets.spent("big", windows[0]) == 1_234_567_890_123_460


async def test_budget_counters_expire_after_their_ttl(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    r_, _, budgets = rig
    window = day(1_000, ttl=1)
    r = await budgets.reserve("acme", (window,), 10)
    await budgets.settle(r, 10)
    assert await budgets.spent("acme", window) == 10
    if isinstance(budgets, RedisBudgetStore):
        ttl = await budgets._client.call("TTL", budgets.key("acme", window))
        assert 0 < ttl <= 1
    else:
        await r_.advance(1.0)
        assert await budgets.spent("acme", window) == 0


async def test_200_concurrent_reserves_exactly_50_fit(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    _, _, budgets = rig
    x = 7_919
    windows = (day(50 * x), month(10**15))

    async def attempt() -> bool:
        try:
            await budgets.reserve("acme", windows, x)
            return True
        except BudgetExceeded:
            return False

    results = await asyncio.gather(*(attempt() for _ in range(200)))
    assert sum(results) == 50


async def _reserve_when_given_back(budgets: BudgetStore, windows: tuple[BudgetWindow, ...], amount: int) -> Reservation:
    """Reserves as soon as a dead holder's lease has run out (refused until then)."""
    async with asyncio.timeout(10):
        while True:
            try:
                return await budgets.reserve("acme", windows, amount)
            except BudgetExceeded:
                await asyncio.sleep(0.02)  # polling Redis's clock: the lease ends there, not here


async def test_a_crashed_holders_reservation_is_given_back_after_its_lease(redis_server: RedisServer) -> None:
    namespace = f"t{uuid.uuid4().hex[:8]}"
    dead = RedisState.from_url(redis_server.url, namespace=namespace, budget_lease_s=0.3)
    state = RedisState.from_url(redis_server.url, namespace=namespace, budget_lease_s=0.3)
    try:
        budgets, windows = state.budgets, (day(1_000), month(10_000))
        lost = await dead.budgets.reserve("acme", windows, 1_000)
        await dead.aclose()  # its replica dies before settling: nobody renews the lease
        with pytest.raises(BudgetExceeded):
            await budgets.reserve("acme", windows, 1)
        held = await _reserve_when_given_back(budgets, windows, 1_000)  # the lease ran out: given back
        # The dead holder's late settle records its real cost, and releases nothing a second time.
        await budgets.settle(lost, 100)
        with pytest.raises(BudgetExceeded) as e:
            await budgets.reserve("acme", windows, 1)
        assert (e.value.window, e.value.spent_nanos) == ("day", 1_100)
        await budgets.settle(held, 200)
        assert [await budgets.spent("acme", w) for w in windows] == [300, 300]
        await budgets.reserve("acme", windows, 700)  # nothing else is held
        leases = budgets._keys("acme", windows)[:2]
        assert await state.client.call("ZCARD", leases[0]) == 1 and await state.client.call("HLEN", leases[1]) == 1
    finally:
        await state.aclose()


async def test_a_live_holders_lease_is_renewed_until_it_settles(redis_server: RedisServer) -> None:
    """A call longer than the lease keeps its reservation: its replica renews it, so another replica's
    reserve never gives it back; once settled, nothing is renewed any more."""
    namespace = f"t{uuid.uuid4().hex[:8]}"
    holder = RedisState.from_url(redis_server.url, namespace=namespace, budget_lease_s=0.4)
    other = RedisState.from_url(redis_server.url, namespace=namespace, budget_lease_s=0.4)
    try:
        windows = (day(1_000),)
        held = await holder.budgets.reserve("acme", windows, 1_000)
        start = holder.budgets.renewals
        async with asyncio.timeout(10):
            while holder.budgets.renewals < start + 8:  # two whole leases, renewed four times each
                with pytest.raises(BudgetExceeded):  # the reserve that would give a lapsed lease back
                    await other.budgets.reserve("acme", windows, 1)
                await asyncio.sleep(0.05)
        await holder.budgets.settle(held, 600)
        assert await other.budgets.spent("acme", windows[0]) == 600
        await other.budgets.reserve("acme", windows, 400)  # the 1,000 held were released exactly once
        assert holder.budgets._renewer is not None
        async with asyncio.timeout(5):
            await holder.budgets._renewer  # nothing left to renew: the renewer ends
    finally:
        await holder.aclose()
        await other.aclose()


async def test_a_reservation_held_past_its_longest_hold_is_no_longer_renewed(redis_server: RedisServer) -> None:
    """A settle that never comes while the replica lives (a bug) holds the budget for max_hold_s, not forever."""
    namespace = f"t{uuid.uuid4().hex[:8]}"
    state = RedisState.from_url(redis_server.url, namespace=namespace)
    budgets = RedisBudgetStore(state.runner, lease_s=0.2, max_hold_s=0.3, namespace=namespace)
    try:
        windows = (day(1_000),)
        await budgets.reserve("acme", windows, 1_000)  # never settled
        await _reserve_when_given_back(state.budgets, windows, 1_000)
        assert not budgets._held
    finally:
        await budgets.aclose()
        await state.aclose()


async def test_budget_with_no_windows_is_a_no_op(rig: tuple[Timeline, RateLimiter, BudgetStore]) -> None:
    _, _, budgets = rig
    r = await budgets.reserve("acme", (), 10**18)
    await budgets.settle(r, 10**18)


# ---------------------------------------------------------------- two replicas on one Redis


def two_replicas(url: str, probe_ttl_s: float = 10.0) -> tuple[RedisState, RedisState]:
    """Two clients with their own connections on one namespace, as two gateway replicas would be."""
    ns = f"t{uuid.uuid4().hex[:8]}"
    settings = BreakerSettings(failure_threshold=3, window_s=10, cooldown_s=0.5)
    a = RedisState.from_url(url, namespace=ns, breaker=settings, probe_ttl_s=probe_ttl_s)
    b = RedisState.from_url(url, namespace=ns, breaker=settings, probe_ttl_s=probe_ttl_s)
    return a, b


@pytest.fixture
async def replicas(redis_server: RedisServer) -> AsyncIterator[tuple[RedisState, RedisState]]:
    a, b = two_replicas(redis_server.url)
    yield a, b
    await a.aclose()
    await b.aclose()


@pytest.fixture(params=["redis", "redis-cluster"])
async def shared_replicas(request: pytest.FixtureRequest) -> AsyncIterator[tuple[RedisState, RedisState]]:
    a, b = two_replicas(_shared_url(request, request.param))
    yield a, b
    await a.aclose()
    await b.aclose()


async def test_two_clients_share_one_budget_exactly(shared_replicas: tuple[RedisState, RedisState]) -> None:
    a, b = shared_replicas
    x = 1_000_003
    windows = (day(50 * x), month(60 * x))

    async def attempt(state: RedisState) -> bool:
        try:
            await state.budgets.reserve("acme", windows, x)
            return True
        except BudgetExceeded:
            return False

    results = await asyncio.gather(*(attempt(a if i % 2 else b) for i in range(200)))
    assert sum(results) == 50
    assert await a.budgets.spent("acme", windows[0]) == 0


async def test_two_clients_share_one_bucket_in_order(shared_replicas: tuple[RedisState, RedisState]) -> None:
    a, b = shared_replicas
    t = Timeline("redis")
    spec = BucketSpec(rate=5, burst=2)
    waits = await asyncio.gather(*(s.limiter.reserve("p:m", spec, 1, 60) for s in [a, b] * 20))
    ordered = sorted(waits)
    assert ordered[:2] == [0, 0] and ordered[2] > 0
    for x, y in itertools.pairwise(ordered[1:]):
        assert 0.2 - t.slack <= y - x <= 0.2 + 1e-6


async def test_keys_are_namespaced_and_one_script_stays_in_one_cluster_slot(
    replicas: tuple[RedisState, RedisState],
) -> None:
    a, _ = replicas
    budget_keys = a.budgets._keys("acme", (day(1), month(1)))
    assert budget_keys[2].endswith("}:budget:day:2026-11-26")
    assert len({key_slot(k.encode()) for k in budget_keys}) == 1
    assert len({key_slot(k.encode()) for k in a.circuits.keys("openai:gpt-4o")}) == 1
    assert a.limiter.key("provider:openai:gpt-4o").endswith(":{rl:provider:openai:gpt-4o}")
    for k in [*budget_keys, *a.circuits.keys("x"), a.limiter.key("x")]:
        assert k.startswith(budget_keys[0].split(":")[0] + ":{")
    assert budget_keys[0].startswith(budget_keys[0].split(":")[0] + ":{tenant:acme}:")


async def test_script_cache_flush_is_survived(replicas: tuple[RedisState, RedisState]) -> None:
    a, _ = replicas
    assert await a.client.call("SCRIPT", "FLUSH") == "OK"
    assert await a.limiter.reserve("k", BucketSpec(1, 1), 1, 0) == 0  # EVALSHA -> NOSCRIPT -> EVAL


async def test_concurrent_decisions_share_round_trips_even_after_a_script_flush(
    replicas: tuple[RedisState, RedisState],
) -> None:
    a, _ = replicas
    assert await a.client.call("SCRIPT", "FLUSH") == "OK"
    trips, decisions = a.runner.round_trips, a.runner.decisions
    waits = await asyncio.gather(*(a.limiter.reserve(f"k{i}", BucketSpec(1, 1), 1, 0) for i in range(50)))
    assert waits == [0.0] * 50
    assert a.runner.decisions - decisions == 50
    # One batch of EVALSHA, refused with NOSCRIPT; one batch of EVAL, which loads the script and runs it.
    assert a.runner.round_trips - trips == 2
    trips = a.runner.round_trips
    results = await asyncio.gather(
        *(a.limiter.reserve(f"k{i}", BucketSpec(1, 1), 1, 0) for i in range(50)), return_exceptions=True
    )
    assert all(isinstance(r, RateLimited) for r in results)
    assert a.runner.round_trips - trips == 1


# ---------------------------------------------------------------- circuit breakers (memory and Redis)


@dataclass
class CircuitRig:
    a: CircuitStore  # two replicas (the same store for memory)
    b: CircuitStore
    time: Timeline

    async def advance(self, dt: float) -> None:
        await self.time.advance(dt)

    @property
    def slack(self) -> float:
        return self.time.slack


@pytest.fixture(params=["memory", "redis", "redis-cluster"])
async def circuits(request: pytest.FixtureRequest) -> AsyncIterator[CircuitRig]:
    if request.param == "memory":
        clock = Clock(1024.0)  # binary-exact sums with the 0.5 s cooldown
        settings = BreakerSettings(failure_threshold=3, window_s=10, cooldown_s=0.5)
        store = MemoryCircuitStore(CircuitBreakers(settings, clock))
        yield CircuitRig(store, store, Timeline("memory", clock))
    else:
        a, b = two_replicas(_shared_url(request, request.param))
        yield CircuitRig(a.circuits, b.circuits, Timeline("redis"))
        await a.aclose()
        await b.aclose()


async def _open(c: CircuitRig, key: str = "p:m") -> None:
    await c.a.failed(key, Permit.CALL)
    await c.b.failed(key, Permit.CALL)
    await c.a.failed(key, Permit.CALL)


async def test_circuit_opens_after_threshold_for_every_replica(circuits: CircuitRig) -> None:
    c = circuits
    assert await c.a.acquire("p:m") is Permit.CALL
    await c.a.failed("p:m", Permit.CALL)
    await c.b.failed("p:m", Permit.CALL)
    assert await c.b.state("p:m") is CircuitState.CLOSED
    assert await c.a.reopens_in("p:m") is None
    await c.a.failed("p:m", Permit.CALL)
    for s in (c.a, c.b):
        assert await s.state("p:m") is CircuitState.OPEN
        assert await s.acquire("p:m") is None
        reopens = await s.reopens_in("p:m")
        assert reopens is not None and 0.5 - c.slack <= reopens <= 0.5
    assert await c.b.acquire("other:m") is Permit.CALL


async def test_only_in_process_circuits_have_a_local_state(circuits: CircuitRig) -> None:
    """What the engine shows (ListModels, metrics): an in-process store's state exactly, read without I/O;
    a shared one has none, so the engine shows what `state()` read last (engine/gateway.py)."""
    c = circuits
    await _open(c)
    for s in (c.a, c.b):
        assert await s.state("p:m") is CircuitState.OPEN
        expected = CircuitState.OPEN if c.time.kind == "memory" else None
        assert s.local_state("p:m") is expected
        assert s.local_state("other:m") is (CircuitState.CLOSED if c.time.kind == "memory" else None)


async def test_successes_while_closed_do_not_reset_the_rolling_window(circuits: CircuitRig) -> None:
    c = circuits
    await c.a.failed("p:m", Permit.CALL)
    await c.b.failed("p:m", Permit.CALL)
    await c.a.succeeded("p:m", Permit.CALL)
    assert await c.b.state("p:m") is CircuitState.CLOSED
    await c.b.failed("p:m", Permit.CALL)
    assert await c.a.state("p:m") is CircuitState.OPEN


async def test_failures_outside_the_window_do_not_count(redis_server: RedisServer) -> None:
    settings = BreakerSettings(failure_threshold=2, window_s=0.3, cooldown_s=5)
    state = RedisState.from_url(redis_server.url, namespace=f"t{uuid.uuid4().hex[:8]}", breaker=settings)
    try:
        await state.circuits.failed("p:m", Permit.CALL)
        await asyncio.sleep(0.35)
        await state.circuits.failed("p:m", Permit.CALL)
        assert await state.circuits.state("p:m") is CircuitState.CLOSED
        await state.circuits.failed("p:m", Permit.CALL)
        assert await state.circuits.state("p:m") is CircuitState.OPEN
    finally:
        await state.aclose()


async def test_exactly_one_probe_across_replicas_and_its_success_closes(circuits: CircuitRig) -> None:
    c = circuits
    await _open(c)
    await c.advance(0.5)
    assert await c.b.state("p:m") is CircuitState.HALF_OPEN
    permits = await asyncio.gather(*(s.acquire("p:m") for s in [c.a, c.b] * 10))
    assert permits.count(Permit.PROBE) == 1 and permits.count(None) == 19
    prober = c.a if permits.index(Permit.PROBE) % 2 == 0 else c.b
    await prober.succeeded("p:m", Permit.PROBE)
    for s in (c.a, c.b):
        assert await s.state("p:m") is CircuitState.CLOSED
        assert await s.acquire("p:m") is Permit.CALL
    # Old failures were cleared: it takes a full threshold again.
    await c.a.failed("p:m", Permit.CALL)
    await c.b.failed("p:m", Permit.CALL)
    assert await c.a.state("p:m") is CircuitState.CLOSED


async def test_failed_probe_reopens_for_a_full_cooldown(circuits: CircuitRig) -> None:
    c = circuits
    await _open(c)
    await c.advance(0.5)
    assert await c.a.acquire("p:m") is Permit.PROBE
    await c.a.failed("p:m", Permit.PROBE)
    assert await c.b.state("p:m") is CircuitState.OPEN
    reopens = await c.b.reopens_in("p:m")
    assert reopens is not None and 0.5 - c.slack <= reopens <= 0.5
    assert await c.b.acquire("p:m") is None
    await c.advance(0.5)
    assert await c.b.acquire("p:m") is Permit.PROBE


async def test_released_probe_lets_another_replica_probe(circuits: CircuitRig) -> None:
    c = circuits
    await _open(c)
    await c.advance(0.5)
    assert await c.a.acquire("p:m") is Permit.PROBE
    assert await c.b.acquire("p:m") is None
    await c.a.released("p:m", Permit.PROBE)
    assert await c.b.state("p:m") is CircuitState.HALF_OPEN
    assert await c.b.acquire("p:m") is Permit.PROBE


async def test_late_success_of_an_old_call_does_not_close_an_open_circuit(circuits: CircuitRig) -> None:
    c = circuits
    await _open(c)
    await c.b.succeeded("p:m", Permit.CALL)
    await c.b.failed("p:m", Permit.CALL)
    assert await c.a.state("p:m") is CircuitState.OPEN


async def test_crashed_prober_does_not_wedge_the_circuit(redis_server: RedisServer) -> None:
    a, b = two_replicas(redis_server.url, probe_ttl_s=0.8)
    try:
        c = CircuitRig(a.circuits, b.circuits, Timeline("redis"))
        await _open(c)
        await asyncio.sleep(0.5)
        assert await a.circuits.acquire("p:m") is Permit.PROBE  # ... and replica a dies with it
        assert await b.circuits.acquire("p:m") is None
        await asyncio.sleep(0.85)
        assert await b.circuits.acquire("p:m") is Permit.PROBE
        # The dead prober's late verdict cannot drop b's probe flag.
        await a.circuits.released("p:m", Permit.PROBE)
        assert await a.circuits.acquire("p:m") is None
    finally:
        await a.aclose()
        await b.aclose()


async def test_a_closed_verdict_is_reused_briefly_and_a_local_failure_forgets_it(redis_server: RedisServer) -> None:
    a_state, b_state = two_replicas(redis_server.url)
    now = [1000.0]
    ns = a_state.circuits.keys("x")[0].split(":")[0]
    a = RedisCircuitStore(a_state.runner, a_state.circuits.settings, namespace=ns, clock=lambda: now[0])
    b = b_state.circuits
    try:
        assert await a.acquire("p:m") is Permit.CALL
        decisions = a_state.runner.decisions
        assert [await a.acquire("p:m") for _ in range(10)] == [Permit.CALL] * 10
        assert a_state.runner.decisions == decisions  # no Redis round trip while the verdict is fresh
        for _ in range(3):
            await b.failed("p:m", Permit.CALL)
        assert await b.acquire("p:m") is None
        now[0] += 0.2
        assert await a.acquire("p:m") is Permit.CALL  # stale by design, for at most closed_cache_s
        now[0] += 0.06
        assert await a.acquire("p:m") is None  # re-read: open

        assert await a.acquire("q:m") is Permit.CALL
        await b.failed("q:m", Permit.CALL)
        await b.failed("q:m", Permit.CALL)
        await a.failed("q:m", Permit.CALL)  # this replica's own failure trips it and forgets the verdict
        assert await a.acquire("q:m") is None
    finally:
        await a_state.aclose()
        await b_state.aclose()


async def test_disabled_breaker_never_touches_redis(redis_server: RedisServer) -> None:
    state = RedisState.from_url(redis_server.url, namespace="off", breaker=BreakerSettings(enabled=False))
    try:
        redis_server.pause()
        try:
            assert await state.circuits.acquire("p:m") is Permit.CALL
            await state.circuits.failed("p:m", Permit.CALL)
            assert await state.circuits.state("p:m") is CircuitState.CLOSED
        finally:
            redis_server.resume()
    finally:
        await state.aclose()


# ---------------------------------------------------------------- outages


@pytest.fixture
def own_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


async def _every_method(state: RedisState) -> list[Callable[[], Awaitable[object]]]:
    spec, windows = BucketSpec(1, 5), (day(10**12),)
    reservation = await state.budgets.reserve("acme", windows, 1)  # taken while Redis is up
    return [
        lambda: state.limiter.reserve("k", spec, 1, 0),
        lambda: state.limiter.adjust("k", spec, -1),
        lambda: state.budgets.reserve("acme", windows, 1),
        lambda: state.budgets.settle(reservation, 1),
        lambda: state.budgets.spent("acme", windows[0]),
        lambda: state.circuits.acquire("p:m"),
        lambda: state.circuits.succeeded("p:m", Permit.CALL),
        lambda: state.circuits.failed("p:m", Permit.CALL),
        lambda: state.circuits.released("p:m", Permit.PROBE),
        lambda: state.circuits.state("p:m"),
        lambda: state.circuits.reopens_in("p:m"),
        state.ping,
    ]


async def _all_unavailable(calls: list[Callable[[], Awaitable[object]]], within_s: float) -> None:
    for call in calls:
        started = time.monotonic()
        with pytest.raises(StateUnavailable):
            await call()
        assert time.monotonic() - started < within_s


async def _all_work(calls: list[Callable[[], Awaitable[object]]]) -> None:
    for call in calls:
        await call()


async def test_redis_killed_then_restarted(own_server: RedisServer) -> None:
    state = RedisState.from_url(own_server.url, timeout_s=0.25)
    try:
        calls = await _every_method(state)
        await _all_work(calls)  # warm pooled connections, which will all be dead
        own_server.stop()
        await _all_unavailable(calls, within_s=2.0)
        own_server.start()  # empty, script cache gone: the same objects must cope
        await _all_work(calls)
        assert await state.limiter.reserve("fresh", BucketSpec(1, 1), 1, 0) == 0
    finally:
        await state.aclose()


async def test_redis_hung_times_out_quickly_then_recovers(own_server: RedisServer) -> None:
    state = RedisState.from_url(own_server.url, timeout_s=0.25)
    try:
        calls = await _every_method(state)
        own_server.pause()
        try:
            started = time.monotonic()
            await _all_unavailable(calls[:3], within_s=1.5)
            assert time.monotonic() - started < 3.0
        finally:
            own_server.resume()
        await _all_work(calls)
    finally:
        await state.aclose()


async def test_unreachable_from_the_start(own_server: RedisServer) -> None:
    own_server.stop()
    state = RedisState.from_url(own_server.url, timeout_s=0.25)
    try:
        started = time.monotonic()
        with pytest.raises(StateUnavailable):
            await state.limiter.reserve("k", BucketSpec(1, 1), 1, 0)
        assert time.monotonic() - started < 2.0
        own_server.start()
        assert await state.limiter.reserve("k", BucketSpec(1, 1), 1, 0) == 0
    finally:
        await state.aclose()


# ---------------------------------------------------------------- admission through the engine, with Redis


def _engine_config(**overrides: Any) -> GatewayConfig:
    doc = copy.deepcopy(MOCK_CONFIG)
    doc["rateLimitMode"] = "reject"
    doc["tenants"] = {"acme": {"limits": {"tpm": 100_000}, "budget": {"dailyUsd": 10, "monthlyUsd": 100}}}
    doc["limits"] = {"mock:mock-fast": {"rps": 0.01, "burst": 3}}
    doc.update(overrides)
    return resolve(parse_file_config(json.dumps(doc), "test"), env={})


async def test_admission_is_one_round_trip_and_the_first_attempt_uses_its_provider_token(
    redis_server: RedisServer,
) -> None:
    """Tokens per minute, the day + month budget and the first attempt's provider:model token: three
    decisions started together, so Redis sees them in ONE write; the attempt then takes no other token."""
    config = _engine_config()
    state = RedisState.from_url(redis_server.url, namespace=f"t{uuid.uuid4().hex[:8]}", breaker=config.routing.breaker)
    tenant = config.tenancy.tenants["acme"]
    request = ChatRequest(model="fast", messages=[Message(Role.USER, "hi")], max_tokens=20)
    bucket = "mock:mock-fast"  # rps 0.01, burst 3: no token comes back during the test
    try:
        async with assemble(
            config, ledger=MemoryLedger(), limiter=state.limiter, budgets=state.budgets, circuits=state.circuits
        ).engine as engine:
            admission, candidates = engine.admission, engine.router.plan("fast")
            warm = await admission.admit(tenant, request, candidates, None, first_slot=bucket)
            await admission.settle(warm, 0, 0)  # loads the scripts (NOSCRIPT, EVAL); the unused token comes back
            assert await state.circuits.acquire("warm:up") is Permit.CALL  # loads the circuit's script

            trips, decisions = state.runner.round_trips, state.runner.decisions
            ticket = await admission.admit(tenant, request, candidates, None, first_slot=bucket)
            assert (state.runner.decisions - decisions, state.runner.round_trips - trips) == (3, 1)
            assert ticket.slot == bucket and ticket.slot_refused is None and ticket.budget is not None
            await admission.provider_slot(bucket, None, ticket)  # the token admission took: no decision
            assert state.runner.decisions - decisions == 3 and ticket.slot is None
            await admission.settle(ticket, 25, 1_000)  # 2 tokens left

            # The whole engine: admission in one write, the circuit's first read, the settlement.
            trips = state.runner.round_trips
            result = await engine.chat(request, CallContext(tenant="acme", tenant_config=tenant))
            assert result.usage.output_tokens > 0 and result.attempts[0].outcome == "ok"
            assert state.runner.round_trips - trips == 3  # 1 token left

            unused = await admission.admit(tenant, request, candidates, None, first_slot=bucket)  # the last one
            refused = await admission.admit(tenant, request, candidates, None, first_slot=bucket)
            assert unused.slot_refused is None and refused.slot_refused is not None
            # Refused for that candidate only (the attempt loop moves on); the tenant's reservations stand.
            assert refused.slot_refused.subject == "provider:mock:mock-fast" and refused.budget is not None
            with pytest.raises(RateLimitExceeded):
                await admission.provider_slot(bucket, None, refused)
            await admission.settle(refused, 0, 0)
            await admission.settle(unused, 0, 0)  # taken by admission, never used: given back
            assert await state.limiter.reserve(f"provider:{bucket}", BucketSpec(0.01, 3), 1, 0) == 0
    finally:
        await state.aclose()


async def test_the_settlement_is_written_before_the_ledger_record(redis_server: RedisServer) -> None:
    """A call's budget settlement leaves for Redis as soon as it is started, not at the end of the turn:
    its round trip overlaps the ledger write (a lone call's record is committed within the turn) instead of
    following it. Seen from the ledger: when the record is made, Redis has had every write of the call."""
    config = _engine_config()
    state = RedisState.from_url(redis_server.url, namespace=f"t{uuid.uuid4().hex[:8]}", breaker=config.routing.breaker)
    tenant = config.tenancy.tenants["acme"]
    request = ChatRequest(model="fast", messages=[Message(Role.USER, "hi")], max_tokens=20)
    writes_at_record: list[int] = []

    class Watching(MemoryLedger):
        async def record(self, record: UsageRecord) -> None:
            writes_at_record.append(state.runner.round_trips)
            await super().record(record)

    try:
        gateway = assemble(
            config,
            ledger=Watching(),
            limiter=state.limiter,
            budgets=state.budgets,
            circuits=state.circuits,
            send_now=state.client.send_now,
        )
        async with gateway.engine as engine:
            await engine.chat(request, CallContext(tenant="acme", tenant_config=tenant))  # loads the scripts
            await engine.chat(request, CallContext(tenant="acme", tenant_config=tenant))
            assert writes_at_record[-1] == state.runner.round_trips  # the settlement's too
    finally:
        await state.aclose()


async def test_the_server_writes_a_settlement_at_once_only_for_a_lone_call(redis_server: RedisServer) -> None:
    """The server's wiring: with REDIS_URL the settlement is written at once when the call is the only one in
    flight (its record is committed within the turn); under load the end of the turn batches settlements."""
    doc = {
        "providers": {"mock": {"type": "mock", "models": [{"name": "m", "inputPer1M": 1, "outputPer1M": 1}]}},
        "ledger": {"type": "memory"},
    }
    cfg = config.resolve(config.parse_file_config(json.dumps(doc), "<test>"), {"REDIS_URL": redis_server.url}, "<t>")
    server = GatewayServer(cfg)
    try:
        send_now = server.engine._settlement._send_now
        budgets = server.engine.budgets
        assert send_now is not None and isinstance(budgets, RedisBudgetStore)
        client = budgets._runner.client
        assert await client.call("PING") == "PONG"  # connected
        trips = client.round_trips
        pending = client.call("PING")
        server.gate.in_flight = 2
        send_now()
        assert client.round_trips == trips  # left for the end of the turn
        server.gate.in_flight = 1
        send_now()
        assert client.round_trips == trips + 1
        assert await pending == "PONG"
    finally:
        server.gate.in_flight = 0
        await server.engine.aclose()
        if server.assembly is not None:
            await server.assembly.aclose()


async def _redis_counters(client: RedisClient) -> tuple[int, dict[str, int]]:
    """Server read events, and calls per command, asked in one write (so one read event of its own)."""
    stats, commands = await asyncio.gather(client.call("INFO", "stats"), client.call("INFO", "commandstats"))
    reads = int(stats.decode().split("total_reads_processed:")[1].split()[0])
    calls = {}
    for line in commands.decode().splitlines():
        if line.startswith("cmdstat_"):
            name, _, fields = line[len("cmdstat_") :].partition(":")
            calls[name] = int(fields.split("calls=")[1].split(",")[0])
    return reads, calls


@pytest.mark.parametrize("failure_mode", ["closed", "open"])
async def test_a_gateway_call_costs_two_redis_round_trips(redis_server: RedisServer, failure_mode: str) -> None:
    """Through the real server and interceptor: the tenant's request token (asked for by the interceptor)
    joins admission's write (budget + provider token); the settlement is the other write. The same with
    `stateFailureMode: open`, whose wrappers send their decisions when called too."""
    doc = copy.deepcopy(MOCK_CONFIG)
    doc["stateFailureMode"] = failure_mode
    doc["tenants"] = {"default": {"limits": {"rpm": 10**6}, "budget": {"dailyUsd": 100}}}
    doc["limits"] = {"mock:mock-fast": {"rps": 1000, "burst": 1000}}
    probe = RedisClient.from_url(redis_server.url)
    try:
        async with running_gateway(doc, {"REDIS_URL": redis_server.url}) as gw:
            ask = pb.ChatRequest(model="fast", messages=[pb.Message(role=pb.ROLE_USER, content="hi")])
            await gw.stub.Chat(ask)  # loads the scripts, reads the circuit
            reads, calls = await _redis_counters(probe)
            reply = await gw.stub.Chat(ask)
            reads_after, calls_after = await _redis_counters(probe)
        assert reply.usage.output_tokens > 0
        scripts = calls_after.get("evalsha", 0) - calls.get("evalsha", 0)
        pings = calls_after.get("ping", 0) - calls.get("ping", 0)  # the health watcher's, once a second
        assert scripts == 4  # request token, budget reservation, provider token, budget settlement
        assert reads_after - reads - 1 - pings == 2  # (minus the counters' own read)
    finally:
        await probe.aclose()
