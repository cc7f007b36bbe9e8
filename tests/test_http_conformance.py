"""What every upstream HTTP client guarantees (feather_grpc/providers/http_client.py), run against each
implementation: the own HTTP/1.1 client (providers/transport/) and the one on aiohttp
(providers/aiohttp_client.py, `transport: "aiohttp"`).

Real sockets throughout: `RawServer` (tests/raw_http.py) writes whatever bytes a test scripts and counts
connections, requests and disconnects server-side; proxies are sim/proxy.py's. The own client's internals
(its pool, parser, backpressure) are tested in tests/test_http_transport.py.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import sys
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from feather_grpc import config
from feather_grpc.engine.errors import ProviderError
from feather_grpc.engine.types import ChatRequest, Message, Role, StreamFinish, TextDelta
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.providers import ProviderSettings, build_provider
from feather_grpc.providers.aiohttp_client import AiohttpClient
from feather_grpc.providers.content_coding import DECODE_STEP
from feather_grpc.providers.egress import Egress, parse_proxy
from feather_grpc.providers.http import UpstreamClients
from feather_grpc.providers.http_client import (
    AttemptMarker,
    BodyTooLarge,
    ConnectError,
    InvalidURL,
    ReadError,
    UnsupportedEncoding,
    UpstreamClient,
    UpstreamEndpoint,
    attempt_headers,
    attempt_marker,
)
from feather_grpc.providers.transport.client import HttpClient
from sim.proxy import ConnectProxy
from sim.upstream import Reply, SimUsage, UpstreamSimulator
from tests.gateway_harness import running_gateway, user
from tests.raw_http import RawServer, Req, chunked, make_tls_files, ok, reply, server_tls, settle, until_client_gone
from tests.test_gateway_upstream import ENV, sim_config

TRANSPORTS = ("builtin", "aiohttp")
HOST = "llm.corp.invalid"  # only the proxy knows where this is


def new_client(transport: str) -> UpstreamClient:
    return HttpClient() if transport == "builtin" else AiohttpClient()


@pytest.fixture(params=TRANSPORTS)
async def client(request: pytest.FixtureRequest) -> AsyncIterator[UpstreamClient]:
    c = new_client(request.param)
    try:
        yield c
    finally:
        await c.close()


def endpoint(client: UpstreamClient, server: RawServer, **kw: Any) -> UpstreamEndpoint:
    return client.endpoint(server.url, [("Content-Type", "application/json"), ("Authorization", "Bearer k")], **kw)


async def post(ep: UpstreamEndpoint, body: bytes = b"{}", limit: int | None = None) -> tuple[int, bytes]:
    resp = await ep.request(body)
    try:
        return resp.status, await resp.read(limit)
    finally:
        resp.close()


def _ask() -> ChatRequest:
    return ChatRequest(model="m", messages=[Message(Role.USER, "hi")])


# -- requests and keep-alive ----------------------------------------------------------------------


async def test_the_request_head_and_keep_alive_reuse(client: UpstreamClient) -> None:
    async def handler(req: Req) -> None:
        await reply(req, ok(req.body))

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        for i in range(4):
            assert await post(ep, b'{"n":%d}' % i) == (200, b'{"n":%d}' % i)
        assert server.connections == 1, "one keep-alive connection for sequential requests"
        assert client.connections() == 1
        lines = server.requests[0].head.decode().split("\r\n")
        assert lines[0] == "POST /v1/chat HTTP/1.1"
        for line in (
            f"Host: 127.0.0.1:{server.port}",
            "User-Agent: feather-grpc",
            "Accept-Encoding: identity",  # a compressing server buffers SSE events
            "Content-Type: application/json",
            "Authorization: Bearer k",
            "Content-Length: 7",
        ):
            assert line in lines, (line, lines)
        assert not any(line.lower().startswith("cookie") for line in lines)


async def test_the_attempt_context_goes_out_and_comes_back(client: UpstreamClient) -> None:
    async def handler(req: Req) -> None:
        await reply(req, ok())

    async with RawServer(handler) as server:
        marker = AttemptMarker()
        token = attempt_marker.set(marker)
        headers = attempt_headers.set(b"traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n")
        try:
            assert await post(endpoint(client, server)) == (200, b'{"ok":true}')
        finally:
            attempt_headers.reset(headers)
            attempt_marker.reset(token)
        assert marker.sent, "the engine bills an abandoned attempt only if the upstream got it"
        head = server.requests[0].head.decode()
        assert "traceparent: 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\r\n" in head


async def test_a_connect_error_is_not_marked_sent(client: UpstreamClient) -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    marker = AttemptMarker()
    token = attempt_marker.set(marker)
    try:
        with pytest.raises(ConnectError, match=r"cannot connect to 127\.0\.0\.1"):
            await client.endpoint(f"http://127.0.0.1:{port}/v1").request(b"{}")
    finally:
        attempt_marker.reset(token)
    assert not marker.sent
    assert client.connections() == 0


async def test_max_connections_caps_one_providers_connections_to_a_host(client: UpstreamClient) -> None:
    two_in = asyncio.Event()

    async def handler(req: Req) -> None:
        if len(server.requests) >= 2:
            two_in.set()
        await two_in.wait()  # only answers once two requests are open at once
        await reply(req, ok(req.body))

    async with RawServer(handler) as server:
        ep = endpoint(client, server, owner="p", max_connections=2)
        async with asyncio.timeout(10):
            results = await asyncio.gather(*(post(ep, b"%d" % i) for i in range(6)))
        assert sorted(body for _, body in results) == [b"%d" % i for i in range(6)]
        assert server.connections == 2
        assert client.connections("p") == 2 and client.connections("other") == 0


# -- bounded bodies and content coding ------------------------------------------------------------


async def test_a_content_length_over_the_limit_is_refused_before_reading(client: UpstreamClient) -> None:
    async def handler(req: Req) -> None:
        await reply(req, b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b"x" * 100)
        await until_client_gone(req)

    async with RawServer(handler) as server:
        with pytest.raises(BodyTooLarge, match="100000"):
            await post(endpoint(client, server), limit=1000)
        await server.wait_for(lambda: server.disconnects == 1)
        assert client.connections() == 0


async def test_an_endless_body_stops_at_the_limit_and_closes_the_connection(client: UpstreamClient) -> None:
    async def handler(req: Req) -> None:
        req.writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        piece = b"%X\r\n%s\r\n" % (65536, b"y" * 65536)
        try:
            while True:
                req.writer.write(piece)
                await req.writer.drain()
        except ConnectionError:
            pass

    async with RawServer(handler) as server:
        with pytest.raises(BodyTooLarge):
            await post(endpoint(client, server), limit=1024 * 1024)
        await server.wait_for(lambda: server.disconnects == 1, timeout_s=5)
        assert client.connections() == 0


@pytest.mark.parametrize("coding", ["gzip", "deflate"])
@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_gzip_and_deflate_bodies_are_decoded(client: UpstreamClient, coding: str, framing: str) -> None:
    body = b'{"text":"' + b"compressible " * 5000 + b'"}'
    packed = gzip.compress(body) if coding == "gzip" else zlib.compress(body)

    async def handler(req: Req) -> None:
        if framing == "length":
            await reply(req, ok(packed, f"Content-Encoding: {coding}"), pieces=4)
        else:
            data = chunked([packed[:100], packed[100:]])
            await reply(req, data.replace(b"\r\n\r\n", f"\r\nContent-Encoding: {coding}\r\n\r\n".encode(), 1))

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        assert await post(ep) == (200, body)
        assert await post(ep) == (200, body)
        assert server.connections == 1, "a decoded body read to the end keeps its connection"


async def test_a_compression_bomb_inflates_in_bounded_steps_and_stops_at_the_limit(client: UpstreamClient) -> None:
    bomb = gzip.compress(b"\0" * (64 * 1024 * 1024), 9)  # ~64 KiB that inflates to 64 MiB

    async def handler(req: Req) -> None:
        await reply(req, ok(bomb, "Content-Encoding: gzip"))

    async with RawServer(handler) as server, asyncio.timeout(20):
        resp = await endpoint(client, server).request(b"{}")
        try:
            sizes = [len(await anext(aiter(resp))) for _ in range(3)]
        finally:
            resp.close()
        assert max(sizes) <= DECODE_STEP
        with pytest.raises(BodyTooLarge):
            await post(endpoint(client, server), limit=4 * 1024 * 1024)


async def test_a_coding_that_cannot_be_decoded_fails_the_read(client: UpstreamClient) -> None:
    async def handler(req: Req) -> None:
        await reply(req, ok(b"\x1b\x03\x00", "Content-Encoding: br"))

    async with RawServer(handler) as server:
        resp = await endpoint(client, server).request(b"{}")
        try:
            assert resp.status == 200
            with pytest.raises(UnsupportedEncoding, match="'br'"):
                await resp.read()
        finally:
            resp.close()


# -- what a response is never followed by ---------------------------------------------------------


async def test_redirects_are_not_followed(client: UpstreamClient) -> None:
    async def handler(req: Req) -> None:
        await reply(
            req, ok(b"moved", f"Location: http://127.0.0.1:{server.port}/elsewhere").replace(b"200 OK", b"302 Found")
        )

    async with RawServer(handler) as server:
        resp = await endpoint(client, server).request(b"{}")
        try:
            assert (resp.status, resp.headers["location"]) == (302, f"http://127.0.0.1:{server.port}/elsewhere")
            assert await resp.read() == b"moved"
        finally:
            resp.close()
        provider = build_provider(ProviderSettings("r", "openai-compatible", server.url.removesuffix("/chat")), client)
        with pytest.raises(ProviderError) as info:
            await provider.chat("m", _ask())
        assert (info.value.reason, info.value.retryable) == ("UPSTREAM_REDIRECT", False)
        assert len(server.requests) == 2, "the key never went anywhere else"


# -- timeouts, cancellation, failures -------------------------------------------------------------


async def test_a_call_bounded_by_asyncio_timeout_leaks_nothing(client: UpstreamClient) -> None:
    async with RawServer(until_client_gone) as server:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await post(endpoint(client, server))
        await server.wait_for(lambda: server.disconnects == 1)
        assert client.connections() == 0


@pytest.mark.parametrize("how", ["close", "cancel"])
async def test_giving_up_mid_body_closes_the_connection(client: UpstreamClient, how: str) -> None:
    async def handler(req: Req) -> None:
        await reply(req, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
        await until_client_gone(req)

    async with RawServer(handler) as server:
        ep = endpoint(client, server)
        first = asyncio.Event()

        async def consume() -> None:
            resp = await ep.request(b"{}")
            try:
                async for _ in resp:
                    first.set()
                    if how == "close":
                        return
            finally:
                resp.close()

        task = asyncio.create_task(consume())
        await first.wait()
        if how == "cancel":
            task.cancel()
        with pytest.raises(asyncio.CancelledError) if how == "cancel" else _nothing():
            await task
        await server.wait_for(lambda: server.disconnects == 1)
        assert client.connections() == 0, "never pooled half-read"


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


async def test_a_body_cut_short_is_a_read_error(client: UpstreamClient) -> None:
    async def handler(req: Req) -> bool:
        await reply(req, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten..")
        return False  # close the connection

    async with RawServer(handler) as server:
        with pytest.raises(ReadError):
            await post(endpoint(client, server))
        await server.wait_for(lambda: server.disconnects == 1)
        await settle()
        assert client.connections() == 0


async def test_invalid_urls_fail_each_request_and_bad_headers_the_endpoint(client: UpstreamClient) -> None:
    for url in ("ftp://example.com/", "http:///nohost", "http://example.com:99999/"):
        with pytest.raises(InvalidURL):
            await client.endpoint(url).request(b"{}")
    for header in (("X-Bad", "a\r\nInjected: yes"), ("Bad Name", "v"), ("Content-Length", "1")):
        with pytest.raises(ValueError):
            client.endpoint("http://127.0.0.1:1/v1", [header])


async def test_closing_the_client_fails_a_request_in_flight() -> None:
    for transport in TRANSPORTS:

        async def handler(req: Req) -> None:
            await reply(req, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await until_client_gone(req)

        client = new_client(transport)
        async with RawServer(handler) as server:
            resp = await endpoint(client, server).request(b"{}")
            assert await anext(aiter(resp)) == b"first"
            await client.close()
            with pytest.raises(ReadError):
                await resp.read()
            resp.close()
            await server.wait_for(lambda: server.disconnects == 1)


# -- TLS and proxies ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_tls_files(tmp_path_factory.mktemp("tls"), f"DNS:{HOST},DNS:localhost,IP:127.0.0.1")


async def test_https_trusts_the_providers_ca_and_nothing_else(
    client: UpstreamClient, tls_files: tuple[Path, Path]
) -> None:
    async def handler(req: Req) -> None:
        await reply(req, ok(req.body))

    async with RawServer(handler, ssl_context=server_tls(tls_files)) as server:
        trusted = endpoint(client, server, egress=Egress(ca_file=str(tls_files[0])))
        for i in range(3):
            assert await post(trusted, b"%d" % i) == (200, b"%d" % i)
        assert server.connections == 1
        with pytest.raises(ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            await post(endpoint(client, server, owner="system-cas"))
        assert client.connections("system-cas") == 0


async def test_https_through_a_connect_proxy_with_credentials(
    client: UpstreamClient, tls_files: tuple[Path, Path]
) -> None:
    async def handler(req: Req) -> None:
        await reply(req, ok(req.body))

    async with (
        RawServer(handler, ssl_context=server_tls(tls_files)) as server,
        ConnectProxy(hosts={HOST: "127.0.0.1"}, credentials=("gw", "pw")) as proxy,
    ):
        url = f"https://{HOST}:{server.port}/v1/chat"
        egress = Egress(parse_proxy(proxy.url_with("gw", "pw")), ca_file=str(tls_files[0]))
        ep = client.endpoint(url, [("Content-Type", "application/json")], egress)
        for i in range(2):
            assert await post(ep, b"%d" % i) == (200, b"%d" % i)
        assert proxy.tunnels == [f"{HOST}:{server.port}"], "one tunnel, reused"
        assert server.connections == 1
        assert "proxy-authorization" not in server.requests[0].head.decode().lower(), "the origin never sees it"
        refused = client.endpoint(url, [], Egress(parse_proxy(proxy.url_with("gw", "no")), ca_file=str(tls_files[0])))
        with pytest.raises(ConnectError, match="407"):
            await post(refused)


async def test_plain_http_through_a_proxy_in_absolute_form(client: UpstreamClient) -> None:
    async def handler(req: Req) -> None:
        await reply(req, ok(req.body))

    async with RawServer(handler) as server, ConnectProxy(hosts={HOST: "127.0.0.1"}, credentials=("gw", "pw")) as proxy:
        url = f"http://{HOST}:{server.port}/v1/chat"
        ep = client.endpoint(url, [], Egress(parse_proxy(proxy.url_with("gw", "pw"))))
        assert await post(ep, b"hi") == (200, b"hi")
        (forwarded,) = proxy.requests
        assert (forwarded.method, forwarded.target) == ("POST", url)
        assert forwarded.headers["proxy-authorization"] == "Basic " + base64.b64encode(b"gw:pw").decode()
        refused = client.endpoint(url, [], Egress(parse_proxy(proxy.url_with("gw", "no"))))
        with pytest.raises(ConnectError, match="refused the request: 407"):
            await post(refused)


# -- SSE through a provider -----------------------------------------------------------------------


def _sse(*events: str) -> bytes:
    return b"".join(b"data: %s\n\n" % e.encode() for e in events)


CHUNK = '{"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"%s"},"finish_reason":null}]}'
LAST = (
    '{"id":"c1","model":"m","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":3,"completion_tokens":2}}'
)


async def test_a_stream_whose_terminator_comes_late_keeps_its_connection(client: UpstreamClient) -> None:
    released = asyncio.Event()
    ended = asyncio.Event()

    async def handler(req: Req) -> None:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        events = _sse(CHUNK % "hel", CHUNK % "lo", LAST, "[DONE]")
        await reply(req, head + b"%X\r\n%s\r\n" % (len(events), events))
        await released.wait()  # the terminating chunk only once the stream has ended for the caller
        await reply(req, b"0\r\n\r\n")
        ended.set()

    async with RawServer(handler) as server:
        provider = build_provider(ProviderSettings("s", "openai-compatible", server.url.removesuffix("/chat")), client)
        for _ in range(2):
            events = [e async for e in provider.stream("m", _ask())]
            assert "".join(e.content for e in events if isinstance(e, TextDelta)) == "hello"
            assert isinstance(events[-1], StreamFinish) and events[-1].usage is not None
            assert client.idle_connections() == 0, "still waiting for the end of the body"
            ended.clear()
            released.set()
            await ended.wait()
            released.clear()
            await settle()
            assert client.idle_connections() == 1
        assert server.connections == 1, "each stream's connection was pooled once its body ended"


async def test_an_endless_sse_line_fails_at_the_event_cap_and_closes_the_connection(client: UpstreamClient) -> None:
    async def handler(req: Req) -> None:
        req.writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        req.writer.write(b"6\r\ndata: \r\n")
        piece = b"%X\r\n%s\r\n" % (4096, b"z" * 4096)
        try:
            while True:
                req.writer.write(piece)
                await req.writer.drain()
        except ConnectionError:
            pass

    async with RawServer(handler) as server:
        settings = ProviderSettings(
            "s", "openai-compatible", server.url.removesuffix("/chat"), max_stream_event_bytes=65536
        )
        provider = build_provider(settings, client)
        with pytest.raises(ProviderError) as info:
            async for _ in provider.stream("m", _ask()):
                pass
        assert info.value.reason == "UPSTREAM_RESPONSE_TOO_LARGE"
        assert "maxStreamEventBytes" in info.value.message
        await server.wait_for(lambda: server.disconnects == 1, timeout_s=5)
        assert client.connections() == 0


# -- choosing the transport per provider ----------------------------------------------------------


def _doc(sim: Any, transport: Any) -> dict[str, Any]:
    doc = sim_config(sim)
    doc["providers"]["openai"]["transport"] = transport
    return doc


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSimulator]:
    async with UpstreamSimulator() as upstream:
        yield upstream


async def test_a_provider_on_aiohttp_serves_through_the_gateway(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(content="on aiohttp", usage=SimUsage(input=7, output=3)))
    sim.enqueue(Reply(content="streamed on aiohttp", usage=SimUsage(input=7, output=4), split="awkward"))
    async with running_gateway(_doc(sim, "aiohttp"), ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="gpt-sim", messages=[user("hi")]))
        assert (reply.message.content, reply.provider) == ("on aiohttp", "openai")
        assert reply.cost_nanos_usd == 7 * 30_000 + 3 * 60_000
        events = [e async for e in gw.stub.StreamChat(pb.StreamChatRequest(model="gpt-sim", messages=[user("hi")]))]
        assert "".join(e.delta.content for e in events[1:-1]) == "streamed on aiohttp"
        assert (events[-1].end.usage.output_tokens, events[-1].end.usage_estimated) == (4, False)
        assert gw.server.engine.upstream_connections("openai") == 1, "both calls on one keep-alive connection"
        clients = gw.server.engine._upstream
        assert isinstance(clients, UpstreamClients)
        assert clients.get("aiohttp").connections("openai") == 1
        assert clients.get("builtin").connections("openai") == 0


def test_the_transport_is_checked_at_config_load(monkeypatch: pytest.MonkeyPatch) -> None:
    sim = SimpleNamespace(url="http://127.0.0.1:9")  # never called: the config is only loaded
    resolved = config.resolve(config.parse_file_config(json.dumps(_doc(sim, "aiohttp")), "t.json"), ENV, "t.json")
    assert {p.name: p.transport for p in resolved.providers} == {"openai": "aiohttp", "anthropic": "builtin"}
    with pytest.raises(config.ConfigError, match=r"providers\.openai\.transport"):
        config.parse_file_config(json.dumps(_doc(sim, "requests")), "t.json")
    monkeypatch.setitem(sys.modules, "aiohttp", None)  # as if the extra were not installed
    with pytest.raises(config.ConfigError) as missing:
        config.resolve(config.parse_file_config(json.dumps(_doc(sim, "aiohttp")), "t.json"), ENV, "t.json")
    text = str(missing.value)
    assert "providers.openai.transport" in text and "pip install 'feather-grpc[aiohttp]'" in text
