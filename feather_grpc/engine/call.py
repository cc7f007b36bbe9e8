"""A call as the engine's stages see it: what the transport says about it (`CallContext`) and what it
has done so far (`Call`), handed from plan to admit, attempt and settle."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from feather_grpc.config import TenantConfig
from feather_grpc.core.results import AttemptRecord, StreamCompleted, StreamStarted
from feather_grpc.core.types import ChatRequest, StreamEvent, TextDelta, ThinkingDelta, ToolCallDelta, Usage
from feather_grpc.engine.admission import Ticket
from feather_grpc.engine.routing import RouteCandidate
from feather_grpc.engine.validation import usable_request_id

StreamItem = StreamStarted | TextDelta | ToolCallDelta | ThinkingDelta | StreamCompleted
# A stream an attempt opened: the iterator, its first reply event, the prompt usage and reply id it announced.
Opened = tuple[AsyncIterator[StreamEvent], StreamEvent, Usage | None, str]


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


@dataclass(slots=True)
class Call:
    """A call in flight: what settle needs whichever way the call ends."""

    request: ChatRequest
    ctx: CallContext
    request_id: str
    started: float  # monotonic
    started_ns: int  # wall clock
    streamed: bool
    attempts: list[AttemptRecord] = field(default_factory=list)
    answered: AttemptRecord | None = None  # the attempt that answered (of `attempts`; a hedge: the winner's)
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


def begin(request: ChatRequest, ctx: CallContext, *, streamed: bool, request_timeout_ms: int) -> Call:
    limit = asyncio.get_running_loop().time() + request_timeout_ms / 1000
    gateway_bound = ctx.deadline is None or limit < ctx.deadline
    now_ns = time.time_ns()
    return Call(
        request=request,
        ctx=ctx,
        request_id=usable_request_id(request.request_id) or new_request_id(now_ns),
        started=time.monotonic(),
        started_ns=now_ns,
        streamed=streamed,
        answer_by=limit if gateway_bound else ctx.deadline,
        gateway_bound=gateway_bound,
    )


# RFC 9562's version (7) and variant (0b10) bits, in a UUID read as one 128-bit integer
_UUID7_BITS = 0x7 << 76 | 0x2 << 62
_UUID7_RANDOM = (1 << 80) - 1 & ~(0xF << 76 | 0x3 << 62)


def new_request_id(now_ns: int) -> str:
    """A request id the gateway makes: a UUIDv7 (RFC 9562) as 32 hex digits, 48 bits of Unix time in
    milliseconds and then 74 random bits.

    Time first, not 128 random bits: the ledgers keep each request's billed row unique with an index on
    (tenant, request_id), and a random id lands on a random leaf of it, so a commit of 64 records rewrote
    up to 64 leaf pages (bench/ledger_bench.py: 28.5 µs of CPU per record against 16 with these ids; bench/
    README "Request ids in time order"). An id made later sorts later; within a millisecond the order is
    random."""
    return f"{(now_ns // 1_000_000) << 80 | int.from_bytes(os.urandom(10)) & _UUID7_RANDOM | _UUID7_BITS:032x}"


def ms_since(begun: float) -> int:
    return int((time.monotonic() - begun) * 1000)


async def close_stream(it: AsyncIterator[StreamEvent]) -> None:
    aclose = getattr(it, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(Exception):
            await aclose()
