"""Hooks through which metrics, tracing and call logs watch the engine without living inside it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Protocol

from feather_grpc.core.ledger import UsageRecord
from feather_grpc.core.results import AttemptRecord


class CallObserver(Protocol):
    """Called synchronously on the event loop: implementations must be cheap and must not raise."""

    def attempt_started(self, request_id: str, provider: str, model: str, streamed: bool) -> object:
        """An upstream attempt begins; the returned token (e.g. a span) comes back in attempt_finished."""
        ...

    def attempt_finished(self, token: object, attempt: AttemptRecord) -> None: ...

    def call_settled(self, record: UsageRecord, attempts: Sequence[AttemptRecord], ttft_ms: int | None) -> None:
        """A call ended (ok, error or cancelled) and its ledger record was written."""
        ...


class AfterReply:
    """Wraps an observer whose `call_settled` can wait for the loop's next turn, after the call's reply has
    gone out (metrics, the call-log line): it then takes nothing from the call's latency, and if it raises,
    the loop logs it and the call is unaffected. It runs in the call's context (contextvars), as before.
    An observer with `call_settled_at(settled_at, record, attempts, ttft_ms)` (metrics) gets that instead,
    with the moment the call settled (time.perf_counter): under load the next turn can come tens of
    milliseconds later, which a duration read then would count. Tracing is not wrapped: it annotates the
    RPC's span, which ends with the reply."""

    def __init__(self, observer: CallObserver) -> None:
        self.observer = observer
        self.attempt_started = observer.attempt_started
        self.attempt_finished = observer.attempt_finished
        self._timed = getattr(observer, "call_settled_at", None)

    def call_settled(self, record: UsageRecord, attempts: Sequence[AttemptRecord], ttft_ms: int | None) -> None:
        loop = asyncio.get_running_loop()
        if self._timed is not None:
            loop.call_soon(self._timed, time.perf_counter(), record, attempts, ttft_ms)
        else:
            loop.call_soon(self.observer.call_settled, record, attempts, ttft_ms)
