"""The commands an operator runs beside the gateway: check-config, keys new, health (the container HEALTHCHECK)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from feather_grpc.cli.client import _client_cert_error, _one_line
from feather_grpc.cli.serve import _load


def _health(args: argparse.Namespace) -> int:
    """Exit 0 when the server answers SERVING over grpc.health.v1 (the container HEALTHCHECK)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    address = args.addr
    if "," in address:
        print("feather-grpc: health checks one gateway: give --addr one host:port", file=sys.stderr)
        return 2
    if error := _client_cert_error(args):
        print(error, file=sys.stderr)
        return 2
    if args.tls or args.ca_cert or args.cert:

        def read(path: str | None) -> bytes | None:
            return Path(path).read_bytes() if path else None

        try:
            creds = grpc.ssl_channel_credentials(read(args.ca_cert), read(args.key), read(args.cert))
        except OSError as e:
            print(f"feather-grpc: {_one_line(str(e))}", file=sys.stderr)
            return 2
        channel = grpc.secure_channel(address, creds)
    else:
        channel = grpc.insecure_channel(address)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as e:
            print(f"{address}: {e.code().name}", file=sys.stderr)
            return 1
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    print(f"{address} {args.service or '(server)'}: {status}")
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


def _check_config(args: argparse.Namespace) -> int:
    if args.file and args.config_option and args.file != args.config_option:
        print("feather-grpc: check-config takes one file: give it as FILE (--config is older)", file=sys.stderr)
        return 2
    cfg = _load(args.file or args.config_option)
    for p in cfg.providers:
        for m in p.models:
            price = (
                "unpriced" if m.price is None else (f"in {m.price.input} / out {m.price.output} nano-USD per 1M tokens")
            )
            aliases = f" aliases={','.join(m.aliases)}" if m.aliases else ""
            print(f"{p.name}/{m.name} [{p.type}]{aliases} {price}")
    if cfg.skipped_providers:
        print(f"skipped (API key not set): {', '.join(cfg.skipped_providers)}")
    print(f"ok: {cfg.source}")
    return 0


def _keys_new(args: argparse.Namespace) -> int:
    """Prints a fresh API key once, with the digest that goes into the config (the key itself never does)."""
    import hashlib
    import json
    import secrets

    key = "fk_" + secrets.token_urlsafe(32)
    digest = "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    print(f"api key (give it to the caller; it is not stored anywhere): {key}")
    print(f"digest (put it in the config):                              {digest}")
    print(json.dumps({"tenants": {args.tenant: {"keys": [digest]}}}, indent=2))
    return 0
