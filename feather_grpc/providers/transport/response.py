"""A response of the own HTTP client: the head, then the body as the connection delivers it (decoded,
bounded, with backpressure), and the rules for giving its connection back."""

from __future__ import annotations

import asyncio
from typing import Final, NoReturn, Protocol

from feather_grpc.core.http_client import BodyTooLarge, HttpError, ReadError, media_type
from feather_grpc.providers.content_coding import Decoder, unsupported

__all__ = ["END_GRACE_S", "Carrier", "Response"]

END_GRACE_S: Final = 0.5  # how long `release_after_end` waits for the rest of a body before closing


class Carrier(Protocol):
    """What a response needs of the connection that delivers it (connection.py's `Connection`, which imports
    this module: the response names only this, so the two do not import each other)."""

    paused: bool

    def resume(self) -> None: ...

    def abandon(self, ex: Response) -> None: ...


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
        "_loop",
        "_parts",
        "_waiter",
        "headers",
        "reason",
        "status",
    )

    def __init__(self, conn: Carrier) -> None:
        self._conn: Carrier | None = conn  # set while the connection still carries this exchange
        # Looked up at the first wait, then kept: on Python 3.11 every get_running_loop() is a getpid()
        # syscall, and a stream waits for its body once per event.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parts: list[bytes] = []
        self._buffered = 0
        self._done = False  # the whole body has arrived
        self._drain: asyncio.TimerHandle | None = None  # set by release_after_end while the end is awaited
        self._exc: HttpError | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._got_bytes = False
        self._coding = ""  # a Content-Encoding that cannot be decoded: reading the body fails
        self._decoder: Decoder | None = None  # gzip/deflate bodies
        self.status = 0
        self.reason = ""
        self.headers: dict[str, str] = {}

    @property
    def content_type(self) -> str:
        """The media type without parameters, lowercased (`application/octet-stream` when absent)."""
        return media_type(self.headers)

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
        self._decoder = None  # what it held is dropped
        self._exc = exc
        self.close()
        raise exc

    def __aiter__(self) -> Response:
        return self

    async def __anext__(self) -> bytes:
        """Whatever body bytes have arrived since the last call (at least one byte), as one `bytes`."""
        while True:
            if self._coding:
                self._refuse(unsupported(self._coding))
            if self._decoder is not None and self._decoder.tail:  # decode what the last step left first
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
                if self._decoder is not None:
                    try:
                        self._decoder.check_end()
                    except ReadError as exc:
                        self._refuse(exc)
                raise StopAsyncIteration
            await self._wait()

    def _decode(self, data: bytes) -> bytes:
        assert self._decoder is not None
        try:
            return self._decoder.decode(data)
        except ReadError as exc:
            self._refuse(exc)

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

    def _wait(self) -> asyncio.Future[None]:
        """What to await for the next news of the body (data, its end, an error): a future `_wake` resolves.

        A plain function returning the future, not a coroutine: a stream waits once per event, and a
        coroutine would add a frame to each wait. A waiter whose reader was cancelled is done, so `_wake`
        skips it, and the next wait replaces it."""
        if self._conn is None:  # cannot happen: no connection means done, failed or closed
            raise ReadError("response has no connection")
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        return waiter

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
