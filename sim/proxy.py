"""A small forward HTTP proxy for tests: CONNECT tunnels (https) and absolute-form requests (plain http).

Like a corporate egress proxy, it may demand credentials (`Proxy-Authorization: Basic`, else 407) and it
resolves names the client cannot: `hosts` maps a name to the address only the proxy reaches (a name
under `.invalid` never resolves anywhere else, RFC 6761). Names not in `hosts` get 502.

    async with ConnectProxy(hosts={"llm.corp.invalid": "127.0.0.2"}, credentials=("u", "p")) as proxy:
        ...  # HTTPS_PROXY=proxy.url_with("u", "p")
    proxy.tunnels  # ["llm.corp.invalid:8443", ...], one per CONNECT accepted

A plain-http request is forwarded on a new connection with `Connection: close` (both ways), then the
reply is piped back as it comes (streams included): simple, and enough for the gateway's client, which
honours `Connection: close`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

__all__ = ["ConnectProxy", "ProxiedRequest"]


@dataclass(slots=True)
class ProxiedRequest:
    method: str
    target: str  # as the client sent it: "host:port" for CONNECT, an absolute URL otherwise
    headers: dict[str, str]  # lowercase names
    status: int  # what the proxy answered (200 for a tunnel it opened, or its refusal)


@dataclass
class ConnectProxy:
    hosts: Mapping[str, str] = field(default_factory=dict)
    credentials: tuple[str, str] | None = None
    port: int = 0
    requests: list[ProxiedRequest] = field(default_factory=list)
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url_with(self, user: str, password: str) -> str:
        return f"http://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{self.port}"

    @property
    def tunnels(self) -> list[str]:
        return [r.target for r in self.requests if r.method == "CONNECT" and r.status == 200]

    async def __aenter__(self) -> ConnectProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self._server.wait_closed()

    def _authorized(self, headers: Mapping[str, str]) -> bool:
        if self.credentials is None:
            return True
        expected = base64.b64encode(":".join(self.credentials).encode()).decode()
        return headers.get("proxy-authorization", "") == f"Basic {expected}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            first, *lines = head.decode("latin-1").split("\r\n")
            method, target, _ = first.split(" ", 2)
            headers = {}
            for line in lines:
                name, colon, value = line.partition(":")
                if colon:
                    headers[name.strip().lower()] = value.strip()
            request = ProxiedRequest(method, target, headers, 0)
            self.requests.append(request)
            if not self._authorized(headers):
                request.status = 407
                writer.write(b'HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm="t"\r\n')
                writer.write(b"Content-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
            else:
                parts = urlsplit(target)
                host, port = parts.hostname or "", str(parts.port or 80)
            address = self.hosts.get(host.strip("[]").lower())
            if address is None:
                request.status = 502
                writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection(address, int(port))
            try:
                request.status = 200
                if method == "CONNECT":
                    writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    await writer.drain()
                else:
                    up_writer.write(_origin_form(method, target, lines))
                    length = int(headers.get("content-length", "0"))
                    up_writer.write(await reader.readexactly(length))
                    await up_writer.drain()
                await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
            finally:
                up_writer.close()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        finally:
            self._tasks.discard(task)
            writer.close()


def _origin_form(method: str, target: str, lines: list[str]) -> bytes:
    """The request as the origin should see it: origin-form target, no proxy headers, one request only."""
    parts = urlsplit(target)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    skip = ("proxy-authorization", "proxy-connection", "connection")
    kept = [line for line in lines if line and line.partition(":")[0].strip().lower() not in skip]
    return "\r\n".join([f"{method} {path} HTTP/1.1", *kept, "Connection: close", "", ""]).encode("latin-1")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        # A reset on one side resets the other, as a real proxy does: half-closing it instead (or nothing)
        # left the client waiting forever on a tunnel whose origin had reset it (an origin that refuses a
        # TLS client certificate and closes with the client's request unread in its socket sends a RST).
        writer.transport.abort()
        return
    if writer.can_write_eof():
        with contextlib.suppress(ConnectionError):
            writer.write_eof()
