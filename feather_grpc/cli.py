"""Command line: `feather-grpc serve | check-config`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from feather_grpc import config as config_module


def _setup_logging() -> None:
    level = os.environ.get("LOG_LEVEL", "info").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load(path: str | None) -> config_module.GatewayConfig:
    try:
        return config_module.load(path)
    except config_module.ConfigError as e:
        print(f"feather-grpc: invalid configuration: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _serve(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    from feather_grpc.server.app import serve

    log = logging.getLogger("feather_grpc")
    providers = ", ".join(f"{p.name} ({p.type}, {len(p.models)} models)" for p in cfg.providers)
    log.info("providers: %s", providers)
    if cfg.skipped_providers:
        log.info("skipped providers with no API key set: %s", ", ".join(cfg.skipped_providers))
    asyncio.run(serve(cfg, args.host, args.port))
    return 0


def _check_config(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="feather-grpc", description="Feather gRPC LLM gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the gateway")
    serve.add_argument(
        "--config",
        help="path to feather.config.json (default: $FEATHER_CONFIG, ./feather.config.json, or the embedded default)",
    )
    serve.add_argument("--host", help="address to bind (default from config: 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port (default: $PORT or 50051)")
    serve.set_defaults(run=_serve)
    check = sub.add_parser("check-config", help="validate a config and print what it serves")
    check.add_argument("--config")
    check.set_defaults(run=_check_config)
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    new_key = keys.add_parser("new", help="make an API key and print its SHA-256 digest for the config")
    new_key.add_argument("--tenant", default="my-team", help="tenant name for the printed config snippet")
    new_key.set_defaults(run=_keys_new)
    args = parser.parse_args(argv)
    _setup_logging()
    return int(args.run(args))


if __name__ == "__main__":
    raise SystemExit(main())
