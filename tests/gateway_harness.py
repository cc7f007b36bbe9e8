"""Starts a real gateway (grpc.aio server on a loopback port) from a config document, for tests."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from feather_grpc import config
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from feather_grpc.server.app import GatewayServer

MOCK_CONFIG: dict[str, Any] = {
    "ledger": {"type": "memory"},
    "providers": {
        "mock": {
            "type": "mock",
            "models": [
                {"name": "mock-fast", "aliases": ["fast"], "inputPer1K": 0.001, "outputPer1K": 0.002},
                {"name": "mock-smart", "aliases": ["smart"], "inputPer1M": 2.5, "outputPer1M": 10},
            ],
        }
    },
}


@dataclass
class Gateway:
    server: GatewayServer
    channel: grpc.aio.Channel
    stub: pb_grpc.FeatherServiceStub
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@asynccontextmanager
async def running_gateway(document: dict[str, Any], env: dict[str, str] | None = None) -> AsyncIterator[Gateway]:
    cfg = config.resolve(config.parse_file_config(json.dumps(document), "<test>"), env or {}, "<test>")
    server = GatewayServer(cfg)
    port = await server.start("127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Gateway(server, channel, pb_grpc.FeatherServiceStub(channel), port)
    finally:
        await channel.close()
        await server.stop(0)


def user(text: str) -> pb.Message:
    return pb.Message(role=pb.ROLE_USER, content=text)


@dataclass
class RichError:
    code: grpc.StatusCode
    message: str
    reason: str
    domain: str
    metadata: dict[str, str]
    error_info_count: int
    violations: list[tuple[str, str]]
    retry_delay_s: float | None


def rich_error(err: grpc.aio.AioRpcError) -> RichError:
    """Decodes the google.rpc.Status a gateway error carries."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status on {err.code()}: {err.details()}"
    assert status.code == err.code().value[0]
    assert status.message == err.details()
    infos, violations, delay = [], [], None
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            infos.append(info)
        elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            violations += [(v.field, v.description) for v in br.field_violations]
        elif d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            ri = error_details_pb2.RetryInfo()
            d.Unpack(ri)
            delay = ri.retry_delay.ToNanoseconds() / 1e9
    assert infos, "every error carries an ErrorInfo"
    return RichError(
        err.code(),
        status.message,
        infos[0].reason,
        infos[0].domain,
        dict(infos[0].metadata),
        len(infos),
        violations,
        delay,
    )


__all__ = ["MOCK_CONFIG", "Gateway", "RichError", "rich_error", "running_gateway", "status_pb2", "user"]
