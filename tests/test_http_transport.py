"""The providers' own HTTP/1.1 client (feather_grpc/providers/transport/) against real sockets: its pool,
parser and backpressure. What every implementation guarantees is in tests/test_http_conformance.py.

Most tests talk to `RawServer` (tests/raw_http.py), a scripted asyncio server whose handler writes whatever
bytes it likes, and which counts connections, requests and disconnects server-side. A few feed the parser
directly to try every split position of a response.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import gzip
import ssl
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from feather_grpc.core.errors import ProviderError
from feather_grpc.core.http_client import (
    BodyTooLarge,
    ConnectError,
    InvalidURL,
    ReadError,
    UnsupportedEncoding,
)
from feather_grpc.providers import ProviderSettings, build_provider
from feather_grpc.providers.content_coding import DECODE_STEP
from feather_grpc.providers.http import new_session
from feather_grpc.providers.transport.client import Endpoint, HttpClient
from feather_grpc.providers.transport.connection import HIGH_WATER, Connection
from feather_grpc.providers.transport.response import Response
from feather_grpc.server.calls import ServerCall, current_call
from tests.ops_harness import eventually
from tests.raw_http import (
    OK_BODY,
    RawServer,
    Req,
    chunked,
    make_tls_files,
    ok,
    reply,
    server_tls,
    settle,
    until_client_gone,
)


@pytest.fixture
async def client() -> AsyncIterator[HttpClient]:
    c = HttpClient()
    try:
        yield c
    finally:
        await c.close()


def endpoint(client: HttpClient, server: RawServer) -> Endpoint:
    return client.endpoint(server.url, [("Content-Type", "application/json"), ("Authorization", "Bearer k")])


async def post(ep: Endpoint, body: bytes = b"{}") -> tuple[Response, bytes]:
    resp = await ep.request(body)
    try:
        return resp, await resp.read()
    finally:
        resp.close()


# -- requests and keep-alive ----------------------------------------------------------------------


async def test_one_write_with_the_prebuilt_head_and_keep_alive_reuse(client: HttpClient) -> None:
    async def handler(req: Req) -> None:
        await reply(req, ok(req.body))

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        for i in range(5):
            resp, body = await post(ep, b'{"n":%d}' % i)
            assert (resp.status, resp.reason, body) == (200, "OK", b'{"n":%d}' % i)
            assert resp.headers["content-type"] == "application/json"
            assert resp.content_type == "application/json"
        assert server.connections == 1, "one keep-alive connection for sequential requests"
        assert client.connections() == client.idle_connections() == 1
        head = server.requests[0].head.decode()
        assert head.startswith("POST /v1/chat HTTP/1.1\r\n")
        lines = head.split("\r\n")
        assert f"Host: 127.0.0.1:{server.port}" in lines
        assert "User-Agent: feather-grpc" in lines
        assert "Content-Type: application/json" in lines
        assert "Authorization: Bearer k" in lines
        assert "Content-Length: 7" in lines
        assert "Accept-Encoding: identity" in lines  # a server that compresses anyway is decoded


async def test_concurrent_requests_open_connections_up_to_the_limit_then_wait_fifo() -> None:
    release: dict[bytes, asyncio.Event] = {}

    async def handler(req: Req) -> None:
        await release.setdefault(req.body, asyncio.Event()).wait()
        await reply(req, ok(req.body))

    client = HttpClient(max_per_host=2)
    try:
        async with RawServer(handler) as server:
            ep = endpoint(client, server)
            tasks = []
            for i in range(5):
                tasks.append(asyncio.create_task(post(ep, b"%d" % i)))
                await asyncio.sleep(0.01)  # acquire in this order
            await server.wait_for(lambda: len(server.requests) == 2)
            await asyncio.sleep(0.05)
            assert [r.body for r in server.requests] == [b"0", b"1"], "the others wait for a connection"
            release.setdefault(b"1", asyncio.Event()).set()
            await server.wait_for(lambda: len(server.requests) == 3)
            assert server.requests[2].body == b"2" and server.requests[2].conn == server.requests[1].conn
            release.setdefault(b"0", asyncio.Event()).set()
            await server.wait_for(lambda: len(server.requests) == 4)
            assert server.requests[3].body == b"3", "first come, first served"
            for key in (b"2", b"3", b"4"):
                release.setdefault(key, asyncio.Event()).set()
            results = await asyncio.gather(*tasks)
            assert [body for _, body in results] == [b"0", b"1", b"2", b"3", b"4"]
            assert server.connections == 2
            assert client.idle_connections() == 2
    finally:
        await client.close()


async def test_a_waiter_that_gives_up_keeps_neither_its_place_nor_a_slot() -> None:
    gate = asyncio.Event()

    async def handler(req: Req) -> None:
        if req.body == b"0":
            await gate.wait()
        await reply(req, ok(req.body))

    client = HttpClient(max_per_host=1)
    try:
        async with RawServer(handler) as server:
            ep = endpoint(client, server)
            first = asyncio.create_task(post(ep, b"0"))
            await server.wait_for(lambda: len(server.requests) == 1)
            quitter = asyncio.create_task(post(ep, b"1"))
            patient = asyncio.create_task(post(ep, b"2"))
            await asyncio.sleep(0.02)
            quitter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await quitter
            gate.set()
            assert (await first)[1] == b"0"
            assert (await patient)[1] == b"2"
            assert [r.body for r in server.requests] == [b"0", b"2"]
            assert server.connections == 1
            pool = next(iter(client._pools.values()))
            assert (pool._open, len(pool._waiters), client.idle_connections()) == (1, 0, 1)
    finally:
        await client.close()


async def test_idle_connections_expire_after_the_keep_alive_timeout() -> None:
    async def handler(req: Req) -> None:
        await reply(req, ok())

    client = HttpClient(keepalive_timeout_s=0.15)
    try:
        async with RawServer(handler) as server:
            ep = endpoint(client, server)
            await post(ep)
            assert client.idle_connections() == 1
            await server.wait_for(lambda: server.disconnects == 1, timeout_s=2.0)  # closed by the client
            assert client.connections() == 0
            await post(ep)
            assert server.connections == 2
    finally:
        await client.close()


# -- response framing ---------------------------------------------------------------------------------


async def test_content_length_body_split_across_many_reads(client: HttpClient) -> None:
    body = ("é" * 3000).encode()

    async def handler(req: Req) -> None:
        await reply(req, ok(body), pieces=40, delay_s=0.001, seed=len(server.requests))

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        for _ in range(3):
            assert (await post(ep))[1] == body
        assert server.connections == 1


async def test_chunked_with_extensions_odd_boundaries_and_trailers(client: HttpClient) -> None:
    pieces = [b"data: one\n\n", b"x" * 300, b"\r\n", b"data: \xc3\xa9\n\n", b"z"]
    raw = chunked(pieces, trailers="X-Checksum: abc\r\nX-Other: 1\r\n")

    async def handler(req: Req) -> None:
        await reply(req, raw, pieces=60, delay_s=0.001, seed=len(server.requests))

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        for _ in range(3):
            resp = await ep.request(b"{}")
            reads = [chunk async for chunk in resp]
            resp.close()
            assert b"".join(reads) == b"".join(pieces)
            assert len(reads) > 5, "delivered as it arrives, not at the end"
        assert server.connections == 1, "the connection is reused after the trailers"


def feed_all(data_splits: list[bytes]) -> tuple[Response, list[str]]:
    """Feed a response to a connection protocol in the given pieces, without sockets."""
    events: list[str] = []

    class Pool:
        closed = False

        def release(self, conn: Any) -> None:
            events.append("released")

        def lost(self, conn: Any) -> None:
            events.append("lost")

    class Transport:
        def write(self, data: bytes) -> None:
            pass

        def close(self) -> None:
            events.append("closed")

        def abort(self) -> None:
            events.append("aborted")

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

    conn = Connection(Pool())
    conn.connection_made(Transport())  # type: ignore[arg-type]
    ex = Response(conn)
    conn.send(b"", ex)
    for data in data_splits:
        conn.data_received(data)
    return ex, events


@pytest.mark.parametrize(
    "raw",
    [
        ok(b'{"a": "\xc3\xa9"}' * 20),
        chunked([b"data: a\n\n", b"b" * 40, b"\r\n\r\n", b"c"], trailers="T: 1\r\nU: 2\r\n"),
        b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after continue"),
        b"HTTP/1.1 200 OK\nContent-Length: 3\nX-Folded: a\n b\n\nabc",  # bare LF and a folded header
    ],
    ids=["content-length", "chunked", "100-continue", "bare-lf"],
)
def test_every_split_position_parses_the_same(raw: bytes) -> None:
    whole, events = feed_all([raw])
    assert whole._done and whole._exc is None and events == ["released"]
    body = b"".join(whole._parts)
    for cut in range(1, len(raw)):
        ex, events = feed_all([raw[:cut], raw[cut:]])
        assert (ex._done, ex._exc, b"".join(ex._parts), events) == (True, None, body, ["released"]), cut
    ex, events = feed_all([raw[i : i + 1] for i in range(len(raw))])
    assert (ex._done, b"".join(ex._parts), events) == (True, body, ["released"])
    assert ex.status == 200


def test_a_stream_read_one_whole_chunk_at_a_time() -> None:
    """The usual read of a streamed body is one whole chunk (taken in one step); reads that only look like
    one (a size that is not the data's, data ending in CRLF, an extension, two chunks) take the long way
    and give the same bytes."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    reads = [
        head,
        b"b\r\ndata: one\n\n\r\n",  # one whole chunk
        b"4\r\nab\r\n\r\n",  # its data ends in CRLF: still one whole chunk of 4 bytes
        b"A\r\n0123456789\r\n",  # upper-case hex
        b"5\r\nab\r\n",  # a size larger than the read: the rest follows
        b"c\r\n",
        b"3;ext=1\r\nxyz\r\n",  # an extension
        b"1\r\nA\r\n1\r\nB\r\n",  # two chunks in one read
        b"2\r\nC",  # a part of a chunk...
        b"D\r\n",  # ...then its end
        b"0\r\n\r\n",
    ]
    ex, events = feed_all(reads[:1])
    delivered = []
    conn = ex._conn
    assert isinstance(conn, Connection)
    for data in reads[1:]:
        conn.data_received(data)
        delivered.append(b"".join(ex._parts))
        ex._parts.clear()
    assert delivered == [b"data: one\n\n", b"ab\r\n", b"0123456789", b"ab\r\n", b"c", b"xyz", b"AB", b"C", b"D", b""]
    assert ex._done and ex._exc is None and events == ["released"]


@pytest.mark.parametrize(
    ("raw", "what"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x3\r\nabc\r\n", "bad chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcX\r\n", "not followed by CRLF"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 3, 4\r\n\r\nabcd", "conflicting content-length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "content-length"),
        (b"SMTP ready\r\n\r\n", "status line"),
        (b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", "header line"),
    ],
)
def test_malformed_responses_fail_and_close(raw: bytes, what: str) -> None:
    ex, events = feed_all([raw])
    assert isinstance(ex._exc, ReadError) and what in str(ex._exc)
    assert events == ["aborted"]


async def test_connection_close_is_honoured(client: HttpClient) -> None:
    async def handler(req: Req) -> bool:
        await reply(req, ok(OK_BODY, "Connection: close"))
        await asyncio.sleep(0.05)  # the client must not wait for the server to close first
        return False

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        assert (await post(ep))[1] == OK_BODY
        assert client.idle_connections() == 0
        assert (await post(ep))[1] == OK_BODY
        assert server.connections == 2


async def test_http_1_0_responses(client: HttpClient) -> None:
    async def handler(req: Req) -> bool | None:
        if req.body == b"close":  # no length: the body ends with the connection
            await reply(req, b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n\r\n" + OK_BODY, pieces=3)
            return False
        await reply(req, b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi")
        return None

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        resp, body = await post(ep, b"close")
        assert (resp.status, body) == (200, OK_BODY)
        assert (await post(ep, b"keep"))[1] == b"hi"
        assert (await post(ep, b"keep"))[1] == b"hi"
        assert server.connections == 2, "1.0 without keep-alive closes; with it, the connection is reused"


async def test_no_body_statuses_and_interim_responses(client: HttpClient) -> None:
    async def handler(req: Req) -> None:
        if req.body == b"204":
            await reply(req, b"HTTP/1.1 204 No Content\r\n\r\n")
        else:
            await reply(req, b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n" + ok())

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        resp, body = await post(ep, b"204")
        assert (resp.status, body) == (204, b"")
        resp, body = await post(ep, b"x")
        assert (resp.status, body, "link" in resp.headers) == (200, OK_BODY, False)
        assert server.connections == 1


# -- connections closed by the server ---------------------------------------------------------------


async def test_an_idle_connection_closed_by_the_server_is_discarded(client: HttpClient) -> None:
    async def handler(req: Req) -> bool:
        await reply(req, ok())
        await asyncio.sleep(0.02)
        return False  # close after replying, without saying so

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        await post(ep)
        await server.wait_for(lambda: server.disconnects == 1)
        await asyncio.sleep(0.01)
        assert client.connections() == 0, "EOF while idle: dropped from the pool at once"
        assert (await post(ep))[1] == OK_BODY
        assert (server.connections, len(server.requests)) == (2, 2)


async def test_a_request_on_a_reused_connection_the_server_closed_is_resent_once(client: HttpClient) -> None:
    async def handler(req: Req) -> bool | None:
        if req.conn == 0 and len(server.requests) == 2:
            return False  # the keep-alive race: closed without a byte of response
        await reply(req, ok(req.body))
        return None

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        assert (await post(ep, b"1"))[1] == b"1"
        assert (await post(ep, b"2"))[1] == b"2"
        assert [(r.conn, r.body) for r in server.requests] == [(0, b"1"), (0, b"2"), (1, b"2")]


async def test_no_resend_once_a_response_byte_arrived(client: HttpClient) -> None:
    async def handler(req: Req) -> bool | None:
        if len(server.requests) == 2:
            await reply(req, b"HTTP/1.1 200")
            return False
        await reply(req, ok())
        return None

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        await post(ep)
        with pytest.raises(ReadError, match="before the response was complete"):
            await post(ep)
        assert len(server.requests) == 2, "not resent"


async def test_no_resend_on_a_fresh_connection(client: HttpClient) -> None:
    async def handler(req: Req) -> bool:
        return False

    async with RawServer(handler) as server:
        with pytest.raises(ReadError, match="before responding"):
            await post(endpoint(client, server))
        assert len(server.requests) == 1


async def test_a_body_cut_short_is_a_read_error(client: HttpClient) -> None:
    async def handler(req: Req) -> bool:
        await reply(req, ok(b"0123456789")[:-4])
        return False

    async with RawServer(handler) as server:
        resp = await endpoint(client, server).request(b"{}")
        with pytest.raises(ReadError, match="before the response was complete"):
            await resp.read()
        resp.close()
        await settle()
        assert client.connections() == 0


# -- early close, cancellation, back-pressure ------------------------------------------------------


@pytest.mark.parametrize("how", ["cancel", "close"])
async def test_giving_up_mid_body_closes_the_connection(client: HttpClient, how: str) -> None:
    async def handler(req: Req) -> None:
        req.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await req.writer.drain()
        await until_client_gone(req)

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        got_first = asyncio.Event()

        async def consume() -> None:
            resp = await ep.request(b"{}")
            try:
                async for _ in resp:
                    got_first.set()
                    if how == "close":
                        break
            finally:
                resp.close()

        task = asyncio.create_task(consume())
        async with asyncio.timeout(2):
            await got_first.wait()
        if how == "cancel":
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            await task
        await server.wait_for(lambda: server.disconnects == 1, timeout_s=1.0)
        assert client.connections() == 0, "never pooled half-read"


async def test_cancelling_while_waiting_for_the_head_closes_the_connection(client: HttpClient) -> None:
    async def handler(req: Req) -> None:
        await until_client_gone(req)

    async with RawServer(handler) as server:
        task = asyncio.create_task(post(endpoint(client, server)))
        await server.wait_for(lambda: len(server.requests) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.wait_for(lambda: server.disconnects == 1, timeout_s=1.0)
        assert client.connections() == 0


async def test_a_slow_consumer_stops_the_socket_being_read(client: HttpClient) -> None:
    total = 64 * 1024 * 1024
    block = b"x" * (64 * 1024)
    sent = 0

    async def handler(req: Req) -> None:
        nonlocal sent
        req.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        while sent < total:
            req.writer.write(block)
            await req.writer.drain()
            sent += len(block)

    async with RawServer(handler) as server:
        resp = await endpoint(client, server).request(b"{}")
        try:
            received = len(await anext(resp))
            await asyncio.sleep(0.3)  # the consumer lags; the server keeps writing until the socket is full
            assert resp._buffered <= HIGH_WATER + 256 * 1024, "buffered bytes stay bounded"
            assert resp._conn is not None and resp._conn.paused
            assert sent < 24 * 1024 * 1024, "the server is held back by TCP, not absorbed by the client"
            async for chunk in resp:
                received += len(chunk)
            assert received == total == sent
            assert resp.complete
        finally:
            resp.close()
        assert client.idle_connections() == 1, "read to the end: back in the pool, reading again"


# -- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tls_files(tmp_path_factory.mktemp("tls"))


async def test_https_with_sni_alpn_keep_alive_and_a_stream(
    tls_files: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_files[0]))  # the default context trusts our CA
    alpn: list[str | None] = []

    async def handler(req: Req) -> None:
        alpn.append(req.writer.get_extra_info("ssl_object").selected_alpn_protocol())
        if req.body == b"stream":
            await reply(req, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\none\r\n")
            await until_client_gone(req)
        else:
            await reply(req, ok(req.body), pieces=5, delay_s=0.001)

    client = new_session()
    try:
        async with RawServer(handler, ssl_context=server_tls(tls_files)) as server:
            ep = endpoint(client, server)
            assert ep.url.startswith("https://localhost:")
            for i in range(3):
                assert (await post(ep, b"%d" % i))[1] == b"%d" % i
            assert server.connections == 1
            assert alpn == ["http/1.1"] * 3
            resp = await ep.request(b"stream")
            assert await anext(resp) == b"one"
            resp.close()
            await server.wait_for(lambda: server.disconnects == 1, timeout_s=1.0)
    finally:
        await client.close()


async def test_https_with_an_untrusted_certificate_is_a_connect_error(tls_files: tuple[Path, Path]) -> None:
    async def handler(req: Req) -> None:
        await reply(req, ok())

    client = new_session(ssl_context=ssl.create_default_context())  # system CAs only
    try:
        async with RawServer(handler, ssl_context=server_tls(tls_files)) as server:
            with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await post(endpoint(client, server))
            provider = build_provider(ProviderSettings("tls", "openai-compatible", server.url), client)
            with pytest.raises(ProviderError) as info:
                await provider.chat("m", _ask())
            assert (info.value.reason, info.value.retryable) == ("UPSTREAM_CONNECT_ERROR", True)
            assert client.connections() == 0
    finally:
        await client.close()


async def test_cancelled_during_the_tls_handshake_leaks_nothing(client: HttpClient) -> None:
    accepted: list[asyncio.StreamReader] = []
    hello = asyncio.Event()
    gone = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(reader)
        await reader.read(1)  # the ClientHello has started: the client now waits in its TLS handshake
        hello.set()
        await reader.read()  # until the client goes away
        gone.set()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        ep = client.endpoint(f"https://localhost:{port}/v1", [])
        request = asyncio.create_task(ep.request(b"{}"))
        async with asyncio.timeout(5):
            await hello.wait()  # cancelled mid-handshake, however slow the machine (no fixed timeout)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        assert len(accepted) == 1
        async with asyncio.timeout(1):
            await gone.wait()
        pool = next(iter(client._pools.values()))
        assert (pool._open, client.connections()) == (0, 0)
    finally:
        server.close()


# -- errors and configuration ---------------------------------------------------------------------


def _ask() -> Any:
    from feather_grpc.core.types import ChatRequest, Message, Role

    return ChatRequest(model="m", messages=[Message(Role.USER, "hi")])


async def test_connect_errors_and_invalid_urls(client: HttpClient) -> None:
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectError, match=r"cannot connect to 127\.0\.0\.1"):
        await client.endpoint(f"http://127.0.0.1:{port}/v1").request(b"{}")
    for url in ("ftp://example.com/", "http:///nohost", "http://example.com:99999/"):
        with pytest.raises(InvalidURL):
            await client.endpoint(url).request(b"{}")
    provider = build_provider(ProviderSettings("bad", "openai-compatible", "ftp://example.com"), client)
    with pytest.raises(ProviderError) as info:
        await provider.chat("m", _ask())
    assert (info.value.reason, info.value.retryable, info.value.message) == (
        "UPSTREAM_CONNECT_ERROR",
        False,
        "bad: invalid URL",
    )


def test_header_injection_is_refused() -> None:
    client = HttpClient()
    with pytest.raises(ValueError, match="invalid HTTP header"):
        client.endpoint("http://127.0.0.1/", [("X-Evil", "a\r\nHost: elsewhere")])
    with pytest.raises(ValueError, match="invalid HTTP header"):
        client.endpoint("http://127.0.0.1/", [("Bad Name", "x")])
    with pytest.raises(ValueError, match="set by the HTTP client"):
        client.endpoint("http://127.0.0.1/", [("Content-Length", "3")])


async def test_closing_the_client_fails_requests_in_flight_and_waiters() -> None:
    async def handler(req: Req) -> None:
        await until_client_gone(req)

    client = HttpClient(max_per_host=1)
    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        busy = asyncio.create_task(post(ep))
        await server.wait_for(lambda: len(server.requests) == 1)
        waiting = asyncio.create_task(post(ep))
        await asyncio.sleep(0.01)
        await client.close()
        with pytest.raises(ReadError, match="client closed"):
            await busy
        with pytest.raises(ConnectError, match="client closed"):
            await waiting
        with pytest.raises(ConnectError, match="client closed"):
            await post(ep)
        await server.wait_for(lambda: server.disconnects == 1, timeout_s=1.0)


def test_the_same_under_uvloop() -> None:
    """The gateway serves on uvloop when it is installed: its transports are not asyncio's."""
    uvloop = pytest.importorskip("uvloop")

    async def scenario() -> None:
        async def handler(req: Req) -> bool | None:
            if req.body == b"hold":
                await reply(req, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                await until_client_gone(req)
                return False
            if req.body == b"stale" and req.conn == 0:
                return False
            await reply(req, chunked([req.body, b"!"], trailers="T: 1\r\n"), pieces=4, delay_s=0.001)
            return None

        client = HttpClient()
        try:
            async with RawServer(handler) as server:
                ep = endpoint(client, server)
                assert (await post(ep, b"a"))[1] == b"a!"
                assert (await post(ep, b"b"))[1] == b"b!"
                assert server.connections == 1
                assert (await post(ep, b"stale"))[1] == b"stale!"  # resent on a fresh connection
                assert server.connections == 2
                resp = await ep.request(b"hold")
                assert await anext(resp) == b"first"
                resp.close()
                await server.wait_for(lambda: server.disconnects == 2, timeout_s=1.0)
        finally:
            await client.close()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


# -- the end of a stream ----------------------------------------------------------------------------


SSE_EVENTS = [
    b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n',
    b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":1}}\n\n',
    b"data: [DONE]\n\n",
]


async def test_a_stream_whose_last_chunk_comes_late_keeps_its_connection(client: HttpClient) -> None:
    last_chunk: list[asyncio.Event] = []

    async def handler(req: Req) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        req.writer.write(head + b"".join(b"%X\r\n%s\r\n" % (len(e), e) for e in SSE_EVENTS))
        await req.writer.drain()
        await last_chunk[-1].wait()  # [DONE] is out; the terminating chunk follows once the test has checked
        req.writer.write(b"0\r\n\r\n")
        await req.writer.drain()

    async with RawServer(handler) as server:
        provider = build_provider(ProviderSettings("oa", "openai-compatible", server.url, api_key="k"), client)
        for _ in range(3):
            last_chunk.append(asyncio.Event())
            async with asyncio.timeout(5):  # the stream ends at [DONE], without waiting for the body's end
                events = [e async for e in provider.stream("m", _ask())]
            assert events[0].content == "Hi" and events[-1].usage.output_tokens == 1  # type: ignore[union-attr]
            assert client.idle_connections() == 0, "still waiting for the end of the body"
            last_chunk[-1].set()
            await eventually(lambda: client.idle_connections() == 1, what="the connection back in the pool")
        assert server.connections == 1, "each stream's connection was pooled once its body ended"


async def test_release_after_end_closes_when_the_end_does_not_come(client: HttpClient) -> None:
    async def handler(req: Req) -> None:
        req.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await req.writer.drain()
        await asyncio.sleep(0.01)
        req.writer.write(b"4\r\nmore\r\n")  # discarded: nobody reads any more
        await until_client_gone(req)

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        resp = await ep.request(b"{}")
        assert await anext(resp) == b"first"
        resp.release_after_end(0.1)
        resp.close()  # changes nothing now
        assert server.disconnects == 0
        await server.wait_for(lambda: server.disconnects == 1, timeout_s=1.0)
        await settle()
        assert client.connections() == 0


# -- compressed bodies and size limits -------------------------------------------------------------


def _encoded(body: bytes, coding: str, *, length: bool = True) -> bytes:
    framing = f"Content-Length: {len(body)}" if length else "Connection: close"
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Encoding: {coding}\r\n{framing}\r\n\r\n"
    return head.encode() + body


@pytest.mark.parametrize("coding", ["gzip", "x-gzip", "deflate"])
async def test_a_compressed_body_is_decoded_whatever_the_framing(client: HttpClient, coding: str) -> None:
    plain = b'{"answer":"' + b"compressible " * 5000 + b'"}'
    packed = gzip.compress(plain) if "gzip" in coding else zlib.compress(plain)
    responses = [
        _encoded(packed, coding),
        chunked([packed[:100], packed[100:]]).replace(
            b"Transfer-Encoding: chunked", f"Transfer-Encoding: chunked\r\nContent-Encoding: {coding}".encode()
        ),
    ]

    async def handler(req: Req) -> None:
        await reply(req, responses[len(server.requests) - 1], pieces=7, delay_s=0.001)

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        assert (await post(ep))[1] == plain
        resp = await ep.request(b"{}")
        pieces = [piece async for piece in resp]
        assert b"".join(pieces) == plain
        assert server.connections == 1  # both read to the end: the connection was reused


async def test_a_compression_bomb_inflates_in_bounded_steps_and_stops_at_the_limit(client: HttpClient) -> None:
    bomb = gzip.compress(b"\0" * (64 << 20), compresslevel=9)  # 64 MiB in ~64 KiB

    async def handler(req: Req) -> None:
        await reply(req, _encoded(bomb, "gzip"))

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        resp = await ep.request(b"{}")
        sizes = [len(await anext(resp)) for _ in range(5)]
        assert max(sizes) <= DECODE_STEP
        resp.close()
        resp = await ep.request(b"{}")
        with pytest.raises(BodyTooLarge, match="over the 1048576-byte limit"):
            await resp.read(1 << 20)


async def test_a_content_length_over_the_limit_is_refused_before_reading(client: HttpClient) -> None:
    async def handler(req: Req) -> None:
        req.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 314572800\r\n\r\n" + b"x" * 1000)
        await req.writer.drain()
        await until_client_gone(req)  # the rest never comes: only the limit can end the read

    async with RawServer(handler) as server:
        resp = await endpoint(client, server).request(b"{}")
        with pytest.raises(BodyTooLarge) as caught:
            await resp.read(1 << 20)
        assert str(caught.value) == "response body over the 1048576-byte limit (Content-Length 314572800)"
        await server.wait_for(lambda: server.disconnects == 1)
        assert client.connections() == 0


async def test_an_endless_body_stops_at_the_limit_and_closes_the_connection(client: HttpClient) -> None:
    async def handler(req: Req) -> None:
        req.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            while True:
                req.writer.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
                await req.writer.drain()

    async with RawServer(handler) as server:
        resp = await endpoint(client, server).request(b"{}")
        with pytest.raises(BodyTooLarge, match="over the 2097152-byte limit"):
            await resp.read(2 << 20)
        await server.wait_for(lambda: server.disconnects == 1)
        assert client.connections() == 0


@pytest.mark.parametrize(
    ("body", "coding", "error"),
    [
        (b"\x1b\x00\x00", "br", "Content-Encoding 'br' cannot be decoded"),
        (gzip.compress(b'{"a":1}')[:-6], "gzip", "compressed body ended before its end marker"),
        (b"not gzip at all", "gzip", "malformed compressed body"),
    ],
)
async def test_a_body_that_cannot_be_decoded_fails_the_read(
    client: HttpClient, body: bytes, coding: str, error: str
) -> None:
    async def handler(req: Req) -> None:
        await reply(req, _encoded(body, coding))

    async with RawServer(handler) as server:
        with pytest.raises(ReadError, match=error) as caught:
            await post(endpoint(client, server))
        assert isinstance(caught.value, UnsupportedEncoding) == (coding == "br")


# -- pooled connections keep no call alive --------------------------------------------------------


async def test_a_connection_resumed_by_a_slow_reader_keeps_no_call_alive(client: HttpClient) -> None:
    """Backpressure resumes the socket from the reader's task (a call): asyncio registers the new reader
    handle in the current context, which must not make that call live as long as the pooled connection."""
    body = b"x" * (4 * HIGH_WATER)

    async def handler(req: Req) -> None:
        req.writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        await req.writer.drain()

    async def call(ep: Endpoint) -> bytes:
        current_call.set(ServerCall("Chat", 0.0))  # in this task's own copy of the context, as a call has
        resp = await ep.request(b"{}")
        try:
            await eventually(lambda: resp._conn is not None and resp._conn.paused, what="the socket paused")
            return await resp.read()  # resumes the socket from this task
        finally:
            resp.close()

    async with RawServer(handler) as server:
        task = asyncio.create_task(call(endpoint(client, server)))
        assert await task == body
        del task  # the call is over: its task, and with it its context, is gone...
        await asyncio.sleep(0)  # ...once the loop's handle that woke us with it has run (not a wait for I/O)
        assert client.idle_connections() == 1
        gc.collect()
        # The reader handle lives in the loop's selector, not in the transport: look at every object.
        assert [o for o in gc.get_objects() if isinstance(o, ServerCall)] == []
