"""MemoryLedger: the usage ledger kept in a Python list, for tests and `ledger: memory`."""

from __future__ import annotations

import dataclasses

from feather_grpc.state import ledger_rows, usage_math
from feather_grpc.state.ledger import UsageQuery, UsageRecord, UsageReport, UsageTotals


class MemoryLedger:
    """Same semantics and results as SqliteLedger, without durability: a process exit loses it all.

    A retried request is billed once, by the rule of SqliteLedger and PostgresLedger (see
    ledger_rows): every record is kept, and queries count only the one billed record
    of each (tenant, non-empty request_id). `record()` settles that in O(1) against the key's
    billed record so far. Queries scan every billed record on the event loop, which is fine at
    test sizes only.
    """

    def __init__(self) -> None:
        self._records: list[UsageRecord] = []
        self._billed: list[bool] = []  # parallel to _records
        self._billed_at: dict[tuple[str, str], int] = {}  # (tenant, request_id) -> index of its billed record
        self._closed = False

    @property
    def records(self) -> list[UsageRecord]:
        """Copies of everything recorded, in recording order (billed or not)."""
        return [_copy(record) for record in self._records]

    @property
    def billed_records(self) -> list[UsageRecord]:
        """Copies of the records queries count, in recording order."""
        return [_copy(record) for record, billed in zip(self._records, self._billed, strict=True) if billed]

    async def ready(self) -> None:
        return None

    async def record(self, record: UsageRecord) -> None:
        if self._closed:
            raise RuntimeError("the usage ledger is closed")
        usage_math.check_record(record)
        index = len(self._records)
        self._records.append(_copy(record))  # a snapshot, as a durable store would keep
        if not record.request_id:
            self._billed.append(True)
            return
        key = (record.tenant, record.request_id)
        current = self._billed_at.get(key)
        # On a tie the earlier record (inserted first) stays billed: only a strictly better one wins.
        if current is not None and ledger_rows.record_rank(self._records[current]) <= ledger_rows.record_rank(record):
            self._billed.append(False)
            return
        if current is not None:
            self._billed[current] = False
        self._billed.append(True)
        self._billed_at[key] = index

    async def probe(self) -> None:
        return None  # a list in memory is always writable

    async def query(self, query: UsageQuery) -> UsageReport:
        if self._closed:
            raise RuntimeError("the usage ledger is closed")
        usage_math.check_query(query)
        selected = [
            record
            for record, billed in zip(self._records, self._billed, strict=True)
            if billed and usage_math.matches(record, query)
        ]
        if not query.group_by:
            total = UsageTotals()
            for record in selected:
                usage_math.add_record(total, record)
            return UsageReport(rows=[], total=total)
        groups: dict[usage_math.GroupKey, UsageTotals] = {}
        for record in selected:
            key = usage_math.group_key(record, query)
            row = groups.get(key)
            if row is None:
                row = groups[key] = usage_math.keyed_totals(query.group_by, key)
            usage_math.add_record(row, record)
        keys = sorted(groups)
        total = usage_math.sum_totals(groups[key] for key in keys)
        after = query.after
        if after is not None:
            keys = [key for key in keys if key > after]
        rows, more = usage_math.page(query, [groups[key] for key in keys])
        return UsageReport(rows=rows, total=total, more=more)

    async def aclose(self) -> None:
        self._closed = True


def _copy(record: UsageRecord) -> UsageRecord:
    return dataclasses.replace(record, tags=dict(record.tags))
