"""MemoryLedger: the usage ledger kept in a Python list, for tests and `ledger: memory`."""

from __future__ import annotations

import dataclasses

from feather_grpc.state import usage_math
from feather_grpc.state.ledger import UsageQuery, UsageRecord, UsageReport, UsageTotals


class MemoryLedger:
    """Same semantics and results as SqliteLedger, without durability: a process exit loses it all.

    Queries scan every record on the event loop, which is fine at test sizes only.
    """

    def __init__(self) -> None:
        self._records: list[UsageRecord] = []
        self._closed = False

    @property
    def records(self) -> list[UsageRecord]:
        """Copies of everything recorded, in recording order."""
        return [_copy(record) for record in self._records]

    async def record(self, record: UsageRecord) -> None:
        if self._closed:
            raise RuntimeError("the usage ledger is closed")
        usage_math.check_record(record)
        self._records.append(_copy(record))  # a snapshot, as a durable store would keep

    async def query(self, query: UsageQuery) -> UsageReport:
        if self._closed:
            raise RuntimeError("the usage ledger is closed")
        usage_math.check_query(query)
        selected = [record for record in self._records if usage_math.matches(record, query)]
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
        rows = [groups[key] for key in sorted(groups)]
        return UsageReport(rows=rows, total=usage_math.sum_totals(rows))

    async def aclose(self) -> None:
        self._closed = True


def _copy(record: UsageRecord) -> UsageRecord:
    return dataclasses.replace(record, tags=dict(record.tags))
