"""Usage ledgers: SqliteLedger (file and :memory:) and MemoryLedger give the same answers;
SqliteLedger commits in groups, durably, and shares its file with other writers."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import json
import random
import signal
import sqlite3
import sys
import threading
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from feather_grpc.core.ledger import (
    GroupBy,
    LedgerWriteError,
    Outcome,
    UsageLedger,
    UsageQuery,
    UsageRecord,
    UsageReport,
    UsageTotals,
)
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.state import sqlite_ledger as sqlite_ledger_module
from feather_grpc.state.ledger_rows import COLUMNS
from feather_grpc.state.memory_ledger import MemoryLedger
from feather_grpc.state.sqlite_ledger import SqliteLedger
from feather_grpc.state.sqlite_schema import SCHEMA_VERSION
from feather_grpc.state.usage_math import DAY_NS, HOUR_NS, sum_totals
from tests.gateway_harness import MOCK_CONFIG, running_gateway, user

REPO = Path(__file__).resolve().parent.parent
T0 = int(datetime(2025, 1, 2, tzinfo=UTC).timestamp()) * 10**9  # a UTC midnight


def rec(request_id: str, time_ns: int = T0, **fields: Any) -> UsageRecord:
    return UsageRecord(request_id=request_id, time_ns=time_ns, **fields)


def fail_inserts_of(path: Path, request_id: str) -> None:
    """From now on, inserting a record of `request_id` into the file fails (an IntegrityError)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute(
            f"CREATE TRIGGER fail BEFORE INSERT ON usage_records WHEN NEW.request_id = '{request_id}' "
            "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
        )


def count_rows(path: Path) -> int:
    """Read the file through a brand-new connection, as another process would."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        count = conn.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0]
    assert isinstance(count, int)
    return count


@pytest.fixture(params=["memory", "sqlite", "sqlite-memory"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[UsageLedger]:
    store: MemoryLedger | SqliteLedger
    if request.param == "memory":
        store = MemoryLedger()
    elif request.param == "sqlite":
        store = await SqliteLedger.open(tmp_path / "usage.db")
    else:
        store = await SqliteLedger.open(":memory:")
    yield store
    await store.aclose()


@pytest.fixture
async def sqlite_ledger(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    store = await SqliteLedger.open(tmp_path / "usage.db")
    yield store
    await store.aclose()


class GateLock:
    """A lock that tells when someone is waiting for it: the writer, with a batch in hand."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entered = threading.Event()

    def __enter__(self) -> None:
        self.entered.set()
        self.lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


@contextlib.asynccontextmanager
async def writer_parked(ledger: SqliteLedger) -> AsyncIterator[asyncio.Task[None]]:
    """Hold the writer inside a commit so that what is recorded meanwhile waits for one batch.

    The writer takes a blocker record and then waits at the write lock, held here, until the
    block exits. Yields the blocker's task.
    """
    gate = GateLock()
    gate.lock.acquire()
    ledger._write_lock = gate  # type: ignore[assignment]
    ledger._commit_on_loop = False  # these tests are about the writer thread's batches
    try:
        (blocker,) = await enqueue(ledger, [rec("blocker", T0 - DAY_NS)])
        assert await asyncio.to_thread(gate.entered.wait, 10)
        yield blocker
    finally:
        gate.lock.release()


async def enqueue(ledger: UsageLedger, records: list[UsageRecord]) -> list[asyncio.Task[None]]:
    """Start a record() per record and return once every one of them is waiting on the ledger."""
    tasks = [asyncio.create_task(ledger.record(r)) for r in records]
    await asyncio.sleep(0)  # each task runs up to its first await, i.e. enqueues, before we resume
    return tasks


# -- a small data set with hand-computed answers ---------------------------------------------

BASIC = [
    rec(
        "r1",
        T0 + 1,
        tenant="a",
        provider="openai",
        model="gpt-4o",
        input_tokens=100,
        output_tokens=10,
        reasoning_tokens=4,  # of output_tokens, as OpenAI reports them
        cost_nanos_usd=1000,
        tags={"team": "x"},
    ),
    rec(
        "r2",
        T0 + 2,
        tenant="a",
        provider="openai",
        model="gpt-4o-mini",
        outcome=Outcome.ERROR,
        error_code="UNAVAILABLE",
        tags={"team": "y"},
    ),
    rec(
        "r3",
        T0 + 3,
        tenant="b",
        provider="anthropic",
        model="claude",
        outcome=Outcome.CACHE_HIT,
        input_tokens=50,
        cached_input_tokens=50,
    ),
    rec(
        "r4",
        T0 + HOUR_NS + 4,
        tenant="b",
        provider="anthropic",
        model="claude",
        outcome=Outcome.CANCELLED,
        estimated=True,
        input_tokens=30,
        output_tokens=5,
        cost_nanos_usd=300,
        tags={"team": "x", "env": "prod"},
    ),
    rec(
        "r5",
        T0 + DAY_NS + 5,
        tenant="a",
        provider="anthropic",
        model="claude",
        input_tokens=7,
        output_tokens=3,
        cache_write_tokens=3,  # of input_tokens, as Anthropic's cache_creation_input_tokens
        cost_nanos_usd=70,
        tags={"env": "prod"},
    ),
]


async def record_all(ledger: UsageLedger, records: list[UsageRecord]) -> None:
    await asyncio.gather(*(ledger.record(r) for r in records))


def keys(report: UsageReport, *names: str) -> list[tuple[Any, ...]]:
    return [(*(getattr(row, n) for n in names), row.request_count) for row in report.rows]


async def test_totals_count_outcomes_tokens_and_cost(ledger: UsageLedger) -> None:
    await record_all(ledger, BASIC)
    report = await ledger.query(UsageQuery())
    assert report.rows == []
    assert report.total == UsageTotals(
        request_count=5,
        ok_count=3,  # ok and cache hit
        error_count=1,
        cancelled_count=1,
        cached_count=1,
        estimated_count=1,
        input_tokens=187,
        output_tokens=18,
        cached_input_tokens=50,
        cache_write_tokens=3,
        reasoning_tokens=4,
        cost_nanos_usd=1370,
    )


async def test_empty_ledger_reports_zero(ledger: UsageLedger) -> None:
    assert await ledger.query(UsageQuery()) == UsageReport(rows=[], total=UsageTotals())
    assert await ledger.query(UsageQuery(group_by=[GroupBy.TENANT])) == UsageReport([], UsageTotals())


@pytest.mark.parametrize(
    ("group_by", "field", "expected"),
    [
        (GroupBy.TENANT, "tenant", [("a", 3), ("b", 2)]),
        (GroupBy.PROVIDER, "provider", [("anthropic", 3), ("openai", 2)]),
        (GroupBy.MODEL, "model", [("claude", 3), ("gpt-4o", 1), ("gpt-4o-mini", 1)]),
        (GroupBy.TAG, "tag_value", [("", 2), ("x", 2), ("y", 1)]),  # r3 and r5 have no team
        (GroupBy.HOUR, "bucket_start_ns", [(T0, 3), (T0 + HOUR_NS, 1), (T0 + DAY_NS, 1)]),
        (GroupBy.DAY, "bucket_start_ns", [(T0, 4), (T0 + DAY_NS, 1)]),
    ],
)
async def test_group_by_each_dimension(
    ledger: UsageLedger, group_by: GroupBy, field: str, expected: list[tuple[Any, int]]
) -> None:
    await record_all(ledger, BASIC)
    report = await ledger.query(UsageQuery(group_by=[group_by], tag_key="team"))
    assert keys(report, field) == expected
    assert report.total == sum_totals(report.rows)
    assert report.total.request_count == 5
    # Only the grouped dimension is set on a row.
    unset = UsageTotals()
    for other in ("tenant", "provider", "model", "tag_value", "bucket_start_ns"):
        if other != field:
            assert {getattr(row, other) for row in report.rows} == {getattr(unset, other)}


async def test_group_by_combination_is_ordered_by_keys_in_group_by_order(ledger: UsageLedger) -> None:
    await record_all(ledger, BASIC)
    by_provider = await ledger.query(UsageQuery(group_by=[GroupBy.PROVIDER, GroupBy.TENANT]))
    assert keys(by_provider, "provider", "tenant") == [("anthropic", "a", 1), ("anthropic", "b", 2), ("openai", "a", 2)]
    by_tenant = await ledger.query(UsageQuery(group_by=[GroupBy.TENANT, GroupBy.PROVIDER]))
    assert keys(by_tenant, "tenant", "provider") == [("a", "anthropic", 1), ("a", "openai", 2), ("b", "anthropic", 2)]

    by_day_tag_model = await ledger.query(UsageQuery(group_by=[GroupBy.DAY, GroupBy.TAG, GroupBy.MODEL], tag_key="env"))
    assert keys(by_day_tag_model, "bucket_start_ns", "tag_value", "model") == [
        (T0, "", "claude", 1),
        (T0, "", "gpt-4o", 1),
        (T0, "", "gpt-4o-mini", 1),
        (T0, "prod", "claude", 1),
        (T0 + DAY_NS, "prod", "claude", 1),
    ]
    for report in (by_provider, by_tenant, by_day_tag_model):
        assert report.total == sum_totals(report.rows)
    assert [(r.provider, r.tenant, r.cache_write_tokens, r.reasoning_tokens) for r in by_provider.rows] == [
        ("anthropic", "a", 3, 0),
        ("anthropic", "b", 0, 0),
        ("openai", "a", 0, 4),
    ]
    assert by_provider.rows[1] == UsageTotals(
        provider="anthropic",
        tenant="b",
        request_count=2,
        ok_count=1,
        cancelled_count=1,
        cached_count=1,
        estimated_count=1,
        input_tokens=80,
        output_tokens=5,
        cached_input_tokens=50,
        cost_nanos_usd=300,
    )


async def test_hour_and_day_buckets_at_utc_boundaries(ledger: UsageLedger) -> None:
    times = [T0 - 1, T0, T0 + HOUR_NS - 1, T0 + HOUR_NS, T0 + DAY_NS - 1, T0 + DAY_NS, -1, 0]
    await record_all(ledger, [rec(f"t{i}", t) for i, t in enumerate(times)])
    hours = await ledger.query(UsageQuery(group_by=[GroupBy.HOUR]))
    assert keys(hours, "bucket_start_ns") == [
        (-HOUR_NS, 1),  # before 1970 still floors to the bucket start
        (0, 1),
        (T0 - HOUR_NS, 1),
        (T0, 2),
        (T0 + HOUR_NS, 1),
        (T0 + DAY_NS - HOUR_NS, 1),
        (T0 + DAY_NS, 1),
    ]
    days = await ledger.query(UsageQuery(group_by=[GroupBy.DAY]))
    assert keys(days, "bucket_start_ns") == [(-DAY_NS, 1), (0, 1), (T0 - DAY_NS, 1), (T0, 4), (T0 + DAY_NS, 1)]


async def test_time_range_is_start_inclusive_end_exclusive(ledger: UsageLedger) -> None:
    await record_all(ledger, [rec(f"t{t}", T0 + t) for t in range(5)])
    report = await ledger.query(UsageQuery(start_ns=T0 + 1, end_ns=T0 + 3))
    assert report.total.request_count == 2
    assert (await ledger.query(UsageQuery(start_ns=T0 + 3))).total.request_count == 2
    assert (await ledger.query(UsageQuery(end_ns=T0 + 3))).total.request_count == 3
    assert (await ledger.query(UsageQuery(start_ns=T0 + 3, end_ns=T0 + 3))).total.request_count == 0


async def test_filters_by_tenant_provider_and_model(ledger: UsageLedger) -> None:
    await record_all(ledger, BASIC)
    assert (await ledger.query(UsageQuery(tenant="a"))).total.request_count == 3
    assert (await ledger.query(UsageQuery(provider="anthropic"))).total.request_count == 3
    assert (await ledger.query(UsageQuery(model="claude", tenant="b"))).total.cost_nanos_usd == 300
    assert (await ledger.query(UsageQuery(tenant="nobody"))).total == UsageTotals()


async def test_tag_filters_must_all_match(ledger: UsageLedger) -> None:
    await record_all(ledger, BASIC)
    assert (await ledger.query(UsageQuery(tags={"team": "x"}))).total.request_count == 2
    assert (await ledger.query(UsageQuery(tags={"team": "x", "env": "prod"}))).total.request_count == 1
    assert (await ledger.query(UsageQuery(tags={"team": "x", "env": "dev"}))).total.request_count == 0
    # "" is a value to match, not a wildcard: records without the tag do not carry it.
    assert (await ledger.query(UsageQuery(tags={"team": ""}))).total.request_count == 0
    grouped = await ledger.query(UsageQuery(group_by=[GroupBy.TAG], tag_key="team", tags={"env": "prod"}))
    assert keys(grouped, "tag_value") == [("", 1), ("x", 1)]


@pytest.mark.parametrize("key", ["team", 'odd"key', "back\\slash", "dotted.key", "é", "[0]", " "])
async def test_any_tag_key_filters_and_groups(ledger: UsageLedger, key: str) -> None:
    await record_all(
        ledger,
        [
            rec("1", tags={key: "v1", "other": "o"}),
            rec("2", tags={key: "v2"}),
            rec("3", tags={key: "v1"}),
            rec("4", tags={"other": "v1"}),
            rec("5", tags={key: 'ü "q" \\'}),
        ],
    )
    assert (await ledger.query(UsageQuery(tags={key: "v1"}))).total.request_count == 2
    assert (await ledger.query(UsageQuery(tags={key: 'ü "q" \\'}))).total.request_count == 1
    grouped = await ledger.query(UsageQuery(group_by=[GroupBy.TAG], tag_key=key))
    assert keys(grouped, "tag_value") == [("", 1), ("v1", 2), ("v2", 1), ('ü "q" \\', 1)]


@pytest.mark.parametrize(
    "query",
    [
        UsageQuery(group_by=[GroupBy.TAG]),
        UsageQuery(group_by=[GroupBy.TENANT, GroupBy.TENANT]),
        UsageQuery(group_by=[GroupBy.HOUR, GroupBy.DAY]),
    ],
)
async def test_unrepresentable_groupings_raise(ledger: UsageLedger, query: UsageQuery) -> None:
    with pytest.raises(ValueError):
        await ledger.query(query)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"input_tokens": 1.5}, TypeError),
        ({"cost_nanos_usd": 2**63}, ValueError),
        ({"provider": None}, TypeError),
        ({"tags": {"k": 1}}, TypeError),
        ({"tenant": "\ud800"}, ValueError),  # a lone surrogate cannot be stored as UTF-8
        ({"outcome": "exploded"}, ValueError),
    ],
)
async def test_unstorable_records_are_rejected_before_queueing(
    ledger: UsageLedger, change: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        await ledger.record(rec("bad", **change))
    await ledger.record(rec("good"))
    assert (await ledger.query(UsageQuery())).total.request_count == 1


async def test_record_and_query_after_close_raise(ledger: UsageLedger) -> None:
    await ledger.record(rec("before"))
    await ledger.aclose()
    with pytest.raises(RuntimeError):
        await ledger.record(rec("after"))
    with pytest.raises(RuntimeError):
        await ledger.query(UsageQuery())
    await ledger.aclose()  # idempotent


# -- the same scenario through every ledger ---------------------------------------------------


def scenario(seed: int, count: int) -> list[UsageRecord]:
    rng = random.Random(seed)
    tag_choices = {"team": ["x", "y", "z"], "env": ["prod", "dev"], 'odd"key': ["1", "2"], "é": ["ä", "b"]}
    records = []
    for i in range(count):
        tags = {k: rng.choice(v) for k, v in tag_choices.items() if rng.random() < 0.6}
        records.append(
            rec(
                f"s{i}",
                T0 + rng.randrange(-DAY_NS, 2 * DAY_NS),
                tenant=rng.choice(["a", "b", "c", "default"]),
                provider=rng.choice(["openai", "anthropic", ""]),
                model=rng.choice(["gpt-4o", "gpt-4o-mini", "claude", "Claude", ""]),
                outcome=rng.choice(list(Outcome)),
                estimated=rng.random() < 0.1,
                input_tokens=rng.randrange(0, 10**6),
                output_tokens=rng.randrange(0, 10**5),
                cached_input_tokens=rng.randrange(0, 10**5),
                cache_write_tokens=rng.randrange(0, 10**5),
                reasoning_tokens=rng.randrange(0, 10**5),
                web_search_requests=rng.randrange(0, 10),
                cache_write_1h_tokens=rng.randrange(0, 10**4),
                audio_input_tokens=rng.randrange(0, 10**4),
                audio_output_tokens=rng.randrange(0, 10**3),
                cost_nanos_usd=rng.randrange(0, 10**12),
                tags=tags,
            )
        )
    return records


def scenario_queries() -> Iterator[UsageQuery]:
    dims = list(GroupBy)
    groupings = [list(p) for n in range(3) for p in itertools.permutations(dims, n)]
    groupings.append([GroupBy.DAY, GroupBy.TAG, GroupBy.MODEL])
    filters: list[dict[str, Any]] = [
        {},
        {"tenant": "a"},
        {"start_ns": T0, "end_ns": T0 + DAY_NS // 2},
        {"tags": {"env": "prod"}, "provider": "openai"},
        {"tags": {'odd"key': "1", "é": "ä"}},
    ]
    for group_by, flt in itertools.product(groupings, filters):
        if not (GroupBy.HOUR in group_by and GroupBy.DAY in group_by):
            for tag_key in ("team", 'odd"key'):
                yield UsageQuery(group_by=group_by, tag_key=tag_key, **flt)


async def test_sqlite_and_memory_ledgers_agree_on_a_scenario(tmp_path: Path) -> None:
    records = scenario(seed=7, count=1500)
    memory = MemoryLedger()
    file_ledger = await SqliteLedger.open(tmp_path / "usage.db")
    mem_sqlite = await SqliteLedger.open(":memory:")
    ledgers: list[UsageLedger] = [memory, file_ledger, mem_sqlite]
    for ledger in ledgers:
        await record_all(ledger, records)
    everything = await memory.query(UsageQuery())
    assert everything.total.request_count == 1500
    assert everything.total.cost_nanos_usd == sum(r.cost_nanos_usd for r in records)
    assert everything.total.cache_write_tokens == sum(r.cache_write_tokens for r in records)
    assert everything.total.reasoning_tokens == sum(r.reasoning_tokens for r in records)
    assert everything.total.web_search_requests == sum(r.web_search_requests for r in records)
    assert everything.total.cache_write_1h_tokens == sum(r.cache_write_1h_tokens for r in records)
    assert everything.total.audio_input_tokens == sum(r.audio_input_tokens for r in records)
    assert everything.total.audio_output_tokens == sum(r.audio_output_tokens for r in records)
    checked = 0
    for query in scenario_queries():
        expected = await memory.query(query)
        if query.group_by:
            assert expected.total == sum_totals(expected.rows)
            ungrouped = UsageQuery(**{**_fields(query), "group_by": []})
            assert expected.total == (await memory.query(ungrouped)).total
        else:
            assert expected.rows == []
        for ledger in ledgers[1:]:
            assert await ledger.query(query) == expected, query
        checked += 1
    assert checked > 300
    for ledger in ledgers:
        await ledger.aclose()


def _fields(query: UsageQuery) -> dict[str, Any]:
    return {name: getattr(query, name) for name in UsageQuery.__slots__}


# -- a retried request_id is billed once ------------------------------------------------------


def _rule_rank(record: UsageRecord) -> tuple[bool, int]:
    return (record.outcome not in (Outcome.OK, Outcome.CACHE_HIT), record.time_ns)


def billed_by_rule(records: list[UsageRecord]) -> list[UsageRecord]:
    """The billing rule, written out again in plain Python, for records in recording order: per
    (tenant, non-empty request_id) the earliest success, else the earliest record, by time and then
    recording order; every record without a request id. Returned in recording order."""
    winners: dict[tuple[str, str], int] = {}
    for i, record in enumerate(records):
        if record.request_id:
            key = (record.tenant, record.request_id)
            best = winners.get(key)
            if best is None or _rule_rank(record) < _rule_rank(records[best]):
                winners[key] = i
    chosen = set(winners.values())
    return [r for i, r in enumerate(records) if not r.request_id or i in chosen]


def scenario_with_retries(seed: int, count: int) -> list[UsageRecord]:
    """`scenario` plus retries, shuffled: ~40% of its requests are recorded again 1-3 times (other
    outcomes, costs and tokens; the same, a neighbouring or another hour's time, so there are exact
    ties; sometimes another provider, or the same id in another tenant), and some records carry no
    request id at all."""
    rng = random.Random(seed)
    base = scenario(seed, count)
    records = list(base)
    for original in base:
        if rng.random() >= 0.4:
            continue
        for _ in range(rng.randint(1, 3)):
            records.append(
                dataclasses.replace(
                    original,
                    tags=dict(original.tags),
                    time_ns=original.time_ns + rng.choice([0, 0, 1, -1, rng.randrange(-DAY_NS, DAY_NS)]),
                    outcome=rng.choice(list(Outcome)),
                    provider=rng.choice([original.provider, original.provider, "anthropic"]),
                    tenant=rng.choice([original.tenant] * 5 + ["a"]),
                    input_tokens=rng.randrange(0, 10**6),
                    output_tokens=rng.randrange(0, 10**5),
                    cost_nanos_usd=rng.randrange(0, 10**12),
                )
            )
    for original in rng.sample(base, count // 10):
        records.append(dataclasses.replace(original, request_id="", tags=dict(original.tags)))
        records.append(dataclasses.replace(original, request_id="", tags=dict(original.tags)))
    rng.shuffle(records)
    return records


def identity(record: UsageRecord) -> tuple[Any, ...]:
    return (record.tenant, record.request_id, record.time_ns, str(record.outcome), record.cost_nanos_usd)


async def record_in_chunks(ledger: UsageLedger, records: list[UsageRecord], seed: int) -> None:
    """Concurrent chunks of random sizes: duplicates meet in one SQLite batch and across batches."""
    rng = random.Random(seed)
    start = 0
    while start < len(records):
        size = rng.choice([1, 2, 7, 64, 300])
        await record_all(ledger, records[start : start + size])
        start += size


async def test_a_retried_request_is_billed_once(ledger: UsageLedger) -> None:
    first = [
        rec("r1", T0, tenant="a", outcome=Outcome.ERROR, error_code="UNAVAILABLE", cost_nanos_usd=5),
        rec("r2", T0, tenant="a", cost_nanos_usd=100),
        rec("r3", T0 + 1, tenant="a", outcome=Outcome.CANCELLED, cost_nanos_usd=7),
        rec("r4", T0, tenant="a", cost_nanos_usd=1),
        rec("r4", T0, tenant="b", cost_nanos_usd=2),  # another tenant's r4 is another request
        rec("", T0, tenant="a", cost_nanos_usd=1000),  # no request id: every record is billed
        rec("", T0, tenant="a", cost_nanos_usd=1000),
    ]
    for record in first:
        await ledger.record(record)
    assert (await ledger.query(UsageQuery())).total.cost_nanos_usd == 5 + 100 + 7 + 1 + 2 + 2000

    retries = [
        rec("r1", T0 + 10, tenant="a", cost_nanos_usd=50),  # a later success beats an earlier failure
        rec("r2", T0 + 10, tenant="a", cost_nanos_usd=100),  # a later duplicate success changes nothing
        rec("r3", T0, tenant="a", outcome=Outcome.ERROR, cost_nanos_usd=3),  # an earlier failure, recorded late
        rec("r4", T0, tenant="a", cost_nanos_usd=9),  # an exact tie: the first recorded stays billed
        rec("r5", T0, tenant="a", outcome=Outcome.ERROR, cost_nanos_usd=4),  # a tie within one batch
        rec("r5", T0, tenant="a", outcome=Outcome.CANCELLED, cost_nanos_usd=6),
        rec("r6", T0 + 5, tenant="a", outcome=Outcome.CACHE_HIT, cost_nanos_usd=0),
        rec("r6", T0 + 1, tenant="a", input_tokens=11, cost_nanos_usd=8),  # the earlier success wins
    ]
    await record_all(ledger, retries)
    report = await ledger.query(UsageQuery(group_by=[GroupBy.TENANT]))
    assert keys(report, "tenant") == [("a", 8), ("b", 1)]
    assert report.total == UsageTotals(
        request_count=9,  # billed records: r1..r6 of a, r4 of b, two without an id
        ok_count=7,
        error_count=2,  # r3 (the earlier failure), r5
        input_tokens=11,
        cost_nanos_usd=50 + 100 + 3 + 1 + 2 + 2000 + 4 + 8,
    )
    if isinstance(ledger, MemoryLedger):
        assert len(ledger.records) == len(first) + len(retries)  # every record is kept
        assert ledger.billed_records == billed_by_rule(first + retries)


async def test_a_new_request_is_one_statement_and_a_retry_takes_the_ranking_path(
    sqlite_ledger: SqliteLedger, tmp_path: Path
) -> None:
    statements: list[str] = []
    conn = sqlite_ledger._loop_conn  # the event loop commits (synchronous=NORMAL)
    assert conn is not None
    conn.set_trace_callback(statements.append)
    await sqlite_ledger.record(rec("new", T0, tenant="a", outcome=Outcome.ERROR, cost_nanos_usd=5))
    assert len(statements) == 1 and statements[0].startswith("INSERT INTO usage_records")
    statements.clear()
    # The same request again, now a success: the unique index refuses the plain insert, and the ranking
    # transaction unbills the stored failure.
    await sqlite_ledger.record(rec("new", T0 + 1, tenant="a", cost_nanos_usd=50))
    assert "BEGIN IMMEDIATE" in statements and "COMMIT" in statements
    conn.set_trace_callback(None)
    report = await sqlite_ledger.query(UsageQuery())
    assert (report.total.request_count, report.total.ok_count, report.total.cost_nanos_usd) == (1, 1, 50)
    assert count_rows(tmp_path / "usage.db") == 2


async def test_ledgers_agree_with_the_rule_on_a_scenario_with_retries(tmp_path: Path) -> None:
    records = scenario_with_retries(seed=23, count=1200)
    duplicated = len(records) - len({(r.tenant, r.request_id) for r in records if r.request_id})
    assert duplicated > 800
    billed = billed_by_rule(records)
    expected_ledger = MemoryLedger()  # the plain aggregate of the billed records
    await record_all(expected_ledger, billed)
    memory = MemoryLedger()
    file_ledger = await SqliteLedger.open(tmp_path / "usage.db")
    mem_sqlite = await SqliteLedger.open(":memory:")
    ledgers: list[UsageLedger] = [memory, file_ledger, mem_sqlite]
    for ledger in ledgers:
        await record_in_chunks(ledger, records, seed=5)
    assert memory.billed_records == billed
    assert (await file_ledger.query(UsageQuery())).total.request_count == len(billed)
    checked = 0
    for query in scenario_queries():
        expected = await expected_ledger.query(query)
        for ledger in ledgers:
            assert await ledger.query(query) == expected, query
        checked += 1
    assert checked > 300
    for ledger in ledgers:
        await ledger.aclose()
    # Every record is in the file; exactly the rule's choice is billed, one per request.
    with contextlib.closing(sqlite3.connect(tmp_path / "usage.db")) as conn:
        rows = conn.execute(f"SELECT {', '.join(COLUMNS)}, billed FROM usage_records ORDER BY id").fetchall()
    assert len(rows) == len(records)
    cost = COLUMNS.index("cost_nanos_usd")
    stored = [(r[COLUMNS.index("tenant")], r[0], r[1], r[COLUMNS.index("outcome")], r[cost], r[-1]) for r in rows]
    assert [s[:-1] for s in stored] == [identity(r) for r in records]  # recording order is row order
    assert [s[:-1] for s in stored if s[-1]] == [identity(r) for r in billed]


async def test_a_batch_is_ranked_against_the_stored_billed_row(sqlite_ledger: SqliteLedger, tmp_path: Path) -> None:
    await sqlite_ledger.record(rec("x", T0 + 5, outcome=Outcome.ERROR, cost_nanos_usd=1))
    await sqlite_ledger.record(rec("y", T0, cost_nanos_usd=10))
    async with writer_parked(sqlite_ledger) as blocker:  # what follows is committed as one batch
        tasks = await enqueue(
            sqlite_ledger,
            [
                rec("x", T0 + 9, cost_nanos_usd=2),  # beats the stored failure...
                rec("x", T0 + 7, cost_nanos_usd=3),  # ...and is beaten within the batch by an earlier success
                rec("y", T0, cost_nanos_usd=20),  # ties with the stored row, which stays billed
                rec("z", T0, outcome=Outcome.CANCELLED, cost_nanos_usd=30),
                rec("z", T0, outcome=Outcome.ERROR, cost_nanos_usd=40),
            ],
        )
    await asyncio.gather(blocker, *tasks)
    assert sqlite_ledger.commit_count == 4  # x, y, the blocker, then the five in one batch
    with contextlib.closing(sqlite3.connect(tmp_path / "usage.db")) as conn:
        rows = conn.execute("SELECT request_id, cost_nanos_usd, billed FROM usage_records ORDER BY id").fetchall()
    assert [(rid, cost) for rid, cost, billed in rows if billed] == [("y", 10), ("blocker", 0), ("x", 3), ("z", 30)]
    assert len(rows) == 8
    assert (await sqlite_ledger.query(UsageQuery())).total.cost_nanos_usd == 43


async def test_the_unique_index_refuses_a_second_billed_row(sqlite_ledger: SqliteLedger, tmp_path: Path) -> None:
    await record_all(sqlite_ledger, [rec("once", tenant="a"), rec("", tenant="a"), rec("", tenant="a")])
    cols = ", ".join(COLUMNS)
    with contextlib.closing(sqlite3.connect(tmp_path / "usage.db", isolation_level=None)) as conn:
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE"):
            conn.execute(f"INSERT INTO usage_records ({cols}, billed) SELECT {cols}, 1 FROM usage_records LIMIT 1")
        # Records without a request id are outside the index: any number of them is billed.
        conn.execute(f"INSERT INTO usage_records ({cols}, billed) SELECT {cols}, 1 FROM usage_records WHERE id = 2")
        plan = conn.execute(
            "EXPLAIN QUERY PLAN SELECT id FROM usage_records WHERE tenant = 'a' AND request_id = 'once' "
            "AND billed AND request_id <> ''"
        ).fetchall()
    assert "usage_records_billed_request" in str(plan)
    assert (await sqlite_ledger.query(UsageQuery())).total.request_count == 4


# What a v1 build (before the billed column) created, verbatim.
_V1_SCHEMA = """
CREATE TABLE usage_records (
    id INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    time_ns INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    provider TEXT NOT NULL,
    model TEXT NOT NULL,
    requested_model TEXT NOT NULL,
    outcome TEXT NOT NULL,
    error_code TEXT NOT NULL,
    error_reason TEXT NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    cached_input_tokens INTEGER NOT NULL,
    cache_write_tokens INTEGER NOT NULL,
    reasoning_tokens INTEGER NOT NULL,
    cost_nanos_usd INTEGER NOT NULL,
    estimated INTEGER NOT NULL,
    unpriced INTEGER NOT NULL,
    streamed INTEGER NOT NULL,
    attempt_count INTEGER NOT NULL,
    latency_ms INTEGER NOT NULL,
    tags TEXT NOT NULL
) STRICT;
CREATE INDEX usage_records_time ON usage_records (time_ns);
PRAGMA user_version=1;
"""


# The columns of a v1 file (v3 added the last two of the summed fields).
_LATER_COLUMNS = ("web_search_requests", "cache_write_1h_tokens", "audio_input_tokens", "audio_output_tokens")
_V1_COLUMNS = tuple(c for c in COLUMNS if c not in _LATER_COLUMNS)


def _v1_row(record: UsageRecord) -> tuple[Any, ...]:
    values = [getattr(record, c) for c in _V1_COLUMNS]
    values[_V1_COLUMNS.index("outcome")] = str(record.outcome)
    values[_V1_COLUMNS.index("tags")] = json.dumps(record.tags)
    return tuple(int(v) if isinstance(v, bool) else v for v in values)


async def test_a_v1_file_is_migrated_in_place_and_billed_by_the_rule(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    # A v1 file has no place for web searches, 1-hour writes or audio: migrated, its records have 0 of them.
    old = [
        dataclasses.replace(
            r, web_search_requests=0, cache_write_1h_tokens=0, audio_input_tokens=0, audio_output_tokens=0
        )
        for r in scenario_with_retries(seed=3, count=300)
    ]
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_V1_SCHEMA)
        placeholders = ", ".join("?" * len(_V1_COLUMNS))
        conn.executemany(
            f"INSERT INTO usage_records ({', '.join(_V1_COLUMNS)}) VALUES ({placeholders})", [_v1_row(r) for r in old]
        )
    ledger = await SqliteLedger.open(path)
    try:
        expected = MemoryLedger()
        await record_all(expected, billed_by_rule(old))
        for query in [UsageQuery(), UsageQuery(group_by=[GroupBy.TENANT, GroupBy.DAY])]:
            assert await ledger.query(query) == await expected.query(query)
        # New records are ranked against the migrated ones.
        later = [dataclasses.replace(r, time_ns=r.time_ns - 1, outcome=Outcome.OK) for r in old[:50] if r.request_id]
        await record_all(ledger, later)
        reference = MemoryLedger()
        await record_all(reference, billed_by_rule(old + later))
        assert await ledger.query(UsageQuery()) == await reference.query(UsageQuery())
    finally:
        await ledger.aclose()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4
        assert conn.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0] == len(old) + len(later)
        indexes = {row[1]: row[2] for row in conn.execute("PRAGMA index_list(usage_records)")}
    assert indexes["usage_records_billed_request"] == 1  # unique


CHILD_RETRIER = """
import asyncio, sys
from feather_grpc.core.ledger import Outcome, UsageRecord
from feather_grpc.state.sqlite_ledger import SqliteLedger

async def main():
    ledger = await SqliteLedger.open(sys.argv[1], busy_timeout_ms=10_000)
    for wave in range(int(sys.argv[2])):
        await asyncio.gather(*(ledger.record(UsageRecord(request_id=f"dup-{wave}-{i}", time_ns=i + 1,
                                                         cost_nanos_usd=3)) for i in range(64)))
    await ledger.aclose()

asyncio.run(main())
"""


async def test_processes_sharing_a_file_bill_each_request_once(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    first = await SqliteLedger.open(path, busy_timeout_ms=10_000)
    second = await SqliteLedger.open(path, busy_timeout_ms=10_000)

    async def waves(ledger: SqliteLedger, outcome: Outcome, time_ns: int, cost: int) -> None:
        for wave in range(30):
            await asyncio.gather(
                *(
                    ledger.record(rec(f"dup-{wave}-{i}", i + time_ns, outcome=outcome, cost_nanos_usd=cost))
                    for i in range(64)
                )
            )

    child = asyncio.create_task(run_child(CHILD_RETRIER, str(path), "30"))
    # The same 1,920 requests from three writers: a failure at i+2, successes at i+1 (a tie).
    await asyncio.gather(waves(first, Outcome.ERROR, 2, 1), waves(second, Outcome.OK, 1, 2))
    returncode, stderr = await child
    assert returncode == 0, stderr
    report = await first.query(UsageQuery())
    await first.aclose()
    await second.aclose()
    assert count_rows(path) == 3 * 30 * 64
    assert report.total.request_count == report.total.ok_count == 30 * 64
    with contextlib.closing(sqlite3.connect(path)) as conn:
        billed = conn.execute(
            "SELECT request_id, COUNT(*), MIN(outcome), MIN(time_ns - CAST(substr(request_id, instr(substr("
            "request_id, 5), '-') + 5) AS INTEGER)) FROM usage_records WHERE billed GROUP BY request_id"
        ).fetchall()
    assert len(billed) == 30 * 64
    assert {(n, outcome, offset) for _, n, outcome, offset in billed} == {(1, "ok", 1)}
    assert report.total.cost_nanos_usd in range(2 * 30 * 64, 3 * 30 * 64 + 1)


# -- exact sums ------------------------------------------------------------------------------


async def test_sums_past_2_to_the_63_are_exact(ledger: UsageLedger) -> None:
    top, bottom = 2**63 - 1, -(2**63)
    records = [
        rec(f"hi{i}", tenant="hi", cost_nanos_usd=top, input_tokens=top, output_tokens=2**62, cache_write_tokens=top)
        for i in range(5)
    ]
    records += [
        rec(f"lo{i}", tenant="lo", cost_nanos_usd=bottom, cached_input_tokens=bottom, reasoning_tokens=bottom)
        for i in range(3)
    ]
    records += [rec("mixed", tenant="mixed", cost_nanos_usd=-1), rec("", tenant="mixed", cost_nanos_usd=2**32 + 7)]
    await record_all(ledger, records)
    report = await ledger.query(UsageQuery(group_by=[GroupBy.TENANT]))
    by_tenant = {row.tenant: row for row in report.rows}
    assert by_tenant["hi"].cost_nanos_usd == by_tenant["hi"].input_tokens == 5 * top
    assert by_tenant["hi"].output_tokens == 5 * 2**62
    assert by_tenant["hi"].cache_write_tokens == 5 * top
    assert by_tenant["lo"].cost_nanos_usd == by_tenant["lo"].cached_input_tokens == 3 * bottom
    assert by_tenant["lo"].reasoning_tokens == 3 * bottom
    assert by_tenant["mixed"].cost_nanos_usd == 2**32 + 6
    assert report.total == sum_totals(report.rows)
    assert report.total.cost_nanos_usd == 5 * top + 3 * bottom + 2**32 + 6
    assert (await ledger.query(UsageQuery())).total == report.total
    daily = await ledger.query(UsageQuery(group_by=[GroupBy.DAY], tenant="hi"))
    assert daily.total.input_tokens == 5 * top


# -- SqliteLedger: storage ------------------------------------------------------------------


async def test_every_field_round_trips_through_the_file(sqlite_ledger: SqliteLedger, tmp_path: Path) -> None:
    original = UsageRecord(
        request_id="req-ü-1",
        time_ns=T0 + 123_456_789,
        tenant="acme",
        provider="anthropic",
        model="claude-sonnet",
        requested_model="smart",
        outcome=Outcome.CANCELLED,
        error_code="CANCELLED",
        error_reason="CLIENT_CANCELLED",
        input_tokens=1_000_001,
        output_tokens=2_002,
        cached_input_tokens=303,
        cache_write_tokens=44,
        reasoning_tokens=5,
        cost_nanos_usd=2**62 + 1,  # beyond float precision: must stay an exact integer
        estimated=True,
        unpriced=True,
        streamed=True,
        attempt_count=3,
        latency_ms=1234,
        tags={"team": "search", "é": 'quote " \\ ünï'},
    )
    await sqlite_ledger.record(original)
    with contextlib.closing(sqlite3.connect(tmp_path / "usage.db")) as conn:
        conn.row_factory = sqlite3.Row
        (row,) = conn.execute(f"SELECT {', '.join(COLUMNS)} FROM usage_records").fetchall()
        types = conn.execute(
            "SELECT typeof(cost_nanos_usd), typeof(input_tokens), typeof(time_ns) FROM usage_records"
        ).fetchone()
    assert tuple(types) == ("integer", "integer", "integer")
    values = dict(row)
    values["tags"] = json.loads(values["tags"])
    values["outcome"] = Outcome(values["outcome"])
    for flag in ("estimated", "unpriced", "streamed"):
        values[flag] = bool(values[flag])
    assert UsageRecord(**values) == original


async def test_memory_ledger_keeps_a_snapshot_of_each_record() -> None:
    ledger = MemoryLedger()
    original = rec("1", tags={"team": "x"})
    await ledger.record(original)
    original.tags["team"] = "changed"
    assert ledger.records == [rec("1", tags={"team": "x"})]


async def test_file_has_wal_journal_schema_version_and_time_index(sqlite_ledger: SqliteLedger, tmp_path: Path) -> None:
    with contextlib.closing(sqlite3.connect(tmp_path / "usage.db")) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        indexes = conn.execute("PRAGMA index_list(usage_records)").fetchall()
        (time_index,) = [name for _, name, *_ in indexes if name == "usage_records_time"]
        assert [c[2] for c in conn.execute(f"PRAGMA index_info({time_index})")] == ["time_ns"]


async def test_reopening_keeps_records_and_refuses_a_newer_schema(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    first = await SqliteLedger.open(path)
    await record_all(first, BASIC)
    await first.aclose()
    again = await SqliteLedger.open(path, synchronous="FULL")
    assert (await again.query(UsageQuery())).total.request_count == 5
    await again.aclose()

    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA user_version=99")
    with pytest.raises(RuntimeError, match="newer"):
        await SqliteLedger.open(path)


async def test_open_failure_reaches_open_record_and_query(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "usage.db"
    with pytest.raises(sqlite3.OperationalError):
        await SqliteLedger.open(missing)
    lazy = SqliteLedger(missing)  # construction does no I/O; the first call reports the failure
    with pytest.raises(sqlite3.OperationalError):
        await lazy.record(rec("1"))
    with pytest.raises(sqlite3.OperationalError):
        await lazy.query(UsageQuery())
    await lazy.aclose()


async def test_ledgers_opening_one_new_file_together_all_open(tmp_path: Path) -> None:
    # Workers starting together race to create the file and switch it to WAL; SQLite answers some of
    # them "database is locked" without waiting. Before the open waited out that lock, about one round
    # in a hundred failed here.
    for round_no in range(300):
        ledgers = [SqliteLedger(tmp_path / f"usage-{round_no}.db") for _ in range(8)]
        try:
            results = await asyncio.gather(*(ledger.ready() for ledger in ledgers), return_exceptions=True)
        finally:
            for ledger in ledgers:
                await ledger.aclose()
        assert [r for r in results if r is not None] == [], f"round {round_no}"


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError):
        SqliteLedger(":memory:", synchronous="OFF")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SqliteLedger(":memory:", max_batch=0)
    with pytest.raises(ValueError):
        SqliteLedger(":memory:", group_window_s=-0.001)
    with pytest.raises(ValueError):
        SqliteLedger("")


# -- SqliteLedger: group commit --------------------------------------------------------------


async def test_a_lone_record_commits_at_once(sqlite_ledger: SqliteLedger, tmp_path: Path) -> None:
    await sqlite_ledger.record(rec("alone"))
    assert sqlite_ledger.commit_count == 1
    assert count_rows(tmp_path / "usage.db") == 1


async def test_concurrent_records_share_commits(sqlite_ledger: SqliteLedger, tmp_path: Path) -> None:
    await asyncio.gather(*(sqlite_ledger.record(rec(f"c{i}")) for i in range(200)))
    assert sqlite_ledger.commit_count < 50  # one per call without group commit
    assert count_rows(tmp_path / "usage.db") == 200


async def test_records_waiting_during_a_commit_form_one_batch(sqlite_ledger: SqliteLedger, tmp_path: Path) -> None:
    async with writer_parked(sqlite_ledger) as blocker:
        tasks = await enqueue(sqlite_ledger, [rec(f"w{i}") for i in range(200)])
        assert not any(t.done() for t in [blocker, *tasks])
    await asyncio.gather(blocker, *tasks)
    assert sqlite_ledger.commit_count == 2  # the blocker's, then all 200 together
    assert count_rows(tmp_path / "usage.db") == 201


async def test_a_lone_caller_never_waits_for_a_group(sqlite_ledger: SqliteLedger, tmp_path: Path) -> None:
    # Concurrency 1: each record is made after the previous one committed, so none ever overlaps another
    # and no parcel is held for company that cannot come.
    for i in range(30):
        await sqlite_ledger.record(rec(f"s{i}"))
    assert sqlite_ledger.commit_count == 30
    assert sqlite_ledger.held_count == 0
    assert count_rows(tmp_path / "usage.db") == 30


async def test_once_records_overlap_later_turns_share_a_held_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A long hold, so that the next records surely fall inside it however loaded the machine.
    monkeypatch.setattr(sqlite_ledger_module, "GROUP_HOLD_S", 60.0)
    ledger = await SqliteLedger.open(tmp_path / "usage.db", group_window_s=0.5, backlogged=lambda: True)
    async with writer_parked(ledger) as blocker:
        (waiting,) = await enqueue(ledger, [rec("during")])  # arrives while a commit is under way
    await asyncio.gather(blocker, waiting)
    assert ledger.commit_count == 2
    # Two records made in different turns of the loop: the first one's parcel is held for the window,
    # and the second joins it.
    first = asyncio.create_task(ledger.record(rec("first")))
    for _ in range(3):
        await asyncio.sleep(0)
    second = asyncio.create_task(ledger.record(rec("second")))
    await asyncio.gather(first, second)
    assert ledger.commit_count == 3
    assert ledger.held_count >= 1
    await ledger.aclose()
    assert count_rows(tmp_path / "usage.db") == 4


@pytest.mark.parametrize("backlogged", [None, False])
async def test_without_a_backlog_nobody_waits_for_a_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backlogged: bool | None
) -> None:
    # Records overlap, but the owner says its calls do not queue (or says nothing): a held parcel would
    # only make its callers wait.
    monkeypatch.setattr(sqlite_ledger_module, "GROUP_HOLD_S", 60.0)
    hint = None if backlogged is None else (lambda: backlogged)
    ledger = await SqliteLedger.open(tmp_path / "usage.db", group_window_s=0.5, backlogged=hint)
    async with writer_parked(ledger) as blocker:
        (waiting,) = await enqueue(ledger, [rec("during")])
    await asyncio.gather(blocker, waiting)
    first = asyncio.create_task(ledger.record(rec("first")))
    for _ in range(3):
        await asyncio.sleep(0)
    second = asyncio.create_task(ledger.record(rec("second")))
    await asyncio.gather(first, second)
    assert ledger.held_count == 0
    await ledger.aclose()
    assert count_rows(tmp_path / "usage.db") == 4


async def test_batches_are_capped(tmp_path: Path) -> None:
    ledger = await SqliteLedger.open(tmp_path / "usage.db", max_batch=64)
    async with writer_parked(ledger) as blocker:
        tasks = await enqueue(ledger, [rec(f"w{i}") for i in range(200)])
    await asyncio.gather(blocker, *tasks)
    assert ledger.commit_count == 1 + 4  # 64 + 64 + 64 + 8
    await ledger.aclose()
    assert count_rows(tmp_path / "usage.db") == 201


async def test_sqlite_memory_ledger_groups_too() -> None:
    ledger = await SqliteLedger.open(":memory:")
    async with writer_parked(ledger) as blocker:
        tasks = await enqueue(ledger, [rec(f"w{i}") for i in range(100)])
    await asyncio.gather(blocker, *tasks)
    assert ledger.commit_count == 2
    assert (await ledger.query(UsageQuery())).total.request_count == 101
    await ledger.aclose()


async def test_a_failed_commit_fails_every_caller_in_the_batch(sqlite_ledger: SqliteLedger, tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    fail_inserts_of(path, "boom")
    async with writer_parked(sqlite_ledger) as blocker:
        tasks = await enqueue(sqlite_ledger, [rec("a"), rec("boom"), rec("b")])
    await blocker
    results = await asyncio.gather(*tasks, return_exceptions=True)
    # A LedgerWriteError carrying the database's words and its own error: callers can refuse calls on it.
    assert [type(r) for r in results] == [LedgerWriteError] * 3
    assert all("IntegrityError: disk on fire" in str(r) for r in results)
    assert all(isinstance(r, LedgerWriteError) and isinstance(r.__cause__, sqlite3.IntegrityError) for r in results)
    assert count_rows(path) == 1  # only the blocker: the failed batch was rolled back
    await sqlite_ledger.record(rec("later"))  # the writer carries on
    assert count_rows(path) == 2


async def test_a_cancelled_caller_is_still_recorded(sqlite_ledger: SqliteLedger, tmp_path: Path) -> None:
    async with writer_parked(sqlite_ledger) as blocker:
        (task,) = await enqueue(sqlite_ledger, [rec("cancelled-caller")])
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    await blocker
    await sqlite_ledger.aclose()
    assert count_rows(tmp_path / "usage.db") == 2


async def test_aclose_commits_what_is_pending(tmp_path: Path) -> None:
    ledger = await SqliteLedger.open(tmp_path / "usage.db")
    async with writer_parked(ledger) as blocker:
        tasks = await enqueue(ledger, [rec(f"p{i}") for i in range(100)])
        closing = asyncio.create_task(ledger.aclose())
        await asyncio.sleep(0)
        assert not closing.done() and not any(t.done() for t in tasks)
        with pytest.raises(RuntimeError):
            await ledger.record(rec("too late"))
    await closing
    assert all(t.done() and t.exception() is None for t in [blocker, *tasks])
    assert count_rows(tmp_path / "usage.db") == 101


# -- commits on the event loop (synchronous=NORMAL, see the module doc) -------------------------------------


async def test_the_loop_commits_each_turns_records_before_record_returns(
    sqlite_ledger: SqliteLedger, tmp_path: Path
) -> None:
    await sqlite_ledger.record(rec("alone"))
    assert count_rows(tmp_path / "usage.db") == 1  # on disk for another connection when record() returned
    await asyncio.gather(*(sqlite_ledger.record(rec(f"t{i}")) for i in range(50)))  # made in one turn
    assert (sqlite_ledger.commit_count, sqlite_ledger.loop_commit_count) == (2, 2)
    assert count_rows(tmp_path / "usage.db") == 51


@pytest.mark.parametrize("synchronous", ["FULL", "EXTRA"])
async def test_a_commit_that_fsyncs_never_runs_on_the_loop(tmp_path: Path, synchronous: Any) -> None:
    ledger = await SqliteLedger.open(tmp_path / "usage.db", synchronous=synchronous)
    await asyncio.gather(*(ledger.record(rec(f"f{i}")) for i in range(5)))
    await ledger.record(rec("after"))
    assert ledger.commit_count >= 2 and ledger.loop_commit_count == 0
    await ledger.aclose()
    assert count_rows(tmp_path / "usage.db") == 6
    with pytest.raises(ValueError, match="commit_on_loop"):
        SqliteLedger(tmp_path / "other.db", synchronous=synchronous, commit_on_loop=True)


async def test_a_write_lock_held_elsewhere_sends_records_to_the_thread_in_order(
    sqlite_ledger: SqliteLedger, tmp_path: Path
) -> None:
    path = tmp_path / "usage.db"
    with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # an operator's shell, another process: it holds the write lock
        first = asyncio.create_task(sqlite_ledger.record(rec("first")))
        async with asyncio.timeout(10):
            while not sqlite_ledger.busy_fallback_count:  # noqa: ASYNC110 (a counter, no event to wait on)
                await asyncio.sleep(0)  # the loop tries, meets the lock, and does not wait for it
        second = asyncio.create_task(sqlite_ledger.record(rec("second")))  # follows the first to the thread
        await asyncio.sleep(0)
        assert not first.done() and not second.done()
        other.execute("ROLLBACK")
        await asyncio.gather(first, second)
    assert (sqlite_ledger.busy_fallback_count, sqlite_ledger.loop_commit_count) == (1, 0)
    await sqlite_ledger.record(rec("third"))  # the thread has nothing left: back on the loop
    assert sqlite_ledger.loop_commit_count == 1
    with contextlib.closing(sqlite3.connect(path)) as conn:
        order = [r for (r,) in conn.execute("SELECT request_id FROM usage_records ORDER BY id")]
    assert order == ["first", "second", "third"]


async def test_a_lone_call_commits_its_record_in_its_own_turn(tmp_path: Path) -> None:
    """With the owner's word that its call is alone, `record()` commits before it returns, without giving
    the loop a turn; when the owner says otherwise, or says nothing, the record waits for the end of the
    turn as before."""
    alone = {"now": True}
    ledger = await SqliteLedger.open(tmp_path / "usage.db", alone=lambda: alone["now"])
    turns = 0

    def turn() -> None:
        nonlocal turns
        turns += 1

    asyncio.get_running_loop().call_soon(turn)
    await ledger.record(rec("lone"))
    assert turns == 0, "the loop ran a turn: the record went by the end-of-turn parcel"
    assert ledger.loop_commit_count == 1 and count_rows(tmp_path / "usage.db") == 1
    await asyncio.sleep(0)
    alone["now"] = False
    asyncio.get_running_loop().call_soon(turn)
    await ledger.record(rec("not alone"))
    assert turns == 2
    await ledger.aclose()
    assert count_rows(tmp_path / "usage.db") == 2


async def test_a_lone_record_never_overtakes_one_that_waits(tmp_path: Path) -> None:
    """A record made while another waits for its commit goes with it, in order, even when the owner says
    its call is alone (the owner counts calls, and a call's record may come after it left the count)."""
    alone = {"now": False}
    ledger = await SqliteLedger.open(tmp_path / "usage.db", alone=lambda: alone["now"])

    async def record_alone(request_id: str) -> None:
        alone["now"] = True
        await ledger.record(rec(request_id))

    # Both run in this turn: the first one's parcel leaves at its end, with the second in it.
    first = asyncio.create_task(ledger.record(rec("first")))
    second = asyncio.create_task(record_alone("second"))
    await asyncio.gather(first, second)
    assert ledger.loop_commit_count == 1
    await ledger.aclose()
    with contextlib.closing(sqlite3.connect(tmp_path / "usage.db")) as conn:
        order = [r for (r,) in conn.execute("SELECT request_id FROM usage_records ORDER BY id")]
    assert order == ["first", "second"]


async def test_a_failed_commit_on_the_loop_fails_its_turn(sqlite_ledger: SqliteLedger, tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    fail_inserts_of(path, "boom")
    results = await asyncio.gather(*(sqlite_ledger.record(rec(r)) for r in ("a", "boom", "b")), return_exceptions=True)
    assert [type(r) for r in results] == [LedgerWriteError] * 3
    assert all("IntegrityError: disk on fire" in str(r) for r in results)
    assert count_rows(path) == 0
    await sqlite_ledger.record(rec("later"))
    assert count_rows(path) == 1 and sqlite_ledger.loop_commit_count == 1


async def test_a_big_batch_of_new_requests_is_one_transaction_and_a_retry_in_it_takes_the_ranking_path(
    sqlite_ledger: SqliteLedger, tmp_path: Path
) -> None:
    statements: list[str] = []
    conn = sqlite_ledger._loop_conn
    assert conn is not None
    conn.set_trace_callback(lambda statement: statements.append(statement.split(" (")[0]))
    await asyncio.gather(*(sqlite_ledger.record(rec(f"n{i}")) for i in range(100)))  # one turn, 3 INSERTs
    assert statements == ["BEGIN IMMEDIATE", *["INSERT INTO usage_records"] * 3, "COMMIT"]
    statements.clear()
    # The third INSERT meets n5's billed row: the two before it are rolled back with it, and the batch is
    # ranked instead (the retry, a failure, loses to the stored success).
    batch = [rec(f"m{i}") for i in range(99)]
    batch.insert(90, rec("n5", T0 + 1, outcome=Outcome.ERROR))
    await asyncio.gather(*(sqlite_ledger.record(r) for r in batch))
    assert statements.count("ROLLBACK") == 1 and statements[-1] == "COMMIT"
    conn.set_trace_callback(None)
    assert sqlite_ledger.loop_commit_count == 2
    with contextlib.closing(sqlite3.connect(tmp_path / "usage.db")) as other:
        assert other.execute("SELECT COUNT(*), SUM(billed) FROM usage_records").fetchone() == (200, 199)
        billed = other.execute("SELECT billed FROM usage_records WHERE request_id = 'n5' ORDER BY id").fetchall()
    assert billed == [(1,), (0,)]


async def test_checkpoints_keep_the_wal_bounded(sqlite_ledger: SqliteLedger, tmp_path: Path) -> None:
    # One commit per record: without checkpoints the WAL would grow by a few 4 KiB pages each (~40 MB).
    for i in range(3_000):
        await sqlite_ledger.record(rec(f"w{i}"))
    # A few went to the writer thread while a checkpoint held the write lock to let the WAL start over.
    assert sqlite_ledger.commit_count == 3_000 and sqlite_ledger.loop_commit_count > 2_000
    assert (tmp_path / "usage.db-wal").stat().st_size < 8 * 2**20
    assert count_rows(tmp_path / "usage.db") == 3_000


async def test_queries_read_beside_writers(sqlite_ledger: SqliteLedger, tmp_path: Path) -> None:
    await record_all(sqlite_ledger, BASIC)
    with contextlib.closing(sqlite3.connect(tmp_path / "usage.db", isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # another writer holds the write lock, uncommitted
        cols = ", ".join(COLUMNS)
        other.execute(f"INSERT INTO usage_records ({cols}, billed) SELECT {cols}, 0 FROM usage_records LIMIT 1")
        async with writer_parked(sqlite_ledger) as blocker:  # and our writer is mid-commit
            async with asyncio.timeout(10):
                report = await sqlite_ledger.query(UsageQuery())
            assert not blocker.done()
        other.execute("ROLLBACK")
    assert report.total.request_count == 5
    await blocker


# -- SqliteLedger: durability and sharing -----------------------------------------------------

CHILD_CRASH = """
import asyncio, os, signal, sys
from feather_grpc.core.ledger import UsageRecord
from feather_grpc.state.sqlite_ledger import SqliteLedger

async def main():
    ledger = await SqliteLedger.open(sys.argv[1])
    await asyncio.gather(*(ledger.record(UsageRecord(request_id=f"c{i}", time_ns=i)) for i in range(50)))
    await ledger.record(UsageRecord(request_id="last", time_ns=50))
    os.kill(os.getpid(), signal.SIGKILL)  # no aclose, no flush: what record() returned for must be there

asyncio.run(main())
"""

CHILD_WRITER = """
import asyncio, sys
from feather_grpc.core.ledger import UsageRecord
from feather_grpc.state.sqlite_ledger import SqliteLedger

async def main():
    ledger = await SqliteLedger.open(sys.argv[1], busy_timeout_ms=10_000)
    for wave in range(int(sys.argv[2])):
        await asyncio.gather(*(ledger.record(UsageRecord(request_id=f"child-{wave}-{i}", time_ns=i))
                               for i in range(64)))
    await ledger.aclose()

asyncio.run(main())
"""


async def run_child(code: str, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, *args, cwd=REPO, stderr=asyncio.subprocess.PIPE
    )
    _, stderr = await process.communicate()
    assert process.returncode is not None
    return process.returncode, stderr.decode()


async def test_records_survive_a_process_kill(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    returncode, stderr = await run_child(CHILD_CRASH, str(path))
    assert returncode == -signal.SIGKILL, stderr
    assert count_rows(path) == 51


async def test_records_are_visible_to_a_new_connection_as_soon_as_record_returns(
    sqlite_ledger: SqliteLedger, tmp_path: Path
) -> None:
    for i in range(5):
        await sqlite_ledger.record(rec(f"v{i}"))
        assert count_rows(tmp_path / "usage.db") == i + 1


async def test_two_ledgers_and_another_process_write_one_file(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    first = await SqliteLedger.open(path, busy_timeout_ms=10_000)
    second = await SqliteLedger.open(path, busy_timeout_ms=10_000)

    async def waves(ledger: SqliteLedger, name: str) -> None:
        for wave in range(30):
            await asyncio.gather(*(ledger.record(rec(f"{name}-{wave}-{i}")) for i in range(64)))

    child = asyncio.create_task(run_child(CHILD_WRITER, str(path), "30"))
    await asyncio.gather(waves(first, "first"), waves(second, "second"))
    returncode, stderr = await child
    assert returncode == 0, stderr
    await first.aclose()
    await second.aclose()
    assert count_rows(path) == 3 * 30 * 64


async def test_total_is_the_exact_sum_of_rows_for_large_integers(ledger: UsageLedger) -> None:
    big = 2**60 + 7  # a float would round this
    await record_all(ledger, [rec(f"b{i}", tenant=f"t{i}", cost_nanos_usd=big + i) for i in range(4)])
    report = await ledger.query(UsageQuery(group_by=[GroupBy.TENANT]))
    assert [row.cost_nanos_usd for row in report.rows] == [big, big + 1, big + 2, big + 3]
    assert report.total.cost_nanos_usd == 4 * big + 6 == sum_totals(report.rows).cost_nanos_usd


# -- through the gateway ---------------------------------------------------------------------


@pytest.mark.parametrize("cache", [False, True])
@pytest.mark.parametrize("ledger_type", ["memory", "sqlite"])
async def test_a_chat_sent_twice_with_one_request_id_is_billed_once(
    tmp_path: Path, ledger_type: str, cache: bool
) -> None:
    path = tmp_path / "usage.db"
    document = {**MOCK_CONFIG, "ledger": {"type": ledger_type, "path": str(path)}, "cache": {"enabled": cache}}
    async with running_gateway(document) as gw:
        # temperature 0: cacheable when the cache is on
        request = pb.ChatRequest(model="fast", messages=[user("bill me once")], request_id="r-42", temperature=0)
        first = await gw.stub.Chat(request)
        second = await gw.stub.Chat(request)  # a client retry (served again, or from the cache)
        other = await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("another")], request_id="r-43"))
        assert first.cost_nanos_usd > 0 and first.usage.input_tokens > 0
        assert second.cached == cache
        if not cache:
            assert second.cost_nanos_usd == first.cost_nanos_usd  # both calls consumed; one is billed
        usage = await gw.stub.Usage(pb.UsageRequest())
        ledger = gw.server.assembly.engine.ledger if gw.server.assembly is not None else None
        if isinstance(ledger, MemoryLedger):
            assert [r.request_id for r in ledger.records] == ["r-42", "r-42", "r-43"]  # every call is recorded
    if ledger_type == "sqlite":
        with contextlib.closing(sqlite3.connect(path)) as conn:
            rows = conn.execute("SELECT request_id, outcome, billed FROM usage_records ORDER BY id").fetchall()
        first_outcome = "ok"
        second_outcome = "cache_hit" if second.cached else "ok"
        assert rows == [("r-42", first_outcome, 1), ("r-42", second_outcome, 0), ("r-43", "ok", 1)]
    # request_count counts billed records: one per request id.
    assert usage.total.request_count == 2
    assert usage.total.ok_count == 2
    assert usage.total.cost_nanos_usd == first.cost_nanos_usd + other.cost_nanos_usd
    assert usage.total.input_tokens == first.usage.input_tokens + other.usage.input_tokens
    assert usage.total.output_tokens == first.usage.output_tokens + other.usage.output_tokens


def test_the_postgres_spool_sits_next_to_the_ledger_file_or_in_the_working_directory(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from feather_grpc import config as config_module
    from feather_grpc.server.assembly import spool_path

    monkeypatch.delenv("FEATHER_SPOOL_PATH", raising=False)

    def load(ledger: dict[str, str]) -> config_module.GatewayConfig:
        providers = {"mock": {"type": "mock", "models": [{"name": "m", "inputPer1M": 1, "outputPer1M": 1}]}}
        return config_module.resolve(
            config_module.parse_file_config(json.dumps({"ledger": ledger, "providers": providers}), "t")
        )

    on_disk, in_memory = load({"path": "/var/lib/f/u.db"}), load({"type": "memory"})
    assert spool_path(on_disk, None) == "/var/lib/f/u.spool.db"
    assert spool_path(on_disk, 1) == "/var/lib/f/u.spool.w1.db"
    assert spool_path(in_memory, None) == "feather-usage.spool.db"  # was ":memory:.spool.db"
    monkeypatch.setenv("FEATHER_SPOOL_PATH", "/data/spool.db")
    assert spool_path(in_memory, 0) == "/data/spool.w0.db"


async def test_a_workers_ledger_opens_no_connection_for_commits_it_never_makes(tmp_path: Path) -> None:
    """Under `serve --workers`, a worker's SocketLedger sends its rows to the writer process: it holds the
    file open once (its thread's connection), not also for commits on its loop, as a SqliteLedger does."""
    from feather_grpc.state.ledger_writer import SocketLedger

    db, sock = tmp_path / "ledger.db", str(tmp_path / "writer.sock")
    writer = await asyncio.start_unix_server(lambda reader, stream: None, sock)  # accepts, never answers

    def connections() -> int:  # this process's open descriptors of the ledger file
        return sum(1 for fd in Path("/proc/self/fd").iterdir() if fd.resolve() == db)

    own = SqliteLedger(str(db))
    await own.ready()
    assert connections() == 2  # its writer thread's, and its loop's
    await own.aclose()
    worker = SocketLedger(str(db), sock)
    await worker.ready()
    assert connections() == 1
    await worker.aclose()
    writer.close()
    await writer.wait_closed()
