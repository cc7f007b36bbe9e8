"""Command line: `feather-grpc serve | health | check-config | keys | chat | usage | models`.

serve.py runs the gateway (and its workers), admin.py the commands an operator runs beside it (check-config,
keys, health), client.py the commands that talk to a running gateway through the Python client."""

from __future__ import annotations

import argparse
import sys

from feather_grpc.cli.admin import _check_config, _health, _keys_new
from feather_grpc.cli.client import _add_client_commands, _connection_options, _positive_seconds
from feather_grpc.cli.serve import _serve, _worker_count
from feather_grpc.core.settings import environ


def _setup_logging() -> None:
    """LOG_LEVEL and LOG_FORMAT (json, text, or auto: text on a terminal, JSON otherwise)."""
    from feather_grpc.server.logs import configure_logging, settings_problem

    env = environ()
    problem = settings_problem(env)
    if problem is not None:
        print(f"feather-grpc: {problem}", file=sys.stderr)
        raise SystemExit(2)
    configure_logging(env)


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
    serve.add_argument(
        "--workers",
        type=_worker_count,
        help="server processes sharing the port via SO_REUSEPORT, or auto: one per CPU "
        "(default: $FEATHER_WORKERS or 1)",
    )
    serve.set_defaults(run=_serve)
    health = sub.add_parser(
        "health", parents=[_connection_options()], help="ask a running server's grpc.health.v1; exit 0 if SERVING"
    )
    health.add_argument("--service", default="", help='service name (default: "", the whole server)')
    health.add_argument("--timeout", type=_positive_seconds, default=2.0, help="seconds (default: 2)")
    health.set_defaults(run=_health)
    check = sub.add_parser("check-config", help="validate a config and print what it serves")
    check.add_argument(
        "file",
        nargs="?",
        metavar="FILE",
        help="the config to check (default: the one serve loads: $FEATHER_CONFIG, ./feather.config.json, or the "
        "embedded default)",
    )
    check.add_argument("--config", dest="config_option", help=argparse.SUPPRESS)  # the older spelling
    check.set_defaults(run=_check_config)
    _add_client_commands(sub)
    keys = sub.add_parser("keys", help="manage API keys").add_subparsers(dest="keys_command", required=True)
    new_key = keys.add_parser("new", help="make an API key and print its SHA-256 digest for the config")
    new_key.add_argument("--tenant", default="my-team", help="tenant name for the printed config snippet")
    new_key.set_defaults(run=_keys_new)
    args = parser.parse_args(argv)
    _setup_logging()
    return int(args.run(args))
