"""Usage arithmetic shared by every ledger: record checks, filters, grouping keys, time buckets, sums.

SqliteLedger and PostgresLedger aggregate in SQL and MemoryLedger in Python; both take their definitions from here
(what a bucket is, which outcome counts where, how rows are ordered and summed) so they agree.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence

from feather_grpc.core.ledger import GroupBy, Outcome, UsageQuery, UsageRecord, UsageTotals
from feather_grpc.state.ledger_rows import SUCCESS_OUTCOMES

HOUR_NS = 3_600 * 1_000_000_000
DAY_NS = 24 * HOUR_NS
BUCKET_NS = {GroupBy.HOUR: HOUR_NS, GroupBy.DAY: DAY_NS}

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1

# The counts a report row has, and the record fields it sums: one list for every ledger and every query.
COUNT_FIELDS = ("request_count", "ok_count", "error_count", "cancelled_count", "cached_count", "estimated_count")
SUMMED_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "web_search_requests",
    "cache_write_1h_tokens",
    "audio_input_tokens",
    "audio_output_tokens",
    "cost_nanos_usd",
)

STR_FIELDS = ("request_id", "tenant", "provider", "model", "requested_model", "error_code", "error_reason")
INT_FIELDS = ("time_ns", *SUMMED_FIELDS, "attempt_count", "latency_ms")
BOOL_FIELDS = ("estimated", "unpriced", "streamed")

GroupKey = tuple[str | int, ...]


def bucket_start(time_ns: int, size_ns: int) -> int:
    """Start of the UTC bucket holding time_ns (floor, also before 1970)."""
    return time_ns - time_ns % size_ns


def check_record(record: UsageRecord) -> None:
    """Reject, in the caller's hands, anything a store could not write.

    A durable ledger writes records in batches; a record that fails there would fail its whole
    batch, so every value is checked before it is queued.
    """
    # Every record passes through here on the hot path: the common case is tested inline, and only a
    # value that fails it goes through the function that explains why.
    for name in STR_FIELDS:
        text = getattr(record, name)
        if type(text) is not str or not text.isascii():
            _check_text(name, text)
    for name in INT_FIELDS:
        value = getattr(record, name)
        if type(value) is int and INT64_MIN <= value <= INT64_MAX:
            continue
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"UsageRecord.{name} must be an int, got {type(value).__name__}")
        if not INT64_MIN <= value <= INT64_MAX:
            raise ValueError(f"UsageRecord.{name} does not fit in 64 bits: {value}")
    for name in BOOL_FIELDS:
        if not isinstance(getattr(record, name), bool):
            raise TypeError(f"UsageRecord.{name} must be a bool")
    Outcome(record.outcome)  # ValueError for anything else
    if not isinstance(record.tags, dict):
        raise TypeError("UsageRecord.tags must be a dict[str, str]")
    for key, value in record.tags.items():
        _check_text("tags key", key)
        _check_text(f"tags[{key!r}]", value)


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"UsageRecord.{name} must be a str, got {type(value).__name__}")
    if not value.isascii():
        value.encode()  # UnicodeEncodeError (a ValueError) on lone surrogates


def check_query(query: UsageQuery) -> None:
    """Refuse the groupings a UsageTotals row cannot represent."""
    if GroupBy.TAG in query.group_by and not query.tag_key:
        raise ValueError("grouping by tag needs a tag_key")
    if len(set(query.group_by)) != len(query.group_by):
        raise ValueError(f"group_by repeats a dimension: {[str(g) for g in query.group_by]}")
    if GroupBy.HOUR in query.group_by and GroupBy.DAY in query.group_by:
        raise ValueError("group by hour or by day, not both: a row has one bucket_start_ns")
    if query.page_size < 0:
        raise ValueError("page_size must not be negative")
    if query.after is not None:
        types = [int if g in BUCKET_NS else str for g in query.group_by]
        if len(query.after) != len(types) or any(type(v) is not t for v, t in zip(query.after, types, strict=False)):
            raise ValueError("after must hold one value per group_by dimension: str, or int for hour and day")
        # A page token is the caller's to send back, so what it says must also be what a database takes: a
        # 64-bit integer and text that encodes as UTF-8 (JSON may spell a lone surrogate).
        for v in query.after:
            if isinstance(v, int) and not -(2**63) <= v < 2**63:
                raise ValueError("after holds an integer out of the 64-bit range")
            if isinstance(v, str):
                v.encode()  # UnicodeEncodeError is a ValueError


def row_key(group_by: Iterable[GroupBy], row: UsageTotals) -> GroupKey:
    """The grouping key values of a report row, in group_by order (the inverse of keyed_totals)."""
    key: list[str | int] = []
    for dimension in group_by:
        if dimension is GroupBy.TENANT:
            key.append(row.tenant)
        elif dimension is GroupBy.PROVIDER:
            key.append(row.provider)
        elif dimension is GroupBy.MODEL:
            key.append(row.model)
        elif dimension is GroupBy.TAG:
            key.append(row.tag_value)
        else:
            assert row.bucket_start_ns is not None
            key.append(row.bucket_start_ns)
    return tuple(key)


def whole(query: UsageQuery, more: bool) -> bool:
    """Whether a report's rows are all of the query's groups (so their sum is the total): a first page with
    no more after it."""
    return query.after is None and not more


def grouped_sql(keys: Sequence[str], query: UsageQuery) -> str:
    """The SQL both ledgers end a report's query with: grouped and ordered by the key columns, and one row
    more than page_size (so `page` can tell whether more follow). No keys: one row, the total."""
    if not keys:
        return ""
    positions = ", ".join(str(i) for i in range(1, len(keys) + 1))
    sql = f" GROUP BY {positions} ORDER BY {positions}"
    if query.page_size:
        sql += f" LIMIT {int(query.page_size) + 1}"
    return sql


def page(query: UsageQuery, rows: Sequence[UsageTotals]) -> tuple[list[UsageTotals], bool]:
    """The page out of rows fetched with one more than page_size: (its rows, whether more follow)."""
    if query.page_size and len(rows) > query.page_size:
        return list(rows[: query.page_size]), True
    return list(rows), False


def total_query(query: UsageQuery) -> UsageQuery:
    """The same query over every matching record, ungrouped: the total of a report that is one page."""
    return dataclasses.replace(query, group_by=[], tag_key="", page_size=0, after=None)


def matches(record: UsageRecord, query: UsageQuery) -> bool:
    if query.start_ns is not None and record.time_ns < query.start_ns:
        return False
    if query.end_ns is not None and record.time_ns >= query.end_ns:
        return False
    if query.tenant and record.tenant != query.tenant:
        return False
    if query.provider and record.provider != query.provider:
        return False
    if query.model and record.model != query.model:
        return False
    return all(record.tags.get(key) == value for key, value in query.tags.items())


def group_key(record: UsageRecord, query: UsageQuery) -> GroupKey:
    """The record's value for each grouping dimension, in group_by order."""
    key: list[str | int] = []
    for dimension in query.group_by:
        if dimension is GroupBy.TENANT:
            key.append(record.tenant)
        elif dimension is GroupBy.PROVIDER:
            key.append(record.provider)
        elif dimension is GroupBy.MODEL:
            key.append(record.model)
        elif dimension is GroupBy.TAG:
            key.append(record.tags.get(query.tag_key, ""))
        else:
            key.append(bucket_start(record.time_ns, BUCKET_NS[dimension]))
    return tuple(key)


def keyed_totals(group_by: Iterable[GroupBy], key: Iterable[object]) -> UsageTotals:
    """An empty row carrying the grouping key values (as produced by group_key or the SQL)."""
    row = UsageTotals()
    for dimension, value in zip(group_by, key, strict=True):
        if dimension is GroupBy.TENANT:
            row.tenant = str(value)
        elif dimension is GroupBy.PROVIDER:
            row.provider = str(value)
        elif dimension is GroupBy.MODEL:
            row.model = str(value)
        elif dimension is GroupBy.TAG:
            row.tag_value = str(value)
        else:
            assert isinstance(value, int)
            row.bucket_start_ns = value
    return row


def add_record(totals: UsageTotals, record: UsageRecord) -> None:
    outcome = Outcome(record.outcome)
    totals.request_count += 1
    totals.ok_count += outcome in SUCCESS_OUTCOMES
    totals.error_count += outcome is Outcome.ERROR
    totals.cancelled_count += outcome is Outcome.CANCELLED
    totals.cached_count += outcome is Outcome.CACHE_HIT
    totals.estimated_count += record.estimated
    for name in SUMMED_FIELDS:
        setattr(totals, name, getattr(totals, name) + getattr(record, name))


def sum_totals(rows: Iterable[UsageTotals]) -> UsageTotals:
    """The report total: the exact sum of the rows, with no grouping keys."""
    total = UsageTotals()
    for row in rows:
        for name in (*COUNT_FIELDS, *SUMMED_FIELDS):
            setattr(total, name, getattr(total, name) + getattr(row, name))
    return total
