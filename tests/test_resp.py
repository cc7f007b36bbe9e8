"""The lean Redis client (feather_grpc/state/resp.py): its RESP parser byte by byte, and against a real
redis-server: batching, error replies, AUTH + SELECT, unix sockets, callers that give up, outages."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from feather_grpc.core.cache import CachedReply, CacheSettings
from feather_grpc.core.redis_url import RedisAddress
from feather_grpc.core.types import FinishReason, ToolCall
from feather_grpc.state.redis_cache import RedisResponseCache
from feather_grpc.state.resp import RedisClient, RedisUnavailable, ReplyError, _Connection, pack
from tests.redis_server import RedisServer

# Every reply type, nested arrays and a bulk string holding CRLF among them.
STREAM = (
    b"+OK\r\n:-42\r\n$5\r\na\r\nbc\r\n$-1\r\n*-1\r\n-NOSCRIPT No matching script\r\n"
    b"*3\r\n:1\r\n*2\r\n$0\r\n\r\n+x\r\n$3\r\n1.5\r\n"
)
EXPECTED = ["OK", -42, b"a\r\nbc", None, None, "NOSCRIPT No matching script", [1, [b"", "x"], b"1.5"]]


def _plain(value: Any) -> Any:
    return str(value) if isinstance(value, ReplyError) else value


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, len(STREAM)])
async def test_replies_split_anywhere_are_parsed_in_order(chunk: int) -> None:
    conn = _Connection(asyncio.get_running_loop().time)
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in EXPECTED]
    conn.waiting.extend(futures)
    for i in range(0, len(STREAM), chunk):
        conn.data_received(STREAM[i : i + chunk])
    assert [_plain(f.result()) for f in futures] == EXPECTED
    assert isinstance(futures[5].result(), ReplyError)
    assert not conn.waiting


def test_commands_are_packed_as_arrays_of_bulk_strings() -> None:
    assert pack(("SET", b"k\r\n", 7)) == b"*3\r\n$3\r\nSET\r\n$3\r\nk\r\n\r\n$1\r\n7\r\n"


def test_urls() -> None:
    a = RedisAddress.from_url("redis://user:p%40ss@example.com:6390/4")
    assert (a.host, a.port, a.username, a.password, a.db, a.tls) == ("example.com", 6390, "user", "p@ss", 4, None)
    b = RedisAddress.from_url("redis://:secret@127.0.0.1")
    assert (b.port, b.username, b.password, b.db) == (6379, None, "secret", 0)
    assert RedisAddress.from_url("rediss://h:1/0").tls is not None
    u = RedisAddress.from_url("unix:///run/redis.sock?db=2")
    assert (u.unix_path, u.db) == ("/run/redis.sock", 2)
    with pytest.raises(ValueError, match="redis://"):
        RedisAddress.from_url("http://h:1")


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


async def test_one_loop_turn_is_one_write_and_an_error_reply_disturbs_nothing(server: RedisServer) -> None:
    client = RedisClient.from_url(server.url)
    try:
        assert await client.call("SET", "n", "not a number") == "OK"
        trips = client.round_trips
        replies = await asyncio.gather(
            client.call("SET", "a", "1"), client.call("INCR", "n"), client.call("INCR", "a"), client.call("GET", "a")
        )
        assert client.round_trips - trips == 1
        assert replies[0] == "OK" and replies[2] == 2 and replies[3] == b"2"
        assert isinstance(replies[1], ReplyError) and "not an integer" in str(replies[1])
    finally:
        await client.aclose()


async def test_send_now_writes_what_the_turn_queued_at_once(server: RedisServer) -> None:
    """`send_now` writes the commands queued so far before the turn ends; what is queued after still goes
    at the end of the turn, and every reply reaches its own caller."""
    client = RedisClient.from_url(server.url)
    try:
        assert await client.call("PING") == "PONG"  # connected
        trips = client.round_trips
        first = client.call("SET", "s", "1")
        client.send_now()
        assert client.round_trips - trips == 1  # written within this turn
        second = client.call("INCR", "s")
        assert client.round_trips - trips == 1  # queued for the end of the turn
        assert (await first, await second) == ("OK", 2)
        assert client.round_trips - trips == 2
        client.send_now()  # nothing queued: nothing written
        assert client.round_trips - trips == 2
    finally:
        await client.aclose()


async def test_a_caller_that_gives_up_does_not_shift_the_replies(server: RedisServer) -> None:
    client = RedisClient.from_url(server.url)
    try:
        await client.call("SET", "k", "v")
        slow = asyncio.ensure_future(client.call("DEBUG", "SLEEP", "0.05"))
        after = client.call("GET", "k")
        await asyncio.sleep(0)  # both are written
        slow.cancel()
        assert await after == b"v"
        assert await client.call("ECHO", "next") == b"next"
    finally:
        await client.aclose()


async def test_password_and_database_are_used_and_a_wrong_password_is_not_echoed() -> None:
    with RedisServer(extra_args=("--requirepass", "s3cret")) as server:
        url = f"redis://:s3cret@127.0.0.1:{server.port}/3"
        client = RedisClient.from_url(url)
        other = RedisClient.from_url(f"redis://:s3cret@127.0.0.1:{server.port}/0")
        try:
            assert await client.call("SET", "where", "db3") == "OK"
            assert await other.call("GET", "where") is None  # another database
            assert await other.call("SELECT", "3") == "OK"
            assert await other.call("GET", "where") == b"db3"
        finally:
            await client.aclose()
            await other.aclose()
        wrong = RedisClient.from_url(f"redis://:wrong-password@127.0.0.1:{server.port}/0")
        try:
            with pytest.raises(RedisUnavailable, match="AUTH refused") as caught:
                await wrong.call("PING")
            assert "wrong-password" not in str(caught.value)
        finally:
            await wrong.aclose()
        bare = RedisClient.from_url(server.url)
        try:
            reply = await bare.call("GET", "where")
            assert isinstance(reply, ReplyError) and str(reply).startswith("NOAUTH")
        finally:
            await bare.aclose()


async def test_unix_socket() -> None:
    with tempfile.TemporaryDirectory(prefix="feather-sock-") as d:  # short: socket paths max ~100 bytes
        path = Path(d) / "redis.sock"
        with RedisServer(extra_args=("--unixsocket", str(path), "--unixsocketperm", "700")):
            client = RedisClient.from_url(f"unix://{path}")
            try:
                assert await client.call("PING") == "PONG"
                info = await client.call("CLIENT", "INFO")
                assert isinstance(info, bytes) and b"addr=/" in info  # really over the socket
            finally:
                await client.aclose()


async def test_killed_server_fails_fast_and_the_same_client_reconnects(server: RedisServer) -> None:
    client = RedisClient.from_url(server.url, timeout_s=0.25)
    try:
        assert await client.call("PING") == "PONG"
        server.stop()
        with pytest.raises(RedisUnavailable):
            await client.call("PING")
        with pytest.raises(RedisUnavailable, match="cannot connect"):
            await client.call("PING")
        server.start()
        assert await client.call("PING") == "PONG"
    finally:
        await client.aclose()


async def test_hung_server_times_out_every_waiting_call(server: RedisServer) -> None:
    client = RedisClient.from_url(server.url, timeout_s=0.2)
    try:
        assert await client.call("PING") == "PONG"
        server.pause()
        try:
            results = await asyncio.wait_for(
                asyncio.gather(*(client.call("PING") for _ in range(5)), return_exceptions=True), timeout=5
            )
        finally:
            server.resume()
        assert all(isinstance(r, RedisUnavailable) and "no reply within 0.2s" in str(r) for r in results)
        assert await client.call("PING") == "PONG"
    finally:
        await client.aclose()


async def test_closed_client_refuses() -> None:
    client = RedisClient.from_url("redis://127.0.0.1:1/0")
    await client.aclose()
    with pytest.raises(RedisUnavailable, match="closed"):
        await client.call("PING")


def test_the_same_under_uvloop(server: RedisServer) -> None:
    """The gateway serves on uvloop, whose transports are not asyncio's classes."""

    async def scenario() -> None:
        client = RedisClient.from_url(server.url, timeout_s=0.25)
        try:
            assert list(await asyncio.gather(client.call("SET", "u", "1"), client.call("INCR", "u"))) == ["OK", 2]
            server.stop()
            with pytest.raises(RedisUnavailable):
                await client.call("PING")
            server.start()
            assert await client.call("PING") == "PONG"
        finally:
            await client.aclose()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_the_response_cache_in_redis_expires_and_treats_an_outage_as_a_miss(server: RedisServer) -> None:
    client = RedisClient.from_url(server.url, timeout_s=0.25)
    cache = RedisResponseCache(client, CacheSettings(ttl_s=60), namespace="t-cache")
    reply = CachedReply("openai", "gpt-4o", "hello\r\n", (ToolCall("c1", "f", '{"a": 1}'),), FinishReason.TOOL_CALLS)
    try:
        assert await cache.get("k") is None
        await cache.put("k", reply)
        assert await cache.get("k") == reply
        assert 0 < await client.call("PTTL", "t-cache:cache:k") <= 60_000
        server.stop()
        assert await cache.get("k") is None  # an outage is a miss, not an error
        await cache.put("k", reply)  # and a store is skipped
        server.start()
        assert await cache.get("k") is None  # the restarted server is empty; the client reconnected
    finally:
        await client.aclose()
