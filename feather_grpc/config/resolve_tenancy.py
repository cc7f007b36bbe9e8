"""Resolution of the tenancy section: who calls (API key hashes, the JWT secret), what each tenant may do
(models, limits, budgets), the provider:model limits and how the limits wait."""

from __future__ import annotations

import math
from decimal import Decimal

from feather_grpc.config.model import AuthConfig, TenancyConfig, TenantConfig
from feather_grpc.config.schema import FileConfig, TenantPolicySpec, TenantSpec
from feather_grpc.core.errors import ConfigError
from feather_grpc.core.pricing import NANOS_PER_USD
from feather_grpc.core.settings import Settings


def resolve_tenancy(fc: FileConfig, env: dict[str, str], source: str) -> TenancyConfig:
    auth, tenants = _tenants(fc, env, source)
    return TenancyConfig(
        auth=auth,
        tenants=tenants,
        default_tenant=tenants["default"],
        provider_limits=_provider_limits(fc, source),
        rate_limit_mode=fc.rate_limit_mode,
        queue_min_call_s=fc.queue_min_call_ms / 1000,
    )


def _tenants(fc: FileConfig, env: dict[str, str], source: str) -> tuple[AuthConfig, dict[str, TenantConfig]]:
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
    return auth, tenants


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
