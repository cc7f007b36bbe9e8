"""Budget spend restored from the ledger of record: the shared store's counters are a cache of what the
ledger recorded. `WindowRestorer` lifts a window Redis does not know (new, or lost in a restart, failover
or eviction) before it is judged; `reconcile_budgets` lifts every tenant's after an outage served with
local budgets, and at start."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Iterable

from feather_grpc.state.ledger import UsageLedger, UsageQuery
from feather_grpc.state.limits import BudgetWindow, StateUnavailable

log = logging.getLogger(__name__)

# Sets a tenant's spend in a budget window to at least the given nanodollars (RedisBudgetStore.raise_spent_to).
RaiseSpentTo = Callable[[str, BudgetWindow, int], Awaitable[None]]


async def reconcile_budgets(
    ledger: UsageLedger, windows: Iterable[tuple[str, BudgetWindow]], raise_spent_to: RaiseSpentTo
) -> None:
    """Lifts each (tenant, window)'s shared spend counter to what the ledger recorded: after an outage
    served with local budgets (`stateFailureMode: open`), so spend decided locally is not forgotten, and at
    start, so settlements a previous run died before delivering are not either."""
    for tenant, window in windows:
        report = await ledger.query(UsageQuery(start_ns=_window_start(window), tenant=tenant))
        await raise_spent_to(tenant, window, report.total.cost_nanos_usd)
    log.info("budgets reconciled with the ledger")


class WindowRestorer:
    """Lifts a budget window's spend in Redis to what the ledger recorded: before any reservation is judged
    against a window Redis does not know (a new window, or counters Redis lost in a restart, failover or
    eviction: `restore`, awaited by every reservation that found it missing), and in the background when a
    settlement found its lease gone (`reconcile`: Redis lost it, so its cost may be missing). One ledger
    query per window at a time."""

    def __init__(self, ledger: UsageLedger, raise_spent_to: RaiseSpentTo):
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
