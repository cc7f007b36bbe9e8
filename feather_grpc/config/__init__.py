"""Gateway configuration: `feather.config.json` (the original schema, extended), env overrides, defaults.

Everything is parsed and validated once at start; the engine then reads plain resolved objects and never
touches JSON or the environment on the request path. The package, bottom up: `schema` (the document),
`model` (the resolved objects, grouped by section), `resolve` (document + environment -> model, one
function per section: resolve_providers, resolve_routing, resolve_tenancy), `load`
(a file or the embedded default, default.json). `ConfigError` lives in core (the environment's settings
raise it too). Callers import from here.
"""

from feather_grpc.config.load import load
from feather_grpc.config.model import (
    AuthConfig,
    GatewayConfig,
    InputLimits,
    LedgerConfig,
    ModelConfig,
    ProviderConfig,
    RetryConfig,
    RouteConfig,
    RoutingConfig,
    ServerConfig,
    SharedStateConfig,
    TenancyConfig,
    TenantConfig,
    TlsConfig,
)
from feather_grpc.config.resolve import resolve
from feather_grpc.config.schema import FileConfig, ServerSpec, parse_file_config
from feather_grpc.core.errors import ConfigError

__all__ = [
    "AuthConfig",
    "ConfigError",
    "FileConfig",
    "GatewayConfig",
    "InputLimits",
    "LedgerConfig",
    "ModelConfig",
    "ProviderConfig",
    "RetryConfig",
    "RouteConfig",
    "RoutingConfig",
    "ServerConfig",
    "ServerSpec",
    "SharedStateConfig",
    "TenancyConfig",
    "TenantConfig",
    "TlsConfig",
    "load",
    "parse_file_config",
    "resolve",
]
