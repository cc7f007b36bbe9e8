"""One SQLite writer for `serve --workers N`: the workers send their ledger rows to one writer process.

Why one writer rather than a file per worker: SQLite lets one process write at a time, and processes that
share a file take turns through its lock (a writer that finds it taken sleeps in SQLite's busy handler,
which stalled the waiting worker's calls: 1.09x with 2 workers, p99 213 ms vs 69 ms). A file per worker
would split what is one ledger: a request retried on another worker could be billed twice (the
billed-once rule is enforced by a unique index inside one file), every reader (Usage, budgets restored
from the ledger, operators' sqlite3) would have to merge files, and SQLite attaches at most 10 of them.
With one writer the file, its schema and its rules stay exactly as they are, no worker ever waits for
another's lock, and a worker's CPU per record halves (bench/ledger_workers_bench.py: 17-20 us vs
33-39 us). The cost: one process commits for all, 0.6-0.8x the records/s of two processes sharing the
file at full ledger load (13,500-24,000 on the loaded 2-vCPU bench machine), still several times what
two gateway workers produce there (~2,000-2,600 calls/s).

The writer (`serve_writer`, a process the supervisor starts before the workers: see server.workers)
owns a `SqliteLedger` and listens on a Unix socket in a private directory. A worker's `SocketLedger`
sends each event-loop turn's rows as one JSON line `[[id, row], ...]`; the writer answers
`[[id, null or error], ...]` once they are committed, so `record()` returns after the commit, as with
a local ledger. Queries read the file directly (WAL: readers never wait for the writer), so `Usage`
in any worker sees every worker's rows.

The writer stops on SIGTERM once its workers have disconnected (they close their connection last, after
their final records), and ignores SIGINT: a Ctrl-C reaches the whole process group, and the workers still
record the calls they drain.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from typing import Literal

from feather_grpc.core.ledger import LedgerWriteError, UsageRecord
from feather_grpc.state import usage_math
from feather_grpc.state.ledger_rows import to_row
from feather_grpc.state.sqlite_ledger import SqliteLedger

log = logging.getLogger(__name__)

SOCKET_ENV = "FEATHER_LEDGER_SOCKET"  # set by the supervisor in each worker's environment
_MAX_LINE = 256 * 1024 * 1024  # one event-loop turn's rows; a record is at most ~50 KB (64 tags)
_DISCONNECT_WAIT_S = 60.0  # at SIGTERM: how long the writer waits for workers still connected


class SocketLedger(SqliteLedger):
    """A worker's ledger: its records are committed by the writer process, its queries read the file."""

    def __init__(self, path: str, socket_path: str, *, synchronous: Literal["NORMAL", "FULL"] = "NORMAL") -> None:
        # Its writer thread only opens the file (and waits); it commits nothing, on the loop or off it.
        super().__init__(path, synchronous=synchronous, commit_on_loop=False)
        self.socket_path = socket_path
        self._stream: asyncio.StreamWriter | None = None
        self._replies: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[None]] = {}
        self._outbox: list[list[object]] | None = None  # this turn's [id, row] pairs
        self._next_id = 0
        self._broken: str = ""  # why records can no longer be sent

    async def ready(self) -> None:
        await super().ready()
        if self._stream is None and not self._broken:
            reader, self._stream = await asyncio.open_unix_connection(self.socket_path, limit=_MAX_LINE)
            self._replies = asyncio.create_task(self._read_replies(reader), name="feather-ledger-replies")

    async def record(self, record: UsageRecord) -> None:
        usage_math.check_record(record)
        row = to_row(record)
        if self._stream is None:
            await self.ready()
        if self._broken:
            raise LedgerWriteError(f"the usage ledger writer is unreachable ({self._broken})")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._next_id += 1
        self._waiting[self._next_id] = future
        if self._outbox is None:  # one line per event-loop turn, as SqliteLedger sends one parcel
            self._outbox = []
            loop.call_soon(self._send_line)
        self._outbox.append([self._next_id, row])
        await future  # committed (or refused) by the writer; a cancelled caller's record still goes

    async def probe(self) -> None:
        """The writer process must be reachable, and the file writable (a probe row, as SqliteLedger's)."""
        if self._broken:
            raise LedgerWriteError(f"the usage ledger writer is unreachable ({self._broken})")
        await super().probe()

    def _send_line(self) -> None:
        outbox, self._outbox = self._outbox, None
        if not outbox:
            return
        if self._stream is None or self._broken:
            self._fail_waiting(self._broken or "not connected")
            return
        self._stream.write(json.dumps(outbox, separators=(",", ":")).encode() + b"\n")

    async def _read_replies(self, reader: asyncio.StreamReader) -> None:
        problem = "the writer closed the connection"
        try:
            while line := await reader.readline():
                for rid, error in json.loads(line):
                    future = self._waiting.pop(rid, None)
                    if future is None or future.done():
                        continue
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(LedgerWriteError(f"the usage ledger writer could not commit: {error}"))
        except (OSError, ValueError) as e:
            problem = f"{type(e).__name__}: {e}"
        self._broken = self._broken or problem
        self._fail_waiting(self._broken)

    def _fail_waiting(self, problem: str) -> None:
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(LedgerWriteError(f"the usage ledger writer is unreachable ({problem})"))

    async def aclose(self) -> None:
        self._send_line()
        if self._waiting:  # this turn's records: the writer answers them before the connection closes
            await asyncio.gather(*self._waiting.values(), return_exceptions=True)
        self._broken = self._broken or "the ledger is closed"
        if self._stream is not None:
            self._stream.close()
            with contextlib.suppress(OSError):
                await self._stream.wait_closed()
        if self._replies is not None:
            self._replies.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._replies
        await super().aclose()


def _failed(error: Exception) -> asyncio.Future[None]:
    future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    future.set_exception(error)
    return future


async def serve_writer(path: str, socket_path: str, synchronous: Literal["NORMAL", "FULL"]) -> None:
    """The writer process: commits the rows its workers send until SIGTERM and their disconnection."""
    ledger = await SqliteLedger.open(path, synchronous=synchronous)
    connections: set[asyncio.Task[None]] = set()

    async def serve_worker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connections.add(task)
        pending: set[asyncio.Task[None]] = set()

        async def commit(line: bytes) -> None:
            items = json.loads(line)
            try:
                futures = [ledger.enqueue_row(tuple(row)) for _, row in items]
            except RuntimeError as e:  # closed
                futures = [_failed(e)] * len(items)
            done = await asyncio.gather(*futures, return_exceptions=True)
            answer = [[rid, None if r is None else str(r)] for (rid, _), r in zip(items, done, strict=True)]
            writer.write(json.dumps(answer, separators=(",", ":")).encode() + b"\n")

        try:
            while line := await reader.readline():
                t = asyncio.create_task(commit(line))
                pending.add(t)
                t.add_done_callback(pending.discard)
            await asyncio.gather(*pending)
        except (OSError, ValueError) as e:  # a worker that died mid-line: its own calls fail, not the writer
            log.warning("ledger writer: a worker connection failed (%s)", e)
        finally:
            writer.close()
            connections.discard(task)

    server = await asyncio.start_unix_server(serve_worker, socket_path, limit=_MAX_LINE)
    os.chmod(socket_path, 0o600)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, lambda: None)  # see the module docstring
    log.info("ledger writer: serving %s", path, extra={"ledger_path": path})
    try:
        await stop.wait()
        server.close()
        if connections:
            _, still = await asyncio.wait(connections, timeout=_DISCONNECT_WAIT_S)
            if still:
                log.error("ledger writer: %d workers still connected; closing the ledger anyway", len(still))
    finally:
        await ledger.aclose()
    log.info("ledger writer: stopped")
