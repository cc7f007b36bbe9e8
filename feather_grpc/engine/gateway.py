"""The Feather orchestrator: the story of a call — resolve, attempt (retry, fail over, deadline), settle.

Usable in-process as a library (`async with Feather(config) as f: await f.chat(...)`); the gRPC
server is one adapter of it. No grpc imports here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TypeVar

from feather_grpc.config import GatewayConfig, ModelConfig, ProviderConfig, TenantConfig
from feather_grpc.engine import inputs
from feather_grpc.engine.admission import Admission, Ticket
from feather_grpc.engine.breaker import CircuitBreakers, CircuitState, Permit
from feather_grpc.engine.cache import CachedReply, MemoryResponseCache, ResponseCache, cache_key
from feather_grpc.engine.errors import (
    DeadlineExceeded,
    FeatherError,
    FieldViolation,
    InvalidRequest,
    LedgerUnavailable,
    ProviderError,
    RateLimitExceeded,
    StateStoreUnavailable,
    UpstreamAuthFailed,
    UpstreamInvalidRequest,
    UpstreamUnavailable,
)
from feather_grpc.engine.ledger_guard import LedgerGuard
from feather_grpc.engine.observe import CallObserver
from feather_grpc.engine.redaction import Redactor
from feather_grpc.engine.results import AttemptRecord, ChatResult, LastFailure, StreamCompleted, StreamStarted
from feather_grpc.engine.retry import RetryPolicy
from feather_grpc.engine.routing import LatencyTracker, RouteCandidate, Router
from feather_grpc.engine.tokens import estimate_prompt_tokens, estimate_tokens
from feather_grpc.engine.types import (
    ChatRequest,
    FinishReason,
    PromptUsage,
    ProviderResponse,
    StreamEvent,
    StreamFinish,
    TextDelta,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from feather_grpc.engine.validation import MAX_NAME_LENGTH, bounded_tags, usable_request_id, validate_chat
from feather_grpc.providers import ACCEPTED_INPUTS, build_provider, wire_format
from feather_grpc.providers.base import Provider, ProviderSettings
from feather_grpc.providers.http import UpstreamClients
from feather_grpc.providers.http_client import AttemptMarker, attempt_marker
from feather_grpc.state.breaker_store import CircuitStore, MemoryCircuitStore
from feather_grpc.state.ledger import LedgerWriteError, Outcome, UsageLedger, UsageQuery, UsageRecord, UsageReport
from feather_grpc.state.limits import BudgetStore, RateLimiter, StateUnavailable

log = logging.getLogger(__name__)

STRUCTURED_OUTPUT = frozenset({"json_object", "json_schema"})  # response_format types that shape the reply
# The structured-output types each wire format (providers.wire_format) can be asked for. Anthropic's
# structured outputs (`output_config.format`, on Vertex too) and Bedrock's take a JSON schema; neither has a
# schema-less JSON mode.
STRUCTURED_OUTPUT_SUPPORT = {
    "openai": STRUCTURED_OUTPUT,
    "openai-compatible": STRUCTURED_OUTPUT,
    "anthropic": frozenset({"json_schema"}),
    "bedrock": frozenset({"json_schema"}),  # Converse's outputConfig.textFormat
    "azure-openai": STRUCTURED_OUTPUT,
    "responses": STRUCTURED_OUTPUT,
    "gemini": STRUCTURED_OUTPUT,
    "vertex": STRUCTURED_OUTPUT,
    "mock": STRUCTURED_OUTPUT,
}

T = TypeVar("T")

# Upstream errors that say the request itself is wrong: no other provider or retry can fix them.
_REQUEST_FAULTS = frozenset({"UPSTREAM_BAD_REQUEST", "UPSTREAM_CONTEXT_TOO_LONG", "UPSTREAM_CONTENT_FILTERED"})

StreamItem = StreamStarted | TextDelta | ToolCallDelta | ThinkingDelta | StreamCompleted
# An opened upstream stream: the iterator, its first reply event, and the prompt usage announced before it.
_Opened = tuple[AsyncIterator[StreamEvent], StreamEvent, Usage | None]


@dataclass(slots=True)
class CallContext:
    """Per-call facts the transport knows: who is calling and until when."""

    tenant: str = "default"
    deadline: float | None = None  # event-loop time (loop.time()) by which the call must end
    tenant_config: TenantConfig | None = None  # the caller's limits; None: the configured tenant `tenant`
    # The tenant's request-rate token, asked for by the transport: awaiting it gives the verdict (raises
    # when refused). Judged before anything is served, with admission's own decisions (one round trip).
    # `max_wait_s`: how long the caller may still queue for it (None: as long as the token said).
    request_token: Callable[[float | None], Awaitable[None]] | None = None


@dataclass(frozen=True, slots=True)
class ModelView:
    provider: str
    provider_type: str
    model: ModelConfig
    circuit_state: str  # "closed" | "open" | "half_open"
    latency_ms: int  # decaying average; 0 before the first call
    max_connections: int = 0  # the provider's connection limit per upstream host; 0: it has no upstream (mock)
    last_failure: LastFailure | None = None


@dataclass(slots=True)
class _Call:
    """A call in flight: what settle() needs whichever way the call ends."""

    request: ChatRequest
    ctx: CallContext
    request_id: str
    started: float  # monotonic
    started_ns: int  # wall clock
    streamed: bool
    attempts: list[AttemptRecord] = field(default_factory=list)
    candidate: RouteCandidate | None = None
    ttft_ms: int | None = None  # streams: time to the first event sent to the caller
    ticket: Ticket | None = None  # what admission reserved; settled with the ledger record
    cache_key: str | None = None  # set when the call may be answered from / stored in the cache
    # Attempts that reached an upstream and were abandoned (deadline, timeout, cancellation, a 2xx reply
    # that could not be used): the upstream did, and billed, the work; each is billed as an estimate.
    abandoned: list[tuple[RouteCandidate, Usage]] = field(default_factory=list)
    prompt_usage: Usage | None = None  # streams: the prompt's exact counts, announced before the reply
    # Loop time by which the answer (a stream: its first event) must come: the caller's deadline or the
    # gateway's requestTimeoutMs, the earlier; `gateway_bound` when it is the latter.
    answer_by: float | None = None
    gateway_bound: bool = False


class Feather:
    """The gateway engine. Build once; share across all calls."""

    def __init__(
        self,
        config: GatewayConfig,
        ledger: UsageLedger,
        *,
        providers: dict[str, Provider] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        observers: Sequence[CallObserver] = (),
        limiter: RateLimiter | None = None,
        budgets: BudgetStore | None = None,
        cache: ResponseCache | None = None,
        circuits: CircuitStore | None = None,
    ) -> None:
        self.config = config
        self.ledger = ledger
        self.ledger_guard = LedgerGuard(ledger)  # refuses calls while the ledger cannot write
        self.latency = LatencyTracker()
        self.circuits: CircuitStore = circuits or MemoryCircuitStore(CircuitBreakers(config.breaker, clock))
        self._circuit_view: dict[str, CircuitState] = {}  # shared circuits: the state last seen
        # provider:model -> its latest failure that counted against its circuit (bounded by the config's models)
        self._last_failures: dict[str, LastFailure] = {}
        self.observers = list(observers)
        if limiter is None or budgets is None:
            from feather_grpc.state.memory_limits import MemoryBudgetStore, MemoryRateLimiter

            limiter = limiter or MemoryRateLimiter()
            budgets = budgets or MemoryBudgetStore()
        self.limiter, self.budgets = limiter, budgets
        self.cache: ResponseCache = cache or MemoryResponseCache(config.cache)
        self._redactor = Redactor(config.redact_pii) if config.redact_pii else None
        self.admission = Admission(
            config, limiter, budgets, loop_time=lambda: asyncio.get_running_loop().time(), latency_ms=self.latency.get
        )
        self._rng = rng or random.Random()
        models = [m for p in config.providers for m in p.models]
        self.router = Router(models, config.policy, self.latency, self._rng, config.routes)
        self._provider_configs = {p.name: p for p in config.providers}
        self._providers: dict[str, Provider] = dict(providers or {})
        self._session: UpstreamClients | None = None  # the pooled HTTP clients the providers share
        self._background: set[asyncio.Task[None]] = set()

    # ---- lifecycle ----

    async def start(self) -> None:
        if any(p.name not in self._providers for p in self.config.providers):
            self._session = UpstreamClients()
        for p in self.config.providers:
            if p.name not in self._providers:
                assert self._session is not None
                self._providers[p.name] = build_provider(_settings(p), self._session.get(p.transport))

    async def settled(self) -> None:
        """Waits until the ledger writes of cancelled calls (which run on their own tasks) are done."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def aclose(self) -> None:
        await self.settled()
        for provider in self._providers.values():
            await provider.aclose()
        if self._session is not None:
            await self._session.close()
        await self.ledger.aclose()
        await self.limiter.aclose()
        await self.budgets.aclose()
        await self.cache.aclose()
        await self.circuits.aclose()

    async def __aenter__(self) -> Feather:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # ---- calls ----

    async def chat(self, request: ChatRequest, ctx: CallContext | None = None) -> ChatResult:
        call = self._begin(request, ctx or CallContext(), streamed=False)
        try:
            tenant, candidates = self._plan(call)
            hit = await self._cache_lookup(call, candidates)
            if hit is not None:
                record = self._record(call, Outcome.CACHE_HIT, Usage())
                await self._settle(call, record)
                return ChatResult(
                    hit.content,
                    list(hit.tool_calls),
                    hit.finish_reason,
                    hit.provider,
                    hit.model,
                    Usage(),
                    0,
                    [],
                    record.latency_ms,
                    call.request_id,
                    cached=True,
                )
            req = call.request
            candidate, reply = await self._route(
                call,
                tenant,
                candidates,
                lambda p, c: p.chat(c.model.name, req),
                self._settle_hedge_loser,
            )
        except FeatherError as e:
            await self._settle(call, self._record(call, Outcome.ERROR, Usage(), error=e))
            raise
        except asyncio.CancelledError:  # an attempt in flight is in call.abandoned
            self._settle_in_background(call, Outcome.CANCELLED, Usage(), estimated=False)
            raise
        cost, unpriced = _price(candidate, reply.usage)
        record = self._record(call, Outcome.OK, reply.usage, cost=cost, estimated=reply.usage_estimated)
        await self._settle(call, record)
        if not reply.thinking:  # a replay without its thinking could not continue a tool-use turn
            await self._cache_store(call, candidate, reply.content, reply.tool_calls, reply.finish_reason)
        return ChatResult(
            content=reply.content,
            tool_calls=reply.tool_calls,
            finish_reason=reply.finish_reason,
            provider=candidate.provider,
            model=candidate.model.name,
            usage=_with_abandoned(reply.usage, call),
            cost_nanos_usd=record.cost_nanos_usd,
            attempts=call.attempts,
            latency_ms=record.latency_ms,
            request_id=call.request_id,
            unpriced=unpriced,
            usage_estimated=record.estimated,
            thinking=reply.thinking,
            upstream=reply.upstream,
        )

    async def stream(self, request: ChatRequest, ctx: CallContext | None = None) -> AsyncGenerator[StreamItem, None]:
        """Streams one call. Retries and fail-over happen before the first event reaches the caller;
        after that an upstream failure ends the stream with an error, billed for what was consumed."""
        call = self._begin(request, ctx or CallContext(), streamed=True)
        upstream: AsyncIterator[StreamEvent] | None = None
        text: list[str] = []
        calls: dict[int, list[str]] = {}  # tool call index -> [id, name, arguments...]
        thought: list[str] = []  # thinking text, for the estimate of a cut stream
        try:
            tenant, candidates = self._plan(call)
            hit = await self._cache_lookup(call, candidates)
            if hit is not None:
                async for item in self._replay(call, hit):
                    yield item
                return
            req = call.request

            async def open_stream(p: Provider, c: RouteCandidate) -> _Opened:
                it = p.stream(c.model.name, req)
                prompt: Usage | None = None
                call.prompt_usage = None  # an earlier attempt's counts were another candidate's
                try:
                    event = await anext(it)
                    while isinstance(event, PromptUsage):  # not a reply event: the stream has not started
                        prompt = event.usage
                        event = await anext(it)
                    return it, event, prompt
                except BaseException:
                    if prompt is not None:  # the provider took the prompt: an abandoned attempt bills it exactly
                        call.prompt_usage = prompt
                    await _close(it)
                    raise

            async def settle_loser(leg: _Call, opened: _Opened | None) -> None:
                if opened is not None:
                    await _close(opened[0])
                await self._settle_hedge_loser(leg, opened)

            candidate, (upstream, event, call.prompt_usage) = await self._route(
                call, tenant, candidates, open_stream, settle_loser
            )
            yield StreamStarted(candidate.provider, candidate.model.name, call.request_id)
            ttft_ms = call.ttft_ms = _ms_since(call.started)
            idle_ms = self._provider_configs[candidate.provider].idle_timeout_ms
            # Without an idle timeout or a deadline the next event is awaited bare: no timer per event.
            timed = idle_ms is not None or call.ctx.deadline is not None
            while not isinstance(event, StreamFinish):
                if isinstance(event, TextDelta):
                    text.append(event.content)
                    yield event
                elif isinstance(event, ToolCallDelta):
                    parts = calls.setdefault(event.index, [event.id, event.name])
                    parts[0], parts[1] = parts[0] or event.id, parts[1] or event.name
                    parts.append(event.arguments)
                    yield event
                elif isinstance(event, ThinkingDelta):
                    thought.append(event.text)
                    yield event
                else:
                    call.prompt_usage = event.usage
                if timed:
                    event = await self._next_event(call, upstream, idle_ms)
                else:
                    try:
                        event = await anext(upstream)
                    except (StopAsyncIteration, ProviderError) as e:
                        raise await self._midstream_failure(call, _stream_failure(e)) from None
            usage, estimated = event.usage, False
            if usage is None:
                usage, estimated = self._cancelled_usage(call, _output_text(text + thought, calls)), True
            cost, unpriced = _price(candidate, usage)
            record = self._record(call, Outcome.OK, usage, cost=cost, estimated=estimated)
            await self._settle(call, record)
            tool_calls = [ToolCall(p[0], p[1], "".join(p[2:])) for _, p in sorted(calls.items())]
            if not thought:  # a replay without its thinking could not continue a tool-use turn
                await self._cache_store(call, candidate, "".join(text), tool_calls, event.finish_reason)
            yield StreamCompleted(
                finish_reason=event.finish_reason,
                usage=_with_abandoned(usage, call),
                cost_nanos_usd=record.cost_nanos_usd,
                attempts=call.attempts,
                latency_ms=record.latency_ms,
                time_to_first_token_ms=ttft_ms,
                usage_estimated=record.estimated,
                unpriced=unpriced,
                upstream=event.upstream,
            )
        except FeatherError as e:  # before the stream opened: see call.abandoned
            usage = self._cancelled_usage(call, _output_text(text + thought, calls)) if upstream else Usage()
            await self._settle(call, self._record(call, Outcome.ERROR, usage, error=e, estimated=upstream is not None))
            raise
        except (asyncio.CancelledError, GeneratorExit):  # before the stream opened: see call.abandoned
            usage = self._cancelled_usage(call, _output_text(text + thought, calls)) if upstream else Usage()
            self._settle_in_background(call, Outcome.CANCELLED, usage, estimated=upstream is not None)
            raise
        finally:
            if upstream is not None:
                await _close(upstream)

    async def record_refused(self, request: ChatRequest, ctx: CallContext, error: FeatherError, streamed: bool) -> None:
        """Records a call refused before it reached `chat`/`stream` (authentication, the tenant's request
        rate or concurrency, load shedding, the state store down, a request that did not convert): one
        ledger record like any failed call's (outcome error, the status code and reason, no tokens, no cost,
        no route), then the observers (call log, metrics, tracing). Durable before the refusal is sent."""
        call = self._begin(request, ctx, streamed=streamed)
        await self._settle(call, self._record(call, Outcome.ERROR, Usage(), error=error))

    async def usage(self, query: UsageQuery) -> UsageReport:
        try:
            return await self.ledger.query(query)
        except StateUnavailable as e:
            raise StateStoreUnavailable("the ledger of record is unreachable; retry shortly") from e

    def circuit_state(self, key: str) -> CircuitState:
        """Exact for in-process circuits; with shared circuits, the state this replica saw last."""
        if isinstance(self.circuits, MemoryCircuitStore):
            return self.circuits.breakers.state(key)
        return self._circuit_view.get(key, CircuitState.CLOSED)

    async def refresh_circuits(self) -> None:
        """Reads every shared circuit's current state (ListModels calls this before answering)."""
        if isinstance(self.circuits, MemoryCircuitStore):
            return
        for p in self.config.providers:
            for m in p.models:
                key = f"{p.name}:{m.name}"
                with contextlib.suppress(StateUnavailable):
                    self._circuit_view[key] = await self.circuits.state(key)

    def upstream_connections(self, provider: str) -> int:
        """Connections open (idle or busy) from this provider to its upstreams."""
        return 0 if self._session is None else self._session.connections(provider)

    def models(self, provider: str = "") -> list[ModelView]:
        """Routable models in configuration order, with live state."""
        return [
            ModelView(
                p.name,
                p.type,
                m,
                self.circuit_state(f"{p.name}:{m.name}").value,
                int(self.latency.get(f"{p.name}:{m.name}") or 0),
                0 if p.type == "mock" else p.max_connections,
                self._last_failures.get(f"{p.name}:{m.name}"),
            )
            for p in self.config.providers
            if not provider or p.name == provider
            for m in p.models
        ]

    # ---- steps ----

    def _begin(self, request: ChatRequest, ctx: CallContext, *, streamed: bool) -> _Call:
        limit = asyncio.get_running_loop().time() + self.config.request_timeout_ms / 1000
        gateway_bound = ctx.deadline is None or limit < ctx.deadline
        return _Call(
            request=request,
            ctx=ctx,
            # 128 random bits (as uuid4, but cheaper) unless the caller gave a usable id
            request_id=usable_request_id(request.request_id) or os.urandom(16).hex(),
            started=time.monotonic(),
            started_ns=time.time_ns(),
            streamed=streamed,
            answer_by=limit if gateway_bound else ctx.deadline,
            gateway_bound=gateway_bound,
        )

    def _out_of_time(self, call: _Call, what: str) -> DeadlineExceeded:
        """The answer deadline ran out: the caller's own, or the gateway's requestTimeoutMs (which says so)."""
        if not call.gateway_bound:
            return DeadlineExceeded(f"the call's deadline ran out {what}")
        ms = self.config.request_timeout_ms
        return DeadlineExceeded(f"the gateway's request timeout (requestTimeoutMs {ms}) ran out {what}", ms)

    def _plan(self, call: _Call) -> tuple[TenantConfig, list[RouteCandidate]]:
        """Validates and redacts the request, and lists the candidates this tenant may use, in order."""
        self.ledger_guard.check()  # before any upstream: a call whose cost cannot be recorded is not made
        validate_chat(call.request, self.config.input_limits)
        if self._redactor is not None:
            call.request = self._redactor.request(call.request)
        req = call.request
        tenant = self._tenant(call)
        candidates = Admission.allowed(tenant, req.model, self.router.plan(req.model, req.provider, req.policy))
        return tenant, self._capable(req, candidates)

    def _capable(self, req: ChatRequest, candidates: list[RouteCandidate]) -> list[RouteCandidate]:
        """The candidates whose API can honour the request's JSON reply and take its parts (INVALID_ARGUMENT
        when none can)."""
        if req.response_format is not None and req.response_format.type in STRUCTURED_OUTPUT:
            candidates = self._structured_output_capable(req.model, req.response_format.type, candidates)
        needed = inputs.needs(req)
        if needed:
            candidates = self._input_capable(req.model, candidates, needed)
        return candidates

    def _tenant(self, call: _Call) -> TenantConfig:
        """The call's tenant: as authenticated, else as configured by name (an in-process embedding)."""
        return call.ctx.tenant_config or self.config.tenants.get(call.ctx.tenant, self.config.default_tenant)

    def _structured_output_capable(
        self, requested: str, kind: str, candidates: list[RouteCandidate]
    ) -> list[RouteCandidate]:
        """A JSON reply is a promise the caller parses: never route it to an API that would ignore it."""

        def supports(c: RouteCandidate) -> bool:
            return kind in STRUCTURED_OUTPUT_SUPPORT.get(self._wire(c), frozenset())

        capable = [c for c in candidates if supports(c)]
        if not capable:
            why = f"no provider serving {requested!r} supports {kind}"
            apis = {self._wire(c) for c in candidates}
            if kind == "json_object" and "anthropic" in apis:
                why += " (the Anthropic Messages API takes a JSON schema: use RESPONSE_FORMAT_TYPE_JSON_SCHEMA)"
            elif kind == "json_object" and "bedrock" in apis:
                why += " (the Bedrock Converse API takes a JSON schema: use RESPONSE_FORMAT_TYPE_JSON_SCHEMA)"
            raise InvalidRequest([FieldViolation("response_format", why)])
        return capable

    def _wire(self, c: RouteCandidate) -> str:
        """The API serving the candidate (providers.wire_format)."""
        p = self._provider_configs[c.provider]
        return wire_format(p.type, c.model.name, p.responses_models)

    def _input_capable(
        self, requested: str, candidates: list[RouteCandidate], needed: dict[str, str]
    ) -> list[RouteCandidate]:
        """Images, documents and audio go only where the wire format carries them: never dropped silently."""

        def takes(c: RouteCandidate) -> bool:
            return ACCEPTED_INPUTS.get(self._wire(c), frozenset()).issuperset(needed)

        capable = [c for c in candidates if takes(c)]
        if capable:
            return capable
        violations = []
        for kind, path in needed.items():
            refusing = sorted(
                {t for c in candidates if kind not in ACCEPTED_INPUTS.get(t := self._wire(c), frozenset())}
            )
            if refusing:
                apis = " or ".join(refusing)
                violations.append(
                    FieldViolation(
                        path, f"{inputs.DESCRIPTIONS[kind]} cannot be sent to the {apis} API serving {requested!r}"
                    )
                )
        if not violations:  # each kind has a taker, but no one provider takes them all
            path = next(iter(needed.values()))
            violations.append(
                FieldViolation(path, f"no provider serving {requested!r} takes all of this request's parts")
            )
        raise InvalidRequest(violations)

    async def _cache_lookup(self, call: _Call, candidates: list[RouteCandidate]) -> CachedReply | None:
        call.cache_key = cache_key(self.config.cache, call.ctx.tenant, call.request)
        if call.cache_key is None:
            return None
        hit = await self.cache.get(call.cache_key)
        if hit is not None:
            if call.ctx.request_token is not None:
                await call.ctx.request_token(None)  # a cache hit is served too: within the request rate
            call.candidate = next(
                (c for c in candidates if (c.provider, c.model.name) == (hit.provider, hit.model)), None
            )
        return hit

    async def _cache_store(
        self, call: _Call, c: RouteCandidate, content: str, tool_calls: Sequence[ToolCall], finish: FinishReason
    ) -> None:
        if call.cache_key is not None:
            await self.cache.put(
                call.cache_key, CachedReply(c.provider, c.model.name, content, tuple(tool_calls), finish)
            )

    async def _replay(self, call: _Call, hit: CachedReply) -> AsyncIterator[StreamItem]:
        """A cache hit as a stream: start, the whole reply as one delta, end (no cost, marked cached)."""
        yield StreamStarted(hit.provider, hit.model, call.request_id)
        call.ttft_ms = _ms_since(call.started)
        if hit.content:
            yield TextDelta(hit.content)
        for i, tc in enumerate(hit.tool_calls):
            yield ToolCallDelta(i, tc.id, tc.name, tc.arguments)
        record = self._record(call, Outcome.CACHE_HIT, Usage())
        await self._settle(call, record)
        yield StreamCompleted(hit.finish_reason, Usage(), 0, [], record.latency_ms, call.ttft_ms, cached=True)

    async def _route(
        self,
        call: _Call,
        tenant: TenantConfig,
        candidates: list[RouteCandidate],
        attempt: Callable[[Provider, RouteCandidate], Awaitable[T]],
        settle_loser: Callable[[_Call, T | None], Awaitable[None]],
    ) -> tuple[RouteCandidate, T]:
        """Admit, then attempt: hedged when the route asks for it; on a too-long prompt, once more on the
        route's larger-context models."""
        req = call.request
        route = self.router.routes.get(req.model)
        hedged = route is not None and route.hedge_after_ms is not None and len(candidates) > 1
        # Unhedged, the first attempt's provider:model token is asked for with admission (one round trip).
        first_slot = None if hedged or not candidates else candidates[0].key
        reachable = candidates  # what the budget reservation must cover: the larger models too
        if route is not None and route.context_window_fallbacks:
            reachable = candidates + [c for n in route.context_window_fallbacks for c in self.router.resolve(n)]
        call.ticket = await self.admission.admit(
            tenant,
            req,
            reachable,
            call.answer_by,
            first_slot=first_slot,
            request_token=call.ctx.request_token,
            legs=2 if hedged else 1,
        )
        try:
            if hedged:
                assert route is not None and route.hedge_after_ms is not None
                return await self._hedged(call, candidates, attempt, settle_loser, route.hedge_after_ms / 1000)
            return await self._attempt_loop(call, candidates, attempt)
        except UpstreamInvalidRequest as e:
            if e.upstream_reason != "UPSTREAM_CONTEXT_TOO_LONG" or route is None or not route.context_window_fallbacks:
                raise
            larger = [c for name in route.context_window_fallbacks for c in self.router.plan(name, policy=req.policy)]
            larger = Admission.allowed(tenant, req.model, larger)
            try:  # the larger models must take the request as well (its JSON reply, its parts)
                larger = self._capable(req, larger)
            except InvalidRequest:
                raise e from None
            return await self._attempt_loop(call, larger, attempt)

    async def _hedged(
        self,
        call: _Call,
        candidates: list[RouteCandidate],
        attempt: Callable[[Provider, RouteCandidate], Awaitable[T]],
        settle_loser: Callable[[_Call, T | None], Awaitable[None]],
        delay_s: float,
    ) -> tuple[RouteCandidate, T]:
        """The original's `race`, done carefully: after `delay_s` without an answer a second leg starts on
        the next candidate; the first success wins; the other leg is cancelled (which never counts against
        its circuit) and billed only for what it consumed."""
        legs = [replace(call, attempts=[], ticket=None, abandoned=[], prompt_usage=None)]
        tasks = [asyncio.ensure_future(self._attempt_loop(legs[0], candidates, attempt))]
        done, _ = await asyncio.wait(tasks, timeout=delay_s)
        if not done:
            legs.append(replace(call, attempts=[], ticket=None, abandoned=[], prompt_usage=None))
            tasks.append(asyncio.ensure_future(self._attempt_loop(legs[1], candidates[1:] + candidates[:1], attempt)))
        winner: int | None = None
        try:
            pending = set(tasks)
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                winner = next((tasks.index(t) for t in done if t.exception() is None), None)
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for leg in legs:
                call.attempts.extend(leg.attempts)
            if winner is None:  # every leg failed, or the call was cancelled: it pays for all of them
                call.abandoned.extend(a for leg in legs for a in leg.abandoned)
        if winner is None:
            error = tasks[-1].exception()
            assert error is not None
            raise error
        call.abandoned.extend(legs[winner].abandoned)
        for i, (leg, task) in enumerate(zip(legs, tasks, strict=True)):
            if i == winner or leg.candidate is None:
                continue
            finished = not task.cancelled() and task.exception() is None
            consumed = task.result()[1] if finished else None
            if consumed is not None or leg.abandoned:
                await settle_loser(leg, consumed)
        call.candidate = legs[winner].candidate
        return tasks[winner].result()

    async def _settle_hedge_loser(self, loser: _Call, reply: object) -> None:
        """Bills a losing hedge leg as its own ledger record (`<request id>:hedge`): its real usage when it
        finished, an estimate of the prompt for a stream it opened, and its abandoned attempts (the one the
        race cancelled included) as estimates."""
        leg = replace(loser, request_id=f"{loser.request_id}:hedge", attempts=[], ticket=None)
        usage, estimated = Usage(), False
        if isinstance(reply, ProviderResponse):
            usage, estimated = reply.usage, reply.usage_estimated
        elif isinstance(reply, tuple):  # a stream it opened: (iterator, first event, announced prompt usage)
            leg.prompt_usage = reply[2]
            usage, estimated = self._cancelled_usage(leg, ""), True
        record = self._record(leg, Outcome.CANCELLED, usage, estimated=estimated)
        await self._settle(leg, record)
        # The provider was paid for this leg too: it counts against the budget (admission reserved two legs).
        tenant = self._tenant(loser)
        try:
            await self.admission.charge(tenant, record.cost_nanos_usd)
        except StateUnavailable:
            log.warning("could not charge the losing hedge leg of %s: state store unreachable", loser.request_id)

    async def _attempt_loop(
        self,
        call: _Call,
        candidates: list[RouteCandidate],
        attempt: Callable[[Provider, RouteCandidate], Awaitable[T]],
    ) -> tuple[RouteCandidate, T]:
        """Tries candidates in order, retrying retryable failures with backoff, within the deadline.

        A candidate whose circuit is open is skipped; a non-retryable failure that is the request's own
        fault ends the call at once; one that is the provider's (auth, quota) moves on to the next.
        """
        loop = asyncio.get_running_loop()
        deadline = call.answer_by  # per-attempt timeouts and backoff never add up past it
        policy = RetryPolicy.of(self.config.retry, call.request.retry)
        last: ProviderError | None = None
        cause: LastFailure | None = None  # the upstream failure behind `last` (for an open circuit: its opener)
        limited: RateLimitExceeded | None = None
        for candidate in candidates:
            call.candidate = candidate
            provider = self._providers[candidate.provider]
            pconf = self._provider_configs[candidate.provider]
            per_attempt_s = ((call.streamed and pconf.first_token_timeout_ms) or pconf.timeout_ms) / 1000.0
            for n in range(1, policy.max_attempts + 1):
                try:
                    await self.admission.provider_slot(candidate.key, deadline, call.ticket)
                except RateLimitExceeded as e:
                    limited, last = e, ProviderError("GATEWAY_RATE_LIMITED", e.message, retryable=True)
                    refused = _attempt(candidate, "retryable_error", time.monotonic(), last.reason, detail=e.message)
                    self._attempt_done(call, (), refused)
                    break
                permit = await self._acquire_circuit(candidate.key)
                if permit is None:
                    opener = self._last_failures.get(candidate.key)
                    why = f" after {opener.reason}: {opener.message}" if opener else " (opened by another replica)"
                    last = ProviderError(
                        "CIRCUIT_OPEN",
                        f"{candidate.key}: circuit open{why}",
                        retryable=True,
                        retry_after_s=await self._reopens_in(candidate.key),
                    )
                    cause = opener or cause
                    skipped = _attempt(candidate, "circuit_open", time.monotonic(), last.reason, detail=last.message)
                    self._attempt_done(call, (), skipped)
                    break
                begun = time.monotonic()
                tokens = self._attempt_started(call, candidate) if self.observers else ()
                attempt_deadline = loop.time() + per_attempt_s
                marker = AttemptMarker()  # the transport marks it once the request is sent
                marked = attempt_marker.set(marker)
                # Which limit a timeout means is decided here, not by reading the clock when it fires:
                # timers may fire a hair early (uvloop's are milliseconds), and the caller's deadline
                # must never count as the provider's failure (it would open the circuit for everyone).
                caller_bound = deadline is not None and deadline <= attempt_deadline
                if deadline is not None:
                    attempt_deadline = min(attempt_deadline, deadline)
                try:
                    async with asyncio.timeout_at(attempt_deadline):
                        result = await attempt(provider, candidate)
                except ProviderError as e:
                    last = e
                    if 200 <= e.http_status < 300:  # answered (and billed), but the reply was unusable
                        self._abandoned(call, candidate)
                except TimeoutError:
                    if marker.sent:
                        self._abandoned(call, candidate)
                    if caller_bound:
                        await self._circuit_verdict(self.circuits.released, candidate.key, permit)
                        self._attempt_done(call, tokens, _attempt(candidate, "cancelled", begun, "DEADLINE_EXCEEDED"))
                        raise self._out_of_time(call, "before the upstream answered") from None
                    last = ProviderError(
                        "UPSTREAM_TIMEOUT", f"{candidate.provider}: no answer within {per_attempt_s:g}s", retryable=True
                    )
                except asyncio.CancelledError:
                    if marker.sent:
                        self._abandoned(call, candidate)
                    await self._circuit_verdict(self.circuits.released, candidate.key, permit)
                    self._attempt_done(call, tokens, _attempt(candidate, "cancelled", begun))
                    raise
                else:
                    if permit is Permit.PROBE:  # a success while closed changes nothing: no round trip
                        await self._circuit_verdict(self.circuits.succeeded, candidate.key, permit)
                    self._attempt_done(call, tokens, _attempt(candidate, "ok", begun))
                    self.latency.observe(candidate.key, _ms_since(begun))
                    return candidate, result
                finally:
                    attempt_marker.reset(marked)
                outcome = "retryable_error" if last.retryable else "fatal_error"
                self._attempt_done(
                    call, tokens, _attempt(candidate, outcome, begun, last.reason, last.http_status, last.message)
                )
                if last.reason in _REQUEST_FAULTS:
                    await self._circuit_verdict(self.circuits.released, candidate.key, permit)
                    raise UpstreamInvalidRequest(last.message, candidate.provider, last.http_status, last.reason)
                await self._circuit_verdict(self.circuits.failed, candidate.key, permit)
                cause = self._note_failure(candidate.key, last)
                if not last.retryable or n == policy.max_attempts:
                    break  # this provider cannot serve (auth, quota) or is out of attempts: fail over
                delay = policy.delay_s(n, last.retry_after_s, self._rng)
                if deadline is not None and loop.time() + delay >= deadline:
                    break  # the wait cannot fit in the deadline: fail over instead of sleeping
                await asyncio.sleep(delay)
        assert last is not None
        if last.reason == "GATEWAY_RATE_LIMITED" and limited is not None:
            raise limited
        if last.reason == "UPSTREAM_AUTH_FAILED":
            raise UpstreamAuthFailed(call.candidate.provider if call.candidate else "")
        if deadline is not None and loop.time() >= deadline:
            raise self._out_of_time(call, "between attempts")
        retry_after = [a for a in [await self._reopens_in(c.key) for c in candidates] if a is not None]
        if last.retry_after_s is not None:
            retry_after.append(last.retry_after_s)
        raise UpstreamUnavailable(
            f"all candidates failed; last error: {last.message}",
            min(retry_after) if retry_after else None,
            last.reason,
            cause,
        )

    async def _next_event(self, call: _Call, upstream: AsyncIterator[StreamEvent], idle_ms: int | None) -> StreamEvent:
        """The next upstream event, within the caller's deadline and the provider's idle timeout."""
        loop = asyncio.get_running_loop()
        deadline = call.ctx.deadline
        caller_bound = deadline is not None  # which limit a timeout means: see _attempt_loop
        if idle_ms is not None:
            idle_deadline = loop.time() + idle_ms / 1000
            caller_bound = deadline is not None and deadline <= idle_deadline
            deadline = idle_deadline if deadline is None else min(deadline, idle_deadline)
        try:
            async with asyncio.timeout_at(deadline):
                return await anext(upstream)
        except (StopAsyncIteration, ProviderError) as e:
            raise await self._midstream_failure(call, _stream_failure(e)) from None
        except TimeoutError:
            if caller_bound:
                raise DeadlineExceeded("the call's deadline ran out mid-stream") from None
            # No *event*: bytes may have kept coming (a line that never ends), so "no data" would mislead.
            stalled = ProviderError("UPSTREAM_IDLE_TIMEOUT", f"no stream event for {idle_ms} ms", retryable=True)
            raise await self._midstream_failure(call, stalled) from None

    async def _acquire_circuit(self, key: str) -> Permit | None:
        try:
            permit = await self.circuits.acquire(key)
        except StateUnavailable as e:
            raise StateStoreUnavailable("the shared state store is unreachable") from e
        self._circuit_view[key] = (
            CircuitState.OPEN
            if permit is None
            else CircuitState.HALF_OPEN
            if permit is Permit.PROBE
            else CircuitState.CLOSED
        )
        return permit

    async def _circuit_verdict(
        self, report: Callable[[str, Permit], Awaitable[None]], key: str, permit: Permit
    ) -> None:
        """Reports an attempt's outcome to its circuit. A store outage must not fail a call that is done."""
        try:
            await report(key, permit)
        except StateUnavailable:
            log.warning("could not report to circuit %s: state store unreachable", key)

    async def _reopens_in(self, key: str) -> float | None:
        try:
            return await self.circuits.reopens_in(key)
        except StateUnavailable:
            return None

    def _note_failure(self, key: str, e: ProviderError) -> LastFailure:
        """Remembers a failure that counted against `key`'s circuit: what an open circuit, its error and
        ListModels name as the cause."""
        failure = LastFailure(e.reason, e.message, e.http_status, time.time())
        self._last_failures[key] = failure
        return failure

    async def _midstream_failure(self, call: _Call, e: ProviderError) -> FeatherError:
        cause = None
        if call.candidate is not None:
            await self._circuit_verdict(self.circuits.failed, call.candidate.key, Permit.CALL)
            cause = self._note_failure(call.candidate.key, e)
        if call.attempts:
            call.attempts[-1].outcome = "retryable_error" if e.retryable else "fatal_error"
            call.attempts[-1].error_reason = e.reason
            call.attempts[-1].error_detail = e.message
        message = f"the upstream stream failed after the first token: {e.message}"
        return UpstreamUnavailable(message, e.retry_after_s, e.reason, cause)

    def _abandoned(self, call: _Call, candidate: RouteCandidate) -> None:
        """An attempt the upstream got and the gateway gave up on: it is billed for the prompt it sent (the
        counts the provider announced for it, when it did: Anthropic's message_start)."""
        prompt, call.prompt_usage = call.prompt_usage, None
        call.abandoned.append((candidate, prompt or Usage(input_tokens=estimate_prompt_tokens(call.request.messages))))

    def _cancelled_usage(self, call: _Call, output_text: str) -> Usage:
        """What a call consumed when the provider never said in full: the prompt's counts the provider
        announced (Anthropic's message_start), else an estimate, plus the output estimated; billed and
        marked as estimated."""
        if call.candidate is None:
            return Usage()
        if call.prompt_usage is not None:
            return replace(call.prompt_usage, output_tokens=estimate_tokens(output_text), reasoning_tokens=0)
        return Usage(
            input_tokens=estimate_prompt_tokens(call.request.messages), output_tokens=estimate_tokens(output_text)
        )

    def _record(
        self,
        call: _Call,
        outcome: Outcome,
        usage: Usage,
        *,
        cost: int | None = None,
        error: FeatherError | None = None,
        estimated: bool = False,
    ) -> UsageRecord:
        c = call.candidate
        if cost is None:
            cost = _price(c, usage)[0] if c is not None else 0
        for candidate, consumed in call.abandoned:  # what abandoned attempts cost the upstream's bill
            usage = _plus(usage, consumed)
            cost += _price(candidate, consumed)[0]
            estimated = True
        return UsageRecord(
            request_id=call.request_id,
            time_ns=call.started_ns,
            tenant=call.ctx.tenant,
            provider=c.provider if c else "",
            model=c.model.name if c else "",
            requested_model=call.request.model[:MAX_NAME_LENGTH],  # bounded: the request may be invalid
            outcome=outcome,
            error_code=error.code if error else "",
            error_reason=error.reason if error else "",
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cached_input_tokens=usage.cached_input_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            reasoning_tokens=usage.reasoning_tokens,
            web_search_requests=usage.web_search_requests,
            cache_write_1h_tokens=usage.cache_write_1h_tokens,
            cost_nanos_usd=cost,
            estimated=estimated,
            unpriced=c is not None and c.model.price is None,
            streamed=call.streamed,
            attempt_count=len(call.attempts),
            latency_ms=_ms_since(call.started),
            tags=bounded_tags(call.request.tags),
        )

    async def _settle(self, call: _Call, record: UsageRecord) -> None:
        """Writes the call's ledger record (durable before the caller hears back) and settles its limits and
        budget, then tells observers."""
        settling = None
        if call.ticket is not None:  # sent to a shared store now: it lands while the ledger commits
            ticket, call.ticket = call.ticket, None
            settling = self.admission.settle(ticket, record.input_tokens + record.output_tokens, record.cost_nanos_usd)
        guard = self.ledger_guard
        consumed = record.attempt_count > 0 or record.cost_nanos_usd > 0
        # Not written: a refusal while the ledger cannot write, and a call that failed because it could not
        # (refused before any upstream, or its record refused, its cost logged then).
        write = (guard.writable or consumed) and record.error_reason != LedgerUnavailable.reason
        try:
            if write:
                await self.ledger.record(record)
                guard.succeeded()
        except LedgerWriteError as e:
            refusal = guard.failed(e)
            # A call that consumed nothing (a refusal, a cache hit) keeps its own answer; only its record is lost.
            if consumed:  # what it cost is known only from this line now
                log.error(
                    "usage NOT recorded for %s: tenant=%s provider=%s model=%s cost_nanos_usd=%d tokens=%d+%d",
                    record.request_id,
                    record.tenant,
                    record.provider,
                    record.model,
                    record.cost_nanos_usd,
                    record.input_tokens,
                    record.output_tokens,
                )
                raise refusal from None
        finally:
            if settling is not None:
                try:
                    await settling
                except FeatherError:
                    log.warning("could not settle limits and budget for %s: state store unreachable", call.request_id)
        for observer in self.observers:
            observer.call_settled(record, call.attempts, call.ttft_ms)

    def _attempt_started(self, call: _Call, candidate: RouteCandidate) -> tuple[object, ...]:
        return tuple(
            o.attempt_started(call.request_id, candidate.provider, candidate.model.name, call.streamed)
            for o in self.observers
        )

    def _attempt_done(self, call: _Call, tokens: tuple[object, ...], attempt: AttemptRecord) -> None:
        call.attempts.append(attempt)
        for observer, token in zip(self.observers, tokens, strict=False):
            observer.attempt_finished(token, attempt)

    def _settle_in_background(self, call: _Call, outcome: Outcome, usage: Usage, *, estimated: bool) -> None:
        """Records a call that is being cancelled: the caller's task cannot await anymore, so the
        write runs on its own task, which aclose() waits for."""
        record = self._record(call, outcome, usage, estimated=estimated)
        task = asyncio.get_running_loop().create_task(self._settle(call, record))
        self._background.add(task)
        task.add_done_callback(_log_failure_and_forget(self._background))


def _log_failure_and_forget(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, LedgerUnavailable):  # that one is logged already
            log.error("could not record a cancelled call in the ledger", exc_info=error)

    return done


def _settings(p: ProviderConfig) -> ProviderSettings:
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


def _stream_failure(e: StopAsyncIteration | ProviderError) -> ProviderError:
    if isinstance(e, ProviderError):
        return e
    return ProviderError("UPSTREAM_STREAM_CUT", "upstream stream ended without a finish", retryable=True)


def _plus(a: Usage, b: Usage) -> Usage:
    return Usage(
        a.input_tokens + b.input_tokens,
        a.output_tokens + b.output_tokens,
        a.cached_input_tokens + b.cached_input_tokens,
        a.cache_write_tokens + b.cache_write_tokens,
        a.reasoning_tokens + b.reasoning_tokens,
        a.web_search_requests + b.web_search_requests,
        a.cache_write_1h_tokens + b.cache_write_1h_tokens,
    )


def _with_abandoned(usage: Usage, call: _Call) -> Usage:
    """The usage a call bills: the answering attempt's plus the abandoned attempts' (as its ledger record)."""
    for _, consumed in call.abandoned:
        usage = _plus(usage, consumed)
    return usage


def _output_text(text: list[str], calls: dict[int, list[str]]) -> str:
    return "".join(text) + "".join(part for parts in calls.values() for part in parts[2:])


def _price(candidate: RouteCandidate | None, usage: Usage) -> tuple[int, bool]:
    price = candidate.model.price if candidate else None
    if price is None:
        return 0, candidate is not None
    return price.cost_nanos(usage), False


def _attempt(
    c: RouteCandidate, outcome: str, begun: float, reason: str = "", http_status: int = 0, detail: str = ""
) -> AttemptRecord:
    return AttemptRecord(c.provider, c.model.name, outcome, reason, _ms_since(begun), http_status, detail)


def _ms_since(begun: float) -> int:
    return int((time.monotonic() - begun) * 1000)


async def _close(it: AsyncIterator[StreamEvent]) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
