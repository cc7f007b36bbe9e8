"""A lean HTTP/1.1 client on asyncio protocols: the providers' only way to reach an upstream.

Why not aiohttp: on the benchmark machine one aiohttp `ClientSession.post` per gRPC call costs ~380-420 µs
of CPU over a bare grpc.aio echo server (bench/floor.py `proxy`), this client ~110 µs, most of it the
send/receive system calls; alone, 64 concurrent POSTs to nginx cost 95-115 µs of CPU each through
aiohttp and 17-35 µs through this client. An LLM call needs none of aiohttp's request/response objects,
header multidicts, stream readers and separate body write: this client does one `transport.write` per
request and parses the response in `data_received`, waking the caller once when the body comes with
the head.

Scope, deliberately small:
- POST with a `Content-Length` body; the request head is pre-encoded per `Endpoint` (method, path,
  Host, User-Agent, `Accept-Encoding: identity` and the provider's static headers: content type, auth)
  and only the length is formatted per request. Identity because a compressing server buffers SSE
  events (time to first token) and LLM replies are small; a server that compresses anyway (`gzip`,
  `deflate`) is decoded as the body is read, in steps of at most `DECODE_STEP` bytes so a compression
  bomb never inflates more than that at once; any other coding fails the read (`UnsupportedEncoding`).
- `read(limit)` refuses a body over `limit` bytes (after decoding): a `Content-Length` over it before
  any byte is read, otherwise as soon as the limit is passed; either way the connection is closed.
- Responses: status line and headers (names lowercased; only a few are ever looked at), bodies framed
  by Content-Length, chunked transfer coding (extensions and trailers skipped) or the end of the
  connection; 1xx interim responses skipped; `Connection: close` and HTTP/1.0 honoured.
- A keep-alive pool per (owner, scheme, host, port), the owner being the provider that opened the
  endpoint: at most its `max_connections` (default `max_per_host`; callers beyond it wait in FIFO
  order), idle connections reused last-in first-out and closed after `keepalive_timeout_s` idle; a
  connection the server closes while idle is discarded at once.
- Body chunks are delivered as they arrive (`async for chunk in response`); when the consumer lags more
  than `HIGH_WATER` bytes behind, the socket stops being read until it catches up.
- A response whose body was not read to the end is never pooled: `Response.close()` (and any failure or
  cancellation) aborts its connection, so the upstream sees the disconnect at once. A response read to
  the end returns its connection to the pool by itself, before the consumer has even looked at the data.
  A caller done with a body that has not quite ended (an SSE stream's last event came, the chunked
  terminator has not) can `release_after_end()`: the end is awaited briefly, then the connection pooled.
- TLS for https (`ssl.create_default_context()`, SNI, ALPN `http/1.1`), or a provider's own CA bundle and
  client certificate; an HTTP proxy per `Egress` (providers/egress.py): a CONNECT tunnel for https (TLS to
  the origin inside it), absolute-form requests for plain http. The pool key includes the egress, so a
  tunnelled connection only ever carries requests to its own origin. No redirects, no cookies, no request
  timeouts: callers bound calls with `asyncio.timeout`, and cancellation at any
  point (connect, TLS handshake, waiting for a connection, reading) closes what was opened.

Resending on a stale connection: a request sent on a *reused* connection that fails before a single
byte of the response arrived because the server closed that connection (EOF or reset) is sent once
more on a freshly opened one. That is the signature of the keep-alive race (the server's idle timeout
closed the connection as we reused it), in which the server never processed the request. POST is not
idempotent, and RFC 9112 §9.3.1 allows an automatic retry only when the client can tell the request was
not applied: a server that read the request and then died without answering would see it twice. For
this gateway that is acceptable: a completion has no side effect beyond its cost, and the engine retries
an `UPSTREAM_READ_ERROR` (the same failure on a fresh connection) anyway. Failures after a response byte
arrived, and failures on a fresh connection, are never resent here.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import ipaddress
import re
import socket
import ssl
import zlib
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Final, NoReturn, cast
from urllib.parse import quote, unquote, urlsplit

from feather_grpc.providers.egress import DIRECT, Egress, Proxy, tls_context

__all__ = [
    "HIGH_WATER",
    "AttemptMarker",
    "BodyTooLarge",
    "ConnectError",
    "Endpoint",
    "HttpClient",
    "HttpError",
    "InvalidURL",
    "ReadError",
    "Response",
    "UnsupportedEncoding",
    "attempt_headers",
    "attempt_marker",
    "encode_headers",
    "mark_sent",
]

HIGH_WATER: Final = 256 * 1024  # undelivered body bytes above which the socket is no longer read
END_GRACE_S: Final = 0.5  # how long `release_after_end` waits for the rest of a body before closing
MAX_HEAD: Final = 64 * 1024  # status line + headers (also bounds the trailer section)
MAX_LINE: Final = 8 * 1024  # one chunk-size line, extensions included
DECODE_STEP: Final = 256 * 1024  # most bytes one decompression step may produce
DNS_TTL_S: Final = 60.0

# Header lines ("Name: value\r\n" each, encoded) added to every request sent from the current context. The
# tracing observer puts an upstream attempt's W3C trace context here for the attempt's duration (see
# server/tracing.py); without tracing it stays empty and a request pays one context-variable read.
attempt_headers: ContextVar[bytes] = ContextVar("feather_attempt_headers", default=b"")

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _IDLE = range(8)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BAD_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class HttpError(Exception):
    """A transport-level failure (never an HTTP status: a response with any status is a success here)."""


class InvalidURL(HttpError):
    """The endpoint's URL cannot be used (scheme other than http/https, no host, bad port)."""


class ConnectError(HttpError):
    """No connection could be made (DNS, refused, unreachable, TLS handshake or certificate); nothing was sent."""


class ReadError(HttpError):
    """The connection failed or the response was malformed after the request was sent."""


class BodyTooLarge(ReadError):
    """The body is larger than the reader's limit; the connection was closed without reading the rest."""

    def __init__(self, limit: int, declared: int | None = None) -> None:
        said = f" (Content-Length {declared})" if declared is not None else ""
        super().__init__(f"response body over the {limit}-byte limit{said}")
        self.limit = limit


class UnsupportedEncoding(ReadError):
    """The body has a `Content-Encoding` this client cannot decode (it only asks for identity)."""


class _StaleConnection(ReadError):
    """A reused connection closed by the server before any byte of the response: safe to resend once."""


class Response:
    """One response: `status`, `reason`, `headers` (lowercase names), then the body, read once.

    Read the body with `read()` or `async for chunk in response`; always `close()` it (a no-op once the
    body was read to the end, which has already released the connection to the pool).
    """

    __slots__ = (
        "_buffered",
        "_coding",
        "_conn",
        "_decoder",
        "_done",
        "_drain",
        "_exc",
        "_got_bytes",
        "_parts",
        "_tail",
        "_waiter",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn  # set while the connection still carries this exchange
        self._parts: list[bytes] = []
        self._buffered = 0
        self._done = False  # the whole body has arrived
        self._drain: asyncio.TimerHandle | None = None  # set by release_after_end while the end is awaited
        self._exc: HttpError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._got_bytes = False
        self._coding = ""  # a Content-Encoding that cannot be decoded: reading the body fails
        self._decoder: zlib._Decompress | None = None  # gzip/deflate bodies
        self._tail = b""  # compressed bytes the last decoding step left for the next
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}

    @property
    def content_type(self) -> str:
        """The media type without parameters, lowercased (`application/octet-stream` when absent)."""
        raw = self.headers.get("content-type")
        if not raw:
            return "application/octet-stream"
        return raw.partition(";")[0].strip().lower()

    @property
    def complete(self) -> bool:
        """True once the body has arrived whole (any data not yet consumed is still readable)."""
        return self._done

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (what is left of it); over `limit` bytes, `BodyTooLarge` and the connection closed."""
        if limit is not None:
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:  # refused before reading a byte of it
                self._refuse(BodyTooLarge(limit, int(declared)))
        parts = self._parts
        if self._done and self._exc is None and self._decoder is None and not self._coding:
            # fast path: the body came with the head
            self._parts = []
            body = parts[0] if len(parts) == 1 else b"".join(parts)
            if limit is not None and len(body) > limit:
                raise BodyTooLarge(limit)
            return body
        out: list[bytes] = []
        size = 0
        async for chunk in self:
            size += len(chunk)
            if limit is not None and size > limit:
                self._refuse(BodyTooLarge(limit))
            out.append(chunk)
        return b"".join(out)

    def _refuse(self, exc: HttpError) -> NoReturn:
        """Stop reading: the connection is closed, what was buffered dropped, and `exc` raised."""
        self._parts = []
        self._buffered = 0
        self._tail = b""
        self._exc = exc
        self.close()
        raise exc

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        """Whatever body bytes have arrived since the last call (at least one byte), as one `bytes`."""
        while True:
            if self._coding:
                self._refuse(UnsupportedEncoding(f"response Content-Encoding {self._coding!r} cannot be decoded"))
            if self._tail:  # decode what the last step left before taking more
                chunk = self._decode(b"")
                if chunk:
                    return chunk
            parts = self._parts
            if parts:
                chunk = parts[0] if len(parts) == 1 else b"".join(parts)
                self._take()
                if self._decoder is None:
                    return chunk
                chunk = self._decode(chunk)
                if chunk:
                    return chunk
                continue
            if self._exc is not None:
                raise self._exc
            if self._done:
                if self._decoder is not None and not self._decoder.eof:
                    self._refuse(ReadError("compressed body ended before its end marker"))
                raise StopAsyncIteration
            await self._wait()

    def _decode(self, data: bytes) -> bytes:
        decoder = self._decoder
        assert decoder is not None
        if decoder.eof:
            return b""  # bytes after the compressed stream: ignored, like any reader of gzip does
        try:
            out = decoder.decompress(self._tail + data if self._tail else data, DECODE_STEP)
        except zlib.error as exc:
            self._refuse(ReadError(f"malformed compressed body: {exc}"))
        self._tail = decoder.unconsumed_tail
        return out

    def close(self) -> None:
        """Give the connection back if the body was read to the end, otherwise close it.

        After `release_after_end` this changes nothing: the connection is already on its way out.
        """
        if self._drain is not None:
            return
        conn = self._conn
        if conn is not None:
            self._conn = None
            if self._exc is None:
                self._exc = ReadError("response closed before its body was read")
            conn.abandon(self)

    def release_after_end(self, grace_s: float = END_GRACE_S) -> None:
        """The caller has everything it wants from the body (an SSE stream's last event, say), but the
        body may not have ended yet (the final chunk of a chunked body often comes in a later read).

        The rest of the body is discarded as it arrives; if it ends within `grace_s` the connection goes
        back to the pool (fully read, as always), otherwise it is closed then. Saves a new connection
        (a TLS handshake, for a real upstream) per stream.
        """
        conn = self._conn
        if conn is None or self._drain is not None:
            return
        self._parts = []
        self._buffered = 0
        self._drain = asyncio.get_running_loop().call_later(grace_s, self._drain_expired)
        if conn.paused:
            conn.resume()

    def _detach(self) -> None:
        """The exchange is over on the connection's side (body complete, or failed): no more connection,
        no drain timer; a reader waiting for data wakes to what is there."""
        self._conn = None
        if self._drain is not None:
            self._drain.cancel()
            self._drain = None
        self._wake()

    def _drain_expired(self) -> None:
        self._drain = None
        self.close()

    def _take(self) -> None:
        self._parts = []
        self._buffered = 0
        conn = self._conn
        if conn is not None and conn.paused:
            conn.resume()

    async def _wait(self) -> None:
        if self._conn is None:  # cannot happen: no connection means done, failed or closed
            raise ReadError("response has no connection")
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)


class _Connection(asyncio.Protocol):
    """One socket to one upstream: writes a request, parses its response into the current `Response`."""

    def __init__(self, pool: _Pool) -> None:
        self.pool = pool
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.owned = False  # the pool counts this connection in its open slots
        self.paused = False
        self.served = 0  # responses completed on this connection
        self.idle_since = 0.0
        self.ex: Response | None = None
        self._state = _IDLE
        self._buf = b""
        self._remaining = 0
        self._keep_alive = True

    # -- used by the pool and the endpoint --

    def send(self, data: bytes, ex: Response) -> None:
        self.ex = ex
        self._state = _HEAD
        self._buf = b""
        assert self.transport is not None
        self.transport.write(data)

    def abandon(self, ex: Response) -> None:
        """The exchange `ex` is given up half-way: close the connection (it can never be reused)."""
        if self.ex is ex:
            self.ex = None
        self.abort()

    def abort(self) -> None:
        self._state = _IDLE
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.abort()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()

    def resume(self) -> None:
        self.paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not `asyncio.Transport` subclasses, but have the same methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.ex is not None:
            self._end_of_stream(exc)
        if self.owned:
            self.owned = False
            self.pool.lost(self)

    def eof_received(self) -> bool:
        self.closed = True  # the transport closes itself now; nobody may pick it from the pool meanwhile
        if self.ex is not None:
            self._end_of_stream(None)
        return False  # close the transport

    def data_received(self, data: bytes) -> None:
        ex = self.ex
        if ex is None:
            # Bytes on an idle connection (a late `408`, garbage): it is no longer in a known state.
            self.abort()
            return
        ex._got_bytes = True
        if self._state == _LENGTH:  # the common case first
            remaining = self._remaining
            size = len(data)
            if size < remaining:
                self._remaining = remaining - size
                self._deliver(ex, data)
                return
            if size > remaining:
                self._keep_alive = False  # bytes past the declared length: the connection is unreliable
                data = data[:remaining]
            self._remaining = 0
            self._deliver(ex, data)
            self._complete(ex)
            return
        if self._state == _HEAD:
            self._head(ex, data)
        elif self._state == _UNTIL_CLOSE:
            self._deliver(ex, data)
        elif self._state != _IDLE:
            self._chunked(ex, data)

    # -- parsing --

    def _head(self, ex: Response, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        while True:
            end = buf.find(b"\r\n\r\n")
            sep = 4
            lf = buf.find(b"\n\n", 0, end if end >= 0 else len(buf))  # tolerate bare LF line endings
            if lf >= 0:
                end, sep = lf, 2
            if end < 0:
                if len(buf) > MAX_HEAD:
                    self._fail(ex, ReadError("response head too large"))
                else:
                    self._buf = buf
                return
            if end > MAX_HEAD:
                self._fail(ex, ReadError("response head too large"))
                return
            try:
                status = self._parse_head(ex, buf[:end])
            except ValueError as exc:
                self._fail(ex, ReadError(f"malformed response head: {exc}"))
                return
            buf = buf[end + sep :]
            if 100 <= status < 200 and status != 101:
                continue  # an interim response (100 Continue, 103 Early Hints): the real one follows
            break
        self._buf = b""
        if status == 101:
            self._fail(ex, ReadError("unexpected 101 Switching Protocols"))
            return
        ex._wake()  # the head is there
        if self._state == _IDLE:  # no body
            if buf:
                self._keep_alive = False
            self._complete(ex)
        elif buf:
            self.data_received(buf)

    def _parse_head(self, ex: Response, head: bytes) -> int:
        lines = head.decode("latin-1").split("\n")
        version, _, rest = lines[0].rstrip("\r").partition(" ")
        code, _, reason = rest.partition(" ")
        if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
            raise ValueError(f"status line {lines[0][:80]!r}")
        status = int(code)
        headers: dict[str, str] = {}
        name = ""
        for raw in lines[1:]:
            line = raw.rstrip("\r")
            if line[:1] in (" ", "\t"):  # obsolete line folding: continues the previous value
                if not name:
                    raise ValueError("folded first header line")
                headers[name] = f"{headers[name]} {line.strip()}".strip()
                continue
            key, colon, value = line.partition(":")
            if not colon:
                raise ValueError(f"header line {line[:80]!r}")
            name = key.strip().lower()
            value = value.strip()
            if name in headers:
                headers[name] = f"{headers[name]}, {value}"
            else:
                headers[name] = value
        ex.status = status
        ex.reason = reason.strip()
        ex.headers = headers
        if status < 200:
            return status  # interim: framing and keep-alive come from the final response
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip", "deflate"):
            ex._decoder = zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib wrapper, detected
        elif encoding not in ("", "identity"):
            ex._coding = encoding[:40]
        tokens = headers.get("connection", "").lower()
        if version == "HTTP/1.0":
            self._keep_alive = "keep-alive" in tokens
        else:
            self._keep_alive = "close" not in tokens
        if status in (204, 304):
            self._state = _IDLE
            return status
        coding = headers.get("transfer-encoding")
        if coding is not None:
            if coding.rpartition(",")[2].strip().lower() == "chunked":
                self._state = _CHUNK_SIZE
            else:
                self._state = _UNTIL_CLOSE
                self._keep_alive = False
            return status
        length = headers.get("content-length")
        if length is not None:
            values = {v.strip() for v in length.split(",")}
            if len(values) != 1:
                raise ValueError("conflicting content-length values")
            value = values.pop()
            if not value.isdigit() or not value.isascii():
                raise ValueError(f"content-length {value[:20]!r}")
            self._remaining = int(value)
            self._state = _LENGTH if self._remaining else _IDLE
            return status
        self._state = _UNTIL_CLOSE
        self._keep_alive = False
        return status

    def _chunked(self, ex: Response, data: bytes) -> None:
        buf = self._buf + data if self._buf else data
        self._buf = b""
        pos = 0
        size = len(buf)
        out: list[bytes] = []
        finished = False
        while pos < size:
            state = self._state
            if state == _CHUNK_DATA:
                take = min(self._remaining, size - pos)
                out.append(buf[pos : pos + take] if pos or take != size else buf)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._state = _CHUNK_CRLF
            elif state in (_CHUNK_SIZE, _TRAILERS):
                eol = buf.find(b"\n", pos)
                if eol < 0:
                    if size - pos > (MAX_LINE if state == _CHUNK_SIZE else MAX_HEAD):
                        self._fail(ex, ReadError("chunk-size line or trailers too long"))
                        return
                    break
                line = buf[pos:eol].rstrip(b"\r")
                pos = eol + 1
                if state == _TRAILERS:
                    if line:
                        continue  # trailer fields: nothing here needs them
                    finished = True
                    break
                digits = line.partition(b";")[0].strip()
                if _HEX.fullmatch(digits) is None:
                    self._fail(ex, ReadError(f"bad chunk size {bytes(line[:40])!r}"))
                    return
                chunk = int(digits, 16)
                if chunk:
                    self._remaining = chunk
                    self._state = _CHUNK_DATA
                else:
                    self._state = _TRAILERS
            else:  # _CHUNK_CRLF: the line break after a chunk's data
                if buf[pos : pos + 1] == b"\n":
                    pos += 1
                    self._state = _CHUNK_SIZE
                elif buf[pos : pos + 2] == b"\r\n":
                    pos += 2
                    self._state = _CHUNK_SIZE
                elif size - pos < 2 and buf[pos : pos + 1] == b"\r":
                    break  # the `\n` comes in the next read
                else:
                    self._fail(ex, ReadError("chunk data not followed by CRLF"))
                    return
        if out:
            self._deliver(ex, out[0] if len(out) == 1 else b"".join(out))
        if finished:
            if pos < size:
                self._keep_alive = False  # bytes after the last chunk: unreliable
            self._complete(ex)
        elif pos < size:
            self._buf = buf[pos:]

    def _deliver(self, ex: Response, data: bytes) -> None:
        if not data or ex._drain is not None:  # nothing, or nobody reads it any more
            return
        ex._parts.append(data)
        ex._buffered += len(data)
        ex._wake()
        if ex._buffered > HIGH_WATER and not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def _complete(self, ex: Response) -> None:
        """The body has arrived whole: hand the connection back (or close it) before anyone reads it."""
        self.ex = None
        self._state = _IDLE
        ex._done = True
        ex._detach()
        self.served += 1
        if self.paused:
            self.resume()
        if self._keep_alive and not self.closed:
            self.pool.release(self)
        else:
            self.close()

    def _fail(self, ex: Response, exc: HttpError) -> None:
        self.ex = None
        if ex._exc is None:
            ex._exc = exc
        ex._detach()
        self.abort()

    def _end_of_stream(self, exc: Exception | None) -> None:
        ex = self.ex
        assert ex is not None
        if self._state == _UNTIL_CLOSE and exc is None and not self.pool.closed:
            self._keep_alive = False
            self._complete(ex)
            return
        if self.pool.closed:
            err: HttpError = ReadError("HTTP client closed")
        elif not ex._got_bytes:
            what = f"server closed the connection before responding ({_describe(exc)})"
            err = _StaleConnection(what) if self.served else ReadError(what)
        else:
            err = ReadError(f"connection closed before the response was complete ({_describe(exc)})")
        self._fail(ex, err)


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "EOF"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Pool:
    """The connections to one (scheme, host, port), made one way (`Egress`: proxy, TLS trust and identity)."""

    def __init__(
        self, client: HttpClient, scheme: str, host: str, port: int, max_connections: int, egress: Egress = DIRECT
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
        self._idle: collections.deque[_Connection] = collections.deque()  # oldest left, newest right
        self._conns: set[_Connection] = set()
        self._open = 0  # connections open or being opened, plus slots handed to waiters
        self._waiters: collections.deque[asyncio.Future[_Connection | None]] = collections.deque()
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

    async def acquire(self, *, fresh: bool = False) -> _Connection:
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
            waiter: asyncio.Future[_Connection | None] = self.loop.create_future()
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

    def _retire(self, conn: _Connection, *, free: bool = True) -> None:
        """Close `conn` now and stop counting it; `free=False` keeps its slot for the caller."""
        with contextlib.suppress(ValueError):
            self._idle.remove(conn)
        if conn.owned:
            conn.owned = False
            self._conns.discard(conn)
            if free:
                self._free_slot()
        conn.abort()

    async def _connect_slot(self) -> _Connection:
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

    async def _connect(self) -> _Connection:
        addrs = await self._resolve()
        try:
            ctx = self.client.ssl_context(self.egress) if self.tls else None
        except OSError as exc:  # the provider's CA bundle or certificate, gone or changed since the config loaded
            raise ConnectError(f"cannot use the TLS files for {self.host}: {_describe(exc)}") from exc
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
        raise ConnectError(f"cannot connect to {self.host}:{self.port}{via}{tls}: {_describe(last)}")

    async def _open_socket(
        self, family: int, type_: int, proto: int, sockaddr: tuple[object, ...], ctx: ssl.SSLContext | None
    ) -> _Connection:
        loop = self.loop
        sock = socket.socket(family, type_, proto)
        try:
            sock.setblocking(False)
            if family in (socket.AF_INET, socket.AF_INET6):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            await loop.sock_connect(sock, sockaddr)
            if self.proxy is not None and ctx is not None:
                await _tunnel(loop, sock, self.proxy, self.host, self.port, self.client.user_agent)
            conn = _Connection(self)
            transport, _ = await loop.create_connection(
                lambda: conn, sock=sock, ssl=ctx, server_hostname=self.host if ctx is not None else None
            )
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
            raise ConnectError(f"cannot resolve {what}: {_describe(exc)}") from exc
        if not infos:
            raise ConnectError(f"cannot resolve {what}: no addresses")
        self._addrs = [(family, type_, proto, tuple(addr)) for family, type_, proto, _, addr in infos]
        self._addrs_until = now + DNS_TTL_S
        return self._addrs

    def release(self, conn: _Connection) -> None:
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

    def lost(self, conn: _Connection) -> None:
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
            self._sweep = self.loop.call_at(when, self._sweep_idle)

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


async def _tunnel(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, proxy: Proxy, host: str, port: int, user_agent: str
) -> None:
    """Asks the proxy on the connected `sock` for a tunnel to `host`:`port` (HTTP CONNECT, RFC 9110 §9.3.6).
    On return the socket is a byte pipe to the origin, ready for the TLS handshake. A refusal (407, 403,
    502...) is a `ConnectError` naming the proxy's status, never its credentials."""
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}", f"User-Agent: {user_agent}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    head = b""
    while True:
        end, sep = head.find(b"\r\n\r\n"), 4
        if end < 0:
            end, sep = head.find(b"\n\n"), 2  # tolerate bare LF line endings, as for responses
        if end >= 0:
            break
        if len(head) > MAX_HEAD:
            raise ConnectError(f"proxy {proxy}: CONNECT reply head too large")
        data = await loop.sock_recv(sock, 4096)
        if not data:
            raise ConnectError(f"proxy {proxy} closed the connection instead of answering CONNECT {authority}")
        head += data
    status_line = head[: head.find(b"\n")].rstrip(b"\r").decode("latin-1")
    version, _, rest = status_line.partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ConnectError(f"proxy {proxy}: malformed CONNECT reply {status_line[:80]!r}")
    if not 200 <= int(code) < 300:
        raise ConnectError(f"proxy {proxy} refused CONNECT {authority}: {code} {reason.strip()[:100]}".rstrip())
    if len(head) > end + sep:  # the origin cannot have spoken: TLS starts with our ClientHello
        raise ConnectError(f"proxy {proxy}: unexpected data after the CONNECT reply")


def _proxy_refused(proxy: Proxy, ex: Response) -> ConnectError:
    """A plain-http request the proxy would not forward: the same failure as a refused CONNECT, not an upstream
    reply (a 407 is about the gateway's proxy credentials, never the caller's request)."""
    return ConnectError(f"proxy {proxy} refused the request: {ex.status} {ex.reason[:100]}".rstrip())


class AttemptMarker:
    """Set (`attempt_marker`) around one upstream attempt by the engine; `sent` turns true once the request
    is on its way to the upstream, so an attempt the gateway abandons is billed only if the upstream got it."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        self.sent = False


attempt_marker: ContextVar[AttemptMarker | None] = ContextVar("feather_attempt_marker", default=None)


def mark_sent() -> None:
    marker = attempt_marker.get()
    if marker is not None:
        marker.sent = True


class Endpoint:
    """POSTs to one URL with a fixed set of headers; the request head is encoded once, here."""

    __slots__ = ("_error", "_plain_proxy", "_pool", "_prefix", "url")

    def __init__(
        self,
        client: HttpClient,
        url: str,
        headers: Sequence[tuple[str, str]] = (),
        egress: Egress = DIRECT,
        *,
        owner: str = "",
        max_connections: int | None = None,
    ) -> None:
        self.url = url
        self._error: InvalidURL | None = None
        self._plain_proxy: Proxy | None = None  # the proxy plain-http requests go through (in absolute form)
        self._pool: _Pool | None = None
        self._prefix = b""
        try:
            scheme, host, port, target, auth = _split_url(url)
        except ValueError as exc:
            self._error = InvalidURL(f"invalid URL: {exc}")
            return
        self._pool = client._pool(owner, scheme, host, port, max_connections or client.max_per_host, egress)
        default_port = 443 if scheme == "https" else 80
        host_header = f"[{host}]" if ":" in host else host
        if port != default_port:
            host_header = f"{host_header}:{port}"
        proxy = self._plain_proxy = egress.proxy if scheme == "http" else None  # https: tunnelled, origin-form
        if proxy is not None:
            target = f"http://{host_header}{target}"  # absolute form: the proxy forwards it
        fields: list[tuple[str, str]] = [
            ("Host", host_header),
            ("User-Agent", client.user_agent),
            ("Accept-Encoding", "identity"),
        ]
        names = {"host", "user-agent", "accept-encoding"}
        for name, value in headers:
            if _TOKEN.fullmatch(name) is None or _BAD_VALUE.search(value) is not None:
                raise ValueError(f"invalid HTTP header {name!r}")
            lower = name.lower()
            if lower in ("content-length", "transfer-encoding", "connection"):
                raise ValueError(f"header {name!r} is set by the HTTP client")
            if lower in names:
                fields = [f for f in fields if f[0].lower() != lower]  # the caller's value wins
            names.add(lower)
            fields.append((name, value.strip()))
        if auth and "authorization" not in names:
            fields.append(("Authorization", f"Basic {base64.b64encode(auth.encode()).decode()}"))
        if proxy is not None and proxy.authorization:
            fields.append(("Proxy-Authorization", proxy.authorization))
        lines = [f"POST {target} HTTP/1.1", *(f"{n}: {v}" for n, v in fields), "Content-Length: "]
        self._prefix = "\r\n".join(lines).encode("utf-8")

    async def request(self, body: bytes, headers: bytes = b"") -> Response:
        """Send `body` and wait for the response head. The caller must `close()` the response.

        `headers`: encoded header lines ("Name: value\\r\\n" each) for this request alone, such as a
        short-lived bearer token or a request signature; the caller makes them (see `encode_headers`)."""
        pool = self._pool
        if pool is None:
            assert self._error is not None
            raise self._error
        data = b"".join((self._prefix, b"%d\r\n" % len(body), headers, attempt_headers.get(), b"\r\n", body))
        conn = await pool.acquire()
        resent = False
        while True:
            ex = Response(conn)
            try:
                if conn.closed:  # closed between hand-over and now
                    raise _StaleConnection("server closed the connection before the request was sent")
                conn.send(data, ex)
                mark_sent()
                if not ex.status and ex._exc is None:
                    await ex._wait()
                if ex._exc is not None:
                    raise ex._exc
                if ex.status == 407 and self._plain_proxy is not None:
                    raise _proxy_refused(self._plain_proxy, ex)
                return ex
            except _StaleConnection:
                ex.close()
                if resent:
                    raise
                resent = True
                conn = await pool.acquire(fresh=True)
            except BaseException:
                ex.close()  # cancelled or failed before the head: never reuse this connection
                raise


def encode_headers(headers: Sequence[tuple[str, str]]) -> bytes:
    """Per-request header lines for `Endpoint.request`, checked as the endpoint's own are."""
    out = []
    for name, value in headers:
        if _TOKEN.fullmatch(name) is None or _BAD_VALUE.search(value) is not None:
            raise ValueError(f"invalid HTTP header {name!r}")
        out.append(f"{name}: {value.strip()}\r\n")
    return "".join(out).encode("utf-8")


def _split_url(url: str) -> tuple[str, str, int, str, str]:
    parts = urlsplit(url.strip())
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise ValueError(f"scheme {parts.scheme!r} (http or https expected)")
    host = parts.hostname
    if not host:
        raise ValueError("no host")
    port = parts.port  # raises ValueError when out of range or not a number
    if port is None:
        port = 443 if scheme == "https" else 80
    target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=-._~")
    if parts.query:
        target += "?" + quote(parts.query, safe="/%:@!$&'()*+,;=-._~?")
    auth = ""
    if parts.username is not None:
        auth = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
    return scheme, host, port, target, auth


class HttpClient:
    """The pools every provider shares. Create it in the running loop; the owner `await close()`s it."""

    def __init__(
        self,
        *,
        max_per_host: int = 1000,
        keepalive_timeout_s: float = 30.0,
        user_agent: str = "feather-grpc",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_per_host < 1:
            raise ValueError("max_per_host must be at least 1")
        self.max_per_host = max_per_host
        self.keepalive_timeout_s = keepalive_timeout_s
        self.user_agent = user_agent
        self._ssl = ssl_context
        self._tls: dict[tuple[str | None, str | None, str | None], ssl.SSLContext] = {}
        self._pools: dict[tuple[str, str, str, int, Egress], _Pool] = {}
        self.closed = False

    def endpoint(
        self,
        url: str,
        headers: Sequence[tuple[str, str]] = (),
        egress: Egress = DIRECT,
        *,
        owner: str = "",
        max_connections: int | None = None,
    ) -> Endpoint:
        """A POST target, reached the way `egress` says. Bad headers raise `ValueError` here; a bad URL fails
        each request instead.

        Endpoints of one `owner` (a provider) to one host share a pool of at most `max_connections`
        (default `max_per_host`; the first endpoint of a pool sets it): one provider's limit is its own,
        whoever else calls the same host."""
        if max_connections is not None and max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        return Endpoint(self, url, headers, egress, owner=owner, max_connections=max_connections)

    def ssl_context(self, egress: Egress = DIRECT) -> ssl.SSLContext:
        """The client's default context, or the one made from `egress`'s CA bundle and client certificate
        (built once per set of files; the config checked them at load)."""
        if egress.custom_tls:
            files = (egress.ca_file, egress.client_cert_file, egress.client_key_file)
            ctx = self._tls.get(files)
            if ctx is None:
                ctx = self._tls[files] = tls_context(*files)
            return ctx
        if self._ssl is None:
            ctx = ssl.create_default_context()
            ctx.set_alpn_protocols(["http/1.1"])
            self._ssl = ctx
        return self._ssl

    def _pool(
        self, owner: str, scheme: str, host: str, port: int, max_connections: int, egress: Egress = DIRECT
    ) -> _Pool:
        key = (owner, scheme, host.lower(), port, egress)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool(self, scheme, key[2], port, max_connections, egress)
            if self.closed:
                pool.close()
        return pool

    def connections(self, owner: str | None = None) -> int:
        """Open connections across all pools (idle or busy), or across `owner`'s."""
        return sum(len(p._conns) for key, p in self._pools.items() if owner is None or key[0] == owner)

    def idle_connections(self) -> int:
        return sum(len(p._idle) for p in self._pools.values())

    async def close(self) -> None:
        """Close every connection, idle or busy; requests still running fail with a `ReadError`."""
        self.closed = True
        for pool in self._pools.values():
            pool.close()
        await asyncio.sleep(0)  # let the transports run connection_lost
