"""A lean asyncio Redis client: RESP2 over ONE pipelined connection.

Why not redis-py: its asyncio client spends ~150 us of CPU per command or pipeline (connection checkout,
command objects, response callbacks), which at five decisions per gateway call halved throughput. Here
a command is packed into bytes, and every command issued in one event-loop turn leaves in one write;
replies come back in order on the same connection, so each resolves the next waiting future. Redis
executes one connection's commands in order, so callers see their decisions in arrival order.

Failure handling: a connect is bounded by `timeout_s`, and so is the wait for the next reply: when
replies are awaited and none came for `timeout_s`, the connection is dropped, every waiting call fails
with `RedisUnavailable` at once, and the next call connects afresh (so after a Redis restart the same
client works again). A call that timed out may still have been applied. Error replies (`-ERR ...`) are
returned as `ReplyError` values, not raised, so one bad reply never disturbs the others of its batch.

    client = RedisClient.from_url("redis://:secret@127.0.0.1:6379/0", timeout_s=0.25)
    await client.call("SET", "k", "v")
    await client.aclose()
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any, Protocol, cast

from feather_grpc.core.redis_url import RedisAddress

__all__ = ["RedisClient", "RedisCommands", "RedisUnavailable", "ReplyError"]


class RedisCommands(Protocol):
    """What the stores need of a client: `RedisClient` (one server) or `RedisClusterClient`."""

    @property
    def round_trips(self) -> int: ...

    def call(self, *args: str | bytes | int) -> asyncio.Future[Any]: ...

    def send_now(self) -> None: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


class RedisUnavailable(ConnectionError):
    """Redis could not be reached, or did not answer within the timeout."""


class ReplyError(Exception):
    """An error reply from Redis, e.g. `NOSCRIPT No matching script` or `OOM ...`."""


def pack(args: tuple[str | bytes | int, ...]) -> bytes:
    """One command in RESP: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        b = a if isinstance(a, bytes) else str(a).encode()
        out.append(b"$%d\r\n%s\r\n" % (len(b), b))
    return b"".join(out)


class _Incomplete(Exception):
    pass


def _parse(buf: bytearray, pos: int) -> tuple[Any, int]:
    """One reply starting at `pos`: (value, position after it). Raises _Incomplete when more bytes are
    needed. Bulk strings are bytes, simple strings str, errors ReplyError, nil None."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        raise _Incomplete
    kind = buf[pos]
    if kind == 0x3A:  # ':' integer
        return int(buf[pos + 1 : end]), end + 2
    if kind == 0x24:  # '$' bulk string
        size = int(buf[pos + 1 : end])
        if size < 0:
            return None, end + 2
        stop = end + 2 + size
        if len(buf) < stop + 2:
            raise _Incomplete
        return bytes(buf[end + 2 : stop]), stop + 2
    if kind == 0x2A:  # '*' array
        count = int(buf[pos + 1 : end])
        if count < 0:
            return None, end + 2
        items = []
        pos = end + 2
        for _ in range(count):
            item, pos = _parse(buf, pos)
            items.append(item)
        return items, pos
    if kind == 0x2B:  # '+' simple string
        return buf[pos + 1 : end].decode(), end + 2
    if kind == 0x2D:  # '-' error
        return ReplyError(buf[pos + 1 : end].decode(errors="replace")), end + 2
    raise RedisUnavailable(f"redis: unexpected reply type {chr(kind)!r}")


class _Connection(asyncio.Protocol):
    """One socket: futures wait in send order; each complete reply resolves the oldest."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Any]] = deque()
        self.lost: BaseException | None = None
        self.progress_at = 0.0  # when a reply last arrived, or waiting began (loop clock)
        self._clock = clock
        self._buf = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's transports are not subclasses

    def data_received(self, data: bytes) -> None:
        buf = self._buf
        buf += data
        pos = 0
        try:
            while pos < len(buf):
                value, pos = _parse(buf, pos)
                future = self.waiting.popleft()
                if not future.done():  # its caller may have given up
                    future.set_result(value)
        except _Incomplete:
            pass
        except (RedisUnavailable, ValueError, IndexError) as e:  # garbled stream, or a reply nobody asked for
            self.abort(RedisUnavailable(f"redis: protocol error: {e}"))
            return
        if pos:
            del buf[:pos]
            self.progress_at = self._clock()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(RedisUnavailable(f"redis: connection lost: {exc}" if exc else "redis: connection closed"))

    def abort(self, error: RedisUnavailable) -> None:
        self._fail(error)
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, error: RedisUnavailable) -> None:
        if self.lost is None:
            self.lost = error
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class RedisClient:
    """Commands issued in one loop turn leave together on one connection (see the module docstring)."""

    def __init__(self, address: RedisAddress, *, timeout_s: float = 0.25, connect_timeout_s: float | None = None):
        self.address = address
        self.timeout_s = timeout_s
        self.connect_timeout_s = timeout_s if connect_timeout_s is None else connect_timeout_s
        self.round_trips = 0  # writes to the socket (a batch of commands counts once)
        self._conn: _Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._pending: list[bytes] = []
        self._pending_futures: list[asyncio.Future[Any]] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @classmethod
    def from_url(cls, url: str, *, timeout_s: float = 0.25, connect_timeout_s: float | None = None) -> RedisClient:
        return cls(RedisAddress.from_url(url), timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)

    def call(self, *args: str | bytes | int) -> asyncio.Future[Any]:
        """Sends one command (with the others of this loop turn) and returns the future of its reply:
        the value, a ReplyError value, or RedisUnavailable raised."""
        loop = self._loop
        if loop is None:  # bound once: get_running_loop() costs a getpid() system call every time
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(RedisUnavailable("redis: client closed"))
            return future
        self._pending.append(pack(args))
        self._pending_futures.append(future)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def send_now(self) -> None:
        """Writes the commands this loop turn has queued so far now, not at the end of the turn: for a caller
        about to keep the loop busy (a lone call's ledger commit) while the replies travel."""
        if self._pending:
            self._flush()  # the end-of-turn flush still scheduled then finds nothing, or what came after

    def _flush(self) -> None:
        self._flush_scheduled = False
        if not self._pending:
            return
        conn = self._conn
        if conn is None or conn.lost is not None:
            if self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            return  # _connect flushes once connected, or fails what is pending
        data, futures = b"".join(self._pending), self._pending_futures
        self._pending, self._pending_futures = [], []
        try:
            self._send(conn, data, futures)
        except Exception as e:  # never leave a caller waiting on a reply that cannot come
            conn.abort(RedisUnavailable(f"redis: cannot send: {type(e).__name__}: {e}"))

    def _send(self, conn: _Connection, data: bytes, futures: list[asyncio.Future[Any]]) -> None:
        loop = self._loop or asyncio.get_running_loop()
        if not conn.waiting:
            conn.progress_at = loop.time()
        conn.waiting.extend(futures)  # first: whatever fails below, abort() fails these too
        if conn.transport is None:
            raise RedisUnavailable("redis: not connected")
        conn.transport.write(data)
        self.round_trips += 1
        if self._watchdog is None:
            self._watchdog = loop.call_later(self.timeout_s / 4, self._watch)

    def _watch(self) -> None:
        """Runs every timeout/4 while replies are awaited: a connection that made no progress for a
        whole timeout is stuck (one timer for all calls, instead of one per batch)."""
        self._watchdog = None
        conn = self._conn
        if conn is None or conn.lost is not None or not conn.waiting:
            return
        loop = self._loop or asyncio.get_running_loop()
        if loop.time() - conn.progress_at >= self.timeout_s:
            conn.abort(RedisUnavailable(f"redis: no reply within {self.timeout_s:g}s"))
            return
        self._watchdog = loop.call_later(self.timeout_s / 4, self._watch)

    async def _connect(self) -> None:
        try:
            conn = await self._open()
        except BaseException as e:
            self._connecting = None
            error = e if isinstance(e, RedisUnavailable) else RedisUnavailable(f"redis: {type(e).__name__}: {e}")
            futures, self._pending, self._pending_futures = self._pending_futures, [], []
            for f in futures:
                if not f.done():
                    f.set_exception(error)
            if not isinstance(e, Exception):
                raise
            return
        self._conn, self._connecting = conn, None
        if self._closed:
            conn.abort(RedisUnavailable("redis: client closed"))
        self._flush()

    async def _open(self) -> _Connection:
        a = self.address
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                factory = partial(_Connection, loop.time)
                if a.unix_path is not None:
                    _, conn = await loop.create_unix_connection(factory, a.unix_path)
                else:
                    _, conn = await loop.create_connection(
                        factory, a.host, a.port, ssl=a.tls, server_hostname=a.host if a.tls else None
                    )
                hello: list[tuple[str | bytes | int, ...]] = []
                if a.password is not None:
                    hello.append(("AUTH", a.username, a.password) if a.username else ("AUTH", a.password))
                if a.db:
                    hello.append(("SELECT", a.db))
                if hello:
                    futures = [loop.create_future() for _ in hello]
                    self._send(conn, b"".join(pack(c) for c in hello), futures)
                    for command, reply in zip(hello, await asyncio.gather(*futures), strict=True):
                        if isinstance(reply, ReplyError):
                            refused = RedisUnavailable(f"redis: {command[0]!s} refused: {reply}")
                            conn.abort(refused)
                            raise refused
        except TimeoutError:
            raise RedisUnavailable(f"redis: no connection within {self.connect_timeout_s:g}s") from None
        except OSError as e:
            if isinstance(e, RedisUnavailable):
                raise
            raise RedisUnavailable(f"redis: cannot connect: {e}") from None
        return conn

    async def ping(self) -> None:
        """Raises RedisUnavailable unless Redis answers."""
        reply = await self.call("PING")
        if isinstance(reply, ReplyError):
            raise RedisUnavailable(f"redis: {reply}")

    async def aclose(self) -> None:
        self._closed = True
        if self._connecting is not None:
            self._connecting.cancel()
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
