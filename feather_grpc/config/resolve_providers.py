"""Resolution of the providers section: each provider's wire format, key, URL, cloud settings, models and
prices, proxy and TLS files, checked now so that `check-config` and `serve` give the same one-line answer."""

from __future__ import annotations

import importlib.util
import ssl
from pathlib import Path

from feather_grpc.config.model import ModelConfig, ProviderConfig
from feather_grpc.config.schema import (
    DEFAULT_BASE_URLS,
    KNOWN_TYPES,
    MAX_USD_PER_1M,
    FileConfig,
    ModelSpec,
    PriceSpec,
    ProviderSpec,
)
from feather_grpc.core.egress import DIRECT, Egress, env_proxy, parse_proxy, tls_context
from feather_grpc.core.errors import ConfigError
from feather_grpc.core.extras import missing_extra
from feather_grpc.core.pricing import Price


def resolve_providers(
    fc: FileConfig, env: dict[str, str], source: str
) -> tuple[tuple[ProviderConfig, ...], tuple[str, ...]]:
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
            tiers = _tier_prices(source, where, m, price)
            models.append(
                ModelConfig(
                    name,
                    m.name,
                    tuple(m.aliases),
                    price,
                    tuple(m.capabilities),
                    m.weight,
                    m.max_output_tokens,
                    tiers,
                    _long_context(source, where, m, price),
                )
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


def check_readable(path: str | None, source: str, field: str) -> None:
    """A file the gateway reads later (TLS material) must be readable now, or the config names it."""
    if path is None:
        return
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ConfigError(
            source, field, f"cannot read {path} ({e.strerror})", "check the path and permissions"
        ) from None


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
        check_readable(path, source, f"{where}.{key}")
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


def _tier_prices(source: str, where: str, m: ModelSpec, price: Price | None) -> tuple[tuple[str, Price], ...]:
    """A model's service-tier prices, each whole, on a priced model."""
    tiers = []
    for tier, spec in m.service_tiers.items():
        at = f"{where}.serviceTiers.{tier}"
        if not tier.strip():
            raise ConfigError(source, at, "has no tier name", 'name it as the provider reports it, e.g. "priority"')
        tiers.append((tier, _whole_price(source, at, spec, price)))
    return tuple(tiers)


def _long_context(source: str, where: str, m: ModelSpec, price: Price | None) -> tuple[int, Price] | None:
    """A model's long-context price and its threshold."""
    if m.long_context is None:
        return None
    at = f"{where}.longContext"
    if m.service_tiers:
        raise ConfigError(source, at, "is not combined with serviceTiers yet", "keep one of the two on this model")
    return m.long_context.above_input_tokens, _whole_price(source, at, m.long_context, price)


def _whole_price(source: str, at: str, spec: PriceSpec, model_price: Price | None) -> Price:
    """A model's second price (a service tier's, long context's): complete, on a priced model."""
    if model_price is None:
        raise ConfigError(source, at, "is a second price of a model with no price", "give the model its price first")
    try:
        price = spec.price()
    except ValueError as e:
        fix = f"use a plain USD amount such as 0.0015 (at most {MAX_USD_PER_1M:,} per 1M tokens)"
        raise ConfigError(source, at, f"price {e}", fix) from None
    if price is None:
        raise ConfigError(source, at, "has no input or output price", 'give both "inputPer1M" and "outputPer1M"')
    return price
