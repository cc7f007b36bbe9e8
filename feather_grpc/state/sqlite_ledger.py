"""SqliteLedger: the default usage ledger, a SQLite file written by group commit.

Records made in one turn of the event loop are committed together at the end of that turn: one
transaction for all of them, then every waiting caller is woken. A lone call is committed at once (no
timers); under load the calls of a turn share one commit, so throughput grows with concurrency instead
of being capped by one commit per call.

Where the commit runs. With `synchronous=NORMAL` (the default) and a WAL journal a commit does not
fsync: it appends the changed pages to the WAL file, i.e. a few writes into the page cache (tens of
µs; bench/ledger_bench.py measures it), durable against a crash of the process as soon as it returns.
So the event loop commits itself, on a connection of its own: handing each commit to a thread and back
cost two cross-thread wake-ups and GIL hand-offs per commit, several times the commit (150-250 µs of
latency for a lone caller, most of what the gateway added over a bare forwarder). What may block stays
off the loop, on the writer thread and its own connection:
- checkpoints, which fsync the WAL and the database: the loop's connection never checkpoints
  (`wal_autocheckpoint=0`); every `_CHECKPOINT_COMMITS` loop commits the writer thread runs a PASSIVE
  checkpoint, which neither waits for nor blocks the loop's writes, and keeps the WAL file bounded;
- waiting for the write lock: the loop's connection has no busy timeout. When another connection holds
  the lock (another process on the file, an operator's shell, the health probe), the turn's records go
  to the writer thread, which waits for the lock up to `busy_timeout_ms`; until the thread has committed
  them, later records follow them there, so records are committed in the order they were made;
- a parcel over `max_batch` records, and every commit under `synchronous=FULL/EXTRA` (each fsyncs) or of
  a `":memory:"` file (one connection only): the writer thread takes them as whole batches.

A commit costs about the same for one record as for fifty (the same few WAL pages and file locks),
and under load most turns still held one record. Hence a commit delay (PostgreSQL's commit_delay with
commit_siblings): while the owner says its calls queue anyway (`backlogged`, e.g. a gateway whose new
calls wait milliseconds to start) and records overlap (one was made while another still waited for its
commit, within the last `GROUP_HOLD_S`), a turn's parcel leaves `group_window_s` later (default 5 ms)
instead of at the end of the turn, and the records made meanwhile travel with it: one commit for all of
them. The CPU this saves serves the queued calls, so the process answers more calls per second although
each waits a little longer. A lone caller never overlaps its own previous record, and without a backlog
nobody waits. A batch is inserted with as few statements as the parameter limit allows.

Durability: WAL journal with `synchronous=NORMAL` (the default) survives a crash of the process
(kill -9), because a committed transaction is in the WAL file before `record()` returns. It may
lose the last transactions on power loss or an OS crash; pass `synchronous="FULL"` when that
matters (each commit then fsyncs the WAL on the writer thread, which group commit amortises).

Queries run SQL aggregates on a separate read connection in a worker thread; WAL lets them read
while records are committed.

Several processes may share one file: each opens its own connections, and `busy_timeout_ms` makes the
writer thread wait for the lock instead of failing with "database is locked". (`serve --workers N` has
one ledger writer process instead: state/ledger_writer.)

A retried request is billed once, by the rule every ledger applies (ledger_rows): every record
is kept, but exactly one record of each (tenant, non-empty request_id) is *billed* (counted by
`query()`), "first" meaning insertion order (the row id) after `time_ns`. The writer keeps the
`billed` column right inside each batch's transaction (BEGIN IMMEDIATE, so writers in other
processes are serialised): it reads the billed rows of the batch's keys through the partial unique
index on `(tenant, request_id) WHERE billed AND request_id <> ''`, ranks each against the batch's
records for its key, unbills the loser and inserts the winner billed. The index makes double
billing a constraint violation. `request_count` and every other total count billed records only.

The file's schema and its migrations are in sqlite_schema, the queries in sqlite_usage.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Literal, cast

from feather_grpc.core.ledger import LedgerWriteError, UsageQuery, UsageRecord, UsageReport
from feather_grpc.state import ledger_rows, sqlite_usage, usage_math
from feather_grpc.state.ledger_rows import COLUMNS, Row, to_row
from feather_grpc.state.sqlite_schema import MIN_SQLITE_VERSION, is_busy, migrate, rollback_quietly

Synchronous = Literal["NORMAL", "FULL", "EXTRA"]

_ROW_VALUES = f"({', '.join('?' * (len(COLUMNS) + 1))})"
_ROWS_PER_INSERT = 999 // (len(COLUMNS) + 1)  # under SQLite's smallest SQLITE_MAX_VARIABLE_NUMBER (999)


def _insert_sql(row_count: int) -> str:
    values = ", ".join([_ROW_VALUES] * row_count)
    return f"INSERT INTO usage_records ({', '.join(COLUMNS)}, billed) VALUES {values}"


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

_Pending = tuple[Row, asyncio.Future[None]]
_STOP = object()
_CHECKPOINT = object()  # asks the writer thread for a PASSIVE checkpoint
# The writer thread checkpoints after this many commits on the loop (a few WAL pages each): about the
# 1,000 pages at which SQLite's own automatic checkpoint would run.
_CHECKPOINT_COMMITS = 256
# How long the RESTART step of a checkpoint waits for a reader (a Usage query) to let go of the WAL: the
# loop's records wait for this thread meanwhile, so not long; the next checkpoint tries again.
_RESTART_WAIT_MS = 50
# Parcels are held (see the module doc) for this long after records last overlapped.
GROUP_HOLD_S = 0.1


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
        group_window_s: float = 0.005,
        backlogged: Callable[[], bool] | None = None,
        alone: Callable[[], bool] | None = None,
        commit_on_loop: bool | None = None,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL", "EXTRA"):
            raise ValueError(f"synchronous must be NORMAL, FULL or EXTRA, not {synchronous!r}")
        if busy_timeout_ms < 0:
            raise ValueError("busy_timeout_ms must be >= 0")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if not 0 <= group_window_s <= 1:
            raise ValueError("group_window_s must be between 0 and 1 (seconds)")
        self.path = os.fspath(path)
        if not self.path:
            raise ValueError("path must name a file or be ':memory:'")
        self._in_memory = self.path == ":memory:"
        loop_capable = synchronous == "NORMAL" and not self._in_memory
        if commit_on_loop and not loop_capable:
            raise ValueError(
                "commit_on_loop needs synchronous='NORMAL' and a file: other commits fsync or share a connection"
            )
        # See the module doc. None: wherever it can.
        self._commit_on_loop = loop_capable if commit_on_loop is None else commit_on_loop
        self._synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._max_batch = max_batch
        self._group_window_s = group_window_s
        # The owner's word that its calls queue anyway; without it parcels are never held.
        self.backlogged = backlogged
        # The owner's word that the recording call is its only one in flight: see `record`.
        self.alone = alone
        self._grouping_until = 0.0  # monotonic: hold parcels until then (records overlapped lately)
        self._unsettled = 0  # records enqueued whose callers have not been woken yet (the loops' side)
        self._thread_commit_count = 0  # counted on the writer thread only (two threads never add to one int)
        self._held_count = 0
        self._loop_commit_count = 0
        self._busy_fallback_count = 0
        self._loop_conn: sqlite3.Connection | None = None  # the loop's own (see the module doc)
        self._loop_conn_lock = threading.Lock()  # taken without waiting: a second loop, or the closing thread
        self._with_thread = 0  # records sent to the writer thread and not yet settled (the loops' side)
        self._loop_commits_since_checkpoint = 0

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
        group_window_s: float = 0.005,
        backlogged: Callable[[], bool] | None = None,
        alone: Callable[[], bool] | None = None,
        commit_on_loop: bool | None = None,
    ) -> SqliteLedger:
        """Construct and wait until the file is open and its schema current."""
        ledger = cls(
            path,
            synchronous=synchronous,
            busy_timeout_ms=busy_timeout_ms,
            max_batch=max_batch,
            group_window_s=group_window_s,
            backlogged=backlogged,
            alone=alone,
            commit_on_loop=commit_on_loop,
        )
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
        return self._thread_commit_count + self._loop_commit_count

    @property
    def held_count(self) -> int:
        """Parcels held for the group window so far (see the module doc)."""
        return self._held_count

    @property
    def loop_commit_count(self) -> int:
        """Of `commit_count`, the transactions the event loop committed itself."""
        return self._loop_commit_count

    @property
    def busy_fallback_count(self) -> int:
        """Commits the loop gave up because another connection held the write lock (the records then went by
        the end-of-turn parcel, and on to the writer thread if the lock was still taken)."""
        return self._busy_fallback_count

    # -- writing ---------------------------------------------------------------------------

    async def record(self, record: UsageRecord) -> None:
        usage_math.check_record(record)
        row = to_row(record)
        if self._commit_alone(row):
            return
        # If the caller is cancelled now, the record is still committed: usage is settled anyway.
        await self.enqueue_row(row)

    def _commit_alone(self, row: Row) -> bool:
        """Commits the row at once, in the caller's own turn, when no other record waits and the owner says
        its call is the only one in flight: no record could share the commit, and the parcel's end-of-turn
        send and the caller's wake-up are two loop turns a lone call would wait for (~14 µs of CPU). Never
        under load, where records arriving one by one must still meet in parcels. False: not done here."""
        alone = self.alone
        if self._unsettled or self._closed or not self._commit_on_loop or alone is None or not alone():
            return False
        return self._write_on_loop([row])

    def enqueue_row(self, row: Row) -> asyncio.Future[None]:
        """Queues a row made by `to_row` from a checked record; the future is done once it is committed
        (the ledger writer process enqueues the rows it receives, without a task per row)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        if self._closed:
            raise RuntimeError("the usage ledger is closed")
        # Records made in the same turn of the event loop travel to the writer as one parcel: one queue
        # item and one thread wake-up per turn rather than per record, which is most of the ledger's cost
        # under load. A lone record still leaves at the end of the current turn.
        parcel = self._parcels.get(loop)
        if self._unsettled or parcel:  # made while another record waits for its commit: records overlap
            self._grouping_until = time.monotonic() + GROUP_HOLD_S
        if parcel is None:
            parcel = self._parcels[loop] = []
            if self._hold_open():
                self._held_count += 1
                loop.call_later(self._group_window_s, self._send, loop)
            else:
                loop.call_soon(self._send, loop)
        parcel.append((row, future))
        self._unsettled += 1
        return future

    def _hold_open(self) -> bool:
        """Whether this turn's parcel waits for company (see the module doc)."""
        backlogged = self.backlogged
        return (
            backlogged is not None
            and self._group_window_s > 0
            and time.monotonic() < self._grouping_until
            and backlogged()
        )

    def _send(self, loop: asyncio.AbstractEventLoop) -> None:
        parcel = self._parcels.pop(loop, None)
        if not parcel:
            return
        if (
            self._commit_on_loop
            and not self._with_thread  # earlier records are still with the thread: these follow them
            and not self._closed
            and len(parcel) <= self._max_batch
            and self._commit_here(parcel)
        ):
            return
        with self._submit_lock:
            if not self._closed:
                self._with_thread += len(parcel)
                self._queue.put(parcel)
                return
        self._settle(parcel_futures(parcel), RuntimeError("the usage ledger is closed"))

    def _commit_here(self, parcel: list[_Pending]) -> bool:
        """Commits the parcel on the loop's connection and settles it; False: the writer thread must."""
        try:
            committed = self._write_on_loop([row for row, _ in parcel])
        except Exception as exc:  # disk full, I/O error, a constraint: the parcel failed as a whole
            self._settle(parcel_futures(parcel), exc)
            return True
        if committed:
            self._settle(parcel_futures(parcel), None)
        return committed

    def _write_on_loop(self, rows: list[Row]) -> bool:
        """Commits the rows on the loop's connection. False when it cannot: the connection is not open or is
        another loop's, or another connection holds the write lock. A failed write raises (`_write_error`)."""
        conn = self._loop_conn
        if conn is None or not self._loop_conn_lock.acquire(blocking=False):
            return False
        try:
            _write(conn, rows)
        except Exception as exc:
            if isinstance(exc, sqlite3.OperationalError) and is_busy(exc):
                self._busy_fallback_count += 1
                return False
            raise _write_error(exc) from exc
        finally:
            self._loop_conn_lock.release()
        self._loop_commit_count += 1
        self._loop_commits_since_checkpoint += 1
        if self._loop_commits_since_checkpoint >= _CHECKPOINT_COMMITS:
            self._loop_commits_since_checkpoint = 0
            self._queue.put(_CHECKPOINT)
        return True

    def _settle(self, futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
        """On the records' loop: wakes their callers."""
        self._unsettled -= len(futures)
        for future in futures:
            if future.done():  # the caller was cancelled; the record is committed regardless
                continue
            if error is None:
                future.set_result(None)
            else:
                future.set_exception(error)

    def _settle_from_thread(self, futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
        """Wake each waiting caller on its own loop: one call_soon_threadsafe per loop per batch."""
        by_loop: dict[asyncio.AbstractEventLoop, list[asyncio.Future[None]]] = {}
        for future in futures:
            by_loop.setdefault(future.get_loop(), []).append(future)
        for loop, waiting in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed; nobody is left to tell
                loop.call_soon_threadsafe(self._settle_thread_batch, waiting, error)

    def _settle_thread_batch(self, futures: list[asyncio.Future[None]], error: BaseException | None) -> None:
        self._with_thread -= len(futures)
        self._settle(futures, error)

    def _writer_main(self) -> None:
        try:
            conn = self._open_writer()
        except BaseException as exc:
            self._ready.set_exception(exc)
            self._fail_until_stop(exc)
            self._stopped.set_result(None)
            return
        try:
            if self._commit_on_loop:
                self._loop_conn = self._open_loop_connection()
        except BaseException as exc:
            conn.close()
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
                batch, stop = self._take_batch(conn)
                if batch:
                    self._commit(conn, batch)
        except BaseException as exc:  # a bug here must not leave callers waiting forever
            self._fail_until_stop(exc)
        finally:
            with self._loop_conn_lock:  # waits for a commit a loop is making
                if self._loop_conn is not None:
                    self._loop_conn.close()
                    self._loop_conn = None
            with self._write_lock:
                conn.close()
                self._write_conn = None
                if self._in_memory:
                    self._read_conn = None
                    self._read_closed = True
            self._stopped.set_result(None)

    def _take_batch(self, conn: sqlite3.Connection) -> tuple[list[_Pending], bool]:
        """Block for one parcel, then take whatever else is already waiting, up to max_batch records
        (a parcel's remainder waits for the next batch). Returns the batch and whether to stop after it.
        Checkpoints asked for meanwhile are run on the way."""
        batch, self._carry = self._carry, []
        while not batch and not self._stopping:
            item = self._queue.get()
            if item is _STOP:
                return [], True
            if item is _CHECKPOINT:
                self._checkpoint(conn)
                continue
            batch = list(_as_parcel(item))
        while len(batch) < self._max_batch and not self._stopping:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                self._stopping = True
                break
            if item is _CHECKPOINT:
                self._checkpoint(conn)
                continue
            batch.extend(_as_parcel(item))
        if len(batch) > self._max_batch:
            batch, self._carry = batch[: self._max_batch], batch[self._max_batch :]
        return batch, self._stopping and not self._carry

    def _commit(self, conn: sqlite3.Connection, batch: list[_Pending]) -> None:
        error: BaseException | None = None
        try:
            with self._write_lock:
                _write(conn, [row for row, _ in batch])
            self._thread_commit_count += 1
        except Exception as exc:  # disk full, I/O error, lock timeout: the whole batch failed
            error = _write_error(exc)
        self._settle_from_thread([future for _, future in batch], error)

    def _checkpoint(self, conn: sqlite3.Connection) -> None:
        """Moves what the WAL holds into the database file and has the WAL start over, so that it stays
        bounded. The RESTART makes the next write start the WAL over (it waits for readers at most
        `_RESTART_WAIT_MS`). Records made meanwhile wait for it here, as they waited for SQLite's automatic
        checkpoints when this thread made every commit. A checkpoint that fails or gives up loses nothing:
        the frames stay in the WAL for the next one."""
        # The loop does not write meanwhile (its records come here): a write beside a checkpoint can wait
        # inside SQLite for the WAL's read locks, and inside the file system for the checkpoint's fsyncs
        # (measured: stalls of tens of ms), and the loop must never wait.
        with self._loop_conn_lock, self._write_lock, contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
            conn.execute(f"PRAGMA busy_timeout={_RESTART_WAIT_MS}")
            try:
                conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchall()
            finally:
                conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")

    def _fail_until_stop(self, error: BaseException) -> None:
        if self._carry:
            self._settle_from_thread(parcel_futures(self._carry), error)
            self._carry = []
        while not self._stopping:
            item = self._queue.get()
            if item is _STOP:
                return
            if item is not _CHECKPOINT:
                self._settle_from_thread(parcel_futures(_as_parcel(item)), error)

    def _open_loop_connection(self) -> sqlite3.Connection:
        """The loop's connection (see the module doc): no busy timeout, never a checkpoint."""
        conn = self._connect(busy_timeout_ms=0)
        try:
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            conn.execute("PRAGMA wal_autocheckpoint=0")
        except BaseException:
            conn.close()
            raise
        return conn

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
                migrate(conn)
                break
            except sqlite3.OperationalError as exc:
                conn.close()
                if not is_busy(exc) or time.monotonic() + pause_s > deadline:
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

    def _connect(self, busy_timeout_ms: int | None = None) -> sqlite3.Connection:
        timeout_ms = self._busy_timeout_ms if busy_timeout_ms is None else busy_timeout_ms
        # isolation_level=None: transactions are exactly the BEGIN/COMMIT issued here.
        conn = sqlite3.connect(self.path, timeout=timeout_ms / 1000, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={int(timeout_ms)}")
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
                    rollback_quietly(conn)
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
            return sqlite_usage.report(self._read_conn, query)

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


def _write_error(exc: Exception) -> Exception:
    """What the database or the OS said when a write failed, as a LedgerWriteError (anything else is a bug
    and stays what it is)."""
    if isinstance(exc, sqlite3.Error | OSError):
        error = LedgerWriteError(f"{type(exc).__name__}: {exc}")
        error.__cause__ = exc
        return error
    return exc


def _write(conn: sqlite3.Connection, rows: list[Row]) -> None:
    """Commits the rows (see `_insert_new` and `_insert_billed`), or raises and commits none."""
    if not _insert_new(conn, rows):
        conn.execute("BEGIN IMMEDIATE")
        try:
            _insert_billed(conn, rows)
            conn.execute("COMMIT")
        except BaseException:
            rollback_quietly(conn)
            raise


def _insert_new(conn: sqlite3.Connection, rows: list[Row]) -> bool:
    """The usual batch without reading anything first: requests the file holds no record of (a gateway-made
    request id always, a caller's on its first try) are each billed, so their rows go in billed. Up to
    _ROWS_PER_INSERT rows are one statement, its own transaction (one statement instead of four, and at
    concurrency 1 every call pays a whole commit); a bigger batch is one INSERT per _ROWS_PER_INSERT rows
    inside one transaction, still far cheaper than the ranking path's lookup. When a stored billed row has
    one of the keys, the unique index refuses a statement, nothing is committed, and the caller takes the
    full path (`_insert_billed`). False: not done here."""
    keys = {(row[ledger_rows.TENANT], row[ledger_rows.REQUEST_ID]) for row in rows if row[ledger_rows.REQUEST_ID]}
    if len(keys) < sum(1 for row in rows if row[ledger_rows.REQUEST_ID]):  # a request twice in the batch
        return False
    chunks = [rows[start : start + _ROWS_PER_INSERT] for start in range(0, len(rows), _ROWS_PER_INSERT)]
    if len(chunks) > 1:
        conn.execute("BEGIN IMMEDIATE")
    try:
        for chunk in chunks:
            values: list[object] = []
            for row in chunk:
                values.extend(row)
                values.append(1)
            conn.execute(_insert_sql(len(chunk)), values)
        if len(chunks) > 1:
            conn.execute("COMMIT")
    except sqlite3.IntegrityError:  # the index (or a constraint the full path will report as well)
        rollback_quietly(conn)
        return False
    except BaseException:
        rollback_quietly(conn)
        raise
    return True


def _insert_billed(conn: sqlite3.Connection, rows: list[Row]) -> None:
    """Insert a batch (inside the caller's transaction), keeping each request's one billed row.

    Rows already stored were inserted earlier, so they win ties against the batch (order 0 before 1);
    within the batch, queue order is insertion order.
    """
    best = ledger_rows.best_of_batch(rows, lambda i: (1, i))
    keys = list(best)
    stored: list[tuple[ledger_rows.Key, ledger_rows.Rank, tuple[object]]] = []
    for start in range(0, len(keys), _KEYS_PER_LOOKUP):
        chunk = keys[start : start + _KEYS_PER_LOOKUP]
        params = [part for key in chunk for part in key]
        for row_id, tenant, request_id, outcome, time_ns in conn.execute(_billed_rows_sql(len(chunk)), params):
            stored.append(((tenant, request_id), ledger_rows.rank(outcome, time_ns, 0, row_id), (row_id,)))
    billed, displaced = ledger_rows.settle_billing(rows, best, stored)
    if displaced:
        conn.executemany(_UNBILL, displaced)
    for start in range(0, len(rows), _ROWS_PER_INSERT):  # one statement each, not one per row
        end = start + _ROWS_PER_INSERT
        values: list[object] = []
        for row, flag in zip(rows[start:end], billed[start:end], strict=True):
            values.extend(row)
            values.append(int(flag))
        conn.execute(_insert_sql(len(values) // (len(COLUMNS) + 1)), values)


def _as_parcel(item: object) -> list[_Pending]:
    return cast(list[_Pending], item)  # the queue holds only parcels and _STOP


def parcel_futures(parcel: list[_Pending]) -> list[asyncio.Future[None]]:
    return [future for _, future in parcel]
