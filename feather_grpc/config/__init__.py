"""Gateway configuration: `feather.config.json` (the original schema, extended), env overrides, defaults.

Everything is parsed and validated once at start; the engine then reads plain resolved objects and never
touches JSON or the environment on the request path. The package, bottom up: `schema` (the document),
`model` (the resolved objects), `resolve` (document + environment -> model, section by section), `load`
(a file or the embedded default, default.json). `ConfigError` lives in core (the environment's settings
raise it too). Callers import from here.
"""

from feather_grpc.config.load import load
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
from feather_grpc.config.resolve import resolve
from feather_grpc.config.schema import FileConfig, ServerSpec, parse_file_config
from feather_grpc.core.errors import ConfigError

__all__ = [
    "AuthConfig",
    "ConfigError",
    "FileConfig",
    "GatewayConfig",
    "InputLimits",
    "ModelConfig",
    "ProviderConfig",
    "RetryConfig",
    "RouteConfig",
    "ServerSpec",
    "TenantConfig",
    "TlsConfig",
    "load",
    "parse_file_config",
    "resolve",
]
