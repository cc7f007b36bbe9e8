"""Saturation: whether this process can start a new call promptly, measured two ways.

A process holding thousands of streams saturates its one event loop long before memory or the in-flight
cap. It shows in two places:

- Event-loop lag: every callback, a new call's included, waits for the whole ready queue. `LoopLag` wakes
  every `interval_s` and records how late it woke.
- gRPC's own queue: grpc.aio takes one new call from gRPC core per event-loop turn (and a hop through
  its poller thread), so when turns are long, or the process gets little CPU, calls wait there, unseen
  by the gateway, even while each turn is short enough. The probe measures that wait directly: every
  `probe_every_s` it makes a tiny call (a health Check) to this very process, which queues behind
  everything else; its round trip is how long a new call takes to start.

`saturated` is true while the last two wake-ups were both later than the limit, or the last two probes
both took longer, or the probe in flight has already waited twice the limit: so that a single stall (a
garbage collection, a large reply's parse, a busy neighbour on the machine) sheds nothing, while a
process that is late again and again, or a queue that keeps a call waiting, does. The gateway then
refuses new calls at once with OVERLOADED and RetryInfo (server.tenancy).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

Probe = Callable[[], Awaitable[object]]


class LoopLag:
    """Measures the running loop's lag, and with a `probe`, how long a new call waits to start."""

    def __init__(
        self, limit_s: float, interval_s: float = 0.05, probe: Probe | None = None, probe_every_s: float = 0.1
    ) -> None:
        self.limit_s = limit_s  # 0: measure, never report saturation
        self.interval_s = interval_s
        self.probe = probe
        self.probe_every_s = probe_every_s
        self.lag_s = 0.0  # how late the last wake-up was
        self._previous_s = 0.0  # ... and the one before
        self.start_delay_s = 0.0  # the last probe's round trip
        self._previous_start_s = 0.0
        self._probe_since: float | None = None  # when the probe in flight was sent
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def waiting_s(self) -> float:
        """How long the probe in flight has waited so far (0 with none in flight)."""
        since = self._probe_since
        return 0.0 if since is None else time.perf_counter() - since

    @property
    def saturated(self) -> bool:
        """True while the process cannot start new work within the limit (see the module docstring)."""
        limit = self.limit_s
        if limit <= 0:
            return False
        return (
            min(self.lag_s, self._previous_s) > limit
            or min(self.start_delay_s, self._previous_start_s) > limit
            or self.waiting_s > 2 * limit
        )

    @property
    def delay_s(self) -> float:
        """The worst current measure: loop lag, the last probe's round trip, or the probe in flight."""
        return max(self.lag_s, self.start_delay_s, self.waiting_s)

    @property
    def retry_after_s(self) -> float:
        """What a shed caller is told: about the time the process needs to catch up, within [0.25 s, 5 s]."""
        return min(max(self.delay_s, 0.25), 5.0)

    def start(self) -> None:
        if not self._tasks:
            loop = asyncio.get_running_loop()
            self._tasks.append(loop.create_task(self._run(), name="feather-loop-lag"))
            if self.probe is not None:
                self._tasks.append(loop.create_task(self._run_probe(self.probe), name="feather-start-probe"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._probe_since = None

    async def _run(self) -> None:
        clock = time.perf_counter
        while True:
            due = clock() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self._previous_s, self.lag_s = self.lag_s, max(clock() - due, 0.0)

    async def _run_probe(self, probe: Probe) -> None:
        clock = time.perf_counter
        while True:
            self._probe_since = sent = clock()
            # A probe that fails measures its time all the same: how long the process took to answer.
            with contextlib.suppress(Exception):
                await probe()
            self._previous_start_s, self.start_delay_s = self.start_delay_s, clock() - sent
            self._probe_since = None
            await asyncio.sleep(self.probe_every_s)
