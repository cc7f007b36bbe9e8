"""Gateway configuration: `feather.config.json` (the original schema, extended), env overrides, defaults.

Everything is parsed and validated once at start; the engine then reads plain resolved objects and never
touches JSON or the environment on the request path. The package, bottom up: `errors` (ConfigError),
`schema` (the document), `model` (the resolved objects), `resolve` (document + environment -> model, per
section), `load` (file or the embedded default, `default.json`). Callers import from here.
"""

from feather_grpc.config.errors import ConfigError
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
