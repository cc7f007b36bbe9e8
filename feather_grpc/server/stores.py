"""Builds the gateway's state from its configuration: embedded (memory limits, SQLite ledger) by default,
Redis for the hot shared state when `REDIS_URL` is set, Postgres as the ledger of record with
`DATABASE_URL`."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from feather_grpc.config import GatewayConfig, TenantConfig
from feather_grpc.engine.breaker import CircuitBreakers
from feather_grpc.engine.cache import MemoryResponseCache, ResponseCache
from feather_grpc.state.breaker_store import CircuitStore, MemoryCircuitStore
from feather_grpc.state.fail_open import Outage
from feather_grpc.state.ledger import UsageLedger, UsageQuery
from feather_grpc.state.limits import BudgetStore, BudgetWindow, RateLimiter
from feather_grpc.state.memory_limits import MemoryBudgetStore, MemoryRateLimiter

log = logging.getLogger(__name__)


@dataclass
class Stores:
    """Everything stateful the engine is built on. `reconcile` runs when the shared store comes back."""

    ledger: UsageLedger
    limiter: RateLimiter
    budgets: BudgetStore
    circuits: CircuitStore
    cache: ResponseCache
    ping: Callable[[], Awaitable[None]] | None = None  # raises StateUnavailable while the shared store is down
    raise_spent_to: Callable[[str, BudgetWindow, int], Awaitable[None]] | None = None
    outage: Outage | None = None  # fail-open: set while local state stood in for the shared store
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def aclose(self) -> None:
        for close in self.closers:
            await close()


def spool_path(config: GatewayConfig, worker: int | None) -> str:
    """The local durable spool in front of Postgres: one file per process (workers get their own), next to
    the SQLite ledger's file, or in the working directory when the ledger is configured in memory."""
    ledger = "feather-usage.db" if config.ledger_path == ":memory:" else config.ledger_path
    base = os.environ.get("FEATHER_SPOOL_PATH") or str(Path(ledger).with_suffix(".spool.db"))
    return base if worker is None else str(Path(base).with_suffix(f".w{worker}.db"))


def open_ledger(config: GatewayConfig, worker: int | None = None) -> UsageLedger:
    if config.database_url:
        from feather_grpc.state.postgres_ledger import PostgresLedger

        return PostgresLedger(config.database_url, spool_path(config, worker), synchronous=config.ledger_synchronous)
    if config.ledger_type == "memory":
        from feather_grpc.state.memory_ledger import MemoryLedger

        return MemoryLedger()
    from feather_grpc.state.ledger_writer import SOCKET_ENV

    writer_socket = os.environ.get(SOCKET_ENV)
    if worker is not None and writer_socket:  # serve --workers: one writer process for all (see ledger_writer)
        from feather_grpc.state.ledger_writer import SocketLedger

        return SocketLedger(config.ledger_path, writer_socket, synchronous=config.ledger_synchronous)
    from feather_grpc.state.sqlite_ledger import SqliteLedger

    return SqliteLedger(config.ledger_path, synchronous=config.ledger_synchronous)


def build_stores(config: GatewayConfig, worker: int | None = None) -> Stores:
    local_circuits = MemoryCircuitStore(CircuitBreakers(config.breaker))
    local = Stores(
        ledger=open_ledger(config, worker),
        limiter=MemoryRateLimiter(),
        budgets=MemoryBudgetStore(),
        circuits=local_circuits,
        cache=MemoryResponseCache(config.cache),
    )
    if not config.redis_url:
        return local
    from feather_grpc.state.fail_open import FailOpenBudgetStore, FailOpenCircuitStore, FailOpenRateLimiter
    from feather_grpc.state.redis_cache import RedisResponseCache
    from feather_grpc.state.redis_state import RedisState

    shared = RedisState.from_url(config.redis_url, breaker=config.breaker)
    restorer = WindowRestorer(local.ledger, shared.budgets.raise_spent_to)
    shared.budgets.on_fresh_window = restorer.schedule
    stores = Stores(
        ledger=local.ledger,
        limiter=shared.limiter,
        budgets=shared.budgets,
        circuits=shared.circuits,
        cache=RedisResponseCache(shared.client, config.cache),
        ping=shared.ping,
        raise_spent_to=shared.budgets.raise_spent_to,
        closers=[restorer.aclose, shared.aclose],
    )
    if config.state_failure_mode == "open":
        stores.outage = outage = Outage()
        stores.limiter = FailOpenRateLimiter(shared.limiter, local.limiter, outage)
        stores.budgets = FailOpenBudgetStore(shared.budgets, local.budgets, outage)
        stores.circuits = FailOpenCircuitStore(shared.circuits, local_circuits, outage)
    return stores


async def watch_shared_state(
    ping: Callable[[], Awaitable[None]],
    on_change: Callable[[bool], Awaitable[None]],
    outage: Outage | None = None,
    interval_s: float = 1.0,
) -> None:
    """Pings the shared store forever, reporting each change between reachable and unreachable; with
    fail-open, an outage the wrappers saw between two pings counts as a change too."""
    healthy = True
    while True:
        problem = ""
        try:
            await ping()
        except Exception as e:  # StateUnavailable, or anything else the client raises: unreachable either way
            problem = str(e) or type(e).__name__  # e.g. a refused AUTH: the operator needs the reason
        ok = not problem
        if ok and outage is not None and outage.seen:
            outage.seen = False
            healthy = False
        if ok != healthy:
            healthy = ok
            if ok:
                log.warning("shared state store reachable again")
            else:
                log.warning("shared state store UNREACHABLE: %s", problem)
            await on_change(ok)
        await asyncio.sleep(interval_s)


async def reconcile_budgets(
    config: GatewayConfig,
    ledger: UsageLedger,
    windows_of: Callable[[TenantConfig], tuple[BudgetWindow, ...]],
    raise_spent_to: Callable[[str, BudgetWindow, int], Awaitable[None]],
) -> None:
    """After an outage served with local budgets (`stateFailureMode: open`), lifts each tenant's shared
    spend counters to what the ledger recorded, so spend decided locally is not forgotten."""
    for tenant in config.tenants.values():
        for window in windows_of(tenant):
            start = _window_start(window)
            report = await ledger.query(UsageQuery(start_ns=start, tenant=tenant.name))
            await raise_spent_to(tenant.name, window, report.total.cost_nanos_usd)
    log.info("budgets reconciled with the ledger")


class WindowRestorer:
    """When Redis reports a budget window's counters missing (a new window, or counters Redis lost in a
    restart, failover or eviction), lifts that window's spend to what the ledger recorded, once per window
    at a time, in the background."""

    def __init__(self, ledger: UsageLedger, raise_spent_to: Callable[[str, BudgetWindow, int], Awaitable[None]]):
        self._ledger = ledger
        self._raise_spent_to = raise_spent_to
        self._tasks: dict[tuple[str, str, str], asyncio.Task[None]] = {}

    def schedule(self, tenant: str, window: BudgetWindow) -> None:
        key = (tenant, window.name, window.key)
        if key not in self._tasks:
            task = asyncio.get_running_loop().create_task(self._restore(tenant, window))
            self._tasks[key] = task
            task.add_done_callback(lambda _: self._tasks.pop(key, None))

    async def _restore(self, tenant: str, window: BudgetWindow) -> None:
        try:
            report = await self._ledger.query(UsageQuery(start_ns=_window_start(window), tenant=tenant))
            spent = report.total.cost_nanos_usd
            if spent:
                await self._raise_spent_to(tenant, window, spent)
                log.info("budget %s/%s %s: spend restored from the ledger", tenant, window.name, window.key)
        except Exception as e:  # the ledger or Redis is down: the next fresh window will try again
            log.warning("could not restore budget %s/%s from the ledger: %s", tenant, window.name, e)

    async def aclose(self) -> None:
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


def _window_start(window: BudgetWindow) -> int:
    fmt = "%Y-%m-%d" if window.name == "day" else "%Y-%m"
    start = dt.datetime.strptime(window.key, fmt).replace(tzinfo=dt.UTC)
    return int(start.timestamp()) * 1_000_000_000
