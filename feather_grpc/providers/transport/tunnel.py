"""Egress through an HTTP proxy: the CONNECT tunnel for https upstreams, and the refusal of a plain-http
request the proxy would not forward."""

from __future__ import annotations

import asyncio
import socket

from feather_grpc.providers.egress import Proxy
from feather_grpc.providers.http_client import ConnectError
from feather_grpc.providers.transport.connection import MAX_HEAD
from feather_grpc.providers.transport.response import Response

__all__ = ["proxy_refused", "tunnel"]


async def tunnel(
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


def proxy_refused(proxy: Proxy, ex: Response) -> ConnectError:
    """A plain-http request the proxy would not forward: the same failure as a refused CONNECT, not an upstream
    reply (a 407 is about the gateway's proxy credentials, never the caller's request)."""
    return ConnectError(f"proxy {proxy} refused the request: {ex.status} {ex.reason[:100]}".rstrip())
