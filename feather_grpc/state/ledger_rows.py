"""A usage record as every ledger stores it: ONE column list, and ONE billing rule over stored rows.

SqliteLedger, its spool (under PostgresLedger), the ledger writer process and PostgresLedger keep the
same columns in the same order (`COLUMNS`, values made by `to_row`); MemoryLedger keeps the records
themselves. All of them decide which record of a retried request is billed by the rule here.

The billing rule: within a tenant, all records with the same non-empty `request_id` are one request;
every record is kept, but exactly one is billed (counted by queries): the earliest successful record
(outcome ok or cache_hit), or the earliest record if none succeeded, "earliest" by `time_ns`, then
insertion order (SqliteLedger: the row id; PostgresLedger: the shipped record's identity, so that
every replica picks the same one). Records with an empty `request_id` are all billed.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

from feather_grpc.core.ledger import Outcome, UsageRecord

T = TypeVar("T")

COLUMNS = (
    "request_id",
    "time_ns",
    "tenant",
    "provider",
    "model",
    "requested_model",
    "outcome",
    "error_code",
    "error_reason",
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
    "estimated",
    "unpriced",
    "streamed",
    "attempt_count",
    "latency_ms",
    "tags",
)
# A record's values in COLUMNS order, as SQLite stores them: flags 0/1, outcome and tags as text.
Row = tuple[object, ...]

TENANT = COLUMNS.index("tenant")
REQUEST_ID = COLUMNS.index("request_id")
OUTCOME = COLUMNS.index("outcome")
TIME_NS = COLUMNS.index("time_ns")

# The outcomes that count as a success, as stored (Outcome values), and as an SQL list for `outcome IN ...`.
SUCCESS_OUTCOMES = (Outcome.OK.value, Outcome.CACHE_HIT.value)
SUCCESS_SQL = "(" + ", ".join(f"'{o}'" for o in SUCCESS_OUTCOMES) + ")"


def to_row(record: UsageRecord) -> Row:
    """The stored values of a checked record (usage_math.check_record), in COLUMNS order."""
    tags = json.dumps(record.tags, separators=(",", ":")) if record.tags else "{}"
    return (
        record.request_id,
        record.time_ns,
        record.tenant,
        record.provider,
        record.model,
        record.requested_model,
        str(record.outcome),
        record.error_code,
        record.error_reason,
        record.input_tokens,
        record.output_tokens,
        record.cached_input_tokens,
        record.cache_write_tokens,
        record.reasoning_tokens,
        record.web_search_requests,
        record.cache_write_1h_tokens,
        record.audio_input_tokens,
        record.audio_output_tokens,
        record.cost_nanos_usd,
        int(record.estimated),
        int(record.unpriced),
        int(record.streamed),
        record.attempt_count,
        record.latency_ms,
        tags,
    )


# -- the billing rule --------------------------------------------------------------------------

Key = tuple[Any, Any]  # (tenant, request_id)
Rank = tuple[Any, ...]


def rank(outcome: object, time_ns: object, *order: Any) -> Rank:
    """Lower is billed first: successes, then earlier, then `order` (the insertion order a ledger knows)."""
    assert isinstance(time_ns, int)
    return (outcome not in SUCCESS_OUTCOMES, time_ns, *order)


def record_rank(record: UsageRecord) -> Rank:
    """The rank of a record kept as such (MemoryLedger: ties go to the record inserted first)."""
    return rank(record.outcome, record.time_ns)


def best_of_batch(rows: Sequence[Row], order: Callable[[int], tuple[Any, ...]]) -> dict[Key, tuple[Rank, int]]:
    """For each (tenant, request_id) key of a batch about to be stored: its best row, as (rank, index).
    `order(i)` is row i's insertion order after `time_ns` (its place in the batch, its identity)."""
    best: dict[Key, tuple[Rank, int]] = {}
    for i, row in enumerate(rows):
        if row[REQUEST_ID]:
            key = (row[TENANT], row[REQUEST_ID])
            row_rank = rank(row[OUTCOME], row[TIME_NS], *order(i))
            current = best.get(key)
            if current is None or row_rank < current[0]:
                best[key] = (row_rank, i)
    return best


def settle_billing(
    rows: Sequence[Row], best: dict[Key, tuple[Rank, int]], stored: Iterable[tuple[Key, Rank, T]]
) -> tuple[list[bool], list[T]]:
    """Who is billed once a batch is stored: (a flag per batch row, the stored records to unbill).

    `best` is `best_of_batch(rows, ...)`; `stored` holds each key's billed record so far, as (key, rank,
    identity). Per key, the better of the two is billed: a stored record that loses is unbilled (before
    the insert, so a unique index on billed keys holds after every statement). An equal rank is the same
    record stored again (a re-shipped batch): nothing changes.
    """
    billed = [not row[REQUEST_ID] for row in rows]  # a record without a request id is always billed
    winners = {key: index for key, (_, index) in best.items()}
    displaced: list[T] = []
    for key, stored_rank, identity in stored:
        batch_rank = best[key][0]
        if stored_rank < batch_rank:
            del winners[key]  # the stored record stays billed
        elif stored_rank > batch_rank:
            displaced.append(identity)
    for index in winners.values():
        billed[index] = True
    return billed, displaced
