"""Per-call tenancy as a grpc.aio interceptor: who is calling (API key or JWT), and may they call now
(tenant request rate, tenant concurrency, gateway-wide load shedding).

The tenant reaches the servicer through a context variable set inside the wrapped handler, so it is
scoped to exactly one call. Health and reflection are never gated.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from typing import Any

import grpc
import jwt

from feather_grpc.config import GatewayConfig, TenantConfig
from feather_grpc.engine.errors import (
    FeatherError,
    Overloaded,
    RateLimitExceeded,
    StateStoreUnavailable,
    Unauthenticated,
)
from feather_grpc.server.status import status_for
from feather_grpc.state.limits import BucketSpec, RateLimited, RateLimiter, StateUnavailable

log = logging.getLogger(__name__)

current_tenant: ContextVar[TenantConfig] = ContextVar("feather_tenant")

_SERVICE_PREFIX = "/feather.v1.FeatherService/"
_LIMITED_METHODS = frozenset({_SERVICE_PREFIX + "Chat", _SERVICE_PREFIX + "StreamChat"})
# A tenant at its concurrency cap, or a gateway at its in-flight cap, is told to come back this soon.
_BUSY_RETRY_S = 0.25
_MAX_QUEUE_WAIT_S = 30.0


def remaining_s(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline; None without one (grpc.aio reports that as None or as
    an enormous number depending on the version)."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e8 else None


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class TenantGate:
    """Authenticates callers and applies the per-tenant and gateway-wide admission limits."""

    def __init__(self, config: GatewayConfig, limiter: RateLimiter, max_in_flight: int = 0) -> None:
        self._config = config
        self._auth = config.auth
        self._limiter = limiter
        self._queue = config.rate_limit_mode == "queue"
        self._max_in_flight = max_in_flight
        self.in_flight = 0
        self._tenant_in_flight: dict[str, int] = {}
        if self._auth.open:
            log.warning(
                "NO API KEYS CONFIGURED: the gateway is open; every caller is tenant 'default'. "
                "Add tenants with hashed keys (feather-grpc keys new) or set JWT_SECRET."
            )

    def authenticate(self, authorization: str | None) -> TenantConfig:
        if self._auth.open:
            return self._config.default_tenant
        scheme, _, credential = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not credential:
            raise Unauthenticated("missing API key: send `authorization: Bearer <key>`")
        tenant_name = self._auth.key_hashes.get(key_digest(credential))
        if tenant_name is None and self._auth.jwt_secret and credential.count(".") == 2:
            tenant_name = self._jwt_tenant(credential)
        if tenant_name is None:
            raise Unauthenticated("unknown API key")
        return self._config.tenants.get(tenant_name) or TenantConfig(tenant_name)

    def _jwt_tenant(self, token: str) -> str | None:
        try:
            claims = jwt.decode(token, self._auth.jwt_secret, algorithms=["HS256"], options={"require": ["exp"]})
        except jwt.PyJWTError:
            return None
        tenant = claims.get(self._auth.jwt_tenant_claim)
        return tenant if isinstance(tenant, str) and tenant else None

    @asynccontextmanager
    async def admitted(self, tenant: TenantConfig, time_remaining: float | None) -> AsyncIterator[None]:
        """Holds one in-flight slot (gateway and tenant) for the call, after its request-rate token."""
        if self._max_in_flight and self.in_flight >= self._max_in_flight:
            raise Overloaded("the gateway is at its in-flight call limit; retry shortly", _BUSY_RETRY_S)
        cap = tenant.concurrency
        running = self._tenant_in_flight.get(tenant.name, 0)
        if cap is not None and running >= cap:
            raise RateLimitExceeded(
                f"tenant:{tenant.name}:concurrency", f"at most {cap} concurrent calls", _BUSY_RETRY_S
            )
        if tenant.requests is not None:
            await self._take_request_token(tenant, time_remaining)
        self.in_flight += 1
        self._tenant_in_flight[tenant.name] = self._tenant_in_flight.get(tenant.name, 0) + 1
        try:
            yield
        finally:
            self.in_flight -= 1
            self._tenant_in_flight[tenant.name] -= 1

    async def _take_request_token(self, tenant: TenantConfig, time_remaining: float | None) -> None:
        assert tenant.requests is not None
        rate, burst = tenant.requests
        key, spec = f"tenant:{tenant.name}:requests", BucketSpec(rate, burst)
        max_wait = 0.0
        if self._queue:
            max_wait = _MAX_QUEUE_WAIT_S if time_remaining is None else max(time_remaining, 0.0)
        try:
            wait = await self._limiter.reserve(key, spec, 1.0, max_wait)
        except RateLimited as e:
            raise RateLimitExceeded(key, f"{rate * 60:g} requests per minute", e.retry_after_s) from None
        except StateUnavailable:
            raise StateStoreUnavailable("the shared state store is unreachable") from None
        if wait > 0:
            try:
                await asyncio.sleep(wait)
            except BaseException:
                await self._limiter.adjust(key, spec, -1.0)
                raise


class TenantInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, gate: TenantGate) -> None:
        self._gate = gate

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or not method.startswith(_SERVICE_PREFIX):
            return handler
        authorization = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        gate, limited = self._gate, method in _LIMITED_METHODS

        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    tenant = gate.authenticate(authorization)
                    token = current_tenant.set(tenant)
                    try:
                        if not limited:
                            return await inner_unary(request, context)
                        async with gate.admitted(tenant, remaining_s(context)):
                            return await inner_unary(request, context)
                    finally:
                        current_tenant.reset(token)
                except FeatherError as e:
                    await context.abort_with_status(status_for(e))

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )

        inner_stream = handler.unary_stream

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                tenant = gate.authenticate(authorization)
                token = current_tenant.set(tenant)
                try:
                    async with gate.admitted(tenant, remaining_s(context)):
                        async for response in inner_stream(request, context):
                            yield response
                finally:
                    current_tenant.reset(token)
            except FeatherError as e:
                await context.abort_with_status(status_for(e))

        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )
