"""Resolution of the routing section: the policy, per-name routes and fallbacks, retries, the request timeout,
the circuit breaker, the response cache, redaction and the input limits."""

from __future__ import annotations

from feather_grpc.config.model import InputLimits, ProviderConfig, RetryConfig, RouteConfig, RoutingConfig
from feather_grpc.config.schema import FileConfig, RouteSpec
from feather_grpc.core.breaker import BreakerSettings
from feather_grpc.core.cache import CacheSettings
from feather_grpc.core.errors import ConfigError
from feather_grpc.core.settings import Settings


def resolve_routing(
    fc: FileConfig, providers: tuple[ProviderConfig, ...], settings: Settings, source: str
) -> RoutingConfig:
    routes = _routes(fc, list(providers), source)
    breaker = _breaker(fc, settings)
    cache = _cache(fc, settings)
    r, safety = fc.retry, fc.safety
    return RoutingConfig(
        policy=fc.policy,
        routes=routes,
        retry=RetryConfig(r.max_attempts, r.base_ms, r.max_ms),
        request_timeout_ms=fc.request_timeout_ms,
        breaker=breaker,
        cache=cache,
        redact_pii=frozenset(safety.pii_kinds) if safety.redact_pii else frozenset(),
        input_limits=InputLimits(safety.max_messages, safety.max_content_chars, safety.max_output_tokens),
    )


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


def _request_names(models: list[tuple[str, str, list[str]]]) -> set[str]:
    """What a request may name for these (provider, model, aliases): each name and alias, bare or as provider/x."""
    return {n for p, name, aliases in models for bare in (name, *aliases) for n in (bare, f"{p}/{bare}")}


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
