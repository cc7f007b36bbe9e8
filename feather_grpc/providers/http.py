"""The shared HTTP client and the translation of upstream HTTP failures into typed `ProviderError`s."""

from __future__ import annotations

import email.utils
import math
import re
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

from feather_grpc.core.errors import ProviderError
from feather_grpc.core.http_client import (
    BodyTooLarge,
    ConnectError,
    HttpError,
    InvalidURL,
    UnsupportedEncoding,
    UpstreamClient,
    UpstreamEndpoint,
    UpstreamResponse,
)
from feather_grpc.core.upstream import KEEPALIVE_TIMEOUT_S
from feather_grpc.providers.transport.client import HttpClient

__all__ = [
    "MAX_ERROR_BODY_BYTES",
    "UpstreamClients",
    "UpstreamErrorBody",
    "bad_response",
    "classify_status",
    "classify_transport_error",
    "error_from_response",
    "new_session",
    "parse_error_body",
    "parse_retry_after",
    "post_json",
    "redirect_error",
    "safe_text",
    "stream_cut",
    "too_large",
]

MAX_ERROR_BODY_BYTES = 64 * 1024
_MESSAGE_LIMIT = 300


def new_session(
    *,
    limit_per_host: int = 1000,
    keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
    user_agent: str = "feather-grpc",
    ssl_context: ssl.SSLContext | None = None,
) -> HttpClient:
    """The one pooled `HttpClient` every provider shares. Create it in the running loop; the owner
    `await`s its `close()`.

    No timeouts of its own: the engine bounds every call (connect included) with `asyncio.timeout` from
    the caller's deadline. `limit_per_host` caps the connections to one upstream (callers beyond it wait
    in FIFO order); idle ones close after `keepalive_timeout_s`. `ssl_context` defaults to
    `ssl.create_default_context()` (system CAs, `SSL_CERT_FILE`/`SSL_CERT_DIR` honoured).
    """
    return HttpClient(
        max_per_host=limit_per_host,
        keepalive_timeout_s=keepalive_timeout_s,
        user_agent=user_agent,
        ssl_context=ssl_context,
    )


class UpstreamClients:
    """The upstream HTTP clients of one gateway, one per transport (`providers.<name>.transport`), each made
    when the first provider using it is built and shared by all of them; the owner `await`s `close()`."""

    def __init__(self) -> None:
        self._clients: dict[str, UpstreamClient] = {}

    def get(self, transport: str = "builtin") -> UpstreamClient:
        client = self._clients.get(transport)
        if client is None:
            if transport == "aiohttp":
                # The optional extra (the config checked it is installed): imported only when a provider uses it.
                from feather_grpc.providers.aiohttp_client import AiohttpClient

                client = AiohttpClient()
            elif transport == "builtin":
                client = new_session()
            else:
                raise ValueError(f"unknown transport {transport!r}; expected builtin or aiohttp")
            self._clients[transport] = client
        return client

    def connections(self, owner: str | None = None) -> int:
        """Open connections (idle or busy) of every client, all or `owner`'s (a provider's)."""
        return sum(c.connections(owner) for c in self._clients.values())

    async def close(self) -> None:
        for client in self._clients.values():
            await client.close()


def parse_retry_after(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms` (preferred, it is more precise) or `retry-after`.

    `retry-after` may be delta-seconds (floats tolerated) or an HTTP date, which becomes seconds from
    `now` (default: the wall clock), never below 0. Unparseable or negative values count as absent.
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        value = _non_negative_float(ms)
        if value is not None:
            return value / 1000.0
    raw = headers.get("retry-after")
    if raw is None:
        return None
    value = _non_negative_float(raw)
    if value is not None:
        return value
    try:
        when = email.utils.parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive parse means "-0000"
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


def _non_negative_float(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return value


@dataclass(frozen=True, slots=True)
class UpstreamErrorBody:
    """What an upstream error body says, in either provider's shape. Strings are raw, not yet safe."""

    type: str = ""
    code: str = ""
    message: str = ""


def parse_error_body(body: bytes) -> UpstreamErrorBody:
    """Read `{"error": {...}}` (OpenAI), `{"type": "error", "error": {...}}` (Anthropic) and the looser
    shapes compatible servers use (`{"error": "text"}`, `{"detail": ...}`, `{"message": ...}`)."""
    try:
        doc = orjson.loads(body)
    except ValueError:
        text = body[:4096].decode("utf-8", errors="replace").strip()
        # Plain-text bodies are usually a useful sentence; HTML pages from proxies are noise.
        return UpstreamErrorBody(message="" if text.startswith("<") else text)
    if not isinstance(doc, dict):
        return UpstreamErrorBody()
    err = doc.get("error")
    if isinstance(err, dict):
        return UpstreamErrorBody(_text(err.get("type")), _text(err.get("code")), _text(err.get("message")))
    if isinstance(err, str):
        return UpstreamErrorBody(message=err)
    for key in ("detail", "message"):
        value = doc.get(key)
        if isinstance(value, str):
            return UpstreamErrorBody(message=value)
    return UpstreamErrorBody()


def _text(value: object) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else str(value)


_SECRET_PATTERNS = re.compile(
    r"(?i)(bearer\s+)[^\s\"',]+|\b(sk-[A-Za-z0-9_\-*.]{4,})|(x-api-key[\"']?\s*[:=]\s*[\"']?)[^\s\"',]+"
)


def safe_text(text: str, api_key: str = "", limit: int = _MESSAGE_LIMIT) -> str:
    """One line, at most `limit` characters, with the key and anything key-shaped redacted."""
    if api_key and api_key in text:
        text = text.replace(api_key, "[redacted]")
    text = _SECRET_PATTERNS.sub(_redact, text)
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return text


def _redact(match: re.Match[str]) -> str:
    prefix = match.group(1) or match.group(3) or ""
    return prefix + "[redacted]"


_CONTEXT_TOO_LONG = re.compile(
    r"prompt is too long|input is too long|maximum context length|context length|context window|"
    r"too many (input )?tokens|exceeds the maximum number of tokens",
    re.IGNORECASE,
)


def classify_status(
    provider: str,
    status: int,
    error: UpstreamErrorBody,
    *,
    retry_after_s: float | None = None,
    api_key: str = "",
) -> ProviderError:
    """Map an upstream HTTP status plus its error body to one `ProviderError` (reason, retryable).

    Also used for errors reported inside a stream, with the status the error type corresponds to.
    """
    kind = error.type or error.code or "http_error"
    if error.code and error.code != kind:
        kind = f"{kind} ({error.code})"
    message = f"{provider}: {status} {safe_text(kind, api_key, 80)}: {safe_text(error.message, api_key)}"
    reason, retryable = _reason_for(status, error)

    return ProviderError(reason, message, http_status=status, retryable=retryable, retry_after_s=retry_after_s)


def _reason_for(status: int, error: UpstreamErrorBody) -> tuple[str, bool]:
    if status == 429:
        if error.code == "insufficient_quota" or error.type == "insufficient_quota":
            return "UPSTREAM_QUOTA_EXHAUSTED", False
        return "UPSTREAM_RATE_LIMITED", True
    if status == 529 or error.type == "overloaded_error":
        return "UPSTREAM_OVERLOADED", True
    if status >= 500:
        return "UPSTREAM_SERVER_ERROR", True
    if status == 408:
        return "UPSTREAM_TIMEOUT", True
    if status == 409:
        return "UPSTREAM_CONFLICT", True
    if status in (401, 403):
        return "UPSTREAM_AUTH_FAILED", False
    if status == 413:
        return "UPSTREAM_CONTEXT_TOO_LONG", False
    if status == 404:
        return "UPSTREAM_NOT_FOUND", False
    if status == 400 and error.code == "content_filter":  # Azure's filter refused the prompt
        return "UPSTREAM_CONTENT_FILTERED", False
    if status == 400 and (
        error.code == "context_length_exceeded" or _CONTEXT_TOO_LONG.search(error.message) is not None
    ):
        return "UPSTREAM_CONTEXT_TOO_LONG", False
    return "UPSTREAM_BAD_REQUEST", False


def redirect_error(provider: str, status: int, location: str | None) -> ProviderError:
    """A 3xx is the provider's fault (a moved API, an http:// URL behind an https redirect): never
    followed, so the key never goes to another host; the attempt fails over like any provider-side fault."""
    target = ""
    if location:
        parts = urlsplit(location.strip())
        if parts.scheme and parts.hostname:  # say where it points, without its path or query
            host = parts.netloc.rpartition("@")[2]  # never echo credentials in the URL
            target = f" to {safe_text(f'{parts.scheme}://{host}', limit=120)}"
    return ProviderError(
        "UPSTREAM_REDIRECT",
        f"{provider}: {status} redirect{target} not followed; set baseUrl to the final URL",
        http_status=status,
        retryable=False,
    )


async def error_from_response(
    provider: str, resp: UpstreamResponse, api_key: str = "", *, error_type: str = ""
) -> ProviderError:
    """Read (a bounded amount of) a non-2xx response and classify it. The caller closes `resp`.
    `error_type`: the error's type when the upstream sends it apart from the body (AWS: a header)."""
    if 300 <= resp.status < 400:
        return redirect_error(provider, resp.status, resp.headers.get("location"))
    parts: list[bytes] = []
    size = 0
    try:
        async for part in resp:  # each read returns what has arrived; a body can span reads
            parts.append(part)
            size += len(part)
            if size >= MAX_ERROR_BODY_BYTES:
                break
    except HttpError:
        pass  # classify on what arrived
    body = b"".join(parts)[:MAX_ERROR_BODY_BYTES]
    parsed = parse_error_body(body)
    if not parsed.message and not parsed.type:
        parsed = UpstreamErrorBody(message=resp.reason or "")
    if error_type and not parsed.type:
        parsed = UpstreamErrorBody(error_type, parsed.code, parsed.message)
    return classify_status(
        provider, resp.status, parsed, retry_after_s=parse_retry_after(resp.headers), api_key=api_key
    )


def classify_transport_error(
    provider: str, exc: HttpError, *, streaming: bool = False, api_key: str = ""
) -> ProviderError:
    """Connection-level failures. `streaming` means the stream had started: a failure is then a cut."""
    detail = safe_text(f"{type(exc).__name__}: {exc}", api_key)
    if isinstance(exc, BodyTooLarge):
        return too_large(provider, "reply body", exc.limit, "maxResponseBytes")
    if isinstance(exc, UnsupportedEncoding):  # the same server will answer the same way: fail over
        what = safe_text(str(exc), api_key)  # the coding's name is the upstream's text
        return ProviderError("UPSTREAM_BAD_RESPONSE", f"{provider}: {what}", http_status=200, retryable=False)
    if isinstance(exc, InvalidURL):
        return ProviderError("UPSTREAM_CONNECT_ERROR", f"{provider}: invalid URL", retryable=False)
    if isinstance(exc, ConnectError):
        return ProviderError("UPSTREAM_CONNECT_ERROR", f"{provider}: connect error: {detail}", retryable=True)
    if streaming:
        return ProviderError("UPSTREAM_STREAM_CUT", f"{provider}: stream cut: {detail}", retryable=True)
    return ProviderError("UPSTREAM_READ_ERROR", f"{provider}: read error: {detail}", retryable=True)


async def post_json(
    endpoint: UpstreamEndpoint,
    provider: str,
    body: bytes,
    api_key: str = "",
    max_bytes: int | None = None,
    *,
    headers: bytes = b"",
) -> object:
    """One non-streaming POST: the parsed JSON of a 2xx reply (at most `max_bytes`), or a classified
    `ProviderError`. `headers`: this request's own header lines (see `Endpoint.request`)."""
    try:
        resp = await endpoint.request(body, headers)
        try:
            if resp.status >= 300:
                raise await error_from_response(provider, resp, api_key)
            raw = await resp.read(max_bytes)
        finally:
            resp.close()  # a no-op once the body was read whole: the connection is back in the pool
    except HttpError as exc:
        raise classify_transport_error(provider, exc, api_key=api_key) from exc
    try:
        return orjson.loads(raw)
    except ValueError:
        raise bad_response(provider, "body is not JSON", resp.status) from None


def bad_response(provider: str, what: str, status: int = 200) -> ProviderError:
    """A 2xx whose body is not what the wire format promises."""
    return ProviderError(
        "UPSTREAM_BAD_RESPONSE", f"{provider}: {status} bad response: {what}", http_status=status, retryable=True
    )


def too_large(provider: str, what: str, limit: int, setting: str) -> ProviderError:
    """A reply past one of the provider's size limits: the attempt is abandoned (its connection closed)
    and fails over like any provider-side fault; retrying the same upstream would most likely repeat it."""
    return ProviderError(
        "UPSTREAM_RESPONSE_TOO_LARGE",
        f"{provider}: {what} over the {limit}-byte limit ({setting})",
        http_status=200,
        retryable=False,
    )


def stream_cut(provider: str, what: str) -> ProviderError:
    return ProviderError("UPSTREAM_STREAM_CUT", f"{provider}: stream cut: {what}", http_status=200, retryable=True)
