"""Per-call tenancy: who is calling (API key or JWT), and may they call now (tenant request rate, tenant
concurrency, gateway-wide load shedding).

`TenantGate` holds the rules and the counts; the call wrapper (`server.calls.CallTracker`) applies it
to every FeatherService call and keeps the tenant on the call's `ServerCall`, so it is scoped to exactly
one call. Health and reflection are never gated.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

import grpc
import jwt

from feather_grpc.config import GatewayConfig, TenantConfig
from feather_grpc.core.errors import Overloaded, RateLimitExceeded, StateStoreUnavailable, Unauthenticated
from feather_grpc.core.limits import BucketSpec, RateLimited, RateLimiter, StateUnavailable
from feather_grpc.engine.admission import queue_wait, rate_limit_exceeded
from feather_grpc.server.loop_lag import LoopLag

log = logging.getLogger(__name__)

# A tenant at its concurrency cap, or a gateway at its in-flight cap, is told to come back this soon.
_BUSY_RETRY_S = 0.25
_MAX_QUEUE_WAIT_S = 30.0
_MAX_UNLISTED_TENANTS = 10_000  # JWT-named tenants whose policy object is kept
# Verified JWTs kept (see TenantGate._jwt_tenant); only a holder of JWT_SECRET can mint one that gets in.
_MAX_VERIFIED_JWTS = 4_096


def remaining_s(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the caller's deadline; None without one (grpc.aio reports that as None or as
    an enormous number depending on the version)."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e8 else None


def key_digest(api_key: str) -> str:
    return hashlib.sha256(api_key.encode()).hexdigest()


class TenantGate:
    """Authenticates callers and applies the per-tenant and gateway-wide admission limits."""

    def __init__(
        self,
        config: GatewayConfig,
        limiter: RateLimiter,
        max_in_flight: int = 0,
        loop_lag: LoopLag | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._tenants = config.tenancy.tenants
        self._auth = config.tenancy.auth
        self._limiter = limiter
        self._queue = config.tenancy.rate_limit_mode == "queue"
        self._min_call_s = config.tenancy.queue_min_call_s
        self._max_in_flight = max_in_flight
        self._loop_lag = loop_lag
        self.open = self._auth.open  # no keys: every caller is `default_tenant`, the metadata is not read
        self.default_tenant = config.tenancy.default_tenant
        self.in_flight = 0
        self._tenant_in_flight: dict[str, int] = {}
        self._unlisted: dict[str, TenantConfig] = {}
        self._verified: dict[str, tuple[str, float]] = {}  # JWT -> (its tenant, its expiry), see _jwt_tenant
        self._clock = clock  # Unix seconds, as PyJWT reads `exp`
        if self._auth.jwt_secret and self._auth.unlisted.allowed_models == frozenset():
            log.info("a JWT naming a tenant the config does not list may call no model (see jwtDefaultPolicy)")
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
        return self._tenants.get(tenant_name) or self._unlisted_tenant(tenant_name)

    def _unlisted_tenant(self, name: str) -> TenantConfig:
        """A tenant a JWT names that the config does not list: `jwtDefaultPolicy` under its own name (its own
        budget and limits), one object per name so per-tenant caches keep working."""
        tenant = self._unlisted.get(name)
        if tenant is None:
            if len(self._unlisted) >= _MAX_UNLISTED_TENANTS:
                self._unlisted.clear()
            tenant = self._unlisted[name] = dataclasses.replace(self._auth.unlisted, name=name)
        return tenant

    def _jwt_tenant(self, token: str) -> str | None:
        """The tenant a valid token names. A caller sends the same token with each call until it expires, and
        verifying it (PyJWT: parse, HMAC, claims) costs ~30 µs, several percent of a call's CPU: so a token
        that verified is kept with its expiry, and later calls only check that expiry, as PyJWT would
        (expired once `exp` <= now; any `nbf` or `iat` was already in the past when it verified)."""
        known = self._verified.get(token)
        if known is not None:
            tenant, expires = known
            if self._clock() < expires:
                return tenant
            del self._verified[token]
            return None
        try:
            claims = jwt.decode(token, self._auth.jwt_secret, algorithms=["HS256"], options={"require": ["exp"]})
        except jwt.PyJWTError:
            return None
        named = claims.get(self._auth.jwt_tenant_claim)
        if not (isinstance(named, str) and named):
            return None
        if len(self._verified) >= _MAX_VERIFIED_JWTS:
            self._verified.clear()
        self._verified[token] = (named, float(claims["exp"]))
        return named

    def enter(self, tenant: TenantConfig, time_remaining: float | None) -> RequestToken | None:
        """Takes one in-flight slot (gateway and tenant) for a call, and asks for its request-rate token:
        the token's verdict comes later (`RequestToken`), so the engine can await it together with its own
        admission decisions. `leave` gives the slot back."""
        if self._max_in_flight and self.in_flight >= self._max_in_flight:
            raise Overloaded("the gateway is at its in-flight call limit; retry shortly", _BUSY_RETRY_S)
        lag = self._loop_lag
        if lag is not None and lag.saturated:
            raise Overloaded(
                f"the gateway is saturated (a new call waits {lag.delay_s * 1000:.0f} ms to start); retry elsewhere",
                lag.retry_after_s,
            )
        cap = tenant.concurrency
        if cap is not None and self._tenant_in_flight.get(tenant.name, 0) >= cap:
            raise RateLimitExceeded(
                f"tenant:{tenant.name}:concurrency", f"at most {cap} concurrent calls", _BUSY_RETRY_S
            )
        token = self._request_token(tenant, time_remaining) if tenant.requests is not None else None
        self.in_flight += 1
        self._tenant_in_flight[tenant.name] = self._tenant_in_flight.get(tenant.name, 0) + 1
        return token

    def leave(self, tenant: TenantConfig) -> None:
        self.in_flight -= 1
        self._tenant_in_flight[tenant.name] -= 1

    def _request_token(self, tenant: TenantConfig, time_remaining: float | None) -> RequestToken:
        assert tenant.requests is not None
        rate, burst = tenant.requests
        key, spec = f"tenant:{tenant.name}:requests", BucketSpec(rate, burst)
        max_wait = 0.0
        if self._queue:
            # leaves room for the call after the wait (the engine narrows it to the route's latency)
            max_wait = _MAX_QUEUE_WAIT_S if time_remaining is None else max(time_remaining - self._min_call_s, 0.0)
        what = f"{rate * 60:g} requests per minute"
        try:
            pending: Awaitable[float] = self._limiter.reserve(key, spec, 1.0, max_wait)
        except Exception as e:  # refused at once (a bad spec): the verdict says so
            pending = _failed(e)
        return RequestToken(self._limiter, key, spec, what, pending)


class RequestToken:
    """A call's tenant request-rate token, asked for by the call wrapper (with Redis: already on its way)
    and judged by the engine before it serves anything, alongside its own admission decisions, so that
    they share one round trip. Calling it awaits the verdict once: it raises RateLimitExceeded or
    StateStoreUnavailable, or waits the token's queue time. The call wrapper `discard`s a token the call
    never judged (a request refused before admission), so the token is still taken.

    `max_wait_s` is how long the caller may wait now, as the engine knows it (room left for the route's
    latency): a token due later is given back and the call refused at once, like any queue overflow."""

    def __init__(self, limiter: RateLimiter, key: str, spec: BucketSpec, what: str, pending: Awaitable[float]) -> None:
        self._limiter = limiter
        self.key, self._spec, self._what = key, spec, what
        self._pending: Awaitable[float] | None = pending

    async def __call__(self, max_wait_s: float | None = None) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return  # judged already
        try:
            wait = await pending
        except RateLimited as e:
            raise rate_limit_exceeded(e, self.key, self._what) from None
        except StateUnavailable:
            raise StateStoreUnavailable("the shared state store is unreachable") from None
        if max_wait_s is not None and wait > max_wait_s:
            with contextlib.suppress(StateUnavailable):
                await self._limiter.adjust(self.key, self._spec, -1.0)
            raise rate_limit_exceeded(RateLimited(self.key, wait), self.key, self._what)
        await queue_wait(self._limiter, self.key, self._spec, 1.0, wait)

    async def discard(self) -> None:
        """Awaits a verdict nobody judged (the token stays taken, as it would have been)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            with contextlib.suppress(RateLimited, StateUnavailable):
                await pending


async def _failed(e: Exception) -> float:
    raise e


def authorization(context: grpc.aio.ServicerContext) -> str | None:
    """The call's `authorization` metadata value, if any."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization":
            return str(value)
    return None
