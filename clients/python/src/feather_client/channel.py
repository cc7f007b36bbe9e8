"""Channel settings: the target for one or several gateways, TLS, and the service config (retry, round robin)."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import grpc

__all__ = ["TLS", "RetryPolicy", "channel_options", "credentials", "seconds", "target"]

SERVICE = "feather.v1.FeatherService"
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


@dataclass(frozen=True)
class TLS:
    """TLS settings. All PEM bytes; leave `root_certificates` unset to trust the system roots.

    Set `certificate_chain` and `private_key` together for mutual TLS (one without the other raises ValueError);
    `server_name` overrides the name the server's certificate is checked against (for gateways reached by IP
    address).
    """

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        # gRPC core aborts the whole process (not an exception) when it gets one of the pair without the other.
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("TLS: certificate_chain and private_key go together (mutual TLS needs both)")


@dataclass(frozen=True)
class RetryPolicy:
    """Client-side retries, done by gRPC itself through the service config, of UNAVAILABLE only.

    UNAVAILABLE means the call did not get an answer from a gateway (connection refused or reset, a gateway
    draining); retrying then is safe because the client sends the same `request_id` on every attempt. An
    UPSTREAM_UNAVAILABLE (every upstream the gateway tried failed) is not retried: the gateway already did,
    and says so with `grpc-retry-pushback-ms: -1`, which gRPC honours. Other codes are the caller's decision (AIP-194):
    RESOURCE_EXHAUSTED carries a RetryInfo delay to honour instead. gRPC caps `max_attempts` at 5.
    """

    max_attempts: int = 3
    initial_backoff: timedelta = timedelta(milliseconds=200)
    max_backoff: timedelta = timedelta(seconds=2)
    backoff_multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 2 <= self.max_attempts <= 5:
            raise ValueError("RetryPolicy.max_attempts must be 2 to 5 (pass retry=None to disable retries)")


def seconds(value: timedelta | float | None) -> float | None:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return None if value is None else float(value)


def _duration(value: timedelta) -> str:
    return f"{value.total_seconds():.3f}s"


def service_config(retry: RetryPolicy | None) -> str:
    config: dict[str, Any] = {"loadBalancingConfig": [{"round_robin": {}}]}
    if retry is not None:
        config["methodConfig"] = [
            {
                "name": [{"service": SERVICE}],
                "retryPolicy": {
                    "maxAttempts": retry.max_attempts,
                    "initialBackoff": _duration(retry.initial_backoff),
                    "maxBackoff": _duration(retry.max_backoff),
                    "backoffMultiplier": retry.backoff_multiplier,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    return json.dumps(config)


def target(address: str | Sequence[str]) -> str:
    """The gRPC target for one gateway or several.

    One `host:port` (or any gRPC target with a scheme, such as `dns:///feather.internal:50051`) is used as is;
    round robin then spreads calls over every address the name resolves to. Several addresses, as a list or
    comma-separated, must be IP literals (`localhost` counts as 127.0.0.1): they become one static
    `ipv4:`/`ipv6:` target that gRPC balances round robin, skipping gateways that are down.
    """
    addresses = [a.strip() for a in address.split(",")] if isinstance(address, str) else [a.strip() for a in address]
    addresses = [a for a in addresses if a]
    if not addresses:
        raise ValueError("no gateway address given")
    if len(addresses) == 1 and (addresses[0].startswith(_SCHEMES) or "://" in addresses[0]):
        return addresses[0]
    if len(addresses) == 1:
        return addresses[0]
    families = set()
    literals = []
    for a in addresses:
        host, sep, port = a.rpartition(":")
        host = host.strip("[]")
        if not sep or not port.isdigit():
            raise ValueError(f"gateway address {a!r} is not host:port")
        if host == "localhost":
            host = "127.0.0.1"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"several gateway addresses must be IP literals, got {a!r}; for host names use one DNS name "
                "that resolves to every gateway (e.g. dns:///feather.internal:50051)"
            ) from None
        families.add(ip.version)
        literals.append(f"{host}:{port}" if ip.version == 4 else f"[{host}]:{port}")
    if len(families) > 1:
        raise ValueError("several gateway addresses must be all IPv4 or all IPv6")
    return f"ipv{families.pop()}:{','.join(literals)}"


def credentials(tls: TLS | bool) -> Any:
    """Channel credentials for TLS, or None for plaintext."""
    if tls is False:
        return None
    settings = TLS() if tls is True else tls
    return grpc.ssl_channel_credentials(
        root_certificates=settings.root_certificates,
        private_key=settings.private_key,
        certificate_chain=settings.certificate_chain,
    )


def channel_options(
    tls: TLS | bool, retry: RetryPolicy | None, extra: Sequence[tuple[str, Any]]
) -> list[tuple[str, Any]]:
    """Our options, with the caller's `channel_options` replacing any of ours of the same name (and a later
    caller option replacing an earlier one): gRPC core keeps the first copy of a repeated option, so the list
    it gets holds each name once."""
    options: list[tuple[str, Any]] = [
        ("grpc.service_config", service_config(retry)),
        ("grpc.enable_retries", 1 if retry is not None else 0),
        ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ]
    if isinstance(tls, TLS) and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    merged = dict(options)
    merged.update(extra)
    return list(merged.items())
