"""Plain data types of a chat call as the engine sees it: no gRPC, no provider wire formats."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class FinishReason(StrEnum):
    UNSPECIFIED = "unspecified"
    STOP = "stop"
    LENGTH = "length"
    TOOL_CALLS = "tool_calls"
    CONTENT_FILTER = "content_filter"


@dataclass(slots=True, frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, exactly as the model produced it


class PartKind(StrEnum):
    TEXT = "text"
    IMAGE = "image"
    DOCUMENT = "document"
    AUDIO = "audio"


@dataclass(slots=True, frozen=True)
class Part:
    """One piece of a message's content. Images and documents come by `url` or inline `data`."""

    kind: PartKind
    text: str = ""
    url: str = ""
    data: bytes = b""
    media_type: str = ""  # images and documents; audio: its format ("wav", "mp3")
    title: str = ""  # documents
    detail: str = ""  # images: OpenAI's "auto" | "low" | "high"; "" for the default
    cache_ttl: str | None = None  # a prompt-cache breakpoint after this part: "5m", "1h", "" (default TTL)


@dataclass(slots=True, frozen=True)
class ThinkingBlock:
    """A block of the model's thinking. `signature` and `redacted_data` are opaque: sent back unchanged."""

    text: str = ""
    signature: str = ""
    redacted_data: str = ""  # an Anthropic redacted_thinking block (text is then empty)


@dataclass(slots=True, frozen=True)
class Message:
    role: Role
    content: str = ""
    name: str = ""
    tool_call_id: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    is_error: bool = False  # a tool result that reports the tool's failure
    parts: tuple[Part, ...] = ()  # the content as ordered parts; `content` is then empty
    cache_ttl: str | None = None  # a prompt-cache breakpoint after this message (see Part.cache_ttl)
    thinking: tuple[ThinkingBlock, ...] = ()  # assistant messages: the thinking a reply carried

    @property
    def text(self) -> str:
        """The message's text: `content`, or its text parts joined."""
        if not self.parts:
            return self.content
        return "".join(p.text for p in self.parts if p.kind is PartKind.TEXT)


@dataclass(slots=True, frozen=True)
class ToolSpec:
    name: str
    description: str = ""
    parameters: dict[str, Any] | None = None  # JSON schema
    strict: bool = False  # the provider enforces `parameters` exactly
    cache_ttl: str | None = None  # a prompt-cache breakpoint after this tool (see Part.cache_ttl)


@dataclass(slots=True, frozen=True)
class ToolChoice:
    mode: str = ""  # "", "auto", "none", "required"
    function_name: str = ""  # when set, the model must call this function


@dataclass(slots=True, frozen=True)
class ResponseFormat:
    type: str = ""  # "", "text", "json_object", "json_schema"
    schema_name: str = ""
    json_schema: dict[str, Any] | None = None
    strict: bool = False


@dataclass(slots=True, frozen=True)
class RetryOverride:
    max_attempts: int | None = None
    base_ms: int | None = None
    max_ms: int | None = None


@dataclass(slots=True)
class ChatRequest:
    """A validated chat call. `model` is what the caller asked for (name, alias or provider/model)."""

    model: str
    messages: list[Message]
    provider: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    response_format: ResponseFormat | None = None
    tools: list[ToolSpec] = field(default_factory=list)
    tool_choice: ToolChoice | None = None
    policy: str = ""  # "" means configured policy
    retry: RetryOverride | None = None
    cache_bypass: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    request_id: str = ""
    parallel_tool_calls: bool | None = None  # None: the provider's default
    prompt_cache_key: str = ""  # OpenAI's prompt cache routing key
    reasoning_effort: str = ""  # "", "none", "minimal", "low", "medium", "high", "xhigh"
    thinking_budget: int | None = None  # Anthropic extended thinking's budget_tokens
    extra_fields: dict[str, Any] | None = None  # merged into the upstream body (never the gateway's own fields)


@dataclass(slots=True)
class Usage:
    """Token counts normalised across providers.

    `input_tokens` counts every prompt token, including cache reads and cache writes (OpenAI's
    `prompt_tokens` semantics); Anthropic's adapter adds its separately reported cache counts in.
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    web_search_requests: int = 0  # server-side tool use the provider bills per request (Anthropic web search)
    cache_write_1h_tokens: int = 0  # of cache_write_tokens, those written with a 1-hour TTL
    audio_input_tokens: int = 0  # of input_tokens not read from a cache, those of audio (priced apart)
    audio_output_tokens: int = 0  # of output_tokens, those of audio


@dataclass(slots=True)
class UpstreamReply:
    """What the provider said about its reply, as it said it ("" where it said nothing)."""

    id: str = ""
    model: str = ""  # the exact snapshot that answered
    system_fingerprint: str = ""
    service_tier: str = ""
    stop_sequence: str = ""  # the stop sequence that matched
    refusal: str = ""  # the model's refusal, apart from the text


@dataclass(slots=True)
class ProviderResponse:
    """A complete reply from one upstream call."""

    content: str
    tool_calls: list[ToolCall]
    finish_reason: FinishReason
    usage: Usage
    usage_estimated: bool = False  # the upstream sent no usage: the adapter estimated it
    thinking: list[ThinkingBlock] = field(default_factory=list)
    upstream: UpstreamReply = field(default_factory=UpstreamReply)


@dataclass(slots=True, frozen=True)
class TextDelta:
    content: str


@dataclass(slots=True, frozen=True)
class ToolCallDelta:
    index: int
    id: str = ""
    name: str = ""
    arguments: str = ""


@dataclass(slots=True, frozen=True)
class ThinkingDelta:
    """A fragment of thinking block `index`: text to append, or its signature or redacted data, whole."""

    index: int
    text: str = ""
    signature: str = ""
    redacted_data: str = ""


@dataclass(slots=True, frozen=True)
class StreamFinish:
    """Last event of a provider stream. `usage` is None when the provider never reported it."""

    finish_reason: FinishReason
    usage: Usage | None
    upstream: UpstreamReply = field(default_factory=UpstreamReply)


@dataclass(slots=True, frozen=True)
class PromptUsage:
    """What a provider announced about the prompt before the reply (Anthropic's `message_start`): exact
    input-side counts the engine bills if the stream ends before the final usage. Never sent to callers."""

    usage: Usage


@dataclass(slots=True, frozen=True)
class ReplyId:
    """The provider's own id of the reply, as soon as the stream says it (OpenAI's first chunk, Anthropic's
    `message_start`): the engine records it on the attempt, so a stream cut mid-way still names its reply.
    Never sent to callers (the stream's end carries it in `StreamFinish.upstream`)."""

    id: str


StreamEvent = TextDelta | ToolCallDelta | ThinkingDelta | PromptUsage | ReplyId | StreamFinish


# Upstream body fields the gateway owns, in each API it speaks (a dot is a field inside an object): the model
# and the streaming it routes, the conversation it validates and counts, and the output limit budgets reserve
# on, with the count of candidates that multiplies it. Neither extra_fields nor a provider's defaultFields may
# set them. The same body goes to whichever provider a call is routed to, so every API's are owned for all.
GATEWAY_OWNED_FIELDS = frozenset(
    {
        # OpenAI Chat Completions (and Azure, OpenAI-compatible servers)
        *("model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens", "n"),
        "system",  # Anthropic (and Claude on Vertex), and Bedrock Converse
        # OpenAI Responses; `background` would leave the gateway a queued reply to bill while the upstream works
        *("input", "instructions", "max_output_tokens", "background"),
        # Gemini and Vertex, whose JSON takes a field's proto name (snake_case) as well as its camelCase one
        *("contents", "systemInstruction", "system_instruction"),
        *(
            f"{config}.{field}"
            for config in ("generationConfig", "generation_config")
            for field in ("maxOutputTokens", "max_output_tokens", "candidateCount", "candidate_count")
        ),
        "inferenceConfig.maxTokens",  # Bedrock Converse
    }
)


def owned_fields(fields: Mapping[str, Any]) -> list[str]:
    """The fields of `fields` (a request's extra_fields, a provider's defaultFields) the gateway owns, sorted,
    named by their dotted paths."""
    found = []
    for path in GATEWAY_OWNED_FIELDS:
        outer, _, inner = path.partition(".")
        if outer in fields and (not inner or (isinstance(fields[outer], Mapping) and inner in fields[outer])):
            found.append(path)
    return sorted(found)
