"""Draining that balancers can see: on SIGTERM `feather-grpc serve` turns health NOT_SERVING and sends it on
every open Watch first; for `server.drainDelayMs` Check answers NOT_SERVING and calls are still served (in
flight and new), then the usual graceful stop: Watches end OK, in-flight calls finish, exit 0. A second
signal ends the delay early."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from sim.upstream import Reply, UpstreamSimulator
from tests.gateway_harness import user
from tests.ops_harness import GatewayProcess, eventually, free_port

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
WATCHES = 5


def start_gateway(tmp_path: Path, sim: UpstreamSimulator, drain_delay_ms: int) -> tuple[GatewayProcess, str]:
    doc: dict[str, Any] = {
        "retry": {"maxAttempts": 1},
        "ledger": {"type": "sqlite", "path": str(tmp_path / "usage.db")},
        "server": {"gracePeriodS": 15, "drainDelayMs": drain_delay_ms},
        "providers": {
            "openai": {
                "type": "openai",
                "apiKeyEnv": "SIM_OPENAI_KEY",
                "baseUrl": sim.url + "/v1",
                "models": [{"name": m, "inputPer1K": 0.03, "outputPer1K": 0.06} for m in ("gpt-slow", "gpt-quick")],
            }
        },
    }
    config = tmp_path / "feather.config.json"
    config.write_text(json.dumps(doc))
    port = free_port()
    gw = GatewayProcess.start(
        ["feather-grpc", "serve", "--config", str(config), "--port", str(port)],
        {"SIM_OPENAI_KEY": "sk-drain-test", "LOG_LEVEL": "info"},
        tmp_path,
    )
    return gw, f"127.0.0.1:{port}"


async def test_sigterm_says_not_serving_to_every_watch_and_check_while_still_serving(tmp_path: Path) -> None:
    delay_s = 2.0
    async with UpstreamSimulator() as sim:
        sim.default = Reply(latency_s=0.01)
        sim.enqueue(Reply(latency_s=delay_s + 1.0), model="gpt-slow")
        gw, address = start_gateway(tmp_path, sim, int(delay_s * 1000))
        # Each Watch on its own connection, as each balancer or sidecar would have.
        channels = [grpc.aio.insecure_channel(address) for _ in range(WATCHES + 1)]
        try:
            await gw.wait_logged("serving on")
            stub = pb_grpc.FeatherServiceStub(channels[-1])
            seen: list[list[int]] = [[] for _ in range(WATCHES)]
            ended: list[grpc.StatusCode] = []

            async def watch(i: int) -> None:
                call = health_pb2_grpc.HealthStub(channels[i]).Watch(health_pb2.HealthCheckRequest(service=""))
                async for reply in call:
                    seen[i].append(reply.status)
                ended.append(await call.code())

            watchers = [asyncio.ensure_future(watch(i)) for i in range(WATCHES)]
            await eventually(lambda: all(s == [SERVING] for s in seen), what="every Watch SERVING")
            in_flight = asyncio.ensure_future(
                stub.Chat(pb.ChatRequest(model="gpt-slow", messages=[user("slow")], request_id="in-flight"))
            )
            await sim.wait_requests(1, timeout_s=5)

            signalled = time.monotonic()
            gw.proc.send_signal(signal.SIGTERM)
            await eventually(lambda: all(s == [SERVING, NOT_SERVING] for s in seen), what="every Watch told")
            # The drain delay: health says NOT_SERVING to a fresh Check, and calls are still served.
            checker = health_pb2_grpc.HealthStub(channels[-1])
            for service in ("", "feather.v1.FeatherService"):
                assert (await checker.Check(health_pb2.HealthCheckRequest(service=service))).status == NOT_SERVING
            late = await stub.Chat(pb.ChatRequest(model="gpt-quick", messages=[user("late")], request_id="late"))
            assert late.message.content
            assert not in_flight.done() and not any(w.done() for w in watchers)

            reply = await in_flight  # outlives the delay: drained like any call in flight
            assert reply.message.content
            await asyncio.wait_for(asyncio.gather(*watchers), 15)
            assert await gw.wait_exit() == 0, gw.output()
            assert time.monotonic() - signalled >= delay_s  # the delay is a floor: nothing stopped before it
        finally:
            for c in channels:
                await c.close()
            gw.kill()

    assert ended == [grpc.StatusCode.OK] * WATCHES  # ended by the server, not cut by the stop
    assert seen == [[SERVING, NOT_SERVING]] * WATCHES
    messages = [str(line.get("message", "")) for line in gw.lines]
    delay_line = next(i for i, m in enumerate(messages) if "drain delay" in m)
    assert delay_line < messages.index("stopped")


async def test_a_second_signal_ends_the_drain_delay(tmp_path: Path) -> None:
    async with UpstreamSimulator() as sim:
        gw, address = start_gateway(tmp_path, sim, 300_000)
        channel = grpc.aio.insecure_channel(address)
        try:
            await gw.wait_logged("serving on")
            health = health_pb2_grpc.HealthStub(channel)
            gw.proc.send_signal(signal.SIGTERM)
            await gw.wait_logged("drain delay")
            # Still answering during the delay: NOT_SERVING.
            assert (await health.Check(health_pb2.HealthCheckRequest(service=""))).status == NOT_SERVING
            gw.proc.send_signal(signal.SIGTERM)
            assert await gw.wait_exit(timeout_s=30) == 0, gw.output()  # not the 300 s delay
        finally:
            await channel.close()
            gw.kill()
