"""The upstream HTTP client on aiohttp: a provider with `transport: "aiohttp"` (the `feather-grpc[aiohttp]` extra)
reaches its upstream through this instead of the own client (providers/transport/).

It keeps the own client's contract (core/http_client.py; tests/test_http_conformance.py runs the same
tests against both): POST only, no redirects, no cookies, no timeouts of its own, `Accept-Encoding: identity`
and gzip/deflate bodies decoded in bounded steps (providers/content_coding.py, aiohttp's own decompression
is off), a keep-alive pool per (provider, egress) of at most `maxConnections` connections to each host,
proxies (CONNECT for https, absolute form for http) and per-provider TLS, bodies refused past the reader's
limit with the connection closed, and cancellation at any point closing what was opened.

What it does not do that the own client does (none of it changes what a caller gets back):
- resend a request once on a reused connection the server closed as it was reused (the keep-alive race):
  the attempt fails with `UPSTREAM_READ_ERROR`, which the engine retries;
- the ~3-4x lower CPU cost per call (see providers/transport/__init__.py): use it for what the own client
  lacks, not for speed.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import ssl
from collections.abc import Coroutine, Sequence
from types import SimpleNamespace
from typing import Any, NoReturn

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.tracing import Trace
from yarl import URL

from feather_grpc.core.egress import DIRECT, Egress, Proxy, TlsContexts
from feather_grpc.core.http_client import (
    BodyTooLarge,
    ConnectError,
    HttpError,
    InvalidURL,
    ReadError,
    attempt_headers,
    check_header,
    mark_sent,
    media_type,
    split_url,
)
from feather_grpc.core.upstream import KEEPALIVE_TIMEOUT_S
from feather_grpc.providers.content_coding import Decoder, decoder_for, unsupported

__all__ = ["END_GRACE_S", "AiohttpClient", "AiohttpEndpoint", "AiohttpResponse"]

END_GRACE_S = 0.5  # how long `release_after_end` waits for the rest of a body before closing


class AiohttpResponse:
    """One response (see `UpstreamResponse`), over an aiohttp `ClientResponse` whose body is read raw."""

    __slots__ = ("_client", "_coding", "_decoder", "_done", "_draining", "_exc", "_resp", "headers", "reason", "status")

    def __init__(self, client: AiohttpClient, resp: aiohttp.ClientResponse) -> None:
        self._client = client
        self._resp = resp
        self.status = resp.status
        self.reason = resp.reason or ""
        headers: dict[str, str] = {}
        for name, value in resp.headers.items():
            lower = name.lower()
            headers[lower] = f"{headers[lower]}, {value}" if lower in headers else value
        self.headers = headers
        self._decoder: Decoder | None
        self._decoder, self._coding = decoder_for(headers.get("content-encoding", ""))
        self._done = False  # the whole body was read
        self._draining = False  # release_after_end owns the connection now
        self._exc: HttpError | None = None

    @property
    def content_type(self) -> str:
        return media_type(self.headers)

    async def read(self, limit: int | None = None) -> bytes:
        if limit is not None:
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:  # refused before reading a byte of it
                self._refuse(BodyTooLarge(limit, int(declared)))
        out: list[bytes] = []
        size = 0
        async for chunk in self:
            size += len(chunk)
            if limit is not None and size > limit:
                self._refuse(BodyTooLarge(limit))
            out.append(chunk)
        return b"".join(out)

    def __aiter__(self) -> AiohttpResponse:
        return self

    async def __anext__(self) -> bytes:
        while True:
            if self._exc is not None:
                raise self._exc
            if self._coding:
                self._refuse(unsupported(self._coding))
            decoder = self._decoder
            if decoder is not None and decoder.tail:  # decode what the last step left before taking more
                chunk = self._decode(decoder, b"")
                if chunk:
                    return chunk
            if self._done:
                raise StopAsyncIteration
            try:
                data = await self._resp.content.readany()
            except (aiohttp.ClientError, OSError, RuntimeError) as exc:  # RuntimeError: the session was closed
                self._refuse(ReadError(f"connection closed before the response was complete ({_describe(exc)})"))
            if not data:  # the end: aiohttp has given the connection back already
                self._done = True
                if decoder is not None:
                    try:
                        decoder.check_end()
                    except ReadError as exc:
                        self._refuse(exc)
                raise StopAsyncIteration
            if decoder is None:
                return data
            chunk = self._decode(decoder, data)
            if chunk:
                return chunk

    def _decode(self, decoder: Decoder, data: bytes) -> bytes:
        try:
            return decoder.decode(data)
        except ReadError as exc:
            self._refuse(exc)

    def _refuse(self, exc: HttpError) -> NoReturn:
        self._exc = exc
        self._decoder = None
        self._resp.close()  # never pooled half-read
        raise exc

    def close(self) -> None:
        if self._draining:
            return
        if self._done:
            self._resp.release()
        else:
            self._resp.close()
            if self._exc is None:
                self._exc = ReadError("response closed before its body was read")

    def release_after_end(self, grace_s: float = END_GRACE_S) -> None:
        """As the own client's: the rest of the body is read and dropped for up to `grace_s`; if it ends,
        the connection stays in the pool, otherwise it is closed."""
        if self._done or self._draining or self._exc is not None:
            return
        self._draining = True
        self._client._spawn(self._drain(grace_s))

    async def _drain(self, grace_s: float) -> None:
        try:
            async with asyncio.timeout(grace_s):
                while await self._resp.content.readany():
                    pass
        except (TimeoutError, aiohttp.ClientError, OSError):
            self._resp.close()
        except BaseException:  # cancelled by the client's close
            self._resp.close()
            raise
        else:
            self._resp.release()


class AiohttpEndpoint:
    """POSTs to one URL with a fixed set of headers."""

    __slots__ = ("_auth_proxy", "_client", "_error", "_headers", "_key", "_limit", "_proxy", "_ssl", "_target", "url")

    def __init__(
        self,
        client: AiohttpClient,
        url: str,
        headers: Sequence[tuple[str, str]],
        egress: Egress,
        owner: str,
        max_connections: int,
    ) -> None:
        self.url = url
        self._client = client
        self._key = (owner, egress)
        self._limit = max_connections
        self._error: InvalidURL | None = None
        self._proxy: Proxy | None = egress.proxy
        self._auth_proxy: dict[str, str] | None = None  # the CONNECT request's headers (https through a proxy)
        self._ssl: ssl.SSLContext | bool = True  # plain http: unused
        fields = {"user-agent": ("User-Agent", client.user_agent), "accept-encoding": ("Accept-Encoding", "identity")}
        for name, value in headers:
            fields[check_header(name, value)] = (name, value.strip())  # the caller's value wins
        self._headers = dict(fields.values())
        self._target = URL()
        try:
            scheme, host, port, target, auth = split_url(url)
        except ValueError as exc:
            self._error = InvalidURL(f"invalid URL: {exc}")
            return
        if auth and "authorization" not in fields:
            self._headers["Authorization"] = f"Basic {base64.b64encode(auth.encode()).decode()}"
        netloc = f"[{host}]" if ":" in host else host
        self._target = URL(f"{scheme}://{netloc}:{port}{target}", encoded=True)
        if scheme == "https":
            self._ssl = client._tls.get(egress)
        proxy = self._proxy
        if proxy is not None and proxy.authorization:
            if scheme == "https":
                self._auth_proxy = {"Proxy-Authorization": proxy.authorization}
            else:  # absolute form: the request itself goes to the proxy
                self._headers["Proxy-Authorization"] = proxy.authorization

    async def request(self, body: bytes, headers: bytes = b"") -> AiohttpResponse:
        if self._error is not None:
            raise self._error
        fields = self._headers
        extra = headers + attempt_headers.get()
        if extra:
            fields = {**fields, **_header_lines(extra)}
        session = self._client._session(self._key, self._limit)
        proxy = self._proxy
        try:
            resp = await session.post(
                self._target,
                data=body,
                headers=fields,
                allow_redirects=False,
                proxy=str(proxy) if proxy is not None else None,
                proxy_headers=self._auth_proxy,
                ssl=self._ssl,
            )
        except aiohttp.ClientHttpProxyError as exc:  # the proxy refused CONNECT
            raise ConnectError(f"proxy {proxy} refused CONNECT: {exc.status} {exc.message[:100]}".rstrip()) from None
        except aiohttp.ClientConnectorError as exc:  # DNS, refused, TLS, proxy unreachable: nothing was sent
            via = f" via proxy {proxy}" if proxy is not None else ""
            raise ConnectError(
                f"cannot connect to {self._target.host}:{self._target.port}{via}: {_describe(exc)}"
            ) from exc
        except aiohttp.InvalidURL as exc:
            raise InvalidURL(f"invalid URL: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise ReadError(f"no response: {_describe(exc)}") from exc
        if resp.status == 407 and proxy is not None and self._target.scheme == "http":
            resp.close()  # about the gateway's proxy credentials, never the caller's request
            raise ConnectError(f"proxy {proxy} refused the request: {resp.status} {(resp.reason or '')[:100]}".rstrip())
        return AiohttpResponse(self._client, resp)


def _header_lines(raw: bytes) -> dict[str, str]:
    """`attempt_headers` ("Name: value\\r\\n" lines) as a dict."""
    out: dict[str, str] = {}
    for line in raw.decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if colon:
            out[name.strip()] = value.strip()
    return out


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


async def _on_headers_sent(
    session: aiohttp.ClientSession, ctx: SimpleNamespace, params: aiohttp.TraceRequestHeadersSentParams
) -> None:
    mark_sent()  # runs in the caller's task: the attempt's marker is in context


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector, opening each connection in an empty context: a transport runs its protocol's
    callbacks in the context that created it, so a connection opened inside a call (its `current_call`:
    ServerCall, request, prompt) would keep that call alive as long as it stays pooled. The same rule as
    the own client's pool (providers/transport/pool.py); the CONNECT exchange and its TLS upgrade
    (`loop.start_tls`) happen in here too, so the proxy path is covered."""

    async def _create_connection(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's signature)
    ) -> ResponseHandler:
        opening = asyncio.get_running_loop().create_task(
            super()._create_connection(req, traces, timeout), context=contextvars.Context()
        )
        try:
            return await opening
        except BaseException:
            if opening.done() and not opening.cancelled() and opening.exception() is None:
                opening.result().close()  # opened as our caller was cancelled: nobody will use it
            raise

    def _release(self, key: ConnectionKey, protocol: ResponseHandler, *, should_close: bool = False) -> None:
        # A released connection may (re)start the keep-alive cleanup timer, which would keep the releasing
        # call's context: in an empty one.
        contextvars.Context().run(super()._release, key, protocol, should_close=should_close)


def _idle(connector: aiohttp.BaseConnector) -> int:
    # aiohttp has no public count; its pool of idle connections is `_conns` (a list per host key)
    return sum(len(c) for c in connector._conns.values())


class AiohttpClient:
    """The sessions every `transport: "aiohttp"` provider shares. Create it in the running loop; the owner
    `await close()`s it."""

    def __init__(
        self,
        *,
        max_per_host: int = 1000,
        keepalive_timeout_s: float = KEEPALIVE_TIMEOUT_S,
        user_agent: str = "feather-grpc",
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_per_host < 1:
            raise ValueError("max_per_host must be at least 1")
        self.max_per_host = max_per_host
        self.keepalive_timeout_s = keepalive_timeout_s
        self.user_agent = user_agent
        self._tls = TlsContexts(ssl_context)
        self._sessions: dict[tuple[str, Egress], aiohttp.ClientSession] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._trace = aiohttp.TraceConfig()
        self._trace.on_request_headers_sent.append(_on_headers_sent)
        self.closed = False

    def endpoint(
        self,
        url: str,
        headers: Sequence[tuple[str, str]] = (),
        egress: Egress = DIRECT,
        *,
        owner: str = "",
        max_connections: int | None = None,
    ) -> AiohttpEndpoint:
        if max_connections is not None and max_connections < 1:
            raise ValueError("max_connections must be at least 1")
        return AiohttpEndpoint(self, url, headers, egress, owner, max_connections or self.max_per_host)

    def _session(self, key: tuple[str, Egress], limit: int) -> aiohttp.ClientSession:
        session = self._sessions.get(key)
        if session is None:
            if self.closed:
                raise ConnectError("HTTP client closed")
            connector = _Connector(
                limit=0, limit_per_host=limit, keepalive_timeout=self.keepalive_timeout_s, ttl_dns_cache=60
            )
            session = self._sessions[key] = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=None),  # the engine bounds every call
                auto_decompress=False,  # decoded in bounded steps by the response
                trust_env=False,  # the proxy comes from the provider's egress, resolved at config load
                cookie_jar=aiohttp.DummyCookieJar(),
                skip_auto_headers=("Accept",),
                trace_configs=[self._trace],
            )
        return session

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def connections(self, owner: str | None = None) -> int:
        """Open connections (idle or busy), all or `owner`'s."""
        total = 0
        for (who, _), session in self._sessions.items():
            if (owner is None or who == owner) and session.connector is not None:
                total += len(session.connector._acquired) + _idle(session.connector)
        return total

    def idle_connections(self) -> int:
        return sum(_idle(s.connector) for s in self._sessions.values() if s.connector is not None)

    async def close(self) -> None:
        self.closed = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for session in self._sessions.values():
            await session.close()
