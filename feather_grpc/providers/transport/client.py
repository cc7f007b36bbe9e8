"""The own HTTP/1.1 client (see the package docstring): endpoints with pre-encoded request heads, and the
pools every provider shares."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Sequence

from feather_grpc.core.egress import DIRECT, Egress, Proxy, TlsContexts
from feather_grpc.core.http_client import InvalidURL, attempt_headers, check_header, mark_sent, split_url
from feather_grpc.core.upstream import KEEPALIVE_TIMEOUT_S
from feather_grpc.providers.transport.connection import StaleConnection
from feather_grpc.providers.transport.pool import Pool
from feather_grpc.providers.transport.response import Response
from feather_grpc.providers.transport.tunnel import proxy_refused

__all__ = ["Endpoint", "HttpClient"]


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
        self._pool: Pool | None = None
        self._prefix = b""
        try:
            scheme, host, port, target, auth = split_url(url)
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
            lower = check_header(name, value)
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
                    raise StaleConnection("server closed the connection before the request was sent")
                conn.send(data, ex)
                mark_sent()
                if not ex.status and ex._exc is None:
                    await ex._wait()
                if ex._exc is not None:
                    raise ex._exc
                if ex.status == 407 and self._plain_proxy is not None:
                    raise proxy_refused(self._plain_proxy, ex)
                return ex
            except StaleConnection:
                ex.close()
                if resent:
                    raise
                resent = True
                conn = await pool.acquire(fresh=True)
            except BaseException:
                ex.close()  # cancelled or failed before the head: never reuse this connection
                raise


class HttpClient:
    """The pools every provider shares. Create it in the running loop; the owner `await close()`s it."""

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
        self._pools: dict[tuple[str, str, str, int, Egress], Pool] = {}
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
        return self._tls.get(egress)

    def _pool(
        self, owner: str, scheme: str, host: str, port: int, max_connections: int, egress: Egress = DIRECT
    ) -> Pool:
        key = (owner, scheme, host.lower(), port, egress)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(self, scheme, key[2], port, max_connections, egress)
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
