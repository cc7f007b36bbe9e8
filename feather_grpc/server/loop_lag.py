"""Saturation: whether this process can start a new call promptly, measured two ways.

A process holding thousands of streams saturates its one event loop long before memory or the in-flight
cap. It shows in two places:

- Event-loop lag: every callback, a new call's included, waits for the whole ready queue. `LoopLag` wakes
  every `interval_s` and records how late it woke.
- gRPC's own queue: grpc.aio takes a method's new calls from gRPC core one at a time (each one waits for
  an event-loop turn and a hop through its poller thread), so when turns are long, or the process gets
  little CPU, a burst of StreamChat calls waits there for seconds, unseen by the gateway, while the
  loop's lag stays small. The probe measures that wait directly: every `probe_every_s` it makes a
  StreamChat or a Chat to this very process (`StartProbes` answers it at once, past the queue); its
  round trip is how long a new call waits to start.

`saturated` is true while the last two wake-ups were both later than the limit, or the last two probes
both took longer, or the probe in flight has already waited twice the limit: so that a single stall (a
garbage collection, a large reply's parse, a busy neighbour on the machine) sheds nothing, while a
process that is late again and again, or a queue that keeps a call waiting, does. The gateway then
refuses new calls at once with OVERLOADED and RetryInfo (server.tenancy).

A probe is a whole gRPC call (about the CPU of a small real one), so a quiet process probes less often:
while fewer than `QUIET_IN_FLIGHT` calls are in flight and every measure is under a quarter of the limit,
every `quiet_probe_every_s` instead of every `probe_every_s`, and the loop's lag every quarter of the limit.
A handful of calls cannot keep the loop's turns long enough for a new call to wait the limit (a process
starved of CPU shows as loop lag), and a burst passes the handful within a few turns: the probes are back
to every `probe_every_s` at the lag sampler's next wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from collections.abc import Awaitable, Callable, Iterable

import grpc

Probe = Callable[[], Awaitable[object]]

QUIET_IN_FLIGHT = 8  # fewer calls in flight than this (and small measures): probe every quiet_probe_every_s


class LoopLag:
    """Measures the running loop's lag, and with a `probe`, how long a new call waits to start."""

    def __init__(
        self,
        limit_s: float,
        interval_s: float = 0.05,
        probe: Probe | None = None,
        probe_every_s: float = 0.1,
        *,
        in_flight: Callable[[], int] | None = None,
        quiet_probe_every_s: float = 1.0,
    ) -> None:
        self.limit_s = limit_s  # 0: measure, never report saturation
        self.interval_s = interval_s
        self.probe = probe
        self.probe_every_s = probe_every_s
        self.in_flight = in_flight  # the calls in flight; None: never quiet, probe every probe_every_s
        self.quiet_probe_every_s = quiet_probe_every_s
        self.lag_s = 0.0  # how late the last wake-up was
        self._previous_s = 0.0  # ... and the one before
        self.start_delay_s = 0.0  # the last probe's round trip
        self._previous_start_s = 0.0
        self._probe_since: float | None = None  # when the probe in flight was sent
        self._quiet_wait: asyncio.Event | None = None  # set to end a quiet wait for the next probe early
        self._tasks: list[asyncio.Task[None]] = []
        # Told every sample, and every probe's round trip (metrics keep them all: `lag_s` and
        # `start_delay_s` are only the last, and a stall between two reads of them would go unseen).
        self.on_sample: Callable[[float], None] | None = None
        self.on_probe: Callable[[float], None] | None = None

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
    def quiet(self) -> bool:
        """True while a probe every `quiet_probe_every_s` is enough (see the module docstring)."""
        in_flight = self.in_flight
        if in_flight is None or in_flight() >= QUIET_IN_FLIGHT:
            return False
        return self.limit_s <= 0 or max(self.lag_s, self.start_delay_s) < self.limit_s / 4

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
            # Quiet, a wake-up every quarter of the limit is enough: it under-measures a stall by less than
            # what makes the process not quiet, and the next one comes after interval_s again.
            interval = max(self.interval_s, self.limit_s / 4) if self.quiet else self.interval_s
            due = clock() + interval
            await asyncio.sleep(interval)
            self._previous_s, self.lag_s = self.lag_s, max(clock() - due, 0.0)
            if self.on_sample is not None:
                self.on_sample(self.lag_s)
            quiet_wait = self._quiet_wait
            if quiet_wait is not None and not self.quiet:  # no longer quiet: probe at once
                quiet_wait.set()

    async def _run_probe(self, probe: Probe) -> None:
        clock = time.perf_counter
        while True:
            self._probe_since = sent = clock()
            # A probe that fails measures its time all the same: how long the process took to answer.
            with contextlib.suppress(Exception):
                await probe()
            self._previous_start_s, self.start_delay_s = self.start_delay_s, clock() - sent
            self._probe_since = None
            if self.on_probe is not None:
                self.on_probe(self.start_delay_s)
            await asyncio.sleep(self.probe_every_s)
            if self.quiet:  # the lag sampler ends the wait as soon as the process is not quiet
                self._quiet_wait = asyncio.Event()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._quiet_wait.wait(), self.quiet_probe_every_s - (clock() - sent))
                self._quiet_wait = None


PROBE_HEADER = "x-feather-start-probe"


class StartProbes:
    """This process's own probe calls, which `CallTracker` answers at once, before anything else sees them:
    grpc.aio queues each method's new calls separately (one taken per event-loop turn), so the probe must
    be a real Chat or StreamChat to wait in their queue; past the queue it costs nothing, is in no ledger,
    log, metric or trace. A probe carries `PROBE_HEADER` with a random token only this process knows, and
    an empty request."""

    def __init__(self) -> None:
        self.token = secrets.token_hex(16)

    def is_probe(self, metadata: Iterable[tuple[str, str | bytes]] | None) -> bool:
        return any(key == PROBE_HEADER and value == self.token for key, value in metadata or ())

    def probe(self, channel: grpc.aio.Channel, timeout_s: float) -> Probe:
        """Alternately a StreamChat and a Chat to this process over `channel`."""
        metadata = ((PROBE_HEADER, self.token),)
        stream = channel.unary_stream("/feather.v1.FeatherService/StreamChat", request_serializer=None)
        unary = channel.unary_unary("/feather.v1.FeatherService/Chat", request_serializer=None)
        turn = 0

        async def once() -> None:
            nonlocal turn
            turn += 1
            if turn % 2:
                async for _ in stream(b"", metadata=metadata, timeout=timeout_s):
                    pass
            else:
                await unary(b"", metadata=metadata, timeout=timeout_s)

        return once
