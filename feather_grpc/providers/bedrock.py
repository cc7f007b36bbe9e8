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
- Usage: Bedrock's `inputTokens` excludes cache reads and writes (as Anthropic's does); the engine's
  input count includes `cacheReadInputTokens` and `cacheWriteInputTokens`.
- Errors: the type is in the `x-amzn-errortype` header (or an exception event in a stream).
  ThrottlingException is a 429 (retried with backoff), ServiceQuotaExceededException a quota failure (the
  call fails over), ValidationException the request's fault.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

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
from feather_grpc.providers.anthropic import _tool_input
from feather_grpc.providers.base import ProviderSettings, coalesce, consistent, estimated_usage, token_count
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
from feather_grpc.providers.transport import Endpoint, HttpClient, HttpError, Response, encode_headers

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
    read = token_count(raw.get("cacheReadInputTokens"))
    write = token_count(raw.get("cacheWriteInputTokens"))
    return consistent(
        Usage(
            input_tokens=token_count(raw.get("inputTokens")) + read + write,
            output_tokens=token_count(raw.get("outputTokens")),
            cached_input_tokens=read,
            cache_write_tokens=write,
        )
    )


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
    def __init__(self, settings: ProviderSettings, session: HttpClient) -> None:
        self.settings = settings
        self._name = settings.name
        self._region = settings.region
        self._base = (settings.base_url or default_base_url(settings.region)).rstrip("/")
        self._session = session
        self._headers = [("Content-Type", "application/json"), *settings.extra_headers]
        if settings.api_key:  # a Bedrock API key: a bearer token instead of SigV4
            self._headers.append(("Authorization", f"Bearer {settings.api_key}"))
        self._endpoints: dict[tuple[str, bool], Endpoint] = {}
        self._credentials: CachedCredential[Any] = CachedCredential(settings.name, _aws_fetcher())
        # botocore logs canonical requests at DEBUG, session token included: never let that reach our logs.
        logging.getLogger("botocore").setLevel(max(logging.getLogger("botocore").getEffectiveLevel(), logging.INFO))

    def _endpoint(self, model: str, stream: bool) -> Endpoint:
        key = (model, stream)
        endpoint = self._endpoints.get(key)
        if endpoint is None:  # one per configured model and mode: the config bounds this map
            path = "converse-stream" if stream else "converse"
            url = f"{self._base}/model/{quote(model, safe='')}/{path}"
            endpoint = self._endpoints[key] = self._session.endpoint(url, self._headers, self.settings.egress)
        return endpoint

    async def _signed(self, endpoint: Endpoint, body: bytes) -> bytes:
        if self.settings.api_key:
            return b""
        credentials = await self._credentials.get()
        return encode_headers(sign(credentials, self._region, endpoint.url, body))

    def build_body(self, request: ChatRequest) -> dict[str, Any]:
        system: list[dict[str, Any]] = []
        turns: list[dict[str, Any]] = []
        for m in request.messages:
            if m.role is Role.SYSTEM:
                if m.content:
                    system.append({"text": m.content})
                continue
            blocks: list[dict[str, Any]] = []
            if m.role is Role.TOOL:
                role = "user"
                result = {"toolUseId": m.tool_call_id, "content": [{"text": m.content}]}
                blocks.append({"toolResult": result})
            else:
                role = "assistant" if m.role is Role.ASSISTANT else "user"
                if m.content:  # Converse rejects empty text blocks
                    blocks.append({"text": m.content})
                for call in m.tool_calls:
                    tool_input = _tool_input(self._name, call.id, call.arguments)
                    blocks.append({"toolUse": {"toolUseId": call.id, "name": call.name, "input": tool_input}})
            if turns and turns[-1]["role"] == role:  # Converse needs alternating turns
                turns[-1]["content"].extend(blocks)
            else:
                turns.append({"role": role, "content": blocks})
        body: dict[str, Any] = {"messages": turns}
        if system:
            body["system"] = system
        config: dict[str, Any] = {
            "maxTokens": request.max_tokens if request.max_tokens is not None else DEFAULT_MAX_TOKENS
        }
        if request.temperature is not None:
            config["temperature"] = request.temperature
        if request.top_p is not None:
            config["topP"] = request.top_p
        if request.stop:
            config["stopSequences"] = list(request.stop)
        body["inferenceConfig"] = config
        choice = request.tool_choice
        no_tools = choice is not None and choice.mode == "none" and not choice.function_name
        # Converse has no "none": leaving the tools out keeps the model from calling them, but a conversation
        # that already has tool turns must still declare them (then the model may call one regardless).
        history = any("toolUse" in b or "toolResult" in b for t in turns for b in t["content"])
        if request.tools and (not no_tools or history):
            tools = []
            for t in request.tools:
                spec: dict[str, Any] = {"name": t.name}
                if t.description:
                    spec["description"] = t.description
                spec["inputSchema"] = {"json": t.parameters if t.parameters is not None else {"type": "object"}}
                tools.append({"toolSpec": spec})
            tool_config: dict[str, Any] = {"tools": tools}
            if choice is not None and choice.function_name:
                tool_config["toolChoice"] = {"tool": {"name": choice.function_name}}
            elif choice is not None and choice.mode == "required":
                tool_config["toolChoice"] = {"any": {}}
            elif choice is not None and choice.mode in ("auto", "none"):
                tool_config["toolChoice"] = {"auto": {}}
            body["toolConfig"] = tool_config
        return body

    async def chat(self, model: str, request: ChatRequest) -> ProviderResponse:
        payload = orjson.dumps(self.build_body(request))
        endpoint = self._endpoint(model, stream=False)
        headers = await self._signed(endpoint, payload)
        name = self._name
        try:
            resp = await endpoint.request(payload, headers)
            try:
                if resp.status >= 300:
                    raise await self._error(resp)
                raw = await resp.read(self.settings.max_response_bytes)
            finally:
                resp.close()
        except HttpError as exc:
            raise classify_transport_error(name, exc, api_key=self.settings.api_key) from exc
        try:
            doc = orjson.loads(raw)
            content = doc["output"]["message"]["content"]
            texts: list[str] = []
            calls: list[ToolCall] = []
            for block in content:
                if "text" in block:
                    texts.append(str(block["text"]))
                elif "toolUse" in block:
                    use = block["toolUse"]
                    arguments = orjson.dumps(use.get("input") or {}).decode()
                    calls.append(ToolCall(str(use.get("toolUseId") or ""), str(use["name"]), arguments))
                # reasoningContent and other blocks are not part of the engine's reply (yet)
            raw_usage = doc.get("usage")
            stop = doc.get("stopReason")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise bad_response(name, "not a Converse response") from None
        text = "".join(texts)
        finish = finish_reason(stop)
        if calls and finish in (FinishReason.STOP, FinishReason.UNSPECIFIED):
            finish = FinishReason.TOOL_CALLS
        if not isinstance(raw_usage, dict):
            return ProviderResponse(text, calls, finish, estimated_usage(request, text, calls), True)
        return ProviderResponse(text, calls, finish, normalise_usage(raw_usage))

    async def stream(self, model: str, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        payload = orjson.dumps(self.build_body(request))
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
        yield reader.finish()

    async def _error(self, resp: Response) -> ProviderError:
        error_type = resp.headers.get("x-amzn-errortype", "").split(":", 1)[0].strip()
        error = await error_from_response(self._name, resp, self.settings.api_key, error_type=error_type)
        return _reclassify(self._name, error, error_type.lower(), error.message)

    async def aclose(self) -> None:
        await self._credentials.aclose()


class _EventReader:
    """ConverseStream events -> stream events. The stream is done once both messageStop (the stop
    reason) and metadata (the usage, which follows it) arrived."""

    __slots__ = ("_name", "_ordinals", "_stop", "_usage", "done")

    def __init__(self, name: str) -> None:
        self._name = name
        self._stop: object = None
        self._usage: dict[str, Any] | None = None
        self._ordinals: dict[int, int] = {}  # contentBlockIndex of a toolUse block -> tool-call ordinal
        self.done = False

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
                return [TextDelta(str(delta["text"]))] if delta["text"] else []
            use = delta.get("toolUse")
            index = obj.get("contentBlockIndex")
            if isinstance(use, dict) and index in self._ordinals:
                return [ToolCallDelta(self._ordinals[index], arguments=str(use.get("input") or ""))]
            return []  # reasoningContent and others
        if event == "contentBlockStart":
            use = (obj.get("start") or {}).get("toolUse")
            index = obj.get("contentBlockIndex")
            if isinstance(use, dict) and isinstance(index, int):
                ordinal = self._ordinals[index] = len(self._ordinals)
                return [ToolCallDelta(ordinal, str(use.get("toolUseId") or ""), str(use.get("name") or ""), "")]
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
        return StreamFinish(finish, normalise_usage(self._usage) if self._usage is not None else None)


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
