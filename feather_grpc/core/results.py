"""What the engine hands back to its callers: results, stream events and the attempt trail."""

from __future__ import annotations

from dataclasses import dataclass, field

from feather_grpc.core.types import FinishReason, ThinkingBlock, ToolCall, UpstreamReply, Usage


@dataclass(slots=True)
class AttemptRecord:
    provider: str
    model: str
    outcome: str  # "ok" | "retryable_error" | "fatal_error" | "cancelled" | "circuit_open"
    error_reason: str = ""
    duration_ms: int = 0
    http_status: int = 0
    error_detail: str = ""  # what went wrong, safe to show (ProviderError.message: no keys, no bodies)
    # The id the provider gave its reply (UpstreamReply.id: `chatcmpl-...`, `msg_...`), for correlating a
    # call with the provider's own logs; set on the attempt that answered, with its reply (a stream: as soon
    # as it says it, its first event, so a stream cut mid-way keeps it). Nothing else from the body is kept.
    upstream_response_id: str = ""


@dataclass(frozen=True, slots=True)
class LastFailure:
    """The most recent upstream failure of one provider:model that counted against its circuit (so what
    opened it, when it is open), as this process saw it."""

    reason: str  # e.g. UPSTREAM_CONNECT_ERROR, UPSTREAM_AUTH_FAILED
    message: str  # safe to show (ProviderError.message)
    http_status: int
    time_s: float  # wall clock, seconds since the epoch


@dataclass(slots=True)
class ChatResult:
    content: str
    tool_calls: list[ToolCall]
    finish_reason: FinishReason
    provider: str
    model: str
    usage: Usage
    cost_nanos_usd: int
    attempts: list[AttemptRecord]
    latency_ms: int
    request_id: str
    unpriced: bool = False
    cached: bool = False
    usage_estimated: bool = False
    thinking: list[ThinkingBlock] = field(default_factory=list)
    upstream: UpstreamReply = field(default_factory=UpstreamReply)


@dataclass(slots=True, frozen=True)
class StreamStarted:
    provider: str
    model: str
    request_id: str


@dataclass(slots=True)
class StreamCompleted:
    finish_reason: FinishReason
    usage: Usage
    cost_nanos_usd: int
    attempts: list[AttemptRecord] = field(default_factory=list)
    latency_ms: int = 0
    time_to_first_token_ms: int = 0
    usage_estimated: bool = False
    unpriced: bool = False
    cached: bool = False
    upstream: UpstreamReply = field(default_factory=UpstreamReply)
