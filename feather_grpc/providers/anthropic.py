"""Adapter for the Anthropic Messages wire format."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from feather_grpc.engine.errors import ProviderError
from feather_grpc.engine.types import (
    ChatRequest,
    FinishReason,
    ProviderResponse,
    Role,
    StreamEvent,
    StreamFinish,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from feather_grpc.providers.base import ProviderSettings, estimated_usage, parse_sse, read_events, token_count
from feather_grpc.providers.http import (
    UpstreamErrorBody,
    bad_response,
    classify_status,
    classify_transport_error,
    error_from_response,
    post_json,
    stream_cut,
)
from feather_grpc.providers.sse import SSEEvent, SSEParser
from feather_grpc.providers.transport import Endpoint, HttpClient, HttpError

__all__ = ["ANTHROPIC_VERSION", "DEFAULT_MAX_TOKENS", "AnthropicProvider", "finish_reason", "normalise_usage"]

ANTHROPIC_VERSION = "2023-06-01"
DEFAULT_MAX_TOKENS = 4096  # the Messages API requires max_tokens; this applies when the caller set none

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
    """Anthropic's `input_tokens` excludes cache reads and writes; the engine's includes both."""
    cache_read = token_count(raw.get("cache_read_input_tokens"))
    cache_write = token_count(raw.get("cache_creation_input_tokens"))
    return Usage(
        input_tokens=token_count(raw.get("input_tokens")) + cache_read + cache_write,
        output_tokens=token_count(raw.get("output_tokens")),
        cached_input_tokens=cache_read,
        cache_write_tokens=cache_write,
    )


def _tool_input(provider: str, call_id: str, arguments: str) -> dict[str, Any]:
    if not arguments.strip():
        return {}
    try:
        value = orjson.loads(arguments)
    except ValueError:
        value = None
    if not isinstance(value, dict):
        # Anthropic needs an object; guessing one would send the model words it never said.
        raise ProviderError(
            "UPSTREAM_BAD_REQUEST",
            f"{provider}: tool call {call_id!r} arguments are not a JSON object",
            retryable=False,
        )
    return value


def build_messages(provider: str, request: ChatRequest) -> tuple[str, list[dict[str, Any]]]:
    """System text, and turns that alternate user/assistant as the Messages API requires.

    System messages join into the top-level `system`; tool results become `tool_result` blocks of a
    user turn; consecutive same-role turns merge. A turn that is one text block is sent as a string.
    """
    system: list[str] = []
    turns: list[dict[str, Any]] = []
    for m in request.messages:
        if m.role is Role.SYSTEM:
            system.append(m.content)
            continue
        blocks: list[dict[str, Any]] = []
        if m.role is Role.TOOL:
            role = "user"
            blocks.append({"type": "tool_result", "tool_use_id": m.tool_call_id, "content": m.content})
        else:
            role = "assistant" if m.role is Role.ASSISTANT else "user"
            if m.content:  # the API rejects empty text blocks
                blocks.append({"type": "text", "text": m.content})
            for call in m.tool_calls:
                blocks.append(
                    {
                        "type": "tool_use",
                        "id": call.id,
                        "name": call.name,
                        "input": _tool_input(provider, call.id, call.arguments),
                    }
                )
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})
    for turn in turns:
        content = turn["content"]
        if not content:
            turn["content"] = ""  # an empty message: let the upstream say what it thinks of it
        elif len(content) == 1 and content[0]["type"] == "text":
            turn["content"] = content[0]["text"]
    return "\n\n".join(system), turns


class AnthropicProvider:
    """POST `{base_url}/v1/messages`; `base_url` is the API root, e.g. `https://api.anthropic.com`."""

    def __init__(self, settings: ProviderSettings, session: HttpClient) -> None:
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
        self._endpoint = session.endpoint(self._url, list(headers.items()), settings.egress)

    def build_body(self, model: str, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        system, messages = build_messages(self._name, request)
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS,
            "messages": messages,
        }
        if system:
            body["system"] = system
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
                tools.append(tool)
            body["tools"] = tools
        choice = request.tool_choice
        if choice is not None:
            if choice.function_name:
                body["tool_choice"] = {"type": "tool", "name": choice.function_name}
            elif choice.mode == "required":
                body["tool_choice"] = {"type": "any"}
            elif choice.mode in ("auto", "none"):
                body["tool_choice"] = {"type": choice.mode}
        if stream:
            body["stream"] = True
        return body

    # Hooks for the same wire format at other URLs or with other auth (Claude on Vertex, providers/gemini.py).
    def target(self, model: str, *, stream: bool) -> Endpoint:
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
        try:
            if not isinstance(doc, dict):
                raise TypeError
            texts: list[str] = []
            calls: list[ToolCall] = []
            for block in doc["content"]:
                kind = block.get("type")
                if kind == "text":
                    texts.append(block.get("text") or "")
                elif kind == "tool_use":
                    calls.append(ToolCall(block["id"], block["name"], orjson.dumps(block.get("input") or {}).decode()))
            raw_usage = doc.get("usage")
        except (KeyError, TypeError, AttributeError):
            raise bad_response(self._name, "not a message") from None
        content, finish = "".join(texts), finish_reason(doc.get("stop_reason"))
        if not isinstance(raw_usage, dict):  # answered but unmetered: bill an estimate (a retry pays twice)
            return ProviderResponse(content, calls, finish, estimated_usage(request, content, calls), True)
        return ProviderResponse(content, calls, finish, normalise_usage(raw_usage))

    async def stream(self, model: str, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        payload = orjson.dumps(self.build_body(model, request, stream=True))
        name = self._name
        started = False
        endpoint = self.target(model, stream=True)
        headers = await self.request_headers()
        try:
            resp = await endpoint.request(payload, headers)
            try:
                if resp.status >= 300:
                    raise await error_from_response(name, resp, self._api_key)
                started = True
                parser = SSEParser(self.settings.max_stream_event_bytes)
                reader = _EventReader(name, self._api_key)

                def handle(event: SSEEvent) -> list[StreamEvent]:
                    return reader.handle(event.event, event.data)

                def done() -> bool:
                    return reader.done

                async for chunk in resp:
                    events, error = read_events(parse_sse(parser, chunk, name), handle, done)
                    for out in events:
                        yield out
                    if error is not None:
                        raise error
                    if reader.done:
                        break
                if not reader.done:
                    raise stream_cut(name, "ended without message_stop")
                # The terminating chunk may still be on its way: keep the connection if it comes soon.
                resp.release_after_end()
            finally:
                # Read to the end, the connection is already back in the pool and this is a no-op;
                # otherwise (an error, aclose() or cancellation) it is closed.
                resp.close()
        except HttpError as exc:
            raise classify_transport_error(name, exc, streaming=started, api_key=self._api_key) from exc
        yield reader.finish()  # after the response is released

    async def aclose(self) -> None:
        return None


class _EventReader:
    """Turns Messages stream events into engine stream events, keeping usage and the stop reason."""

    __slots__ = ("_api_key", "_args_seen", "_final_output", "_name", "_stop_reason", "_tool_ordinals", "_usage", "done")

    def __init__(self, name: str, api_key: str) -> None:
        self._name = name
        self._api_key = api_key
        self.done = False
        self._usage: dict[str, Any] | None = None
        self._final_output = False  # a message_delta reported output_tokens
        self._stop_reason: object = None
        self._tool_ordinals: dict[int, int] = {}  # content block index -> tool call ordinal
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
                text = delta.get("text")
                return [TextDelta(text)] if text else []
            if dtype == "input_json_delta":
                ordinal = self._tool_ordinals.get(obj.get("index", -1))
                fragment = delta.get("partial_json")
                if ordinal is None or not fragment:
                    return []
                self._args_seen.add(ordinal)
                return [ToolCallDelta(ordinal, arguments=fragment)]
            return []  # thinking, signature and citation deltas carry nothing the engine relays
        if kind == "content_block_start":
            block = obj.get("content_block") or {}
            btype = block.get("type")
            if btype == "text":
                text = block.get("text")
                return [TextDelta(text)] if text else []
            if btype == "tool_use":
                ordinal = len(self._tool_ordinals)
                self._tool_ordinals[obj.get("index", ordinal)] = ordinal
                return [ToolCallDelta(ordinal, block.get("id") or "", block.get("name") or "")]
            return []
        if kind == "content_block_stop":
            ordinal = self._tool_ordinals.get(obj.get("index", -1))
            if ordinal is not None and ordinal not in self._args_seen:
                # A call without input fragments has no arguments: say so as the empty object.
                self._args_seen.add(ordinal)
                return [ToolCallDelta(ordinal, arguments="{}")]
            return []
        if kind == "message_start":
            usage = (obj.get("message") or {}).get("usage")
            if isinstance(usage, dict):
                self._usage = dict(usage)
            return []
        if kind == "message_delta":
            stop = (obj.get("delta") or {}).get("stop_reason")
            if stop:
                self._stop_reason = stop
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
        return StreamFinish(finish_reason(self._stop_reason), usage)
