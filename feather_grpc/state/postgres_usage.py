"""PostgresLedger's read side: usage queries as SQL aggregates over the billed records.

Time buckets are computed exactly as SqliteLedger computes them; SUM(bigint) is numeric in Postgres,
so sums are exact.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from decimal import Decimal

from feather_grpc.core.ledger import GroupBy, UsageQuery, UsageReport, UsageTotals
from feather_grpc.state import usage_math
from feather_grpc.state.ledger_rows import SUCCESS_SQL
from feather_grpc.state.postgres_schema import TABLE, Connection

# Counts and sums in the order of _TOTAL_FIELDS. SUM(bigint) is numeric in Postgres: exact.
_AGGREGATES = f"""COUNT(*),
    COUNT(*) FILTER (WHERE outcome IN {SUCCESS_SQL}),
    COUNT(*) FILTER (WHERE outcome = 'error'),
    COUNT(*) FILTER (WHERE outcome = 'cancelled'),
    COUNT(*) FILTER (WHERE outcome = 'cache_hit'),
    COUNT(*) FILTER (WHERE estimated),
    {", ".join(f"COALESCE(SUM({c}), 0)" for c in usage_math.SUMMED_FIELDS)}"""
_TOTAL_FIELDS = (*usage_math.COUNT_FIELDS, *usage_math.SUMMED_FIELDS)


async def report(conn: Connection, query: UsageQuery) -> UsageReport:
    sql, params = build_query_sql(query)
    result = await conn.fetch(sql, *params)
    if not query.group_by:
        return UsageReport(rows=[], total=_totals(UsageTotals(), tuple(result[0])))
    width = len(query.group_by)
    rows = [_totals(usage_math.keyed_totals(query.group_by, tuple(r)[:width]), tuple(r)[width:]) for r in result]
    rows, more = usage_math.page(query, rows)
    if usage_math.whole(query, more):
        return UsageReport(rows=rows, total=usage_math.sum_totals(rows))
    # Other pages hold groups too: the total is read on its own.
    sql, params = build_query_sql(usage_math.total_query(query))
    (total,) = await conn.fetch(sql, *params)
    return UsageReport(rows=rows, total=_totals(UsageTotals(), tuple(total)), more=more)


def build_query_sql(query: UsageQuery) -> tuple[str, list[object]]:
    """One aggregate SELECT over billed records: the grouping keys (in group_by order), then _TOTAL_FIELDS."""
    params: list[object] = []

    def param(value: object) -> str:
        params.append(value)
        return f"${len(params)}"

    keys: list[str] = []
    for dimension in query.group_by:
        if dimension is GroupBy.TAG:
            keys.append(f"COALESCE(tags ->> {param(query.tag_key)}::text, '') COLLATE \"C\"")
        elif dimension in usage_math.BUCKET_NS:
            size = usage_math.BUCKET_NS[dimension]
            # Floor to the bucket start; Postgres's % truncates toward zero, so fold negatives.
            keys.append(f"time_ns - ((time_ns % {size}) + {size}) % {size}")
        else:
            keys.append(str(dimension))  # tenant, provider, model: COLLATE "C" columns

    where = ["billed"]
    if query.start_ns is not None:
        where.append(f"time_ns >= {param(query.start_ns)}::bigint")
    if query.end_ns is not None:
        where.append(f"time_ns < {param(query.end_ns)}::bigint")
    for column, value in (("tenant", query.tenant), ("provider", query.provider), ("model", query.model)):
        if value:
            where.append(f"{column} = {param(value)}::text")
    if query.tags:
        # Containment: the record carries every key with exactly that (string) value.
        where.append(f"tags @> {param(json.dumps(query.tags))}::jsonb")
    if keys and query.after is not None:
        # A page: the groups after the previous page's last (the keys are per-record values, so this
        # filters records before they are grouped).
        kinds = ["bigint" if g in usage_math.BUCKET_NS else "text" for g in query.group_by]
        bounds = [f"{param(v)}::{kind}" for v, kind in zip(query.after, kinds, strict=True)]
        where.append(f"({', '.join(keys)}) > ({', '.join(bounds)})")

    sql = f"SELECT {', '.join([*keys, _AGGREGATES])} FROM {TABLE} WHERE {' AND '.join(where)}"
    sql += usage_math.grouped_sql(keys, query)
    return sql, params


def _totals(row: UsageTotals, values: Sequence[object]) -> UsageTotals:
    for name, value in zip(_TOTAL_FIELDS, values, strict=True):
        if isinstance(value, Decimal):
            integral = int(value)
            assert integral == value, f"{name} is not an integer: {value}"
            value = integral
        assert isinstance(value, int)
        setattr(row, name, value)
    return row
