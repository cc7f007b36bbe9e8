"""The `Content-Encoding` of upstream reply bodies, decoded the same way by every HTTP client implementation.

Requests ask for identity (a compressing server buffers SSE events, and LLM replies are small); a server
that compresses anyway (`gzip`, `deflate`) is decoded as the body is read, in steps of at most
`DECODE_STEP` bytes, so a compression bomb never inflates more than that at once. Any other coding fails
the read with `UnsupportedEncoding`.
"""

from __future__ import annotations

import zlib
from typing import Final

from feather_grpc.providers.http_client import ReadError, UnsupportedEncoding

__all__ = ["DECODE_STEP", "Decoder", "decoder_for", "unsupported"]

DECODE_STEP: Final = 256 * 1024  # most bytes one decompression step may produce


class Decoder:
    """A gzip or zlib-wrapped deflate body, decoded step by step (the wrapper is detected)."""

    __slots__ = ("_zlib", "tail")

    def __init__(self) -> None:
        self._zlib = zlib.decompressobj(zlib.MAX_WBITS | 32)
        self.tail = b""  # compressed bytes the last step left for the next: call `decode(b"")` while set

    def decode(self, data: bytes) -> bytes:
        """At most `DECODE_STEP` decoded bytes of what the last step left plus `data`; `ReadError` if malformed."""
        z = self._zlib
        if z.eof:
            return b""  # bytes after the compressed stream: ignored, like any reader of gzip does
        try:
            out = z.decompress(self.tail + data if self.tail else data, DECODE_STEP)
        except zlib.error as exc:
            raise ReadError(f"malformed compressed body: {exc}") from None
        self.tail = z.unconsumed_tail
        return out

    def check_end(self) -> None:
        """The body has ended: `ReadError` unless the compressed stream did too."""
        if not self._zlib.eof:
            raise ReadError("compressed body ended before its end marker")


def decoder_for(content_encoding: str) -> tuple[Decoder | None, str]:
    """(a decoder, "") for gzip and deflate, (None, "") for identity, else (None, the coding): reading
    such a body fails with `unsupported(coding)`."""
    encoding = content_encoding.strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        return Decoder(), ""
    if encoding in ("", "identity"):
        return None, ""
    return None, encoding[:40]


def unsupported(coding: str) -> UnsupportedEncoding:
    return UnsupportedEncoding(f"response Content-Encoding {coding!r} cannot be decoded")
