"""The contract every provider adapter fulfils, and the settings it is built from."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import orjson

from feather_grpc.core.egress import DIRECT, Egress
from feather_grpc.core.errors import ProviderError
from feather_grpc.core.tokens import estimate_prompt_tokens, estimate_tokens
from feather_grpc.core.types import (
    ChatRequest,
    ProviderResponse,
    StreamEvent,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolCall,
    Usage,
)
from feather_grpc.core.upstream import DEFAULT_MAX_EVENT_BYTES, DEFAULT_MAX_RESPONSE_BYTES
from feather_grpc.providers.http import bad_response, too_large
from feather_grpc.providers.sse import SSEEvent, SSELimitExceeded, SSEParser


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    """What an adapter needs from configuration. `api_key` comes from the environment or a secret file."""

    name: str  # the provider's name in the config, e.g. "openai"
    type: str  # one of providers.PROVIDER_TYPES
    base_url: str
    api_key: str = field(default="", repr=False)  # never printed
    extra_headers: tuple[tuple[str, str], ...] = ()
    egress: Egress = DIRECT  # proxy, CA bundle, client certificate
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES  # a JSON reply body, decoded
    max_stream_event_bytes: int = DEFAULT_MAX_EVENT_BYTES  # one SSE line or event
    # Cloud providers (azure-openai, bedrock, ...): see config.ProviderSpec.
    auth: str = ""  # "" = the API key; "entra" = a Microsoft Entra token (azure-openai)
    api_version: str = ""  # azure-openai: deployment URLs with ?api-version=; "" = Azure's v1 endpoint
    region: str = ""  # bedrock: the AWS region; vertex: the location
    project: str = ""  # vertex: the Google Cloud project
    upstream_ids: tuple[tuple[str, str], ...] = ()  # model name -> id the upstream knows (an Azure deployment)
    responses_models: tuple[str, ...] = ()  # openai: models served through the Responses API
    thinking_budgets: tuple[tuple[str, int], ...] = ()  # gemini/vertex: model name -> thinking budget (tokens)
    max_output_tokens: tuple[tuple[str, int], ...] = ()  # (upstream model, its configured longest reply)
    default_fields: dict[str, Any] = field(default_factory=dict, hash=False)  # body fields a request may override
    max_connections: int = 1000  # open connections per upstream host (providers.<name>.maxConnections)


class Provider(Protocol):
    """One upstream. Calls raise `feather_grpc.core.errors.ProviderError` on failure.

    Timeouts and deadlines are the caller's job (the engine wraps calls in `asyncio.timeout`); an adapter
    must let `CancelledError` through untouched and release the HTTP connection when cancelled.
    """

    settings: ProviderSettings

    async def chat(self, model: str, request: ChatRequest) -> ProviderResponse:
        """One non-streaming call. `model` is the upstream model id."""
        ...

    def stream(self, model: str, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        """One streaming call: deltas, then exactly one `StreamFinish` (unless it raises).

        Closing the iterator early (`aclose()`, or cancellation) closes the upstream connection at once.
        """
        ...

    async def aclose(self) -> None:
        """Release anything the adapter owns (the shared HTTP session is closed by its owner)."""
        ...


# Far beyond any model's context, and small enough that tokens x any price stays inside int64 nano-dollars.
MAX_TOKENS_PER_CALL = 1_000_000_000


def token_count(raw: object) -> int:
    """A count from an upstream's usage, as a whole number from 0 to MAX_TOKENS_PER_CALL: a buggy
    compatible server must not bill negative or overflowing amounts, nor fail a call it answered."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return 0
    try:
        return min(max(int(raw), 0), MAX_TOKENS_PER_CALL)
    except (OverflowError, ValueError):  # inf, nan
        return MAX_TOKENS_PER_CALL if raw == float("inf") else 0


# Server-side tool requests a call may bill: far beyond any real call, small enough for any price.
MAX_REQUESTS_PER_CALL = 1_000_000


def request_count(raw: object) -> int:
    """A count of server-side tool requests from an upstream's usage, bounded like `token_count`."""
    return min(token_count(raw), MAX_REQUESTS_PER_CALL)


def merge_fields(body: dict[str, Any], settings: ProviderSettings, request: ChatRequest) -> dict[str, Any]:
    """The body with the provider's configured defaults under it and the request's extra fields over it
    (validation and config keep both off the fields the gateway owns). An object meets an object key by key,
    so `{"generationConfig": {"topK": 5}}` adds to the output limit the gateway put there instead of
    replacing it."""
    if settings.default_fields:
        _merge(body, settings.default_fields, over=False)
    if request.extra_fields:
        _merge(body, request.extra_fields, over=True)
    return body


def _merge(body: dict[str, Any], fields: dict[str, Any], *, over: bool) -> None:
    for key, value in fields.items():
        mine = body.get(key)
        if isinstance(mine, dict) and isinstance(value, dict):
            body[key] = mine = dict(mine)  # a copy: the gateway's object may be shared (a cached schema)
            _merge(mine, value, over=over)
        elif over or key not in body:
            body[key] = value


# Gemini's thought signatures are marked so, as the reply's thinking: Gemini checks only its own, and Claude
# (Anthropic, Bedrock, Vertex) would refuse one as an invalid signature. Base64 never has a colon.
GEMINI_SIGNATURE = "gemini:"


def claude_thinking(blocks: tuple[ThinkingBlock, ...]) -> list[ThinkingBlock]:
    """The thinking blocks a Claude API can take back: not another model family's (Gemini's)."""
    return [t for t in blocks if not t.signature.startswith(GEMINI_SIGNATURE)]


def tool_arguments(provider: str, call_id: str, arguments: str) -> dict[str, Any]:
    """A tool call's arguments as the JSON object Anthropic, Bedrock and Gemini send back (blank: {})."""
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        # The upstream needs an object; guessing one would send the model words it never said.
        raise ProviderError(
            "UPSTREAM_BAD_REQUEST",
            f"{provider}: tool call {call_id!r} arguments are not a JSON object",
            retryable=False,
        )
    return value


def b64(data: bytes) -> str:
    """Inline bytes as the providers take them: standard base64 text."""
    return base64.b64encode(data).decode("ascii")


def data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{b64(data)}"


def estimated_usage(request: ChatRequest, content: str, calls: list[ToolCall]) -> Usage:
    """For a reply that came without usage: the prompt and the answer, estimated (and billed as such)."""
    output = estimate_tokens(content) + sum(estimate_tokens(c.name + c.arguments) for c in calls)
    return Usage(input_tokens=estimate_prompt_tokens(request.messages), output_tokens=output)


def consistent(usage: Usage) -> Usage:
    """Cache reads and writes, and audio, within the prompt; reasoning and audio within the output (as every
    provider means)."""
    usage.cached_input_tokens = min(usage.cached_input_tokens, usage.input_tokens)
    usage.cache_write_tokens = min(usage.cache_write_tokens, usage.input_tokens - usage.cached_input_tokens)
    usage.cache_write_1h_tokens = min(usage.cache_write_1h_tokens, usage.cache_write_tokens)
    usage.reasoning_tokens = min(usage.reasoning_tokens, usage.output_tokens)
    usage.audio_input_tokens = min(usage.audio_input_tokens, usage.input_tokens)
    usage.audio_output_tokens = min(usage.audio_output_tokens, usage.output_tokens)
    return usage


def coalesce(events: list[StreamEvent]) -> list[StreamEvent]:
    """The events of one network read, with each run of text deltas joined into one delta, and each run of
    thinking text of one block likewise.

    Every delta becomes a gRPC message, which costs the gateway ~60-80 us of CPU whatever its size; an
    upstream that sends several events at once (a burst after a pause, a fast server) would pay that per
    event. Only what has already arrived is joined: nothing waits for more text.
    """
    if len(events) < 2:
        return events
    out: list[StreamEvent] = []
    run: list[str] = []  # text of the current run
    run_kind: int | None = None  # -1 for reply text, else the thinking block's index

    def flush() -> None:
        if run:
            out.append(TextDelta("".join(run)) if run_kind == -1 else ThinkingDelta(run_kind or 0, "".join(run)))
            run.clear()

    for event in events:
        if isinstance(event, TextDelta):
            kind = -1
        elif isinstance(event, ThinkingDelta) and not (event.signature or event.redacted_data):
            kind = event.index
        else:
            flush()
            run_kind = None
            out.append(event)
            continue
        if kind != run_kind:
            flush()
            run_kind = kind
        run.append(event.content if isinstance(event, TextDelta) else event.text)
    flush()
    return out


def parse_sse(parser: SSEParser, chunk: bytes, provider: str) -> list[SSEEvent]:
    """The SSE events `chunk` completes; a line or event past the provider's limit fails the attempt."""
    try:
        return parser.feed(chunk)
    except SSELimitExceeded as e:
        raise too_large(provider, e.what, e.limit, "maxStreamEventBytes") from None


# What reading an upstream's JSON by the shape its API promises raises when the shape is another (a list
# where an object should be, a number for a string...): the reply is bad, the upstream's fault
# (UPSTREAM_BAD_RESPONSE, failed over), never the gateway's INTERNAL.
SHAPE_ERRORS = (KeyError, IndexError, TypeError, AttributeError, ValueError)


def details_of(raw: dict[str, Any], key: str) -> dict[str, Any]:
    """A usage's details object (OpenAI's `prompt_tokens_details`...): one of another shape counts nothing,
    as token_count does for a count that is not a number."""
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def wire_str(value: object) -> str:
    """A string an answer is made of (text, a tool call's id, name or arguments), as a reply gives it: ""
    when absent; anything else raises TypeError, a reply of another shape (UPSTREAM_BAD_RESPONSE through
    SHAPE_ERRORS): the answer cannot be guessed from a number or a list."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise TypeError("a reply's text is not a string")


def label_str(value: object) -> str:
    """A string that describes a reply without being part of it (its model snapshot, service tier, stop
    sequence): "" when absent or of another type, since nothing the caller reads depends on it."""
    return value if isinstance(value, str) else ""


def read_events(
    provider: str, sse: list[SSEEvent], handle: Callable[[SSEEvent], list[StreamEvent]], done: Callable[[], bool]
) -> tuple[list[StreamEvent], ProviderError | None]:
    """The stream events of one network read's SSE events (text runs joined, see `coalesce`), up to the
    end of the stream, and the error event that cut them short, if any (an error event, or an event not
    in the API's shape): the caller yields the events first, then raises the error."""
    batch: list[StreamEvent] = []
    try:
        for event in sse:
            batch += handle(event)
            if done():
                break
    except ProviderError as e:
        return coalesce(batch), e
    except SHAPE_ERRORS:
        return coalesce(batch), bad_response(provider, "a stream event is not in the API's shape")
    return coalesce(batch), None
