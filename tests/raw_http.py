"""A scripted HTTP/1.1 server for the HTTP client tests (tests/test_http_transport.py, the own client's
internals; tests/test_http_conformance.py, what every implementation guarantees): `RawServer` runs a handler
per request that writes whatever bytes it likes, and counts connections, requests and disconnects
server-side."""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

OK_BODY = b'{"ok":true}'


def ok(body: bytes = OK_BODY, *extra: str) -> bytes:
    head = ["HTTP/1.1 200 OK", "Content-Type: application/json", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def chunked(pieces: list[bytes], trailers: str = "") -> bytes:
    out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/event-stream\r\n\r\n"
    for i, piece in enumerate(pieces):
        ext = ";name=value" if i % 2 else ""
        out += f"{len(piece):X}{ext}\r\n".encode() + piece + b"\r\n"
    return out + b"0\r\n" + trailers.encode() + b"\r\n"


@dataclass
class Req:
    conn: int  # index of the server-side connection, in accept order
    head: bytes
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter


Handler = Callable[[Req], Awaitable[bool | None]]  # return False to close the connection after it


@dataclass
class RawServer:
    handler: Handler
    ssl_context: ssl.SSLContext | None = None
    connections: int = 0
    disconnects: int = 0
    requests: list[Req] = field(default_factory=list)
    port: int = 0
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        host = "localhost" if self.ssl_context else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}/v1/chat"

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self._server.wait_closed()

    async def wait_for(self, done: Callable[[], bool], timeout_s: float = 2.0) -> None:
        async with asyncio.timeout(timeout_s):
            while not done():
                self.changed.clear()
                await self.changed.wait()

    def _note(self) -> None:
        self.changed.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = self.connections
        self.connections += 1
        self._note()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                req = Req(index, head, body, reader, writer)
                self.requests.append(req)
                self._note()
                if await self.handler(req) is False:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()
            self.disconnects += 1
            self._note()


async def until_client_gone(req: Req) -> None:
    """Hold the response, reading, so the server notices when the client closes the connection."""
    with contextlib.suppress(ConnectionError):
        while await req.reader.read(65536):
            pass


async def settle() -> None:
    """Let closed transports run `connection_lost` (scheduled with `call_soon`)."""
    for _ in range(3):
        await asyncio.sleep(0)


async def reply(req: Req, data: bytes, *, pieces: int = 1, delay_s: float = 0.0, seed: int = 0) -> None:
    """Write `data`, cut into `pieces` random pieces sent `delay_s` apart (so each is its own read)."""
    if pieces <= 1:
        req.writer.write(data)
        await req.writer.drain()
        return
    cuts = sorted(random.Random(seed).sample(range(1, len(data)), min(pieces - 1, len(data) - 1)))
    start = 0
    for cut in [*cuts, len(data)]:
        req.writer.write(data[start:cut])
        await req.writer.drain()
        start = cut
        await asyncio.sleep(delay_s)


def make_tls_files(d: Path, names: str = "DNS:localhost,IP:127.0.0.1") -> tuple[Path, Path]:
    """A self-signed certificate for `names` (a subjectAltName value), and its key, in `d`."""
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=localhost",
            "-addext", f"subjectAltName={names}", "-keyout", "key.pem", "-out", "cert.pem",
        ],
        cwd=d, check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return d / "cert.pem", d / "key.pem"


def server_tls(tls_files: tuple[Path, Path]) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*tls_files)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    return ctx
