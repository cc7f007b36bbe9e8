"""Timeouts that add up: a call without a deadline is bounded by requestTimeoutMs, and per-attempt timeouts
(timeoutMs) with their retries never add up past it. The upstream accepts connections and never answers."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import grpc
import pytest

from feather_grpc import config
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.state.memory_ledger import MemoryLedger
from tests.gateway_harness import rich_error, running_gateway, user


@asynccontextmanager
async def silent_upstream() -> AsyncIterator[tuple[str, list[asyncio.StreamReader]]]:
    """An HTTP server that accepts every connection, reads what it is sent and never answers."""
    connections: list[asyncio.StreamReader] = []
    held: list[asyncio.StreamWriter] = []

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(reader)
        held.append(writer)

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", connections
    finally:
        for writer in held:
            writer.close()
        server.close()
        await server.wait_closed()


def document(base_url: str) -> dict[str, Any]:
    return {
        "ledger": {"type": "memory"},
        "providers": {
            "silent": {
                "type": "openai-compatible",
                "baseUrl": base_url,
                "models": [{"name": "m", "aliases": ["fast"], "inputPer1M": 1, "outputPer1M": 1}],
            }
        },
        # Five attempts of 300 ms would hold the call 1.5 s: the 700 ms request timeout cuts that short.
        "timeoutMs": 300,
        "requestTimeoutMs": 700,
        "retry": {"maxAttempts": 5, "baseMs": 1, "maxMs": 2},
        "circuitBreaker": {"enabled": False},
    }


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_call_without_a_deadline_ends_at_the_request_timeout_not_after_every_attempt(streamed: bool) -> None:
    async with silent_upstream() as (url, connections), running_gateway(document(url)) as gw:
        request = pb.ChatRequest(model="fast", messages=[user("hello?")])
        with pytest.raises(grpc.aio.AioRpcError) as raised:  # no timeout: the caller set no deadline
            if streamed:
                async for _ in gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=request.messages)):
                    pass
            else:
                await gw.stub.Chat(request)
        error = rich_error(raised.value)
        assert (error.code, error.reason) == (grpc.StatusCode.DEADLINE_EXCEEDED, "DEADLINE_EXCEEDED")
        assert "the gateway's request timeout (requestTimeoutMs 700) ran out" in error.message
        assert error.metadata["requestTimeoutMs"] == "700"
        # At most ceil(700 / 300) = 3 attempts started, never the 5 the retry policy allows.
        assert 2 <= len(connections) <= 3, len(connections)
        ledger = gw.server.engine.ledger
        assert isinstance(ledger, MemoryLedger)
        (record,) = ledger.records  # billed once, as a deadline error
        assert (record.error_code, record.error_reason) == ("DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED")


async def test_an_earlier_caller_deadline_wins_and_says_it_is_the_callers() -> None:
    async with silent_upstream() as (url, _), running_gateway(document(url)) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hello?")]), timeout=0.2)
        assert raised.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        # The caller's deadline may fire in the client first; if the gateway answered, it names the caller's.
        assert "requestTimeoutMs" not in (raised.value.details() or "")


def test_request_timeout_defaults_to_the_clients_deadline_and_must_be_positive() -> None:
    def load(extra: dict[str, Any]) -> config.GatewayConfig:
        doc = {"providers": {"mock": {"type": "mock", "models": [{"name": "m", "allowUnpriced": True}]}}, **extra}
        return config.resolve(config.parse_file_config(json.dumps(doc), "c.json"), {}, "c.json")

    assert load({}).routing.request_timeout_ms == 120_000
    assert load({"requestTimeoutMs": 5000}).routing.request_timeout_ms == 5000
    with pytest.raises(config.ConfigError, match=r"c\.json: requestTimeoutMs: "):
        load({"requestTimeoutMs": 0})
