"""A Redis that answers PING but refuses every decision (a read-only replica, OOM under noeviction, MISCONF
after a failed snapshot, an ACL without permission): with `stateFailureMode: closed` health turns
NOT_SERVING with one log line naming Redis's error, and SERVING again when Redis takes decisions again.
Each case is made on a real redis-server with the commands an operator's mistake would be."""

from __future__ import annotations

import asyncio
import copy
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.state.redis_connect import connect
from feather_grpc.state.resp import ReplyError
from tests.gateway_harness import MOCK_CONFIG, rich_error, running_gateway, user
from tests.redis_server import RedisServer

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
GATEWAY_USER, GATEWAY_PASSWORD = "gateway", "gw-pw"

Admin = Callable[..., Awaitable[Any]]


async def make_oom(admin: Admin, _: RedisServer) -> None:
    await admin("CONFIG", "SET", "maxmemory-policy", "noeviction")
    await admin("CONFIG", "SET", "maxmemory", "1")


async def undo_oom(admin: Admin, _: RedisServer) -> None:
    await admin("CONFIG", "SET", "maxmemory", "0")


async def make_readonly(admin: Admin, redis: RedisServer) -> None:
    # A replica of a master that is not there: it stays a replica, and replicas refuse writes.
    await admin("REPLICAOF", "127.0.0.1", "1")


async def undo_readonly(admin: Admin, _: RedisServer) -> None:
    await admin("REPLICAOF", "NO", "ONE")


async def make_misconf(admin: Admin, redis: RedisServer) -> None:
    # Snapshots configured, the last one failed (it cannot write in /proc): Redis stops taking writes.
    await admin("CONFIG", "SET", "save", "3600 1")
    await admin("CONFIG", "SET", "dir", "/proc")
    await admin("BGSAVE")
    for _ in range(200):
        info = await admin("INFO", "persistence")
        if b"rdb_last_bgsave_status:err" in info and b"rdb_bgsave_in_progress:0" in info:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the snapshot did not fail: {info!r}")


async def undo_misconf(admin: Admin, redis: RedisServer) -> None:
    await admin("CONFIG", "SET", "dir", str(redis.directory))
    await admin("BGSAVE")


async def make_noperm(admin: Admin, _: RedisServer) -> None:
    await admin("ACL", "SETUSER", GATEWAY_USER, "-@scripting")


async def undo_noperm(admin: Admin, _: RedisServer) -> None:
    await admin("ACL", "SETUSER", GATEWAY_USER, "+@all")


CASES = {
    "OOM": (make_oom, undo_oom),
    "READONLY": (make_readonly, undo_readonly),
    "MISCONF": (make_misconf, undo_misconf),
    "NOPERM": (make_noperm, undo_noperm),
}


@pytest.mark.parametrize("error", list(CASES))
async def test_a_redis_refusing_decisions_turns_health_not_serving(
    error: str, caplog: pytest.LogCaptureFixture
) -> None:
    make, undo = CASES[error]
    doc = copy.deepcopy(MOCK_CONFIG)
    doc["stateFailureMode"] = "closed"
    doc["tenants"] = {"default": {"limits": {"rpm": 6000}}}  # every call takes a decision in Redis
    caplog.set_level(logging.WARNING, logger="feather_grpc.server.app")
    with RedisServer() as redis:
        admin_client = connect(redis.url)

        async def admin(*args: str) -> Any:
            reply = await admin_client.call(*args)
            assert not isinstance(reply, ReplyError), reply
            return reply

        await admin("ACL", "SETUSER", GATEWAY_USER, "on", f">{GATEWAY_PASSWORD}", "~*", "&*", "+@all")
        url = f"redis://{GATEWAY_USER}:{GATEWAY_PASSWORD}@127.0.0.1:{redis.port}/0"
        try:
            async with running_gateway(doc, {"REDIS_URL": url}) as gw:
                await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("a")]))
                watch = health_pb2_grpc.HealthStub(gw.channel).Watch(
                    health_pb2.HealthCheckRequest(service="feather.v1.FeatherService")
                )
                assert (await watch.read()).status == SERVING

                await make(admin, redis)
                assert (await asyncio.wait_for(watch.read(), 10)).status == NOT_SERVING
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("b")]), timeout=10)
                refused = rich_error(caught.value)
                assert (refused.code, refused.reason) == (grpc.StatusCode.UNAVAILABLE, "STATE_UNAVAILABLE")

                await undo(admin, redis)
                assert (await asyncio.wait_for(watch.read(), 10)).status == SERVING
                await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("c")]))
                watch.cancel()
        finally:
            await admin_client.aclose()
    lines = [r.getMessage() for r in caplog.records if r.name == "feather_grpc.server.app"]
    down = [line for line in lines if "shared state store UNAVAILABLE" in line]
    assert len(down) == 1 and error in down[0], lines
    assert any("shared state store available again" in line for line in lines)
    assert GATEWAY_PASSWORD not in "".join(lines)
