"""Adapter for the OpenAI Chat Completions wire format (types `openai` and `openai-compatible`)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import orjson

from feather_grpc.engine.errors import ProviderError
from feather_grpc.engine.types import (
    ChatRequest,
    FinishReason,
    Message,
    ProviderResponse,
    Role,
    StreamEvent,
    StreamFinish,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from feather_grpc.providers.base import (
    ProviderSettings,
    consistent,
    estimated_usage,
    parse_sse,
    read_events,
    token_count,
)
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

__all__ = ["OpenAIProvider", "finish_reason", "normalise_usage"]

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
    prompt_details = raw.get("prompt_tokens_details") or {}
    completion_details = raw.get("completion_tokens_details") or {}
    return consistent(
        Usage(
            input_tokens=token_count(raw.get("prompt_tokens")),
            output_tokens=token_count(raw.get("completion_tokens")),
            cached_input_tokens=token_count(prompt_details.get("cached_tokens")),
            reasoning_tokens=token_count(completion_details.get("reasoning_tokens")),
        )
    )


def _message(m: Message) -> dict[str, Any]:
    if m.role is Role.TOOL:
        return {"role": "tool", "tool_call_id": m.tool_call_id, "content": m.content}
    out: dict[str, Any] = {"role": m.role.value, "content": m.content}
    if m.name:
        out["name"] = m.name
    if m.tool_calls:
        if not m.content:
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


def _stream_error_status(err: UpstreamErrorBody) -> int:
    kind = f"{err.type} {err.code}"
    if "rate_limit" in kind or "insufficient_quota" in kind:
        return 429
    if "invalid_request" in kind or "context_length" in kind:
        return 400
    return 500


class OpenAIProvider:
    """POST `{base_url}/chat/completions`; `base_url` normally ends in `/v1`."""

    def __init__(self, settings: ProviderSettings, session: HttpClient) -> None:
        self.settings = settings
        self._name = settings.name
        self._api_key = settings.api_key
        self._url = settings.base_url.rstrip("/") + "/chat/completions"
        headers = {"Content-Type": "application/json"}
        if settings.api_key:
            headers["Authorization"] = f"Bearer {settings.api_key}"
        headers.update(settings.extra_headers)
        # The request head (Host, these headers) is encoded once, here; a request adds its length.
        self._endpoint = session.endpoint(self._url, list(headers.items()), settings.egress)
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
                tools.append({"type": "function", "function": fn})
            body["tools"] = tools
        choice = request.tool_choice
        if choice is not None:
            if choice.function_name:
                body["tool_choice"] = {"type": "function", "function": {"name": choice.function_name}}
            elif choice.mode:
                body["tool_choice"] = choice.mode
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    # Hooks for adapters of the same wire format at other URLs or with other auth (providers/azure.py).
    def target(self, model: str) -> tuple[Endpoint, str]:
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
            calls = [
                ToolCall(
                    id=c.get("id") or "",
                    name=c["function"]["name"],
                    arguments=c["function"].get("arguments") or "",
                )
                for c in message.get("tool_calls") or ()
            ]
            raw_usage = doc.get("usage")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise bad_response(self._name, "not a chat completion") from None
        finish = finish_reason(choice.get("finish_reason"), bool(calls))
        if refusal and not content:
            # Structured-output refusals arrive apart from content; surface the text, flag the filter.
            content = str(refusal)
            finish = FinishReason.CONTENT_FILTER
        if not isinstance(raw_usage, dict):  # some compatible servers omit it: an estimate bills better than 0
            return ProviderResponse(content, calls, finish, estimated_usage(request, content, calls), True)
        return ProviderResponse(content, calls, finish, normalise_usage(raw_usage))

    async def stream(self, model: str, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        endpoint, model = self.target(model)
        payload = orjson.dumps(self.build_body(model, request, stream=True))
        name = self._name
        started = False
        headers = await self.request_headers()
        try:
            resp = await endpoint.request(payload, headers)
            try:
                if resp.status >= 300:
                    raise await error_from_response(name, resp, self._api_key)
                started = True
                if resp.content_type == "application/json":
                    # A compatible server that ignored `stream: true`: replay its whole answer.
                    raw = await resp.read(self.settings.max_response_bytes)
                    try:
                        doc = orjson.loads(raw)
                    except ValueError:
                        raise bad_response(name, "body is not JSON") from None
                    full = self._parse_completion(doc, request)
                    if full.content:
                        yield TextDelta(full.content)
                    for i, call in enumerate(full.tool_calls):
                        yield ToolCallDelta(i, call.id, call.name, call.arguments)
                    reader = _ChunkReader.finished(name, full.finish_reason, full.usage)
                else:
                    parser = SSEParser(self.settings.max_stream_event_bytes)
                    reader = _ChunkReader(name, self._api_key)

                    def handle(event: SSEEvent) -> list[StreamEvent]:
                        return reader.handle(event.data)

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
                        raise stream_cut(name, "ended without [DONE]")
                    # The terminating chunk may still be on its way: keep the connection if it comes soon.
                    resp.release_after_end()
            finally:
                # Read to the end, the connection is already back in the pool and this is a no-op;
                # otherwise (an error, aclose() or cancellation) it is closed, never pooled.
                resp.close()
        except HttpError as exc:
            raise classify_transport_error(name, exc, streaming=started, api_key=self._api_key) from exc
        # The response is released before the last events: a consumer that stops at StreamFinish without
        # closing the iterator holds no connection.
        for out in reader.finish():
            yield out

    async def aclose(self) -> None:
        return None


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

    @classmethod
    def finished(cls, name: str, finish: FinishReason, usage: Usage) -> _ChunkReader:
        """A reader whose `finish()` reports an already complete (non-streamed) answer."""
        reader = cls(name, "")
        reader.done = True
        reader._final = StreamFinish(finish, usage)
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
        if usage:
            self._usage = usage  # servers that repeat usage on every chunk: the last one wins
        choices = obj.get("choices")
        if not choices:
            return []
        choice = choices[0]
        out: list[StreamEvent] = []
        delta = choice.get("delta") or {}
        text = delta.get("content")
        if text:
            self._text_seen = True
            out.append(TextDelta(text if isinstance(text, str) else _text_of(text)))
        refusal = delta.get("refusal")
        if refusal:
            self._refusal += refusal
        calls = delta.get("tool_calls")
        if calls:
            self._tool_calls(calls, out)
        if choice.get("finish_reason"):
            self._finish = choice["finish_reason"]
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
                out.append(
                    ToolCallDelta(ordinal, call.get("id") or "", fn.get("name") or "", fn.get("arguments") or "")
                )
            elif fn.get("arguments"):
                out.append(ToolCallDelta(ordinal, arguments=fn["arguments"]))

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
        if self._refusal and not self._text_seen:
            out.append(TextDelta(self._refusal))
            finish = FinishReason.CONTENT_FILTER
        out.append(StreamFinish(finish, normalise_usage(self._usage) if self._usage else None))
        return out
