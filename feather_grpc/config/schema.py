"""The schema of `feather.config.json`: what a document may say (pydantic models, camelCase keys as in the
original file), parsed and validated in one step; `parse_file_config` names the first bad field and a fix."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any, Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from feather_grpc.core.errors import ConfigError
from feather_grpc.core.pricing import NANOS_PER_USD, Price, usd_to_nanos_per_million
from feather_grpc.core.types import owned_fields
from feather_grpc.core.upstream import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_RESPONSE_BYTES

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
KNOWN_TYPES = ("openai", "anthropic", "gemini", "mock")
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


_PRICE_KINDS = (
    *("input", "output", "cached_input", "cache_write", "cache_write_1h"),
    *("web_search", "audio_input", "audio_output"),
)


class PriceSpec(_Strict):
    """A price, per 1K or per 1M tokens: a model's, or one of its service tiers'."""

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
    # Audio tokens (OpenAI's audio models: ~16x text input; Gemini 2.5 Flash: 3.3x); unset: the text price.
    audio_input_per_1k: Decimal | None = Field(default=None, alias="audioInputPer1K")
    audio_input_per_1m: Decimal | None = Field(default=None, alias="audioInputPer1M")
    audio_output_per_1k: Decimal | None = Field(default=None, alias="audioOutputPer1K")
    audio_output_per_1m: Decimal | None = Field(default=None, alias="audioOutputPer1M")

    @model_validator(mode="after")
    def _one_unit_per_price(self) -> Self:
        for kind in _PRICE_KINDS:
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
                        alias = PriceSpec.model_fields[f"{kind}_per_{unit}"].alias
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
            audio_input=one("audio_input"),
            audio_output=one("audio_output"),
        )


class LongContextSpec(PriceSpec):
    """The price of a call whose prompt is over `aboveInputTokens` (cache reads and writes included): all its
    tokens, as Gemini 2.5 Pro and Claude's 1M-token context are billed past 200,000."""

    above_input_tokens: int = Field(alias="aboveInputTokens", ge=1)


class ModelSpec(PriceSpec):
    name: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    # Prices of the service tiers the upstream reports a reply was served on (OpenAI `priority`, `flex`;
    # Anthropic `priority`), each a whole price; a reply on another tier, or saying none, costs the model's.
    service_tiers: dict[str, PriceSpec] = Field(default_factory=dict, alias="serviceTiers")
    long_context: LongContextSpec | None = Field(default=None, alias="longContext")
    capabilities: list[str] = Field(default_factory=list)
    allow_unpriced: bool = Field(default=False, alias="allowUnpriced")
    weight: int = Field(default=1, ge=0)  # for the `weighted` policy
    deployment: str | None = Field(default=None, min_length=1)  # azure-openai: the deployment (default: name)
    api: Literal["chat", "responses"] | None = None  # openai: the API that serves it (default: the provider's)
    # gemini/vertex: thinking tokens the model may spend (-1: the model decides, 0: none, where it allows)
    thinking_budget: int | None = Field(default=None, alias="thinkingBudget", ge=-1, le=1_000_000)
    # The model's longest reply: Anthropic's required max_tokens when the caller sets none
    max_output_tokens: int | None = Field(default=None, alias="maxOutputTokens", ge=1, le=10_000_000)


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
        owned = owned_fields(fields)
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
