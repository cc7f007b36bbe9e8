"""The keep-alive pool of the own client: the connections to one (owner, scheme, host, port, egress), at
most `max_connections` of them, idle ones reused last-in first-out, callers beyond the limit queued in FIFO
order, and the sockets opened for it (DNS cached, Happy-Eyeballs-free address rotation, TLS, tunnels)."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import ipaddress
import socket
import ssl
from typing import Final, Protocol

from feather_grpc.core.egress import DIRECT, Egress
from feather_grpc.core.http_client import ConnectError
from feather_grpc.providers.transport.connection import Connection, describe
from feather_grpc.providers.transport.tunnel import tunnel

__all__ = ["DNS_TTL_S", "ClientSettings", "Pool"]

DNS_TTL_S: Final = 60.0


class ClientSettings(Protocol):
    """What a pool reads from the client that made it (client.py's `HttpClient`, which imports this module:
    the pool names only this, so the two do not import each other)."""

    keepalive_timeout_s: float
    user_agent: str

    def ssl_context(self, egress: Egress = DIRECT) -> ssl.SSLContext: ...


class Pool:
    """The connections to one (scheme, host, port), made one way (`Egress`: proxy, TLS trust and identity)."""

    def __init__(
        self, client: ClientSettings, scheme: str, host: str, port: int, max_connections: int, egress: Egress = DIRECT
    ) -> None:
        self.client = client
        self.max_connections = max_connections
        self.host = host
        self.port = port
        self.tls = scheme == "https"
        self.egress = egress
        self.proxy = egress.proxy
        # Where sockets go: the proxy when there is one (it alone resolves and reaches the origin).
        self._dial = (self.proxy.host, self.proxy.port) if self.proxy is not None else (host, port)
        self.closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle: collections.deque[Connection] = collections.deque()  # oldest left, newest right
        self._conns: set[Connection] = set()
        self._open = 0  # connections open or being opened, plus slots handed to waiters
        self._waiters: collections.deque[asyncio.Future[Connection | None]] = collections.deque()
        self._sweep: asyncio.TimerHandle | None = None
        self._addrs: list[tuple[int, int, int, tuple[object, ...]]] = []
        self._addrs_until = 0.0
        try:
            ip = ipaddress.ip_address(self._dial[0])
        except ValueError:
            self._literal = False
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            self._addrs = [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, self._dial)]
            self._literal = True

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def acquire(self, *, fresh: bool = False) -> Connection:
        """A connection ready for a request: the newest idle one, a new one, or one freed for this caller.

        `fresh`: a newly opened connection, and first place in the queue (the one resend after a stale
        connection); at the limit it takes over the slot of the oldest idle connection.
        """
        front = fresh
        while True:
            if self.closed:
                raise ConnectError(f"{self.host}:{self.port}: HTTP client closed")
            idle = self._idle
            if idle and not fresh:
                conn = idle.pop()
                if conn.idle_since > self.loop.time() - self.client.keepalive_timeout_s and not conn.closed:
                    return conn
                self._retire(conn)  # closed, or too old: then all older ones are too
                while idle:
                    self._retire(idle.pop())
            if self._open < self.max_connections:
                self._open += 1
                return await self._connect_slot()
            if fresh and idle:
                self._retire(idle.popleft(), free=False)  # its slot is ours
                return await self._connect_slot()
            waiter: asyncio.Future[Connection | None] = self.loop.create_future()
            if front:
                self._waiters.appendleft(waiter)
            else:
                self._waiters.append(waiter)
            try:
                got = await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    if waiter.exception() is None:
                        handed = waiter.result()  # handed to us as we were cancelled: pass it on
                        if handed is None:
                            self._free_slot()
                        else:
                            self.release(handed)
                else:
                    with contextlib.suppress(ValueError):
                        self._waiters.remove(waiter)
                raise
            if got is None:  # a slot: open a connection in it
                return await self._connect_slot()
            if not fresh and not got.closed:
                return got
            if got.owned:  # not fresh, or it died on its way to us: open one in its slot
                self._retire(got, free=False)
                return await self._connect_slot()
            front = True  # its slot went elsewhere already: queue first for the next one

    def _retire(self, conn: Connection, *, free: bool = True) -> None:
        """Close `conn` now and stop counting it; `free=False` keeps its slot for the caller."""
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        if conn.owned:
            conn.owned = False
            self._conns.discard(conn)
            if free:
                self._free_slot()
        conn.abort()

    async def _connect_slot(self) -> Connection:
        try:
            conn = await self._connect()
        except BaseException:
            self._free_slot()
            raise
        if conn.closed:  # lost before we could count it
            self._free_slot()
            raise ConnectError(f"cannot connect to {self.host}:{self.port}: connection closed during connect")
        if self.closed:
            conn.abort()
            self._free_slot()
            raise ConnectError(f"{self.host}:{self.port}: HTTP client closed")
        conn.owned = True
        self._conns.add(conn)
        return conn

    async def _connect(self) -> Connection:
        addrs = await self._resolve()
        try:
            ctx = self.client.ssl_context(self.egress) if self.tls else None
        except OSError as exc:  # the provider's CA bundle or certificate, gone or changed since the config loaded
            raise ConnectError(f"cannot use the TLS files for {self.host}: {describe(exc)}") from exc
        last: OSError | None = None
        for i, (family, type_, proto, sockaddr) in enumerate(addrs):
            try:
                conn = await self._open_socket(family, type_, proto, sockaddr, ctx)
            except OSError as exc:  # ssl.SSLError and certificate errors are OSErrors too
                last = exc
                continue
            if i and addrs is self._addrs and not self._literal:
                self._addrs = [addrs[i], *addrs[:i], *addrs[i + 1 :]]  # try the address that worked first
            return conn
        self._addrs_until = 0.0  # resolve again next time
        via = f" via proxy {self.proxy}" if self.proxy is not None else ""
        tls = " (TLS)" if ctx else ""
        raise ConnectError(f"cannot connect to {self.host}:{self.port}{via}{tls}: {describe(last)}")

    async def _open_socket(
        self, family: int, type_: int, proto: int, sockaddr: tuple[object, ...], ctx: ssl.SSLContext | None
    ) -> Connection:
        loop = self.loop
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            if family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, sockaddr)
            if self.proxy is not None and ctx is not None:
                await tunnel(loop, sock, self.proxy, self.host, self.port, self.client.user_agent)
            conn = Connection(self)
            # A transport runs every callback of its protocol in the context that created it (asyncio's
            # reader handles and sslproto, uvloop's transports). Created here, that is the context of the
            # call that opened the connection: its `current_call` (ServerCall, request, prompt) would then
            # live as long as the pooled connection, serving other callers. So the transport is made in a
            # task with an empty context of its own; nothing on the connection's side reads a context
            # variable (the per-attempt headers and the sent-marker are read by the caller, in `request`).
            opening = loop.create_task(
                loop.create_connection(
                    lambda: conn, sock=sock, ssl=ctx, server_hostname=self.host if ctx is not None else None
                ),
                context=contextvars.Context(),
            )
            try:
                transport, _ = await opening
            except BaseException:
                if opening.done() and not opening.cancelled() and opening.exception() is None:
                    opening.result()[0].abort()  # opened as our caller was cancelled: nobody will use it
                raise
            if conn.transport is None:  # connection_made is scheduled, not yet run (uvloop)
                conn.transport = transport
        except BaseException:
            sock.close()  # a no-op when the transport closed it already
            raise
        return conn

    async def _resolve(self) -> list[tuple[int, int, int, tuple[object, ...]]]:
        if self._literal:
            return self._addrs
        now = self.loop.time()
        if self._addrs and now < self._addrs_until:
            return self._addrs
        host, port = self._dial
        what = f"proxy {self.proxy}" if self.proxy is not None else host
        try:
            infos = await self.loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectError(f"cannot resolve {what}: {describe(exc)}") from exc
        if not infos:
            raise ConnectError(f"cannot resolve {what}: no addresses")
        self._addrs = [(family, type_, proto, tuple(addr)) for family, type_, proto, _, addr in infos]
        self._addrs_until = now + DNS_TTL_S
        return self._addrs

    def release(self, conn: Connection) -> None:
        """A connection whose exchange ended cleanly: to the first waiter, else to the idle stack."""
        if conn.closed:
            return  # its slot is freed by connection_lost
        if self.closed:
            conn.close()
            return
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(conn)
                return
        conn.idle_since = self.loop.time()
        self._idle.append(conn)
        if self._sweep is None:
            self._schedule_sweep()

    def lost(self, conn: Connection) -> None:
        """`conn` closed (by either side): forget it and free its slot."""
        self._conns.discard(conn)
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        self._free_slot()

    def _free_slot(self) -> None:
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot moves to the waiter, `_open` unchanged
                return
        self._open -= 1

    def _schedule_sweep(self) -> None:
        if self._idle and not self.closed:
            when = self._idle[0].idle_since + self.client.keepalive_timeout_s
            # Its own empty context: the timer would otherwise keep the context (the call) of whoever
            # released the connection that scheduled it.
            self._sweep = self.loop.call_at(when, self._sweep_idle, context=contextvars.Context())

    def _sweep_idle(self) -> None:
        self._sweep = None
        deadline = self.loop.time() - self.client.keepalive_timeout_s
        idle = self._idle
        while idle and idle[0].idle_since <= deadline:
            self._retire(idle[0])
        self._schedule_sweep()

    def close(self) -> None:
        self.closed = True
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        self._idle.clear()
        for conn in list(self._conns):
            conn.abort()
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectError(f"{self.host}:{self.port}: HTTP client closed"))
