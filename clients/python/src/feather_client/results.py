"""What the facade hands back (ChatResult, TokenUsage), and the message helpers."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping, Sequence
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
    "message",
    "system",
    "tool",
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


# A message or a tool as OpenAI's Chat Completions API writes it: {"role": "user", "content": "..."}.
MessageLike = pb.Message | Mapping[str, Any]
ToolLike = pb.Tool | Mapping[str, Any]

_ROLES = {
    "system": pb.ROLE_SYSTEM,
    "developer": pb.ROLE_SYSTEM,  # OpenAI's newer name for the system turn
    "user": pb.ROLE_USER,
    "assistant": pb.ROLE_ASSISTANT,
    "tool": pb.ROLE_TOOL,
}
_MESSAGE_KEYS = {"role", "content", "name", "tool_call_id", "tool_calls"}


def _text(value: Any, where: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"{where}: must be a string, got {type(value).__name__}")
    return value


def _arguments(value: Any) -> str:
    """Tool-call arguments are JSON text on the wire; a dict is encoded for the caller."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _tool_call(call: pb.ToolCall | Mapping[str, Any], where: str) -> pb.ToolCall:
    """OpenAI's {"id", "type": "function", "function": {"name", "arguments"}} (or the flat id/name/arguments)."""
    if isinstance(call, pb.ToolCall):
        return call
    if not isinstance(call, Mapping):
        raise ValueError(f"{where}: a tool call is a mapping like OpenAI's, got {type(call).__name__}")
    function = call.get("function", call)
    if not isinstance(function, Mapping):
        raise ValueError(f"{where}.function: must be a mapping with name and arguments")
    return pb.ToolCall(
        id=_text(call.get("id"), f"{where}.id"),
        name=_text(function.get("name"), f"{where}.function.name"),
        arguments=_arguments(function.get("arguments")),
    )


_IMAGE_DETAILS = {"auto": pb.IMAGE_DETAIL_AUTO, "low": pb.IMAGE_DETAIL_LOW, "high": pb.IMAGE_DETAIL_HIGH}
_PART_TYPES = ("text", "image_url", "input_audio", "file")


def _base64(value: Any, where: str) -> bytes:
    if not isinstance(value, str):
        raise ValueError(f"{where}: must be base64 text, got {type(value).__name__}")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError(f"{where}: not valid base64") from None


def _data_url(url: str, where: str) -> tuple[str, bytes]:
    """`data:<media type>;base64,<data>` as (media type, bytes)."""
    header, comma, data = url.partition(",")
    if not comma or not header.endswith(";base64"):
        raise ValueError(f"{where}: a data URL must be data:<media type>;base64,<data>")
    return header.removeprefix("data:").removesuffix(";base64"), _base64(data, where)


def _mapping(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: must be a mapping, got {type(value).__name__}")
    return value


def _part(value: Any, where: str) -> pb.Part:
    """A pb.Part from itself, a string, or one of OpenAI's content parts: text, image_url (an http(s) URL or a
    data: URL), input_audio, or file (inline file_data; uploaded file_id has no equivalent here)."""
    if isinstance(value, pb.Part):
        return value
    if isinstance(value, str):
        return pb.Part(text=value)
    kind = _mapping(value, where).get("type")
    if kind == "text":
        return pb.Part(text=_text(value.get("text"), f"{where}.text"))
    if kind == "image_url":
        image = value.get("image_url")
        image = {"url": image} if isinstance(image, str) else _mapping(image, f"{where}.image_url")
        url = _text(image.get("url"), f"{where}.image_url.url")
        detail = image.get("detail") or ""
        if detail and detail not in _IMAGE_DETAILS:
            raise ValueError(f"{where}.image_url.detail: {detail!r} is not one of {', '.join(_IMAGE_DETAILS)}")
        out = pb.ImagePart(detail=_IMAGE_DETAILS.get(detail, pb.IMAGE_DETAIL_UNSPECIFIED))
        if url.startswith("data:"):
            out.media_type, out.data = _data_url(url, f"{where}.image_url.url")
        else:
            out.url = url
        return pb.Part(image=out)
    if kind == "input_audio":
        audio = _mapping(value.get("input_audio"), f"{where}.input_audio")
        data = _base64(audio.get("data"), f"{where}.input_audio.data")
        return pb.Part(audio=pb.AudioPart(data=data, format=_text(audio.get("format"), f"{where}.input_audio.format")))
    if kind == "file":
        file = _mapping(value.get("file"), f"{where}.file")
        if file.get("file_id") is not None:
            raise ValueError(f"{where}.file.file_id: uploaded files are not supported; send file_data (a data: URL)")
        file_data = _text(file.get("file_data"), f"{where}.file.file_data")
        media_type, data = (
            _data_url(file_data, f"{where}.file.file_data")
            if file_data.startswith("data:")
            else ("application/pdf", _base64(file_data, f"{where}.file.file_data"))
        )
        title = _text(file.get("filename"), f"{where}.file.filename")
        return pb.Part(document=pb.DocumentPart(data=data, media_type=media_type, title=title))
    raise ValueError(f"{where}.type: {kind!r} is not one of {', '.join(_PART_TYPES)}")


def _parts(content: Sequence[Any], where: str) -> list[pb.Part]:
    return [_part(p, f"{where}[{i}]") for i, p in enumerate(content)]


def message(value: MessageLike, where: str = "message") -> pb.Message:
    """A pb.Message from itself or from an OpenAI-style mapping: lowercase roles (`developer` is system),
    `content` as text or as OpenAI's content parts (None for an assistant turn that only calls tools), `name`,
    `tool_call_id` and `tool_calls`."""
    if isinstance(value, pb.Message):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: a message is a mapping like {{'role': 'user', 'content': '...'}} or a pb.Message")
    unknown = sorted(str(k) for k, v in value.items() if k not in _MESSAGE_KEYS and v is not None)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(_MESSAGE_KEYS))})")
    role = value.get("role")
    if not isinstance(role, str) or role.lower().removeprefix("role_") not in _ROLES:
        raise ValueError(f"{where}.role: {role!r} is not one of {', '.join(_ROLES)}")
    content = value.get("content")
    if content is not None and not isinstance(content, str | list | tuple):
        raise ValueError(f"{where}.content: must be a string or a list of parts, got {type(content).__name__}")
    calls = value.get("tool_calls") or ()
    return pb.Message(
        role=_ROLES[role.lower().removeprefix("role_")],
        content=content if isinstance(content, str) else "",
        parts=[] if content is None or isinstance(content, str) else _parts(content, f"{where}.content"),
        name=_text(value.get("name"), f"{where}.name"),
        tool_call_id=_text(value.get("tool_call_id"), f"{where}.tool_call_id"),
        tool_calls=[_tool_call(c, f"{where}.tool_calls[{i}]") for i, c in enumerate(calls)],
    )


def tool(value: ToolLike, where: str = "tool") -> pb.Tool:
    """A pb.Tool from itself or from OpenAI's {"type": "function", "function": {"name", "description",
    "parameters"}} (or the flat name/description/parameters)."""
    if isinstance(value, pb.Tool):
        return value
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: a tool is a mapping like OpenAI's or a pb.Tool, got {type(value).__name__}")
    function = value.get("function", value)
    if not isinstance(function, Mapping):
        raise ValueError(f"{where}.function: must be a mapping with name, description and parameters")
    out = pb.Tool(
        name=_text(function.get("name"), f"{where}.function.name"),
        description=_text(function.get("description"), f"{where}.function.description"),
    )
    parameters = function.get("parameters")
    if parameters is not None:
        if not isinstance(parameters, Mapping):
            raise ValueError(f"{where}.function.parameters: must be a JSON schema object (a mapping)")
        out.parameters.update(parameters)
    return out


ToolChoiceLike = pb.ToolChoice | str | Mapping[str, Any]
_TOOL_CHOICE_MODES = {
    "auto": pb.TOOL_CHOICE_MODE_AUTO,
    "none": pb.TOOL_CHOICE_MODE_NONE,
    "required": pb.TOOL_CHOICE_MODE_REQUIRED,
}


def _tool_choice(value: ToolChoiceLike) -> pb.ToolChoice:
    """A pb.ToolChoice from itself or from OpenAI's `"auto"`, `"none"`, `"required"` or
    `{"type": "function", "function": {"name": ...}}`."""
    if isinstance(value, pb.ToolChoice):
        return value
    if isinstance(value, str):
        if value not in _TOOL_CHOICE_MODES:
            raise ValueError(f"tool_choice: {value!r} is not one of {', '.join(_TOOL_CHOICE_MODES)} or a function")
        return pb.ToolChoice(mode=_TOOL_CHOICE_MODES[value])
    function = value.get("function") if isinstance(value, Mapping) else None
    if not isinstance(function, Mapping) or not isinstance(function.get("name"), str):
        raise ValueError('tool_choice: a function choice is {"type": "function", "function": {"name": ...}}')
    return pb.ToolChoice(function_name=function["name"])


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
