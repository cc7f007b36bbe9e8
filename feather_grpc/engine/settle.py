"""Settle, the last stage of every call however it ends: price what it consumed, write its ledger record
(durable before the caller hears back), settle its limits and budget, then tell the observers."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace

from feather_grpc.config import TenantConfig
from feather_grpc.core.errors import FeatherError, LedgerUnavailable
from feather_grpc.core.ledger import LedgerWriteError, Outcome, UsageLedger, UsageRecord
from feather_grpc.core.limits import StateUnavailable
from feather_grpc.core.tokens import estimate_prompt_tokens, tokens_for_chars
from feather_grpc.core.types import ProviderResponse, Usage
from feather_grpc.engine.admission import Admission
from feather_grpc.engine.call import Call, ms_since
from feather_grpc.engine.ledger_guard import LedgerGuard
from feather_grpc.engine.observe import CallObserver
from feather_grpc.engine.routing import RouteCandidate
from feather_grpc.engine.validation import MAX_NAME_LENGTH, bounded_tags

log = logging.getLogger(__name__)


class Settlement:
    """Records and settles calls. `observers` is the engine's own list (observers added later are heard)."""

    def __init__(
        self,
        ledger: UsageLedger,
        ledger_guard: LedgerGuard,
        admission: Admission,
        observers: list[CallObserver],
        tenant_of: Callable[[Call], TenantConfig],
        send_now: Callable[[], None] | None = None,
    ) -> None:
        self.ledger = ledger
        self.ledger_guard = ledger_guard
        self._admission = admission
        self._observers = observers
        self._tenant_of = tenant_of
        self._send_now = send_now  # the shared store's: writes the decisions started so far at once
        self._background: set[asyncio.Task[None]] = set()

    async def settled(self) -> None:
        """Waits until the ledger writes of cancelled calls (which run on their own tasks) are done."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def record(
        self,
        call: Call,
        outcome: Outcome,
        usage: Usage,
        *,
        cost: int | None = None,
        error: FeatherError | None = None,
        estimated: bool = False,
    ) -> UsageRecord:
        c = call.candidate
        if cost is None:
            cost = price(c, usage)[0] if c is not None else 0
        for candidate, consumed in call.abandoned:  # what abandoned attempts cost the upstream's bill
            usage = plus(usage, consumed)
            cost += price(candidate, consumed)[0]
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
            audio_input_tokens=usage.audio_input_tokens,
            audio_output_tokens=usage.audio_output_tokens,
            cost_nanos_usd=cost,
            estimated=estimated,
            unpriced=c is not None and c.model.price is None,
            streamed=call.streamed,
            attempt_count=len(call.attempts),
            latency_ms=ms_since(call.started),
            tags=bounded_tags(call.request.tags),
        )

    async def settle(self, call: Call, record: UsageRecord) -> None:
        """Writes the call's ledger record (durable before the caller hears back) and settles its limits and
        budget, then tells observers."""
        settling = None
        if call.ticket is not None:  # sent to a shared store now: it lands while the ledger commits
            ticket, call.ticket = call.ticket, None
            settling = self._admission.settle(ticket, record.input_tokens + record.output_tokens, record.cost_nanos_usd)
            if self._send_now is not None:
                # Written now, not at the end of this turn, when the owner says so (assembly: for a lone
                # call, whose record is committed within the turn): the round trip overlaps the commit.
                self._send_now()
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
        for observer in self._observers:
            observer.call_settled(record, call.attempts, call.ttft_ms)

    async def settle_hedge_loser(self, loser: Call, reply: object) -> None:
        """Bills a losing hedge leg as its own ledger record (`<request id>:hedge`): its real usage when it
        finished, an estimate of the prompt for a stream it opened, and its abandoned attempts (the one the
        race cancelled included) as estimates."""
        leg = replace(loser, request_id=f"{loser.request_id}:hedge", attempts=[], ticket=None)
        usage, estimated = Usage(), False
        if isinstance(reply, ProviderResponse):
            usage, estimated = reply.usage, reply.usage_estimated
        elif isinstance(reply, tuple):  # a stream it opened: (iterator, first event, announced prompt usage, reply id)
            leg.prompt_usage = reply[2]
            usage, estimated = cancelled_usage(leg, 0), True
        record = self.record(leg, Outcome.CANCELLED, usage, estimated=estimated)
        await self.settle(leg, record)
        # The provider was paid for this leg too: it counts against the budget (admission reserved two legs).
        tenant = self._tenant_of(loser)
        try:
            await self._admission.charge(tenant, record.cost_nanos_usd)
        except StateUnavailable:
            log.warning("could not charge the losing hedge leg of %s: state store unreachable", loser.request_id)

    def settle_in_background(self, call: Call, outcome: Outcome, usage: Usage, *, estimated: bool) -> None:
        """Records a call that is being cancelled: the caller's task cannot await anymore, so the
        write runs on its own task, which settled() waits for."""
        record = self.record(call, outcome, usage, estimated=estimated)
        task = asyncio.get_running_loop().create_task(self.settle(call, record))
        self._background.add(task)
        task.add_done_callback(_log_failure_and_forget(self._background))


def cancelled_usage(call: Call, output_chars: int) -> Usage:
    """What a call consumed when the provider never said in full: the prompt's counts the provider
    announced (Anthropic's message_start), else an estimate, plus the output estimated from its length
    (`output_chars`: text, thinking and tool-call arguments); billed and marked as estimated."""
    if call.candidate is None:
        return Usage()
    output = tokens_for_chars(output_chars)
    if call.prompt_usage is not None:
        return replace(call.prompt_usage, output_tokens=output, reasoning_tokens=0)
    return Usage(input_tokens=estimate_prompt_tokens(call.request.messages), output_tokens=output)


def price(candidate: RouteCandidate | None, usage: Usage, tier: str = "") -> tuple[int, bool]:
    """The cost of `usage` on `candidate`, at the price of its prompt's length and of the service tier the
    upstream said it served (see ModelConfig.price_on), and whether it is unpriced (a model without a price)."""
    model_price = candidate.model.price_on(tier, usage.input_tokens) if candidate else None
    if model_price is None:
        return 0, candidate is not None
    return model_price.cost_nanos(usage), False


def plus(a: Usage, b: Usage) -> Usage:
    return Usage(
        a.input_tokens + b.input_tokens,
        a.output_tokens + b.output_tokens,
        a.cached_input_tokens + b.cached_input_tokens,
        a.cache_write_tokens + b.cache_write_tokens,
        a.reasoning_tokens + b.reasoning_tokens,
        a.web_search_requests + b.web_search_requests,
        a.cache_write_1h_tokens + b.cache_write_1h_tokens,
        a.audio_input_tokens + b.audio_input_tokens,
        a.audio_output_tokens + b.audio_output_tokens,
    )


def with_abandoned(usage: Usage, call: Call) -> Usage:
    """The usage a call bills: the answering attempt's plus the abandoned attempts' (as its ledger record)."""
    for _, consumed in call.abandoned:
        usage = plus(usage, consumed)
    return usage


def _log_failure_and_forget(tasks: set[asyncio.Task[None]]) -> Callable[[asyncio.Task[None]], None]:
    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        error = None if task.cancelled() else task.exception()
        if error is not None and not isinstance(error, LedgerUnavailable):  # that one is logged already
            log.error("could not record a cancelled call in the ledger", exc_info=error)

    return done
