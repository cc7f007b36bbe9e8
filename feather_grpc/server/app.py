"""Builds and runs the grpc.aio server: FeatherService, health, reflection, observability, graceful shutdown.

Shutdown (SIGTERM or SIGINT): health turns NOT_SERVING, the server stops taking calls and drains the
ones in flight (streams included) for up to the grace period, then the engine settles cancelled calls,
closes its upstream pools and flushes the ledger; traces are flushed and the metrics endpoint closed last.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from feather_grpc.config import ConfigError, GatewayConfig, TlsConfig
from feather_grpc.core.settings import Settings, environ
from feather_grpc.engine.gateway import Feather
from feather_grpc.engine.observe import AfterReply, CallObserver
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from feather_grpc.server import logs
from feather_grpc.server.assembly import Gateway, assemble, spool_path
from feather_grpc.server.calls import CallTracker
from feather_grpc.server.loop_lag import LoopLag, StartProbes
from feather_grpc.server.memory import return_memory_when_idle, tune_garbage_collector
from feather_grpc.server.servicer import FeatherServicer
from feather_grpc.server.tenancy import TenantGate
from feather_grpc.state.fail_open import Outage

if TYPE_CHECKING:
    from feather_grpc.server.metrics import GatewayMetrics
    from feather_grpc.server.tracing import Tracing

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FeatherService"].full_name


class ListenError(Exception):
    """An address the server cannot listen on because of the machine's state (a port another process holds,
    a host that is not this machine's): not a configuration error, though a setting may be the way out."""

    def __init__(self, address: str, cause: str, fix: str) -> None:
        super().__init__(f"cannot listen on {address}: {cause}. Fix: {fix}")


def bind_problem(host: str, port: int) -> str | None:
    """Why a plain socket cannot bind host:port, or None when it can: grpc's bind error names no cause, so
    after it fails the same bind is tried once more here to learn the errno (at start only)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]") or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        return f"the host does not resolve ({e.strerror})"
    for family, kind, proto, _, sockaddr in infos:
        with socket.socket(family, kind, proto) as probe:
            try:
                probe.bind(sockaddr)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return "the port is in use by another process"
                if e.errno == errno.EADDRNOTAVAIL:
                    return "the host is not an address of this machine"
                return str(e.strerror or e)
    return None


# Health name for liveness probes: SERVING from start until shutdown, whatever the shared stores do
# ("" and SERVICE_NAME go NOT_SERVING while a required store is down; restarting would not help).
LIVENESS_SERVICE = "liveness"
# How often the ledger is probed with a write (health turns NOT_SERVING within about this long of a failure).
_LEDGER_PROBE_S = 1.0
# How long shutdown waits for every open health Watch to have been sent NOT_SERVING (a client that reads
# nothing cannot hold it longer).
_TELL_WATCHES_S = 2.0
# How long calls cancelled at the end of the grace period get to write their records before the ledger closes.
_SETTLE_AFTER_CANCEL_S = 10.0
# The longest a call may wait in gRPC's queue before the gateway takes it (seconds; see queue_limits).
_MAX_UNREQUESTED_S = 30
_MAX_UNREQUESTED_CALLS = 20_000
_PROBE_TIMEOUT_S = 60.0  # a probe stuck this long is abandoned (saturation is judged while it waits)
_SERVER_OPTIONS = [
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]


# The gateway is backlogged (the SQLite ledger may then hold a commit open for company, see sqlite_ledger)
# with this many calls in flight, or while a new call waits this long to start.
_BACKLOG_IN_FLIGHT = 8
_BACKLOG_START_S = 0.005


def queue_limits() -> list[tuple[str, int]]:
    """gRPC's own queue, in front of the gateway: calls that arrived but that the server has not taken yet
    (grpc.aio takes one per event-loop turn, so a burst always waits there a little). gRPC cuts a call it
    refuses there (the caller sees CANCELLED, the gateway never sees the call, so it has no record): past
    1,000 waiting at random, and after 30 s. The count is raised far above any burst, so that the gateway
    judges the calls itself (OVERLOADED with RetryInfo and a record, see loop_lag: its probe measures this
    very queue). The time stays 30 s: cutting it sooner only turns waiting calls into lost ones (measured
    with bench/held_streams.py: 5 s lost 773 of 2,000 streams opened in 5 s on a loaded machine, 30 s none).
    `maximum_concurrent_rpcs` stays unset for the same reason: its refusal has no RetryInfo and no record;
    the in-flight cap is the gateway's own."""
    return [
        ("grpc.server.max_pending_requests", _MAX_UNREQUESTED_CALLS),
        ("grpc.server.max_pending_requests_hard_limit", _MAX_UNREQUESTED_CALLS),
        ("grpc.server_max_unrequested_time_in_server", _MAX_UNREQUESTED_S),
    ]


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS, or mutual TLS when a client CA is configured (clients must then present a certificate)."""
    with open(tls.key_file, "rb") as key, open(tls.cert_file, "rb") as cert:
        pair = [(key.read(), cert.read())]
    if tls.client_ca_file is None:
        return grpc.ssl_server_credentials(pair)
    with open(tls.client_ca_file, "rb") as ca:
        return grpc.ssl_server_credentials(pair, root_certificates=ca.read(), require_client_auth=True)


class _WatchedContext:
    """A Watch's servicer context that remembers whether NOT_SERVING is the last status it sent."""

    def __init__(self, context: Any, service: str) -> None:
        self._context = context
        self.service = service
        self.not_serving_sent = asyncio.Event()

    async def write(self, message: health_pb2.HealthCheckResponse) -> None:
        await self._context.write(message)
        if message.status == health_pb2.HealthCheckResponse.NOT_SERVING:
            self.not_serving_sent.set()
        else:
            self.not_serving_sent.clear()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


class DrainingHealthServicer(HealthServicer):  # type: ignore[misc]
    """grpc.health.v1 that drains where balancers can see it. `enter_graceful_shutdown` turns every service
    NOT_SERVING, `told` waits until each open Watch has sent it, Watches stay open (and Check answers) through
    the drain delay, and `end_watches` ends them (OK) so that none holds the grace period open."""

    draining = False

    def __init__(self) -> None:
        super().__init__()
        self._watches: set[_WatchedContext] = set()
        self._ending = asyncio.Event()

    async def enter_graceful_shutdown(self) -> None:
        self.draining = True
        await super().enter_graceful_shutdown()

    async def told(self, timeout_s: float) -> bool:
        """Waits (up to timeout_s) until every open Watch of a known service has sent NOT_SERVING."""
        waits = [w.not_serving_sent.wait() for w in self._watches if w.service in self._server_status]
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.gather(*waits)
        except TimeoutError:
            return False
        return True

    def end_watches(self) -> None:
        self._ending.set()

    async def List(self, request: health_pb2.HealthListRequest, context: Any) -> health_pb2.HealthListResponse:
        """Every service's status at once (grpc.health.v1 List; the library's servicer leaves it out)."""
        return health_pb2.HealthListResponse(
            statuses={name: health_pb2.HealthCheckResponse(status=s) for name, s in self._server_status.items()}
        )

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        watched = _WatchedContext(context, request.service)
        self._watches.add(watched)
        watch = asyncio.ensure_future(super().Watch(request, watched))
        ending = asyncio.ensure_future(self._ending.wait())
        try:
            await asyncio.wait((watch, ending), return_when=asyncio.FIRST_COMPLETED)
            if watch.done():
                watch.result()  # the library's Watch only ends by an error: let it through
        finally:
            self._watches.discard(watched)
            for task in (watch, ending):
                task.cancel()
            await asyncio.gather(watch, ending, return_exceptions=True)


@dataclass(frozen=True, slots=True)
class ServerOptions:
    """Process-level operations settings; `from_env` reads them from the environment."""

    metrics_port: int | None = None  # METRICS_PORT (0: any free port); None: no metrics at all
    metrics_host: str | None = None  # METRICS_HOST; default: the gRPC bind address
    tracing: bool = False  # the OTEL_* variables ask for traces (see server.tracing)
    call_log: bool = True  # one log line per call (server.logs.CallLog)
    log_content: bool = False  # FEATHER_LOG_CONTENT: prompts and completions at DEBUG
    reuse_port: bool = False  # several processes share the port (serve --workers)
    worker: int | None = None  # this process's index under serve --workers
    # under --workers: where this worker writes the metrics port it bound, for the supervisor's merge
    metrics_port_file: str | None = None
    env: Mapping[str, str] = field(default_factory=dict)  # what tracing reads its OTEL_* settings from

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, worker: int | None = None) -> ServerOptions:
        from feather_grpc.server.metrics_merge import PORT_FILE_ENV
        from feather_grpc.server.tracing import tracing_requested

        settings = Settings(env)
        return cls(
            # under --workers each worker binds a free loopback port and reports it (see workers)
            metrics_port=settings.port("METRICS_PORT"),
            metrics_port_file=env.get(PORT_FILE_ENV) or None,
            metrics_host=env.get("METRICS_HOST") or None,
            tracing=tracing_requested(env),
            log_content=settings.flag("FEATHER_LOG_CONTENT"),
            reuse_port=worker is not None,
            worker=worker,
            env=dict(env),
        )


class GatewayServer:
    """One gateway process: the engine behind a grpc.aio server, with its metrics, traces and call logs."""

    def __init__(
        self, config: GatewayConfig, *, engine: Feather | None = None, options: ServerOptions | None = None
    ) -> None:
        self.config = config
        self.options = options = options or ServerOptions()
        observers: list[CallObserver] = []
        self.start_probes = StartProbes()
        interceptors: list[Any] = []  # none without tracing: each costs every call a coroutine or more
        self.tracing: Tracing | None = None
        if options.tracing:  # imports opentelemetry only when asked for
            from feather_grpc.server.tracing import Tracing

            self.tracing = Tracing(
                options.env,
                {p.name: p.type for p in config.providers},
                untraced_providers=[p.name for p in config.providers if not p.propagate_trace_context],
            )
            interceptors.append(self.tracing.server_interceptor(self.start_probes))
            observers.append(self.tracing.observer)
        self.metrics: GatewayMetrics | None = None
        if options.metrics_port is not None:
            from feather_grpc.server.metrics import GatewayMetrics

            self.metrics = GatewayMetrics()
            observers.append(AfterReply(self.metrics))
        if options.call_log:
            observers.append(AfterReply(logs.CallLog(worker=options.worker)))
        self.assembly: Gateway | None = None  # what the server built (an engine passed in is the caller's)
        if engine is None:
            # the SQLite ledger's commit delay under load (see sqlite_ledger); read only once calls run
            self.assembly = assemble(
                config, options.worker, observers=observers, backlogged=self._backlogged, alone=self._alone
            )
            engine = self.assembly.engine
        else:
            engine.observers.extend(observers)
        self._state_watch: asyncio.Task[None] | None = None
        self._start_reconcile: asyncio.Task[None] | None = None
        self._ledger_watch: asyncio.Task[None] | None = None
        self._faults: set[str] = set()  # what keeps "" and SERVICE_NAME NOT_SERVING: "state", "ledger"
        self._serving: bool | None = None  # the status last set for them
        self.engine = engine
        self.loop_lag = LoopLag(config.server.max_loop_lag_s, in_flight=lambda: self.gate.in_flight)
        self.gate = TenantGate(config, self.engine.limiter, config.server.max_in_flight, self.loop_lag)
        self.tracker = CallTracker(
            self.gate,
            log_content=options.log_content,
            on_refused=self.metrics.refused if self.metrics else None,
            record_refusal=self.engine.record_refused,
            on_status=self.tracing.rpc_ended if self.tracing else None,
            max_request_bytes=config.server.max_message_bytes,
            probes=self.start_probes,
        )
        if self.metrics is not None:
            self.metrics.watch(self.engine, self.tracker, self.loop_lag)
        self.health = DrainingHealthServicer()
        server_options = [
            *_SERVER_OPTIONS,
            *queue_limits(),
            # Twice the limit: gRPC refuses past it on its own, before reading the message, with no ErrorInfo
            # and no record; up to it the gateway refuses an over-limit request itself (calls._tolerant), with
            # the limit named and a record, like any other request it refuses.
            ("grpc.max_receive_message_length", 2 * config.server.max_message_bytes),
            # Off unless several workers share the port: a second server on a busy port must fail loudly.
            ("grpc.so_reuseport", int(options.reuse_port)),
        ]
        self._server = grpc.aio.server(options=server_options, interceptors=interceptors)
        self.port = 0
        self.metrics_port: int | None = None
        self._probe_channel: grpc.aio.Channel | None = None
        self._trimmer: asyncio.Task[None] | None = None

    def _backlogged(self) -> bool:
        """Whether calls queue anyway: many in flight, or new calls waiting to start (the probe's measure)."""
        return self.gate.in_flight >= _BACKLOG_IN_FLIGHT or self.loop_lag.delay_s >= _BACKLOG_START_S

    def _alone(self) -> bool:
        """Whether the call recording is the only one: at most one Chat/StreamChat in flight (itself, or a
        refused one) and no new call waiting to start (under load grpc.aio hands calls over one at a time,
        so one in flight can still have company coming)."""
        return self.gate.in_flight <= 1 and self.loop_lag.delay_s < _BACKLOG_START_S

    async def _close_engine(self) -> None:
        await self.engine.aclose()
        if self.assembly is not None:
            await self.assembly.aclose()

    async def start(self, host: str | None = None, port: int | None = None) -> int:
        """Starts serving and returns the bound port (pass port 0 to pick a free one)."""
        try:
            await self.engine.ledger.ready()  # a ledger that cannot open stops the start, not every call
        except Exception as e:
            await self._close_engine()
            cfg = self.config
            if cfg.ledger.database_url and type(e).__module__.startswith("asyncpg"):  # refused, not unreachable
                problem = f"Postgres refused the usage ledger ({type(e).__name__}: {e})"
                raise ConfigError("environment", "DATABASE_URL", problem, "check its user, password, database") from e
            where = spool_path(cfg, self.options.worker) if cfg.ledger.database_url else cfg.ledger.path
            raise ConfigError("ledger", where, f"cannot open the usage ledger ({e})", "check the path and disk") from e
        await self.engine.start()
        self.tracker.register(self._server, pb_grpc.add_FeatherServiceServicer_to_server, FeatherServicer(self.engine))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self._server,
        )
        address = f"{host or self.config.server.host}:{self.config.server.port if port is None else port}"
        try:
            if self.config.server.tls is None:
                self.port = self._server.add_insecure_port(address)
            else:
                self.port = self._server.add_secure_port(address, server_credentials(self.config.server.tls))
        except RuntimeError:  # grpc's "Failed to bind to address", whatever the cause
            await self._close_engine()
            bound_host, _, bound_port = address.rpartition(":")
            why = bind_problem(bound_host, int(bound_port))
            if why is not None:
                fix = "stop the process that holds the port, or pick another with --port, PORT or server.port"
                if "host" in why:
                    fix = "listen on an address of this machine (--host or server.host), e.g. 127.0.0.1 or 0.0.0.0"
                raise ListenError(address, why, fix) from None
            if self.config.server.tls is not None:  # grpc says the same when the certificate or key is not valid PEM
                fix = "check that server.tls certFile and keyFile are a PEM certificate and its key"
                raise ConfigError("server", "tls", "not a valid PEM certificate and key pair", fix) from None
            raise ListenError(address, "grpc could not bind it", "pick another address") from None
        if self.metrics is not None and self.options.metrics_port is not None:
            metrics_host = self.options.metrics_host or host or self.config.server.host
            try:
                self.metrics_port = self.metrics.serve(metrics_host, self.options.metrics_port)
            except OSError as e:
                where = f"{metrics_host}:{self.options.metrics_port}"
                await self._close_engine()
                raise ListenError(f"{where} (METRICS_PORT)", str(e.strerror or e), "pick a free METRICS_PORT") from None
            if self.options.metrics_port_file:
                from feather_grpc.server.metrics_merge import report_port

                report_port(self.options.metrics_port_file, self.metrics_port)
        probe_port = None
        if self.config.server.tls is None:  # under TLS a plaintext port would bypass it: saturation is loop lag only
            try:
                probe_port = self._server.add_insecure_port("127.0.0.1:0")  # this process's own, even with workers
            except RuntimeError:  # no IPv4 loopback here: measure the loop's lag alone rather than not start
                log.warning("no 127.0.0.1 port for the start probe; saturation is judged by event-loop lag only")
        await self._server.start()
        if probe_port:
            self._probe_channel = channel = grpc.aio.insecure_channel(f"127.0.0.1:{probe_port}")
            self.loop_lag.probe = self.start_probes.probe(channel, _PROBE_TIMEOUT_S)
        self.loop_lag.start()
        self._trimmer = asyncio.create_task(
            return_memory_when_idle(lambda: self.tracker.total_inflight, started=lambda: self.tracker.started)
        )
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await self._set_healthy("ledger", True)
        self._ledger_watch = asyncio.create_task(self._watch_ledger())
        if self.assembly is not None and self.assembly.ping is not None:
            self._state_watch = asyncio.create_task(
                watch_shared_state(self.assembly.ping, self._shared_state_changed, self.assembly.outage)
            )
            # A previous run may have died with budget settlements Redis never got: its ledger has them.
            self._start_reconcile = asyncio.create_task(self._reconcile_budgets())
        return self.port

    async def _shared_state_changed(self, reachable: bool) -> None:
        if self.config.shared_state.failure_mode == "closed":
            # Failing closed: while the shared state is unreachable calls are refused, so say NOT_SERVING.
            await self._set_healthy("state", reachable)
        elif reachable:
            # Failing open: replicas decided budgets locally meanwhile; the ledger knows what was spent.
            await self._reconcile_budgets()

    async def _reconcile_budgets(self) -> None:
        if self.assembly is None:
            return
        try:
            await self.assembly.reconcile_budgets()
        except Exception as e:  # Redis or the ledger down: the restore of missing windows still guards
            log.warning("could not reconcile budgets with the ledger: %s", e)

    async def _watch_ledger(self) -> None:
        """Probes the ledger with a write every _LEDGER_PROBE_S: while it cannot write, calls are refused
        (engine.ledger_guard) and health says NOT_SERVING; both recover with the first write that commits.
        A second in which calls' records committed needs no probe: they showed the ledger writable."""
        guard = self.engine.ledger_guard
        seen = guard.writes  # so the first turn probes
        while True:
            if guard.writes == seen:
                await guard.probe()
            seen = guard.writes
            await self._set_healthy("ledger", guard.writable)
            await asyncio.sleep(_LEDGER_PROBE_S)

    async def _set_healthy(self, part: str, healthy: bool) -> None:
        """SERVING while every part ("state", "ledger") is healthy; NOT_SERVING otherwise, and once draining."""
        if healthy:
            self._faults.discard(part)
        else:
            self._faults.add(part)
        serving = not self._faults
        if self.health.draining or serving == self._serving:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)

    async def stop(
        self, grace_s: float | None = None, drain_delay_s: float | None = None, cut_short: asyncio.Event | None = None
    ) -> None:
        """NOT_SERVING first, sent to every open Watch before anything else changes; for the drain delay
        (`server.drainDelayMs`; `cut_short` ends it early) Check and Watch say so while calls, new ones
        included, are still served, so probes and balancers move away first. Then new calls are refused and
        the ones in flight (streams included) drain for up to the grace period; then settle, close pools and
        flush the ledger; traces and metrics last."""
        await self.health.enter_graceful_shutdown()
        if not await self.health.told(_TELL_WATCHES_S):
            log.warning("shutting down: a health Watch did not take NOT_SERVING within %gs", _TELL_WATCHES_S)
        delay_s = self.config.server.drain_delay_s if drain_delay_s is None else drain_delay_s
        if delay_s > 0:
            waiting = asyncio.Event() if cut_short is None else cut_short
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiting.wait(), delay_s)
        self.health.end_watches()
        for task in (self._state_watch, self._start_reconcile, self._ledger_watch, self._trimmer):
            if task is not None:
                task.cancel()
        await self.loop_lag.stop()
        if self._probe_channel is not None:
            await self._probe_channel.close()
        await self._server.stop(self.config.server.grace_period_s if grace_s is None else grace_s)
        try:
            # The calls cut off at the end of the grace period are cancelled, not finished: their handlers
            # still write their records. Only then may the ledger close.
            try:
                await asyncio.wait_for(self.tracker.drained(), _SETTLE_AFTER_CANCEL_S)
            except TimeoutError:
                log.error("%d calls still in their handlers; closing the ledger anyway", self.tracker.total_inflight)
            await self.engine.aclose()
            if self.assembly is not None:
                await self.assembly.aclose()
        finally:
            if self.tracing is not None:
                await asyncio.to_thread(self.tracing.shutdown)
            if self.metrics is not None:
                await asyncio.to_thread(self.metrics.close)

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


async def watch_shared_state(
    ping: Callable[[], Awaitable[None]],
    on_change: Callable[[bool], Awaitable[None]],
    outage: Outage | None = None,
    interval_s: float = 1.0,
) -> None:
    """Pings the shared store forever (`ping` also takes a decision), reporting each change between usable
    and not; with fail-open, an outage the wrappers saw between two pings counts as a change too."""
    healthy = True
    while True:
        problem = ""
        try:
            await ping()
        except Exception as e:  # StateUnavailable (unreachable, or refusing decisions: OOM, READONLY...) or else
            problem = str(e) or type(e).__name__  # e.g. a refused AUTH: the operator needs the reason
        ok = not problem
        if ok and outage is not None and outage.seen:
            outage.seen = False
            healthy = False
        if ok != healthy:
            healthy = ok
            if ok:
                log.warning("shared state store available again")
            else:
                log.warning("shared state store UNAVAILABLE: %s", problem)
            await on_change(ok)
        await asyncio.sleep(interval_s)


async def serve(
    config: GatewayConfig, host: str | None = None, port: int | None = None, options: ServerOptions | None = None
) -> None:
    """Runs until SIGTERM or SIGINT, then shuts down gracefully."""
    logs.redactor.add(p.api_key for p in config.providers if p.api_key)
    server = GatewayServer(config, options=options or ServerOptions.from_env(environ()))
    bound = await server.start(host, port)
    tune_garbage_collector()  # this process serves until it exits: start-up's objects stay, unscanned
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):  # before "serving on": a signal right after it drains too
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "feather-grpc serving on %s:%d (config: %s)",
        host or config.server.host,
        bound,
        config.source,
        extra={
            "port": bound,
            "metrics_port": server.metrics_port,
            "tracing": server.tracing is not None,
            "worker": server.options.worker,
        },
    )
    await stop.wait()
    stop.clear()  # a second signal ends the drain delay early
    if config.server.drain_delay_s > 0:
        log.info(
            "shutting down: health NOT_SERVING, still serving for the %gs drain delay", config.server.drain_delay_s
        )
    log.info(
        "shutting down: draining %d in-flight calls for up to %gs",
        server.tracker.total_inflight,
        config.server.grace_period_s,
    )
    await server.stop(cut_short=stop)
    log.info("stopped")
