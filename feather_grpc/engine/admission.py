"""Admission: may this tenant make this call now? Model allow-lists, tokens per minute, spend budgets,
and the per-provider:model token buckets checked before each attempt.

Admission reserves before the call and settles after it: a tokens-per-minute reservation of the prompt
estimate plus `max_tokens`, corrected to the real usage; a budget reservation of the worst-case cost,
replaced by the real cost. Concurrent calls can therefore never push spend past a cap.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from feather_grpc.config import GatewayConfig, ModelConfig, TenantConfig
from feather_grpc.core.errors import (
    BudgetExhausted,
    ModelNotAllowed,
    RateLimitExceeded,
    StateStoreUnavailable,
)
from feather_grpc.core.limits import (
    BucketSpec,
    BudgetExceeded,
    BudgetStore,
    BudgetWindow,
    RateLimited,
    RateLimiter,
    Reservation,
    StateUnavailable,
)
from feather_grpc.core.tokens import estimate_prompt_tokens
from feather_grpc.core.types import ChatRequest
from feather_grpc.engine.routing import RouteCandidate
from feather_grpc.providers.anthropic import thinking_budget

T = TypeVar("T")

# Without max_tokens the worst case is unbounded; reserve this much output and settle to the truth.
DEFAULT_OUTPUT_RESERVATION = 4096
# How long a queued caller without a deadline may wait for a rate-limit token.
MAX_QUEUE_WAIT_S = 30.0


@dataclass(slots=True)
class Ticket:
    """What admission reserved for one call; settle() turns it into the real charge."""

    tenant: TenantConfig
    tpm_reserved: float = 0.0
    budget: Reservation | None = None
    slot: str | None = None  # the first attempt's provider:model, whose token admission already asked for
    slot_refused: RateLimitExceeded | None = None  # ... and was refused


class Admission:
    def __init__(
        self,
        config: GatewayConfig,
        limiter: RateLimiter,
        budgets: BudgetStore,
        *,
        loop_time: Callable[[], float],
        wall_clock: Callable[[], float] = time.time,
        latency_ms: Callable[[str], float | None] = lambda key: None,
    ) -> None:
        self._limiter = limiter
        self._budgets = budgets
        self._queue = config.tenancy.rate_limit_mode == "queue"
        self._min_call_s = config.tenancy.queue_min_call_s
        self._latency_ms = latency_ms
        self._loop_time = loop_time
        self._wall_clock = wall_clock
        self._provider_buckets = {
            k: BucketSpec(rate, burst) for k, (rate, burst) in config.tenancy.provider_limits.items()
        }
        self._windows: dict[str, tuple[int, TenantConfig, tuple[BudgetWindow, ...]]] = {}

    @staticmethod
    def allowed(tenant: TenantConfig, requested: str, candidates: Sequence[RouteCandidate]) -> list[RouteCandidate]:
        """The candidates this tenant may use: a model is allowed by its name, an alias, or provider/name."""
        if tenant.allowed_models is None:
            return list(candidates)
        kept = [c for c in candidates if Admission.may_use(tenant, c.provider, c.model)]
        if not kept:
            raise ModelNotAllowed(tenant.name, requested)
        return kept

    @staticmethod
    def may_use(tenant: TenantConfig, provider: str, model: ModelConfig) -> bool:
        allow = tenant.allowed_models
        if allow is None:
            return True
        return model.name in allow or f"{provider}/{model.name}" in allow or not allow.isdisjoint(model.aliases)

    async def admit(
        self,
        tenant: TenantConfig,
        request: ChatRequest,
        candidates: Sequence[RouteCandidate],
        deadline: float | None,
        *,
        first_slot: str | None = None,
        request_token: Callable[[float | None], Awaitable[None]] | None = None,
        legs: int = 1,
    ) -> Ticket:
        """Reserves the tenant's tokens per minute and worst-case cost, and with `first_slot` the token of
        the first attempt's provider:model bucket too (`provider_slot` then finds it in the ticket). Every
        decision is started before any is awaited, so a shared store answers them in ONE round trip."""
        ticket = Ticket(tenant)
        slot_spec = self._provider_buckets.get(first_slot) if first_slot is not None else None
        budgeted = tenant.daily_budget_nanos is not None or tenant.monthly_budget_nanos is not None
        # A waiter is admitted only if its deadline leaves room for the call after the wait.
        max_wait = self._max_wait(deadline, candidates[0].key if candidates else None)
        if tenant.tpm is None and not budgeted and slot_spec is None:
            if request_token is not None:
                await request_token(max_wait)
            return ticket  # nothing to reserve: the common case costs nothing
        output = request.max_tokens or DEFAULT_OUTPUT_RESERVATION
        prompt = estimate_prompt_tokens(request.messages)
        started: list[tuple[str, Awaitable[Any]]] = []
        tpm_amount = float(prompt + output)
        if slot_spec is not None:
            slot_key = f"provider:{first_slot}"
            started.append(("slot", _start(lambda: self._limiter.reserve(slot_key, slot_spec, 1.0, max_wait))))
        if tenant.tpm is not None:
            tpm_key, tpm_spec = f"tenant:{tenant.name}:tpm", BucketSpec(tenant.tpm / 60, tenant.tpm)
            started.append(("tpm", _start(lambda: self._limiter.reserve(tpm_key, tpm_spec, tpm_amount, max_wait))))
        if budgeted:
            # `candidates` includes every model the call may reach (context-window fallbacks too); a hedged
            # call may pay for two legs.
            worst = legs * max((_cost(c, prompt, _output(request, c)) for c in candidates), default=0)
            windows = self.windows(tenant)
            started.append(("budget", _start(lambda: self._budgets.reserve(tenant.name, windows, worst))))
        if request_token is not None:  # the transport's request-rate verdict, judged with the rest
            started.insert(0, ("request", _start(lambda: request_token(max_wait))))
        failure: BaseException | None = None
        wait = 0.0
        for what, pending in started:  # await every one, so whatever was granted can be given back
            try:
                result = await pending
            except RateLimited as e:
                if what == "slot":
                    assert first_slot is not None
                    ticket.slot = first_slot
                    ticket.slot_refused = rate_limit_exceeded(
                        e, f"provider:{first_slot}", f"{first_slot} requests per second"
                    )
                else:
                    failure = failure or rate_limit_exceeded(e, f"tenant:{tenant.name}:tpm", "tokens per minute")
                continue
            except BudgetExceeded as e:
                failure = failure or BudgetExhausted(e.tenant, e.window, e.budget_nanos, e.spent_nanos)
                continue
            except StateUnavailable as e:
                failure = failure or StateStoreUnavailable("the shared state store is unreachable")
                failure.__cause__ = e
                continue
            except BaseException as e:  # cancelled: still collect the others' results
                failure = failure or e
                continue
            if what == "slot":
                ticket.slot, wait = first_slot, max(wait, result)
            elif what == "tpm":
                ticket.tpm_reserved, wait = tpm_amount, max(wait, result)
            elif what == "budget":
                ticket.budget = result
        try:
            if failure is not None:
                raise failure
            if wait > 0:
                await asyncio.sleep(wait)  # the queue: tokens reserved for a moment from now
        except BaseException:
            await self.release(ticket)
            raise
        return ticket

    def settle(self, ticket: Ticket, tokens: int, cost_nanos: int) -> Coroutine[Any, Any, None]:
        """Charges the real usage: tokens against the TPM bucket, cost against the budgets. A shared store
        gets the updates at once (in one round trip); the returned coroutine waits until they landed,
        so a caller can do other work meanwhile. Always await it."""
        pending: list[Awaitable[None]] = []
        if ticket.tpm_reserved:
            t = ticket.tenant
            assert t.tpm is not None
            delta = tokens - ticket.tpm_reserved
            if delta:
                pending.append(self._limiter.adjust(f"tenant:{t.name}:tpm", BucketSpec(t.tpm / 60, t.tpm), delta))
            ticket.tpm_reserved = 0.0
        if ticket.budget is not None:
            reservation, ticket.budget = ticket.budget, None
            pending.append(self._budgets.settle(reservation, cost_nanos))
        if ticket.slot is not None:  # taken by admission, never used: give it back
            key, refused = ticket.slot, ticket.slot_refused
            ticket.slot = ticket.slot_refused = None
            if refused is None:
                pending.append(self._limiter.adjust(f"provider:{key}", self._provider_buckets[key], -1.0))
        return _landed(pending)

    async def charge(self, tenant: TenantConfig, cost_nanos: int) -> None:
        """Adds spend no reservation covered (a hedged call's losing leg) to the tenant's budgets."""
        if cost_nanos and (tenant.daily_budget_nanos is not None or tenant.monthly_budget_nanos is not None):
            await self._budgets.settle(Reservation(tenant.name, self.windows(tenant), 0), cost_nanos)

    async def release(self, ticket: Ticket) -> None:
        """Gives back everything reserved for a call that never reached an upstream."""
        await self.settle(ticket, 0, 0)

    async def provider_slot(self, key: str, deadline: float | None, ticket: Ticket | None = None) -> None:
        """Waits for (or refuses) a token of the provider:model bucket, if one is configured; the first
        attempt's token was asked for by admission and is in the ticket."""
        if ticket is not None and ticket.slot == key:
            refused, ticket.slot, ticket.slot_refused = ticket.slot_refused, None, None
            if refused is not None:
                raise refused
            return
        spec = self._provider_buckets.get(key)
        if spec is None:
            return
        bucket = f"provider:{key}"
        try:
            wait = await self._limiter.reserve(bucket, spec, 1.0, self._max_wait(deadline, key))
        except RateLimited as e:
            raise rate_limit_exceeded(e, bucket, f"{key} requests per second") from None
        except StateUnavailable as e:
            raise StateStoreUnavailable("the shared state store is unreachable") from e
        await queue_wait(self._limiter, bucket, spec, 1.0, wait)

    def _max_wait(self, deadline: float | None, key: str | None) -> float:
        """How long a caller may queue for a token: not at all in reject mode, else as long as its deadline
        still leaves room for the call afterwards: the route's observed latency, at least `queueMinCallMs`
        (a waiter that would reach the upstream only to be cut off wastes a paid call)."""
        if not self._queue:
            return 0.0
        if deadline is None:
            return MAX_QUEUE_WAIT_S
        observed = self._latency_ms(key) if key is not None else None
        room = max(self._min_call_s, (observed or 0.0) / 1000)
        return max(deadline - self._loop_time() - room, 0.0)

    def windows(self, tenant: TenantConfig) -> tuple[BudgetWindow, ...]:
        """The tenant's budget windows as of now (UTC day and month), built once per tenant and day."""
        day = int(self._wall_clock() // 86_400)
        cached = self._windows.get(tenant.name)
        if cached is not None and cached[0] == day and cached[1] is tenant:
            return cached[2]
        now = dt.datetime.fromtimestamp(day * 86_400, dt.UTC)
        windows = []
        if tenant.daily_budget_nanos is not None:
            windows.append(BudgetWindow("day", now.strftime("%Y-%m-%d"), tenant.daily_budget_nanos, 2 * 86_400))
        if tenant.monthly_budget_nanos is not None:
            windows.append(BudgetWindow("month", now.strftime("%Y-%m"), tenant.monthly_budget_nanos, 32 * 86_400))
        self._windows[tenant.name] = (day, tenant, tuple(windows))
        return tuple(windows)


def _start(decision: Callable[[], Awaitable[T]]) -> Awaitable[T]:
    """Starts a decision; one that fails at once (bad arguments) fails when awaited, like the others."""
    try:
        return decision()
    except Exception as e:
        return _raise(e)


async def _raise(e: Exception) -> NoReturn:
    raise e


def rate_limit_exceeded(e: RateLimited, key: str, what: str) -> RateLimitExceeded:
    # More than the whole bucket can never be granted: no point telling the caller when to retry.
    return RateLimitExceeded(key, what, None if math.isinf(e.retry_after_s) else e.retry_after_s)


async def queue_wait(limiter: RateLimiter, key: str, spec: BucketSpec, amount: float, wait: float) -> None:
    """Waits out a reserved token's place in the queue; a waiter that gives up returns its tokens."""
    if wait > 0:
        try:
            await asyncio.sleep(wait)
        except BaseException:
            await limiter.adjust(key, spec, -amount)
            raise


async def _landed(pending: list[Awaitable[None]]) -> None:
    """Awaits every update (none is left un-awaited), then reports the first store failure."""
    failure: StateUnavailable | None = None
    for update in pending:
        try:
            await update
        except StateUnavailable as e:
            failure = failure or e
    if failure is not None:
        raise StateStoreUnavailable("the shared state store is unreachable") from failure


def _output(request: ChatRequest, candidate: RouteCandidate) -> int:
    """The most output a call to `candidate` may bill: the caller's max_tokens, else the model's configured
    longest reply, else the default reservation with the thinking budget on top: what Anthropic and Bedrock
    are sent as their required max_tokens (thinking is output, and a budget may be far above the default)."""
    fallback = DEFAULT_OUTPUT_RESERVATION + (thinking_budget(request) or 0)
    return request.max_tokens or candidate.model.max_output_tokens or fallback


def _cost(candidate: RouteCandidate, prompt: int, output: int) -> int:
    """The worst case on any of the model's prices: which service tier serves a call is known only from its
    reply (a request may ask for one in extra_fields, a project may default to one). Past a long-context
    threshold, that price (for an estimate near it, settlement corrects either way)."""
    model = candidate.model
    if model.price is None:
        return 0
    price = model.price
    if model.long_context is not None and prompt > model.long_context[0]:
        price = model.long_context[1]
    for _, tier in model.tier_prices:
        if tier.input * prompt + tier.output * output > price.input * prompt + price.output * output:
            price = tier
    return -(-(prompt * price.input + output * price.output) // 1_000_000)  # round up: a worst case
