"""The one place the gateway is put together from its resolved configuration: the usage ledger, the rate
limiter, budgets, circuits and response cache (embedded by default, Redis for the hot shared state when
`REDIS_URL` is set, Postgres as the ledger of record with `DATABASE_URL`), the upstream HTTP client and
the providers on it, and the engine over all of them (which sees only their interfaces)."""

from __future__ import annotations

import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from feather_grpc.config import GatewayConfig, ProviderConfig
from feather_grpc.core.breaker import CircuitBreakers
from feather_grpc.core.cache import ResponseCache
from feather_grpc.core.circuits import CircuitStore
from feather_grpc.core.ledger import UsageLedger
from feather_grpc.core.limits import BudgetStore, RateLimiter
from feather_grpc.core.settings import Settings
from feather_grpc.engine.gateway import Feather
from feather_grpc.engine.observe import CallObserver
from feather_grpc.providers import build_provider
from feather_grpc.providers.base import Provider, ProviderSettings
from feather_grpc.providers.http import UpstreamClients
from feather_grpc.state.budget_restore import RaiseSpentTo, WindowRestorer, reconcile_budgets
from feather_grpc.state.fail_open import Outage
from feather_grpc.state.memory_cache import MemoryResponseCache
from feather_grpc.state.memory_circuits import MemoryCircuitStore
from feather_grpc.state.memory_limits import MemoryBudgetStore, MemoryRateLimiter


@dataclass
class Gateway:
    """The engine and what its owner (the server) watches and closes besides it."""

    engine: Feather
    ping: Callable[[], Awaitable[None]] | None = None  # raises StateUnavailable while the shared store is down
    raise_spent_to: RaiseSpentTo | None = None  # with a shared budget store: see reconcile_budgets
    outage: Outage | None = None  # fail-open: set while local state stood in for the shared store
    closers: list[Callable[[], Awaitable[None]]] = field(default_factory=list)

    async def reconcile_budgets(self) -> None:
        """Lifts every tenant's shared budget counters to what the ledger recorded (no shared store: nothing)."""
        if self.raise_spent_to is None:
            return
        engine = self.engine
        windows = ((t.name, w) for t in engine.config.tenancy.tenants.values() for w in engine.admission.windows(t))
        await reconcile_budgets(engine.ledger, windows, self.raise_spent_to)

    async def aclose(self) -> None:
        """Closes what the engine does not own (call after `engine.aclose()`)."""
        for close in self.closers:
            await close()


def assemble(
    config: GatewayConfig,
    worker: int | None = None,
    *,
    observers: Sequence[CallObserver] = (),
    ledger: UsageLedger | None = None,
    limiter: RateLimiter | None = None,
    budgets: BudgetStore | None = None,
    circuits: CircuitStore | None = None,
    cache: ResponseCache | None = None,
    providers: dict[str, Provider] | None = None,
    rng: random.Random | None = None,
    clock: Callable[[], float] = time.monotonic,
    backlogged: Callable[[], bool] | None = None,
    alone: Callable[[], bool] | None = None,
    send_now: Callable[[], None] | None = None,
) -> Gateway:
    """Builds the gateway for `config` (`worker`: this process's index under `serve --workers`). A part
    passed in is used as given (tests, embeddings), and the rest built around it. `backlogged`: whether
    the owner's calls queue anyway (the SQLite ledger then lets commits wait for company); `alone`:
    whether the owner has one call in flight (the SQLite ledger, or the Postgres ledger's local spool, then
    commits its record at once, and a shared store's client writes its settlement at once); `send_now`: with
    shared stores passed in, their client's (see Feather)."""
    ledger = ledger or open_ledger(config, worker, backlogged, alone)
    local_circuits = MemoryCircuitStore(CircuitBreakers(config.routing.breaker, clock))
    local_limiter, local_budgets = MemoryRateLimiter(), MemoryBudgetStore()
    shared_limiter: RateLimiter | None = None
    shared_budgets: BudgetStore | None = None
    shared_circuits: CircuitStore | None = None
    shared_cache: ResponseCache | None = None
    ping: Callable[[], Awaitable[None]] | None = None
    raise_spent_to: RaiseSpentTo | None = None
    outage: Outage | None = None
    closers: list[Callable[[], Awaitable[None]]] = []
    if config.shared_state.redis_url:
        from feather_grpc.state.fail_open import FailOpenBudgetStore, FailOpenCircuitStore, FailOpenRateLimiter
        from feather_grpc.state.redis_cache import RedisResponseCache
        from feather_grpc.state.redis_state import RedisState

        shared = RedisState.from_url(config.shared_state.redis_url, breaker=config.routing.breaker)
        restorer = WindowRestorer(ledger, shared.budgets.raise_spent_to)
        shared.budgets.restore = restorer.restore
        shared.budgets.on_lost_settlement = restorer.reconcile
        shared_limiter, shared_budgets, shared_circuits = shared.limiter, shared.budgets, shared.circuits
        shared_cache = RedisResponseCache(shared.client, config.routing.cache)
        ping, raise_spent_to = shared.ping, shared.budgets.raise_spent_to
        if send_now is None and alone is not None:
            send_now = _if_alone(alone, shared.client.send_now)
        closers += [restorer.aclose, shared.aclose]
        if config.shared_state.failure_mode == "open":
            outage = Outage()
            shared_limiter = FailOpenRateLimiter(shared.limiter, local_limiter, outage)
            shared_budgets = FailOpenBudgetStore(shared.budgets, local_budgets, outage)
            shared_circuits = FailOpenCircuitStore(shared.circuits, local_circuits, outage)
    upstream: UpstreamClients | None = None
    providers = dict(providers or {})
    for p in config.providers:
        if p.name not in providers:
            upstream = upstream or UpstreamClients()  # pooled clients, one per transport, the providers share
            providers[p.name] = build_provider(provider_settings(p), upstream.get(p.transport))
    engine = Feather(
        config,
        ledger,
        limiter=limiter or shared_limiter or local_limiter,
        budgets=budgets or shared_budgets or local_budgets,
        circuits=circuits or shared_circuits or local_circuits,
        cache=cache or shared_cache or MemoryResponseCache(config.routing.cache),
        providers=providers,
        upstream=upstream,
        rng=rng,
        observers=observers,
        send_now=send_now,
    )
    return Gateway(engine, ping, raise_spent_to, outage, closers)


def _if_alone(alone: Callable[[], bool], send_now: Callable[[], None]) -> Callable[[], None]:
    """The settlement's write sent at once only for a lone call: its ledger record is committed within the
    turn, which the round trip should overlap. Under load the end of the turn still batches settlements
    (sent at once there, each its own write: measured worse at concurrency 64)."""

    def send_if_alone() -> None:
        if alone():
            send_now()

    return send_if_alone


def provider_settings(p: ProviderConfig) -> ProviderSettings:
    return ProviderSettings(
        name=p.name,
        type=p.type,
        base_url=p.base_url,
        api_key=p.api_key,
        egress=p.egress,
        max_response_bytes=p.max_response_bytes,
        max_stream_event_bytes=p.max_stream_event_bytes,
        auth=p.auth,
        api_version=p.api_version,
        region=p.region,
        project=p.project,
        responses_models=p.responses_models,
        thinking_budgets=p.thinking_budgets,
        upstream_ids=p.upstream_ids,
        max_output_tokens=tuple((m.name, m.max_output_tokens) for m in p.models if m.max_output_tokens),
        extra_headers=p.extra_headers,
        default_fields=p.default_fields,
        max_connections=p.max_connections,
    )


def spool_path(config: GatewayConfig, worker: int | None) -> str:
    """The local durable spool in front of Postgres: one file per process (workers get their own), next to
    the SQLite ledger's file, or in the working directory when the ledger is configured in memory."""
    ledger = "feather-usage.db" if config.ledger.path == ":memory:" else config.ledger.path
    base = Settings().text("FEATHER_SPOOL_PATH") or str(Path(ledger).with_suffix(".spool.db"))
    return base if worker is None else str(Path(base).with_suffix(f".w{worker}.db"))


def open_ledger(
    config: GatewayConfig,
    worker: int | None = None,
    backlogged: Callable[[], bool] | None = None,
    alone: Callable[[], bool] | None = None,
) -> UsageLedger:
    if config.ledger.database_url:
        from feather_grpc.state.postgres_ledger import PostgresLedger

        return PostgresLedger(
            config.ledger.database_url,
            spool_path(config, worker),
            synchronous=config.ledger.synchronous,
            backlogged=backlogged,
            alone=alone,
        )
    if config.ledger.type == "memory":
        from feather_grpc.state.memory_ledger import MemoryLedger

        return MemoryLedger()
    from feather_grpc.state.ledger_writer import SOCKET_ENV

    writer_socket = Settings().text(SOCKET_ENV)
    if worker is not None and writer_socket:  # serve --workers: one writer process for all (see ledger_writer)
        from feather_grpc.state.ledger_writer import SocketLedger

        return SocketLedger(config.ledger.path, writer_socket, synchronous=config.ledger.synchronous)
    from feather_grpc.state.sqlite_ledger import SqliteLedger

    return SqliteLedger(config.ledger.path, synchronous=config.ledger.synchronous, backlogged=backlogged, alone=alone)
