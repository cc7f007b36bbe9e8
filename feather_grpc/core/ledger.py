"""The usage ledger contract: one record per call, aggregated on demand."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class LedgerWriteError(Exception):
    """A record could not be made durable: the disk is full, the file system read-only, the database failing.
    The message says why (the database's own words, never a record's content)."""


class Outcome(StrEnum):
    OK = "ok"
    ERROR = "error"
    CANCELLED = "cancelled"
    CACHE_HIT = "cache_hit"


@dataclass(slots=True)
class UsageRecord:
    """What one call consumed and cost. Written for every call: failed and cancelled ones too."""

    request_id: str
    time_ns: int  # wall-clock UTC, nanoseconds since the epoch, when the call started
    tenant: str = "default"
    provider: str = ""  # the provider that served (or last tried); "" if none was tried
    model: str = ""  # configured model name; "" if resolution failed
    requested_model: str = ""  # what the caller asked for
    outcome: Outcome = Outcome.OK
    error_code: str = ""  # gRPC status code name for errors, e.g. "UNAVAILABLE"
    error_reason: str = ""  # ErrorInfo reason for errors
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    web_search_requests: int = 0  # server-side web searches the provider billed per request
    cache_write_1h_tokens: int = 0  # of cache_write_tokens, those written with a 1-hour TTL
    audio_input_tokens: int = 0  # of input_tokens not read from a cache, those of audio
    audio_output_tokens: int = 0  # of output_tokens, those of audio
    cost_nanos_usd: int = 0
    estimated: bool = False  # usage estimated because the provider never reported it
    unpriced: bool = False
    streamed: bool = False
    attempt_count: int = 0
    latency_ms: int = 0
    tags: dict[str, str] = field(default_factory=dict)


class GroupBy(StrEnum):
    TENANT = "tenant"
    PROVIDER = "provider"
    MODEL = "model"
    TAG = "tag"
    HOUR = "hour"
    DAY = "day"


@dataclass(slots=True)
class UsageQuery:
    start_ns: int | None = None  # inclusive
    end_ns: int | None = None  # exclusive
    group_by: list[GroupBy] = field(default_factory=list)
    tenant: str = ""  # "" = all tenants
    provider: str = ""
    model: str = ""
    tag_key: str = ""  # required when grouping by TAG
    tags: dict[str, str] = field(default_factory=dict)  # records must carry all of them
    # Pages, with group_by: at most page_size rows (0: all), of the groups whose keys sort after `after`
    # (the grouping key values of the previous page's last row, in group_by order).
    page_size: int = 0
    after: tuple[str | int, ...] | None = None


@dataclass(slots=True)
class UsageTotals:
    """One aggregated row. Grouping keys are set only for the dimensions grouped by."""

    tenant: str = ""
    provider: str = ""
    model: str = ""
    tag_value: str = ""
    bucket_start_ns: int | None = None  # hour or day start, UTC
    request_count: int = 0
    ok_count: int = 0  # ok and cache hits
    error_count: int = 0
    cancelled_count: int = 0
    cached_count: int = 0
    estimated_count: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    web_search_requests: int = 0
    cache_write_1h_tokens: int = 0
    audio_input_tokens: int = 0
    audio_output_tokens: int = 0
    cost_nanos_usd: int = 0


@dataclass(slots=True)
class UsageReport:
    rows: list[UsageTotals]  # empty when the query has no group_by; ordered by the grouping keys
    total: UsageTotals  # of every matching record, whatever the page
    more: bool = False  # a page: groups follow its last row


class UsageLedger(Protocol):
    async def ready(self) -> None:
        """Return once the store is open; raise what opening it raised (a server checks before serving)."""
        ...

    async def record(self, record: UsageRecord) -> None:
        """Store one record; returns only once it is durable (for durable backends)."""
        ...

    async def query(self, query: UsageQuery) -> UsageReport: ...

    async def probe(self) -> None:
        """Commit a tiny write where records are made durable; raise LedgerWriteError if that fails (health)."""
        ...

    async def aclose(self) -> None:
        """Flush what is pending and release the store."""
        ...
