"""SqliteLedger: the default usage ledger, a SQLite file written by group commit.

One writer thread owns the write connection. `record()` puts the row on a queue and awaits a
future; the writer takes everything pending (up to `max_batch`), inserts it with one
`executemany` inside one transaction, commits, then settles every waiting future. A lone call is
committed at once (no timers); under load the calls that arrive during a commit share the next
one, so throughput grows with concurrency instead of being capped by one fsync per call.

Durability: WAL journal with `synchronous=NORMAL` (the default) survives a crash of the process
(kill -9), because a committed transaction is in the WAL file before `record()` returns. It may
lose the last transactions on power loss or an OS crash; pass `synchronous="FULL"` when that
matters (each commit then fsyncs the WAL, which group commit amortises).

Queries run SQL aggregates on a separate read connection in a worker thread; WAL lets them read
while the writer commits. The event loop never touches SQLite.

Several processes may share one file (`--workers N`): each opens its own connections, and
`busy_timeout_ms` makes a writer wait for the lock instead of failing with "database is locked".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Sequence
from typing import Literal, cast

from feather_grpc.state import usage_math
from feather_grpc.state.ledger import GroupBy, UsageQuery, UsageRecord, UsageReport, UsageTotals

Synchronous = Literal["NORMAL", "FULL", "EXTRA"]

SCHEMA_VERSION = 1  # PRAGMA user_version; bump with a migration step in _migrate
MIN_SQLITE_VERSION = (3, 37, 0)  # STRICT tables

_SCHEMA_V1 = """
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
"""

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
    "cost_nanos_usd",
    "estimated",
    "unpriced",
    "streamed",
    "attempt_count",
    "latency_ms",
    "tags",
)
_INSERT = f"INSERT INTO usage_records ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"

# Counts and sums in the order of _TOTAL_FIELDS; SUM over integer columns stays an integer.
_AGGREGATES = """COUNT(*),
    COALESCE(SUM(outcome IN ('ok', 'cache_hit')), 0),
    COALESCE(SUM(outcome = 'error'), 0),
    COALESCE(SUM(outcome = 'cancelled'), 0),
    COALESCE(SUM(outcome = 'cache_hit'), 0),
    COALESCE(SUM(estimated), 0),
    COALESCE(SUM(input_tokens), 0),
    COALESCE(SUM(output_tokens), 0),
    COALESCE(SUM(cached_input_tokens), 0),
    COALESCE(SUM(cost_nanos_usd), 0)"""
_TOTAL_FIELDS = (
    "request_count",
    "ok_count",
    "error_count",
    "cancelled_count",
    "cached_count",
    "estimated_count",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cost_nanos_usd",
)

Row = tuple[object, ...]
_Pending = tuple[Row, asyncio.Future[None]]
_STOP = object()


class SqliteLedger:
    """The usage ledger in a SQLite file; `":memory:"` gives a private, ephemeral one.

    Construction does no I/O: the writer thread opens the file. `await SqliteLedger.open(...)`
    (or `await ledger.ready()`) surfaces a bad path or schema at startup; otherwise the first
    `record()`/`query()` raises it. Always `await aclose()`: it commits what is pending.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "NORMAL",
        busy_timeout_ms: int = 5_000,
        max_batch: int = 512,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        if busy_timeout_ms < 0:
            raise ValueError("busy_timeout_ms must be >= 0")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.path = os.fspath(path)
        if not self.path:
            raise ValueError("path must name a file or be ':memory:'")
        self._in_memory = self.path == ":memory:"
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._max_batch = max_batch
        self._commit_count = 0

        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._submit_lock = threading.Lock()  # makes "not closed, then enqueue" atomic vs aclose
        self._closed = False
        self._ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._stopped: concurrent.futures.Future[None] = concurrent.futures.Future()

        # Queries get their own connection so they read beside the writer (WAL). A ":memory:"
        # database exists only inside its one connection, so there the writer's connection is
        # shared and the lock takes turns between writing and reading.
        self._read_lock = threading.Lock()
        self._write_lock = self._read_lock if self._in_memory else threading.Lock()
        self._read_conn: sqlite3.Connection | None = None
        self._read_closed = False

        self._writer = threading.Thread(target=self._writer_main, name="feather-ledger-writer", daemon=True)
        self._writer.start()

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "NORMAL",
        busy_timeout_ms: int = 5_000,
        max_batch: int = 512,
    ) -> SqliteLedger:
        """Construct and wait until the file is open and its schema current."""
        ledger = cls(path, synchronous=synchronous, busy_timeout_ms=busy_timeout_ms, max_batch=max_batch)
        try:
            await ledger.ready()
        except BaseException:
            await ledger.aclose()
            raise
        return ledger

    async def ready(self) -> None:
        """Return once the store is open; raise what opening it raised."""
        await asyncio.wrap_future(self._ready)

    @property
    def commit_count(self) -> int:
        """Transactions committed so far (each holds one or more records)."""
        return self._commit_count

    # -- writing ---------------------------------------------------------------------------

    async def record(self, record: UsageRecord) -> None:
        usage_math.check_record(record)
        row = _to_row(record)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._submit_lock:
            if self._closed:
                raise RuntimeError("the usage ledger is closed")
            self._queue.put((row, future))
        # If the caller is cancelled now, the record is still committed: usage is settled anyway.
        await future

    def _writer_main(self) -> None:
        try:
            conn = self._open_writer()
        except BaseException as exc:
            self._ready.set_exception(exc)
            self._fail_until_stop(exc)
            self._stopped.set_result(None)
            return
        self._ready.set_result(None)
        try:
            stop = False
            while not stop:
                batch, stop = self._take_batch()
                if batch:
                    self._commit(conn, batch)
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            self._fail_until_stop(exc)
        finally:
            with self._write_lock:
                conn.close()
                if self._in_memory:
                    self._read_conn = None
                    self._read_closed = True
            self._stopped.set_result(None)

    def _take_batch(self) -> tuple[list[_Pending], bool]:
        """Block for one item, then take whatever else is already waiting, up to max_batch."""
        item = self._queue.get()
        if item is _STOP:
            return [], True
        batch = [_as_pending(item)]
        while len(batch) < self._max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(_as_pending(item))
        return batch, False

    def _commit(self, conn: sqlite3.Connection, batch: list[_Pending]) -> None:
        error: BaseException | None = None
        try:
            with self._write_lock:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.executemany(_INSERT, [row for row, _ in batch])
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback_quietly(conn)
                    raise
            self._commit_count += 1
        except Exception as exc:  # disk full, I/O error, lock timeout: the whole batch failed
            error = exc
        _settle_from_thread([future for _, future in batch], error)

    def _fail_until_stop(self, error: BaseException) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            _settle_from_thread([_as_pending(item)[1]], error)

    def _open_writer(self) -> sqlite3.Connection:
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise RuntimeError(f"SqliteLedger needs SQLite >= 3.37 (STRICT), not {sqlite3.sqlite_version}")
        conn = self._connect()
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            _migrate(conn)
        except BaseException:
            conn.close()
            raise
        if self._in_memory:
            with self._read_lock:
                self._read_conn = conn
        return conn

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: transactions are exactly the BEGIN/COMMIT issued here.
        conn = sqlite3.connect(
            self.path,
            timeout=self._busy_timeout_ms / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
        return conn

    # -- reading ---------------------------------------------------------------------------

    async def query(self, query: UsageQuery) -> UsageReport:
        usage_math.check_query(query)
        if self._closed:
            raise RuntimeError("the usage ledger is closed")
        await self.ready()
        sql, params = build_query_sql(query)
        result = await asyncio.to_thread(self._fetch, sql, params)
        if not query.group_by:
            return UsageReport(rows=[], total=_totals(UsageTotals(), result[0]))
        width = len(query.group_by)
        rows = [_totals(usage_math.keyed_totals(query.group_by, r[:width]), r[width:]) for r in result]
        return UsageReport(rows=rows, total=usage_math.sum_totals(rows))

    def _fetch(self, sql: str, params: Sequence[object]) -> list[Row]:
        with self._read_lock:
            if self._read_closed:
                raise RuntimeError("the usage ledger is closed")
            if self._read_conn is None:
                self._read_conn = self._connect()
                self._read_conn.execute("PRAGMA query_only=1")
            return self._read_conn.execute(sql, params).fetchall()

    # -- closing ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Commit everything already recorded, then close both connections. Idempotent."""
        with self._submit_lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        await asyncio.wrap_future(self._stopped)
        await asyncio.to_thread(self._close_reader)

    def _close_reader(self) -> None:
        with self._read_lock:
            if self._read_conn is not None and not self._in_memory:
                self._read_conn.close()
            self._read_conn = None
            self._read_closed = True


def build_query_sql(query: UsageQuery) -> tuple[str, list[object]]:
    """One aggregate SELECT: the grouping keys (in group_by order), then the _TOTAL_FIELDS."""
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

    where: list[str] = []
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

    sql = f"SELECT {', '.join([*keys, _AGGREGATES])} FROM usage_records"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if keys:
        positions = ", ".join(str(i) for i in range(1, len(keys) + 1))
        sql += f" GROUP BY {positions} ORDER BY {positions}"
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


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION; safe when several processes open the file at once."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"usage ledger schema version {version} is newer than this build ({SCHEMA_VERSION})")
        if version < 1:
            for statement in _SCHEMA_V1.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        _rollback_quietly(conn)
        raise


def _to_row(record: UsageRecord) -> Row:
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
        record.cost_nanos_usd,
        int(record.estimated),
        int(record.unpriced),
        int(record.streamed),
        record.attempt_count,
        record.latency_ms,
        tags,
    )


def _totals(row: UsageTotals, values: Sequence[object]) -> UsageTotals:
    for name, value in zip(_TOTAL_FIELDS, values, strict=True):
        assert isinstance(value, int)
        setattr(row, name, value)
    return row


def _as_pending(item: object) -> _Pending:
    return cast(_Pending, item)  # the queue holds only _Pending items and _STOP


def _rollback_quietly(conn: sqlite3.Connection) -> None:
    # The original error is the one to report; a failed rollback adds nothing.
    with contextlib.suppress(sqlite3.Error):
        if conn.in_transaction:
            conn.execute("ROLLBACK")


def _settle_from_thread(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    """Wake each waiting caller on its own loop: one call_soon_threadsafe per loop per batch."""
    by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
    for future in futures:
        by_loop.setdefault(future.get_loop(), []).append(future)
    for loop, waiting in by_loop.items():
        with contextlib.suppress(RuntimeError):  # that loop is closed; nobody is left to tell
            loop.call_soon_threadsafe(_settle, waiting, error)


def _settle(futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
    for future in futures:
        if future.done():  # the caller was cancelled; the record is committed regardless
            continue
        if error is None:
            future.set_result(None)
        else:
            future.set_exception(error)
