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
from typing import Any

from feather_grpc.config import GatewayConfig, TenantConfig
from feather_grpc.engine.errors import (
    BudgetExhausted,
    ModelNotAllowed,
    RateLimitExceeded,
    StateStoreUnavailable,
)
from feather_grpc.engine.routing import RouteCandidate
from feather_grpc.engine.tokens import estimate_prompt_tokens
from feather_grpc.engine.types import ChatRequest
from feather_grpc.state.limits import (
    BucketSpec,
    BudgetExceeded,
    BudgetStore,
    BudgetWindow,
    RateLimited,
    RateLimiter,
    Reservation,
    StateUnavailable,
)

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


class Admission:
    def __init__(
        self,
        config: GatewayConfig,
        limiter: RateLimiter,
        budgets: BudgetStore,
        *,
        loop_time: Callable[[], float],
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._limiter = limiter
        self._budgets = budgets
        self._queue = config.rate_limit_mode == "queue"
        self._loop_time = loop_time
        self._wall_clock = wall_clock
        self._provider_buckets = {k: BucketSpec(rate, burst) for k, (rate, burst) in config.provider_limits.items()}
        self._windows: dict[str, tuple[int, TenantConfig, tuple[BudgetWindow, ...]]] = {}

    @staticmethod
    def allowed(tenant: TenantConfig, requested: str, candidates: Sequence[RouteCandidate]) -> list[RouteCandidate]:
        """The candidates this tenant may use: a model is allowed by its name, an alias, or provider/name."""
        if tenant.allowed_models is None:
            return list(candidates)
        allow = tenant.allowed_models
        kept = [
            c
            for c in candidates
            if c.model.name in allow or f"{c.provider}/{c.model.name}" in allow or not allow.isdisjoint(c.model.aliases)
        ]
        if not kept:
            raise ModelNotAllowed(tenant.name, requested)
        return kept

    async def admit(
        self, tenant: TenantConfig, request: ChatRequest, candidates: Sequence[RouteCandidate], deadline: float | None
    ) -> Ticket:
        ticket = Ticket(tenant)
        if tenant.tpm is None and tenant.daily_budget_nanos is None and tenant.monthly_budget_nanos is None:
            return ticket  # nothing to reserve: the common case costs nothing
        output = request.max_tokens or DEFAULT_OUTPUT_RESERVATION
        prompt = estimate_prompt_tokens(request.messages)
        try:
            if tenant.tpm is not None:
                spec = BucketSpec(tenant.tpm / 60, tenant.tpm)
                amount = float(prompt + output)
                await self._reserve(f"tenant:{tenant.name}:tpm", spec, amount, deadline, "tokens per minute")
                ticket.tpm_reserved = amount
            windows = self.windows(tenant)
            if windows:
                worst = max((_cost(c, prompt, output) for c in candidates), default=0)
                try:
                    ticket.budget = await self._budgets.reserve(tenant.name, windows, worst)
                except BudgetExceeded as e:
                    raise BudgetExhausted(e.tenant, e.window, e.budget_nanos, e.spent_nanos) from None
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
        return _landed(pending)

    async def release(self, ticket: Ticket) -> None:
        """Gives back everything reserved for a call that never reached an upstream."""
        await self.settle(ticket, 0, 0)

    async def provider_slot(self, key: str, deadline: float | None) -> None:
        """Waits for (or refuses) a token of the provider:model bucket, if one is configured."""
        spec = self._provider_buckets.get(key)
        if spec is not None:
            await self._reserve(f"provider:{key}", spec, 1.0, deadline, f"{key} requests per second")

    async def _reserve(self, key: str, spec: BucketSpec, amount: float, deadline: float | None, what: str) -> None:
        max_wait = 0.0
        if self._queue:
            max_wait = MAX_QUEUE_WAIT_S if deadline is None else max(deadline - self._loop_time(), 0.0)
        try:
            wait = await self._limiter.reserve(key, spec, amount, max_wait)
        except RateLimited as e:
            # More than the whole bucket can never be granted: no point telling the caller when to retry.
            retry = None if math.isinf(e.retry_after_s) else e.retry_after_s
            raise RateLimitExceeded(key, what, retry) from None
        except StateUnavailable as e:
            raise StateStoreUnavailable("the shared state store is unreachable") from e
        if wait > 0:
            try:
                await asyncio.sleep(wait)
            except BaseException:
                # A waiter that gives up returns its place's tokens.
                await self._limiter.adjust(key, spec, -amount)
                raise

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


def _cost(candidate: RouteCandidate, prompt: int, output: int) -> int:
    price = candidate.model.price
    if price is None:
        return 0
    return -(-(prompt * price.input + output * price.output) // 1_000_000)  # round up: a worst case
