"""`feather-grpc serve`: load the config, then run the gateway in this process or supervise its workers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Mapping

from feather_grpc import config as config_module
from feather_grpc.core.settings import Settings, environ


def _load(path: str | None) -> config_module.GatewayConfig:
    try:
        return config_module.load(path)
    except config_module.ConfigError as e:
        print(f"feather-grpc: invalid configuration: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _workers(args: argparse.Namespace) -> int:
    """--workers, else $FEATHER_WORKERS, else 1; `auto` is one per CPU this process may use."""
    from feather_grpc.server.workers import cpu_count

    if args.workers is not None:
        return cpu_count() if args.workers == "auto" else int(args.workers)
    raw = Settings().text("FEATHER_WORKERS", "1")
    if raw.lower() == "auto":
        return cpu_count()
    try:
        return int(raw)
    except ValueError:
        fix = "set FEATHER_WORKERS to the number of server processes, e.g. 4, or auto (one per CPU)"
        raise config_module.ConfigError(
            "environment", "FEATHER_WORKERS", f"{raw!r} is not a whole number", fix
        ) from None


def _serve(args: argparse.Namespace) -> int:
    cfg = _load(args.config)
    from feather_grpc.server import workers

    log = logging.getLogger("feather_grpc")
    env = environ()
    worker = workers.worker_index(env)
    try:
        args.workers = _workers(args)
    except config_module.ConfigError as e:
        print(f"feather-grpc: invalid configuration: {e}", file=sys.stderr)
        return 2
    if args.workers < 1:
        print("feather-grpc: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.port is not None and not 0 <= args.port <= 65535:
        print("feather-grpc: --port must be from 0 to 65535", file=sys.stderr)
        return 2
    if args.workers > 1 and worker is None:
        port = cfg.server.port if args.port is None else args.port
        if port == 0:
            print("feather-grpc: --workers needs a fixed port (not 0): the workers share it", file=sys.stderr)
            return 2
        serve_args = ["--port", str(port)]
        serve_args += ["--config", args.config] if args.config else []
        serve_args += ["--host", args.host] if args.host else []
        log.info("supervisor: starting %d workers on port %d", args.workers, port)
        # An in-memory ledger is each worker's own; Postgres has its own writers (a spool per worker).
        ledger = None
        if cfg.ledger.type == "sqlite" and not cfg.ledger.database_url:
            ledger = (os.path.abspath(cfg.ledger.path), cfg.ledger.synchronous)
        metrics = None
        try:
            metrics_port = Settings(env).port("METRICS_PORT")
        except config_module.ConfigError as e:
            print(f"feather-grpc: invalid configuration: {e}", file=sys.stderr)
            return 2
        if metrics_port is not None:
            metrics = (env.get("METRICS_HOST") or args.host or cfg.server.host, metrics_port)
        return workers.run_workers(args.workers, serve_args, ledger=ledger, metrics=metrics)
    if worker is not None:
        workers.die_with_parent(env)
    from feather_grpc.server.app import ListenError, ServerOptions, serve

    providers = ", ".join(f"{p.name} ({p.type}, {len(p.models)} models)" for p in cfg.providers)
    log.info("providers: %s", providers)
    if cfg.skipped_providers:
        log.info("skipped providers with no API key set: %s", ", ".join(cfg.skipped_providers))
    try:
        with asyncio.Runner(loop_factory=_loop_factory(env)) as runner:
            runner.run(serve(cfg, args.host, args.port, ServerOptions.from_env(env, worker=worker)))
    except config_module.ConfigError as e:
        print(f"feather-grpc: invalid configuration: {e}", file=sys.stderr)
        return 2
    except ListenError as e:
        print(f"feather-grpc: {e}", file=sys.stderr)
        return 2
    return 0


def _loop_factory(env: Mapping[str, str]) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop when installed (about 10% less CPU per call, measured in bench/), unless
    FEATHER_EVENT_LOOP=asyncio asks for the standard loop."""
    if env.get("FEATHER_EVENT_LOOP", "uvloop").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def _worker_count(text: str) -> int | str:
    """--workers: a whole number, or `auto`."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use a number of processes, e.g. 4, or auto") from None
