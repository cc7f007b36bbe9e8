"""Hooks through which metrics, tracing and call logs watch the engine without living inside it."""

from __future__ import annotations

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
