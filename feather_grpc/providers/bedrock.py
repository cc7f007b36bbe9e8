"""Amazon Bedrock (type `bedrock`): the Converse and ConverseStream APIs, one format for every model family
on Bedrock (Claude, Llama, Mistral, Nova...), signed with AWS SigV4.

- URL: `{baseUrl}/model/{modelId}/converse` and `/converse-stream`; `baseUrl` defaults to
  `https://bedrock-runtime.{region}.amazonaws.com` (a VPC endpoint or a proxy can replace it).
- Auth: a Bedrock API key (`apiKeyEnv`/`apiKeyFile`) as a bearer token, or else botocore's own SigV4
  signer and credential chain (environment, shared config and profiles with
  `AWS_PROFILE`, web identity on EKS, container and instance metadata), from the optional extra
  `feather-grpc[bedrock]`. Resolving and refreshing credentials blocks (files, STS, metadata endpoints),
  so it runs in a worker thread and its result is shared until 5 minutes before it expires
  (providers/credentials.py); signing one request is a few HMACs, done on the loop.
- ConverseStream answers in the binary AWS event-stream framing, decoded (CRCs checked) by botocore's
  `EventStreamBuffer`; one message may be at most `maxStreamEventBytes` (botocore alone takes 24 MiB).
- Content: images (png, jpeg, gif, webp), PDFs and audio as blocks with inline bytes (Converse fetches no
  URL: routing keeps parts by URL away), images and PDFs in tool results (`status: error` for a failed
  tool); cache breakpoints as `cachePoint` blocks (with their TTL) after the system prompt, a message, a
  part or a tool. A JSON schema goes as `outputConfig.textFormat`; Converse has no schema-less JSON mode.
- Reasoning: for Claude models, extended thinking in `additionalModelRequestFields.thinking` (an effort
  alone maps to a budget, as on the Anthropic API); `reasoningContent` blocks come back as thinking (text
  and signature, or redacted) and go back first in the assistant turn. Other families ask for reasoning
  their own way: a request for it is refused rather than dropped (extra_fields can carry theirs).
- Usage: Bedrock's `inputTokens` excludes cache reads and writes (as Anthropic's does); the engine's
  input count includes `cacheReadInputTokens` and `cacheWriteInputTokens`; `cacheDetails` gives the
  1-hour writes.
- Errors: the type is in the `x-amzn-errortype` header (or an exception event in a stream).
  ThrottlingException is a 429 (retried with backoff), ServiceQuotaExceededException a quota failure (the
  call fails over), ValidationException the request's fault.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import orjson

from feather_grpc.core.errors import ProviderError
from feather_grpc.core.http_client import (
    HttpError,
    UpstreamClient,
    UpstreamEndpoint,
    UpstreamResponse,
    encode_headers,
)
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
from feather_grpc.providers.anthropic import thinking_budget
from feather_grpc.providers.base import (
    SHAPE_ERRORS,
    ProviderSettings,
    b64,
    claude_thinking,
    coalesce,
    consistent,
    estimated_usage,
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
    classify_transport_error,
    error_from_response,
    stream_cut,
    too_large,
)

__all__ = ["BedrockProvider", "default_base_url", "normalise_usage", "sign"]

DEFAULT_MAX_TOKENS = 4096  # sent when the caller sets none, so a model's small default never truncates silently

_FINISH = {
    "end_turn": FinishReason.STOP,
    "stop_sequence": FinishReason.STOP,
    "max_tokens": FinishReason.LENGTH,
    "model_context_window_exceeded": FinishReason.LENGTH,
    "tool_use": FinishReason.TOOL_CALLS,
    "guardrail_intervened": FinishReason.CONTENT_FILTER,
    "content_filtered": FinishReason.CONTENT_FILTER,
}

# Exception type (header or stream event, any case) -> the HTTP status Bedrock sends it with.
_ERROR_STATUS = {
    "throttlingexception": 429,
    "modelnotreadyexception": 429,
    "servicequotaexceededexception": 429,  # reported as a quota failure below, not retried
    "validationexception": 400,
    "accessdeniedexception": 403,
    "unrecognizedclientexception": 403,
    "invalidsignatureexception": 403,
    "expiredtokenexception": 403,
    "resourcenotfoundexception": 404,
    "modeltimeoutexception": 408,
    "modelerrorexception": 424,
    "modelstreamerrorexception": 500,  # the model failed mid-stream: another attempt may succeed
    "internalserverexception": 500,
    "serviceunavailableexception": 503,
}


def default_base_url(region: str) -> str:
    return f"https://bedrock-runtime.{region}.amazonaws.com"


def finish_reason(raw: object) -> FinishReason:
    return _FINISH.get(raw, FinishReason.UNSPECIFIED) if isinstance(raw, str) else FinishReason.UNSPECIFIED


def normalise_usage(raw: dict[str, Any]) -> Usage:
    """`cacheDetails` splits the cache writes by TTL: the 1-hour ones are priced apart."""
    read = token_count(raw.get("cacheReadInputTokens"))
    write = token_count(raw.get("cacheWriteInputTokens"))
    details = raw.get("cacheDetails")
    one_hour = 0
    if isinstance(details, list):
        one_hour = sum(
            token_count(d.get("inputTokens")) for d in details if isinstance(d, dict) and d.get("ttl") == "1h"
        )
    return consistent(
        Usage(
            input_tokens=token_count(raw.get("inputTokens")) + read + write,
            output_tokens=token_count(raw.get("outputTokens")),
            cached_input_tokens=read,
            cache_write_tokens=write,
            cache_write_1h_tokens=min(one_hour, write),
        )
    )


# Converse's ImageFormat values by media type.
_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9\s\-()\[\]]+")


def _refuse(what: str) -> ProviderError:
    return ProviderError("UPSTREAM_BAD_REQUEST", f"the Bedrock Converse API {what}", retryable=False)


def _source(p: Part) -> dict[str, Any]:
    """Inline bytes: Converse fetches no URL (routing keeps parts by URL away from it)."""
    if p.url:
        raise _refuse(f"takes {p.kind.value}s as bytes, not by URL")
    return {"bytes": b64(p.data)}


def _document_name(p: Part, n: int) -> str:
    """DocumentBlock.name allows letters, digits, single spaces, hyphens, parentheses and brackets."""
    name = " ".join(
        _NAME_UNSAFE.sub(" ", p.title.rsplit(".", 1)[0] if p.title.lower().endswith(".pdf") else p.title).split()
    )
    return name[:200] or f"document {n}"


def _block(p: Part, n: int, *, tool_result: bool = False) -> dict[str, Any]:
    """One content part as a Converse ContentBlock (ToolResultContentBlock for text, images and documents)."""
    if p.kind is PartKind.TEXT:
        return {"text": p.text}
    source = _source(p)
    if p.kind is PartKind.IMAGE:
        fmt = _IMAGE_FORMATS.get(p.media_type.lower())
        if fmt is None:
            raise _refuse(f"takes png, jpeg, gif or webp images, not {p.media_type!r}")
        return {"image": {"format": fmt, "source": source}}
    if p.kind is PartKind.DOCUMENT:
        return {"document": {"format": "pdf", "name": _document_name(p, n), "source": source}}
    if tool_result:  # ToolResultContentBlock has no audio
        raise _refuse("takes no audio in a tool result")
    return {"audio": {"format": p.media_type, "source": source}}


def _cache_point(ttl: str | None) -> list[dict[str, Any]]:
    """A breakpoint as the cachePoint block that follows what it caches ("" is the default TTL, 5 minutes)."""
    if ttl is None:
        return []
    return [{"cachePoint": {"type": "default", "ttl": ttl} if ttl else {"type": "default"}}]


def _content(m: Message, counter: list[int]) -> list[dict[str, Any]]:
    """The message's content blocks with their cache points (none inside a tool result, where Converse takes
    none: the message's own breakpoint follows the result); Converse rejects empty text blocks."""
    if not m.parts:
        return [{"text": m.content}] if m.content else []
    tool_result = m.role is Role.TOOL
    blocks: list[dict[str, Any]] = []
    for p in m.parts:
        if p.kind is PartKind.TEXT and not p.text:
            continue
        if p.kind is PartKind.DOCUMENT:
            counter[0] += 1
        blocks.append(_block(p, counter[0], tool_result=tool_result))
        if not tool_result:
            blocks += _cache_point(p.cache_ttl)
    return blocks


def _reasoning_block(t: ThinkingBlock) -> dict[str, Any]:
    if t.redacted_data:
        return {"reasoningContent": {"redactedContent": t.redacted_data}}
    return {"reasoningContent": {"reasoningText": {"text": t.text, "signature": t.signature}}}


def _claude(model: str) -> bool:
    """A Claude model id, plain or an inference profile (`us.anthropic.claude-...`, an ARN naming one)."""
    return "anthropic.claude" in model


def sign(credentials: Any, region: str, url: str, body: bytes) -> list[tuple[str, str]]:
    """The SigV4 headers (X-Amz-Date, X-Amz-Security-Token when the credentials have a session token,
    Authorization) of a POST of `body` to `url` with `Content-Type: application/json`, made by botocore's
    signer. The request sent must carry exactly that Host (the URL's), path, Content-Type and body."""
    auth: Any = load("botocore.auth")
    awsrequest: Any = load("botocore.awsrequest")
    request = awsrequest.AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": "application/json"})
    auth.SigV4Auth(credentials, "bedrock", region).add_auth(request)
    return [(name, str(value)) for name, value in request.headers.items() if name.lower() != "content-type"]


def _error_type(raw: str) -> str:
    """`ThrottlingException:http://internal.amazon.com/coral/...` -> `throttlingexception`."""
    return raw.split(":", 1)[0].strip().lower()


def _reclassify(provider: str, error: ProviderError, error_type: str, message: str) -> ProviderError:
    if error_type == "servicequotaexceededexception":
        body = UpstreamErrorBody("insufficient_quota", "ServiceQuotaExceededException", message)
        return classify_status(provider, 429, body)
    return error


class BedrockProvider:
    def __init__(self, settings: ProviderSettings, session: UpstreamClient) -> None:
        self.settings = settings
        self._name = settings.name
        self._region = settings.region
        self._base = (settings.base_url or default_base_url(settings.region)).rstrip("/")
        self._session = session
        self._headers = [("Content-Type", "application/json"), *settings.extra_headers]
        if settings.api_key:  # a Bedrock API key: a bearer token instead of SigV4
            self._headers.append(("Authorization", f"Bearer {settings.api_key}"))
        self._endpoints: dict[tuple[str, bool], UpstreamEndpoint] = {}
        self._max_output = dict(settings.max_output_tokens)
        self._credentials: CachedCredential[Any] = CachedCredential(settings.name, _aws_fetcher())
        # botocore logs canonical requests at DEBUG, session token included: never let that reach our logs.
        logging.getLogger("botocore").setLevel(max(logging.getLogger("botocore").getEffectiveLevel(), logging.INFO))

    def _endpoint(self, model: str, stream: bool) -> UpstreamEndpoint:
        key = (model, stream)
        endpoint = self._endpoints.get(key)
        if endpoint is None:  # one per configured model and mode: the config bounds this map
            path = "converse-stream" if stream else "converse"
            url = f"{self._base}/model/{quote(model, safe='')}/{path}"
            endpoint = self._endpoints[key] = self._session.endpoint(url, self._headers, self.settings.egress)
        return endpoint

    async def _signed(self, endpoint: UpstreamEndpoint, body: bytes) -> bytes:
        if self.settings.api_key:
            return b""
        credentials = await self._credentials.get()
        return encode_headers(sign(credentials, self._region, endpoint.url, body))

    def build_body(self, request: ChatRequest, model: str = "") -> dict[str, Any]:
        system: list[dict[str, Any]] = []
        turns: list[dict[str, Any]] = []
        documents = [0]  # numbers the documents that have no title of their own
        for m in request.messages:
            if m.role is Role.SYSTEM:
                system += [{"text": m.text}] if m.text else []
                system += _cache_point(m.cache_ttl)
                continue
            blocks: list[dict[str, Any]] = []
            if m.role is Role.TOOL:
                role = "user"
                content = _content(m, documents) or [{"text": m.content}]
                result: dict[str, Any] = {"toolUseId": m.tool_call_id, "content": content}
                if m.is_error:
                    result["status"] = "error"
                blocks.append({"toolResult": result})
            else:
                role = "assistant" if m.role is Role.ASSISTANT else "user"
                # Thinking first, exactly as the reply carried it (Claude checks the signatures).
                blocks += [_reasoning_block(t) for t in claude_thinking(m.thinking)]
                blocks += _content(m, documents)
                for call in m.tool_calls:
                    tool_input = tool_arguments(self._name, call.id, call.arguments)
                    blocks.append({"toolUse": {"toolUseId": call.id, "name": call.name, "input": tool_input}})
            if blocks and "cachePoint" not in blocks[-1]:  # one breakpoint where a part and its message meet
                blocks += _cache_point(m.cache_ttl)
            if turns and turns[-1]["role"] == role:  # Converse needs alternating turns
                turns[-1]["content"].extend(blocks)
            else:
                turns.append({"role": role, "content": blocks})
        body: dict[str, Any] = {"messages": turns}
        if system:
            body["system"] = system
        budget = thinking_budget(request)
        max_tokens = request.max_tokens
        if max_tokens is None:
            # The model's configured longest reply; else room for the answer besides any thinking budget.
            max_tokens = self._max_output.get(model) or DEFAULT_MAX_TOKENS + (budget or 0)
        config: dict[str, Any] = {"maxTokens": max_tokens}
        if request.temperature is not None:
            config["temperature"] = request.temperature
        if request.top_p is not None:
            config["topP"] = request.top_p
        if request.stop:
            config["stopSequences"] = list(request.stop)
        body["inferenceConfig"] = config
        if budget is not None:
            if not _claude(model):
                # Each family asks for reasoning its own way (additionalModelRequestFields): only Claude's
                # is known here; extra_fields can carry another's.
                raise _refuse(f"is sent reasoning options only for Claude models, not {model!r}")
            # Claude's extended thinking, as on the Anthropic API (an effort alone maps to a budget).
            body["additionalModelRequestFields"] = {"thinking": {"type": "enabled", "budget_tokens": budget}}
        fmt = request.response_format
        if fmt is not None and fmt.type == "json_schema":
            structure: dict[str, Any] = {"schema": orjson.dumps(fmt.json_schema or {}).decode()}
            if fmt.schema_name:
                structure["name"] = fmt.schema_name
            body["outputConfig"] = {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": structure}}}
        choice = request.tool_choice
        no_tools = choice is not None and choice.mode == "none" and not choice.function_name
        # Converse has no "none": leaving the tools out keeps the model from calling them, but a conversation
        # that already has tool turns must still declare them (then the model may call one regardless).
        history = any("toolUse" in b or "toolResult" in b for t in turns for b in t["content"])
        if request.tools and (not no_tools or history):
            tools: list[dict[str, Any]] = []
            for t in request.tools:
                spec: dict[str, Any] = {"name": t.name}
                if t.description:
                    spec["description"] = t.description
                spec["inputSchema"] = {"json": t.parameters if t.parameters is not None else {"type": "object"}}
                if t.strict:
                    spec["strict"] = True
                tools.append({"toolSpec": spec})
                tools += _cache_point(t.cache_ttl)
            tool_config: dict[str, Any] = {"tools": tools}
            if choice is not None and choice.function_name:
                tool_config["toolChoice"] = {"tool": {"name": choice.function_name}}
            elif choice is not None and choice.mode == "required":
                tool_config["toolChoice"] = {"any": {}}
            elif choice is not None and choice.mode in ("auto", "none"):
                tool_config["toolChoice"] = {"auto": {}}
            body["toolConfig"] = tool_config
        return merge_fields(body, self.settings, request)

    async def chat(self, model: str, request: ChatRequest) -> ProviderResponse:
        payload = orjson.dumps(self.build_body(request, model))
        endpoint = self._endpoint(model, stream=False)
        headers = await self._signed(endpoint, payload)
        name = self._name
        try:
            resp = await endpoint.request(payload, headers)
            try:
                if resp.status >= 300:
                    raise await self._error(resp)
                raw = await resp.read(self.settings.max_response_bytes)
                upstream = UpstreamReply(id=resp.headers.get("x-amzn-requestid", ""))  # Bedrock's name for the reply
            finally:
                resp.close()
        except HttpError as exc:
            raise classify_transport_error(name, exc, api_key=self.settings.api_key) from exc
        try:
            doc = orjson.loads(raw)
            content = doc["output"]["message"]["content"]
            texts: list[str] = []
            calls: list[ToolCall] = []
            thinking: list[ThinkingBlock] = []
            for block in content:
                if "text" in block:
                    texts.append(wire_str(block["text"]))
                elif "toolUse" in block:
                    use = block["toolUse"]
                    arguments = orjson.dumps(use.get("input") or {}).decode()
                    calls.append(ToolCall(wire_str(use.get("toolUseId")), wire_str(use["name"]), arguments))
                elif "reasoningContent" in block:
                    reasoning = block["reasoningContent"]
                    if "redactedContent" in reasoning:
                        thinking.append(ThinkingBlock(redacted_data=wire_str(reasoning["redactedContent"])))
                    else:
                        said = reasoning.get("reasoningText") or {}
                        thinking.append(ThinkingBlock(wire_str(said.get("text")), wire_str(said.get("signature"))))
            raw_usage = doc.get("usage")
            stop = doc.get("stopReason")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise bad_response(name, "not a Converse response") from None
        text = "".join(texts)
        finish = finish_reason(stop)
        if calls and finish in (FinishReason.STOP, FinishReason.UNSPECIFIED):
            finish = FinishReason.TOOL_CALLS
        if not isinstance(raw_usage, dict):
            usage = estimated_usage(request, text, calls)
            return ProviderResponse(text, calls, finish, usage, True, thinking, upstream)
        return ProviderResponse(text, calls, finish, normalise_usage(raw_usage), thinking=thinking, upstream=upstream)

    async def stream(self, model: str, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        payload = orjson.dumps(self.build_body(request, model))
        endpoint = self._endpoint(model, stream=True)
        headers = await self._signed(endpoint, payload)
        name = self._name
        started = False
        reader = _EventReader(name)
        try:
            resp = await endpoint.request(payload, headers)
            try:
                if resp.status >= 300:
                    raise await self._error(resp)
                started = True
                reader.request_id = resp.headers.get("x-amzn-requestid", "")  # Bedrock's name for the reply
                if reader.request_id:  # said before any event: a cut stream still names its reply
                    yield ReplyId(reader.request_id)
                eventstream: Any = load("botocore.eventstream")
                buffer = eventstream.EventStreamBuffer()
                limit = self.settings.max_stream_event_bytes
                pending = 0
                async for chunk in resp:
                    buffer.add_data(chunk)
                    pending += len(chunk)
                    batch: list[StreamEvent] = []
                    try:
                        for message in buffer:
                            pending -= message.prelude.total_length
                            if message.prelude.total_length > limit:  # arrived whole in one read
                                raise too_large(name, "event-stream message", limit, "maxStreamEventBytes")
                            batch += reader.handle(message.headers, message.payload)
                            if reader.done:
                                break
                    except eventstream.ParserError as e:
                        raise bad_response(name, f"event stream: {type(e).__name__}") from None
                    except ProviderError as e:
                        for out in coalesce(batch):
                            yield out
                        raise e from None
                    except SHAPE_ERRORS:  # an event whose JSON is not in the API's shape
                        for out in coalesce(batch):
                            yield out
                        raise bad_response(name, "a stream event is not in the API's shape") from None
                    for out in coalesce(batch):
                        yield out
                    if reader.done:
                        break
                    if pending > limit:  # a message still arriving is already too large
                        raise too_large(name, "event-stream message", limit, "maxStreamEventBytes")
                if not reader.done:
                    raise stream_cut(name, "ended without messageStop and metadata")
                resp.release_after_end()
            finally:
                resp.close()
        except HttpError as exc:
            raise classify_transport_error(name, exc, streaming=started, api_key=self.settings.api_key) from exc
        try:
            final = reader.finish()
        except SHAPE_ERRORS:  # what the stream said, read at its end (its usage...), is not in the API's shape
            raise bad_response(name, "the stream's end is not in the API's shape") from None
        yield final

    async def _error(self, resp: UpstreamResponse) -> ProviderError:
        error_type = resp.headers.get("x-amzn-errortype", "").split(":", 1)[0].strip()
        error = await error_from_response(self._name, resp, self.settings.api_key, error_type=error_type)
        return _reclassify(self._name, error, error_type.lower(), error.message)

    async def aclose(self) -> None:
        await self._credentials.aclose()


class _EventReader:
    """ConverseStream events -> stream events. The stream is done once both messageStop (the stop
    reason) and metadata (the usage, which follows it) arrived."""

    __slots__ = ("_name", "_ordinals", "_stop", "_thoughts", "_usage", "done", "request_id")

    def __init__(self, name: str) -> None:
        self._name = name
        self._stop: object = None
        self._usage: dict[str, Any] | None = None
        self._ordinals: dict[int, int] = {}  # contentBlockIndex of a toolUse block -> tool-call ordinal
        self._thoughts: dict[int, int] = {}  # contentBlockIndex of a reasoning block -> thinking block ordinal
        self.done = False
        self.request_id = ""  # the response's x-amzn-RequestId

    def handle(self, headers: dict[str, Any], payload: bytes) -> list[StreamEvent]:
        kind = headers.get(":message-type")
        if kind == "exception" or kind == "error":
            raise self._exception(headers, payload)
        event = headers.get(":event-type")
        try:
            obj = orjson.loads(payload) if payload else {}
        except ValueError:
            obj = None
        if not isinstance(obj, dict):
            raise bad_response(self._name, "event payload is not a JSON object")
        if event == "contentBlockDelta":
            delta = obj.get("delta") or {}
            if "text" in delta:
                return [TextDelta(wire_str(delta["text"]))] if delta["text"] else []
            use = delta.get("toolUse")
            index = obj.get("contentBlockIndex")
            if isinstance(use, dict) and index in self._ordinals:
                return [ToolCallDelta(self._ordinals[index], arguments=wire_str(use.get("input")))]
            reasoning = delta.get("reasoningContent")
            if isinstance(reasoning, dict) and isinstance(index, int):
                ordinal = self._thoughts.setdefault(index, len(self._thoughts))
                return [
                    ThinkingDelta(
                        ordinal,
                        wire_str(reasoning.get("text")),
                        wire_str(reasoning.get("signature")),
                        wire_str(reasoning.get("redactedContent")),
                    )
                ]
            return []  # citations and others
        if event == "contentBlockStart":
            use = (obj.get("start") or {}).get("toolUse")
            index = obj.get("contentBlockIndex")
            if isinstance(use, dict) and isinstance(index, int):
                ordinal = self._ordinals[index] = len(self._ordinals)
                return [ToolCallDelta(ordinal, wire_str(use.get("toolUseId")), wire_str(use.get("name")), "")]
            return []
        if event == "messageStop":
            self._stop = obj.get("stopReason")
        elif event == "metadata":
            usage = obj.get("usage")
            self._usage = usage if isinstance(usage, dict) else None
            self.done = True
        return []

    def _exception(self, headers: dict[str, Any], payload: bytes) -> ProviderError:
        error_type = str(headers.get(":exception-type") or headers.get(":error-code") or "")
        try:
            doc = orjson.loads(payload)
            message = str(doc.get("message") or doc.get("Message") or "") if isinstance(doc, dict) else ""
        except ValueError:
            message = ""
        lowered = _error_type(error_type)
        status = _ERROR_STATUS.get(lowered, 500)
        error = classify_status(self._name, status, UpstreamErrorBody(error_type, "", message))
        return _reclassify(self._name, error, lowered, message)

    def finish(self) -> StreamFinish:
        finish = finish_reason(self._stop)
        if self._ordinals and finish in (FinishReason.STOP, FinishReason.UNSPECIFIED):
            finish = FinishReason.TOOL_CALLS
        usage = normalise_usage(self._usage) if self._usage is not None else None
        return StreamFinish(finish, usage, UpstreamReply(id=self.request_id))


def _aws_fetcher() -> Any:
    session: Any = None

    def fetch() -> tuple[Any, float | None]:
        nonlocal session
        if session is None:
            botocore_session: Any = load("botocore.session")
            session = botocore_session.get_session()
        credentials = session.get_credentials()
        if credentials is None:
            raise RuntimeError("no AWS credentials found (environment, shared config, web identity, metadata)")
        frozen = credentials.get_frozen_credentials()
        expiry = getattr(credentials, "_expiry_time", None)  # RefreshableCredentials: STS, metadata, SSO...
        return frozen, (expiry.timestamp() if expiry is not None else None)

    return fetch
