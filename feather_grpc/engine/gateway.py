"""The Feather orchestrator: the story of a call, stage by stage: plan (engine.plan), the cache, admit and
attempt (engine.attempt: limits and budget, retries, fail-over, hedging, the deadline), settle
(engine.settle: price, ledger).

Usable in-process as a library; the gRPC server is one adapter of it. It is built from interfaces (ledger,
limiter, budgets, circuits, cache, providers): `server.assembly` builds them from the configuration.
No grpc imports here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from feather_grpc.config import GatewayConfig, ModelConfig
from feather_grpc.core.breaker import CircuitState
from feather_grpc.core.cache import CachedReply, ResponseCache, cache_key
from feather_grpc.core.circuits import CircuitStore
from feather_grpc.core.errors import FeatherError, ProviderError, StateStoreUnavailable
from feather_grpc.core.ledger import Outcome, UsageLedger, UsageQuery, UsageReport
from feather_grpc.core.limits import BudgetStore, RateLimiter, StateUnavailable
from feather_grpc.core.results import ChatResult, LastFailure, StreamCompleted, StreamStarted
from feather_grpc.core.types import (
    ChatRequest,
    FinishReason,
    PromptUsage,
    ReplyId,
    StreamEvent,
    StreamFinish,
    TextDelta,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from feather_grpc.engine.admission import Admission
from feather_grpc.engine.attempt import Attempts, EventWatch, stream_failure
from feather_grpc.engine.call import Call, CallContext, Opened, StreamItem, begin, close_stream, ms_since
from feather_grpc.engine.ledger_guard import LedgerGuard
from feather_grpc.engine.observe import CallObserver
from feather_grpc.engine.plan import Planner
from feather_grpc.engine.routing import LatencyTracker, RouteCandidate, Router
from feather_grpc.engine.settle import Settlement, cancelled_usage, price, with_abandoned
from feather_grpc.providers.base import Provider

__all__ = ["CallContext", "Feather", "ModelView", "StreamItem", "UpstreamPool"]


class UpstreamPool(Protocol):
    """The pooled upstream HTTP client the providers share, as the engine sees it."""

    def connections(self, owner: str) -> int: ...

    async def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ModelView:
    provider: str
    provider_type: str
    model: ModelConfig
    circuit_state: str  # "closed" | "open" | "half_open"
    latency_ms: int  # decaying average; 0 before the first call
    max_connections: int = 0  # the provider's connection limit per upstream host; 0: it has no upstream (mock)
    last_failure: LastFailure | None = None


class Feather:
    """The gateway engine. Build once (server.assembly.assemble); share across all calls."""

    def __init__(
        self,
        config: GatewayConfig,
        ledger: UsageLedger,
        *,
        limiter: RateLimiter,
        budgets: BudgetStore,
        circuits: CircuitStore,
        cache: ResponseCache,
        providers: dict[str, Provider],
        upstream: UpstreamPool | None = None,
        rng: random.Random | None = None,
        observers: Sequence[CallObserver] = (),
        send_now: Callable[[], None] | None = None,
    ) -> None:
        """`send_now`: called once a call's settlement is started, to write it to the shared state store at
        once rather than at the end of the loop turn (assembly gives one for a lone call only)."""
        self.config = config
        self._cache_settings = config.routing.cache
        self._request_timeout_ms = config.routing.request_timeout_ms
        self.ledger = ledger
        self.limiter, self.budgets, self.circuits, self.cache = limiter, budgets, circuits, cache
        self._providers = providers
        self._upstream = upstream  # the pooled HTTP client the providers share; closed with them
        self.observers = list(observers)
        self.latency = LatencyTracker()
        rng = rng or random.Random()
        self.router = Router(
            [m for p in config.providers for m in p.models],
            config.routing.policy,
            self.latency,
            rng,
            config.routing.routes,
        )
        self.admission = Admission(
            config, limiter, budgets, loop_time=lambda: asyncio.get_running_loop().time(), latency_ms=self.latency.get
        )
        self.ledger_guard = LedgerGuard(ledger)  # refuses calls while the ledger cannot write
        self._planner = Planner(config, self.router, self.ledger_guard)
        self._settlement = Settlement(
            ledger, self.ledger_guard, self.admission, self.observers, self._planner.tenant, send_now
        )
        self._attempts = Attempts(
            config,
            router=self.router,
            planner=self._planner,
            admission=self.admission,
            circuits=circuits,
            providers=providers,
            latency=self.latency,
            rng=rng,
            observers=self.observers,
        )
        self._idle_timeouts_ms = {p.name: p.idle_timeout_ms for p in config.providers}

    # ---- lifecycle ----

    async def start(self) -> None:
        """Nothing to open: the parts are built (server.assembly) and connect on first use."""

    async def settled(self) -> None:
        """Waits until the ledger writes of cancelled calls (which run on their own tasks) are done."""
        await self._settlement.settled()

    async def aclose(self) -> None:
        await self.settled()
        for provider in self._providers.values():
            await provider.aclose()
        if self._upstream is not None:
            await self._upstream.close()
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
        call = begin(request, ctx or CallContext(), streamed=False, request_timeout_ms=self._request_timeout_ms)
        try:
            tenant, candidates = self._planner.plan(call)
            hit = await self._cache_lookup(call, candidates)
            if hit is not None:
                record = self._settlement.record(call, Outcome.CACHE_HIT, Usage())
                await self._settlement.settle(call, record)
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
            candidate, reply = await self._attempts.route(
                call,
                tenant,
                candidates,
                lambda p, c: p.chat(c.model.name, req),
                self._settlement.settle_hedge_loser,
            )
        except FeatherError as e:
            await self._settlement.settle(call, self._settlement.record(call, Outcome.ERROR, Usage(), error=e))
            raise
        except asyncio.CancelledError:  # an attempt in flight is in call.abandoned
            self._settlement.settle_in_background(call, Outcome.CANCELLED, Usage(), estimated=False)
            raise
        if call.answered is not None:
            call.answered.upstream_response_id = reply.upstream.id
        cost, unpriced = price(candidate, reply.usage, reply.upstream.service_tier)
        record = self._settlement.record(call, Outcome.OK, reply.usage, cost=cost, estimated=reply.usage_estimated)
        await self._settlement.settle(call, record)
        if not reply.thinking:  # a replay without its thinking could not continue a tool-use turn
            await self._cache_store(call, candidate, reply.content, reply.tool_calls, reply.finish_reason)
        return ChatResult(
            content=reply.content,
            tool_calls=reply.tool_calls,
            finish_reason=reply.finish_reason,
            provider=candidate.provider,
            model=candidate.model.name,
            usage=with_abandoned(reply.usage, call),
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
        call = begin(request, ctx or CallContext(), streamed=True, request_timeout_ms=self._request_timeout_ms)
        upstream: AsyncIterator[StreamEvent] | None = None
        watch: EventWatch | None = None
        # What the reply said so far: its length always (a cut stream's output is estimated from it), its
        # text and tool calls only when it will be cached: kept for the stream's life, they grow with it.
        output_chars = 0
        text: list[str] | None = None
        calls: dict[int, list[str]] = {}  # tool call index -> [id, name, arguments...]
        thinking = False  # a reply with thinking is not cached
        try:
            tenant, candidates = self._planner.plan(call)
            hit = await self._cache_lookup(call, candidates)
            if hit is not None:
                async for item in self._replay(call, hit):
                    yield item
                return
            if call.cache_key is not None:
                text = []
            req = call.request

            async def open_stream(p: Provider, c: RouteCandidate) -> Opened:
                it = p.stream(c.model.name, req)
                prompt: Usage | None = None
                reply_id = ""
                call.prompt_usage = None  # an earlier attempt's counts were another candidate's
                try:
                    event = await anext(it)
                    # Not reply events: the stream has not started.
                    while isinstance(event, PromptUsage | ReplyId):
                        if isinstance(event, PromptUsage):
                            prompt = event.usage
                        else:
                            reply_id = event.id
                        event = await anext(it)
                    return it, event, prompt, reply_id
                except BaseException:
                    if prompt is not None:  # the provider took the prompt: an abandoned attempt bills it exactly
                        call.prompt_usage = prompt
                    await close_stream(it)
                    raise

            async def settle_loser(leg: Call, opened: Opened | None) -> None:
                if opened is not None:
                    await close_stream(opened[0])
                await self._settlement.settle_hedge_loser(leg, opened)

            candidate, (upstream, event, call.prompt_usage, reply_id) = await self._attempts.route(
                call, tenant, candidates, open_stream, settle_loser
            )
            answered = call.answered
            if answered is not None:
                answered.upstream_response_id = reply_id
            yield StreamStarted(candidate.provider, candidate.model.name, call.request_id)
            ttft_ms = call.ttft_ms = ms_since(call.started)
            idle_ms = self._idle_timeouts_ms[candidate.provider]
            # Without an idle timeout or a deadline the next event is awaited bare: no timer at all. The watch
            # is made at the first wait, once the first event has gone out: nothing it does is on the way to
            # the first token (it only times waits, and the first event is already in hand).
            watched = idle_ms is not None or call.ctx.deadline is not None
            while not isinstance(event, StreamFinish):
                if isinstance(event, TextDelta):
                    output_chars += len(event.content)
                    if text is not None:
                        text.append(event.content)
                    yield event
                elif isinstance(event, ToolCallDelta):
                    output_chars += len(event.arguments)
                    if text is not None:
                        parts = calls.setdefault(event.index, [event.id, event.name])
                        parts[0], parts[1] = parts[0] or event.id, parts[1] or event.name
                        parts.append(event.arguments)
                    yield event
                elif isinstance(event, ThinkingDelta):
                    output_chars += len(event.text)
                    thinking = True
                    yield event
                elif isinstance(event, PromptUsage):
                    call.prompt_usage = event.usage
                elif answered is not None:  # ReplyId: said after the first reply event
                    answered.upstream_response_id = event.id
                if watch is None and watched:
                    watch = EventWatch(idle_ms, call.ctx.deadline)
                try:
                    event = await (anext(upstream) if watch is None else watch.next(upstream))
                except (StopAsyncIteration, ProviderError) as e:
                    raise await self._attempts.midstream_failure(call, stream_failure(e)) from None
                except TimeoutError:
                    if watch is None:
                        raise
                    raise await self._attempts.midstream_timeout(call, watch, idle_ms) from None
            if answered is not None and event.upstream.id:
                answered.upstream_response_id = event.upstream.id
            usage, estimated = event.usage, False
            if usage is None:
                usage, estimated = cancelled_usage(call, output_chars), True
            cost, unpriced = price(candidate, usage, event.upstream.service_tier)
            record = self._settlement.record(call, Outcome.OK, usage, cost=cost, estimated=estimated)
            await self._settlement.settle(call, record)
            if text is not None and not thinking:  # a replay without its thinking could not continue a tool-use turn
                tool_calls = [ToolCall(p[0], p[1], "".join(p[2:])) for _, p in sorted(calls.items())]
                await self._cache_store(call, candidate, "".join(text), tool_calls, event.finish_reason)
            yield StreamCompleted(
                finish_reason=event.finish_reason,
                usage=with_abandoned(usage, call),
                cost_nanos_usd=record.cost_nanos_usd,
                attempts=call.attempts,
                latency_ms=record.latency_ms,
                time_to_first_token_ms=ttft_ms,
                usage_estimated=record.estimated,
                unpriced=unpriced,
                upstream=event.upstream,
            )
        except FeatherError as e:  # before the stream opened: see call.abandoned
            usage = cancelled_usage(call, output_chars) if upstream else Usage()
            await self._settlement.settle(
                call, self._settlement.record(call, Outcome.ERROR, usage, error=e, estimated=upstream is not None)
            )
            raise
        except (asyncio.CancelledError, GeneratorExit):  # before the stream opened: see call.abandoned
            usage = cancelled_usage(call, output_chars) if upstream else Usage()
            self._settlement.settle_in_background(call, Outcome.CANCELLED, usage, estimated=upstream is not None)
            raise
        finally:
            if watch is not None:
                watch.close()
            if upstream is not None:
                await close_stream(upstream)

    async def record_refused(self, request: ChatRequest, ctx: CallContext, error: FeatherError, streamed: bool) -> None:
        """Records a call refused before it reached `chat`/`stream` (authentication, the tenant's request
        rate or concurrency, load shedding, the state store down, a request that did not convert): one
        ledger record like any failed call's (outcome error, the status code and reason, no tokens, no cost,
        no route), then the observers (call log, metrics, tracing). Durable before the refusal is sent."""
        call = begin(request, ctx, streamed=streamed, request_timeout_ms=self._request_timeout_ms)
        await self._settlement.settle(call, self._settlement.record(call, Outcome.ERROR, Usage(), error=error))

    async def usage(self, query: UsageQuery) -> UsageReport:
        try:
            return await self.ledger.query(query)
        except StateUnavailable as e:
            raise StateStoreUnavailable("the ledger of record is unreachable; retry shortly") from e

    def circuit_state(self, key: str) -> CircuitState:
        """Exact for in-process circuits; with shared circuits, the state this replica saw last."""
        exact = self.circuits.local_state(key)
        return exact if exact is not None else self._attempts.circuit_view.get(key, CircuitState.CLOSED)

    async def refresh_circuits(self) -> None:
        """Reads every shared circuit's current state (ListModels calls this before answering)."""
        for p in self.config.providers:
            for m in p.models:
                key = f"{p.name}:{m.name}"
                if self.circuits.local_state(key) is not None:
                    continue  # in this process: circuit_state reads it exactly, nothing to refresh
                with contextlib.suppress(StateUnavailable):
                    self._attempts.circuit_view[key] = await self.circuits.state(key)

    def upstream_connections(self, provider: str) -> int:
        """Connections open (idle or busy) from this provider to its upstreams."""
        return 0 if self._upstream is None else self._upstream.connections(provider)

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
                self._attempts.last_failures.get(f"{p.name}:{m.name}"),
            )
            for p in self.config.providers
            if not provider or p.name == provider
            for m in p.models
        ]

    # ---- steps ----

    async def _cache_lookup(self, call: Call, candidates: list[RouteCandidate]) -> CachedReply | None:
        call.cache_key = cache_key(self._cache_settings, call.ctx.tenant, call.request)
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
        self, call: Call, c: RouteCandidate, content: str, tool_calls: Sequence[ToolCall], finish: FinishReason
    ) -> None:
        if call.cache_key is not None:
            await self.cache.put(
                call.cache_key, CachedReply(c.provider, c.model.name, content, tuple(tool_calls), finish)
            )

    async def _replay(self, call: Call, hit: CachedReply) -> AsyncIterator[StreamItem]:
        """A cache hit as a stream: start, the whole reply as one delta, end (no cost, marked cached)."""
        yield StreamStarted(hit.provider, hit.model, call.request_id)
        call.ttft_ms = ms_since(call.started)
        if hit.content:
            yield TextDelta(hit.content)
        for i, tc in enumerate(hit.tool_calls):
            yield ToolCallDelta(i, tc.id, tc.name, tc.arguments)
        record = self._settlement.record(call, Outcome.CACHE_HIT, Usage())
        await self._settlement.settle(call, record)
        yield StreamCompleted(hit.finish_reason, Usage(), 0, [], record.latency_ms, call.ttft_ms, cached=True)
