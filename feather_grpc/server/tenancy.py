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

    async def enter(self, tenant: TenantConfig, time_remaining: float | None) -> None:
        """Takes one in-flight slot (gateway and tenant) for a call, after its request-rate token;
        `leave` gives it back."""
        if self._max_in_flight and self.in_flight >= self._max_in_flight:
            raise Overloaded("the gateway is at its in-flight call limit; retry shortly", _BUSY_RETRY_S)
        cap = tenant.concurrency
        if cap is not None and self._tenant_in_flight.get(tenant.name, 0) >= cap:
            raise RateLimitExceeded(
                f"tenant:{tenant.name}:concurrency", f"at most {cap} concurrent calls", _BUSY_RETRY_S
            )
        if tenant.requests is not None:
            await self._take_request_token(tenant, time_remaining)
        self.in_flight += 1
        self._tenant_in_flight[tenant.name] = self._tenant_in_flight.get(tenant.name, 0) + 1

    def leave(self, tenant: TenantConfig) -> None:
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
    """Wraps each FeatherService method once (the wrapped handler is cached): every call is
    authenticated from its own metadata, and Chat/StreamChat hold a tenant slot while they run."""

    def __init__(self, gate: TenantGate) -> None:
        self._gate = gate
        self._wrapped: dict[grpc.RpcMethodHandler, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(_SERVICE_PREFIX):
            return handler
        wrapped = self._wrapped.get(handler)
        if wrapped is None:
            wrapped = self._wrapped[handler] = self._wrap(handler, details.method in _LIMITED_METHODS)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, limited: bool) -> grpc.RpcMethodHandler:
        gate = self._gate
        if handler.unary_unary is not None:
            inner_unary = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    tenant = gate.authenticate(_authorization(context))
                    token = current_tenant.set(tenant)
                    try:
                        if not limited:
                            return await inner_unary(request, context)
                        await gate.enter(tenant, remaining_s(context))
                        try:
                            return await inner_unary(request, context)
                        finally:
                            gate.leave(tenant)
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
                tenant = gate.authenticate(_authorization(context))
                token = current_tenant.set(tenant)
                try:
                    await gate.enter(tenant, remaining_s(context))
                    try:
                        async for response in inner_stream(request, context):
                            yield response
                    finally:
                        gate.leave(tenant)
                finally:
                    current_tenant.reset(token)
            except FeatherError as e:
                await context.abort_with_status(status_for(e))

        return grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer
        )


def _authorization(context: grpc.aio.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None
