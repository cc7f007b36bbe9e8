"""OpenAI's Responses API (`POST {baseUrl}/responses`) for the models configured with `"api": "responses"`
(per model, or per provider), served through Chat and StreamChat like any other model.

- Input items: system messages become `instructions`; user and assistant turns are messages; tool calls
  are `function_call` items and tool results `function_call_output` items.
- Reasoning items are kept for the next turn without storing anything at OpenAI (`store: false`): the
  reply's reasoning items, with their `encrypted_content`, are remembered by the call ids of the function
  calls they led to (bounded, least recently used first out), and sent back in front of those function
  calls when the caller's next request carries them, as the API asks for tool-calling loops of reasoning
  models. (A reply without function calls needs nothing: the API drops earlier turns' reasoning anyway.)
- Streaming events: output_text, refusal and function-call argument deltas; the usage of
  response.completed (or response.incomplete); response.failed and error events are classified errors.
- Usage: `input_tokens` (with `input_tokens_details.cached_tokens`), `output_tokens` (with
  `output_tokens_details.reasoning_tokens`), the engine's own conventions; and the completed
  `web_search_call` items, which are billed per call.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import orjson

from feather_grpc.core.errors import ProviderError
from feather_grpc.core.http_client import UpstreamClient, UpstreamResponse
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
    MAX_REQUESTS_PER_CALL,
    SHAPE_ERRORS,
    ProviderSettings,
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
    error_from_response,
    post_json,
)
from feather_grpc.providers.openai import OpenAIProvider
from feather_grpc.providers.sse import SSEEvent
from feather_grpc.providers.streaming import stream_sse

__all__ = ["MAX_KEPT_REASONING", "OpenAIResponsesProvider", "normalise_usage"]

MAX_KEPT_REASONING = 10_000  # replies whose reasoning items are remembered for their next turn


def normalise_usage(raw: dict[str, Any]) -> Usage:
    return consistent(
        Usage(
            input_tokens=token_count(raw.get("input_tokens")),
            output_tokens=token_count(raw.get("output_tokens")),
            cached_input_tokens=token_count(details_of(raw, "input_tokens_details").get("cached_tokens")),
            reasoning_tokens=token_count(details_of(raw, "output_tokens_details").get("reasoning_tokens")),
        )
    )


def _status_for(code: str) -> int:
    if "rate_limit" in code or "quota" in code:
        return 429
    if "invalid" in code or "context_length" in code or "content_filter" in code:
        return 400
    return 500


class OpenAIResponsesProvider(OpenAIProvider):
    """The OpenAI adapter; calls for `settings.responses_models` go to `/responses` instead."""

    def __init__(self, settings: ProviderSettings, session: UpstreamClient) -> None:
        super().__init__(settings, session)
        self._responses_models = frozenset(settings.responses_models)
        headers = [("Content-Type", "application/json")]
        if settings.api_key:
            headers.append(("Authorization", f"Bearer {settings.api_key}"))
        headers += settings.extra_headers
        url = settings.base_url.rstrip("/") + "/responses"
        self._responses = session.endpoint(url, headers, settings.egress)
        self._reasoning: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()  # call id -> reasoning items
        self._no_encrypted: set[str] = set()  # upstream models that refused `include: reasoning.encrypted_content`

    # -- requests --------------------------------------------------------------------------------------

    def build_responses_body(self, model: str, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        instructions: list[str] = []
        items: list[dict[str, Any]] = []
        for m in request.messages:
            if m.role is Role.SYSTEM:
                instructions.append(m.text)
            elif m.role is Role.TOOL:
                output = _content(m) if m.parts else m.content
                items.append({"type": "function_call_output", "call_id": m.tool_call_id, "output": output})
            else:
                if m.tool_calls:
                    kept = self._reasoning.get(m.tool_calls[0].id)
                    if kept is not None:
                        items += kept
                if m.role is Role.ASSISTANT:  # the model's own words go back as text
                    if m.text or not m.tool_calls:
                        items.append({"role": "assistant", "content": m.text})
                elif m.parts:
                    items.append({"role": m.role.value, "content": _content(m)})
                elif m.content or not m.tool_calls:
                    items.append({"role": m.role.value, "content": m.content})
                for c in m.tool_calls:
                    items.append({"type": "function_call", "call_id": c.id, "name": c.name, "arguments": c.arguments})
        body: dict[str, Any] = {"model": model, "input": items, "store": False}
        if instructions:
            body["instructions"] = "\n\n".join(instructions)
        # Reasoning items come back with encrypted_content, so they can be sent back without `store`
        # (models without reasoning refuse to be asked: see `_refused_encrypted_content`).
        if model not in self._no_encrypted:
            body["include"] = ["reasoning.encrypted_content"]
        if request.max_tokens is not None:
            body["max_output_tokens"] = request.max_tokens
        if request.temperature is not None:
            body["temperature"] = request.temperature
        if request.top_p is not None:
            body["top_p"] = request.top_p
        fmt = request.response_format
        if fmt is not None and fmt.type in ("json_object", "json_schema"):
            if fmt.type == "json_schema":
                text_format: dict[str, Any] = {
                    "type": "json_schema",
                    "name": fmt.schema_name or "response",
                    "schema": fmt.json_schema or {},
                    "strict": fmt.strict,
                }
            else:
                text_format = {"type": "json_object"}
            body["text"] = {"format": text_format}
        if request.tools:
            tools = []
            for t in request.tools:
                tool: dict[str, Any] = {"type": "function", "name": t.name, "strict": t.strict}
                if t.description:
                    tool["description"] = t.description
                tool["parameters"] = t.parameters if t.parameters is not None else {"type": "object", "properties": {}}
                tools.append(tool)
            body["tools"] = tools
            if request.parallel_tool_calls is not None:
                body["parallel_tool_calls"] = request.parallel_tool_calls
        choice = request.tool_choice
        if choice is not None:
            if choice.function_name:
                body["tool_choice"] = {"type": "function", "name": choice.function_name}
            elif choice.mode:
                body["tool_choice"] = choice.mode
        if request.reasoning_effort:
            body["reasoning"] = {"effort": request.reasoning_effort}
        if request.prompt_cache_key:
            body["prompt_cache_key"] = request.prompt_cache_key
        merge_fields(body, self.settings, request)
        if stream:
            body["stream"] = True
        return body

    def _refused_encrypted_content(self, model: str, error: ProviderError) -> bool:
        """A model without reasoning (gpt-4o, gpt-4.1...) answers `include: reasoning.encrypted_content` with
        a 400; it is then asked without it, now and from then on (the set is bounded by the config)."""
        if model in self._no_encrypted or error.http_status != 400 or "encrypted content" not in error.message.lower():
            return False
        self._no_encrypted.add(model)
        return True

    def _keep(self, reasoning: list[dict[str, Any]], call_ids: list[str]) -> None:
        if not reasoning or not call_ids:
            return
        self._reasoning[call_ids[0]] = reasoning
        self._reasoning.move_to_end(call_ids[0])
        while len(self._reasoning) > MAX_KEPT_REASONING:
            self._reasoning.popitem(last=False)

    # -- calls -----------------------------------------------------------------------------------------

    async def chat(self, model: str, request: ChatRequest) -> ProviderResponse:
        if model not in self._responses_models:
            return await super().chat(model, request)
        _, upstream = self.target(model)  # the id the upstream knows (an Azure deployment)
        headers = await self.request_headers()
        while True:
            payload = orjson.dumps(self.build_responses_body(upstream, request, stream=False))
            try:
                doc = await post_json(
                    self._responses,
                    self._name,
                    payload,
                    self._api_key,
                    self.settings.max_response_bytes,
                    headers=headers,
                )
            except ProviderError as e:
                if not self._refused_encrypted_content(upstream, e):
                    raise
                continue  # once: the model is now known to take no encrypted reasoning
            break
        reader = _Reader(self._name, self._api_key)
        try:
            if not isinstance(doc, dict):
                raise TypeError
            reader.response(doc)
            events = reader.output(doc.get("output") or [])
            final = reader.finish()
        except SHAPE_ERRORS:
            raise bad_response(self._name, "not a Responses API response") from None
        self._keep(reader.reasoning, reader.call_ids)
        text = "".join(e.content for e in events if isinstance(e, TextDelta))
        calls = [ToolCall(e.id, e.name, e.arguments) for e in events if isinstance(e, ToolCallDelta)]
        thinking = [ThinkingBlock(e.text) for e in events if isinstance(e, ThinkingDelta)]
        if not text and reader.refusal:
            text = reader.refusal
        if final.usage is None:
            usage = estimated_usage(request, text, calls)
            return ProviderResponse(text, calls, final.finish_reason, usage, True, thinking, final.upstream)
        return ProviderResponse(
            text, calls, final.finish_reason, final.usage, thinking=thinking, upstream=final.upstream
        )

    def stream(self, model: str, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        # The skeleton's generator itself, as the chat completions path: a layer less for every event.
        if model not in self._responses_models:
            return super().stream(model, request)
        _, upstream = self.target(model)
        name = self._name
        reader = _Reader(name, self._api_key)

        async def send() -> UpstreamResponse:
            headers = await self.request_headers()
            while True:
                payload = orjson.dumps(self.build_responses_body(upstream, request, stream=True))
                resp = await self._responses.request(payload, headers)
                if resp.status < 300:
                    return resp
                try:
                    failure = await error_from_response(name, resp, self._api_key)
                finally:
                    resp.close()
                if not self._refused_encrypted_content(upstream, failure):
                    raise failure

        def handle(event: SSEEvent) -> list[StreamEvent]:
            try:
                obj = orjson.loads(event.data)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                raise bad_response(name, "stream event is not a JSON object")
            try:
                return reader.event(obj)
            except (KeyError, TypeError, AttributeError):
                raise bad_response(name, f"malformed {obj.get('type')!r} event") from None

        def finish() -> list[StreamEvent]:
            self._keep(reader.reasoning, reader.call_ids)
            out: list[StreamEvent] = []
            if reader.refusal and not reader.text_seen:
                out.append(TextDelta(reader.refusal))
            out.append(reader.finish())
            return out

        return stream_sse(
            name,
            self._api_key,
            send,
            handle,
            lambda: reader.done,
            finish,
            end="response.completed",
            max_event_bytes=self.settings.max_stream_event_bytes,
        )


class _Reader:
    """Output items and stream events of one response -> stream events, plus what the end needs."""

    __slots__ = (
        "_api_key",
        "_id",
        "_incomplete",
        "_model",
        "_name",
        "_ordinals",
        "_searches",
        "_service_tier",
        "_status",
        "_summary_at",
        "_thoughts",
        "_usage",
        "call_ids",
        "done",
        "reasoning",
        "refusal",
        "text_seen",
    )

    def __init__(self, name: str, api_key: str) -> None:
        self._name = name
        self._api_key = api_key
        self._ordinals: dict[object, int] = {}  # output_index (stream) or call id -> tool-call ordinal
        self._thoughts: dict[object, int] = {}  # output_index of a reasoning item -> thinking block ordinal
        self._summary_at: object = None  # the summary part being streamed
        self._status = ""
        self._incomplete = ""
        self._usage: dict[str, Any] | None = None
        self._id = ""  # the response's id (`resp_...`)
        self._model = ""  # the snapshot that answered (`o3-2025-04-16`)
        self._service_tier = ""
        self._searches = 0  # web_search_call items completed: billed per call, like Anthropic's web searches
        self.call_ids: list[str] = []
        self.reasoning: list[dict[str, Any]] = []
        self.refusal = ""
        self.text_seen = False
        self.done = False

    def response(self, doc: dict[str, Any]) -> None:
        """The response object's id, model, service tier, status, incomplete reason, usage and error."""
        self._id = label_str(doc.get("id"))
        self._model = label_str(doc.get("model"))
        self._service_tier = label_str(doc.get("service_tier"))
        self._status = label_str(doc.get("status"))
        self._incomplete = label_str((doc.get("incomplete_details") or {}).get("reason"))
        usage = doc.get("usage")
        if isinstance(usage, dict):
            self._usage = usage
        error = doc.get("error")
        if self._status == "failed" or isinstance(error, dict):
            raise self._error(error if isinstance(error, dict) else {})

    def output(self, items: list[dict[str, Any]]) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        for index, item in enumerate(items):
            kind = item.get("type")
            if kind == "reasoning":
                self.reasoning.append(_reasoning_item(item))
                # Its summary (when the request asked for one: reasoning.summary) is the reply's thinking.
                said = "\n\n".join(wire_str(p.get("text")) for p in item.get("summary") or () if p.get("text"))
                if said:
                    ordinal = self._thoughts[index] = len(self._thoughts)
                    out.append(ThinkingDelta(ordinal, said))
            elif kind == "message":
                for part in item.get("content") or ():
                    if part.get("type") == "output_text" and part.get("text"):
                        self.text_seen = True
                        out.append(TextDelta(wire_str(part["text"])))
                    elif part.get("type") == "refusal":
                        self.refusal += wire_str(part.get("refusal"))
            elif kind == "web_search_call":
                self._searched(item)
            elif kind == "function_call":
                call_id = wire_str(item.get("call_id"))
                self.call_ids.append(call_id)
                ordinal = len(self._ordinals)
                self._ordinals[call_id] = ordinal
                out.append(ToolCallDelta(ordinal, call_id, wire_str(item["name"]), wire_str(item.get("arguments"))))
        return out

    def event(self, obj: dict[str, Any]) -> list[StreamEvent]:
        kind = obj.get("type")
        if kind == "response.output_text.delta":
            delta = wire_str(obj.get("delta"))
            if delta:
                self.text_seen = True
                return [TextDelta(delta)]
            return []
        if kind == "response.function_call_arguments.delta":
            ordinal = self._ordinals.get(obj.get("output_index"))
            delta = wire_str(obj.get("delta"))
            return [ToolCallDelta(ordinal, arguments=delta)] if ordinal is not None and delta else []
        if kind == "response.output_item.added":
            item = obj["item"]
            if item.get("type") == "function_call":
                call_id = wire_str(item.get("call_id"))
                ordinal = self._ordinals[obj.get("output_index")] = len(self._ordinals)
                self.call_ids.append(call_id)
                arguments = wire_str(item.get("arguments"))
                return [ToolCallDelta(ordinal, call_id, wire_str(item.get("name")), arguments)]
            return []
        if kind == "response.output_item.done":
            item = obj["item"]
            if item.get("type") == "reasoning":
                self.reasoning.append(_reasoning_item(item))
            elif item.get("type") == "web_search_call":
                self._searched(item)
            return []
        if kind == "response.reasoning_summary_text.delta":
            delta = wire_str(obj.get("delta"))
            index = obj.get("output_index")
            if not delta:
                return []
            ordinal = self._thoughts.get(index)
            if ordinal is None:
                ordinal = self._thoughts[index] = len(self._thoughts)
                self._summary_at = obj.get("summary_index")
            elif obj.get("summary_index") != self._summary_at:  # the item's next summary part
                self._summary_at = obj.get("summary_index")
                delta = "\n\n" + delta
            return [ThinkingDelta(ordinal, delta)]
        if kind == "response.refusal.delta":
            self.refusal += wire_str(obj.get("delta"))
            return []
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            self.response(obj["response"])
            self.done = True
            return []
        if kind == "error":
            raise self._error(obj)
        if kind == "response.created":  # the reply's id as soon as it is said: a cut stream still names it
            self._id = label_str(obj["response"].get("id"))
            return [ReplyId(self._id)] if self._id else []
        return []  # in_progress, content_part.*, *.done, reasoning summaries...

    def _searched(self, item: dict[str, Any]) -> None:
        if item.get("status") == "completed" and self._searches < MAX_REQUESTS_PER_CALL:
            self._searches += 1

    def _error(self, err: dict[str, Any]) -> ProviderError:
        code = str(err.get("code") or err.get("type") or "")
        body = UpstreamErrorBody(str(err.get("type") or ""), code, str(err.get("message") or ""))
        return classify_status(self._name, _status_for(code), body, api_key=self._api_key)

    def finish(self) -> StreamFinish:
        if self._incomplete == "max_output_tokens":
            finish = FinishReason.LENGTH
        elif self._incomplete == "content_filter" or (self.refusal and not self.text_seen):
            finish = FinishReason.CONTENT_FILTER
        elif self._ordinals:
            finish = FinishReason.TOOL_CALLS
        elif self._status == "completed":
            finish = FinishReason.STOP
        else:
            finish = FinishReason.UNSPECIFIED
        usage = normalise_usage(self._usage) if self._usage is not None else None
        if usage is not None:
            usage.web_search_requests = self._searches
        upstream = UpstreamReply(id=self._id, model=self._model, service_tier=self._service_tier)
        return StreamFinish(finish, usage, upstream)


def _input_part(p: Part) -> dict[str, Any]:
    """One content part as a Responses input content item (ResponseInputContentParam in the SDK)."""
    if p.kind is PartKind.TEXT:
        return {"type": "input_text", "text": p.text}
    if p.kind is PartKind.IMAGE:
        return {
            "type": "input_image",
            "image_url": p.url or data_url(p.media_type, p.data),
            "detail": p.detail or "auto",
        }
    if p.kind is PartKind.DOCUMENT:
        if p.url:
            return {"type": "input_file", "file_url": p.url}
        return {
            "type": "input_file",
            "filename": p.title or "document.pdf",
            "file_data": data_url("application/pdf", p.data),
        }
    # Routing keeps audio away (the API's message content has no audio item); used directly, say so.
    raise ProviderError("UPSTREAM_BAD_REQUEST", "the OpenAI Responses API takes no audio input", retryable=False)


def _content(m: Message) -> list[dict[str, Any]]:
    return [_input_part(p) for p in m.parts]


def _reasoning_item(item: dict[str, Any]) -> dict[str, Any]:
    """What the API takes back: the id, the summary and the encrypted content (not its status)."""
    kept: dict[str, Any] = {"type": "reasoning", "id": item.get("id"), "summary": item.get("summary") or []}
    if item.get("encrypted_content"):
        kept["encrypted_content"] = item["encrypted_content"]
    return kept
