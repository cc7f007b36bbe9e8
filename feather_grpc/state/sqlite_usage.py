"""SqliteLedger's read side: usage queries as SQL aggregates over the billed records.

Sums are exact Python integers however large: SQLite's SUM raises "integer overflow" past 2^63,
so each 64-bit column is summed as two halves, `x >> 32` and `x & 0xFFFFFFFF`, whose sums cannot
overflow below 2^31 rows per group, and recombined in Python.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from feather_grpc.core.ledger import GroupBy, UsageQuery, UsageReport, UsageTotals
from feather_grpc.state import usage_math
from feather_grpc.state.ledger_rows import SUCCESS_SQL

_HALF_BITS = 32
_LOW_MASK = (1 << _HALF_BITS) - 1
# The 64-bit columns summed exactly: each as the sums of its high and low 32-bit halves.
_SUMMED = usage_math.SUMMED_FIELDS


def _exact_sum(column: str) -> str:
    return f"COALESCE(SUM({column} >> {_HALF_BITS}), 0), COALESCE(SUM({column} & {_LOW_MASK}), 0)"


# _COUNT_FIELDS, then a (high, low) pair of sums for each of _SUMMED (recombined by _totals).
_AGGREGATES = f"""COUNT(*),
    COALESCE(SUM(outcome IN {SUCCESS_SQL}), 0),
    COALESCE(SUM(outcome = 'error'), 0),
    COALESCE(SUM(outcome = 'cancelled'), 0),
    COALESCE(SUM(outcome = 'cache_hit'), 0),
    COALESCE(SUM(estimated), 0),
    {", ".join(_exact_sum(c) for c in _SUMMED)}"""
_COUNT_FIELDS = usage_math.COUNT_FIELDS


def report(conn: sqlite3.Connection, query: UsageQuery) -> UsageReport:
    """The report of a checked query, read on `conn` (the caller holds it alone)."""
    if not query.group_by:
        result = conn.execute(*build_query_sql(query)).fetchall()
        return UsageReport(rows=[], total=_totals(UsageTotals(), result[0]))
    conn.execute("BEGIN")  # one snapshot for a page and its total
    try:
        result = conn.execute(*build_query_sql(query)).fetchall()
        width = len(query.group_by)
        rows = [_totals(usage_math.keyed_totals(query.group_by, r[:width]), r[width:]) for r in result]
        rows, more = usage_math.page(query, rows)
        if not usage_math.whole(query, more):  # other pages hold groups too: the total is read on its own
            total_row = conn.execute(*build_query_sql(usage_math.total_query(query))).fetchone()
            return UsageReport(rows=rows, total=_totals(UsageTotals(), total_row), more=more)
    finally:
        conn.execute("COMMIT")
    return UsageReport(rows=rows, total=usage_math.sum_totals(rows))


def build_query_sql(query: UsageQuery) -> tuple[str, list[object]]:
    """One aggregate SELECT over billed records: the grouping keys (in group_by order), then the
    _COUNT_FIELDS, then a (high, low) pair of sums for each of _SUMMED. A page takes the groups whose keys
    sort after `query.after` (the keys are per-record values, so the condition filters records before
    they are grouped) and one row more than `page_size`, to know whether more follow."""
    keys: list[str] = []
    key_params: list[object] = []
    for dimension in query.group_by:
        if dimension is GroupBy.TAG:
            expr, expr_params = _tag_value_sql(query.tag_key)
            keys.append(f"COALESCE({expr}, '')")
            key_params.extend(expr_params)
        elif dimension in usage_math.BUCKET_NS:
            size = usage_math.BUCKET_NS[dimension]
            # Floor to the bucket start; SQLite's % truncates toward zero, so fold negatives.
            keys.append(f"time_ns - ((time_ns % {size}) + {size}) % {size}")
        else:
            keys.append(str(dimension))  # tenant, provider, model: column names

    where: list[str] = ["billed"]
    where_params: list[object] = []
    if query.start_ns is not None:
        where.append("time_ns >= ?")
        where_params.append(query.start_ns)
    if query.end_ns is not None:
        where.append("time_ns < ?")
        where_params.append(query.end_ns)
    for column, value in (("tenant", query.tenant), ("provider", query.provider), ("model", query.model)):
        if value:
            where.append(f"{column} = ?")
            where_params.append(value)
    for key, value in query.tags.items():
        expr, expr_params = _tag_value_sql(key)
        where.append(f"{expr} = ?")  # a missing tag is NULL, which equals nothing
        where_params.extend([*expr_params, value])

    if keys and query.after is not None:
        where.append(f"({', '.join(keys)}) > ({', '.join('?' * len(keys))})")
        where_params.extend([*key_params, *query.after])

    sql = f"SELECT {', '.join([*keys, _AGGREGATES])} FROM usage_records WHERE {' AND '.join(where)}"
    sql += usage_math.grouped_sql(keys, query)
    return sql, [*key_params, *where_params]


def _tag_value_sql(key: str) -> tuple[str, list[object]]:
    """SQL for the value of tag `key` (NULL when absent).

    json_extract takes a path, which cannot spell every key: tags are stored with JSON escapes
    for non-ASCII, quotes and backslashes, and paths match the raw key text. Such keys are
    looked up with json_each, which decodes them.
    """
    if key.isascii() and key.isprintable() and '"' not in key and "\\" not in key:
        return "json_extract(tags, ?)", [f'$."{key}"']
    return "(SELECT j.value FROM json_each(usage_records.tags) AS j WHERE j.key = ?)", [key]


def _totals(row: UsageTotals, values: Sequence[object]) -> UsageTotals:
    counts, halves = values[: len(_COUNT_FIELDS)], values[len(_COUNT_FIELDS) :]
    assert len(halves) == 2 * len(_SUMMED)
    for name, value in zip(_COUNT_FIELDS, counts, strict=True):
        assert isinstance(value, int)
        setattr(row, name, value)
    for i, name in enumerate(_SUMMED):
        high, low = halves[2 * i], halves[2 * i + 1]
        assert isinstance(high, int) and isinstance(low, int)
        setattr(row, name, (high << _HALF_BITS) + low)
    return row
