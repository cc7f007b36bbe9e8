"""Admit and attempt, the middle stages of a call: admission (limits, budget) for the route, then the
attempts: retries with backoff, circuit breakers, fail-over, hedging and the deadline."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from feather_grpc.config import GatewayConfig, ProviderConfig, TenantConfig
from feather_grpc.core.breaker import CircuitState, Permit
from feather_grpc.core.circuits import CircuitStore
from feather_grpc.core.errors import (
    DeadlineExceeded,
    FeatherError,
    InvalidRequest,
    ProviderError,
    RateLimitExceeded,
    StateStoreUnavailable,
    UpstreamAuthFailed,
    UpstreamInvalidRequest,
    UpstreamUnavailable,
)
from feather_grpc.core.http_client import AttemptMarker, attempt_marker
from feather_grpc.core.limits import StateUnavailable
from feather_grpc.core.results import AttemptRecord, LastFailure
from feather_grpc.core.tokens import estimate_prompt_tokens
from feather_grpc.core.types import StreamEvent, Usage
from feather_grpc.engine.admission import Admission
from feather_grpc.engine.call import Call, ms_since
from feather_grpc.engine.observe import CallObserver
from feather_grpc.engine.plan import Planner
from feather_grpc.engine.retry import RetryPolicy
from feather_grpc.engine.routing import LatencyTracker, RouteCandidate, Router
from feather_grpc.providers.base import Provider

log = logging.getLogger(__name__)

T = TypeVar("T")

# Upstream errors that say the request itself is wrong: no other provider or retry can fix them.
_REQUEST_FAULTS = frozenset({"UPSTREAM_BAD_REQUEST", "UPSTREAM_CONTEXT_TOO_LONG", "UPSTREAM_CONTENT_FILTERED"})


class Attempts:
    """Admits a planned call and runs its attempts until one answers or the call must fail."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        router: Router,
        planner: Planner,
        admission: Admission,
        circuits: CircuitStore,
        providers: dict[str, Provider],
        latency: LatencyTracker,
        rng: random.Random,
        observers: list[CallObserver],
    ) -> None:
        self._config = config
        self._request_timeout_ms = config.routing.request_timeout_ms
        self._retry = config.routing.retry
        self.router = router
        self._planner = planner
        self.admission = admission
        self.circuits = circuits
        self._providers = providers
        self._provider_configs: dict[str, ProviderConfig] = {p.name: p for p in config.providers}
        self.latency = latency
        self._rng = rng
        self._observers = observers
        self.circuit_view: dict[str, CircuitState] = {}  # shared circuits: the state last seen
        # provider:model -> its latest failure that counted against its circuit (bounded by the config's models)
        self.last_failures: dict[str, LastFailure] = {}

    async def route(
        self,
        call: Call,
        tenant: TenantConfig,
        candidates: list[RouteCandidate],
        attempt: Callable[[Provider, RouteCandidate], Awaitable[T]],
        settle_loser: Callable[[Call, T | None], Awaitable[None]],
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
                larger = self._planner.capable(req, larger)
            except InvalidRequest:
                raise e from None
            return await self._attempt_loop(call, larger, attempt)

    async def _hedged(
        self,
        call: Call,
        candidates: list[RouteCandidate],
        attempt: Callable[[Provider, RouteCandidate], Awaitable[T]],
        settle_loser: Callable[[Call, T | None], Awaitable[None]],
        delay_s: float,
    ) -> tuple[RouteCandidate, T]:
        """The original's `race`, done carefully: after `delay_s` without an answer a second leg starts on
        the next candidate; the first success wins; the other leg is cancelled (which never counts against
        its circuit) and billed only for what it consumed."""
        legs = [replace(call, attempts=[], answered=None, ticket=None, abandoned=[], prompt_usage=None)]
        tasks = [asyncio.ensure_future(self._attempt_loop(legs[0], candidates, attempt))]
        done, _ = await asyncio.wait(tasks, timeout=delay_s)
        if not done:
            legs.append(replace(call, attempts=[], answered=None, ticket=None, abandoned=[], prompt_usage=None))
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
        call.candidate, call.answered = legs[winner].candidate, legs[winner].answered
        return tasks[winner].result()

    async def _attempt_loop(
        self,
        call: Call,
        candidates: list[RouteCandidate],
        attempt: Callable[[Provider, RouteCandidate], Awaitable[T]],
    ) -> tuple[RouteCandidate, T]:
        """Tries candidates in order, retrying retryable failures with backoff, within the deadline.

        A candidate whose circuit is open is skipped; a non-retryable failure that is the request's own
        fault ends the call at once; one that is the provider's (auth, quota) moves on to the next.
        """
        loop = asyncio.get_running_loop()
        deadline = call.answer_by  # per-attempt timeouts and backoff never add up past it
        policy = RetryPolicy.of(self._retry, call.request.retry)
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
                    opener = self.last_failures.get(candidate.key)
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
                tokens = self._attempt_started(call, candidate) if self._observers else ()
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
                    call.answered = _attempt(candidate, "ok", begun)
                    self._attempt_done(call, tokens, call.answered)
                    self.latency.observe(candidate.key, ms_since(begun))
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

    async def midstream_timeout(self, call: Call, watch: EventWatch, idle_ms: int | None) -> FeatherError:
        """The error of a stream whose next event did not come in time (see `EventWatch`)."""
        if watch.caller_bound:
            return DeadlineExceeded("the call's deadline ran out mid-stream")
        # No *event*: bytes may have kept coming (a line that never ends), so "no data" would mislead.
        stalled = ProviderError("UPSTREAM_IDLE_TIMEOUT", f"no stream event for {idle_ms} ms", retryable=True)
        return await self.midstream_failure(call, stalled)

    async def _acquire_circuit(self, key: str) -> Permit | None:
        try:
            permit = await self.circuits.acquire(key)
        except StateUnavailable as e:
            raise StateStoreUnavailable("the shared state store is unreachable") from e
        self.circuit_view[key] = (
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

    def _out_of_time(self, call: Call, what: str) -> DeadlineExceeded:
        """The answer deadline ran out: the caller's own, or the gateway's requestTimeoutMs (which says so)."""
        if not call.gateway_bound:
            return DeadlineExceeded(f"the call's deadline ran out {what}")
        ms = self._request_timeout_ms
        return DeadlineExceeded(f"the gateway's request timeout (requestTimeoutMs {ms}) ran out {what}", ms)

    def _note_failure(self, key: str, e: ProviderError) -> LastFailure:
        """Remembers a failure that counted against `key`'s circuit: what an open circuit, its error and
        ListModels name as the cause."""
        failure = LastFailure(e.reason, e.message, e.http_status, time.time())
        self.last_failures[key] = failure
        return failure

    async def midstream_failure(self, call: Call, e: ProviderError) -> FeatherError:
        cause = None
        if call.candidate is not None:
            await self._circuit_verdict(self.circuits.failed, call.candidate.key, Permit.CALL)
            cause = self._note_failure(call.candidate.key, e)
        # The attempt that answered, not the last one: a hedge's cancelled loser is listed after the winner.
        failed = call.answered or (call.attempts[-1] if call.attempts else None)
        if failed is not None:
            failed.outcome = "retryable_error" if e.retryable else "fatal_error"
            failed.error_reason = e.reason
            failed.error_detail = e.message
        message = f"the upstream stream failed after the first token: {e.message}"
        return UpstreamUnavailable(message, e.retry_after_s, e.reason, cause)

    def _abandoned(self, call: Call, candidate: RouteCandidate) -> None:
        """An attempt the upstream got and the gateway gave up on: it is billed for the prompt it sent (the
        counts the provider announced for it, when it did: Anthropic's message_start)."""
        prompt, call.prompt_usage = call.prompt_usage, None
        call.abandoned.append((candidate, prompt or Usage(input_tokens=estimate_prompt_tokens(call.request.messages))))

    def _attempt_started(self, call: Call, candidate: RouteCandidate) -> tuple[object, ...]:
        return tuple(
            o.attempt_started(call.request_id, candidate.provider, candidate.model.name, call.streamed)
            for o in self._observers
        )

    def _attempt_done(self, call: Call, tokens: tuple[object, ...], attempt: AttemptRecord) -> None:
        call.attempts.append(attempt)
        for observer, token in zip(self._observers, tokens, strict=False):
            observer.attempt_finished(token, attempt)


# How early a timer may fire and still count (uvloop's timers have millisecond resolution).
_EARLY_S = 0.001


class EventWatch:
    """The limit on a stream's wait for its next upstream event: the provider's idle timeout (from the
    moment the wait began) and the caller's deadline, whichever comes first.

    One timer per stream, pushed back lazily, instead of an `asyncio.timeout` per event (a timer armed and
    cancelled, a task and loop lookup, two coroutines: a few percent of a held stream's CPU). `next` only
    notes when its wait began; the timer, when it fires, sets itself again for the wait in progress if that
    one's limit is still ahead (or not at all between waits), so a stream with an event every 200 ms and a
    60 s idle timeout re-arms it about once a minute. Past the limit it cancels the waiting task, and `next`
    turns that into `TimeoutError`, as `asyncio.timeout` does (a cancellation from elsewhere stays one).
    The stream is read by one task (a gRPC call's handler is), the one that creates the watch.
    """

    __slots__ = ("_cancelling", "_deadline", "_expired", "_idle_s", "_loop", "_since", "_task", "_timer",
                 "_waiting", "caller_bound")  # fmt: skip

    def __init__(self, idle_ms: int | None, deadline: float | None) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._idle_s = None if idle_ms is None else idle_ms / 1000
        self._deadline = deadline  # loop time
        self._since = 0.0  # loop time the current (or last) wait began
        self._waiting = False
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False  # the timer cancelled the task: the wait raises TimeoutError
        self._cancelling = 0
        # Which limit ran out, decided when the timer fires, not by reading the clock later: the caller's
        # deadline must never count as the provider's failure (see Attempts._attempt_loop).
        self.caller_bound = False

    def _limit(self) -> tuple[float, bool]:
        """The current wait's limit, and whether it is the caller's deadline."""
        if self._idle_s is None:
            assert self._deadline is not None
            return self._deadline, True
        idle = self._since + self._idle_s
        if self._deadline is not None and self._deadline <= idle:
            return self._deadline, True
        return idle, False

    async def next(self, upstream: AsyncIterator[StreamEvent]) -> StreamEvent:
        """The next event of `upstream`; `TimeoutError` when it did not come within the limit."""
        self._since = self._loop.time()
        if self._timer is None:
            self._timer = self._loop.call_at(self._limit()[0], self._fire)
        self._cancelling = self._task.cancelling()
        self._waiting = True
        try:
            return await anext(upstream)
        except asyncio.CancelledError:
            if self._expired:
                self._expired = False
                if self._task.uncancel() <= self._cancelling:
                    raise TimeoutError from None
            raise
        finally:
            self._waiting = False
            if self._expired:  # the timer fired, but the wait ended otherwise (the cancellation was absorbed)
                self._expired = False
                self._task.uncancel()

    def _fire(self) -> None:
        self._timer = None
        if not self._waiting:
            return  # between two waits (the event is on its way to the caller): the next wait sets it
        limit, caller_bound = self._limit()
        if self._loop.time() + _EARLY_S < limit:
            self._timer = self._loop.call_at(limit, self._fire)
            return
        self._expired, self.caller_bound = True, caller_bound
        self._task.cancel()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def stream_failure(e: StopAsyncIteration | ProviderError) -> ProviderError:
    if isinstance(e, ProviderError):
        return e
    return ProviderError("UPSTREAM_STREAM_CUT", "upstream stream ended without a finish", retryable=True)


def _attempt(
    c: RouteCandidate, outcome: str, begun: float, reason: str = "", http_status: int = 0, detail: str = ""
) -> AttemptRecord:
    return AttemptRecord(c.provider, c.model.name, outcome, reason, ms_since(begun), http_status, detail)
