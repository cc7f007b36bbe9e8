"""Logging: JSON or text lines off the event loop, secret redaction, and one log line per call.

`configure_logging()` sends every record through a queue to a writer thread, so a slow stderr (a full
container log pipe) never blocks the event loop. Formats: `LOG_FORMAT=json` (one JSON object per line),
`text`, or `auto` (the default: text on a terminal, JSON otherwise, as in containers). `LOG_LEVEL`
sets the level (debug, info, warning, error; default info).

`CallLog` is an engine observer that writes one INFO line per settled call on the `feather_grpc.calls`
logger: ids, route, outcome, tokens, cost and timing. Prompts and completions are never in it; they are
logged only with `FEATHER_LOG_CONTENT=true` and `LOG_LEVEL=debug` (see `server.interceptors`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

import orjson

from feather_grpc.core.ledger import UsageRecord
from feather_grpc.core.results import AttemptRecord
from feather_grpc.core.settings import environ

CALLS_LOGGER = "feather_grpc.calls"
CONTENT_LOGGER = "feather_grpc.content"
_REDACTED = "[REDACTED]"
# LogRecord attributes that are not caller data (everything else passed via `extra` is).
_STANDARD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS and not k.startswith("_")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ms), level, logger, message, pid, then the record's `extra`."""

    _second = -1
    _second_text = ""

    def _time(self, created: float) -> str:
        second = int(created)
        if second != self._second:  # one strftime per second, not per line
            self._second, self._second_text = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((created - second) * 1000):03d}Z"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self._time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        out.update(_fields(record))
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            out["exception"] = record.exc_text
        return orjson.dumps(out, default=str).decode()


class TextFormatter(logging.Formatter):
    """`time level logger: message key=value ...` for people at a terminal."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _fields(record)
        if not extra:
            return line
        head, sep, tail = line.partition("\n")  # keep a traceback below the key=value pairs
        pairs = " ".join(f"{k}={_text_value(v)}" for k, v in extra.items())
        return f"{head} {pairs}{sep}{tail}"


def _text_value(value: object) -> str:
    """A value a caller may have chosen (a model name, a tag) must not forge fields or lines: anything
    with spaces, quotes, `=` or control characters is quoted with its escapes (logfmt style)."""
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "=\\'):
        return text
    return orjson.dumps(text).decode()  # JSON string quoting: \n, \", \u0000 ...


class SecretRedactor(logging.Filter):
    """Replaces known secret values (provider API keys) wherever they appear in a formatted record.
    A last line of defence: the code never logs keys, but an upstream error text might echo one."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: tuple[str, ...] = ()

    def add(self, secrets: Iterable[str]) -> None:
        # Short values would redact ordinary words; real keys are long.
        self._secrets = tuple(sorted({*self._secrets, *(s for s in secrets if len(s) >= 8)}, key=len, reverse=True))

    def clean(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._secrets:
            return True
        record.msg = self.clean(record.getMessage())
        record.args = None
        if record.exc_info:  # render the traceback now, so it can be cleaned
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        if record.exc_text:
            record.exc_text = self.clean(record.exc_text)
        for key, value in _fields(record).items():
            if isinstance(value, str):
                setattr(record, key, self.clean(value))
        return True


class _Enqueue(logging.handlers.QueueHandler):
    """Hands records to the writer thread with the message rendered and the traceback as text, so
    formatting (JSON or text) and the write itself happen off the event loop."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        original, record = record, object.__new__(logging.LogRecord)  # a shallow copy, without copy.copy's cost
        record.__dict__.update(original.__dict__)
        record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
            record.exc_info = None
        return record


_LINGER_S = 0.02


class _Writer:
    """The writer thread: drains the queue and writes everything pending in one write, so a busy gateway
    pays one syscall per batch, not per line. Items are LogRecords (formatted here) or lines the call
    log rendered itself (see CallLog)."""

    _STOP = object()

    def __init__(self, handler: logging.StreamHandler[TextIO]) -> None:
        self.queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.handler = handler
        self.json = isinstance(handler.formatter, JsonFormatter)
        self._thread = threading.Thread(target=self._run, name="feather-log-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        q, handler = self.queue, self.handler
        while True:
            batch = [q.get()]
            with contextlib.suppress(queue.Empty):
                while len(batch) < 1024:
                    batch.append(q.get_nowait())
            lines: list[str] = []
            stop = False
            for item in batch:
                if item is self._STOP:
                    stop = True
                elif isinstance(item, str):
                    lines.append(item)
                elif handler.filter(item):
                    try:
                        lines.append(handler.format(item))
                    except Exception:
                        handler.handleError(item)
            if lines:
                try:
                    handler.stream.write("\n".join(lines) + "\n")
                    handler.stream.flush()
                except Exception:  # a closed or broken stream must not kill the writer
                    pass
            if stop:
                return
            # Linger before taking the next batch: lines wait a few milliseconds more, and a quiet gateway
            # (one call at a time) wakes this thread a few dozen times a second instead of after every call,
            # which would compete with the next call for the GIL and a core.
            time.sleep(_LINGER_S)

    def stop(self) -> None:
        self.queue.put(self._STOP)
        self._thread.join(timeout=5)


redactor = SecretRedactor()
_listener: _Writer | None = None


LOG_FORMATS = ("auto", "json", "text")
LOG_LEVELS = ("debug", "info", "warning", "warn", "error", "critical")


def settings_problem(env: Mapping[str, str]) -> str | None:
    """What is wrong with LOG_FORMAT / LOG_LEVEL, if anything: a typo must not quietly give text logs that a
    log pipeline cannot parse, or a level nobody asked for."""
    fmt = env.get("LOG_FORMAT", "auto").strip().lower() or "auto"
    if fmt not in LOG_FORMATS:
        return f"LOG_FORMAT={fmt!r}: use {', '.join(LOG_FORMATS)}"
    level = env.get("LOG_LEVEL", "info").strip().lower() or "info"
    if level not in LOG_LEVELS:
        return f"LOG_LEVEL={level!r}: use debug, info, warning, error or critical"
    return None


def wants_json(env: Mapping[str, str], stream: TextIO) -> bool:
    fmt = env.get("LOG_FORMAT", "auto").strip().lower() or "auto"
    if fmt == "auto":
        return not (hasattr(stream, "isatty") and stream.isatty())
    return fmt == "json"


def configure_logging(env: Mapping[str, str] | None = None, stream: TextIO | None = None) -> None:
    """Installs the process's logging from LOG_LEVEL and LOG_FORMAT. Idempotent; flushed at exit."""
    global _listener
    env = environ() if env is None else env
    stream = stream or sys.stderr
    level_name = env.get("LOG_LEVEL", "info").strip().upper()
    level = logging.getLevelNamesMapping().get("WARNING" if level_name == "WARN" else level_name, logging.INFO)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if wants_json(env, stream) else TextFormatter())
    handler.addFilter(redactor)
    stop_logging()
    _listener = _Writer(handler)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_Enqueue(_listener.queue))
    root.setLevel(level)
    # Chatty third-party loggers stay at warning unless debugging.
    for name in ("grpc._cython.cygrpc", "asyncio"):
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else logging.WARNING)
    grpc_log = logging.getLogger("grpc._cython.cygrpc")
    for old_filter in [f for f in grpc_log.filters if isinstance(f, EndedCallFilter)]:
        grpc_log.removeFilter(old_filter)
    if level > logging.DEBUG:
        grpc_log.addFilter(EndedCallFilter())


class EndedCallFilter(logging.Filter):
    """gRPC logs at ERROR, with a traceback, an answer or status it could not send because the call had
    already ended: the caller's deadline passed (or it cancelled) as the gateway answered (grpc/grpc#32551).
    The gateway has recorded that call like any other; the line reads like a crash and is not one (found by
    bench/fuzz.py --serve), so it is kept only when debugging."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("ExecuteBatchError raised in core by servicer method")


def stop_logging() -> None:
    """Writes out every queued record and stops the writer thread."""
    global _listener
    if _listener is not None:
        _listener.stop()
        _listener = None


atexit.register(stop_logging)


_JSON_TIME = JsonFormatter()


class CallLog:
    """Engine observer: exactly one INFO line per call, without prompts, completions or keys."""

    def __init__(self, worker: int | None = None, logger: logging.Logger | None = None) -> None:
        self._log = logger or logging.getLogger(CALLS_LOGGER)
        self._worker = worker
        self._pid = os.getpid()  # a system call per line otherwise; serving processes are started, not forked

    def attempt_started(self, request_id: str, provider: str, model: str, streamed: bool) -> object:
        return None

    def attempt_finished(self, token: object, attempt: AttemptRecord) -> None:
        return None

    def call_settled(self, record: UsageRecord, attempts: Sequence[AttemptRecord], ttft_ms: int | None) -> None:
        if not self._log.isEnabledFor(logging.INFO):
            return
        writer = _listener
        # The provider's id of its reply: only the attempt that answered has one (a stream cut mid-way too).
        # A plain loop: a generator here would cost more than rendering the line.
        reply_id = ""
        for a in attempts:
            if a.upstream_response_id:
                reply_id = a.upstream_response_id
        fields: dict[str, Any] = {
            "request_id": record.request_id,
            "tenant": record.tenant,
            "provider": record.provider,
            "model": record.model,
            "requested_model": record.requested_model,
            "streamed": record.streamed,
            "outcome": str(record.outcome),
            "error_code": record.error_code,
            "error_reason": record.error_reason,
            "input_tokens": record.input_tokens,
            "output_tokens": record.output_tokens,
            "cached_input_tokens": record.cached_input_tokens,
            "cost_nanos_usd": record.cost_nanos_usd,
            "usage_estimated": record.estimated,
            "duration_ms": record.latency_ms,
            "ttft_ms": ttft_ms,
            "attempts": len(attempts),
            # Bounded: it is the upstream's text, and a broken one must not bloat every line.
            "upstream_response_id": reply_id[:200],
        }
        failed = [a for a in attempts if a.error_reason]
        if failed:  # why each failed attempt failed (the details are safe to show; keys are redacted anyway)
            errors = fields["attempt_errors"] = []
            for a in failed:
                entry = {
                    "provider": a.provider,
                    "model": a.model,
                    "outcome": a.outcome,
                    "reason": a.error_reason,
                    "http_status": a.http_status,
                    "detail": redactor.clean(a.error_detail),
                }
                if a.upstream_response_id:  # a stream cut after its reply began: the reply it cut
                    entry["upstream_response_id"] = a.upstream_response_id[:200]
                errors.append(entry)
        if self._worker is not None:
            fields["worker"] = self._worker
        if writer is not None and writer.json and self._log.handlers == [] and self._log.propagate:
            # The hot path: render the JSON line here (one orjson call) instead of building a LogRecord,
            # copying, filtering and formatting it; same shape as JsonFormatter's lines.
            now = time.time()
            head = {
                "time": _JSON_TIME._time(now),
                "level": "info",
                "logger": self._log.name,
                "message": "call",
                "pid": self._pid,
            }
            for key in ("request_id", "requested_model"):  # caller-chosen text: redact like any field
                fields[key] = redactor.clean(fields[key])
            writer.queue.put(orjson.dumps({**head, **fields}).decode())
            return
        # makeRecord + handle: what info() does, minus the stack walk for the caller's file and line.
        line = self._log.makeRecord(self._log.name, logging.INFO, "", 0, "call", (), None, extra=fields)
        self._log.handle(line)
