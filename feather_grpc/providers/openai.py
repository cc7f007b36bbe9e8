"""Adapter for the OpenAI Chat Completions wire format (types `openai` and `openai-compatible`)."""

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
    ProviderSettings,
    b64,
    consistent,
    data_url,
    details_of,
    estimated_usage,
    label_str,
    merge_fields,
    token_count,
    wire_str,
)
from feather_grpc.providers.http import (
    UpstreamErrorBody,
    bad_response,
    classify_status,
    post_json,
)
from feather_grpc.providers.streaming import stream_sse

__all__ = ["LEGACY_CALL_ID", "OpenAIProvider", "finish_reason", "normalise_usage"]

# The id given to a legacy `function_call` reply (it has none): the caller echoes it in the tool result.
LEGACY_CALL_ID = "call_function_call"

_FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
    "function_call": FinishReason.TOOL_CALLS,
    "content_filter": FinishReason.CONTENT_FILTER,
    # Spellings seen from compatible servers (TGI, llama.cpp, older vLLM).
    "eos": FinishReason.STOP,
    "eos_token": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
}


def finish_reason(raw: object, has_tool_calls: bool) -> FinishReason:
    reason = _FINISH.get(raw, FinishReason.UNSPECIFIED) if isinstance(raw, str) else FinishReason.UNSPECIFIED
    # Some compatible servers say "stop" after emitting tool calls; the calls are what the caller must act on.
    if has_tool_calls and reason in (FinishReason.STOP, FinishReason.UNSPECIFIED):
        return FinishReason.TOOL_CALLS
    return reason


def normalise_usage(raw: dict[str, Any]) -> Usage:
    """OpenAI's `prompt_tokens` already includes cached tokens, which is the engine's convention."""
    prompt_details = details_of(raw, "prompt_tokens_details")
    completion_details = details_of(raw, "completion_tokens_details")
    return consistent(
        Usage(
            input_tokens=token_count(raw.get("prompt_tokens")),
            output_tokens=token_count(raw.get("completion_tokens")),
            cached_input_tokens=token_count(prompt_details.get("cached_tokens")),
            # Written to the cache on this call (part of `prompt_tokens`), billed at the cache-write price.
            cache_write_tokens=token_count(prompt_details.get("cache_write_tokens")),
            reasoning_tokens=token_count(completion_details.get("reasoning_tokens")),
            audio_input_tokens=token_count(prompt_details.get("audio_tokens")),
            audio_output_tokens=token_count(completion_details.get("audio_tokens")),
        )
    )


def _part(p: Part) -> dict[str, Any]:
    """One content part in Chat Completions terms (routing has kept out what the API cannot take)."""
    if p.kind is PartKind.TEXT:
        return {"type": "text", "text": p.text}
    if p.kind is PartKind.IMAGE:
        image: dict[str, Any] = {"url": p.url or data_url(p.media_type, p.data)}
        if p.detail:
            image["detail"] = p.detail
        return {"type": "image_url", "image_url": image}
    if p.kind is PartKind.DOCUMENT:
        if p.url:  # routing keeps these away; an adapter used directly must not send something else
            raise ProviderError("UPSTREAM_BAD_REQUEST", "Chat Completions takes a PDF inline only", retryable=False)
        # Chat Completions takes a PDF inline only, and wants a file name with it.
        return {
            "type": "file",
            "file": {"filename": p.title or "document.pdf", "file_data": data_url(p.media_type, p.data)},
        }
    return {"type": "input_audio", "input_audio": {"data": b64(p.data), "format": p.media_type}}


def _content(m: Message) -> str | list[dict[str, Any]]:
    return [_part(p) for p in m.parts] if m.parts else m.content


def _message(m: Message) -> dict[str, Any]:
    if m.role is Role.TOOL:
        if any(p.kind is not PartKind.TEXT for p in m.parts):
            raise ProviderError("UPSTREAM_BAD_REQUEST", "Chat Completions takes tool results as text", retryable=False)
        return {"role": "tool", "tool_call_id": m.tool_call_id, "content": _content(m)}
    out: dict[str, Any] = {"role": m.role.value, "content": _content(m)}
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        if not m.content and not m.parts:
            out["content"] = None  # what OpenAI itself returns for a tool-calls-only turn
        out["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in m.tool_calls
        ]
    return out


def _text_of(content: object) -> str:
    """`content` is a string, null, or (some compatible servers) a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(p.get("text") or "" for p in content if isinstance(p, dict))
    return ""


def _upstream(doc: dict[str, Any]) -> UpstreamReply:
    """The reply's own id, model snapshot, fingerprint and service tier (a completion or a chunk)."""
    return UpstreamReply(
        id=label_str(doc.get("id")),
        model=label_str(doc.get("model")),
        system_fingerprint=label_str(doc.get("system_fingerprint")),
        service_tier=label_str(doc.get("service_tier")),
    )


def _reasoning_of(message: dict[str, Any]) -> str:
    """The reasoning text compatible servers send apart from the content (DeepSeek, vLLM and others:
    `reasoning_content`; OpenRouter: `reasoning`). OpenAI's own chat models do not return theirs."""
    for key in ("reasoning_content", "reasoning"):
        value = message.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def _stream_error_status(err: UpstreamErrorBody) -> int:
    kind = f"{err.type} {err.code}"
    if "rate_limit" in kind or "insufficient_quota" in kind:
        return 429
    if "invalid_request" in kind or "context_length" in kind:
        return 400
    return 500


class OpenAIProvider:
    """POST `{base_url}/chat/completions`; `base_url` normally ends in `/v1`."""

    def __init__(self, settings: ProviderSettings, session: UpstreamClient) -> None:
        self.settings = settings
        self._name = settings.name
        self._api_key = settings.api_key
        self._url = settings.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        headers.update(settings.extra_headers)
        # The request head (Host, these headers) is encoded once, here; a request adds its length.
        self._endpoint = session.endpoint(
            self._url,
            list(headers.items()),
            settings.egress,
            owner=settings.name,
            max_connections=settings.max_connections,
        )
        # OpenAI's reasoning models reject `max_tokens`; `max_completion_tokens` works for every OpenAI
        # chat model. Compatible servers (vLLM, Ollama, Groq...) know `max_tokens`.
        self._max_tokens_field = "max_completion_tokens" if settings.type == "openai" else "max_tokens"

    def build_body(self, model: str, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        body: dict[str, Any] = {"model": model, "messages": [_message(m) for m in request.messages]}
        if request.max_tokens is not None:
            body[self._max_tokens_field] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        if request.stop:
            body["stop"] = list(request.stop)
        if request.seed is not None:
            body["seed"] = request.seed
        fmt = request.response_format
        if fmt is not None and fmt.type:
            if fmt.type == "json_schema":
                schema: dict[str, Any] = {"name": fmt.schema_name or "response", "schema": fmt.json_schema or {}}
                schema["strict"] = fmt.strict
                body["response_format"] = {"type": "json_schema", "json_schema": schema}
            else:
                body["response_format"] = {"type": fmt.type}
        if request.tools:
            tools = []
            for t in request.tools:
                fn: dict[str, Any] = {"name": t.name}
                if t.description:
                    fn["description"] = t.description
                if t.parameters is not None:
                    fn["parameters"] = t.parameters
                if t.strict:
                    fn["strict"] = True
                tools.append({"type": "function", "function": fn})
            body["tools"] = tools
            if request.parallel_tool_calls is not None:  # OpenAI refuses it without tools
                body["parallel_tool_calls"] = request.parallel_tool_calls
        choice = request.tool_choice
        if choice is not None:
            if choice.function_name:
                body["tool_choice"] = {"type": "function", "function": {"name": choice.function_name}}
            elif choice.mode:
                body["tool_choice"] = choice.mode
        if request.prompt_cache_key:
            body["prompt_cache_key"] = request.prompt_cache_key
        if request.reasoning_effort:
            body["reasoning_effort"] = request.reasoning_effort
        merge_fields(body, self.settings, request)
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    # Hooks for adapters of the same wire format at other URLs or with other auth (providers/azure.py).
    def target(self, model: str) -> tuple[UpstreamEndpoint, str]:
        """The endpoint that serves `model`, and the model id the body names."""
        return self._endpoint, model

    async def request_headers(self) -> bytes:
        """Header lines of one request beyond the endpoint's fixed ones (e.g. a short-lived token)."""
        return b""

    async def chat(self, model: str, request: ChatRequest) -> ProviderResponse:
        endpoint, model = self.target(model)
        payload = orjson.dumps(self.build_body(model, request, stream=False))
        doc = await post_json(
            endpoint,
            self._name,
            payload,
            self._api_key,
            self.settings.max_response_bytes,
            headers=await self.request_headers(),
        )
        return self._parse_completion(doc, request)

    def _parse_completion(self, doc: object, request: ChatRequest) -> ProviderResponse:
        try:
            if not isinstance(doc, dict):
                raise TypeError
            choice = doc["choices"][0]
            message = choice["message"]
            content = _text_of(message.get("content"))
            refusal = message.get("refusal")
            thought = _reasoning_of(message)
            calls = [
                ToolCall(
                    id=wire_str(c.get("id")),
                    name=wire_str(c["function"]["name"]),
                    arguments=wire_str(c["function"].get("arguments")),
                )
                for c in message.get("tool_calls") or ()
            ]
            legacy = message.get("function_call")
            if not calls and isinstance(legacy, dict) and legacy.get("name"):
                # The deprecated `functions` API's one call: the same thing as a tool call, without an id.
                calls.append(ToolCall(LEGACY_CALL_ID, wire_str(legacy["name"]), wire_str(legacy.get("arguments"))))
            raw_usage = doc.get("usage")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise bad_response(self._name, "not a chat completion") from None
        finish = finish_reason(choice.get("finish_reason"), bool(calls))
        upstream = _upstream(doc)
        if isinstance(refusal, str) and refusal:
            upstream.refusal = refusal  # its own field; as before it had one, also the text of an empty reply
            if not content:
                content = refusal
                finish = FinishReason.CONTENT_FILTER
        thinking = [ThinkingBlock(thought)] if thought else []
        if not isinstance(raw_usage, dict):  # some compatible servers omit it: an estimate bills better than 0
            usage = estimated_usage(request, content + thought, calls)
            return ProviderResponse(content, calls, finish, usage, True, thinking, upstream)
        return ProviderResponse(
            content, calls, finish, normalise_usage(raw_usage), thinking=thinking, upstream=upstream
        )

    def stream(self, model: str, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        # The skeleton's generator itself, not one re-yielding it: a layer less for every event to pass.
        endpoint, model = self.target(model)
        payload = orjson.dumps(self.build_body(model, request, stream=True))
        reader = _ChunkReader(self._name, self._api_key)

        async def send() -> UpstreamResponse:
            return await endpoint.request(payload, await self.request_headers())

        return stream_sse(
            self._name,
            self._api_key,
            send,
            lambda event: reader.handle(event.data),
            lambda: reader.done,
            reader.finish,
            end="[DONE]",
            max_event_bytes=self.settings.max_stream_event_bytes,
            # A compatible server that ignored `stream: true`: its whole answer is replayed.
            replay=lambda doc: self._parse_completion(doc, request),
            max_response_bytes=self.settings.max_response_bytes,
        )

    async def aclose(self) -> None:
        return None


_LEGACY_KEY = ("function_call",)  # the ordinal key of a streamed legacy function_call


class _ChunkReader:
    """Turns `chat.completion.chunk` payloads into stream events, remembering what the end needs."""

    __slots__ = (
        "_api_key",
        "_final",
        "_finish",
        "_last_key",
        "_name",
        "_ordinals",
        "_refusal",
        "_text_seen",
        "_upstream",
        "_usage",
        "done",
    )

    def __init__(self, name: str, api_key: str) -> None:
        self._name = name
        self._api_key = api_key
        self.done = False
        self._finish: object = None
        self._usage: dict[str, Any] | None = None
        self._refusal = ""
        self._text_seen = False
        self._ordinals: dict[object, int] = {}  # upstream tool-call key -> ordinal
        self._last_key: object = 0
        self._final: StreamFinish | None = None
        self._upstream = UpstreamReply()

    @classmethod
    def finished(cls, name: str, full: ProviderResponse) -> _ChunkReader:
        """A reader whose `finish()` reports an already complete (non-streamed) answer."""
        reader = cls(name, "")
        reader.done = True
        reader._final = StreamFinish(full.finish_reason, None if full.usage_estimated else full.usage, full.upstream)
        return reader

    def handle(self, data: str) -> list[StreamEvent]:
        if data == "[DONE]":
            self.done = True
            return []
        try:
            obj = orjson.loads(data)
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise bad_response(self._name, "stream chunk is not a JSON object")
        err = obj.get("error")
        if err:
            raise self._stream_error(err)
        usage = obj.get("usage")
        if usage and isinstance(usage, dict):
            self._usage = usage  # servers that repeat usage on every chunk: the last one wins
        out: list[StreamEvent] = []
        if not self._upstream.id:  # every chunk repeats them: the first says it
            self._upstream = _upstream(obj)
            if self._upstream.id:
                out.append(ReplyId(self._upstream.id))
        elif obj.get("service_tier"):
            self._upstream.service_tier = label_str(obj["service_tier"])
        choices = obj.get("choices")
        if not choices:
            return out
        choice = choices[0]
        delta = choice.get("delta") or {}
        # Most chunks carry text and nothing else: the rarer fields are looked for only when present.
        if "reasoning_content" in delta or "reasoning" in delta:
            thought = _reasoning_of(delta)
            if thought:
                out.append(ThinkingDelta(0, text=thought))
        text = delta.get("content")
        if text:
            self._text_seen = True
            out.append(TextDelta(text if type(text) is str else _text_of(text)))
        if "refusal" in delta:
            refusal = delta["refusal"]
            if refusal:
                self._refusal += refusal
        if "tool_calls" in delta:
            calls = delta["tool_calls"]
            if calls:
                self._tool_calls(calls, out)
        if "function_call" in delta:
            legacy = delta["function_call"]
            if isinstance(legacy, dict):
                self._legacy_call(legacy, out)
        finish = choice.get("finish_reason")
        if finish:
            self._finish = finish
        return out

    def _tool_calls(self, calls: list[dict[str, Any]], out: list[StreamEvent]) -> None:
        for call in calls:
            fn = call.get("function") or {}
            key = call.get("index")
            if key is None:
                # No index (some compatible servers): a new id starts a new call.
                call_id = call.get("id")
                key = ("id", call_id) if call_id else self._last_key
            self._last_key = key
            ordinal = self._ordinals.get(key)
            if ordinal is None:
                ordinal = self._ordinals[key] = len(self._ordinals)
                name, arguments = wire_str(fn.get("name")), wire_str(fn.get("arguments"))
                out.append(ToolCallDelta(ordinal, wire_str(call.get("id")), name, arguments))
            elif fn.get("arguments"):
                out.append(ToolCallDelta(ordinal, arguments=wire_str(fn["arguments"])))

    def _legacy_call(self, fn: dict[str, Any], out: list[StreamEvent]) -> None:
        """A streamed legacy `function_call`: one call, its name first, then argument fragments."""
        ordinal = self._ordinals.get(_LEGACY_KEY)
        if ordinal is None:
            ordinal = self._ordinals[_LEGACY_KEY] = len(self._ordinals)
            out.append(ToolCallDelta(ordinal, LEGACY_CALL_ID, wire_str(fn.get("name")), wire_str(fn.get("arguments"))))
        elif fn.get("arguments"):
            out.append(ToolCallDelta(ordinal, arguments=wire_str(fn["arguments"])))

    def _stream_error(self, err: object) -> ProviderError:
        if not isinstance(err, dict):
            err = {"message": str(err)}
        body = UpstreamErrorBody(str(err.get("type") or ""), str(err.get("code") or ""), str(err.get("message") or ""))
        return classify_status(self._name, _stream_error_status(body), body, api_key=self._api_key)

    def finish(self) -> list[StreamEvent]:
        if self._final is not None:
            return [self._final]
        out: list[StreamEvent] = []
        finish = finish_reason(self._finish, bool(self._ordinals))
        self._upstream.refusal = self._refusal  # its own field; as before, also the text of an empty reply
        if self._refusal and not self._text_seen:
            out.append(TextDelta(self._refusal))
            finish = FinishReason.CONTENT_FILTER
        out.append(StreamFinish(finish, normalise_usage(self._usage) if self._usage else None, self._upstream))
        return out
