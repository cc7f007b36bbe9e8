"""Resolution: a validated document plus the environment become the resolved config, one section at a
time (providers, routing, tenancy, server, ledger, shared state). Every problem is a `ConfigError` naming
the field and a fix; nothing here runs on the request path."""

from __future__ import annotations

import importlib.util
import logging
import math
import ssl
from decimal import Decimal
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from feather_grpc.config.model import (
    AuthConfig,
    GatewayConfig,
    InputLimits,
    ModelConfig,
    ProviderConfig,
    RetryConfig,
    RouteConfig,
    TenantConfig,
    TlsConfig,
)
from feather_grpc.config.schema import (
    DEFAULT_BASE_URLS,
    KNOWN_TYPES,
    MAX_USD_PER_1M,
    FileConfig,
    ProviderSpec,
    RouteSpec,
    TenantPolicySpec,
    TenantSpec,
    TlsSpec,
)
from feather_grpc.core.breaker import BreakerSettings
from feather_grpc.core.cache import CacheSettings
from feather_grpc.core.egress import DIRECT, Egress, env_proxy, parse_proxy, tls_context
from feather_grpc.core.errors import ConfigError
from feather_grpc.core.extras import missing_extra
from feather_grpc.core.pricing import NANOS_PER_USD
from feather_grpc.core.redis_url import parse_url
from feather_grpc.core.settings import Settings, environ

log = logging.getLogger(__name__)


def _infer_type(name: str, spec: ProviderSpec, source: str) -> str:
    if spec.type:
        return spec.type
    if name in KNOWN_TYPES:
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
    """Turns a validated document plus environment overrides into the engine's resolved config, section by
    section (the order of `GatewayConfig`'s fields)."""
    env = environ() if env is None else env
    fc = file_config
    settings = Settings(env)
    # Resolved in this order so that of several problems, the same one is reported first as always.
    providers, skipped = _providers(fc, env, source)
    routes = _routes(fc, list(providers), source)
    auth, tenants, default_tenant = _tenants(fc, env, source)
    breaker = _breaker(fc, settings)
    port = settings.integer("PORT", fc.server.port, minimum=0, maximum=65535)
    ledger_path = env.get("FEATHER_LEDGER_PATH") or fc.ledger.path
    drain_delay_ms = settings.integer("DRAIN_DELAY_MS", fc.server.drain_delay_ms, minimum=0, maximum=300_000)
    tls = _tls(fc.server.tls, source)
    cache = _cache(fc, settings)
    provider_limits = _provider_limits(fc, source)
    redis_url, database_url = _redis_url(env), _database_url(env)
    r = fc.retry
    return GatewayConfig(
        # providers
        providers=providers,
        skipped_providers=skipped,
        # routing
        policy=fc.policy,
        routes=routes,
        retry=RetryConfig(r.max_attempts, r.base_ms, r.max_ms),
        request_timeout_ms=fc.request_timeout_ms,
        breaker=breaker,
        cache=cache,
        redact_pii=frozenset(fc.safety.pii_kinds) if fc.safety.redact_pii else frozenset(),
        input_limits=InputLimits(fc.safety.max_messages, fc.safety.max_content_chars, fc.safety.max_output_tokens),
        # server
        host=fc.server.host,
        port=port,
        grace_period_s=fc.server.grace_period_s,
        drain_delay_s=drain_delay_ms / 1000,
        max_in_flight=fc.server.max_in_flight,
        max_loop_lag_s=fc.server.max_loop_lag_ms / 1000,
        max_message_bytes=fc.server.max_message_bytes,
        tls=tls,
        source=source,
        # ledger
        ledger_type=fc.ledger.type,
        ledger_path=ledger_path if fc.ledger.type == "sqlite" else ":memory:",
        ledger_synchronous=fc.ledger.synchronous,
        database_url=database_url,
        # shared state
        redis_url=redis_url,
        state_failure_mode=fc.state_failure_mode,
        # tenancy
        auth=auth,
        tenants=tenants,
        default_tenant=default_tenant,
        provider_limits=provider_limits,
        rate_limit_mode=fc.rate_limit_mode,
        queue_min_call_s=fc.queue_min_call_ms / 1000,
    )


# ---- providers ----


def _providers(fc: FileConfig, env: dict[str, str], source: str) -> tuple[tuple[ProviderConfig, ...], tuple[str, ...]]:
    """The usable providers, and the names of those skipped for a missing key."""
    providers: list[ProviderConfig] = []
    skipped: list[str] = []
    for name, spec in fc.providers.items():
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
            if price is None and not (m.allow_unpriced or fc.allow_unpriced):
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
                timeout_ms=spec.timeout_ms or fc.timeout_ms,
                models=tuple(models),
                first_token_timeout_ms=spec.first_token_timeout_ms,
                # A stream silent for as long as a whole call may take has stalled: without this a stalled
                # upstream held its caller (when it set no deadline), a concurrency slot and a connection.
                idle_timeout_ms=spec.idle_timeout_ms or spec.timeout_ms or fc.timeout_ms,
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
    return tuple(providers), tuple(skipped)


# ---- routing ----


def _breaker(fc: FileConfig, settings: Settings) -> BreakerSettings:
    b = fc.circuit_breaker
    return BreakerSettings(
        enabled=settings.flag("CIRCUIT_BREAKER_ENABLED", b.enabled),
        failure_threshold=settings.integer("CIRCUIT_BREAKER_FAILURE_THRESHOLD", b.failure_threshold, minimum=1),
        window_s=b.window_ms / 1000,
        cooldown_s=settings.integer("CIRCUIT_BREAKER_RESET_TIMEOUT_MS", b.reset_timeout_ms, minimum=1) / 1000,
    )


def _cache(fc: FileConfig, settings: Settings) -> CacheSettings:
    return CacheSettings(
        enabled=fc.cache.enabled,
        ttl_s=settings.integer("CACHE_TTL_MS", fc.cache.ttl_ms, minimum=1) / 1000,
        max_size=settings.integer("CACHE_MAX_SIZE", fc.cache.max_size, minimum=1),
        max_temperature=fc.cache.max_temperature,
        single_turn_only=fc.cache.single_turn_only,
    )


def _redis_url(env: dict[str, str]) -> str:
    url = env.get("REDIS_URL", "")
    if url:
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
    settings = Settings(env)
    # RATE_LIMIT_*: the request limit of every tenant that sets no `rpm` of its own.
    default_requests: tuple[float, int] | None = None
    if settings.flag("RATE_LIMIT_ENABLED", False):
        rps = settings.integer("RATE_LIMIT_RPS", 100, minimum=1)
        default_requests = (float(rps), settings.integer("RATE_LIMIT_BURST", 2 * rps, minimum=1))
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
