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

A retried request is billed once, by the rule PostgresLedger applies (`usage_math.billing_rank`).
Within a tenant, all records with the same non-empty `request_id` are one logical request: every
record is kept, but exactly one of them is *billed* (counted by `query()`): the first successful
one (outcome ok or cache_hit), or the first of them if none succeeded, "first" by `time_ns` and
then by insertion order (the row id). Records with an empty `request_id` are all billed. The
writer keeps the `billed` column right inside each batch's transaction (BEGIN IMMEDIATE, so
writers in other processes are serialised): it reads the billed rows of the batch's keys through
the partial unique index on `(tenant, request_id) WHERE billed AND request_id <> ''`, ranks each
against the batch's records for its key, unbills the loser and inserts the winner billed. The
index makes double billing a constraint violation. `request_count` and every other total count
billed records only. A v1 file is migrated in place: its rows are ranked by the same rule in one
UPDATE.

Sums are exact Python integers however large: SQLite's SUM raises "integer overflow" past 2^63,
so each 64-bit column is summed as two halves, `x >> 32` and `x & 0xFFFFFFFF`, whose sums cannot
overflow below 2^31 rows per group, and recombined in Python.
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
import time
from collections.abc import Sequence
from typing import Literal, cast

from feather_grpc.state import usage_math
from feather_grpc.state.ledger import GroupBy, LedgerWriteError, UsageQuery, UsageRecord, UsageReport, UsageTotals

Synchronous = Literal["NORMAL", "FULL", "EXTRA"]

SCHEMA_VERSION = 3  # PRAGMA user_version; bump with a migration step in _MIGRATIONS
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

_SUCCESS = usage_math.SUCCESS_OUTCOMES

# v2: the `billed` flag. Every v1 row becomes billed unless it loses to another record of its
# request under the billing rule (in one statement: rank each request's records, unbill all but
# the first).
_SCHEMA_V2 = f"""
ALTER TABLE usage_records ADD COLUMN billed INTEGER NOT NULL DEFAULT 1;
UPDATE usage_records SET billed = 0 WHERE id IN (
    SELECT id FROM (
        SELECT id, row_number() OVER (
            PARTITION BY tenant, request_id
            ORDER BY outcome NOT IN ('{_SUCCESS[0]}', '{_SUCCESS[1]}'), time_ns, id
        ) AS place
        FROM usage_records WHERE request_id <> ''
    ) WHERE place > 1
);
CREATE UNIQUE INDEX usage_records_billed_request ON usage_records (tenant, request_id)
    WHERE billed AND request_id <> '';
"""
# v3: server-side web searches and 1-hour cache writes (0 for the records written before).
_SCHEMA_V3 = """
ALTER TABLE usage_records ADD COLUMN web_search_requests INTEGER NOT NULL DEFAULT 0;
ALTER TABLE usage_records ADD COLUMN cache_write_1h_tokens INTEGER NOT NULL DEFAULT 0;
"""
_MIGRATIONS = {1: _SCHEMA_V1, 2: _SCHEMA_V2, 3: _SCHEMA_V3}

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
    "cost_nanos_usd",
    "estimated",
    "unpriced",
    "streamed",
    "attempt_count",
    "latency_ms",
    "tags",
)
_INSERT = f"INSERT INTO usage_records ({', '.join(COLUMNS)}, billed) VALUES ({', '.join('?' * (len(COLUMNS) + 1))})"
# The billed rows of the given (tenant, request_id) keys: one statement per batch, each key found
# through the partial unique index (the query repeats the index's WHERE terms, so it is usable).
_KEYS_PER_LOOKUP = 400  # 800 parameters: under SQLite's smallest SQLITE_MAX_VARIABLE_NUMBER (999)


def _billed_rows_sql(key_count: int) -> str:
    return (
        "SELECT u.id, u.tenant, u.request_id, u.outcome, u.time_ns "
        f"FROM (VALUES {', '.join(['(?, ?)'] * key_count)}) AS k "
        "JOIN usage_records AS u ON u.tenant = k.column1 AND u.request_id = k.column2 "
        "WHERE u.billed AND u.request_id <> ''"
    )


_UNBILL = "UPDATE usage_records SET billed = 0 WHERE id = ?"
# probe(): one row rewritten in its own transaction, so a health check writes where records are written.
_PROBE_TABLE = "CREATE TABLE IF NOT EXISTS ledger_probe (singleton INTEGER PRIMARY KEY, probed_ns INTEGER NOT NULL)"
_PROBE = "INSERT OR REPLACE INTO ledger_probe (singleton, probed_ns) VALUES (1, ?)"

_TENANT = COLUMNS.index("tenant")
_REQUEST_ID = COLUMNS.index("request_id")
_OUTCOME = COLUMNS.index("outcome")
_TIME_NS = COLUMNS.index("time_ns")

_HALF_BITS = 32
_LOW_MASK = (1 << _HALF_BITS) - 1
# The 64-bit columns summed exactly: each as the sums of its high and low 32-bit halves.
_SUMMED = usage_math.SUMMED_FIELDS


def _exact_sum(column: str) -> str:
    return f"COALESCE(SUM({column} >> {_HALF_BITS}), 0), COALESCE(SUM({column} & {_LOW_MASK}), 0)"


# _COUNT_FIELDS, then a (high, low) pair of sums for each of _SUMMED (recombined by _totals).
_AGGREGATES = f"""COUNT(*),
    COALESCE(SUM(outcome IN ('{_SUCCESS[0]}', '{_SUCCESS[1]}')), 0),
    COALESCE(SUM(outcome = 'error'), 0),
    COALESCE(SUM(outcome = 'cancelled'), 0),
    COALESCE(SUM(outcome = 'cache_hit'), 0),
    COALESCE(SUM(estimated), 0),
    {", ".join(_exact_sum(c) for c in _SUMMED)}"""
_COUNT_FIELDS = usage_math.COUNT_FIELDS

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

        self._queue: queue.SimpleQueue[object] = queue.SimpleQueue()  # parcels (lists of _Pending) and _STOP
        self._parcels: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}  # this turn's records, per loop
        self._carry: list[_Pending] = []  # the writer's leftover beyond max_batch
        self._stopping = False  # the writer has taken _STOP
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
        self._write_conn: sqlite3.Connection | None = None  # the writer's, for probe() (under _write_lock)

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
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self._closed:
            raise RuntimeError("the usage ledger is closed")
        # Records made in the same turn of the event loop travel to the writer as one parcel: one queue
        # item and one thread wake-up per turn rather than per record, which is most of the ledger's cost
        # under load. A lone record still leaves at the end of the current turn.
        parcel = self._parcels.get(loop)
        if parcel is None:
            parcel = self._parcels[loop] = []
            loop.call_soon(self._send, loop)
        parcel.append((row, future))
        # If the caller is cancelled now, the record is still committed: usage is settled anyway.
        await future

    def _send(self, loop: asyncio.AbstractEventLoop) -> None:
        parcel = self._parcels.pop(loop, None)
        if not parcel:
            return
        with self._submit_lock:
            if not self._closed:
                self._queue.put(parcel)
                return
        _settle(parcel_futures(parcel), RuntimeError("the usage ledger is closed"))

    def _writer_main(self) -> None:
        try:
            conn = self._open_writer()
        except BaseException as exc:
            self._ready.set_exception(exc)
            self._fail_until_stop(exc)
            self._stopped.set_result(None)
            return
        with self._write_lock:
            self._write_conn = conn
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
                self._write_conn = None
                if self._in_memory:
                    self._read_conn = None
                    self._read_closed = True
            self._stopped.set_result(None)

    def _take_batch(self) -> tuple[list[_Pending], bool]:
        """Block for one parcel, then take whatever else is already waiting, up to max_batch records
        (a parcel's remainder waits for the next batch). Returns the batch and whether to stop after it."""
        batch, self._carry = self._carry, []
        if not batch and not self._stopping:
            item = self._queue.get()
            if item is _STOP:
                return [], True
            batch = list(_as_parcel(item))
        while len(batch) < self._max_batch and not self._stopping:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._stopping = True
                break
            batch.extend(_as_parcel(item))
        if len(batch) > self._max_batch:
            batch, self._carry = batch[: self._max_batch], batch[self._max_batch :]
        return batch, self._stopping and not self._carry

    def _commit(self, conn: sqlite3.Connection, batch: list[_Pending]) -> None:
        error: BaseException | None = None
        try:
            with self._write_lock:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    _insert_billed(conn, [row for row, _ in batch])
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback_quietly(conn)
                    raise
            self._commit_count += 1
        except Exception as exc:  # disk full, I/O error, lock timeout: the whole batch failed
            error = _write_error(exc)
        _settle_from_thread([future for _, future in batch], error)

    def _fail_until_stop(self, error: BaseException) -> None:
        if self._carry:
            _settle_from_thread(parcel_futures(self._carry), error)
            self._carry = []
        while not self._stopping:
            item = self._queue.get()
            if item is _STOP:
                return
            _settle_from_thread(parcel_futures(_as_parcel(item)), error)

    def _open_writer(self) -> sqlite3.Connection:
        if sqlite3.sqlite_version_info < MIN_SQLITE_VERSION:
            raise RuntimeError(f"SqliteLedger needs SQLite >= 3.37 (STRICT), not {sqlite3.sqlite_version}")
        # Processes opening one new file together (`--workers N`) can get "database is locked" here without
        # SQLite calling the busy handler: switching to WAL and recovering the WAL index take their locks
        # once and fail at once. So the opening itself waits for the lock, up to the busy timeout.
        deadline = time.monotonic() + self._busy_timeout_ms / 1000
        pause_s = 0.005
        while True:
            conn = self._connect()
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={self._synchronous}")
                _migrate(conn)
                break
            except sqlite3.OperationalError as exc:
                conn.close()
                if not _is_busy(exc) or time.monotonic() + pause_s > deadline:
                    raise
            except BaseException:
                conn.close()
                raise
            time.sleep(pause_s)  # the writer thread's own start: nothing else waits on this thread yet
            pause_s = min(pause_s * 2, 0.1)
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

    async def probe(self) -> None:
        """Commit one tiny row through the writer's own connection (so a file made read-only after it was
        opened, or a full disk, fails here as a record would); raise LedgerWriteError if that fails."""
        if self._closed:
            raise RuntimeError("the usage ledger is closed")
        await self.ready()
        await asyncio.to_thread(self._probe)

    def _probe(self) -> None:
        with self._write_lock:
            conn = self._write_conn
            if conn is None:
                raise RuntimeError("the usage ledger is closed")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    conn.execute(_PROBE_TABLE)
                    conn.execute(_PROBE, (time.time_ns(),))
                    conn.execute("COMMIT")
                except BaseException:
                    _rollback_quietly(conn)
                    raise
            except Exception as exc:
                raise _write_error(exc) from exc

    # -- reading ---------------------------------------------------------------------------

    async def query(self, query: UsageQuery) -> UsageReport:
        usage_math.check_query(query)
        if self._closed:
            raise RuntimeError("the usage ledger is closed")
        await self.ready()
        # The SQL, and the rows made into totals, all in a worker thread: a big ledger never holds the loop.
        return await asyncio.to_thread(self._report, query)

    def _report(self, query: UsageQuery) -> UsageReport:
        with self._read_lock:
            if self._read_closed:
                raise RuntimeError("the usage ledger is closed")
            if self._read_conn is None:
                self._read_conn = self._connect()
                self._read_conn.execute("PRAGMA query_only=1")
            conn = self._read_conn
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

    # -- closing ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Commit everything already recorded, then close both connections. Idempotent."""
        self._send(asyncio.get_running_loop())  # this turn's parcel goes before the stop
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
    if keys:
        positions = ", ".join(str(i) for i in range(1, len(keys) + 1))
        sql += f" GROUP BY {positions} ORDER BY {positions}"
        if query.page_size:
            sql += f" LIMIT {int(query.page_size) + 1}"
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


def _write_error(exc: Exception) -> Exception:
    """What the database or the OS said when a write failed, as a LedgerWriteError (anything else is a bug
    and stays what it is)."""
    if isinstance(exc, sqlite3.Error | OSError):
        error = LedgerWriteError(f"{type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error
    return exc


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    code: int = getattr(exc, "sqlite_errorcode", 0)  # set on errors SQLite itself raised
    return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)  # primary code of extended ones too


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring the schema to SCHEMA_VERSION; safe when several processes open the file at once."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise RuntimeError(f"usage ledger schema version {version} is newer than this build ({SCHEMA_VERSION})")
        for step in range(version + 1, SCHEMA_VERSION + 1):
            for statement in _MIGRATIONS[step].split(";"):
                if statement.strip():
                    conn.execute(statement)
        if version < SCHEMA_VERSION:
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
        record.web_search_requests,
        record.cache_write_1h_tokens,
        record.cost_nanos_usd,
        int(record.estimated),
        int(record.unpriced),
        int(record.streamed),
        record.attempt_count,
        record.latency_ms,
        tags,
    )


def _insert_billed(conn: sqlite3.Connection, rows: list[Row]) -> None:
    """Insert a batch (inside the caller's transaction), keeping each request's one billed row.

    For every (tenant, request_id) key in the batch, the best of the key's billed row so far and
    the batch's records for the key is billed: a displaced row is unbilled before the insert, so
    the unique index holds after every statement. Rows already stored were inserted earlier, so
    they win ties against the batch; within the batch, queue order is insertion order.
    """
    billed = [not row[_REQUEST_ID] for row in rows]  # a record without a request id is always billed
    best: dict[tuple[object, object], tuple[_Rank, int]] = {}  # key -> (rank, index in batch)
    for i, row in enumerate(rows):
        if row[_REQUEST_ID]:
            key = (row[_TENANT], row[_REQUEST_ID])
            rank = _rank(row[_OUTCOME], row[_TIME_NS], 1, i)
            current = best.get(key)
            if current is None or rank < current[0]:
                best[key] = (rank, i)
    keys = list(best)
    displaced: list[tuple[object]] = []
    for start in range(0, len(keys), _KEYS_PER_LOOKUP):
        chunk = keys[start : start + _KEYS_PER_LOOKUP]
        params = [part for key in chunk for part in key]
        for row_id, tenant, request_id, outcome, time_ns in conn.execute(_billed_rows_sql(len(chunk)), params):
            key = (tenant, request_id)
            if _rank(outcome, time_ns, 0, row_id) < best[key][0]:
                del best[key]  # the billed row stays billed
            else:
                displaced.append((row_id,))
    for _, index in best.values():
        billed[index] = True
    if displaced:
        conn.executemany(_UNBILL, displaced)
    conn.executemany(_INSERT, [(*row, int(flag)) for row, flag in zip(rows, billed, strict=True)])


_Rank = tuple[bool, int, int, int]


def _rank(outcome: object, time_ns: object, batch: int, order: int) -> _Rank:
    """Lower is billed first: successes, then earlier, then stored rows (0) before the batch's (1),
    then in insertion order (row id, or place in the batch)."""
    assert isinstance(time_ns, int)
    return (outcome not in _SUCCESS, time_ns, batch, order)


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


def _as_parcel(item: object) -> list[_Pending]:
    return cast(list[_Pending], item)  # the queue holds only parcels and _STOP


def parcel_futures(parcel: list[_Pending]) -> list[asyncio.Future[None]]:
    return [future for _, future in parcel]


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
