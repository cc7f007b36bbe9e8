"""Builds the gateway's state from its configuration: embedded (memory limits, SQLite ledger) by default,
Redis for the hot shared state when `REDIS_URL` is set, Postgres as the ledger of record with
`DATABASE_URL`."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from feather_grpc.config import GatewayConfig, TenantConfig
from feather_grpc.core.breaker import CircuitBreakers
from feather_grpc.core.cache import ResponseCache
from feather_grpc.core.circuits import CircuitStore
from feather_grpc.core.ledger import UsageLedger, UsageQuery
from feather_grpc.core.limits import BudgetStore, BudgetWindow, RateLimiter, StateUnavailable
from feather_grpc.core.settings import Settings
from feather_grpc.state.fail_open import Outage
from feather_grpc.state.memory_cache import MemoryResponseCache
from feather_grpc.state.memory_circuits import MemoryCircuitStore
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
    base = Settings().text("FEATHER_SPOOL_PATH") or str(Path(ledger).with_suffix(".spool.db"))
    return base if worker is None else str(Path(base).with_suffix(f".w{worker}.db"))


def open_ledger(config: GatewayConfig, worker: int | None = None) -> UsageLedger:
    if config.database_url:
        from feather_grpc.state.postgres_ledger import PostgresLedger

        return PostgresLedger(config.database_url, spool_path(config, worker), synchronous=config.ledger_synchronous)
    if config.ledger_type == "memory":
        from feather_grpc.state.memory_ledger import MemoryLedger

        return MemoryLedger()
    from feather_grpc.state.ledger_writer import SOCKET_ENV

    writer_socket = Settings().text(SOCKET_ENV)
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
    shared.budgets.restore = restorer.restore
    shared.budgets.on_lost_settlement = restorer.reconcile
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
    """Pings the shared store forever (`ping` also takes a decision), reporting each change between usable
    and not; with fail-open, an outage the wrappers saw between two pings counts as a change too."""
    healthy = True
    while True:
        problem = ""
        try:
            await ping()
        except Exception as e:  # StateUnavailable (unreachable, or refusing decisions: OOM, READONLY...) or else
            problem = str(e) or type(e).__name__  # e.g. a refused AUTH: the operator needs the reason
        ok = not problem
        if ok and outage is not None and outage.seen:
            outage.seen = False
            healthy = False
        if ok != healthy:
            healthy = ok
            if ok:
                log.warning("shared state store available again")
            else:
                log.warning("shared state store UNAVAILABLE: %s", problem)
            await on_change(ok)
        await asyncio.sleep(interval_s)


async def reconcile_budgets(
    config: GatewayConfig,
    ledger: UsageLedger,
    windows_of: Callable[[TenantConfig], tuple[BudgetWindow, ...]],
    raise_spent_to: Callable[[str, BudgetWindow, int], Awaitable[None]],
) -> None:
    """Lifts each tenant's shared spend counters to what the ledger recorded: after an outage served with
    local budgets (`stateFailureMode: open`), so spend decided locally is not forgotten, and at start, so
    settlements a previous run died before delivering are not either."""
    for tenant in config.tenants.values():
        for window in windows_of(tenant):
            start = _window_start(window)
            report = await ledger.query(UsageQuery(start_ns=start, tenant=tenant.name))
            await raise_spent_to(tenant.name, window, report.total.cost_nanos_usd)
    log.info("budgets reconciled with the ledger")


class WindowRestorer:
    """Lifts a budget window's spend in Redis to what the ledger recorded: before any reservation is judged
    against a window Redis does not know (a new window, or counters Redis lost in a restart, failover or
    eviction: `restore`, awaited by every reservation that found it missing), and in the background when a
    settlement found its lease gone (`reconcile`: Redis lost it, so its cost may be missing). One ledger
    query per window at a time."""

    def __init__(self, ledger: UsageLedger, raise_spent_to: Callable[[str, BudgetWindow, int], Awaitable[None]]):
        self._ledger = ledger
        self._raise_spent_to = raise_spent_to
        self._tasks: dict[tuple[str, str, str], asyncio.Task[None]] = {}
        self._again: set[tuple[str, str, str]] = set()  # reconcile once more when the running one ends

    async def restore(self, tenant: str, window: BudgetWindow) -> None:
        key = (tenant, window.name, window.key)
        task = self._tasks.get(key) or self._start(key, tenant, window)
        await asyncio.shield(task)  # a caller that gives up does not cancel the others' restore

    def reconcile(self, tenant: str, windows: tuple[BudgetWindow, ...]) -> None:
        for window in windows:
            key = (tenant, window.name, window.key)
            if key in self._tasks:  # it may have read the ledger before this call's record landed
                self._again.add(key)
            else:
                self._start(key, tenant, window)

    def _start(self, key: tuple[str, str, str], tenant: str, window: BudgetWindow) -> asyncio.Task[None]:
        task = self._tasks[key] = asyncio.get_running_loop().create_task(self._restore(tenant, window))
        task.add_done_callback(lambda t: self._done(t, key, tenant, window))
        return task

    def _done(self, task: asyncio.Task[None], key: tuple[str, str, str], tenant: str, window: BudgetWindow) -> None:
        self._tasks.pop(key, None)
        if not task.cancelled() and task.exception() is not None:
            log.warning("could not restore budget %s/%s from the ledger: %s", tenant, window.name, task.exception())
        if key in self._again:
            self._again.discard(key)
            self._start(key, tenant, window)

    async def _restore(self, tenant: str, window: BudgetWindow) -> None:
        try:
            report = await self._ledger.query(UsageQuery(start_ns=_window_start(window), tenant=tenant))
        except Exception as e:  # judging against an unknown spend would hand the budget out again
            raise StateUnavailable(f"the ledger could not be read ({type(e).__name__}: {e})") from e
        spent = report.total.cost_nanos_usd
        await self._raise_spent_to(tenant, window, spent)
        if spent:
            log.info("budget %s/%s %s: spend restored from the ledger", tenant, window.name, window.key)

    async def aclose(self) -> None:
        self._again.clear()
        for task in list(self._tasks.values()):
            task.cancel()
        await asyncio.gather(*self._tasks.values(), return_exceptions=True)


def _window_start(window: BudgetWindow) -> int:
    fmt = "%Y-%m-%d" if window.name == "day" else "%Y-%m"
    start = dt.datetime.strptime(window.key, fmt).replace(tzinfo=dt.UTC)
    return int(start.timestamp()) * 1_000_000_000
