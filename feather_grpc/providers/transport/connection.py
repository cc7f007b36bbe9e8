"""One HTTP/1.1 connection of the own client: an asyncio protocol that writes a request and parses its
response (head, Content-Length, chunked or until-close bodies) straight into the current `Response`."""

from __future__ import annotations

import asyncio
import contextvars
import re
from typing import Final, Protocol, cast

from feather_grpc.core.http_client import HttpError, ReadError
from feather_grpc.providers.content_coding import decoder_for
from feather_grpc.providers.transport.response import Response

__all__ = ["HIGH_WATER", "MAX_HEAD", "MAX_LINE", "Connection", "Owner", "StaleConnection", "describe"]

HIGH_WATER: Final = 256 * 1024  # undelivered body bytes above which the socket is no longer read
MAX_HEAD: Final = 64 * 1024  # status line + headers (also bounds the trailer section)
MAX_LINE: Final = 8 * 1024  # one chunk-size line, extensions included

_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILERS, _UNTIL_CLOSE, _IDLE = range(8)
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")


class StaleConnection(ReadError):
    """A reused connection closed by the server before any byte of the response: safe to resend once."""


class Owner(Protocol):
    """What a connection needs of the pool that owns it (pool.py's `Pool`, which imports this module: the
    connection names only this, so the two do not import each other)."""

    closed: bool

    def release(self, conn: Connection) -> None: ...

    def lost(self, conn: Connection) -> None: ...


class Connection(asyncio.Protocol):
    """One socket to one upstream: writes a request, parses its response into the current `Response`."""

    def __init__(self, pool: Owner) -> None:
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
            # asyncio's transports register a new reader handle here, in the current context: the reader of
            # a slow body (a call) would then be the context every later read of this pooled connection
            # runs in, keeping that call alive (see Pool._open_socket). So: in an empty context.
            contextvars.Context().run(self.transport.resume_reading)

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
        encoding = headers.get("content-encoding")
        if encoding:
            ex._decoder, ex._coding = decoder_for(encoding)
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
        if self._state == _CHUNK_SIZE and not self._buf:
            # The usual read of a streamed body: one whole chunk, `<hex size>\r\n<data>\r\n`, taken in one
            # step; anything else (several chunks, a part of one, extensions, the last chunk) below.
            eol = data.find(b"\r\n", 0, 18)
            if eol > 0 and data[-2:] == b"\r\n" and _HEX.fullmatch(data, 0, eol) is not None:
                size = int(data[:eol], 16)
                if size and len(data) == eol + 2 + size + 2:
                    self._deliver(ex, data[eol + 2 : -2])
                    return
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
            what = f"server closed the connection before responding ({describe(exc)})"
            err = StaleConnection(what) if self.served else ReadError(what)
        else:
            err = ReadError(f"connection closed before the response was complete ({describe(exc)})")
        self._fail(ex, err)


def describe(exc: BaseException | None) -> str:
    if exc is None:
        return "EOF"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
