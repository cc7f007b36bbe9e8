"""LedgerSpool: usage records made durable on local disk before they travel anywhere else.

The spool is a SqliteLedger file (WAL, group commit on its writer thread: `append()` returns once
the record's transaction is committed, so it survives a kill -9 of the process; pass
`synchronous="FULL"` to survive power loss too) plus one `spool_meta` table. A shipper reads the
oldest records with `peek()`, delivers them, then `ack()`s them, which deletes them.

Every spooled record has a stable identity, `(epoch, seq)`: `seq` is the row's rowid and `epoch`
a UUID kept in `spool_meta`. A record read again after a crash (delivered, not yet acked) has
the same identity, so the receiver can drop it as a duplicate. SQLite hands out rowid
`max(rowid) + 1`, so rowids only repeat once the table has been emptied: `ack()` starts a new
epoch in the same transaction that leaves the table empty, and identities never repeat.

One process at a time: `open()` takes an exclusive `flock` on `<path>.lock` (released by the
kernel when the process dies), so a second gateway pointed at the same spool fails at start
instead of shipping and deleting the first one's records.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from feather_grpc.core.ledger import UsageRecord
from feather_grpc.state.ledger_rows import COLUMNS, Row
from feather_grpc.state.sqlite_ledger import SqliteLedger, Synchronous
from feather_grpc.state.sqlite_schema import rollback_quietly

T = TypeVar("T")

_META = """CREATE TABLE IF NOT EXISTS spool_meta (
    singleton INTEGER PRIMARY KEY CHECK (singleton = 1),
    epoch TEXT NOT NULL
) STRICT"""
_PEEK = f"SELECT id, {', '.join(COLUMNS)} FROM usage_records ORDER BY id LIMIT ?"


class SpoolLocked(RuntimeError):
    """Another process (or another spool in this one) has this spool open."""


@dataclass(frozen=True, slots=True)
class SpoolBatch:
    """The oldest spooled records, in spool order. `rows[i]` has identity `(epoch, seqs[i])`."""

    epoch: uuid.UUID
    seqs: list[int]
    rows: list[Row]  # column values in ledger_rows.COLUMNS order


class LedgerSpool:
    """A local, durable queue of UsageRecords. Construction does no I/O; `await open()` first."""

    columns = COLUMNS

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "NORMAL",
        busy_timeout_ms: int = 10_000,
        max_batch: int = 512,
        backlogged: Callable[[], bool] | None = None,
        alone: Callable[[], bool] | None = None,
    ) -> None:
        self.path = os.fspath(path)
        if not self.path or self.path == ":memory:":
            raise ValueError("the spool must be a file: it is what survives a crash")
        self._synchronous: Synchronous = synchronous
        self._busy_timeout_ms = busy_timeout_ms
        self._max_batch = max_batch
        # The owner's words that its calls queue anyway, and that a record's call is its only one: the
        # spool's SqliteLedger holds a commit open for company, or commits a lone record at once.
        self.backlogged = backlogged
        self.alone = alone
        self._writer: SqliteLedger | None = None  # created once the lock is held
        self._conn: sqlite3.Connection | None = None  # the shipper's side: peek, ack, count
        self._conn_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._opened = False
        self._closed = False

    async def open(self) -> None:
        """Lock the spool, open (or create) the file and its schema. Raises SpoolLocked if in use."""
        if self._closed:
            raise RuntimeError("the spool is closed")
        if self._opened:
            return
        try:
            await asyncio.to_thread(self._lock)
            self._writer = SqliteLedger(
                self.path,
                synchronous=self._synchronous,
                busy_timeout_ms=self._busy_timeout_ms,
                max_batch=self._max_batch,
                backlogged=self.backlogged,
                alone=self.alone,
            )
            await self._writer.ready()
            await asyncio.to_thread(self._open_conn)
        except BaseException:
            await self.aclose()
            raise
        self._opened = True

    @property
    def commit_count(self) -> int:
        """Group commits of appended records so far."""
        return 0 if self._writer is None else self._writer.commit_count

    @property
    def held_count(self) -> int:
        """Commits held open for company so far (see SqliteLedger's `backlogged`)."""
        return 0 if self._writer is None else self._writer.held_count

    async def append(self, record: UsageRecord) -> None:
        """Spool one record; returns once it is committed to the local file."""
        if self._writer is None or not self._opened:
            raise RuntimeError("the spool is not open" if not self._closed else "the spool is closed")
        await self._writer.record(record)

    async def probe(self) -> None:
        """Commit a tiny write to the spool file; raise LedgerWriteError if that fails."""
        if self._writer is None or not self._opened:
            raise RuntimeError("the spool is not open" if not self._closed else "the spool is closed")
        await self._writer.probe()

    async def peek(self, limit: int) -> SpoolBatch | None:
        """The oldest `limit` records (None when the spool is empty). Leaves them in place."""
        return await self._in_thread(lambda conn: _peek(conn, limit))

    async def ack(self, batch: SpoolBatch) -> None:
        """Delete a delivered batch; starts a new epoch if that empties the spool."""
        await self._in_thread(lambda conn: _ack(conn, batch))

    async def count(self) -> int:
        """Records waiting in the spool."""
        return await self._in_thread(_count)

    async def aclose(self) -> None:
        """Commit what `append()` has queued, close the file and release the lock. Idempotent."""
        self._closed = True
        if self._writer is not None:
            await self._writer.aclose()
        await asyncio.to_thread(self._close_conn)

    # -- internals ---------------------------------------------------------------------------

    async def _in_thread(self, work: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            with self._conn_lock:
                if self._conn is None:
                    raise RuntimeError("the spool is not open" if not self._closed else "the spool is closed")
                return work(self._conn)

        return await asyncio.to_thread(run)

    def _lock(self) -> None:
        fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SpoolLocked(f"the ledger spool {self.path!r} is in use by another process") from None
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def _open_conn(self) -> None:
        conn = sqlite3.connect(
            self.path, timeout=self._busy_timeout_ms / 1000, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute(f"PRAGMA busy_timeout={int(self._busy_timeout_ms)}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                is_spool = conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'spool_meta'").fetchone()
                if not is_spool and conn.execute("SELECT EXISTS (SELECT 1 FROM usage_records)").fetchone()[0]:
                    # Shipping would move (and delete) a whole local ledger: refuse, loudly.
                    raise RuntimeError(f"{self.path!r} is a SqliteLedger file with records, not a ledger spool")
                conn.execute(_META)
                conn.execute("INSERT OR IGNORE INTO spool_meta (singleton, epoch) VALUES (1, ?)", (str(uuid.uuid4()),))
                conn.execute("COMMIT")
            except BaseException:
                rollback_quietly(conn)
                raise
        except BaseException:
            conn.close()
            raise
        with self._conn_lock:
            self._conn = conn

    def _close_conn(self) -> None:
        with self._conn_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # releases the flock
                self._lock_fd = None


def _peek(conn: sqlite3.Connection, limit: int) -> SpoolBatch | None:
    conn.execute("BEGIN")  # one snapshot for the epoch and the rows
    try:
        (epoch,) = conn.execute("SELECT epoch FROM spool_meta").fetchone()
        rows = conn.execute(_PEEK, (limit,)).fetchall()
    finally:
        conn.execute("COMMIT")
    if not rows:
        return None
    return SpoolBatch(epoch=uuid.UUID(epoch), seqs=[row[0] for row in rows], rows=[tuple(row[1:]) for row in rows])


def _ack(conn: sqlite3.Connection, batch: SpoolBatch) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        (epoch,) = conn.execute("SELECT epoch FROM spool_meta").fetchone()
        if epoch == str(batch.epoch):  # else: already acked (and the spool emptied) once
            # Rows are peeked oldest first and new rows get higher rowids, so the batch is exactly
            # the rows up to its last seq.
            conn.execute("DELETE FROM usage_records WHERE id <= ?", (batch.seqs[-1],))
            if conn.execute("SELECT NOT EXISTS (SELECT 1 FROM usage_records)").fetchone()[0]:
                conn.execute("UPDATE spool_meta SET epoch = ?", (str(uuid.uuid4()),))
        conn.execute("COMMIT")
    except BaseException:
        rollback_quietly(conn)
        raise


def _count(conn: sqlite3.Connection) -> int:
    count = conn.execute("SELECT COUNT(*) FROM usage_records").fetchone()[0]
    assert isinstance(count, int)
    return count
