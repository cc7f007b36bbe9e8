"""Gateway configuration: `feather.config.json` (the original schema, extended), env overrides, defaults.

Everything is parsed and validated once at start; the engine then reads plain resolved objects and
never touches JSON or the environment on the request path.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import ssl
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from feather_grpc.engine.breaker import BreakerSettings
from feather_grpc.engine.cache import CacheSettings
from feather_grpc.engine.pricing import NANOS_PER_USD, Price, usd_to_nanos_per_million
from feather_grpc.providers.base import DEFAULT_MAX_RESPONSE_BYTES
from feather_grpc.providers.credentials import missing_extra
from feather_grpc.providers.egress import DIRECT, Egress, env_proxy, parse_proxy, tls_context
from feather_grpc.providers.sse import DEFAULT_MAX_EVENT_BYTES

log = logging.getLogger(__name__)

ProviderType = Literal[
    "openai", "anthropic", "openai-compatible", "azure-openai", "bedrock", "gemini", "vertex", "mock"
]
Policy = Literal["first", "roundrobin", "cheapest", "fastest", "weighted"]
PiiKind = Literal["card", "ssn", "email", "phone"]
_PII_KINDS: tuple[PiiKind, ...] = ("card", "ssn", "email", "phone")

DEFAULT_BASE_URLS = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com",
    "gemini": "https://generativelanguage.googleapis.com/v1beta",
    "mock": "mock://local",
}
_KNOWN_TYPES = ("openai", "anthropic", "gemini", "mock")
# Highest price accepted, in USD per 1M tokens ($1 per token): far above any real model, and the largest
# call cost it allows (1e9 billable tokens) still fits the int64 nano-dollar fields of the API and ledger.
MAX_USD_PER_1M = Decimal(1_000_000)
# Headers the adapters set themselves: credentials, framing, and the wire format's version.
RESERVED_HEADERS = frozenset(
    {"authorization", "x-api-key", "content-type", "content-length", "host", "transfer-encoding", "connection"}
    | {"anthropic-version"}
)
_TOKEN_CHARS = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ModelSpec(_Strict):
    name: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    input_per_1k: Decimal | None = Field(default=None, alias="inputPer1K")
    output_per_1k: Decimal | None = Field(default=None, alias="outputPer1K")
    cached_input_per_1k: Decimal | None = Field(default=None, alias="cachedInputPer1K")
    cache_write_per_1k: Decimal | None = Field(default=None, alias="cacheWritePer1K")
    input_per_1m: Decimal | None = Field(default=None, alias="inputPer1M")
    output_per_1m: Decimal | None = Field(default=None, alias="outputPer1M")
    cached_input_per_1m: Decimal | None = Field(default=None, alias="cachedInputPer1M")
    cache_write_per_1m: Decimal | None = Field(default=None, alias="cacheWritePer1M")
    # Cache writes with a 1-hour TTL (Anthropic: 2x input); unset: the cache-write price
    cache_write_1h_per_1k: Decimal | None = Field(default=None, alias="cacheWrite1hPer1K")
    cache_write_1h_per_1m: Decimal | None = Field(default=None, alias="cacheWrite1hPer1M")
    # Per 1K (or 1M) server-side web search requests (Anthropic: 10.00 per 1K); unset: not billed.
    web_search_per_1k: Decimal | None = Field(default=None, alias="webSearchPer1K")
    web_search_per_1m: Decimal | None = Field(default=None, alias="webSearchPer1M")
    capabilities: list[str] = Field(default_factory=list)
    allow_unpriced: bool = Field(default=False, alias="allowUnpriced")
    weight: int = Field(default=1, ge=0)  # for the `weighted` policy
    deployment: str | None = Field(default=None, min_length=1)  # azure-openai: the deployment (default: name)
    api: Literal["chat", "responses"] | None = None  # openai: the API that serves it (default: the provider's)
    # gemini/vertex: thinking tokens the model may spend (-1: the model decides, 0: none, where it allows)
    thinking_budget: int | None = Field(default=None, alias="thinkingBudget", ge=-1, le=1_000_000)
    # The model's longest reply: Anthropic's required max_tokens when the caller sets none
    max_output_tokens: int | None = Field(default=None, alias="maxOutputTokens", ge=1, le=10_000_000)

    @model_validator(mode="after")
    def _one_unit_per_price(self) -> ModelSpec:
        for kind in ("input", "output", "cached_input", "cache_write", "cache_write_1h", "web_search"):
            if getattr(self, f"{kind}_per_1k") is not None and getattr(self, f"{kind}_per_1m") is not None:
                raise ValueError(f"give {kind} price per 1K or per 1M tokens, not both")
        return self

    def price(self) -> Price | None:
        def one(kind: str) -> int | None:
            for unit, per_tokens in (("1k", 1_000), ("1m", 1_000_000)):
                usd: Decimal | None = getattr(self, f"{kind}_per_{unit}")
                if usd is not None:
                    nanos = usd_to_nanos_per_million(usd, per_tokens)
                    if nanos > MAX_USD_PER_1M * NANOS_PER_USD:
                        alias = ModelSpec.model_fields[f"{kind}_per_{unit}"].alias
                        raise ValueError(f"{alias} is above the maximum of {MAX_USD_PER_1M:,} USD per 1M tokens")
                    return nanos
            return None

        input_price, output_price = one("input"), one("output")
        if input_price is None or output_price is None:
            return None
        cached, write = one("cached_input"), one("cache_write")
        return Price(
            input=input_price,
            output=output_price,
            cached_input=input_price if cached is None else cached,
            cache_write=input_price if write is None else write,
            web_search=one("web_search") or 0,
            cache_write_1h=one("cache_write_1h"),
        )


DEFAULT_MAX_CONNECTIONS = 1000


class ProviderSpec(_Strict):
    type: ProviderType | None = None
    api_key_env: str | None = Field(default=None, alias="apiKeyEnv")
    api_key_file: str | None = Field(default=None, alias="apiKeyFile")
    base_url: str | None = Field(default=None, alias="baseUrl")
    timeout_ms: int | None = Field(default=None, alias="timeoutMs", gt=0)
    first_token_timeout_ms: int | None = Field(default=None, alias="firstTokenTimeoutMs", gt=0)
    idle_timeout_ms: int | None = Field(default=None, alias="idleTimeoutMs", gt=0)
    # Open connections to each of its hosts, per process; calls beyond it wait for one (first come, first served).
    max_connections: int = Field(default=DEFAULT_MAX_CONNECTIONS, alias="maxConnections", ge=1, le=100_000)
    # The HTTP client: the built-in one, or aiohttp's (the feather-grpc[aiohttp] extra) for what it lacks
    transport: Literal["builtin", "aiohttp"] = "builtin"
    # What one reply may make the gateway hold: a JSON body whole, a stream one line or event at a time.
    max_response_bytes: int = Field(default=DEFAULT_MAX_RESPONSE_BYTES, alias="maxResponseBytes", ge=1024)
    max_stream_event_bytes: int = Field(default=DEFAULT_MAX_EVENT_BYTES, alias="maxStreamEventBytes", ge=1024)
    required: bool = False
    # false: no W3C trace context (traceparent/tracestate) on this provider's requests when tracing is on
    propagate_trace_context: bool = Field(default=True, alias="propagateTraceContext")
    # Absent: HTTPS_PROXY/HTTP_PROXY/NO_PROXY decide; a URL: always that proxy; null or "": always direct.
    proxy: str | None = None
    ca_file: str | None = Field(default=None, alias="caFile")  # trust only these CAs for this upstream
    client_cert_file: str | None = Field(default=None, alias="clientCertFile")  # mutual TLS
    client_key_file: str | None = Field(default=None, alias="clientKeyFile")  # absent: the key is in the cert file
    # azure-openai: "entra" = a Microsoft Entra token from azure-identity instead of an api-key
    auth: Literal["apiKey", "entra"] | None = None
    # azure-openai: deployment URLs with this ?api-version=; absent: Azure's v1 endpoint
    api_version: str | None = Field(default=None, alias="apiVersion", pattern=r"^[A-Za-z0-9.\-]+$")
    # bedrock: the AWS region (e.g. us-east-1), naming the endpoint and the SigV4 scope; vertex: the location
    region: str | None = Field(default=None, pattern=r"^([a-z]+(-[a-z]+)*-?[0-9]+|global)$")
    api: Literal["chat", "responses"] | None = None  # openai: Chat Completions (default) or the Responses API
    project: str | None = Field(default=None, pattern=r"^[a-z][a-z0-9\-]{4,61}[a-z0-9]$")  # vertex: the project id
    models: list[ModelSpec] = Field(min_length=1)
    # Sent with every request to this provider (`OpenAI-Organization`, `OpenAI-Project`, `anthropic-beta`...)
    extra_headers: dict[str, str] = Field(default_factory=dict, alias="extraHeaders")
    # Body fields every request to this provider gets unless the request sets them (`service_tier`...)
    default_fields: dict[str, Any] = Field(default_factory=dict, alias="defaultFields")

    @field_validator("extra_headers")
    @classmethod
    def _headers(cls, headers: dict[str, str]) -> dict[str, str]:
        for name, value in headers.items():
            if not name or any(c not in _TOKEN_CHARS for c in name):
                raise ValueError(f"header name {name!r} is not an HTTP token")
            if name.lower() in RESERVED_HEADERS:
                raise ValueError(f"header {name!r} is set by the gateway (keys come from apiKeyEnv or apiKeyFile)")
            if any(c in "\r\n\x00" for c in value):
                raise ValueError(f"header {name!r} has a line break or NUL in its value")
        return headers

    @field_validator("default_fields")
    @classmethod
    def _fields(cls, fields: dict[str, Any]) -> dict[str, Any]:
        from feather_grpc.engine.validation import GATEWAY_OWNED_FIELDS

        owned = sorted(GATEWAY_OWNED_FIELDS.intersection(fields))
        if owned:
            raise ValueError(f"{', '.join(owned)} are set by the gateway for each request")
        plain: dict[str, Any] = json.loads(json.dumps(fields, default=float))  # the parse's Decimals as numbers
        return plain

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if not v.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        if any(c.isspace() for c in v):
            raise ValueError("must not contain whitespace")
        try:
            parts = urlsplit(v)
        except ValueError:
            raise ValueError("is not a valid URL") from None
        if not parts.hostname:
            raise ValueError("names no host")
        try:
            port = parts.port
        except ValueError:
            port = 0
        if port is not None and not 1 <= port <= 65535:
            raise ValueError("has a port that is not a number from 1 to 65535")
        return v.rstrip("/")


class RetrySpec(_Strict):
    max_attempts: int = Field(default=3, alias="maxAttempts", ge=1, le=10)
    base_ms: int = Field(default=250, alias="baseMs", ge=0)
    max_ms: int = Field(default=3000, alias="maxMs", ge=0)


class BreakerSpec(_Strict):
    enabled: bool = True
    failure_threshold: int = Field(default=5, alias="failureThreshold", ge=1)
    window_ms: int = Field(default=10_000, alias="windowMs", gt=0)
    reset_timeout_ms: int = Field(default=5_000, alias="resetTimeoutMs", gt=0)


# On out of the box: a process sheds new calls past 5,000 in flight (memory: ~40 KB per open stream) or
# while a new call cannot start within 500 ms (event-loop lag, or gRPC's queue: see server.loop_lag).
DEFAULT_MAX_IN_FLIGHT = 5000
DEFAULT_MAX_LOOP_LAG_MS = 500


class LedgerSpec(_Strict):
    type: Literal["sqlite", "memory"] = "sqlite"
    path: str = "feather-usage.db"
    synchronous: Literal["NORMAL", "FULL"] = "NORMAL"


class ServerSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=50051, ge=0, le=65535)
    grace_period_s: float = Field(default=20.0, alias="gracePeriodS", ge=0)
    # SIGTERM: health NOT_SERVING this long (calls still served) before new calls are refused.
    drain_delay_ms: int = Field(default=0, alias="drainDelayMs", ge=0, le=300_000)
    # Load shedding (OVERLOADED): calls in flight per process, and new-call delay; 0 turns either off.
    max_in_flight: int = Field(default=DEFAULT_MAX_IN_FLIGHT, alias="maxInFlight", ge=0)
    max_loop_lag_ms: int = Field(default=DEFAULT_MAX_LOOP_LAG_MS, alias="maxLoopLagMs", ge=0)
    max_message_bytes: int = Field(default=8 * 1024 * 1024, alias="maxMessageBytes", ge=1024)
    tls: TlsSpec | None = None


class RouteSpec(_Strict):
    """Per model name or alias: its own policy and optional hedging."""

    policy: Policy | None = None
    hedge_after_ms: int | None = Field(default=None, alias="hedgeAfterMs", ge=0)


class TenantLimitsSpec(_Strict):
    rpm: int | None = Field(default=None, ge=1)  # requests per minute
    tpm: int | None = Field(default=None, ge=1)  # tokens per minute (prompt estimate + max_tokens, settled)
    concurrency: int | None = Field(default=None, ge=1)  # calls in flight at once (per replica)


class BudgetSpec(_Strict):
    daily_usd: Decimal | None = Field(default=None, alias="dailyUsd", ge=0)
    monthly_usd: Decimal | None = Field(default=None, alias="monthlyUsd", ge=0)


class TenantPolicySpec(_Strict):
    """What a tenant may do; `jwtDefaultPolicy` gives it to the tenants a JWT names that the config does not list."""

    allowed_models: list[str] | None = Field(default=None, alias="allowedModels")  # names or aliases
    limits: TenantLimitsSpec = Field(default_factory=TenantLimitsSpec)
    budget: BudgetSpec = Field(default_factory=BudgetSpec)


class TenantSpec(TenantPolicySpec):
    keys: list[str] = Field(default_factory=list)  # "sha256:<64 hex>" digests of API keys, never keys
    role: Literal["member", "admin"] = "member"

    @field_validator("keys")
    @classmethod
    def _hashed(cls, keys: list[str]) -> list[str]:
        for k in keys:
            digest = k.removeprefix("sha256:")
            if not k.startswith("sha256:") or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError('keys are stored hashed: "sha256:<64 lowercase hex>" (see `feather-grpc keys new`)')
        return keys


class BucketLimitSpec(_Strict):
    rps: float = Field(gt=0)
    burst: int | None = Field(default=None, ge=1)


class CacheSpec(_Strict):
    enabled: bool = True
    ttl_ms: int = Field(default=300_000, alias="ttlMs", gt=0)
    max_size: int = Field(default=1000, alias="maxSize", ge=1)
    max_temperature: float = Field(default=0.3, alias="maxTemperature", ge=0, le=2)
    single_turn_only: bool = Field(default=True, alias="singleTurnOnly")


class SafetySpec(_Strict):
    redact_pii: bool = Field(default=False, alias="redactPii")
    pii_kinds: list[PiiKind] = Field(default_factory=lambda: list(_PII_KINDS), alias="piiKinds")
    max_messages: int = Field(default=256, alias="maxMessages", ge=1)
    max_content_chars: int = Field(default=200_000, alias="maxContentChars", ge=1)
    max_output_tokens: int = Field(default=65_536, alias="maxOutputTokens", ge=1)


class TlsSpec(_Strict):
    cert_file: str = Field(alias="certFile")
    key_file: str = Field(alias="keyFile")
    client_ca_file: str | None = Field(default=None, alias="clientCaFile")  # set: mutual TLS required


class FileConfig(_Strict):
    """The JSON document. camelCase keys as in the original `feather.config.json`."""

    schema_: str | None = Field(default=None, alias="$schema")
    policy: Policy = "first"
    providers: dict[str, ProviderSpec] = Field(min_length=1)
    retry: RetrySpec = Field(default_factory=RetrySpec)
    timeout_ms: int = Field(default=60_000, alias="timeoutMs", gt=0)
    # The most a call may take to its answer (a stream: to its first token), retries, backoff and fail-over
    # included, whatever the per-attempt timeouts add up to; the caller's deadline wins when it is earlier.
    # 2 minutes: the clients' default deadline.
    request_timeout_ms: int = Field(default=120_000, alias="requestTimeoutMs", gt=0)
    circuit_breaker: BreakerSpec = Field(default_factory=BreakerSpec, alias="circuitBreaker")
    ledger: LedgerSpec = Field(default_factory=LedgerSpec)
    server: ServerSpec = Field(default_factory=ServerSpec)
    allow_unpriced: bool = Field(default=False, alias="allowUnpriced")
    routes: dict[str, RouteSpec] = Field(default_factory=dict)
    fallbacks: dict[str, list[str]] = Field(default_factory=dict)
    context_window_fallbacks: dict[str, list[str]] = Field(default_factory=dict, alias="contextWindowFallbacks")
    tenants: dict[str, TenantSpec] = Field(default_factory=dict)
    limits: dict[str, BucketLimitSpec] = Field(default_factory=dict)  # "provider:model" token buckets
    rate_limit_mode: Literal["queue", "reject"] = Field(default="queue", alias="rateLimitMode")
    # Queue mode admits a waiter only if, after its wait, its deadline leaves at least this long for the
    # call, or the route's observed latency when that is longer.
    queue_min_call_ms: int = Field(default=50, alias="queueMinCallMs", ge=0)
    state_failure_mode: Literal["closed", "open"] = Field(default="closed", alias="stateFailureMode")
    jwt_tenant_claim: str = Field(default="tenant", alias="jwtTenantClaim")
    # The policy of a tenant a JWT names that `tenants` does not list; unset: it may call no model.
    jwt_default_policy: TenantPolicySpec | None = Field(default=None, alias="jwtDefaultPolicy")
    cache: CacheSpec = Field(default_factory=CacheSpec)
    safety: SafetySpec = Field(default_factory=SafetySpec)


# ---- resolved configuration: what the engine and server use ----


@dataclass(frozen=True, slots=True)
class ModelConfig:
    provider: str
    name: str
    aliases: tuple[str, ...]
    price: Price | None  # None only when unpriced models are explicitly allowed
    capabilities: tuple[str, ...]
    weight: int = 1
    max_output_tokens: int | None = None  # the model's longest reply, when configured


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
class GatewayConfig:
    providers: tuple[ProviderConfig, ...]
    policy: str = "first"
    routes: dict[str, RouteConfig] = field(default_factory=dict)
    retry: RetryConfig = field(default_factory=RetryConfig)
    request_timeout_ms: int = 120_000
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    ledger_type: str = "memory"
    ledger_path: str = ":memory:"
    ledger_synchronous: Literal["NORMAL", "FULL"] = "NORMAL"
    host: str = "127.0.0.1"
    port: int = 50051
    grace_period_s: float = 20.0
    drain_delay_s: float = 0.0
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_loop_lag_s: float = DEFAULT_MAX_LOOP_LAG_MS / 1000
    max_message_bytes: int = 8 * 1024 * 1024
    tls: TlsConfig | None = None
    cache: CacheSettings = field(default_factory=CacheSettings)
    redact_pii: frozenset[str] = frozenset()  # PII kinds redacted before a request leaves; empty: off
    input_limits: InputLimits = field(default_factory=InputLimits)
    source: str = "<in-process>"
    skipped_providers: tuple[str, ...] = ()
    auth: AuthConfig = field(default_factory=AuthConfig)
    tenants: dict[str, TenantConfig] = field(default_factory=dict)
    default_tenant: TenantConfig = field(default_factory=lambda: TenantConfig("default"))
    provider_limits: dict[str, tuple[float, int]] = field(default_factory=dict)  # key -> (rps, burst)
    rate_limit_mode: str = "queue"
    queue_min_call_s: float = 0.05  # queue mode: the least deadline a waiter must have left after its wait
    state_failure_mode: str = "closed"
    redis_url: str = field(default="", repr=False)
    database_url: str = field(default="", repr=False)


class ConfigError(Exception):
    """A configuration problem, with the field path and a one-line fix."""

    def __init__(self, source: str, path: str, problem: str, fix: str) -> None:
        super().__init__(f"{source}: {path}: {problem}. Fix: {fix}")
        self.path = path


def _path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(root)"


def _fix_for(err_type: str, path: str) -> str:
    fixes = {
        "missing": "add this field",
        "extra_forbidden": "remove it or check its spelling against the documented schema",
        "literal_error": "use one of the allowed values",
        "too_short": "add at least one entry",
        "decimal_parsing": "use a plain number, e.g. 0.0015",
        "decimal_type": "use a plain number, e.g. 0.0015",
        "greater_than": "use a positive number",
    }
    if path.endswith(".baseUrl"):
        return 'use http(s)://host[:port][/path], e.g. "http://127.0.0.1:8000/v1"'
    return fixes.get(err_type, "correct the value as described")


def parse_file_config(text: str, source: str) -> FileConfig:
    try:
        raw = json.loads(text, parse_float=Decimal)
    except json.JSONDecodeError as e:
        raise ConfigError(
            source, f"line {e.lineno} column {e.colno}", f"invalid JSON ({e.msg})", "fix the JSON syntax"
        ) from None
    try:
        return FileConfig.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        path = _path(tuple(p for p in first["loc"]))
        raise ConfigError(source, path, first["msg"], _fix_for(first["type"], path)) from None


def _infer_type(name: str, spec: ProviderSpec, source: str) -> str:
    if spec.type:
        return spec.type
    if name in _KNOWN_TYPES:
        return name
    if spec.base_url:
        return "openai-compatible"
    raise ConfigError(
        source,
        f"providers.{name}.type",
        "cannot tell the wire format of this provider",
        'add "type": "openai", "anthropic", "openai-compatible", "azure-openai", "bedrock", "gemini", "vertex" '
        'or "mock"',
    )


def _read_api_key(name: str, spec: ProviderSpec, env: dict[str, str], source: str) -> str | None:
    """The provider's key, or None when its configured source is absent or blank (the provider is then skipped).

    Surrounding whitespace is dropped from both sources (a Kubernetes Secret made from a file ends in a
    newline); what remains must be usable in an HTTP header, checked here so `check-config` and `serve`
    give the same one-line answer.
    """
    if spec.api_key_file:
        path, where = f"providers.{name}.apiKeyFile", f"the file {spec.api_key_file}"
        try:
            key = Path(spec.api_key_file).read_text(encoding="utf-8").strip()
        except OSError:
            return None
        except UnicodeDecodeError:
            raise ConfigError(source, path, "the file is not UTF-8 text", "write the key alone into the file") from None
    elif spec.api_key_env:
        path, where = f"providers.{name}.apiKeyEnv", f"${spec.api_key_env}"
        key = env.get(spec.api_key_env, "").strip()
    else:
        return ""
    if not key:
        return None
    bad = next((c for c in key if not "\x21" <= c <= "\x7e"), None)
    if bad is not None:
        # Never echo the key: name the kind of character and where it came from.
        kind = "whitespace" if bad.isspace() else "a control character" if bad.isascii() else "a non-ASCII character"
        raise ConfigError(
            source,
            path,
            f"the key in {where} contains {kind}, which an HTTP header cannot carry",
            "set it to the key alone, on one line (API keys are visible ASCII)",
        )
    return key


def _base_url(spec: ProviderSpec, ptype: str) -> str:
    if spec.base_url:
        return spec.base_url
    if ptype == "bedrock" and spec.region:
        return f"https://bedrock-runtime.{spec.region}.amazonaws.com"
    if ptype == "vertex" and spec.region:
        host = "aiplatform.googleapis.com" if spec.region == "global" else f"{spec.region}-aiplatform.googleapis.com"
        return f"https://{host}/v1"
    return DEFAULT_BASE_URLS.get(ptype, "")


def _check_cloud(name: str, spec: ProviderSpec, ptype: str, source: str) -> None:
    """The settings of the cloud providers (azure-openai...): present where needed, absent elsewhere, and
    the optional SDK they need installed (a missing one is one line at load, not a failure per call)."""
    where = f"providers.{name}"
    azure = ptype == "azure-openai"
    openai_format = ptype in ("openai", "openai-compatible", "azure-openai")
    for field_name, set_ in (
        ("api", spec.api is not None and not openai_format),
        *((f"models[{i}].api", m.api is not None and not openai_format) for i, m in enumerate(spec.models)),
        ("auth", spec.auth == "entra" and not azure),
        ("apiVersion", spec.api_version is not None and not azure),
        ("region", spec.region is not None and ptype not in ("bedrock", "vertex")),
        ("project", spec.project is not None and ptype != "vertex"),
        *((f"models[{i}].deployment", m.deployment is not None and not azure) for i, m in enumerate(spec.models)),
        *(
            (f"models[{i}].thinkingBudget", m.thinking_budget is not None and ptype not in ("gemini", "vertex"))
            for i, m in enumerate(spec.models)
        ),
    ):
        if set_:
            raise ConfigError(source, f"{where}.{field_name}", f"is not a setting of {ptype}", "remove it")
    if ptype == "bedrock":
        if not spec.region:
            raise ConfigError(
                source, f"{where}.region", "a bedrock provider needs its AWS region", 'add "region": "us-east-1"'
            )
        if spec.api_key_env or spec.api_key_file:
            return  # a Bedrock API key (a bearer token): no signing, no botocore
        missing = missing_extra("bedrock")
        if missing:
            raise ConfigError(source, where, "bedrock needs botocore (or a Bedrock API key in apiKeyEnv)", missing)
        return
    if ptype == "vertex":
        for field_name, value, fix in (
            ("region", spec.region, 'add "region": "us-central1" (or "global")'),
            ("project", spec.project, 'add "project": "<your Google Cloud project id>"'),
        ):
            if not value:
                raise ConfigError(source, f"{where}.{field_name}", f"a vertex provider needs its {field_name}", fix)
        if spec.api_key_env or spec.api_key_file:
            fix = "remove it: credentials come from Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS...)"
            raise ConfigError(source, f"{where}.apiKeyEnv", "vertex authenticates with ADC, not a key", fix)
        missing = missing_extra("vertex")
        if missing:
            raise ConfigError(source, where, "vertex needs google-auth", missing)
        return
    if ptype == "gemini" and not (spec.api_key_env or spec.api_key_file):
        fix = 'add "apiKeyEnv": "GEMINI_API_KEY" (a Google AI Studio key)'
        raise ConfigError(source, where, "a gemini provider needs an API key", fix)
    if not azure:
        return
    if not spec.base_url:
        fix = 'add "baseUrl": "https://<resource>.openai.azure.com"'
        raise ConfigError(source, f"{where}.baseUrl", "an azure-openai provider needs its resource endpoint", fix)
    if spec.auth == "entra":
        if spec.api_key_env or spec.api_key_file:
            fix = 'remove apiKeyEnv/apiKeyFile, or "auth": "entra" to use the key'
            raise ConfigError(source, f"{where}.auth", "entra auth uses no API key", fix)
        missing = missing_extra("entra")
        if missing:
            raise ConfigError(source, f"{where}.auth", "entra auth needs azure-identity", missing)
    elif not (spec.api_key_env or spec.api_key_file):
        fix = 'add "apiKeyEnv": "AZURE_OPENAI_API_KEY", or "auth": "entra" for a Microsoft Entra token'
        raise ConfigError(source, where, "an azure-openai provider needs an api-key or Entra auth", fix)


def _check_model_names(name: str, spec: ProviderSpec, source: str) -> None:
    """Within one provider, every model name and alias must lead to exactly one model (the same alias on
    several providers is fine: it makes several candidates for that name)."""
    names = [m.name for m in spec.models]
    for i, m in enumerate(spec.models):
        where = f"providers.{name}.models[{i}]"
        if m.name in names[:i]:
            raise ConfigError(
                source, f"{where}.name", f"model {m.name!r} is listed twice", "remove the duplicate entry"
            )
        for j, alias in enumerate(m.aliases):
            problem = ""
            if not alias.strip():
                problem = "an alias may not be empty"
            elif alias in m.aliases[:j]:
                problem = f"alias {alias!r} is listed twice"
            elif alias == m.name:
                problem = f"alias {alias!r} is the model's own name"
            elif alias in names:
                problem = f"alias {alias!r} is the name of another model of {name!r}"
            if problem:
                raise ConfigError(source, f"{where}.aliases[{j}]", problem, "remove this alias or rename it")


def resolve(file_config: FileConfig, env: dict[str, str] | None = None, source: str = "<config>") -> GatewayConfig:
    """Turns a validated document plus environment overrides into the engine's resolved config."""
    env = dict(os.environ) if env is None else env
    providers: list[ProviderConfig] = []
    skipped: list[str] = []
    for name, spec in file_config.providers.items():
        if "/" in name or not name:
            raise ConfigError(source, f"providers.{name}", "provider names may not contain '/'", "rename the provider")
        _check_model_names(name, spec, source)
        ptype = _infer_type(name, spec, source)
        if ptype == "openai-compatible" and not spec.base_url:
            raise ConfigError(
                source,
                f"providers.{name}.baseUrl",
                "an openai-compatible provider needs a URL",
                'add "baseUrl": "http://host:port/v1"',
            )
        _check_cloud(name, spec, ptype, source)
        key = "" if spec.auth == "entra" else _read_api_key(name, spec, env, source)
        if key is None:
            if spec.required:
                where = spec.api_key_file or spec.api_key_env
                raise ConfigError(
                    source,
                    f"providers.{name}",
                    f"its API key ({where}) is not set or is empty",
                    'set the key, or drop "required" to skip this provider when it is missing',
                )
            skipped.append(name)
            continue
        models: list[ModelConfig] = []
        for i, m in enumerate(spec.models):
            where = f"providers.{name}.models[{i}]"
            try:
                price = m.price()
            except ValueError as e:
                fix = f"use a plain USD amount such as 0.0015 (at most {MAX_USD_PER_1M:,} per 1M tokens)"
                raise ConfigError(source, where, f"price {e}", fix) from None
            if price is None and not (m.allow_unpriced or file_config.allow_unpriced):
                raise ConfigError(
                    source,
                    f"{where}.inputPer1K",
                    f"model {m.name!r} has no price",
                    'add "inputPer1K" and "outputPer1K" (or per-1M prices), '
                    'or set "allowUnpriced": true to serve it as unpriced',
                )
            models.append(
                ModelConfig(name, m.name, tuple(m.aliases), price, tuple(m.capabilities), m.weight, m.max_output_tokens)
            )
        providers.append(
            ProviderConfig(
                name=name,
                type=ptype,
                base_url=_base_url(spec, ptype),
                api_key=key,
                timeout_ms=spec.timeout_ms or file_config.timeout_ms,
                models=tuple(models),
                first_token_timeout_ms=spec.first_token_timeout_ms,
                # A stream silent for as long as a whole call may take has stalled: without this a stalled
                # upstream held its caller (when it set no deadline), a concurrency slot and a connection.
                idle_timeout_ms=spec.idle_timeout_ms or spec.timeout_ms or file_config.timeout_ms,
                max_connections=spec.max_connections,
                propagate_trace_context=spec.propagate_trace_context,
                egress=_egress(name, spec, ptype, env, source),
                transport=_transport(name, spec, source),
                max_response_bytes=spec.max_response_bytes,
                max_stream_event_bytes=spec.max_stream_event_bytes,
                auth=spec.auth or "",
                api_version=spec.api_version or "",
                region=spec.region or "",
                project=spec.project or "",
                responses_models=tuple(m.name for m in spec.models if (m.api or spec.api) == "responses"),
                thinking_budgets=tuple(
                    (m.name, m.thinking_budget) for m in spec.models if m.thinking_budget is not None
                ),
                upstream_ids=tuple((m.name, m.deployment) for m in spec.models if m.deployment),
                extra_headers=tuple(spec.extra_headers.items()),
                default_fields=spec.default_fields,
            )
        )
    if not providers:
        raise ConfigError(
            source,
            "providers",
            f"no provider is usable (skipped for missing keys: {skipped})",
            "set the API key environment variables the config names",
        )
    routes = _routes(file_config, providers, source)
    auth, tenants, default_tenant = _tenants(file_config, env, source)
    r = file_config.retry
    b = file_config.circuit_breaker
    breaker = BreakerSettings(
        enabled=_env_bool(env, "CIRCUIT_BREAKER_ENABLED", b.enabled),
        failure_threshold=_env_int(env, "CIRCUIT_BREAKER_FAILURE_THRESHOLD", b.failure_threshold, minimum=1),
        window_s=b.window_ms / 1000,
        cooldown_s=_env_int(env, "CIRCUIT_BREAKER_RESET_TIMEOUT_MS", b.reset_timeout_ms, minimum=1) / 1000,
    )
    port = _env_int(env, "PORT", file_config.server.port, minimum=0, maximum=65535)
    ledger_path = env.get("FEATHER_LEDGER_PATH") or file_config.ledger.path
    return GatewayConfig(
        providers=tuple(providers),
        policy=file_config.policy,
        routes=routes,
        retry=RetryConfig(r.max_attempts, r.base_ms, r.max_ms),
        request_timeout_ms=file_config.request_timeout_ms,
        breaker=breaker,
        ledger_type=file_config.ledger.type,
        ledger_path=ledger_path if file_config.ledger.type == "sqlite" else ":memory:",
        ledger_synchronous=file_config.ledger.synchronous,
        host=file_config.server.host,
        port=port,
        grace_period_s=file_config.server.grace_period_s,
        drain_delay_s=_env_int(env, "DRAIN_DELAY_MS", file_config.server.drain_delay_ms, minimum=0, maximum=300_000)
        / 1000,
        max_in_flight=file_config.server.max_in_flight,
        max_loop_lag_s=file_config.server.max_loop_lag_ms / 1000,
        max_message_bytes=file_config.server.max_message_bytes,
        tls=_tls(file_config.server.tls, source),
        cache=CacheSettings(
            enabled=file_config.cache.enabled,
            ttl_s=_env_int(env, "CACHE_TTL_MS", file_config.cache.ttl_ms, minimum=1) / 1000,
            max_size=_env_int(env, "CACHE_MAX_SIZE", file_config.cache.max_size, minimum=1),
            max_temperature=file_config.cache.max_temperature,
            single_turn_only=file_config.cache.single_turn_only,
        ),
        redact_pii=frozenset(file_config.safety.pii_kinds) if file_config.safety.redact_pii else frozenset(),
        input_limits=InputLimits(
            file_config.safety.max_messages, file_config.safety.max_content_chars, file_config.safety.max_output_tokens
        ),
        source=source,
        skipped_providers=tuple(skipped),
        auth=auth,
        tenants=tenants,
        default_tenant=default_tenant,
        provider_limits=_provider_limits(file_config, source),
        rate_limit_mode=file_config.rate_limit_mode,
        queue_min_call_s=file_config.queue_min_call_ms / 1000,
        state_failure_mode=file_config.state_failure_mode,
        redis_url=_redis_url(env),
        database_url=_database_url(env),
    )


def _redis_url(env: dict[str, str]) -> str:
    url = env.get("REDIS_URL", "")
    if url:
        from feather_grpc.state.resp import parse_url

        try:
            parse_url(url)
        except (ValueError, OSError) as e:  # OSError: a rediss:// CA file that cannot be read
            fix = "use redis://[user:password@]host:port/db, rediss://... or unix:///path[?db=N]; ?cluster=true"
            raise ConfigError("environment", "REDIS_URL", str(e), fix) from None
    return url


def _tls(spec: TlsSpec | None, source: str) -> TlsConfig | None:
    """The TLS files must be readable now: the server reads them only when it binds."""
    if spec is None:
        return None
    for field_name, path in (
        ("certFile", spec.cert_file),
        ("keyFile", spec.key_file),
        ("clientCaFile", spec.client_ca_file),
    ):
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ConfigError(
                source,
                f"server.tls.{field_name}",
                f"cannot read {path} ({e.strerror})",
                "check the path and permissions",
            ) from None
    return TlsConfig(spec.cert_file, spec.key_file, spec.client_ca_file)


def _transport(name: str, spec: ProviderSpec, source: str) -> str:
    """The provider's HTTP client; aiohttp is an optional extra, imported only when a provider uses it."""
    if spec.transport == "aiohttp" and importlib.util.find_spec("aiohttp") is None:
        raise ConfigError(
            source,
            f"providers.{name}.transport",
            '"aiohttp" needs the aiohttp package, which is not installed',
            "pip install 'feather-grpc[aiohttp]', or remove \"transport\" to use the built-in client",
        )
    return spec.transport


def _egress(name: str, spec: ProviderSpec, ptype: str, env: dict[str, str], source: str) -> Egress:
    """The provider's proxy (its own `proxy`, else the environment's) and TLS files, checked now: a proxy
    setting that cannot be honoured, or a certificate that cannot be used, would otherwise show up only as
    calls that never reach the provider."""
    where = f"providers.{name}"
    base_url = _base_url(spec, ptype)
    if ptype == "mock" or not base_url:
        return DIRECT
    proxy = None
    if "proxy" in spec.model_fields_set:
        if spec.proxy:
            try:
                proxy = parse_proxy(spec.proxy)
            except ValueError as e:
                fix = 'use "http://[user:password@]host:port", or null to go direct'
                raise ConfigError(source, f"{where}.proxy", str(e), fix) from None
    else:
        try:
            proxy, _ = env_proxy(base_url, env)
        except ValueError as e:
            var = "https_proxy" if base_url.startswith("https:") else "http_proxy"
            var = var if env.get(var, "").strip() else var.upper()
            fix = f'set it to http://[user:password@]host:port, or give providers.{name} "proxy": null'
            raise ConfigError("environment", var, str(e), fix) from None
    files = {"caFile": spec.ca_file, "clientCertFile": spec.client_cert_file, "clientKeyFile": spec.client_key_file}
    if not any(files.values()):
        return Egress(proxy)
    field_name = next(k for k, v in files.items() if v)
    if not base_url.startswith("https:"):
        fix = "use an https:// baseUrl, or remove the TLS settings"
        raise ConfigError(source, f"{where}.{field_name}", "TLS settings need an https:// baseUrl", fix)
    if spec.client_key_file and not spec.client_cert_file:
        fix = 'add "clientCertFile" (the certificate that goes with this key)'
        raise ConfigError(source, f"{where}.clientKeyFile", "a client key needs its certificate", fix)
    for key, path in files.items():
        if path is None:
            continue
        try:
            with open(path, "rb"):
                pass
        except OSError as e:
            raise ConfigError(
                source, f"{where}.{key}", f"cannot read {path} ({e.strerror})", "check the path and permissions"
            ) from None
    if spec.ca_file:
        try:
            tls_context(spec.ca_file, None, None)
        except ssl.SSLError as e:
            fix = "give a file of PEM certificates"
            raise ConfigError(source, f"{where}.caFile", f"not a PEM CA bundle ({e.reason})", fix) from None
    if spec.client_cert_file:
        try:
            tls_context(spec.ca_file, spec.client_cert_file, spec.client_key_file)
        except ssl.SSLError as e:
            fix = "give the PEM certificate and its unencrypted PEM key (the key may be in the certificate file)"
            problem = f"unusable certificate or key ({e.reason})"
            raise ConfigError(source, f"{where}.clientCertFile", problem, fix) from None
    return Egress(proxy, spec.ca_file, spec.client_cert_file, spec.client_key_file)


def _database_url(env: dict[str, str]) -> str:
    """A libpq URL for Postgres, checked here: a bad one would only show up later as an unreachable
    database, with every record spooled. The URL is never echoed (it usually holds a password)."""
    url = env.get("DATABASE_URL", "")
    if not url:
        return url
    try:
        parts = urlsplit(url)
    except ValueError:
        parts = urlsplit("invalid:")
    problem = ""
    if parts.scheme not in ("postgres", "postgresql"):
        problem = "the URL must start with postgres:// or postgresql://"
    for hostport in parts.netloc.rpartition("@")[2].split(","):
        if hostport.startswith("["):  # [IPv6]:port
            host, _, port = hostport[1:].partition("]")
            port = port.removeprefix(":")
        else:
            host, _, port = hostport.partition(":")
        if port and not (port.isdigit() and 1 <= int(port) <= 65535):
            problem = problem or "the port is not a number from 1 to 65535"
        if not host and not parse_qs(parts.query).get("host") and not env.get("PGHOST"):
            problem = problem or "the URL names no host"
    if problem:
        fix = "use postgresql://user:password@host[:port]/database (a socket directory goes in ?host=/path)"
        raise ConfigError("environment", "DATABASE_URL", problem, fix)
    return url


def _provider_limits(fc: FileConfig, source: str) -> dict[str, tuple[float, int]]:
    """`limits`: token buckets keyed "provider:model" by the model's name (an alias key means its model)."""
    out: dict[str, tuple[float, int]] = {}
    origin: dict[str, str] = {}
    for key, spec in fc.limits.items():
        buckets = [
            f"{p}:{m.name}"
            for p, provider in fc.providers.items()
            if key.startswith(f"{p}:")
            for m in provider.models
            if key[len(p) + 1 :] in (m.name, *m.aliases)
        ]
        if not buckets:
            fix = 'use "provider:model" with a model name or alias of that provider, e.g. "openai:gpt-4o"'
            raise ConfigError(source, f"limits.{key}", "is not a configured provider:model", fix)
        if len(buckets) > 1:
            raise ConfigError(
                source, f"limits.{key}", f"the alias names {len(buckets)} models", "use one model's name instead"
            )
        if buckets[0] in origin:
            problem = f"is the same model as limits.{origin[buckets[0]]}"
            raise ConfigError(source, f"limits.{key}", problem, "keep one of the two entries")
        origin[buckets[0]] = key
        out[buckets[0]] = (spec.rps, spec.burst or max(1, math.ceil(spec.rps)))
    return out


def _request_names(models: list[tuple[str, str, list[str]]]) -> set[str]:
    """What a request may name for these (provider, model, aliases): each name and alias, bare or as provider/x."""
    return {n for p, name, aliases in models for bare in (name, *aliases) for n in (bare, f"{p}/{bare}")}


def _routes(fc: FileConfig, providers: list[ProviderConfig], source: str) -> dict[str, RouteConfig]:
    """Per-name routing rules. Their keys must be configured names (a provider skipped for a missing key
    keeps its names); the fallbacks they list must be served, since every call for the name tries them."""
    configured = _request_names([(p, m.name, m.aliases) for p, spec in fc.providers.items() for m in spec.models])
    served = _request_names([(p.name, m.name, list(m.aliases)) for p in providers for m in p.models])
    names = set(fc.routes) | set(fc.fallbacks) | set(fc.context_window_fallbacks)
    tables = (
        ("routes", fc.routes),
        ("fallbacks", fc.fallbacks),
        ("contextWindowFallbacks", fc.context_window_fallbacks),
    )
    for section, table in tables:
        for name in table:
            if name not in configured:
                raise ConfigError(
                    source,
                    f"{section}.{name}",
                    f"{name!r} is not a configured model or alias",
                    "use a model name or alias of a configured provider, or provider/name",
                )
    for section, table in tables[1:]:
        for name, targets in table.items():
            for i, target in enumerate(targets):
                if target not in served:
                    raise ConfigError(
                        source,
                        f"{section}.{name}[{i}]",
                        f"{target!r} is not a served model or alias",
                        "name a model or alias of a configured provider",
                    )
    out: dict[str, RouteConfig] = {}
    for name in names:
        spec = fc.routes.get(name, RouteSpec())
        out[name] = RouteConfig(
            policy=spec.policy or "",
            hedge_after_ms=spec.hedge_after_ms,
            fallbacks=tuple(fc.fallbacks.get(name, ())),
            context_window_fallbacks=tuple(fc.context_window_fallbacks.get(name, ())),
        )
    return out


MAX_BUDGET_USD = 1_000_000_000  # a billion dollars a window: far below int64's 9.2e9 USD in nano-dollars


def _usd_nanos(usd: Decimal | None, source: str, path: str) -> int | None:
    if usd is None:
        return None
    nanos = int(usd * NANOS_PER_USD)
    if usd > 0 and nanos == 0:
        problem = "is below one nano-dollar, so it would refuse every call"
        raise ConfigError(source, path, problem, "use at least 0.000000001 USD")
    if nanos > MAX_BUDGET_USD * NANOS_PER_USD:  # spend counters are int64 nano-dollars (Redis, the ledgers)
        raise ConfigError(source, path, "is too large to count in nano-dollars", f"use at most {MAX_BUDGET_USD} USD")
    return nanos


def _tenants(
    fc: FileConfig, env: dict[str, str], source: str
) -> tuple[AuthConfig, dict[str, TenantConfig], TenantConfig]:
    # RATE_LIMIT_*: the request limit of every tenant that sets no `rpm` of its own.
    default_requests: tuple[float, int] | None = None
    if _env_bool(env, "RATE_LIMIT_ENABLED", False):
        rps = _env_int(env, "RATE_LIMIT_RPS", 100, minimum=1)
        default_requests = (float(rps), _env_int(env, "RATE_LIMIT_BURST", 2 * rps, minimum=1))
    tenants: dict[str, TenantConfig] = {}
    hashes: dict[str, str] = {}
    # allowedModels matches a model by its name, an alias, or provider/name (engine.admission)
    allowable = {
        n for p, spec in fc.providers.items() for m in spec.models for n in (m.name, f"{p}/{m.name}", *m.aliases)
    }

    def policy(name: str, t: TenantPolicySpec, path: str, role: str = "member") -> TenantConfig:
        for i, allowed in enumerate(t.allowed_models or []):
            if allowed not in allowable:
                raise ConfigError(
                    source,
                    f"{path}.allowedModels[{i}]",
                    f"{allowed!r} is not a configured model or alias",
                    "use a model name, an alias, or provider/model",
                )
        rpm = t.limits.rpm
        return TenantConfig(
            name=name,
            role=role,
            allowed_models=frozenset(t.allowed_models) if t.allowed_models is not None else None,
            requests=(rpm / 60, rpm) if rpm else default_requests,
            tpm=t.limits.tpm,
            concurrency=t.limits.concurrency,
            daily_budget_nanos=_usd_nanos(t.budget.daily_usd, source, f"{path}.budget.dailyUsd"),
            monthly_budget_nanos=_usd_nanos(t.budget.monthly_usd, source, f"{path}.budget.monthlyUsd"),
        )

    for name, t in {"default": TenantSpec(), **fc.tenants}.items():
        tenants[name] = policy(name, t, f"tenants.{name}", t.role)
        for i, k in enumerate(t.keys):
            digest = k.removeprefix("sha256:")
            if digest in hashes:
                raise ConfigError(
                    source,
                    f"tenants.{name}.keys[{i}]",
                    f"this key also belongs to {hashes[digest]!r}",
                    "give every key to exactly one tenant",
                )
            hashes[digest] = name
    unlisted = TenantPolicySpec(allowedModels=[]) if fc.jwt_default_policy is None else fc.jwt_default_policy
    auth = AuthConfig(
        key_hashes=hashes,
        jwt_secret=env.get("JWT_SECRET", ""),
        jwt_tenant_claim=fc.jwt_tenant_claim,
        unlisted=policy("", unlisted, "jwtDefaultPolicy"),
    )
    return auth, tenants, tenants["default"]


def _env_int(env: dict[str, str], name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    raw = env.get(name)
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = minimum - 1
    if maximum is not None and not minimum <= value <= maximum:
        raise ConfigError(
            "environment",
            name,
            f"{raw!r} is not an integer from {minimum} to {maximum}",
            f"set {name} to a whole number from {minimum} to {maximum}",
        )
    if value < minimum:
        raise ConfigError(
            "environment",
            name,
            f"{raw!r} is not an integer >= {minimum}",
            f"set {name} to a whole number of at least {minimum}",
        )
    return value


def _env_bool(env: dict[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if not raw:
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError("environment", name, f"{raw!r} is not a boolean", f"set {name} to true or false")


def embedded_default() -> dict[str, Any]:
    """The config used when no file is given: the mock provider, plus OpenAI and Anthropic when their
    keys are in the environment (providers with a missing key are skipped)."""
    return {
        "policy": "first",
        "providers": {
            "mock": {
                "type": "mock",
                "models": [
                    {"name": "mock-fast", "aliases": ["fast", "cheap"], "inputPer1M": "0.10", "outputPer1M": "0.40"},
                    {"name": "mock-smart", "aliases": ["smart"], "inputPer1M": "2.50", "outputPer1M": "10.00"},
                ],
            },
            "openai": {
                "type": "openai",
                "apiKeyEnv": "OPENAI_API_KEY",
                "models": [
                    {
                        "name": "gpt-4o-mini",
                        "aliases": ["fast", "cheap"],
                        "inputPer1M": "0.15",
                        "outputPer1M": "0.60",
                        "cachedInputPer1M": "0.075",
                        "capabilities": ["tools", "json"],
                    },
                    {
                        "name": "gpt-4o",
                        "aliases": ["smart"],
                        "inputPer1M": "2.50",
                        "outputPer1M": "10.00",
                        "cachedInputPer1M": "1.25",
                        "capabilities": ["tools", "json", "vision"],
                    },
                ],
            },
            "anthropic": {
                "type": "anthropic",
                "apiKeyEnv": "ANTHROPIC_API_KEY",
                "models": [
                    {
                        "name": "claude-3-5-haiku-latest",
                        "aliases": ["fast"],
                        "inputPer1M": "0.80",
                        "outputPer1M": "4.00",
                        "cachedInputPer1M": "0.08",
                        "cacheWritePer1M": "1.00",
                        "capabilities": ["tools"],
                    },
                    {
                        "name": "claude-sonnet-4-0",
                        "aliases": ["smart"],
                        "inputPer1M": "3.00",
                        "outputPer1M": "15.00",
                        "cachedInputPer1M": "0.30",
                        "cacheWritePer1M": "3.75",
                        "capabilities": ["tools", "vision"],
                    },
                ],
            },
        },
    }


def load(path: str | None, env: dict[str, str] | None = None) -> GatewayConfig:
    """Loads `path`, else `$FEATHER_CONFIG`, else ./feather.config.json if present, else the embedded default."""
    env = dict(os.environ) if env is None else env
    chosen = path or env.get("FEATHER_CONFIG")
    if not chosen and Path("feather.config.json").is_file():
        chosen = "feather.config.json"
    if chosen:
        try:
            text = Path(chosen).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(chosen, "(file)", f"cannot read it ({e.strerror})", "check the path") from None
        except UnicodeDecodeError as e:
            problem = f"not UTF-8 text (byte {e.start})"
            raise ConfigError(chosen, "(file)", problem, "save the file as UTF-8 JSON") from None
        return resolve(parse_file_config(text, chosen), env, chosen)
    document = json.dumps(embedded_default())
    return resolve(parse_file_config(document, "<embedded default>"), env, "<embedded default>")
