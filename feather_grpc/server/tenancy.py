"""Per-call tenancy: who is calling (API key or JWT), and may they call now (tenant request rate, tenant
concurrency, gateway-wide load shedding).

`TenantGate` holds the rules and the counts; the call interceptor (`server.calls.CallTracker`) applies it
to every FeatherService call and puts the tenant in `current_tenant`, a context variable set inside the
wrapped handler, so it is scoped to exactly one call. Health and reflection are never gated.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from contextvars import ContextVar

import grpc
import jwt

from feather_grpc.config import GatewayConfig, TenantConfig
from feather_grpc.engine.errors import Overloaded, RateLimitExceeded, StateStoreUnavailable, Unauthenticated
from feather_grpc.state.limits import BucketSpec, RateLimited, RateLimiter, StateUnavailable

log = logging.getLogger(__name__)

current_tenant: ContextVar[TenantConfig] = ContextVar("feather_tenant")

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
        self.open = self._auth.open  # no keys: every caller is `default_tenant`, the metadata is not read
        self.default_tenant = config.default_tenant
        self.in_flight = 0
        self._tenant_in_flight: dict[str, int] = {}
        if self._auth.open:
            log.warning(
                "NO API KEYS CONFIGURED: the gateway is open; every caller is tenant 'default'. "
                "Add tenants with hashed keys (feather-grpc keys new) or set JWT_SECRET."
            )

    def authenticate(self, authorization: str | None) -> TenantConfig:
        if self.open:
            return self.default_tenant
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


def authorization(context: grpc.aio.ServicerContext) -> str | None:
    """The call's `authorization` metadata value, if any."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None
