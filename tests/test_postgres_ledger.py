"""PostgresLedger against a real PostgreSQL 16 (tests/pg_server.py): same answers as MemoryLedger,
one set of totals for every replica, a retried request_id billed once, and nothing lost or doubled
through a kill -9 of the writer or an outage of Postgres."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import signal
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from feather_grpc.core.ledger import GroupBy, Outcome, UsageQuery, UsageRecord, UsageReport, UsageTotals
from feather_grpc.state.ledger_rows import COLUMNS
from feather_grpc.state.ledger_spool import SpoolLocked
from feather_grpc.state.memory_ledger import MemoryLedger
from feather_grpc.state.postgres_ledger import LedgerUnavailable, PostgresLedger
from feather_grpc.state.postgres_schema import SCHEMA_VERSION
from feather_grpc.state.sqlite_ledger import SqliteLedger
from feather_grpc.state.usage_math import DAY_NS, HOUR_NS, sum_totals
from tests.pg_server import PgServer, free_port
from tests.test_ledger import BASIC, T0, count_rows, rec, scenario, scenario_queries

REPO = Path(__file__).resolve().parent.parent
FLUSH_S = 20.0  # generous deadlines: they bound a failure, a passing run never waits for them


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with PgServer() as server:
        yield server


_db_counter = itertools.count()


@pytest.fixture
def dsn(pg: PgServer) -> str:
    """A fresh database for each test."""
    return pg.create_database(f"ledger_{os.getpid()}_{next(_db_counter)}")


@pytest.fixture
async def ledger(dsn: str, tmp_path: Path) -> AsyncIterator[PostgresLedger]:
    store = await PostgresLedger.open(dsn, tmp_path / "spool.db")
    yield store
    await store.aclose()


async def record_all(ledger: PostgresLedger | MemoryLedger, records: list[UsageRecord]) -> None:
    await asyncio.gather(*(ledger.record(r) for r in records))


async def shipped(ledger: PostgresLedger, records: list[UsageRecord]) -> None:
    """Record, then wait until all of it is in Postgres."""
    await record_all(ledger, records)
    assert await ledger.flushed(FLUSH_S)


async def wait_until(predicate: Callable[[], bool | Awaitable[bool]], timeout_s: float, what: str) -> None:
    """Poll a condition until it holds; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def db_rows(dsn: str, sql: str, *args: object) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(dsn)
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def request_id_counts(dsn: str) -> dict[str, int]:
    rows = await db_rows(dsn, "SELECT request_id, COUNT(*) AS n FROM feather_usage GROUP BY request_id")
    return {row["request_id"]: row["n"] for row in rows}


def unused_dsn() -> str:
    """A DSN where nothing listens: Postgres is down."""
    return f"postgresql://postgres@127.0.0.1:{free_port()}/feather"


# -- storage and schema ----------------------------------------------------------------------


async def test_every_field_round_trips(ledger: PostgresLedger, dsn: str) -> None:
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
        web_search_requests=6,
        cache_write_1h_tokens=7,
        cost_nanos_usd=2**62 + 1,  # beyond float precision: must stay an exact integer
        estimated=True,
        unpriced=True,
        streamed=True,
        attempt_count=3,
        latency_ms=1234,
        tags={"team": "search", "é": 'quote " \\ ünï'},
    )
    await shipped(ledger, [original])
    (row,) = await db_rows(dsn, f"SELECT {', '.join(COLUMNS)}, billed FROM feather_usage")
    values = dict(row)
    assert values.pop("billed") is True
    values["tags"] = json.loads(values["tags"])
    values["outcome"] = Outcome(values["outcome"])
    assert UsageRecord(**values) == original
    types = await db_rows(
        dsn,
        "SELECT column_name, data_type FROM information_schema.columns WHERE table_name = 'feather_usage' "
        "AND column_name IN ('cost_nanos_usd', 'input_tokens', 'time_ns', 'tags')",
    )
    assert {r["column_name"]: r["data_type"] for r in types} == {
        "cost_nanos_usd": "bigint",
        "input_tokens": "bigint",
        "time_ns": "bigint",
        "tags": "jsonb",
    }


async def test_schema_is_migrated_once_when_replicas_start_together(dsn: str, tmp_path: Path) -> None:
    ledgers = await asyncio.gather(*(PostgresLedger.open(dsn, tmp_path / f"spool-{i}.db") for i in range(6)))
    rows = await db_rows(dsn, "SELECT component, version FROM feather_schema_version")
    assert [tuple(r) for r in rows] == [("usage_ledger", SCHEMA_VERSION)]
    await asyncio.gather(*(ledger.record(rec(f"m{i}")) for i, ledger in enumerate(ledgers)))
    for ledger in ledgers:
        assert await ledger.flushed(FLUSH_S)
    assert (await ledgers[0].query(UsageQuery())).total.request_count == 6
    for ledger in ledgers:
        await ledger.aclose()


@pytest.mark.parametrize(
    ("version", "dropped"),
    [
        (1, ("web_search_requests", "cache_write_1h_tokens", "audio_input_tokens", "audio_output_tokens")),
        (2, ("audio_input_tokens", "audio_output_tokens")),
    ],
)
async def test_an_older_table_gets_the_columns_added_since(
    dsn: str, tmp_path: Path, version: int, dropped: tuple[str, ...]
) -> None:
    first = await PostgresLedger.open(dsn, tmp_path / "a.db")
    await shipped(first, [rec("before")])
    await first.aclose()
    # Back to what an older gateway left: without the columns added since, at its version.
    await db_rows(dsn, "ALTER TABLE feather_usage " + ", ".join(f"DROP COLUMN {c}" for c in dropped))
    await db_rows(dsn, f"UPDATE feather_schema_version SET version = {version}")
    again = await PostgresLedger.open(dsn, tmp_path / "b.db")
    counts = {"web_search_requests": 3, "cache_write_1h_tokens": 40, "audio_input_tokens": 7, "audio_output_tokens": 5}
    try:
        await shipped(again, [rec("after", **counts)])
        total = (await again.query(UsageQuery())).total
    finally:
        await again.aclose()
    assert total.request_count == 2
    assert {name: getattr(total, name) for name in counts} == counts
    rows = await db_rows(dsn, "SELECT version FROM feather_schema_version")
    assert [r["version"] for r in rows] == [SCHEMA_VERSION] == [3]


async def test_a_newer_schema_is_refused(dsn: str, tmp_path: Path) -> None:
    first = await PostgresLedger.open(dsn, tmp_path / "a.db")
    await first.aclose()
    await db_rows(dsn, "UPDATE feather_schema_version SET version = 99")
    with pytest.raises(RuntimeError, match="newer"):
        await PostgresLedger.open(dsn, tmp_path / "b.db")


async def test_a_spool_belongs_to_one_ledger(dsn: str, tmp_path: Path) -> None:
    first = await PostgresLedger.open(dsn, tmp_path / "spool.db")
    with pytest.raises(SpoolLocked):
        await PostgresLedger.open(dsn, tmp_path / "spool.db")
    await first.aclose()
    again = await PostgresLedger.open(dsn, tmp_path / "spool.db")  # released by aclose
    await again.aclose()


async def test_a_lone_call_is_spooled_in_its_own_turn(dsn: str, tmp_path: Path) -> None:
    """The spool is a SqliteLedger: told that the call is alone, `record()` spools it durably before it
    returns, without giving the loop a turn (SqliteLedger's `alone`); it still reaches Postgres."""
    ledger = await PostgresLedger.open(dsn, tmp_path / "spool.db", alone=lambda: True)
    turns = 0

    def turn() -> None:
        nonlocal turns
        turns += 1

    try:
        asyncio.get_running_loop().call_soon(turn)
        await ledger.record(rec("lone"))
        assert turns == 0, "the loop ran a turn: the record went by the end-of-turn parcel"
        assert await ledger.flushed(FLUSH_S)
        assert (await ledger.query(UsageQuery())).total.request_count == 1
    finally:
        await ledger.aclose()


async def test_a_backlogged_owner_has_the_spool_hold_commits_for_company(dsn: str, tmp_path: Path) -> None:
    """Told that its calls queue anyway, the spool holds a commit open a few ms for the records that follow
    (SqliteLedger's `backlogged`), as the SQLite ledger does under load; nothing is lost on the way."""
    for backlogged, held in ((False, False), (True, True)):
        ledger = await PostgresLedger.open(dsn, tmp_path / f"spool-{backlogged}.db", backlogged=lambda b=backlogged: b)
        try:
            for burst in range(3):  # records that overlap: made while others wait for their commit
                await record_all(ledger, [rec(f"{backlogged}-{burst}-{i}") for i in range(20)])
            assert (ledger.spool.held_count > 0) is held
            assert await ledger.flushed(FLUSH_S)
        finally:
            await ledger.aclose()
    assert len(await request_id_counts(dsn)) == 2 * 3 * 20


async def test_a_sqlite_ledger_file_is_not_taken_for_a_spool(dsn: str, tmp_path: Path) -> None:
    usage = await SqliteLedger.open(tmp_path / "usage.db")
    await usage.record(rec("local"))
    await usage.aclose()
    with pytest.raises(RuntimeError, match="not a ledger spool"):
        await PostgresLedger.open(dsn, tmp_path / "usage.db")
    assert count_rows(tmp_path / "usage.db") == 1


async def test_unstorable_records_are_rejected_before_spooling(ledger: PostgresLedger) -> None:
    for bad in (rec("nul\x00"), rec("t", tags={"k": "v\x00"}), rec("big", cost_nanos_usd=2**63)):
        with pytest.raises((ValueError, TypeError)):
            await ledger.record(bad)
    await shipped(ledger, [rec("good")])
    assert (await ledger.query(UsageQuery())).total.request_count == 1


async def test_record_and_query_after_close_raise(ledger: PostgresLedger) -> None:
    await ledger.record(rec("before"))
    await ledger.aclose()
    with pytest.raises(RuntimeError):
        await ledger.record(rec("after"))
    with pytest.raises(RuntimeError):
        await ledger.query(UsageQuery())
    await ledger.aclose()  # idempotent


# -- the same answers as MemoryLedger --------------------------------------------------------


async def test_basic_totals_and_groupings(ledger: PostgresLedger) -> None:
    await shipped(ledger, BASIC)
    report = await ledger.query(UsageQuery())
    assert report.total == UsageTotals(
        request_count=5,
        ok_count=3,
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
    by_provider = await ledger.query(UsageQuery(group_by=[GroupBy.PROVIDER, GroupBy.TENANT]))
    assert [(r.provider, r.tenant, r.request_count) for r in by_provider.rows] == [
        ("anthropic", "a", 1),
        ("anthropic", "b", 2),
        ("openai", "a", 2),
    ]
    assert by_provider.total == sum_totals(by_provider.rows) == report.total
    assert [(r.cache_write_tokens, r.reasoning_tokens) for r in by_provider.rows] == [(3, 0), (0, 0), (0, 4)]


async def test_empty_ledger_reports_zero(ledger: PostgresLedger) -> None:
    assert await ledger.query(UsageQuery()) == UsageReport(rows=[], total=UsageTotals())
    assert await ledger.query(UsageQuery(group_by=[GroupBy.TENANT])) == UsageReport([], UsageTotals())


async def test_agrees_with_memory_ledger_on_a_scenario(ledger: PostgresLedger) -> None:
    records = scenario(seed=11, count=1500)
    # UTC bucket edges, before 1970 too, and tag keys JSON paths cannot spell.
    edges = [T0 - 1, T0, T0 + HOUR_NS - 1, T0 + HOUR_NS, T0 + DAY_NS - 1, T0 + DAY_NS, -1, 0, -DAY_NS - 1]
    records += [rec(f"edge{i}", t, tags={'odd"key': "1", "back\\slash": "x"}) for i, t in enumerate(edges)]
    # Sums past 2^63 stay exact (Postgres sums BIGINT as numeric; SqliteLedger raises "integer overflow").
    records += [
        rec("big", tenant="z", cost_nanos_usd=2**62, input_tokens=2**62, cache_write_tokens=2**62),
        rec("big2", cost_nanos_usd=2**62, reasoning_tokens=2**62),
    ]
    memory = MemoryLedger()
    await record_all(memory, records)
    await shipped(ledger, records)
    everything = (await ledger.query(UsageQuery())).total
    assert everything.cache_write_tokens == sum(r.cache_write_tokens for r in records)
    assert everything.reasoning_tokens == sum(r.reasoning_tokens for r in records)
    checked = 0
    queries = [*scenario_queries(), UsageQuery(group_by=[GroupBy.TAG], tag_key="back\\slash")]
    for query in queries:
        expected = await memory.query(query)
        assert await ledger.query(query) == expected, query
        checked += 1
    assert checked > 300


async def test_invalid_groupings_raise(ledger: PostgresLedger) -> None:
    for query in (UsageQuery(group_by=[GroupBy.TAG]), UsageQuery(group_by=[GroupBy.HOUR, GroupBy.DAY])):
        with pytest.raises(ValueError):
            await ledger.query(query)


# -- a retried request_id is billed once ------------------------------------------------------


def billed(records: list[UsageRecord]) -> list[UsageRecord]:
    """The rule, in Python: per (tenant, non-empty request_id) the first success, else the first."""
    winners: dict[tuple[str, str], UsageRecord] = {}
    kept: list[UsageRecord] = []
    for record in records:
        if not record.request_id:
            kept.append(record)
            continue
        key = (record.tenant, record.request_id)
        best = winners.get(key)
        if best is None or _rank(record) < _rank(best):
            winners[key] = record
    return kept + list(winners.values())


def _rank(record: UsageRecord) -> tuple[bool, int]:
    return (record.outcome not in (Outcome.OK, Outcome.CACHE_HIT), record.time_ns)


async def test_a_retried_request_is_billed_once(ledger: PostgresLedger, dsn: str) -> None:
    first = [
        rec("r1", T0, tenant="a", outcome=Outcome.ERROR, error_code="UNAVAILABLE", cost_nanos_usd=5),
        rec("r2", T0, tenant="a", outcome=Outcome.OK, cost_nanos_usd=100),
        rec("r3", T0 + 1, tenant="a", outcome=Outcome.CANCELLED, cost_nanos_usd=7),
        rec("r4", T0, tenant="a", cost_nanos_usd=1),
        rec("r4", T0, tenant="b", cost_nanos_usd=2),  # another tenant's r4 is another request
        rec("", T0, tenant="a", cost_nanos_usd=1000),  # no request id: every record counts
        rec("", T0, tenant="a", cost_nanos_usd=1000),
    ]
    await shipped(ledger, first)
    assert (await ledger.query(UsageQuery())).total.cost_nanos_usd == 5 + 100 + 7 + 1 + 2 + 2000

    retries = [
        rec("r1", T0 + 10, tenant="a", outcome=Outcome.OK, cost_nanos_usd=50),  # the retry succeeded
        rec("r2", T0 + 10, tenant="a", outcome=Outcome.OK, cost_nanos_usd=100),  # a duplicate success
        rec("r3", T0, tenant="a", outcome=Outcome.ERROR, cost_nanos_usd=3),  # earlier failure arrives late
        rec("r4", T0 - 5, tenant="a", outcome=Outcome.CACHE_HIT, cost_nanos_usd=0),  # earlier success
    ]
    await shipped(ledger, retries)
    report = await ledger.query(UsageQuery(group_by=[GroupBy.TENANT]))
    assert [(r.tenant, r.request_count, r.ok_count, r.error_count, r.cost_nanos_usd) for r in report.rows] == [
        ("a", 6, 5, 1, 50 + 100 + 3 + 0 + 2000),  # r1 ok, r2 first ok, r3 earliest failure, r4 cache hit, 2 x ""
        ("b", 1, 1, 0, 2),
    ]
    # Every attempt is kept, only one per request is billed.
    rows = await db_rows(dsn, "SELECT COUNT(*) AS n, COUNT(*) FILTER (WHERE billed) AS b FROM feather_usage")
    assert (rows[0]["n"], rows[0]["b"]) == (11, 7)
    expected = MemoryLedger()
    await record_all(expected, billed(first + retries))
    assert report == await expected.query(UsageQuery(group_by=[GroupBy.TENANT]))


async def test_a_request_billed_meanwhile_by_another_replica_is_settled_by_a_retry(
    ledger: PostgresLedger, dsn: str
) -> None:
    await shipped(ledger, [rec("warm-up")])
    other = await asyncpg.connect(dsn)  # another replica, mid-transaction: bills "dup" first
    tx = other.transaction()
    await tx.start()
    values = {"request_id": "'dup'", "time_ns": "$2::bigint"}
    await other.execute(
        f"INSERT INTO feather_usage (spool_id, spool_seq, {', '.join(COLUMNS)}, billed) "
        f"SELECT $1::uuid, 1, {', '.join(values.get(c, c) for c in COLUMNS)}, true "
        "FROM feather_usage WHERE request_id = 'warm-up'",
        uuid.uuid4(),
        T0 + 9,
    )

    async def blocked() -> bool:
        sql = "SELECT COUNT(*) AS n FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = $1"
        return bool((await db_rows(dsn, sql, dsn.rsplit("/", 1)[1]))[0]["n"])

    try:
        await ledger.record(rec("dup", T0, cost_nanos_usd=7))  # earlier: it must win the bill
        await wait_until(blocked, FLUSH_S, "our insert to wait on the other replica's billed row")
    finally:
        await tx.commit()
        await other.close()
    assert await ledger.flushed(FLUSH_S)
    assert ledger.conflict_count == 1
    rows = await db_rows(dsn, "SELECT time_ns, billed FROM feather_usage WHERE request_id = 'dup' ORDER BY time_ns")
    assert [(r["time_ns"], r["billed"]) for r in rows] == [(T0, True), (T0 + 9, False)]
    assert (await ledger.query(UsageQuery())).total.cost_nanos_usd == 7


def retry_scenario(seed: int, count: int) -> list[UsageRecord]:
    """Records whose request ids repeat (retries, on any replica), with distinct times."""
    rng = random.Random(seed)
    records = scenario(seed, count)
    times = rng.sample(range(-DAY_NS, 2 * DAY_NS), count)
    for record, time_ns in zip(records, times, strict=True):
        record.time_ns = T0 + time_ns
        record.tenant = rng.choice(["a", "b"])
        record.request_id = rng.choice(["", f"q{rng.randrange(count // 3)}"])
    return records


async def test_two_replicas_report_the_same_totals(dsn: str, tmp_path: Path) -> None:
    records = retry_scenario(seed=3, count=1200)
    one = await PostgresLedger.open(dsn, tmp_path / "one.db", batch_size=100)
    two = await PostgresLedger.open(dsn, tmp_path / "two.db", batch_size=100)
    rng = random.Random(5)
    await asyncio.gather(*(rng.choice([one, two]).record(r) for r in records))
    assert await one.flushed(FLUSH_S) and await two.flushed(FLUSH_S)
    assert one.shipped_count > 0 and two.shipped_count > 0

    expected = MemoryLedger()
    winners = billed(records)
    assert len(winners) < len(records)  # the scenario does retry
    await record_all(expected, winners)
    for query in itertools.islice(scenario_queries(), 0, None, 4):
        want = await expected.query(query)
        assert await one.query(query) == want, query
        assert await two.query(query) == want, query
    duplicates = await db_rows(
        dsn,
        "SELECT tenant, request_id FROM feather_usage WHERE billed AND request_id <> '' "
        "GROUP BY 1, 2 HAVING COUNT(*) > 1",
    )
    assert duplicates == []
    await one.aclose()
    await two.aclose()


# -- durability: the spool, crashes and outages -----------------------------------------------


async def test_spool_identities_never_repeat_after_it_empties(ledger: PostgresLedger, dsn: str, tmp_path: Path) -> None:
    # SQLite reuses rowids once a table is empty: without a new epoch, the second wave would be
    # dropped by ON CONFLICT as "already shipped".
    for wave in range(3):
        await shipped(ledger, [rec(f"w{wave}-{i}") for i in range(3)])
        assert await ledger.pending() == 0
    await ledger.aclose()
    again = await PostgresLedger.open(dsn, tmp_path / "spool.db")
    await shipped(again, [rec("after-restart")])
    await again.aclose()
    counts = await request_id_counts(dsn)
    assert len(counts) == 10 and set(counts.values()) == {1}
    epochs = await db_rows(dsn, "SELECT DISTINCT spool_id FROM feather_usage")
    assert len(epochs) == 4


async def test_a_crash_between_postgres_commit_and_spool_delete_reships_harmlessly(
    ledger: PostgresLedger, dsn: str
) -> None:
    real_ack = ledger.spool.ack
    failed = asyncio.Event()

    async def ack_fails_once(batch: Any) -> None:
        if not failed.is_set():
            failed.set()
            raise OSError("disk went away after the Postgres commit")
        await real_ack(batch)

    ledger.spool.ack = ack_fails_once  # type: ignore[method-assign]
    await shipped(ledger, [rec(f"x{i}") for i in range(20)])
    assert failed.is_set() and ledger.failure_count == 1
    assert ledger.shipped_count == 20  # counted once: the first delivery was never acked
    counts = await request_id_counts(dsn)
    assert len(counts) == 20 and set(counts.values()) == {1}


async def test_starts_and_spools_while_postgres_is_down_and_ships_at_the_next_start(dsn: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool.db"
    down = await PostgresLedger.open(unused_dsn(), spool, connect_timeout_s=1, close_timeout_s=0.2)
    await record_all(down, [rec(f"d{i}") for i in range(10)])
    assert await down.pending() == 10
    assert not await down.flushed(0.2)
    with pytest.raises(LedgerUnavailable):
        await down.query(UsageQuery())
    started = time.monotonic()
    await down.aclose()  # bounded, and the records stay spooled
    assert time.monotonic() - started < 3

    # Constructed in a running loop, the next ledger ships the leftovers at once, with no call made.
    up = PostgresLedger(dsn, spool)

    async def all_shipped() -> bool:
        return len(await request_id_counts(dsn)) == 10 if up.batch_count else False

    await wait_until(all_shipped, FLUSH_S, "the leftovers to ship")
    assert await up.pending() == 0
    await up.aclose()


async def test_records_that_follow_each_other_ship_together_and_flushed_does_not_wait(dsn: str, tmp_path: Path) -> None:
    """Unless the spool is backed up, the shipper waits `ship_delay_s` for the records that follow, and
    ships them in one transaction; flushed() cuts that wait short."""
    ledger = await PostgresLedger.open(dsn, tmp_path / "spool.db", ship_delay_s=10)
    try:
        await shipped(ledger, [rec("warm-up")])
        before = ledger.batch_count
        for i in range(10):  # one after another, each acknowledged: the first one wakes the shipper
            await ledger.record(rec(f"next{i}"))
        assert await ledger.flushed(5)  # well before the 10 s the shipper would otherwise wait
        assert ledger.batch_count == before + 1
        assert len(await request_id_counts(dsn)) == 11
    finally:
        await ledger.aclose()


async def test_a_slow_postgres_does_not_slow_record(ledger: PostgresLedger, dsn: str) -> None:
    await shipped(ledger, [rec("warm-up")])
    blocker = await asyncpg.connect(dsn)
    tx = blocker.transaction()
    await tx.start()
    await blocker.execute("LOCK TABLE feather_usage IN ACCESS EXCLUSIVE MODE")  # every insert now waits
    try:
        started = time.monotonic()
        await record_all(ledger, [rec(f"slow{i}") for i in range(200)])
        assert time.monotonic() - started < 5
        assert not await ledger.flushed(0.3)
        assert await ledger.pending() == 200
    finally:
        await tx.rollback()
        await blocker.close()
    assert await ledger.flushed(FLUSH_S)
    assert len(await request_id_counts(dsn)) == 201


CHILD = """
import asyncio, sys
from feather_grpc.core.ledger import UsageRecord
from feather_grpc.state.postgres_ledger import PostgresLedger

async def main():
    ledger = await PostgresLedger.open(sys.argv[1], sys.argv[2], batch_size=50)
    out = sys.stdout
    async def writer(w):
        for i in range(100_000):
            request_id = f"k{w}-{i}"
            await ledger.record(UsageRecord(request_id=request_id, time_ns=i, tenant="crash", cost_nanos_usd=i))
            out.write(request_id + "\\n")  # acknowledged: report it
            out.flush()
    await asyncio.gather(*(writer(w) for w in range(32)))

asyncio.run(main())
"""


async def test_kill_9_mid_load_then_restart_reconciles_exactly_once(dsn: str, tmp_path: Path) -> None:
    spool = tmp_path / "spool.db"
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, dsn, str(spool), cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    assert child.stdout is not None
    acked: list[str] = []

    async def shipped_rows() -> bool:
        n = (await db_rows(dsn, "SELECT COUNT(*) AS n FROM feather_usage"))[0]["n"]
        assert isinstance(n, int)
        return n >= 500

    try:
        async with asyncio.timeout(FLUSH_S):
            while len(acked) < 3000:
                line = await child.stdout.readline()
                assert line, "the child died early"
                acked.append(line.decode().strip())
        await wait_until(shipped_rows, FLUSH_S, "the child to ship some records")
    finally:
        child.send_signal(signal.SIGKILL)
    rest = await child.stdout.read()  # acks already in the pipe count too
    acked += rest.decode().split()
    assert await child.wait() == -signal.SIGKILL

    pending_after_crash = await _spool_count(spool)
    ledger = await PostgresLedger.open(dsn, spool)
    assert await ledger.flushed(FLUSH_S)
    await ledger.aclose()
    counts = await request_id_counts(dsn)
    assert pending_after_crash > 0  # the kill left work in the spool for the restart
    missing = [r for r in acked if r not in counts]
    assert missing == []
    assert set(counts.values()) == {1}  # exactly once, acknowledged or not
    assert len(counts) >= len(acked)


async def _spool_count(path: Path) -> int:
    with contextlib.closing(sqlite3.connect(path)) as conn:
        count = conn.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0]
    assert isinstance(count, int)
    return count


async def test_postgres_outage_mid_load_then_recovery_reconciles_exactly_once(tmp_path: Path) -> None:
    with PgServer() as server:
        dsn = server.create_database("outage")
        ledger = await PostgresLedger.open(
            dsn, tmp_path / "spool.db", batch_size=100, retry_base_s=0.05, retry_max_s=0.5, connect_timeout_s=2
        )
        acked: list[str] = []
        stop = asyncio.Event()

        async def writer(w: int) -> None:
            for i in itertools.count():
                if stop.is_set():
                    return
                request_id = f"o{w}-{i}"
                await ledger.record(rec(request_id, T0 + i, tenant="outage", cost_nanos_usd=i))
                acked.append(request_id)

        writers = [asyncio.create_task(writer(w)) for w in range(16)]
        try:
            await wait_until(lambda: ledger.shipped_count >= 500, FLUSH_S, "shipping before the outage")
            await asyncio.to_thread(server.stop, "immediate")  # a crash, mid-transaction if it may
            acked_at_stop = len(acked)
            await wait_until(lambda: ledger.failure_count > 0, FLUSH_S, "the shipper to notice the outage")
            # record() keeps acknowledging from the local spool while Postgres is down.
            await wait_until(lambda: len(acked) >= acked_at_stop + 1000, FLUSH_S, "acks during the outage")
            assert await ledger.pending() > 0
            await asyncio.to_thread(server.start)
            acked_at_start = len(acked)
            await wait_until(lambda: len(acked) >= acked_at_start + 500, FLUSH_S, "acks after the outage")
        finally:
            stop.set()
            await asyncio.gather(*writers)
        assert await ledger.flushed(FLUSH_S)
        report = await ledger.query(UsageQuery(tenant="outage"))
        await ledger.aclose()
        counts = await request_id_counts(dsn)
        assert sorted(counts) == sorted(acked)
        assert set(counts.values()) == {1}
        assert report.total.request_count == len(acked)


def test_serve_stops_with_database_url_named_when_postgres_refuses_the_ledger(pg: PgServer, tmp_path: Path) -> None:
    """A reachable Postgres that refuses (no such database, bad credentials) will not change its mind: the
    gateway stops at start and names DATABASE_URL, not the local spool."""
    import subprocess

    missing = f"postgresql://postgres:s3cret-pw@127.0.0.1:{pg.port}/no_such_database"
    run = subprocess.run(
        [sys.executable, "-m", "feather_grpc.cli", "serve", "--port", "0"],
        cwd=tmp_path,
        env={**os.environ, "DATABASE_URL": missing},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert "DATABASE_URL: Postgres refused the usage ledger (InvalidCatalogNameError" in run.stderr
    assert "s3cret-pw" not in run.stderr and "serving on" not in run.stderr
