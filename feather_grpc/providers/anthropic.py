"""Adapter for the Anthropic Messages wire format."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from feather_grpc.core.errors import ProviderError
from feather_grpc.core.http_client import UpstreamClient, UpstreamEndpoint, UpstreamResponse
from feather_grpc.core.types import (
    ChatRequest,
    FinishReason,
    Message,
    Part,
    PartKind,
    PromptUsage,
    ProviderResponse,
    ReplyId,
    Role,
    StreamEvent,
    StreamFinish,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    UpstreamReply,
    Usage,
)
from feather_grpc.providers.base import (
    SHAPE_ERRORS,
    ProviderSettings,
    b64,
    claude_thinking,
    consistent,
    estimated_usage,
    label_str,
    merge_fields,
    request_count,
    token_count,
    tool_arguments,
    wire_str,
)
from feather_grpc.providers.http import (
    UpstreamErrorBody,
    bad_response,
    classify_status,
    post_json,
)
from feather_grpc.providers.streaming import stream_sse

__all__ = ["ANTHROPIC_VERSION", "DEFAULT_MAX_TOKENS", "AnthropicProvider", "finish_reason", "normalise_usage"]

ANTHROPIC_VERSION = "2023-06-01"
# The Messages API requires max_tokens: when the caller sets none, the model's configured maxOutputTokens,
# else this.
DEFAULT_MAX_TOKENS = 4096

# Extended thinking for a request that names an effort but no budget (LiteLLM's mapping); none and minimal
# mean no thinking.
EFFORT_BUDGETS = {"low": 1024, "medium": 2048, "high": 4096, "xhigh": 8192}

_FINISH = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "pause_turn": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "refusal": FinishReason.CONTENT_FILTER,
}

# The HTTP status each error type is sent with, so an error event inside a stream classifies the same way.
_ERROR_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}


def finish_reason(raw: object) -> FinishReason:
    return _FINISH.get(raw, FinishReason.UNSPECIFIED) if isinstance(raw, str) else FinishReason.UNSPECIFIED


def normalise_usage(raw: dict[str, Any]) -> Usage:
    """Anthropic's `input_tokens` excludes cache reads and writes; the engine's includes both. Thinking
    tokens (`output_tokens_details.thinking_tokens`, within `output_tokens`) are the reasoning tokens;
    `server_tool_use.web_search_requests` are billed per request."""
    cache_read = token_count(raw.get("cache_read_input_tokens"))
    cache_write = token_count(raw.get("cache_creation_input_tokens"))
    details = raw.get("output_tokens_details")
    server_tools = raw.get("server_tool_use")
    by_ttl = raw.get("cache_creation")  # the writes split by TTL
    return consistent(
        Usage(
            input_tokens=token_count(raw.get("input_tokens")) + cache_read + cache_write,
            output_tokens=token_count(raw.get("output_tokens")),
            cached_input_tokens=cache_read,
            cache_write_tokens=cache_write,
            reasoning_tokens=token_count(details.get("thinking_tokens")) if isinstance(details, dict) else 0,
            web_search_requests=request_count(server_tools.get("web_search_requests"))
            if isinstance(server_tools, dict)
            else 0,
            cache_write_1h_tokens=token_count(by_ttl.get("ephemeral_1h_input_tokens"))
            if isinstance(by_ttl, dict)
            else 0,
        )
    )


def _source(p: Part) -> dict[str, Any]:
    if p.url:
        return {"type": "url", "url": p.url}
    return {"type": "base64", "media_type": p.media_type, "data": b64(p.data)}


def cache_control(ttl: str | None) -> dict[str, Any] | None:
    """A breakpoint's `cache_control`: "" is the API's default TTL (5 minutes)."""
    if ttl is None:
        return None
    return {"type": "ephemeral", "ttl": ttl} if ttl else {"type": "ephemeral"}


def _mark(block: dict[str, Any], ttl: str | None) -> dict[str, Any]:
    if ttl is not None:
        block["cache_control"] = cache_control(ttl)
    return block


def _block(p: Part) -> dict[str, Any]:
    """One content part as a Messages content block (routing has kept audio away from this API)."""
    block: dict[str, Any]
    if p.kind is PartKind.IMAGE:
        block = {"type": "image", "source": _source(p)}
    elif p.kind is PartKind.DOCUMENT:
        block = {"type": "document", "source": _source(p)}
        if p.title:
            block["title"] = p.title
    elif p.kind is PartKind.TEXT:
        block = {"type": "text", "text": p.text}
    else:  # routing keeps audio away; an adapter used directly must not send it as something else
        raise ProviderError("UPSTREAM_BAD_REQUEST", "the Anthropic Messages API takes no audio", retryable=False)
    return _mark(block, p.cache_ttl)


def _text_blocks(m: Message) -> list[dict[str, Any]]:
    """The message's content as blocks; the API rejects empty text blocks."""
    if m.parts:
        return [_block(p) for p in m.parts]
    return [{"type": "text", "text": m.content}] if m.content else []


def build_messages(provider: str, request: ChatRequest) -> tuple[str | list[dict[str, Any]], list[dict[str, Any]]]:
    """The top-level `system`, and turns that alternate user/assistant as the Messages API requires.

    System messages join into `system` (text, or text blocks when a cache breakpoint marks one); tool
    results become `tool_result` blocks of a user turn; consecutive same-role turns merge. A turn that is
    one unmarked text block is sent as a string. A message's cache breakpoint marks its last block.
    """
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for m in request.messages:
        if m.role is Role.SYSTEM:
            blocks = _text_blocks(m)
            if blocks:
                _mark(blocks[-1], m.cache_ttl)
            system.extend(blocks)
            continue
        blocks = []
        if m.role is Role.TOOL:
            role = "user"
            content: str | list[dict[str, Any]] = [_block(p) for p in m.parts] if m.parts else m.content
            result: dict[str, Any] = {"type": "tool_result", "tool_use_id": m.tool_call_id, "content": content}
            if m.is_error:
                result["is_error"] = True
            blocks.append(result)
        else:
            role = "assistant" if m.role is Role.ASSISTANT else "user"
            # Thinking comes first, exactly as the reply carried it (the API checks the signatures).
            blocks.extend(_thinking_block(t) for t in claude_thinking(m.thinking))
            blocks.extend(_text_blocks(m))
            for call in m.tool_calls:
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.name,
                        "input": tool_arguments(provider, call.id, call.arguments),
                    }
                )
        if blocks:
            _mark(blocks[-1], m.cache_ttl)
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        turn_blocks = turn["content"]
        if not turn_blocks:
            turn["content"] = ""  # an empty message: let the upstream say what it thinks of it
        elif len(turn_blocks) == 1 and _plain_text(turn_blocks[0]):
            turn["content"] = turn_blocks[0]["text"]
    if any(not _plain_text(b) for b in system):
        return system, turns
    return "\n\n".join(b["text"] for b in system), turns


def _thinking_block(t: ThinkingBlock) -> dict[str, Any]:
    if t.redacted_data:
        return {"type": "redacted_thinking", "data": t.redacted_data}
    return {"type": "thinking", "thinking": t.text, "signature": t.signature}


def thinking_budget(request: ChatRequest) -> int | None:
    """The extended-thinking budget a request asks for: its own, else its effort's."""
    if request.thinking_budget is not None:
        return request.thinking_budget
    return EFFORT_BUDGETS.get(request.reasoning_effort)


def _plain_text(block: dict[str, Any]) -> bool:
    return block["type"] == "text" and "cache_control" not in block


class AnthropicProvider:
    """POST `{base_url}/v1/messages`; `base_url` is the API root, e.g. `https://api.anthropic.com`."""

    def __init__(self, settings: ProviderSettings, session: UpstreamClient) -> None:
        self.settings = settings
        self._name = settings.name
        self._api_key = settings.api_key
        root = settings.base_url.rstrip("/")
        self._url = root + ("/messages" if root.endswith("/v1") else "/v1/messages")
        headers = {"Content-Type": "application/json", "anthropic-version": ANTHROPIC_VERSION}
        if settings.api_key:
            headers["x-api-key"] = settings.api_key
        headers.update(settings.extra_headers)
        # The request head (Host, these headers) is encoded once, here; a request adds its length.
        self._max_output = dict(settings.max_output_tokens)
        self._endpoint = session.endpoint(
            self._url,
            list(headers.items()),
            settings.egress,
            owner=settings.name,
            max_connections=settings.max_connections,
        )

    def build_body(self, model: str, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        system, messages = build_messages(self._name, request)
        budget = thinking_budget(request)
        max_tokens = request.max_tokens
        if max_tokens is None:
            # max_tokens includes the thinking: without a configured limit, leave the answer its usual room
            max_tokens = self._max_output.get(model) or DEFAULT_MAX_TOKENS + (budget or 0)
        body: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": messages}
        if budget is not None:
            body["thinking"] = {"type": "enabled", "budget_tokens": budget}
        if system:
            body["system"] = system
        fmt = request.response_format
        if fmt is not None and fmt.type == "json_schema":
            # Structured outputs: the reply's text is JSON valid against the schema (routing keeps JSON mode,
            # which this API lacks, away from here).
            body["output_config"] = {"format": {"type": "json_schema", "schema": fmt.json_schema or {}}}
        if request.temperature is not None:
            body["temperature"] = request.temperature  # passed as given: the upstream judges the range
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop_sequences"] = list(request.stop)
        if request.tools:
            tools = []
            for t in request.tools:
                tool: dict[str, Any] = {"name": t.name}
                if t.description:
                    tool["description"] = t.description
                tool["input_schema"] = t.parameters if t.parameters is not None else {"type": "object"}
                if t.strict:
                    tool["strict"] = True
                tools.append(_mark(tool, t.cache_ttl))
            body["tools"] = tools
        choice = request.tool_choice
        tool_choice: dict[str, Any] | None = None
        if choice is not None:
            if choice.function_name:
                tool_choice = {"type": "tool", "name": choice.function_name}
            elif choice.mode == "required":
                tool_choice = {"type": "any"}
            elif choice.mode in ("auto", "none"):
                tool_choice = {"type": choice.mode}
        if request.tools and request.parallel_tool_calls is False and (tool_choice or {}).get("type") != "none":
            # Anthropic says it inside tool_choice (auto is its default), and only the "off" way.
            tool_choice = {**(tool_choice or {"type": "auto"}), "disable_parallel_tool_use": True}
        if tool_choice is not None:
            body["tool_choice"] = tool_choice
        merge_fields(body, self.settings, request)
        if stream:
            body["stream"] = True
        return body

    # Hooks for the same wire format at other URLs or with other auth (Claude on Vertex, providers/gemini.py).
    def target(self, model: str, *, stream: bool) -> UpstreamEndpoint:
        return self._endpoint

    async def request_headers(self) -> bytes:
        return b""

    async def chat(self, model: str, request: ChatRequest) -> ProviderResponse:
        payload = orjson.dumps(self.build_body(model, request, stream=False))
        endpoint = self.target(model, stream=False)
        doc = await post_json(
            endpoint,
            self._name,
            payload,
            self._api_key,
            self.settings.max_response_bytes,
            headers=await self.request_headers(),
        )
        return self._parse_message(doc, request)

    def _parse_message(self, doc: object, request: ChatRequest) -> ProviderResponse:
        try:
            if not isinstance(doc, dict):
                raise TypeError
            texts: list[str] = []
            calls: list[ToolCall] = []
            thinking: list[ThinkingBlock] = []
            for block in doc["content"]:
                kind = block.get("type")
                if kind == "text":
                    texts.append(wire_str(block.get("text")))
                elif kind == "tool_use":
                    arguments = orjson.dumps(block.get("input") or {}).decode()
                    calls.append(ToolCall(wire_str(block["id"]), wire_str(block["name"]), arguments))
                elif kind == "thinking":
                    thinking.append(ThinkingBlock(str(block.get("thinking") or ""), str(block.get("signature") or "")))
                elif kind == "redacted_thinking":
                    thinking.append(ThinkingBlock(redacted_data=str(block.get("data") or "")))
            raw_usage = doc.get("usage")
        except SHAPE_ERRORS:
            raise bad_response(self._name, "not a message") from None
        content, finish = "".join(texts), finish_reason(doc.get("stop_reason"))
        upstream = UpstreamReply(id=label_str(doc.get("id")), model=label_str(doc.get("model")))
        upstream.stop_sequence = label_str(doc.get("stop_sequence"))
        if not isinstance(raw_usage, dict):  # answered but unmetered: bill an estimate (a retry pays twice)
            thought = "".join(t.text for t in thinking)
            usage = estimated_usage(request, content + thought, calls)
            return ProviderResponse(content, calls, finish, usage, True, thinking, upstream)
        upstream.service_tier = label_str(raw_usage.get("service_tier"))
        return ProviderResponse(
            content, calls, finish, normalise_usage(raw_usage), thinking=thinking, upstream=upstream
        )

    def stream(self, model: str, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        # The skeleton's generator itself, not one re-yielding it: a layer less for every event to pass.
        payload = orjson.dumps(self.build_body(model, request, stream=True))
        endpoint = self.target(model, stream=True)
        reader = _EventReader(self._name, self._api_key)

        async def send() -> UpstreamResponse:
            return await endpoint.request(payload, await self.request_headers())

        return stream_sse(
            self._name,
            self._api_key,
            send,
            lambda event: reader.handle(event.event, event.data),
            lambda: reader.done,
            lambda: [reader.finish()],
            end="message_stop",
            max_event_bytes=self.settings.max_stream_event_bytes,
            # A proxy or mock that ignored `stream: true` (as the OpenAI adapter allows): the whole message.
            replay=lambda doc: self._parse_message(doc, request),
            max_response_bytes=self.settings.max_response_bytes,
        )

    async def aclose(self) -> None:
        return None


class _EventReader:
    """Turns Messages stream events into engine stream events, keeping usage and the stop reason."""

    __slots__ = (
        "_api_key",
        "_args_seen",
        "_final_output",
        "_name",
        "_stop_reason",
        "_thinking_ordinals",
        "_tool_ordinals",
        "_upstream",
        "_usage",
        "done",
    )

    def __init__(self, name: str, api_key: str) -> None:
        self._name = name
        self._api_key = api_key
        self.done = False
        self._usage: dict[str, Any] | None = None
        self._final_output = False  # a message_delta reported output_tokens
        self._stop_reason: object = None
        self._tool_ordinals: dict[int, int] = {}  # content block index -> tool call ordinal
        self._thinking_ordinals: dict[int, int] = {}  # content block index -> thinking block ordinal
        self._upstream = UpstreamReply()
        self._args_seen: set[int] = set()

    def handle(self, event: str, data: str) -> list[StreamEvent]:
        if event == "ping":
            return []
        try:
            obj = orjson.loads(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise bad_response(self._name, f"stream event {event!r} is not a JSON object")
        kind = obj.get("type") or event
        if kind == "content_block_delta":
            delta = obj.get("delta") or {}
            dtype = delta.get("type")
            if dtype == "text_delta":
                text = wire_str(delta.get("text"))
                return [TextDelta(text)] if text else []
            if dtype in ("thinking_delta", "signature_delta"):
                ordinal = self._thinking_ordinals.get(obj.get("index", -1))
                if ordinal is None:
                    return []
                if dtype == "thinking_delta":
                    text = wire_str(delta.get("thinking"))
                    return [ThinkingDelta(ordinal, text=text)] if text else []
                signature = wire_str(delta.get("signature"))
                return [ThinkingDelta(ordinal, signature=signature)] if signature else []
            if dtype == "input_json_delta":
                ordinal = self._tool_ordinals.get(obj.get("index", -1))
                fragment = wire_str(delta.get("partial_json"))
                if ordinal is None or not fragment:
                    return []
                self._args_seen.add(ordinal)
                return [ToolCallDelta(ordinal, arguments=fragment)]
            return []  # citation deltas carry nothing the engine relays
        if kind == "content_block_start":
            block = obj.get("content_block") or {}
            btype = block.get("type")
            if btype == "text":
                text = wire_str(block.get("text"))
                return [TextDelta(text)] if text else []
            if btype == "tool_use":
                ordinal = len(self._tool_ordinals)
                self._tool_ordinals[obj.get("index", ordinal)] = ordinal
                return [ToolCallDelta(ordinal, wire_str(block.get("id")), wire_str(block.get("name")))]
            if btype in ("thinking", "redacted_thinking"):
                ordinal = len(self._thinking_ordinals)
                self._thinking_ordinals[obj.get("index", -1 - ordinal)] = ordinal
                if btype == "redacted_thinking":
                    return [ThinkingDelta(ordinal, redacted_data=str(block.get("data") or ""))]
                # The block opens empty as a rule; anything it already holds is passed on.
                text, signature = wire_str(block.get("thinking")), wire_str(block.get("signature"))
                return [ThinkingDelta(ordinal, text=text, signature=signature)] if text or signature else []
            return []
        if kind == "content_block_stop":
            ordinal = self._tool_ordinals.get(obj.get("index", -1))
            if ordinal is not None and ordinal not in self._args_seen:
                # A call without input fragments has no arguments: say so as the empty object.
                self._args_seen.add(ordinal)
                return [ToolCallDelta(ordinal, arguments="{}")]
            return []
        if kind == "message_start":
            message = obj.get("message") or {}
            self._upstream = UpstreamReply(id=label_str(message.get("id")), model=label_str(message.get("model")))
            out: list[StreamEvent] = [ReplyId(self._upstream.id)] if self._upstream.id else []
            usage = message.get("usage")
            if isinstance(usage, dict):
                self._usage = dict(usage)
                # The prompt's exact counts, for the engine to bill if the stream ends before message_delta
                # (its output count is a placeholder, so none is passed on).
                prompt = normalise_usage(usage)
                prompt.output_tokens = prompt.reasoning_tokens = 0
                out.append(PromptUsage(prompt))
            return out
        if kind == "message_delta":
            delta = obj.get("delta") or {}
            stop = delta.get("stop_reason")
            if stop:
                self._stop_reason = stop
            if delta.get("stop_sequence"):
                self._upstream.stop_sequence = label_str(delta["stop_sequence"])
            usage = obj.get("usage")
            if isinstance(usage, dict):
                # Counts here are cumulative: the latest value replaces, never adds.
                merged = self._usage if self._usage is not None else {}
                merged.update((k, v) for k, v in usage.items() if v is not None)
                self._usage = merged
                self._final_output = self._final_output or "output_tokens" in usage
            return []
        if kind == "message_stop":
            self.done = True
            return []
        if kind == "error":
            raise self._stream_error(obj.get("error"))
        return []

    def _stream_error(self, err: object) -> ProviderError:
        if not isinstance(err, dict):
            err = {}
        body = UpstreamErrorBody(type=str(err.get("type") or "error"), message=str(err.get("message") or ""))
        status = _ERROR_STATUS.get(body.type, 500)
        return classify_status(self._name, status, body, api_key=self._api_key)

    def finish(self) -> StreamFinish:
        # message_start's output count is a placeholder; without a final one the engine estimates (and says so).
        usage = normalise_usage(self._usage) if self._usage is not None and self._final_output else None
        if self._usage is not None:
            self._upstream.service_tier = label_str(self._usage.get("service_tier"))
        return StreamFinish(finish_reason(self._stop_reason), usage, self._upstream)
