"""Builds and runs the grpc.aio server: FeatherService, health, reflection, graceful shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from feather_grpc.config import GatewayConfig, TlsConfig
from feather_grpc.engine.gateway import Feather
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from feather_grpc.server.servicer import FeatherServicer
from feather_grpc.server.tenancy import TenantGate, TenantInterceptor
from feather_grpc.state.ledger import UsageLedger

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatherService"].full_name
_SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS, or mutual TLS when a client CA is configured (clients must then present a certificate)."""
    with open(tls.key_file, "rb") as key, open(tls.cert_file, "rb") as cert:
        pair = [(key.read(), cert.read())]
    if tls.client_ca_file is None:
        return grpc.ssl_server_credentials(pair)
    with open(tls.client_ca_file, "rb") as ca:
        return grpc.ssl_server_credentials(pair, root_certificates=ca.read(), require_client_auth=True)


def open_ledger(config: GatewayConfig) -> UsageLedger:
    if config.ledger_type == "memory":
        from feather_grpc.state.memory_ledger import MemoryLedger

        return MemoryLedger()
    from feather_grpc.state.sqlite_ledger import SqliteLedger

    return SqliteLedger(config.ledger_path, synchronous=config.ledger_synchronous)


class GatewayServer:
    """One gateway process: the engine behind a grpc.aio server."""

    def __init__(self, config: GatewayConfig, *, engine: Feather | None = None) -> None:
        self.config = config
        self.engine = engine or Feather(config, open_ledger(config))
        self.health = HealthServicer()
        self.gate = TenantGate(config, self.engine.limiter, config.max_in_flight)
        options = [*_SERVER_OPTIONS, ("grpc.max_receive_message_length", config.max_message_bytes)]
        self._server = grpc.aio.server(options=options, interceptors=[TenantInterceptor(self.gate)])
        self.port = 0

    async def start(self, host: str | None = None, port: int | None = None) -> int:
        """Starts serving and returns the bound port (pass port 0 to pick a free one)."""
        await self.engine.start()
        pb_grpc.add_FeatherServiceServicer_to_server(FeatherServicer(self.engine), self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        address = f"{host or self.config.host}:{self.config.port if port is None else port}"
        if self.config.tls is None:
            self.port = self._server.add_insecure_port(address)
        else:
            self.port = self._server.add_secure_port(address, server_credentials(self.config.tls))
        await self._server.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    async def stop(self, grace_s: float | None = None) -> None:
        """NOT_SERVING first so probes and balancers move away, then drain calls, then close pools."""
        await self.health.enter_graceful_shutdown()
        await self._server.stop(self.config.grace_period_s if grace_s is None else grace_s)
        await self.engine.aclose()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def serve(config: GatewayConfig, host: str | None = None, port: int | None = None) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    server = GatewayServer(config)
    bound = await server.start(host, port)
    log.info("feather-grpc serving on %s:%d (config: %s)", host or config.host, bound, config.source)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: draining in-flight calls for up to %gs", config.grace_period_s)
    await server.stop()
    log.info("stopped")
