"""Tracing: an OpenTelemetry span per RPC and per upstream attempt, exported as the OTEL_* variables say.

Off unless asked for: tracing starts only when `OTEL_TRACES_EXPORTER` names an exporter other than `none`,
or `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` is set (and `OTEL_SDK_DISABLED`
is not true). When off, nothing from opentelemetry is imported and no interceptor or observer is added.

When on: `opentelemetry-instrumentation-grpc`'s aio server interceptor makes the RPC spans (health,
reflection and this process's start probes excluded); `AttemptSpans` makes a CLIENT span per upstream
attempt, a child of the RPC span, with GenAI semantic-convention attributes (gen_ai.operation.name,
gen_ai.system, gen_ai.request.model, gen_ai.response.model, gen_ai.usage.input_tokens / output_tokens on
the successful attempt, error.type on a failed one). Exporters: `otlp` (protocol from
OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL: `grpc`, the default, or `http/protobuf`) and `console`; endpoint,
headers, timeouts, sampler (OTEL_TRACES_SAMPLER), batching (OTEL_BSP_*), service name (OTEL_SERVICE_NAME,
default feather-grpc) and resource attributes come from the standard variables. Needs the `otel` extra:
`pip install 'feather-grpc[otel]'`.

Trace context goes on to the upstream: every attempt's HTTP request carries `traceparent` (and `tracestate`
when the trace has one) naming the attempt's own CLIENT span, so an egress proxy or an upstream that reads
W3C trace context joins the trace; a provider with `propagateTraceContext: false` gets neither.

The RPC span ends with the status the caller received (`rpc.grpc.status_code`): the instrumentation sees
`abort`, but the gateway ends failed calls with `abort_with_status`, which it does not, so `CallTracker`
reports every call's final code to `Tracing.rpc_ended`. Per the gRPC semantic conventions only server-side
codes (UNKNOWN, DEADLINE_EXCEEDED, UNIMPLEMENTED, INTERNAL, UNAVAILABLE, DATA_LOSS) mark a SERVER span ERROR.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from feather_grpc.config import ConfigError
from feather_grpc.core.http_client import attempt_headers
from feather_grpc.core.ledger import Outcome, UsageRecord
from feather_grpc.core.results import AttemptRecord
from feather_grpc.server.calls import current_call

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    import grpc
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer

    from feather_grpc.server.loop_lag import StartProbes

_PENDING = "tracing.attempt"
# The codes that are the server's failure (OpenTelemetry's gRPC conventions): only these make a SERVER span ERROR.
_SERVER_ERRORS = frozenset({"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"})


def tracing_requested(env: Mapping[str, str]) -> bool:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporters:
        return exporters != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporters(env: Mapping[str, str]) -> list[SpanExporter]:
    out: list[SpanExporter] = []
    for name in (n.strip().lower() for n in env.get("OTEL_TRACES_EXPORTER", "otlp").split(",")):
        if name in ("", "none"):
            continue
        if name == "console":
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            out.append(ConsoleSpanExporter())
        elif name == "otlp":
            protocol = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
            if protocol == "grpc":
                from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

                out.append(GrpcExporter())
            elif protocol == "http/protobuf":
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

                out.append(HttpExporter())
            else:
                raise ConfigError(
                    "environment",
                    "OTEL_EXPORTER_OTLP_PROTOCOL",
                    f"{protocol!r} is not supported",
                    "use grpc or http/protobuf",
                )
        else:
            raise ConfigError(
                "environment", "OTEL_TRACES_EXPORTER", f"unknown exporter {name!r}", "use otlp, console or none"
            )
    return out


class Tracing:
    """The process's tracer provider, the RPC span interceptor and the attempt-span observer."""

    def __init__(
        self,
        env: Mapping[str, str],
        provider_types: Mapping[str, str],
        *,
        exporters: Sequence[SpanExporter] | None = None,
        untraced_providers: Collection[str] = (),
    ) -> None:
        try:
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise ConfigError(
                "environment",
                "OTEL_*",
                "tracing is configured but OpenTelemetry is not installed",
                "pip install 'feather-grpc[otel]', or unset the OTEL_* variables",
            ) from None
        resource = Resource.create({SERVICE_NAME: env.get("OTEL_SERVICE_NAME") or "feather-grpc"})
        self.provider: TracerProvider = TracerProvider(resource=resource)
        self._exporters = list(_exporters(env) if exporters is None else exporters)
        for exporter in self._exporters:
            self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.observer = AttemptSpans(self.provider.get_tracer("feather_grpc"), provider_types, untraced_providers)
        from opentelemetry import trace

        self._current_span = trace.get_current_span
        self._status = trace.Status
        self._error = trace.StatusCode.ERROR

    def server_interceptor(self, probes: StartProbes) -> Any:
        """The RPC spans: not for health checks, reflection or this process's start probes."""
        from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

        def probe(details: grpc.HandlerCallDetails) -> bool:
            return probes.is_probe(details.invocation_metadata)

        quiet = filters.any_of(filters.health_check(), filters.service_prefix("grpc.reflection"), probe)
        return aio_server_interceptor(tracer_provider=self.provider, filter_=filters.negate(quiet))  # type: ignore[no-untyped-call]

    def rpc_ended(self, code: grpc.StatusCode) -> None:
        """The status code the caller received, onto the RPC's SERVER span (the current span: `CallTracker`
        calls this inside the instrumentation's wrapper). Only called for calls that did not end OK: the
        span starts with code 0."""
        span = self._current_span()
        if not span.is_recording():
            return
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        name = code.name
        if name in _SERVER_ERRORS:
            span.set_attribute("error.type", name)
            span.set_status(self._status(self._error, name))

    def shutdown(self, timeout_s: float = 3.0) -> None:
        """Exports what is buffered, then stops, for at most `timeout_s`. Blocking: call it from a thread, not
        the event loop. Bounded: with an unreachable collector the SDK's shutdown takes 30 s (its exporter
        retrying), past a container's stop timeout; then the spans still buffered are given up."""
        stopping = threading.Thread(target=self.provider.shutdown, name="feather-tracing-shutdown", daemon=True)
        stopping.start()
        stopping.join(timeout_s)
        if stopping.is_alive():
            for exporter in self._exporters:
                exporter.shutdown()  # stop retrying; the daemon threads left behind do not hold the exit
            log.warning("traces not exported within %g s of shutdown: the collector is unreachable", timeout_s)


@dataclass(slots=True)
class _Attempt:
    span: Span
    request_id: str
    streamed: bool
    ended_ns: int | None = None


class AttemptSpans:
    """Engine observer: a CLIENT span per upstream attempt. The successful attempt's span is ended when
    the call settles, so it can carry the usage the provider reported (a stream's span covers the stream)."""

    def __init__(self, tracer: Tracer, provider_types: Mapping[str, str], untraced: Collection[str] = ()) -> None:
        from opentelemetry import trace

        self._tracer = tracer
        self._types = dict(provider_types)
        self._untraced = frozenset(untraced)  # providers whose requests carry no trace context
        self._current_span = trace.get_current_span
        self._client = trace.SpanKind.CLIENT
        self._status = trace.Status
        self._error = trace.StatusCode.ERROR

    def attempt_started(self, request_id: str, provider: str, model: str, streamed: bool) -> object:
        system = self._types.get(provider, provider)
        span = self._tracer.start_span(
            f"chat {model}",
            kind=self._client,
            attributes={
                "gen_ai.operation.name": "chat",
                "gen_ai.system": system,
                "gen_ai.provider.name": system,
                "gen_ai.request.model": model,
                "feather.provider": provider,
                "feather.request_id": request_id,
                "feather.streamed": streamed,
            },
        )
        # The attempt's request is sent from this task (a hedge leg has its own), within the attempt.
        attempt_headers.set(b"" if provider in self._untraced else _trace_context(span))
        return _Attempt(span, request_id, streamed)

    def attempt_finished(self, token: object, attempt: AttemptRecord) -> None:
        assert isinstance(token, _Attempt)
        attempt_headers.set(b"")
        span = token.span
        span.set_attribute("feather.attempt.outcome", attempt.outcome)
        if attempt.http_status:
            span.set_attribute("http.response.status_code", attempt.http_status)
        if attempt.outcome != "ok":
            span.set_attribute("error.type", attempt.error_reason or attempt.outcome)
            if attempt.outcome != "cancelled":  # a hedge leg cut short by the winner did not fail
                span.set_status(self._status(self._error, attempt.error_reason))
            span.end()
            return
        scope = current_call.get()
        if scope is None:
            span.end()
            return
        token.ended_ns = None if token.streamed else time.time_ns()
        previous = scope.pending.get(_PENDING)
        if isinstance(previous, _Attempt):  # two hedge legs both succeeded: keep the later one open
            previous.span.end(end_time=previous.ended_ns)
        scope.pending[_PENDING] = token

    def call_settled(self, record: UsageRecord, attempts: Sequence[AttemptRecord], ttft_ms: int | None) -> None:
        scope = current_call.get()
        pending = scope.pending.get(_PENDING) if scope is not None else None
        if isinstance(pending, _Attempt) and pending.request_id == record.request_id:
            assert scope is not None
            del scope.pending[_PENDING]
            span = pending.span
            span.set_attribute("gen_ai.response.model", record.model)
            span.set_attribute("gen_ai.usage.input_tokens", record.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", record.output_tokens)
            if record.estimated:
                span.set_attribute("feather.usage_estimated", True)
            span.end(end_time=pending.ended_ns)
        rpc = self._current_span()
        if record.request_id.endswith(":hedge") or not rpc.is_recording():
            return
        rpc.set_attribute("feather.request_id", record.request_id)
        rpc.set_attribute("feather.tenant", record.tenant)
        rpc.set_attribute("feather.outcome", str(record.outcome))
        rpc.set_attribute("feather.cost_nanos_usd", record.cost_nanos_usd)
        rpc.set_attribute("feather.attempts", len(attempts))
        if record.outcome is Outcome.ERROR:  # the span's status and code come from the status sent (rpc_ended)
            rpc.set_attribute("feather.error_reason", record.error_reason or "INTERNAL")


def _trace_context(span: Span) -> bytes:
    """`traceparent` (and `tracestate`) header lines naming `span`, as W3C Trace Context spells them."""
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return b""
    lines = f"traceparent: 00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}\r\n"
    if ctx.trace_state:
        # The SDK parsed and validated the caller's tracestate (no CR/LF can be in it).
        lines += f"tracestate: {ctx.trace_state.to_header()}\r\n"
    return lines.encode("ascii")
