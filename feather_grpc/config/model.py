"""The resolved configuration: plain frozen objects the engine and server read (never JSON or the
environment on the request path). `GatewayConfig` holds the providers and one object per section (routing,
server, ledger, shared state, tenancy), each built by its own resolver."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from feather_grpc.config.schema import DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_IN_FLIGHT, DEFAULT_MAX_LOOP_LAG_MS
from feather_grpc.core.breaker import BreakerSettings
from feather_grpc.core.cache import CacheSettings
from feather_grpc.core.egress import DIRECT, Egress
from feather_grpc.core.pricing import Price
from feather_grpc.core.upstream import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_RESPONSE_BYTES


@dataclass(frozen=True, slots=True)
class ModelConfig:
    provider: str
    name: str
    aliases: tuple[str, ...]
    price: Price | None  # None only when unpriced models are explicitly allowed
    capabilities: tuple[str, ...]
    weight: int = 1
    max_output_tokens: int | None = None  # the model's longest reply, when configured
    tier_prices: tuple[tuple[str, Price], ...] = ()  # (service tier, its price): see price_on
    long_context: tuple[int, Price] | None = None  # (above this many input tokens, the price): see price_on

    def price_on(self, tier: str, input_tokens: int) -> Price | None:
        """The price of a call with `input_tokens` of prompt that the upstream says it served on `tier`
        (OpenAI's and Anthropic's `service_tier`): the long-context price past its threshold, else the tier's
        when configured, else the model's. (Config keeps a model from having both.)"""
        if self.long_context is not None and input_tokens > self.long_context[0]:
            return self.long_context[1]
        for name, price in self.tier_prices:
            if name == tier:
                return price
        return self.price


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    type: str
    base_url: str
    api_key: str = field(repr=False)
    timeout_ms: int
    models: tuple[ModelConfig, ...]
    first_token_timeout_ms: int | None = None
    idle_timeout_ms: int | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    propagate_trace_context: bool = True
    egress: Egress = DIRECT
    transport: str = "builtin"  # the upstream HTTP client: "builtin" or "aiohttp"
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    max_stream_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    auth: str = ""  # "" (the API key) | "entra"
    api_version: str = ""
    region: str = ""
    project: str = ""
    responses_models: tuple[str, ...] = ()  # served through the Responses API
    thinking_budgets: tuple[tuple[str, int], ...] = ()  # gemini/vertex: model name -> thinking budget
    upstream_ids: tuple[tuple[str, str], ...] = ()  # model name -> upstream id (Azure deployment)
    extra_headers: tuple[tuple[str, str], ...] = ()
    default_fields: dict[str, Any] = field(default_factory=dict, hash=False)


@dataclass(frozen=True, slots=True)
class RetryConfig:
    max_attempts: int = 3
    base_ms: int = 250
    max_ms: int = 3000


@dataclass(frozen=True, slots=True)
class RouteConfig:
    """Routing rules for one requested name (model or alias)."""

    policy: str = ""  # "" = the global policy
    hedge_after_ms: int | None = None
    fallbacks: tuple[str, ...] = ()  # names tried after all of this name's candidates failed
    context_window_fallbacks: tuple[str, ...] = ()  # names tried when the prompt is too long


@dataclass(frozen=True, slots=True)
class TenantConfig:
    name: str
    role: str = "member"  # "member" | "admin" (admins may read every tenant's usage)
    allowed_models: frozenset[str] | None = None  # None: every model
    requests: tuple[float, int] | None = None  # token bucket (per second, burst) on calls
    tpm: int | None = None
    concurrency: int | None = None
    daily_budget_nanos: int | None = None
    monthly_budget_nanos: int | None = None


@dataclass(frozen=True, slots=True)
class AuthConfig:
    key_hashes: dict[str, str] = field(default_factory=dict)  # sha256 hex digest -> tenant name
    jwt_secret: str = field(default="", repr=False)
    jwt_tenant_claim: str = "tenant"
    # jwtDefaultPolicy: what a tenant a JWT names that the config does not list may do (its name is filled
    # in per caller); without one, it may call no model.
    unlisted: TenantConfig = field(default_factory=lambda: TenantConfig("", allowed_models=frozenset()))

    @property
    def open(self) -> bool:
        """No keys and no JWT secret: every caller is tenant `default`."""
        return not self.key_hashes and not self.jwt_secret


@dataclass(frozen=True, slots=True)
class InputLimits:
    max_messages: int = 256
    max_content_chars: int = 200_000
    max_output_tokens: int = 65_536


@dataclass(frozen=True, slots=True)
class TlsConfig:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """How a call finds its provider, and what happens on the way."""

    policy: str = "first"
    routes: dict[str, RouteConfig] = field(default_factory=dict)
    retry: RetryConfig = field(default_factory=RetryConfig)
    request_timeout_ms: int = 120_000
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    cache: CacheSettings = field(default_factory=CacheSettings)
    redact_pii: frozenset[str] = frozenset()  # PII kinds redacted before a request leaves; empty: off
    input_limits: InputLimits = field(default_factory=InputLimits)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    """The gRPC server: where it listens, how much it takes in, how it stops."""

    host: str = "127.0.0.1"
    port: int = 50051
    grace_period_s: float = 20.0
    drain_delay_s: float = 0.0
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_loop_lag_s: float = DEFAULT_MAX_LOOP_LAG_MS / 1000
    max_message_bytes: int = 8 * 1024 * 1024
    tls: TlsConfig | None = None


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """Where usage records go: memory, SQLite (`path`) or Postgres (`database_url`, which wins)."""

    type: str = "memory"
    path: str = ":memory:"
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    database_url: str = field(default="", repr=False)


@dataclass(frozen=True, slots=True)
class SharedStateConfig:
    """Redis: limits, budgets, circuits and the cache shared between replicas (no URL: in memory)."""

    redis_url: str = field(default="", repr=False)
    failure_mode: str = "closed"  # when Redis is unreachable: "closed" refuses calls, "open" admits them


@dataclass(frozen=True, slots=True)
class TenancyConfig:
    """Who calls, and what each caller may do."""

    auth: AuthConfig = field(default_factory=AuthConfig)
    tenants: dict[str, TenantConfig] = field(default_factory=dict)
    default_tenant: TenantConfig = field(default_factory=lambda: TenantConfig("default"))
    provider_limits: dict[str, tuple[float, int]] = field(default_factory=dict)  # key -> (rps, burst)
    rate_limit_mode: str = "queue"
    queue_min_call_s: float = 0.05  # queue mode: the least deadline a waiter must have left after its wait


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    """The resolved configuration: the providers, then one object per section."""

    providers: tuple[ProviderConfig, ...]
    skipped_providers: tuple[str, ...] = ()
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    shared_state: SharedStateConfig = field(default_factory=SharedStateConfig)
    tenancy: TenancyConfig = field(default_factory=TenancyConfig)
    source: str = "<in-process>"  # the file it was read from, for messages
