"""Google Gemini: types `gemini` (the Gemini API of Google AI Studio, an API key) and `vertex` (Vertex AI,
Application Default Credentials), one wire format: generateContent and streamGenerateContent (SSE).

- gemini: `{baseUrl}/models/{model}:generateContent`, `baseUrl` default
  `https://generativelanguage.googleapis.com/v1beta`, the key in `x-goog-api-key`.
- vertex: `{baseUrl}/projects/{project}/locations/{region}/publishers/google/models/{model}:generateContent`,
  `baseUrl` default `https://{region}-aiplatform.googleapis.com/v1` (`aiplatform.googleapis.com` for the
  `global` location); a bearer token from google-auth's ADC (GOOGLE_APPLICATION_CREDENTIALS, gcloud's
  user credentials, workload identity, the metadata server), refreshed in a worker thread and cached
  until 5 minutes before it expires (the optional extra `feather-grpc[vertex]`).
- Messages: system messages become `systemInstruction`; assistant turns are role `model`; tool calls are
  `functionCall` parts and tool results `functionResponse` parts (named after the call they answer).
  JSON output: `responseMimeType: application/json`, with `responseJsonSchema` for a JSON schema.
  Images, PDFs and audio go as `inlineData` (bytes) or `fileData` (a URL), in a tool result as the
  `functionResponse`'s parts; a failed tool's result goes under `error`.
- Thinking: a request's token budget is `thinkingConfig.thinkingBudget`, its effort `thinkingLevel`
  (Gemini 3), "none" a budget of 0; else a model's configured `thinkingBudget`. Thought summaries come back
  as the reply's thinking, and the turn's `thoughtSignature` as its signature, sent back on the first
  function call (Gemini 3 requires it in tool loops). Cache breakpoints have no Gemini equivalent (its
  caching is implicit, or a cachedContent resource): they are not sent, as for OpenAI.
- Claude on Vertex: a vertex model whose name starts with `claude` is served in the Anthropic Messages
  format (`publishers/anthropic/models/{model}:rawPredict` and `:streamRawPredict`, `anthropic_version`
  vertex-2023-10-16 in the body), with the same ADC token.
- Usage: `promptTokenCount` includes `cachedContentTokenCount`; thinking tokens (`thoughtsTokenCount`) are
  billed as output and reported as reasoning; thought parts are not part of the reply's text.
"""

from __future__ import annotations

import datetime
import mimetypes
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Any
from urllib.parse import quote

import orjson

from feather_grpc.core.errors import ProviderError
from feather_grpc.core.http_client import UpstreamClient, UpstreamEndpoint, UpstreamResponse, encode_headers
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
from feather_grpc.providers.anthropic import AnthropicProvider
from feather_grpc.providers.base import (
    GEMINI_SIGNATURE,
    SHAPE_ERRORS,
    ProviderSettings,
    b64,
    consistent,
    estimated_usage,
    label_str,
    merge_fields,
    token_count,
    tool_arguments,
    wire_str,
)
from feather_grpc.providers.credentials import CachedCredential, load
from feather_grpc.providers.http import (
    UpstreamErrorBody,
    bad_response,
    classify_status,
    post_json,
)
from feather_grpc.providers.sse import SSEEvent
from feather_grpc.providers.streaming import stream_sse

__all__ = ["GEMINI_BASE_URL", "GeminiProvider", "normalise_usage", "vertex_base_url"]

GEMINI_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"
VERTEX_SCOPE = "https://www.googleapis.com/auth/cloud-platform"
VERTEX_ANTHROPIC_VERSION = "vertex-2023-10-16"

_FINISH = {
    "STOP": FinishReason.STOP,
    "MAX_TOKENS": FinishReason.LENGTH,
    "SAFETY": FinishReason.CONTENT_FILTER,
    "RECITATION": FinishReason.CONTENT_FILTER,
    "BLOCKLIST": FinishReason.CONTENT_FILTER,
    "PROHIBITED_CONTENT": FinishReason.CONTENT_FILTER,
    "SPII": FinishReason.CONTENT_FILTER,
    "IMAGE_SAFETY": FinishReason.CONTENT_FILTER,
}

# Google's error `status` -> the HTTP status it comes with (for errors inside a stream).
_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}


def vertex_base_url(region: str) -> str:
    host = "aiplatform.googleapis.com" if region == "global" else f"{region}-aiplatform.googleapis.com"
    return f"https://{host}/v1"


def normalise_usage(raw: dict[str, Any]) -> Usage:
    thoughts = token_count(raw.get("thoughtsTokenCount"))
    return consistent(
        Usage(
            input_tokens=token_count(raw.get("promptTokenCount")) + token_count(raw.get("toolUsePromptTokenCount")),
            output_tokens=token_count(raw.get("candidatesTokenCount")) + thoughts,
            cached_input_tokens=token_count(raw.get("cachedContentTokenCount")),
            reasoning_tokens=thoughts,
            # Audio is priced apart (Gemini 2.5 Flash: 3.3x text input), and told apart only by modality.
            audio_input_tokens=max(_audio(raw.get("promptTokensDetails")) - _audio(raw.get("cacheTokensDetails")), 0),
            audio_output_tokens=_audio(raw.get("candidatesTokensDetails")),
        )
    )


def _audio(details: object) -> int:
    """The AUDIO tokens of a list of ModalityTokenCount."""
    if not isinstance(details, list):
        return 0
    audio = (d for d in details if isinstance(d, dict) and d.get("modality") == "AUDIO")
    return sum(token_count(d.get("tokenCount")) for d in audio)


def _finish(raw: object, has_calls: bool) -> FinishReason:
    reason = _FINISH.get(raw, FinishReason.UNSPECIFIED) if isinstance(raw, str) else FinishReason.UNSPECIFIED
    if has_calls and reason in (FinishReason.STOP, FinishReason.UNSPECIFIED):
        return FinishReason.TOOL_CALLS
    return reason


def _media_type(p: Part) -> str:
    if p.kind is PartKind.DOCUMENT:
        return "application/pdf"
    if p.kind is PartKind.AUDIO:
        return f"audio/{p.media_type}"  # the audio's format: "wav" -> audio/wav, "mp3" -> audio/mp3
    if p.media_type:
        return p.media_type
    guessed, _ = mimetypes.guess_type(p.url)  # an image by URL names no type: its extension does
    return guessed or ""


def _media(p: Part) -> dict[str, Any]:
    """An image, PDF or audio part as Gemini's inlineData (bytes) or fileData (a URL: gs://, https://, or a
    Files API URI), the shapes of google-genai's Blob and FileData (FunctionResponseBlob/FileData alike)."""
    if p.url:
        data: dict[str, Any] = {"fileUri": p.url}
        mime = _media_type(p)
        if mime:
            data["mimeType"] = mime
        return {"fileData": data}
    return {"inlineData": {"mimeType": _media_type(p), "data": b64(p.data)}}


def _parts(m: Message) -> list[dict[str, Any]]:
    """The message's content as Gemini parts; the API rejects empty text parts."""
    if not m.parts:
        return [{"text": m.content}] if m.content else []
    return [
        ({"text": p.text} if p.kind is PartKind.TEXT else _media(p))
        for p in m.parts
        if p.text or p.kind is not PartKind.TEXT
    ]


def thinking_config(request: ChatRequest, configured: int | None) -> dict[str, Any] | None:
    """`thinkingConfig` for the request: its own token budget (`thinkingBudget`), else its effort as
    `thinkingLevel` (minimal..xhigh, Gemini 3's levels; "none" is a budget of 0, which turns thinking off
    where the model allows it), else the model's configured budget. Thought summaries are asked for whenever
    the request asks for reasoning, so they come back as the reply's thinking."""
    if request.thinking_budget is not None:
        return {"thinkingBudget": request.thinking_budget, "includeThoughts": True}
    if request.reasoning_effort == "none":
        return {"thinkingBudget": 0}
    if request.reasoning_effort:
        return {"thinkingLevel": request.reasoning_effort.upper(), "includeThoughts": True}
    if configured is not None:  # the operator's thinking budget for this model (-1: dynamic, 0: off)
        return {"thinkingBudget": configured}
    return None


class GeminiProvider:
    def __init__(self, settings: ProviderSettings, session: UpstreamClient) -> None:
        self.settings = settings
        self._name = settings.name
        self._api_key = settings.api_key
        self._vertex = settings.type == "vertex"
        if self._vertex:
            base = (settings.base_url or vertex_base_url(settings.region)).rstrip("/")
            self._prefix = f"{base}/projects/{quote(settings.project, safe='')}/locations/{settings.region}"
            self._prefix += "/publishers/google/models/"
        else:
            self._prefix = (settings.base_url or GEMINI_BASE_URL).rstrip("/") + "/models/"
        self._headers = [("Content-Type", "application/json")]
        if settings.api_key and not self._vertex:
            self._headers.append(("x-goog-api-key", settings.api_key))
        self._headers += settings.extra_headers
        self._session = session
        self._endpoints: dict[tuple[str, bool], UpstreamEndpoint] = {}
        self._thinking = dict(settings.thinking_budgets)
        self._token: CachedCredential[str] | None = None
        self._claude: VertexClaude | None = None
        if self._vertex:
            self._token = CachedCredential(settings.name, _adc_fetcher())
            anthropic_prefix = self._prefix.replace("/publishers/google/models/", "/publishers/anthropic/models/")
            self._claude = VertexClaude(settings, session, anthropic_prefix, self._request_headers)

    def _endpoint(self, model: str, stream: bool) -> UpstreamEndpoint:
        key = (model, stream)
        endpoint = self._endpoints.get(key)
        if endpoint is None:  # one per configured model and mode: the config bounds this map
            action = "streamGenerateContent?alt=sse" if stream else "generateContent"
            url = f"{self._prefix}{quote(model, safe='')}:{action}"
            endpoint = self._endpoints[key] = self._session.endpoint(url, self._headers, self.settings.egress)
        return endpoint

    async def _request_headers(self) -> bytes:
        if self._token is None:
            return b""
        return encode_headers([("Authorization", f"Bearer {await self._token.get()}")])

    def build_body(self, request: ChatRequest, model: str = "") -> dict[str, Any]:
        system: list[dict[str, Any]] = []
        contents: list[dict[str, Any]] = []
        names: dict[str, str] = {}  # tool-call id -> function name, for the functionResponse that answers it
        for m in request.messages:
            if m.role is Role.SYSTEM:
                if m.text:
                    system.append({"text": m.text})
                continue
            parts: list[dict[str, Any]] = []
            if m.role is Role.TOOL:
                role = "user"
                name = names.get(m.tool_call_id, m.name)
                if not name:
                    raise ProviderError(
                        "UPSTREAM_BAD_REQUEST",
                        f"{self._name}: tool result {m.tool_call_id!r} answers no earlier tool call",
                        retryable=False,
                    )
                try:
                    value = orjson.loads(m.text)
                except ValueError:
                    value = None
                if m.is_error:  # Gemini's convention: the failure under "error" instead of the output
                    response = {"error": value if isinstance(value, dict) else m.text}
                else:
                    response = value if isinstance(value, dict) else {"result": m.text}
                call: dict[str, Any] = {"name": name, "response": response}
                if m.tool_call_id:
                    call["id"] = m.tool_call_id
                media = [_media(p) for p in m.parts if p.kind is not PartKind.TEXT]
                if media:  # images and PDFs a tool returned (FunctionResponse.parts)
                    call["parts"] = media
                parts.append({"functionResponse": call})
            else:
                role = "model" if m.role is Role.ASSISTANT else "user"
                parts.extend(_parts(m))
                for c in m.tool_calls:
                    names[c.id] = c.name
                    args = tool_arguments(self._name, c.id, c.arguments)
                    fc: dict[str, Any] = {"name": c.name, "args": args}
                    if c.id:
                        fc["id"] = c.id
                    parts.append({"functionCall": fc})
                # Only Gemini's own signature (another family's would be refused as invalid).
                signature = next((t.signature for t in m.thinking if t.signature.startswith(GEMINI_SIGNATURE)), "")
                signature = signature.removeprefix(GEMINI_SIGNATURE)
                if signature and parts:
                    # Gemini's thought signature goes back on the part it came with: the first function call
                    # of the turn, else (a reply without calls) the last part.
                    at = next((part for part in parts if "functionCall" in part), parts[-1])
                    at["thoughtSignature"] = signature
            if contents and contents[-1]["role"] == role:
                contents[-1]["parts"].extend(parts)
            else:
                contents.append({"role": role, "parts": parts})
        body: dict[str, Any] = {"contents": contents}
        if system:
            body["systemInstruction"] = {"parts": system}
        config: dict[str, Any] = {}
        if request.max_tokens is not None:
            config["maxOutputTokens"] = request.max_tokens
        if request.temperature is not None:
            config["temperature"] = request.temperature
        if request.top_p is not None:
            config["topP"] = request.top_p
        if request.stop:
            config["stopSequences"] = list(request.stop)
        if request.seed is not None:
            config["seed"] = request.seed
        fmt = request.response_format
        if fmt is not None and fmt.type in ("json_object", "json_schema"):
            config["responseMimeType"] = "application/json"
            if fmt.type == "json_schema" and fmt.json_schema:
                config["responseJsonSchema"] = fmt.json_schema
        thinking = thinking_config(request, self._thinking.get(model))
        if thinking is not None:
            config["thinkingConfig"] = thinking
        if config:
            body["generationConfig"] = config
        if request.tools:
            declarations = []
            for t in request.tools:
                decl: dict[str, Any] = {"name": t.name}
                if t.description:
                    decl["description"] = t.description
                if t.parameters is not None:
                    decl["parametersJsonSchema"] = t.parameters
                declarations.append(decl)
            body["tools"] = [{"functionDeclarations": declarations}]
        merge_fields(body, self.settings, request)
        choice = request.tool_choice
        if choice is not None and (choice.mode or choice.function_name):
            calling: dict[str, Any] = {
                "mode": {"auto": "AUTO", "none": "NONE", "required": "ANY"}.get(choice.mode, "AUTO")
            }
            if choice.function_name:
                calling = {"mode": "ANY", "allowedFunctionNames": [choice.function_name]}
            body["toolConfig"] = {"functionCallingConfig": calling}
        return body

    async def chat(self, model: str, request: ChatRequest) -> ProviderResponse:
        if self._claude is not None and model.startswith("claude"):
            return await self._claude.chat(model, request)
        payload = orjson.dumps(self.build_body(request, model))
        endpoint = self._endpoint(model, stream=False)
        doc = await post_json(
            endpoint,
            self._name,
            payload,
            self._api_key,
            self.settings.max_response_bytes,
            headers=await self._request_headers(),
        )
        reader = _Reader(self._name, self._api_key)
        try:
            if not isinstance(doc, dict):
                raise TypeError
            events = reader.handle(doc)
            final = reader.finish()
        except SHAPE_ERRORS:
            raise bad_response(self._name, "not a GenerateContentResponse") from None
        text = "".join(e.content for e in events if isinstance(e, TextDelta))
        calls = [ToolCall(e.id, e.name, e.arguments) for e in events if isinstance(e, ToolCallDelta)]
        thoughts = [e for e in events if isinstance(e, ThinkingDelta)]
        thinking = [
            ThinkingBlock("".join(e.text for e in thoughts), next((e.signature for e in thoughts if e.signature), ""))
        ]
        thinking = thinking if thoughts else []
        if final.usage is None:
            usage = estimated_usage(request, text, calls)
            return ProviderResponse(text, calls, final.finish_reason, usage, True, thinking, final.upstream)
        return ProviderResponse(
            text, calls, final.finish_reason, final.usage, thinking=thinking, upstream=final.upstream
        )

    def stream(self, model: str, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        # The skeleton's generator itself (as the openai adapter): a layer less for every event, and the
        # request body lives only in `send`, which the skeleton drops once the request is sent.
        if self._claude is not None and model.startswith("claude"):
            return self._claude.stream(model, request)
        payload = orjson.dumps(self.build_body(request, model))
        endpoint = self._endpoint(model, stream=True)
        name = self._name
        reader = _Reader(name, self._api_key)

        async def send() -> UpstreamResponse:
            return await endpoint.request(payload, await self._request_headers())

        def handle(event: SSEEvent) -> list[StreamEvent]:
            try:
                obj = orjson.loads(event.data)
            except ValueError:
                obj = None
            if not isinstance(obj, dict):
                raise bad_response(name, "stream chunk is not a JSON object")
            try:
                return reader.handle(obj)
            except (KeyError, TypeError, AttributeError):
                raise bad_response(name, "not a GenerateContentResponse chunk") from None

        return stream_sse(
            name,
            self._api_key,
            send,
            handle,
            lambda: reader.finish_raw is not None,
            lambda: [reader.finish()],
            end="a finishReason",
            max_event_bytes=self.settings.max_stream_event_bytes,
            read_to_end=True,  # the stream ends with the body; its last chunk carries the finish reason
        )

    async def aclose(self) -> None:
        if self._token is not None:
            await self._token.aclose()


class VertexClaude(AnthropicProvider):
    """Anthropic's Messages format at Vertex AI's URLs, authenticated with the vertex provider's token."""

    def __init__(
        self,
        settings: ProviderSettings,
        session: UpstreamClient,
        prefix: str,
        auth: Callable[[], Awaitable[bytes]],
    ) -> None:
        super().__init__(replace(settings, api_key=""), session)
        self._prefix = prefix
        self._auth = auth
        self._session = session
        self._headers = [("Content-Type", "application/json"), *settings.extra_headers]
        self._endpoints: dict[tuple[str, bool], UpstreamEndpoint] = {}

    def target(self, model: str, *, stream: bool) -> UpstreamEndpoint:
        key = (model, stream)
        endpoint = self._endpoints.get(key)
        if endpoint is None:  # one per configured model and mode
            action = "streamRawPredict" if stream else "rawPredict"
            url = f"{self._prefix}{quote(model, safe='@')}:{action}"
            endpoint = self._endpoints[key] = self._session.endpoint(url, self._headers, self.settings.egress)
        return endpoint

    async def request_headers(self) -> bytes:
        return await self._auth()

    def build_body(self, model: str, request: ChatRequest, *, stream: bool) -> dict[str, Any]:
        fmt = request.response_format
        if fmt is not None and fmt.type == "json_object":
            # Routing keeps schema-less JSON mode away from the Anthropic format; used directly, say so.
            why = f"{self._name}: Claude on Vertex takes a JSON schema, not JSON mode (response_format json_object)"
            raise ProviderError("UPSTREAM_BAD_REQUEST", why, retryable=False)
        body = super().build_body(model, request, stream=stream)
        del body["model"]  # the URL names it
        body["anthropic_version"] = VERTEX_ANTHROPIC_VERSION
        return body


class _Reader:
    """GenerateContentResponse documents (a whole reply, or one stream chunk) -> stream events."""

    __slots__ = ("_api_key", "_blocked", "_calls", "_id", "_name", "_signed", "_usage", "finish_raw")

    def __init__(self, name: str, api_key: str) -> None:
        self._name = name
        self._api_key = api_key
        self._calls = 0
        self._usage: dict[str, Any] | None = None
        self._blocked = False
        self._signed = False
        self._id = ""  # the reply's responseId (every chunk repeats it: the first says it)
        self.finish_raw: object = None

    def handle(self, doc: dict[str, Any]) -> list[StreamEvent]:
        err = doc.get("error")
        if isinstance(err, dict):
            status = str(err.get("status") or "")
            body = UpstreamErrorBody(status, str(err.get("code") or ""), str(err.get("message") or ""))
            raise classify_status(self._name, _STATUS.get(status, 500), body, api_key=self._api_key)
        said_id = not self._id and bool(doc.get("responseId"))
        if said_id:
            self._id = label_str(doc["responseId"])
        usage = doc.get("usageMetadata")
        if isinstance(usage, dict):
            self._usage = usage  # cumulative: the last one wins
        feedback = doc.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            self._blocked = True  # the prompt itself was blocked: no candidates follow
            self.finish_raw = feedback["blockReason"]
        out: list[StreamEvent] = [ReplyId(self._id)] if said_id else []
        for candidate in (doc.get("candidates") or ())[:1]:
            for part in (candidate.get("content") or {}).get("parts") or ():
                signature = part.get("thoughtSignature")
                if signature and not self._signed:  # the turn's signature, kept for the next turn
                    self._signed = True
                    out.append(ThinkingDelta(0, signature=GEMINI_SIGNATURE + wire_str(signature)))
                if part.get("thought"):
                    if part.get("text"):  # a thought summary: the reply's thinking, not its text
                        out.append(ThinkingDelta(0, wire_str(part["text"])))
                    continue
                if part.get("text"):
                    out.append(TextDelta(wire_str(part["text"])))
                elif "functionCall" in part:
                    fc = part["functionCall"]
                    call_id = wire_str(fc.get("id")) or f"call_{self._calls + 1}"
                    arguments = orjson.dumps(fc.get("args") or {}).decode()
                    out.append(ToolCallDelta(self._calls, call_id, wire_str(fc["name"]), arguments))
                    self._calls += 1
            if candidate.get("finishReason"):
                self.finish_raw = candidate["finishReason"]
        return out

    def finish(self) -> StreamFinish:
        finish = FinishReason.CONTENT_FILTER if self._blocked else _finish(self.finish_raw, self._calls > 0)
        usage = normalise_usage(self._usage) if self._usage is not None else None
        return StreamFinish(finish, usage, UpstreamReply(id=self._id))


def _adc_fetcher() -> Any:
    credentials: Any = None

    def fetch() -> tuple[str, float | None]:
        nonlocal credentials
        google_auth: Any = load("google.auth")
        transport: Any = load("google.auth.transport.requests")
        if credentials is None:
            credentials, _ = google_auth.default(scopes=[VERTEX_SCOPE])
        credentials.refresh(transport.Request())
        expiry = credentials.expiry  # naive UTC datetime, or None
        expires = expiry.replace(tzinfo=datetime.UTC).timestamp() if expiry else None
        return str(credentials.token), expires

    return fetch
