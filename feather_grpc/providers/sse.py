"""Incremental Server-Sent Events parser: feed it network reads, get whole events back.

Follows the WHATWG event-stream rules the providers rely on: lines end with `\\n`, `\\r\\n` or `\\r`;
a blank line ends an event; `data:` lines of one event are joined with `\\n`; one space after the colon
is dropped; lines starting with `:` are comments. A read may end anywhere (mid-line, mid-UTF-8
sequence, between `\\r` and `\\n`), so bytes are buffered until a whole line is present, and only
whole lines are decoded (line terminators are ASCII, so a whole line is whole UTF-8).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["SSEEvent", "SSEParser"]


@dataclass(slots=True, frozen=True)
class SSEEvent:
    data: str
    event: str = ""  # "" when the event had no `event:` field (the spec's default "message")
    id: str = ""


class SSEParser:
    """Feed bytes with `feed()`; each call returns the events completed by those bytes.

    An event still incomplete when the stream ends is discarded, as the spec says: a stream cut
    mid-event must not look like a finished one.
    """

    __slots__ = ("_data", "_event", "_last_id", "_pending", "_skip_lf", "_started")

    def __init__(self) -> None:
        self._pending = b""  # bytes after the last line terminator seen
        self._skip_lf = False  # the previous read ended with `\r`: a leading `\n` belongs to it
        self._started = False  # the byte-order mark is only stripped at the very start
        self._data: list[str] = []
        self._event = ""
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
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
                if not chunk:
                    return []
        buf = self._pending + chunk if self._pending else chunk
        if b"\r" in buf:
            if buf[-1:] == b"\r":
                # The line has ended either way; remember to drop the `\n` if the next read starts with one.
                self._skip_lf = True
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        end = buf.rfind(b"\n")
        if end < 0:
            self._pending = buf
            return []
        self._pending = buf[end + 1 :]
        text = buf[:end].decode("utf-8", errors="replace")
        if not self._started:
            self._started = True
            if text.startswith("\ufeff"):
                text = text[1:]
        events: list[SSEEvent] = []
        for line in text.split("\n"):
            if not line:
                if self._data:
                    events.append(SSEEvent("\n".join(self._data), self._event, self._last_id))
                self._data = []
                self._event = ""
                continue
            if line[0] == ":":
                continue
            colon = line.find(":")
            if colon < 0:
                field, value = line, ""
            else:
                field = line[:colon]
                value = line[colon + 2 :] if line[colon + 1 : colon + 2] == " " else line[colon + 1 :]
            if field == "data":
                self._data.append(value)
            elif field == "event":
                self._event = value
            elif field == "id" and "\x00" not in value:
                self._last_id = value
            # `retry` and unknown fields are ignored: reconnection is the engine's decision.
        return events
