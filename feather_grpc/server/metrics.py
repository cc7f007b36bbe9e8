"""Prometheus metrics: an engine observer for calls and attempts, scrape-time collectors, the HTTP endpoint.

Series (all names prefixed `feather_`):
  requests_total{provider,model,status}          calls by outcome: ok, error, cancelled, cache_hit
  request_errors_total{provider,model,reason}    failed calls by ErrorInfo reason
  request_duration_seconds{provider,model}       whole-call latency (a stream: until its end)
  time_to_first_token_seconds{provider,model}    streams: call start to the first event sent
  gateway_overhead_seconds{call}                 time not spent inside upstream attempts (call: unary|stream;
                                                 a stream counts until its first event). Includes retry
                                                 back-off, admission waits and the ledger write.
  upstream_attempts_total{provider,model,outcome}
  tokens_total{provider,model,kind}              kind: input, output, cached_input, cache_write, reasoning
  cost_nanos_usd_total{provider,model}           exact integer nano-dollars (1e-9 USD): divide by 1e9 for USD
  rate_limited_total{scope}                      gateway rate-limit refusals; scope: tenant_requests,
                                                 tenant_concurrency, tenant_tpm, provider_model
  load_shed_total                                calls refused OVERLOADED: at the in-flight cap, or while the
                                                 event loop ran late (server.maxInFlight, server.maxLoopLagMs)
  upstream_connections{provider}                 connections open to the provider's upstreams (read at scrape time)
  upstream_connections_limit{provider}           the provider's limit per upstream host (maxConnections)
  event_loop_lag_seconds                         how late the event loop last ran a timer (read at scrape time)
  event_loop_lateness_seconds                    every one of those samples (every 50 ms): a stall between two
                                                 scrapes shows here, not in the gauge
  new_call_delay_seconds                         how long a new call waits to start: the round trip of a
                                                 Chat/StreamChat probe to this process, or its wait so far
  new_call_wait_seconds                          every one of those probes' round trips: a wait between two
                                                 scrapes shows here, not in the gauge
  inflight_calls{method}                         FeatherService calls in progress (read at scrape time)
  gc_pause_seconds{generation}                   how long each garbage collection held the process (0, 1, 2;
                                                 2 is a full one). Any thread's, the event loop's included.
  circuit_state{provider,model}                  0 closed, 1 half-open, 2 open (read at scrape time)
Provider and model are the configured names that served (empty when no route was found), so request
data never creates label values. The observer keeps each label set's children, so a call costs a few
dictionary lookups and histogram observations.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from feather_grpc.core.ledger import Outcome, UsageRecord
from feather_grpc.core.results import AttemptRecord
from feather_grpc.engine.gateway import Feather
from feather_grpc.server.calls import CallTracker, current_call
from feather_grpc.server.loop_lag import LoopLag

# No `_created` twin for every series: it doubles the scrape for nothing we use.
disable_created_metrics()  # type: ignore[no-untyped-call]

# LLM calls take from tens of milliseconds to minutes.
_LATENCY_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, float("inf"))
# The gateway's own share should be well under a millisecond; a cache hit is all overhead.
_OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 2.5, float("inf"))
# A young collection takes well under a millisecond; a full one at thousands of held streams, 100 ms or more.
_GC_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, float("inf"))
# A loop on time is late by well under a millisecond; new calls are shed past server.maxLoopLagMs (500).
_LATENESS_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, float("inf"))
_CIRCUIT_VALUE = {"closed": 0.0, "half_open": 1.0, "open": 2.0}
# cache_write_1h is the part of cache_write written with a 1-hour TTL (priced apart), not more tokens; so are
# the audio kinds, of input and output.
_TOKEN_KINDS = (
    *("input", "output", "cached_input", "cache_write", "cache_write_1h", "reasoning"),
    *("audio_input", "audio_output"),
)


@dataclass(slots=True)
class _ModelSeries:
    """The children of one (provider, model), created once."""

    duration: Histogram
    ttft: Histogram
    cost: Counter
    web_searches: Counter
    tokens: tuple[Counter, ...]  # in _TOKEN_KINDS order
    requests: dict[str, Counter] = field(default_factory=dict)
    errors: dict[str, Counter] = field(default_factory=dict)
    attempts: dict[str, Counter] = field(default_factory=dict)


@dataclass(slots=True)
class _AttemptToken:
    provider: str
    model: str
    started: float


class GatewayMetrics:
    """Owns a registry with the gateway's series; `observer` methods are the engine's CallObserver."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        pm = ["provider", "model"]
        self._requests = Counter("feather_requests", "Calls by outcome.", [*pm, "status"], registry=r)
        self._errors = Counter("feather_request_errors", "Failed calls by error reason.", [*pm, "reason"], registry=r)
        self._duration = Histogram(
            "feather_request_duration_seconds", "Call latency.", pm, buckets=_LATENCY_BUCKETS, registry=r
        )
        self._ttft = Histogram(
            "feather_time_to_first_token_seconds",
            "Streams: time from the call's start to its first event.",
            pm,
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self._overhead = Histogram(
            "feather_gateway_overhead_seconds",
            "Call time not spent in upstream attempts (streams: until the first event).",
            ["call"],
            buckets=_OVERHEAD_BUCKETS,
            registry=r,
        )
        self._overhead_unary = self._overhead.labels("unary")
        self._overhead_stream = self._overhead.labels("stream")
        self._attempts = Counter(
            "feather_upstream_attempts", "Upstream attempts by outcome.", [*pm, "outcome"], registry=r
        )
        self._tokens = Counter("feather_tokens", "Tokens consumed.", [*pm, "kind"], registry=r)
        self._cost = Counter(
            "feather_cost_nanos_usd", "Cost in nano-dollars (1e-9 USD), exact integers.", pm, registry=r
        )
        self._web_searches = Counter(
            "feather_web_search_requests", "Server-side web searches the provider billed per request.", pm, registry=r
        )
        self._rate_limited = Counter("feather_rate_limited", "Gateway rate-limit refusals.", ["scope"], registry=r)
        self._shed = Counter(
            "feather_load_shed", "Calls refused OVERLOADED (in-flight cap or event-loop lag).", registry=r
        )
        self._gc_pauses: _GcPauses | None = None
        self._series: dict[tuple[str, str], _ModelSeries] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    def watch(self, engine: Feather, tracker: CallTracker | None, loop_lag: LoopLag | None = None) -> None:
        """Adds the scrape-time series (circuit state, in-flight calls, loop lag), every loop-lag sample,
        process metrics and the garbage collector's pauses (until close())."""
        self.registry.register(_LiveState(engine, tracker, loop_lag))
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        pauses = Histogram(
            "feather_gc_pause_seconds",
            "How long each garbage collection held the process, by generation (2: a full collection).",
            ["generation"],
            buckets=_GC_BUCKETS,
            registry=self.registry,
        )
        self._gc_pauses = _GcPauses(pauses)
        gc.callbacks.append(self._gc_pauses)
        if loop_lag is not None:  # every sample and every probe, where the gauges keep only the last
            loop_lag.on_sample = self._every(
                "feather_event_loop_lateness_seconds",
                "How late each of the event loop's lag samples (every 50 ms) woke.",
            )
            loop_lag.on_probe = self._every(
                "feather_new_call_wait_seconds",
                "How long each of the process's probes to itself took to start and answer (its round trip).",
            )

    def _every(self, name: str, documentation: str) -> Callable[[float], None]:
        """A histogram of every value of a loop-lag measure, in seconds: what to tell it each one."""
        return Histogram(name, documentation, buckets=_LATENESS_BUCKETS, registry=self.registry).observe

    # ---- hooks ----

    def rate_limited(self, scope: str) -> None:
        """A call was refused by a gateway rate limit of this scope (see rate_limit_scope)."""
        self._rate_limited.labels(scope).inc()

    def refused(self, reason: str, subject: str) -> None:
        """CallTracker hook: a call ended RESOURCE_EXHAUSTED with this ErrorInfo reason and subject."""
        if reason == "RATE_LIMITED":
            self.rate_limited(rate_limit_scope(subject))
        elif reason == "OVERLOADED":
            self._shed.inc()

    def _model(self, provider: str, model: str) -> _ModelSeries:
        s = self._series.get((provider, model))
        if s is None:
            s = self._series[(provider, model)] = _ModelSeries(
                duration=self._duration.labels(provider, model),
                ttft=self._ttft.labels(provider, model),
                cost=self._cost.labels(provider, model),
                web_searches=self._web_searches.labels(provider, model),
                tokens=tuple(self._tokens.labels(provider, model, kind) for kind in _TOKEN_KINDS),
            )
        return s

    # ---- CallObserver ----

    def attempt_started(self, request_id: str, provider: str, model: str, streamed: bool) -> object:
        return _AttemptToken(provider, model, time.perf_counter())

    def attempt_finished(self, token: object, attempt: AttemptRecord) -> None:
        assert isinstance(token, _AttemptToken)
        now = time.perf_counter()
        s = self._model(token.provider, token.model)
        counter = s.attempts.get(attempt.outcome)
        if counter is None:
            counter = s.attempts[attempt.outcome] = self._attempts.labels(token.provider, token.model, attempt.outcome)
        counter.inc()
        scope = current_call.get()
        if scope is not None:
            scope.upstream_s += now - token.started
            if attempt.outcome == "ok" and scope.first_ok_at is None:
                scope.first_ok_at = now

    def call_settled(self, record: UsageRecord, attempts: Sequence[AttemptRecord], ttft_ms: int | None) -> None:
        self.call_settled_at(time.perf_counter(), record, attempts, ttft_ms)

    def call_settled_at(
        self, settled_at: float, record: UsageRecord, attempts: Sequence[AttemptRecord], ttft_ms: int | None
    ) -> None:
        """`call_settled`, heard later (engine.observe.AfterReply): durations end at `settled_at`."""
        if record.request_id.endswith(":hedge"):
            # A cancelled hedge leg: billed in the ledger, but not a call of its own.
            self._count_usage(self._model(record.provider, record.model), record)
            return
        s = self._model(record.provider, record.model)
        status = str(record.outcome)
        counter = s.requests.get(status)
        if counter is None:
            counter = s.requests[status] = self._requests.labels(record.provider, record.model, status)
        counter.inc()
        if record.outcome is Outcome.ERROR:
            reason = record.error_reason or "INTERNAL"
            err = s.errors.get(reason)
            if err is None:
                err = s.errors[reason] = self._errors.labels(record.provider, record.model, reason)
            err.inc()
        self._count_usage(s, record)
        scope = current_call.get()
        if scope is None:  # the engine used in-process: millisecond figures from the record
            s.duration.observe(record.latency_ms / 1000)
            if ttft_ms is not None:
                s.ttft.observe(ttft_ms / 1000)
            return
        s.duration.observe(settled_at - scope.started)
        if record.streamed and scope.first_ok_at is not None:
            s.ttft.observe(scope.first_ok_at - scope.started)
        if record.outcome is Outcome.OK or record.outcome is Outcome.CACHE_HIT:
            if record.streamed:
                end = scope.first_ok_at if scope.first_ok_at is not None else settled_at
                self._overhead_stream.observe(max(0.0, end - scope.started - scope.upstream_s))
            else:
                self._overhead_unary.observe(max(0.0, settled_at - scope.started - scope.upstream_s))

    def _count_usage(self, s: _ModelSeries, record: UsageRecord) -> None:
        for counter, n in zip(
            s.tokens,
            (
                record.input_tokens,
                record.output_tokens,
                record.cached_input_tokens,
                record.cache_write_tokens,
                record.cache_write_1h_tokens,
                record.reasoning_tokens,
                record.audio_input_tokens,
                record.audio_output_tokens,
            ),
            strict=True,
        ):
            if n:
                counter.inc(n)
        if record.web_search_requests:
            s.web_searches.inc(record.web_search_requests)
        if record.cost_nanos_usd:
            s.cost.inc(record.cost_nanos_usd)

    # ---- endpoint ----

    def serve(self, host: str, port: int) -> int:
        """Serves /metrics over HTTP on a daemon thread; returns the bound port (0 picks a free one)."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_port)
        return self.port

    def close(self) -> None:
        if self._gc_pauses is not None:
            gc.callbacks.remove(self._gc_pauses)
            self._gc_pauses = None
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class _GcPauses:
    """A gc callback: times each collection. Collections never overlap (they hold the GIL and CPython runs
    one at a time), so one start time is enough."""

    def __init__(self, histogram: Histogram) -> None:
        self._by_generation = [histogram.labels(str(g)) for g in range(3)]
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self._by_generation[info["generation"]].observe(time.perf_counter() - self._started)


def rate_limit_scope(subject: str) -> str:
    """A bounded label for a limit's subject: "tenant:acme:requests" -> "tenant_requests",
    "provider:openai:gpt-4o" -> "provider_model"."""
    kind, _, rest = subject.partition(":")
    if kind == "tenant":
        return "tenant_" + rest.rpartition(":")[2]
    if kind == "provider":
        return "provider_model"
    return kind or "unknown"


class _LiveState(Collector):
    """Series read from live state when scraped: circuit state per model, in-flight calls per method."""

    def __init__(self, engine: Feather, tracker: CallTracker | None, loop_lag: LoopLag | None = None) -> None:
        self._engine = engine
        self._tracker = tracker
        self._loop_lag = loop_lag

    def collect(self) -> Iterable[Metric]:
        circuit = GaugeMetricFamily(
            "feather_circuit_state",
            "Circuit breaker state per provider:model: 0 closed, 1 half-open, 2 open.",
            labels=["provider", "model"],
        )
        for m in self._engine.models():
            circuit.add_metric([m.provider, m.model.name], _CIRCUIT_VALUE.get(m.circuit_state, 2.0))
        yield circuit
        conns = GaugeMetricFamily(
            "feather_upstream_connections", "Connections open to the provider's upstreams.", labels=["provider"]
        )
        limit = GaugeMetricFamily(
            "feather_upstream_connections_limit",
            "The provider's limit of open connections per upstream host (providers.<name>.maxConnections).",
            labels=["provider"],
        )
        for p in self._engine.config.providers:
            if p.type != "mock":
                conns.add_metric([p.name], float(self._engine.upstream_connections(p.name)))
                limit.add_metric([p.name], float(p.max_connections))
        yield conns
        yield limit
        inflight = GaugeMetricFamily("feather_inflight_calls", "FeatherService calls in progress.", labels=["method"])
        if self._tracker is not None:
            for method, n in list(self._tracker.inflight.items()):
                inflight.add_metric([method], float(n))
        yield inflight
        if self._loop_lag is not None:
            yield GaugeMetricFamily(
                "feather_event_loop_lag_seconds",
                "How late the event loop last ran a timer: new calls are shed past server.maxLoopLagMs.",
                value=self._loop_lag.lag_s,
            )
            yield GaugeMetricFamily(
                "feather_new_call_delay_seconds",
                "How long a new call waits to start (a Chat or StreamChat probe to this process, every 100 ms).",
                value=max(self._loop_lag.start_delay_s, self._loop_lag.waiting_s),
            )
