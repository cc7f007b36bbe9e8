"""What the facade hands back (ChatResult, TokenUsage), and the message helpers."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from decimal import Decimal
from typing import Any

from .gen.feather.v1 import feather_service_pb2 as pb

__all__ = [
    "ChatResult",
    "TokenUsage",
    "assistant",
    "format_usd",
    "system",
    "tool_result",
    "usd",
    "user",
]

_NANOS_PER_USD = 1_000_000_000
GROUP_BY = {"tenant", "provider", "model", "tag", "hour", "day"}
POLICIES = {"first", "round_robin", "cheapest", "fastest", "weighted"}


Content = str | pb.Part


def _content(role: pb.Role.ValueType, content: tuple[Content, ...], **fields: Any) -> pb.Message:
    """One string is `content`; anything else is ordered parts (a string among them is a text part)."""
    if len(content) == 1 and isinstance(content[0], str):
        return pb.Message(role=role, content=content[0], **fields)
    parts = [pb.Part(text=c) if isinstance(c, str) else c for c in content]
    return pb.Message(role=role, parts=parts, **fields)


def system(*content: Content) -> pb.Message:
    """A system message: one text, or text parts."""
    return _content(pb.ROLE_SYSTEM, content)


def user(*content: Content) -> pb.Message:
    """A user message: one text, or parts (`user("Describe this", image(data, "image/png"))`)."""
    return _content(pb.ROLE_USER, content)


def assistant(text: str, tool_calls: Sequence[pb.ToolCall] = ()) -> pb.Message:
    return pb.Message(role=pb.ROLE_ASSISTANT, content=text, tool_calls=tool_calls)


def tool_result(tool_call_id: str, *content: Content, is_error: bool = False) -> pb.Message:
    """A tool's answer to the call `tool_call_id`: text, or parts (images and documents: Anthropic only);
    `is_error` when the tool failed and the content says how."""
    return _content(pb.ROLE_TOOL, content, tool_call_id=tool_call_id, is_error=is_error)


def usd(nanos: int) -> Decimal:
    """Nano-dollars as an exact Decimal of US dollars."""
    return Decimal(nanos).scaleb(-9)


def format_usd(nanos: int) -> str:
    """Exact, without float: `$0.000001234`, `$1.50`, `$0.00`."""
    sign = "-" if nanos < 0 else ""
    dollars, fraction = divmod(abs(nanos), _NANOS_PER_USD)
    digits = f"{fraction:09d}".rstrip("0").ljust(2, "0")
    return f"{sign}${dollars}.{digits}"


def short_name(enum_name: str, prefix: str) -> str:
    """`FINISH_REASON_TOOL_CALLS` -> `tool_calls`."""
    return enum_name.removeprefix(prefix).lower()


@dataclass(frozen=True)
class TokenUsage:
    """Tokens of one call, normalised across providers (cached and cache-write tokens are part of input)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    web_search_requests: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    @classmethod
    def from_proto(cls, usage: pb.TokenUsage) -> TokenUsage:
        return cls(
            usage.input_tokens,
            usage.output_tokens,
            usage.cached_input_tokens,
            usage.cache_write_tokens,
            usage.reasoning_tokens,
            usage.web_search_requests,
        )


@dataclass(frozen=True)
class Thinking:
    """A block of the model's thinking. Send a reply back with `assistant_turn(result)` to keep it."""

    text: str = ""
    signature: str = ""
    redacted_data: str = ""

    @classmethod
    def from_proto(cls, block: pb.ThinkingBlock) -> Thinking:
        return cls(block.text, block.signature, block.redacted_data)

    def to_proto(self) -> pb.ThinkingBlock:
        return pb.ThinkingBlock(text=self.text, signature=self.signature, redacted_data=self.redacted_data)


@dataclass(frozen=True)
class ChatResult:
    """A complete reply, from `chat()` or from a finished `stream_chat()`."""

    text: str
    finish_reason: str
    """`stop`, `length`, `tool_calls`, `content_filter` or `unspecified`."""
    provider: str
    model: str
    """The configured model that answered (what an alias resolved to)."""
    usage: TokenUsage
    cost_nanos_usd: int
    latency: timedelta
    request_id: str
    tool_calls: tuple[pb.ToolCall, ...] = ()
    cached: bool = False
    unpriced: bool = False
    usage_estimated: bool = False
    time_to_first_token: timedelta | None = None
    attempts: tuple[pb.Attempt, ...] = field(default=(), repr=False)
    thinking: tuple[Thinking, ...] = ()
    """The model's thinking, apart from `text` (Anthropic blocks keep their signatures)."""
    upstream: pb.UpstreamReply = field(default_factory=pb.UpstreamReply, repr=False)
    """What the provider said about its reply: id, model snapshot, system_fingerprint, service tier,
    matched stop sequence, refusal."""

    def assistant_turn(self) -> pb.Message:
        """The reply as the assistant message of the next turn: text, tool calls and thinking, unchanged."""
        return pb.Message(
            role=pb.ROLE_ASSISTANT,
            content=self.text,
            tool_calls=self.tool_calls,
            thinking=[t.to_proto() for t in self.thinking],
        )

    @property
    def cost_usd(self) -> Decimal:
        return usd(self.cost_nanos_usd)

    @classmethod
    def from_proto(cls, reply: pb.ChatResponse) -> ChatResult:
        return cls(
            text=reply.message.content,
            finish_reason=short_name(pb.FinishReason.Name(reply.finish_reason), "FINISH_REASON_"),
            provider=reply.provider,
            model=reply.model,
            usage=TokenUsage.from_proto(reply.usage),
            cost_nanos_usd=reply.cost_nanos_usd,
            latency=timedelta(milliseconds=reply.latency_ms),
            request_id=reply.request_id,
            tool_calls=tuple(reply.message.tool_calls),
            cached=reply.cached,
            unpriced=reply.unpriced,
            usage_estimated=reply.usage_estimated,
            attempts=tuple(reply.attempts),
            thinking=tuple(Thinking.from_proto(t) for t in reply.message.thinking),
            upstream=reply.upstream,
        )


class StreamAssembler:
    """Folds StreamChatResponse events into text deltas and, at `end`, a ChatResult (shared by both streams)."""

    def __init__(self) -> None:
        self.start: pb.StreamStart | None = None
        self.end: pb.StreamEnd | None = None
        self.text: list[str] = []
        self.tool_calls: dict[int, pb.ToolCall] = {}
        self.thinking: dict[int, pb.ThinkingBlock] = {}
        self._result: ChatResult | None = None

    def feed(self, event: pb.StreamChatResponse) -> str | None:
        """The text to hand to the caller, if the event carries any."""
        kind = event.WhichOneof("event")
        if kind == "start":
            self.start = event.start
        elif kind == "end":
            self.end = event.end
        elif kind == "delta":
            for fragment in event.delta.tool_calls:
                call = self.tool_calls.setdefault(fragment.index, pb.ToolCall())
                call.id = call.id or fragment.id
                call.name = call.name or fragment.name
                call.arguments += fragment.arguments
            for piece in event.delta.thinking:
                block = self.thinking.setdefault(piece.index, pb.ThinkingBlock())
                block.text += piece.text
                block.signature += piece.signature
                block.redacted_data += piece.redacted_data
            if event.delta.content:
                self.text.append(event.delta.content)
                return event.delta.content
        return None

    def result(self) -> ChatResult:
        if self.end is None:
            raise RuntimeError("the stream has not ended: iterate it to the end first")
        if self._result is None:
            self._result = self._build(self.end)
        return self._result

    def _build(self, end: pb.StreamEnd) -> ChatResult:
        start = self.start or pb.StreamStart()
        return ChatResult(
            text="".join(self.text),
            finish_reason=short_name(pb.FinishReason.Name(end.finish_reason), "FINISH_REASON_"),
            provider=start.provider,
            model=start.model,
            usage=TokenUsage.from_proto(end.usage),
            cost_nanos_usd=end.cost_nanos_usd,
            latency=timedelta(milliseconds=end.latency_ms),
            request_id=start.request_id,
            tool_calls=tuple(self.tool_calls[i] for i in sorted(self.tool_calls)),
            cached=end.cached,
            unpriced=end.unpriced,
            usage_estimated=end.usage_estimated,
            time_to_first_token=timedelta(milliseconds=end.time_to_first_token_ms),
            attempts=tuple(end.attempts),
            thinking=tuple(Thinking.from_proto(self.thinking[i]) for i in sorted(self.thinking)),
            upstream=end.upstream,
        )
