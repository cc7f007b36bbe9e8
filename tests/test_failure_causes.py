"""Errors that say why: an open circuit's error names the upstream failure that opened it (status message and
ErrorInfo metadata), and ListModels and `feather-grpc models` show each model's last failure."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
from typing import Any

import grpc
import pytest
from feather_client import FeatherClient, FeatherError

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from sim.upstream import Reply, UpstreamSimulator
from tests.gateway_harness import rich_error, running_gateway, user


def config(base_url: str) -> dict[str, Any]:
    return {
        "ledger": {"type": "memory"},
        "providers": {
            "local": {
                "type": "openai-compatible",
                "baseUrl": base_url,
                "models": [{"name": "m", "aliases": ["fast"], "inputPer1M": 1, "outputPer1M": 1}],
            }
        },
        "retry": {"maxAttempts": 3, "baseMs": 1, "maxMs": 2},
        "circuitBreaker": {"enabled": True, "failureThreshold": 2, "windowMs": 60000, "resetTimeoutMs": 60000},
    }


REQUEST = pb.ChatRequest(model="fast", messages=[user("hello")])


async def cli(*args: str) -> tuple[int, str, str]:
    """The CLI in a subprocess, without blocking the loop the in-process gateway serves on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "feather_grpc.cli", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return int(proc.returncode or 0), out.decode(), err.decode()


async def test_an_open_circuit_names_the_refused_connection_that_opened_it() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound but never listening: every connection is refused
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
        async with running_gateway(config(url)) as gw:
            before = time.time()
            # Attempts 1 and 2 are refused, which opens the circuit; attempt 3 finds it open.
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await gw.stub.Chat(REQUEST, timeout=10)
            after = time.time()
            error = rich_error(raised.value)
            assert (error.code, error.reason) == (grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
            assert "local:m: circuit open after UPSTREAM_CONNECT_ERROR: local: connect error" in error.message
            assert error.metadata["lastFailureReason"] == "UPSTREAM_CONNECT_ERROR"
            assert error.metadata["lastFailure"].startswith("local: connect error")
            assert "lastFailureHttpStatus" not in error.metadata  # no HTTP answer at all

            with pytest.raises(grpc.aio.AioRpcError) as again:  # every later call says the same, at once
                await gw.stub.Chat(REQUEST, timeout=10)
            assert rich_error(again.value).metadata["lastFailureReason"] == "UPSTREAM_CONNECT_ERROR"

            (model,) = (await gw.stub.ListModels(pb.ListModelsRequest())).models
            assert model.circuit_state == pb.CIRCUIT_STATE_OPEN
            failure = model.last_failure
            assert (failure.reason, failure.http_status) == ("UPSTREAM_CONNECT_ERROR", 0)
            assert failure.message.startswith("local: connect error")
            assert before <= failure.failure_time.ToNanoseconds() / 1e9 <= after

            code, _, err = await cli("chat", "hello", "-m", "fast", "--addr", gw.address)
            assert code == 1 and err.startswith("feather-grpc: UNAVAILABLE UPSTREAM_UNAVAILABLE: "), err
            assert "circuit open after UPSTREAM_CONNECT_ERROR: local: connect error" in err  # not just "circuit open"

            code, table, err = await cli("models", "--addr", gw.address)
            assert code == 0, err
            header, row = table.strip().splitlines()
            assert header.split()[-2:] == ["LAST", "FAILURE"]
            assert row.split()[:4] == ["local", "m", "fast", "open"]
            assert "UPSTREAM_CONNECT_ERROR " in row and " ago: local: connect error" in row
            code, document, err = await cli("models", "--json", "--addr", gw.address)
            (listed,) = json.loads(document)
            assert listed["last_failure"]["reason"] == "UPSTREAM_CONNECT_ERROR"


async def test_an_open_circuit_names_the_401_that_opened_it_and_healthy_models_show_none() -> None:
    async with UpstreamSimulator() as sim:
        sim.default = Reply(status=401)
        document = config(sim.url + "/v1")
        document["providers"]["mock"] = {"type": "mock", "models": [{"name": "ok", "inputPer1M": 1, "outputPer1M": 1}]}
        async with running_gateway(document) as gw:
            for _ in range(2):  # a 401 is not retried: one failure a call, and two open the circuit
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await gw.stub.Chat(REQUEST, timeout=10)
                assert rich_error(raised.value).reason == "UPSTREAM_AUTH_FAILED"
            assert (await gw.stub.Chat(pb.ChatRequest(model="ok", messages=[user("hi")]), timeout=10)).provider
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await gw.stub.Chat(REQUEST, timeout=10)
            error = rich_error(raised.value)
            assert error.code == grpc.StatusCode.UNAVAILABLE
            assert "circuit open after UPSTREAM_AUTH_FAILED" in error.message
            assert (error.metadata["lastFailureReason"], error.metadata["lastFailureHttpStatus"]) == (
                "UPSTREAM_AUTH_FAILED",
                "401",
            )
            failing, healthy = (await gw.stub.ListModels(pb.ListModelsRequest())).models
            assert (failing.last_failure.reason, failing.last_failure.http_status) == ("UPSTREAM_AUTH_FAILED", 401)
            assert not healthy.HasField("last_failure")


async def test_clients_do_not_retry_what_the_gateway_already_retried_so_one_command_cannot_open_the_circuit() -> None:
    """UPSTREAM_UNAVAILABLE carries grpc-retry-pushback-ms -1: the client's own UNAVAILABLE retries (meant for
    a gateway that is down) would otherwise multiply the gateway's attempts."""
    async with UpstreamSimulator() as sim:
        sim.default = Reply(status=503)
        document = config(sim.url + "/v1")
        document["retry"]["maxAttempts"] = 2
        document["circuitBreaker"]["failureThreshold"] = 3  # a client retry would reach it
        async with running_gateway(document) as gw:
            async with FeatherClient(gw.address) as client:  # retries UNAVAILABLE (3 attempts) by default
                with pytest.raises(FeatherError) as raised:
                    await client.chat("hello", model="fast")
            assert raised.value.reason == "UPSTREAM_UNAVAILABLE"
            assert "circuit open" not in raised.value.message
            assert len(sim.requests) == 2, "the gateway's two attempts, and no more"
            code, _, err = await cli("chat", "again", "-m", "fast", "--addr", gw.address)
            assert code == 1 and "circuit open after UPSTREAM_SERVER_ERROR" in err, err
            assert len(sim.requests) == 3, "the third failure opened the circuit; the client did not retry"
