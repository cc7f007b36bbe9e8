"""The upstream HTTP client as the providers see it: the interface (`UpstreamClient`, `UpstreamEndpoint`,
`UpstreamResponse`), the failures every implementation reports, and the per-attempt context every
implementation honours (trace headers in, "the request was sent" out).

Two implementations, chosen per provider (`transport` in the config): the own HTTP/1.1 client
(providers/transport/, the default and the fast one) and one on aiohttp (providers/aiohttp_client.py,
`transport: "aiohttp"`, the `feather-grpc[aiohttp]` extra). tests/test_http_conformance.py holds both to
the same guarantees. Neither follows redirects, sets timeouts (callers bound calls with `asyncio.timeout`)
or keeps cookies; cancellation at any point closes what was opened.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextvars import ContextVar
from typing import Protocol
from urllib.parse import quote, unquote, urlsplit

from feather_grpc.providers.egress import DIRECT, Egress

__all__ = [
    "AttemptMarker",
    "BodyTooLarge",
    "ConnectError",
    "HttpError",
    "InvalidURL",
    "ReadError",
    "UnsupportedEncoding",
    "UpstreamClient",
    "UpstreamEndpoint",
    "UpstreamResponse",
    "attempt_headers",
    "attempt_marker",
    "check_header",
    "encode_headers",
    "mark_sent",
    "media_type",
    "split_url",
]

# Header lines ("Name: value\r\n" each, encoded) added to every request sent from the current context. The
# tracing observer puts an upstream attempt's W3C trace context here for the attempt's duration (see
# server/tracing.py); without tracing it stays empty and a request pays one context-variable read.
attempt_headers: ContextVar[bytes] = ContextVar("feather_attempt_headers", default=b"")

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


class UpstreamResponse(Protocol):
    """One response: `status`, `reason`, `headers` (lowercase names), then the body, read once.

    Read the body with `read()` or `async for chunk in response`; always `close()` it (a no-op once the
    body was read to the end, which has already released the connection). Body bytes are decoded (gzip,
    deflate); any other `Content-Encoding` fails the read with `UnsupportedEncoding`.
    """

    status: int
    reason: str

    @property
    def headers(self) -> Mapping[str, str]: ...

    @property
    def content_type(self) -> str:
        """The media type without parameters, lowercased (`application/octet-stream` when absent)."""
        ...

    async def read(self, limit: int | None = None) -> bytes:
        """The whole body (what is left of it); over `limit` bytes, `BodyTooLarge` and the connection closed."""
        ...

    def __aiter__(self) -> AsyncIterator[bytes]:
        """The body as it arrives, in pieces of at least one byte."""
        ...

    def close(self) -> None:
        """Give the connection back if the body was read to the end, otherwise close it."""
        ...

    def release_after_end(self) -> None:
        """The caller has all it wants (an SSE stream's last event) though the body may not have ended: the
        connection is kept if the rest comes soon, closed otherwise."""
        ...


class UpstreamEndpoint(Protocol):
    """POSTs to one URL with a fixed set of headers."""

    url: str

    async def request(self, body: bytes, headers: bytes = b"") -> UpstreamResponse:
        """Send `body` and wait for the response head; the caller must `close()` the response. Any status is a
        response; failures are `HttpError`s (`ConnectError`: nothing was sent). `headers`: header lines for
        this request alone (`encode_headers`), such as a short-lived token or a request signature."""
        ...


class UpstreamClient(Protocol):
    """The pooled client providers share; its owner `await`s `close()`."""

    def endpoint(
        self,
        url: str,
        headers: Sequence[tuple[str, str]] = (),
        egress: Egress = DIRECT,
        *,
        owner: str = "",
        max_connections: int | None = None,
    ) -> UpstreamEndpoint:
        """A POST target reached the way `egress` says; `owner`'s (a provider's) connections to one host are
        at most `max_connections`. Bad headers raise `ValueError` here; a bad URL fails each request."""
        ...

    def connections(self, owner: str | None = None) -> int:
        """Open connections (idle or busy), all or `owner`'s."""
        ...

    def idle_connections(self) -> int:
        """Open connections waiting in a pool for a request."""
        ...

    async def close(self) -> None:
        """Close every connection; requests still running fail with a `ReadError`."""
        ...


def split_url(url: str) -> tuple[str, str, int, str, str]:
    """(scheme, host, port, request target, "user:password" or "") of an http(s) URL; `ValueError` says
    what is wrong. The target keeps what is already percent-encoded and encodes the rest."""
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


def check_header(name: str, value: str) -> str:
    """`name` lowercased, or `ValueError` for a header a caller may not send: not a valid name or value
    (no header injection through a configured value), or one the client itself sets from the body."""
    if _TOKEN.fullmatch(name) is None or _BAD_VALUE.search(value) is not None:
        raise ValueError(f"invalid HTTP header {name!r}")
    lower = name.lower()
    if lower in ("content-length", "transfer-encoding", "connection"):
        raise ValueError(f"header {name!r} is set by the HTTP client")
    return lower


def media_type(headers: Mapping[str, str]) -> str:
    """The response's media type without parameters, lowercased (`application/octet-stream` when absent)."""
    raw = headers.get("content-type")
    if not raw:
        return "application/octet-stream"
    return raw.partition(";")[0].strip().lower()


def encode_headers(headers: Sequence[tuple[str, str]]) -> bytes:
    """Per-request header lines for `UpstreamEndpoint.request`, checked as the endpoint's own are."""
    out = []
    for name, value in headers:
        if _TOKEN.fullmatch(name) is None or _BAD_VALUE.search(value) is not None:
            raise ValueError(f"invalid HTTP header {name!r}")
        out.append(f"{name}: {value.strip()}\r\n")
    return "".join(out).encode("utf-8")
