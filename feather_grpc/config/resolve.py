"""Resolution: a validated document plus the environment become the resolved config, one section at a time,
each built by its own function: the providers (resolve_providers), routing (resolve_routing), tenancy
(resolve_tenancy), then the server, the shared state and the ledger (here). Every problem is a
`ConfigError` naming the field and a fix; nothing here runs on the request path."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

from feather_grpc.config.model import GatewayConfig, LedgerConfig, ServerConfig, SharedStateConfig, TlsConfig
from feather_grpc.config.resolve_providers import check_readable, resolve_providers
from feather_grpc.config.resolve_routing import resolve_routing
from feather_grpc.config.resolve_tenancy import resolve_tenancy
from feather_grpc.config.schema import FileConfig, TlsSpec
from feather_grpc.core.errors import ConfigError
from feather_grpc.core.redis_url import parse_url
from feather_grpc.core.settings import Settings, environ


def resolve(file_config: FileConfig, env: dict[str, str] | None = None, source: str = "<config>") -> GatewayConfig:
    """Turns a validated document plus environment overrides into the engine's resolved config, section by
    section. Only the first problem is reported: the sections are resolved in this order (the order the
    flat resolution checked most of them in), so that of several problems the same one is reported first."""
    env = environ() if env is None else env
    settings = Settings(env)
    providers, skipped = resolve_providers(file_config, env, source)
    routing = resolve_routing(file_config, providers, settings, source)
    tenancy = resolve_tenancy(file_config, env, source)
    server = _server(file_config, settings, source)
    shared_state = _shared_state(file_config, env)
    ledger = _ledger(file_config, env)
    return GatewayConfig(
        providers=providers,
        skipped_providers=skipped,
        routing=routing,
        server=server,
        ledger=ledger,
        shared_state=shared_state,
        tenancy=tenancy,
        source=source,
    )


def _server(fc: FileConfig, settings: Settings, source: str) -> ServerConfig:
    s = fc.server
    port = settings.integer("PORT", s.port, minimum=0, maximum=65535)
    drain_delay_ms = settings.integer("DRAIN_DELAY_MS", s.drain_delay_ms, minimum=0, maximum=300_000)
    return ServerConfig(
        host=s.host,
        port=port,
        grace_period_s=s.grace_period_s,
        drain_delay_s=drain_delay_ms / 1000,
        max_in_flight=s.max_in_flight,
        max_loop_lag_s=s.max_loop_lag_ms / 1000,
        max_message_bytes=s.max_message_bytes,
        tls=_tls(s.tls, source),
    )


def _tls(spec: TlsSpec | None, source: str) -> TlsConfig | None:
    """The TLS files must be readable now: the server reads them only when it binds."""
    if spec is None:
        return None
    for field_name, path in (
        ("certFile", spec.cert_file),
        ("keyFile", spec.key_file),
        ("clientCaFile", spec.client_ca_file),
    ):
        check_readable(path, source, f"server.tls.{field_name}")
    return TlsConfig(spec.cert_file, spec.key_file, spec.client_ca_file)


def _shared_state(fc: FileConfig, env: dict[str, str]) -> SharedStateConfig:
    return SharedStateConfig(redis_url=_redis_url(env), failure_mode=fc.state_failure_mode)


def _redis_url(env: dict[str, str]) -> str:
    url = env.get("REDIS_URL", "")
    if url:
        try:
            parse_url(url)
        except (ValueError, OSError) as e:  # OSError: a rediss:// CA file that cannot be read
            fix = "use redis://[user:password@]host:port/db, rediss://... or unix:///path[?db=N]; ?cluster=true"
            raise ConfigError("environment", "REDIS_URL", str(e), fix) from None
    return url


def _ledger(fc: FileConfig, env: dict[str, str]) -> LedgerConfig:
    path = env.get("FEATHER_LEDGER_PATH") or fc.ledger.path
    return LedgerConfig(
        type=fc.ledger.type,
        path=path if fc.ledger.type == "sqlite" else ":memory:",
        synchronous=fc.ledger.synchronous,
        database_url=_database_url(env),
    )


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
