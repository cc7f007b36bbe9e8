"""A ledger that cannot write (here: a real disk-full, a 1 MiB tmpfs filled up): new calls are refused
UNAVAILABLE LEDGER_UNAVAILABLE (with RetryInfo) before they reach an upstream, health turns NOT_SERVING,
one log line says why; when space is freed the gateway serves again by itself. With Postgres as the ledger
of record the local spool is what must be writable, so the spool lives on the tmpfs.

The tmpfs is mounted in a private mount namespace (`unshare -m`) that only the `serve` process sees; the
test reaches it through /proc/<pid>/root to fill it and to free it."""

from __future__ import annotations

import asyncio
import errno
import json
import os
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from sim.upstream import Reply, UpstreamSimulator
from tests.gateway_harness import rich_error, user
from tests.ops_harness import BIN, GatewayProcess, eventually, free_port
from tests.pg_server import PgServer

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def config_file(tmp_path: Path, sim: UpstreamSimulator, ledger_path: Path) -> Path:
    doc: dict[str, Any] = {
        "retry": {"maxAttempts": 1},
        "ledger": {"type": "sqlite", "path": str(ledger_path)},
        "providers": {
            "openai": {
                "type": "openai",
                "apiKeyEnv": "SIM_OPENAI_KEY",
                "baseUrl": sim.url + "/v1",
                "models": [{"name": "gpt-x", "inputPer1K": 0.03, "outputPer1K": 0.06}],
            }
        },
    }
    path = tmp_path / "feather.config.json"
    path.write_text(json.dumps(doc))
    return path


def serve_on_tmpfs(mount: Path, config: Path, port: int, env: dict[str, str], cwd: Path) -> GatewayProcess:
    """`feather-grpc serve` in its own mount namespace, where `mount` is a fresh 1 MiB tmpfs."""
    mount.mkdir()
    script = 'mount -t tmpfs -o size=1m tmpfs "$1" && exec "$2" serve --config "$3" --port "$4"'
    args = [str(mount), str(BIN / "feather-grpc"), str(config), str(port)]
    argv = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *args]
    return GatewayProcess.start(argv, {"SIM_OPENAI_KEY": "sk-ledger-test", "LOG_LEVEL": "info", **env}, cwd)


def fill(directory: Path) -> Path:
    """Writes a file until the file system is full (ENOSPC); returns it."""
    filler = directory / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


async def chat(stub: pb_grpc.FeatherServiceStub, rid: str) -> pb.ChatResponse | grpc.aio.AioRpcError:
    try:
        return await stub.Chat(pb.ChatRequest(model="gpt-x", messages=[user("hi")], request_id=rid), timeout=20)
    except grpc.aio.AioRpcError as e:
        return e


async def ride_out_a_full_disk(gw: GatewayProcess, mount: Path, port: int, sim: UpstreamSimulator) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await gw.wait_logged("serving on")
        stub = pb_grpc.FeatherServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        statuses: list[int] = []

        async def watch() -> None:
            async for reply in health.Watch(health_pb2.HealthCheckRequest(service="feather.v1.FeatherService")):
                statuses.append(reply.status)

        watcher = asyncio.ensure_future(watch())
        assert isinstance(await chat(stub, "before"), pb.ChatResponse)
        await eventually(lambda: statuses == [SERVING], what="health SERVING")

        # A call in flight when the disk fills: the upstream answered, but its record cannot be written.
        sim.enqueue(Reply(content="ok", latency_s=1.0), model="gpt-x")
        in_flight = asyncio.ensure_future(chat(stub, "during-0"))
        await sim.wait_requests(2, timeout_s=5)
        inside = Path(f"/proc/{gw.proc.pid}/root") / mount.relative_to("/")
        filler = await asyncio.to_thread(fill, inside)
        first = await in_flight
        assert isinstance(first, grpc.aio.AioRpcError), "a record on a full disk cannot have been written"
        await eventually(lambda: statuses[-1:] == [NOT_SERVING], what="health NOT_SERVING")
        check = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert check.status == NOT_SERVING
        upstream_calls = len(sim.requests)
        for i in range(1, 4):
            refused = await chat(stub, f"during-{i}")
            assert isinstance(refused, grpc.aio.AioRpcError)
            error = rich_error(refused)
            assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "LEDGER_UNAVAILABLE")
            assert error.retry_delay_s is not None and error.retry_delay_s > 0
            assert "full" in error.message, error.message  # SQLite's own words: "database or disk is full"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in stub.StreamChat(pb.StreamChatRequest(model="gpt-x", messages=[user("s")]), timeout=20):
                pass
        assert rich_error(caught.value).reason == "LEDGER_UNAVAILABLE"
        assert len(sim.requests) == upstream_calls, "no upstream is called while the ledger cannot write"
        assert rich_error(first).reason == "LEDGER_UNAVAILABLE"

        await asyncio.to_thread(filler.unlink)
        await eventually(lambda: statuses[-1:] == [SERVING], timeout_s=10, what="health SERVING again")
        assert isinstance(await chat(stub, "after"), pb.ChatResponse)
        # "before" and "after" only: a refusal is not recorded while the ledger cannot write, and "during-0"
        # (served, but its record refused by the full disk) was not either. Postgres gets the records from
        # the spool shortly after.
        for _ in range(200):
            recorded = (await stub.Usage(pb.UsageRequest())).total.request_count
            if recorded >= 2:
                break
            await asyncio.sleep(0.05)
        assert recorded == 2
        watcher.cancel()
    finally:
        await channel.close()

    unwritable = gw.logged("usage ledger UNWRITABLE")
    assert len(unwritable) == 1, gw.output()
    assert "full" in unwritable[0]["message"]
    assert len(gw.logged("usage ledger writable again")) == 1
    assert "Traceback" not in gw.output()
    (unrecorded,) = gw.logged("usage NOT recorded for")  # what "during-0" cost is in the log, not lost silently
    assert "during-0" in unrecorded["message"] and "cost_nanos_usd=" in unrecorded["message"]


async def test_sqlite_ledger_on_a_full_disk_refuses_calls_and_recovers(tmp_path: Path) -> None:
    mount = tmp_path / "ledger"
    async with UpstreamSimulator() as sim:
        sim.default = Reply(content="ok")
        port = free_port()
        gw = serve_on_tmpfs(mount, config_file(tmp_path, sim, mount / "usage.db"), port, {}, tmp_path)
        try:
            await ride_out_a_full_disk(gw, mount, port, sim)
            gw.proc.terminate()
            assert await gw.wait_exit() == 0, gw.output()
        finally:
            gw.kill()


async def test_postgres_ledger_with_its_spool_on_a_full_disk_refuses_calls_and_recovers(
    tmp_path: Path,
) -> None:
    mount = tmp_path / "spool"
    with PgServer() as pg:
        dsn = pg.create_database(f"ledger_health_{os.getpid()}")
        async with UpstreamSimulator() as sim:
            sim.default = Reply(content="ok")
            port = free_port()
            env = {"DATABASE_URL": dsn, "FEATHER_SPOOL_PATH": str(mount / "usage.spool.db")}
            gw = serve_on_tmpfs(mount, config_file(tmp_path, sim, tmp_path / "unused.db"), port, env, tmp_path)
            try:
                await ride_out_a_full_disk(gw, mount, port, sim)
                gw.proc.terminate()
                assert await gw.wait_exit() == 0, gw.output()
            finally:
                gw.kill()
