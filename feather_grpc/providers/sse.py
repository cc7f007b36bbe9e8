"""Incremental Server-Sent Events parser: feed it network reads, get whole events back.

Follows the WHATWG event-stream rules the providers rely on: lines end with `\\n`, `\\r\\n` or `\\r`;
a blank line ends an event; `data:` lines of one event are joined with `\\n`; one space after the colon
is dropped; lines starting with `:` are comments. A read may end anywhere (mid-line, mid-UTF-8
sequence, between `\\r` and `\\n`), so bytes are buffered until a whole line is present, and only
whole lines are decoded (line terminators are ASCII, so a whole line is whole UTF-8).
"""

from __future__ import annotations

from typing import NamedTuple

from feather_grpc.core.upstream import DEFAULT_MAX_EVENT_BYTES

__all__ = ["SSEEvent", "SSELimitExceeded", "SSEParser"]


class SSEEvent(NamedTuple):
    """One event. A named tuple, not a frozen dataclass: made once per upstream event, and a frozen
    dataclass's `__init__` (an `object.__setattr__` per field) costs about twice as much."""

    data: str
    event: str = ""  # "" when the event had no `event:` field (the spec's default "message")
    id: str = ""


class SSELimitExceeded(ValueError):
    """A line, or an event's fields, grew past the parser's limit; `what` says which."""

    def __init__(self, what: str, limit: int) -> None:
        super().__init__(f"{what} over the {limit}-byte limit")
        self.what = what
        self.limit = limit


class SSEParser:
    """Feed bytes with `feed()`; each call returns the events completed by those bytes.

    An event still incomplete when the stream ends is discarded, as the spec says: a stream cut
    mid-event must not look like a finished one.

    Memory is bounded by `max_event_bytes`: a line not ended within that many bytes, or an event whose
    `data`/`event`/`id` fields add up to more, raises `SSELimitExceeded` (an upstream sending one endless
    line must fail as soon as it passes the limit, not at a timeout). Work is linear in the bytes fed:
    an unfinished line is kept as a list of pieces, and only each new piece is searched.
    """

    __slots__ = (
        "_data",
        "_event",
        "_event_size",
        "_last_id",
        "_limit",
        "_pending",
        "_pending_size",
        "_skip_lf",
        "_started",
    )

    def __init__(self, max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self._limit = max_event_bytes
        self._pending: list[bytes] = []  # pieces of the line after the last line terminator seen
        self._pending_size = 0
        self._skip_lf = False  # the previous read ended with `\r`: a leading `\n` belongs to it
        self._started = False  # the byte-order mark is only stripped at the very start
        self._data: list[str] = []
        self._event = ""
        self._event_size = 0  # UTF-8 bytes of the current event's fields, for the limit
        self._last_id = ""

    @property
    def has_partial_event(self) -> bool:
        """True when bytes of an event that has not ended yet are buffered."""
        return bool(self._pending or self._data or self._event)

    def feed(self, chunk: bytes) -> list[SSEEvent]:
        if not chunk:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if chunk[0] == 10:  # b"\n"
                chunk = chunk[1:]
                if not chunk:
                    return []
        # Line endings are normalised per piece: what is pending already was, and a `\r\n` split
        # between two reads is handled by `_skip_lf`. (`13 in` is a memchr; `b"\r" in` costs 2-3x more.)
        if 13 in chunk:
            if chunk[-1] == 13:
                # The line has ended either way; remember to drop the `\n` if the next read starts with one.
                self._skip_lf = True
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        if chunk[-1] == 10 and not self._pending:
            # The usual read: whole lines, nothing pending. Decoded as is; the split's last item is the
            # empty "line" after the last terminator, dropped.
            lines = chunk.decode("utf-8", errors="replace").split("\n")
            lines.pop()
            self._pending_size = 0
        else:
            end = chunk.rfind(b"\n")
            if end < 0:
                self._pending.append(chunk)
                self._pending_size += len(chunk)
                if self._pending_size > self._limit:
                    raise SSELimitExceeded("a stream line", self._limit)
                return []
            rest = chunk[end + 1 :]
            if self._pending:
                self._pending.append(chunk)
                buf = b"".join(self._pending)
                end = len(buf) - len(rest) - 1
            else:
                buf = chunk
            self._pending = [rest] if rest else []
            self._pending_size = len(rest)
            if self._pending_size > self._limit:
                raise SSELimitExceeded("a stream line", self._limit)
            lines = buf[:end].decode("utf-8", errors="replace").split("\n")
        if not self._started:
            self._started = True
            if lines[0].startswith("\ufeff"):
                lines[0] = lines[0][1:]
        return self._events(lines)

    def _events(self, lines: list[str]) -> list[SSEEvent]:
        """The events these whole lines complete; the current event's fields are kept in locals meanwhile."""
        events: list[SSEEvent] = []
        limit = self._limit
        data, event, size = self._data, self._event, self._event_size
        for line in lines:
            if not line:
                if data:
                    events.append(SSEEvent("\n".join(data), event, self._last_id))
                    data = []
                event = ""
                size = 0
                continue
            if line.startswith("data: "):  # by far the most common line: one slice
                value = line[6:]
                data.append(value)
            elif line[0] == ":":
                continue
            else:
                colon = line.find(":")
                if colon < 0:
                    field, value = line, ""
                else:
                    field = line[:colon]
                    value = line[colon + 2 :] if line[colon + 1 : colon + 2] == " " else line[colon + 1 :]
                if field == "data":
                    data.append(value)
                elif field == "event":
                    event = value
                elif field == "id" and "\x00" not in value:
                    self._last_id = value
                else:
                    continue  # `retry` and unknown fields are ignored: reconnection is the engine's decision.
            # In UTF-8 bytes, as the limit is stated; `isascii()` reads a flag, so ASCII text costs no encode.
            size += len(value) if value.isascii() else len(value.encode())
            if size > limit:
                self._data, self._event, self._event_size = data, event, size
                raise SSELimitExceeded("a stream event", limit)
        self._data, self._event, self._event_size = data, event, size
        return events
