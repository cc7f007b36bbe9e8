"""Event-loop lag: how late the loop runs what is ready, the measure of whether a new call can start now.

A process holding thousands of streams saturates its one event loop long before memory or the in-flight
cap: every callback, a new call's included, then waits for the whole ready queue. `LoopLag` wakes every
`interval_s` and records how late it woke. The gateway sheds new calls while the loop is `saturated`:
the last two wake-ups were both later than the limit. Two, so that a single stall (a garbage collection,
a large reply's parse) sheds nothing, while a loop that is late tick after tick does; the lateness a call
itself sees is bounded by about two intervals plus the limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time


class LoopLag:
    """Measures the running loop's lag with a timer that asks to wake every `interval_s`."""

    def __init__(self, limit_s: float, interval_s: float = 0.05) -> None:
        self.limit_s = limit_s  # 0: measure, never report saturation
        self.interval_s = interval_s
        self.lag_s = 0.0  # how late the last wake-up was
        self._previous_s = 0.0  # ... and the one before
        self._task: asyncio.Task[None] | None = None

    @property
    def saturated(self) -> bool:
        """True while the loop cannot start new work within the limit (two wake-ups in a row too late)."""
        return self.limit_s > 0 and min(self.lag_s, self._previous_s) > self.limit_s

    @property
    def retry_after_s(self) -> float:
        """What a shed caller is told: about the time the loop needs to catch up, within [0.25 s, 5 s]."""
        return min(max(self.lag_s, 0.25), 5.0)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="feather-loop-lag")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        clock = time.perf_counter
        while True:
            due = clock() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self._previous_s, self.lag_s = self.lag_s, max(clock() - due, 0.0)
