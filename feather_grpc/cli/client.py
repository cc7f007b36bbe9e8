"""Client commands (chat, usage, models): talk to a running gateway through the feather_client facade; the
connection options they share with health."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from feather_grpc.core.settings import Settings


def _positive_seconds(text: str) -> float:
    """A --timeout: a number of seconds above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: use a number of seconds, e.g. 30") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: the timeout must be a number of seconds above 0")
    return value


def _client_cert_error(args: argparse.Namespace) -> str | None:
    """--cert and --key name the two halves of one client certificate: one without the other is an error
    (gRPC aborts the process on a chain without its key, and a key alone would be ignored)."""
    if bool(args.cert) != bool(args.key):
        given, missing = ("--cert", "--key") if args.cert else ("--key", "--cert")
        return f"feather-grpc: {given} needs {missing} (a client certificate for mutual TLS is both)"
    return None


_STATE_NAMES = {"CIRCUIT_STATE_CLOSED": "ok", "CIRCUIT_STATE_OPEN": "open", "CIRCUIT_STATE_HALF_OPEN": "half-open"}


def _client_options(args: argparse.Namespace) -> dict[str, Any]:
    from feather_client import TLS

    def read(path: str | None) -> bytes | None:
        return Path(path).read_bytes() if path else None

    tls: TLS | bool = bool(args.tls)
    if args.ca_cert or args.cert or args.key:
        tls = TLS(root_certificates=read(args.ca_cert), certificate_chain=read(args.cert), private_key=read(args.key))
    return {"api_key": args.api_key or None, "timeout": args.timeout, "tls": tls}


def _one_line(text: str) -> str:
    return " ".join(text.split())


class _Progress:
    """What a streaming command has done so far, for how a failure is reported."""

    def __init__(self) -> None:
        self.received = False  # the gateway answered (so it is listening)
        self.partial_line = False  # stdout holds text not yet ended by a newline


def _run_client_command(
    args: argparse.Namespace, command: Callable[[Any], Awaitable[int]], progress: _Progress | None = None
) -> int:
    """Runs one client call; any failure becomes one line on stderr and a non-zero exit."""
    from feather_client import FeatherClient, FeatherError

    progress = progress or _Progress()
    if error := _client_cert_error(args):
        print(error, file=sys.stderr)
        return 2

    def end_partial_line() -> None:
        if progress.partial_line:  # the error goes on a line of its own, not after the half-written reply
            progress.partial_line = False
            try:
                sys.stdout.write("\n")
                sys.stdout.flush()
            except OSError:
                pass

    async def run() -> int:
        async with FeatherClient(args.addr, **_client_options(args)) as client:
            return await command(client)

    try:
        return asyncio.run(run())
    except FeatherError as e:
        end_partial_line()
        reason = f" {e.reason}" if e.reason else ""
        unanswered = e.code.name == "UNAVAILABLE" and not e.reason and not progress.received
        hint = f" (is a gateway listening on {args.addr}?)" if unanswered else ""
        print(f"feather-grpc: {e.code.name}{reason}: {_one_line(e.message)}{hint}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `feather-grpc usage --json | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (ValueError, OSError) as e:
        end_partial_line()
        print(f"feather-grpc: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


def _chat(args: argparse.Namespace) -> int:
    from feather_client import FeatherError, format_usd, system, user

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    messages = [system(args.system), user(prompt)] if args.system else [user(prompt)]
    tags = dict(args.tag)
    progress = _Progress()

    async def chat(client: Any) -> int:
        started = time.monotonic()
        first_token: float | None = None
        stream = client.stream_chat(
            messages,
            model=args.model,
            provider=args.provider or "",
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            tags=tags,
        )
        try:
            async for text in stream:
                progress.received = True
                first_token = first_token or time.monotonic()
                sys.stdout.write(text)
                progress.partial_line = not text.endswith("\n")
                sys.stdout.flush()
        except FeatherError:
            progress.received = progress.received or _stream_started(stream)
            raise
        latency_ms = (time.monotonic() - started) * 1000
        ttft = f", first token {((first_token or started) - started) * 1000:.0f} ms" if first_token else ""
        usage = stream.usage
        cost = "unpriced" if stream.result.unpriced else format_usd(stream.cost_nanos_usd)
        estimated = " (estimated)" if stream.result.usage_estimated else ""
        sys.stdout.write("\n")
        print(
            f"-- {stream.provider}/{stream.model} · {usage.input_tokens} in + {usage.output_tokens} out tokens"
            f"{estimated} · {cost} · {latency_ms:.0f} ms{ttft} · {stream.finish_reason}",
            file=sys.stderr,
        )
        return 0

    return _run_client_command(args, chat, progress)


def _stream_started(stream: Any) -> bool:
    """Whether the gateway's first event arrived (`provider` is known from it; before, it raises)."""
    try:
        _ = stream.provider
    except RuntimeError:
        return False
    return True


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: use KEY=VALUE")
    return key, value


def _parse_time(value: str) -> datetime:
    """`30m`, `24h`, `7d` ago, or an ISO 8601 date or time (UTC unless it names an offset)."""
    units = {"m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
    match = re.fullmatch(r"(\d+)([mhdw])", value.strip())
    if match:
        try:
            return datetime.now(UTC) - timedelta(**{units[match.group(2)]: int(match.group(1))})
        except OverflowError:
            raise argparse.ArgumentTypeError(f"{value!r}: too far back (the earliest date is year 1)") from None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: use 30m, 24h, 7d, or an ISO date/time like 2026-11-01") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _table(header: list[str], rows: list[list[str]], numeric_from: int, text_from: int | None = None) -> str:
    """Columns padded to their widest cell: text left-aligned, columns numeric_from..text_from right-aligned."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = []
    numeric = range(numeric_from, len(header) if text_from is None else text_from)
    for row in [header, *rows]:
        cells = [c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def _usage(args: argparse.Namespace) -> int:
    from feather_client import format_usd

    group_by = [g.strip() for g in args.group_by.split(",") if g.strip()] if args.group_by else []
    time_dims = {"hour", "day"}

    def dims(row: Any) -> dict[str, str]:
        values = {
            "tenant": row.tenant,
            "provider": row.provider,
            "model": row.model,
            "tag": row.tag_value,
        }
        out = {}
        for g in group_by:
            if g in time_dims:
                out[g] = row.bucket_start_time.ToDatetime(tzinfo=UTC).isoformat().replace("+00:00", "Z")
            else:
                out[g if g != "tag" else args.tag_key] = values[g]
        return out

    def refused(row: Any) -> bool:
        """Calls refused before routing (authentication, limits, load shedding, a request that does not convert)
        are recorded without a provider or model: name them as what they are, not as a blank."""
        return any(g in ("provider", "model") and not dims(row)[g] for g in group_by)

    def label(name: str, value: str) -> str:
        if not value and name in ("provider", "model"):
            return "(refused)"
        if not value and name == "tenant":
            return "(unauthenticated)"  # a refused call whose caller could not be identified
        return value or "-"

    def counts(row: Any) -> dict[str, Any]:
        return {
            "requests": row.request_count,
            "ok": row.ok_count,
            "errors": row.error_count,
            "cancelled": row.cancelled_count,
            "cached": row.cached_count,
            "estimated": row.estimated_count,
            "input_tokens": row.input_tokens,
            "output_tokens": row.output_tokens,
            "cached_input_tokens": row.cached_input_tokens,
            "cache_write_tokens": row.cache_write_tokens,
            "reasoning_tokens": row.reasoning_tokens,
            "web_search_requests": row.web_search_requests,
            "cache_write_1h_tokens": row.cache_write_1h_tokens,
            "audio_input_tokens": row.audio_input_tokens,
            "audio_output_tokens": row.audio_output_tokens,
            "cost_nanos_usd": row.cost_nanos_usd,
            "cost_usd": format_usd(row.cost_nanos_usd).lstrip("$"),
        }

    async def usage(client: Any) -> int:
        pages, token = [], ""
        while True:  # every page: the server sends grouped rows in pages (AIP-158)
            report = await client.usage(
                start=args.since,
                end=args.until,
                group_by=group_by,
                tenant=args.tenant or "",
                provider=args.provider or "",
                model=args.model or "",
                tag_key=args.tag_key or "",
                page_token=token,
            )
            pages.append(report.rows)
            token = report.next_page_token
            if not token:
                break
        all_rows = [row for page in pages for row in page]
        if args.json:
            document = {
                "group_by": group_by,
                "rows": [
                    {
                        **dims(r),
                        **({"refused": refused(r)} if {"provider", "model"} & set(group_by) else {}),
                        **counts(r),
                    }
                    for r in all_rows
                ],
                "total": counts(report.total),
            }
            print(json.dumps(document, indent=2))
            return 0
        names = [args.tag_key if g == "tag" else g for g in group_by]
        header = [n.upper() for n in names] + ["REQUESTS", "OK", "ERRORS", "INPUT TOK", "OUTPUT TOK", "COST (USD)"]

        def line(first: list[str], row: Any) -> list[str]:
            c = counts(row)
            numbers = [c["requests"], c["ok"], c["errors"], c["input_tokens"], c["output_tokens"]]
            return first + [f"{n:,}" for n in numbers] + [format_usd(row.cost_nanos_usd)]

        rows = [line([label(g, v) for g, v in zip(group_by, dims(r).values(), strict=True)], r) for r in all_rows]
        total_label = ["TOTAL"] + [""] * (len(names) - 1) if names else []
        rows.append(line(total_label, report.total))
        print(_table(header, rows, numeric_from=len(names)))
        return 0

    return _run_client_command(args, usage)


def _models(args: argparse.Namespace) -> int:
    from feather_client import format_usd, pb

    def price(nanos_per_million: int) -> str:
        return format_usd(nanos_per_million)

    async def models(client: Any) -> int:
        found = await client.list_models(provider=args.provider or "")
        if args.json:
            document = [
                {
                    "provider": m.provider,
                    "model": m.name,
                    "aliases": list(m.aliases),
                    "provider_type": m.provider_type,
                    "price_usd_per_million_tokens": (
                        {
                            "input": format_usd(m.price.input_nanos_usd_per_million).lstrip("$"),
                            "output": format_usd(m.price.output_nanos_usd_per_million).lstrip("$"),
                            "cached_input": format_usd(m.price.cached_input_nanos_usd_per_million).lstrip("$"),
                            "cache_write": format_usd(m.price.cache_write_nanos_usd_per_million).lstrip("$"),
                        }
                        if m.HasField("price")
                        else None
                    ),
                    "state": _STATE_NAMES.get(pb.CircuitState.Name(m.circuit_state), "unknown"),
                    "latency_ms": m.latency_ms,
                    "max_connections": m.max_connections,
                    "last_failure": (
                        {
                            "reason": m.last_failure.reason,
                            "message": m.last_failure.message,
                            "http_status": m.last_failure.http_status,
                            "time": m.last_failure.failure_time.ToDatetime(tzinfo=UTC).isoformat(),
                        }
                        if m.HasField("last_failure")
                        else None
                    ),
                }
                for m in found
            ]
            print(json.dumps(document, indent=2))
            return 0
        header = [
            "PROVIDER",
            "MODEL",
            "ALIASES",
            "STATE",
            "INPUT $/1M",
            "OUTPUT $/1M",
            "LATENCY",
            "CONNS",
            "LAST FAILURE",
        ]
        rows = [
            [
                m.provider,
                m.name,
                ",".join(m.aliases) or "-",
                _STATE_NAMES.get(pb.CircuitState.Name(m.circuit_state), "unknown"),
                price(m.price.input_nanos_usd_per_million) if m.HasField("price") else "unpriced",
                price(m.price.output_nanos_usd_per_million) if m.HasField("price") else "unpriced",
                f"{m.latency_ms} ms" if m.latency_ms else "-",
                str(m.max_connections) if m.max_connections else "-",
                _last_failure(m) or "-",
            ]
            for m in found
        ]
        print(_table(header, rows, numeric_from=4, text_from=8))
        return 0

    return _run_client_command(args, models)


def _default_addr() -> str:
    """Where every client command (health included) finds the gateway: $FEATHER_ADDR, else this machine on
    $PORT (the port `serve` listens on, so one environment serves and calls alike), else localhost:50051."""
    return Settings().text("FEATHER_ADDR") or f"localhost:{Settings().text('PORT') or 50051}"


def _connection_options() -> argparse.ArgumentParser:
    """The options every command that talks to a running gateway shares."""
    options = argparse.ArgumentParser(add_help=False)
    options.add_argument(
        "--addr",
        default=_default_addr(),
        help="gateway host:port, or several comma-separated IPs (default: $FEATHER_ADDR, else localhost:$PORT, "
        "else localhost:50051)",
    )
    options.add_argument("--address", dest="addr", help=argparse.SUPPRESS)  # the health command's old spelling
    options.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    options.add_argument("--ca-cert", help="PEM root certificates to trust (implies TLS)")
    options.add_argument("--cert", help="PEM client certificate chain for mutual TLS (with --key)")
    options.add_argument("--key", help="PEM private key of --cert")
    return options


def _last_failure(model: Any) -> str:
    """`UPSTREAM_CONNECT_ERROR 12s ago: openai: connect error: ...`, or "" when the model has not failed."""
    if not model.HasField("last_failure"):
        return ""
    failure = model.last_failure
    age = max(datetime.now(UTC) - failure.failure_time.ToDatetime(tzinfo=UTC), timedelta(0))
    seconds = int(age.total_seconds())
    ago = f"{seconds}s" if seconds < 120 else f"{seconds // 60}m" if seconds < 7200 else f"{seconds // 3600}h"
    return f"{failure.reason} {ago} ago: {_one_line(failure.message)}"


def _add_client_commands(sub: Any) -> None:
    common = argparse.ArgumentParser(add_help=False, parents=[_connection_options()])
    common.add_argument(
        "--api-key", default=Settings().text("FEATHER_API_KEY") or None, help="API key (default: $FEATHER_API_KEY)"
    )
    common.add_argument("--timeout", type=_positive_seconds, default=120.0, help="deadline in seconds (default: 120)")

    chat = sub.add_parser("chat", parents=[common], help="stream a reply from a running gateway")
    chat.add_argument("prompt", help='the user message ("-" reads it from stdin)')
    chat.add_argument("--model", "-m", default="fast", help="model, alias or provider/model (default: fast)")
    chat.add_argument("--system", help="a system message sent before the prompt")
    chat.add_argument("--provider", help="only route to this provider")
    chat.add_argument("--max-tokens", type=int)
    chat.add_argument("--temperature", type=float)
    chat.add_argument(
        "--tag", action="append", type=_key_value, default=[], metavar="KEY=VALUE", help="attribution tag (repeatable)"
    )
    chat.set_defaults(run=_chat)

    usage = sub.add_parser("usage", parents=[common], help="usage and cost from a running gateway's ledger")
    usage.add_argument("--group-by", help="comma-separated: tenant, provider, model, tag (with --tag-key), hour, day")
    usage.add_argument("--since", type=_parse_time, help="start: 30m, 24h, 7d ago, or an ISO date/time (UTC)")
    usage.add_argument("--until", type=_parse_time, help="end (exclusive), same forms (default: now)")
    usage.add_argument("--tenant")
    usage.add_argument("--provider")
    usage.add_argument("--model")
    usage.add_argument("--tag-key", help="the tag whose values --group-by tag groups by")
    usage.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    usage.set_defaults(run=_usage)

    models = sub.add_parser("models", parents=[common], help="models, aliases, prices and state")
    models.add_argument("--provider", help="only this provider's models")
    models.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    models.set_defaults(run=_models)
