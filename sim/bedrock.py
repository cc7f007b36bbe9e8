"""A local Amazon Bedrock runtime: Converse and ConverseStream, SigV4 checked, event-stream framed.

    async with BedrockSimulator(credentials=("AKIDSIM", "secret", None), region="us-east-1") as sim:
        POST {sim.url}/model/{modelId}/converse          -> application/json
        POST {sim.url}/model/{modelId}/converse-stream   -> application/vnd.amazon.eventstream

Every request must carry a SigV4 signature that botocore, re-signing the request as received with the
simulator's credentials, reproduces exactly (else Bedrock's 403 InvalidSignatureException); so must
boto3's requests, which keeps this check honest. Requests are validated as Bedrock does (a user turn
first, alternating roles, non-empty text, tool results answering the previous turn's tool uses).

Default reply: "Hello from <modelId>: <last user text>", stop reason end_turn, usage input = words of
every text + 3 per message, output = words of the reply. `enqueue(BedrockReply(...))` scripts one
request: text, tool uses, stop reason, usage (cache read/write too), an HTTP error with its
`x-amzn-ErrorType`, or a stream exception event after N events. Stream events are the real ones
(messageStart, contentBlockStart/Delta/Stop, messageStop, metadata) with the `p` padding field.
"""

from __future__ import annotations

import asyncio
import struct
import zlib
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

__all__ = ["BedrockReply", "BedrockSimulator", "RecordedSigned", "encode_event", "signature_matches"]


@dataclass(frozen=True, slots=True)
class BedrockReply:
    text: str | None = None  # None: the default reply (no text when there are tool uses)
    tool_uses: tuple[tuple[str, dict[str, Any]], ...] = ()  # (name, input)
    stop_reason: str | None = None  # None: end_turn, or tool_use with tool uses
    input_tokens: int | None = None  # None: the default usage
    output_tokens: int | None = None
    cache_read: int = 0
    cache_write: int = 0
    cache_write_1h: int = 0  # of cache_write, written with a 1-hour TTL (usage.cacheDetails)
    reasoning: str = ""  # a reasoningContent block before the answer (Claude's extended thinking)
    signature: str = ""  # its signature
    omit_usage: bool = False
    latency_s: float = 0.0  # wait before answering
    status: int = 200  # >= 400: an error of `error_type`
    error_type: str = "ValidationException"
    message: str = "The request failed."
    exception_after: int | None = None  # streams: after N events, an exception event of `error_type`
    stream_pieces: int = 0  # >0: write the stream's bytes in this many pieces (frames split across reads)
    # A raw reply instead of anything above: these bytes with `content_type` (a fuzzer's mutated replies)
    body: bytes | None = None
    content_type: str = "application/json"


@dataclass(slots=True)
class RecordedSigned:
    path: str  # raw, as sent (percent-encoding kept)
    headers: dict[str, str]  # lowercased names
    body: Any
    raw: bytes
    signature_ok: bool


# Bedrock names each reply by the request id header (its own logs and CloudTrail go by it).
_REQUEST_ID = {"x-amzn-RequestId": "sim-bedrock-request"}


def encode_event(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message: prelude (total length, headers length, CRC32), string headers,
    payload, CRC32 of everything before it."""
    encoded = b"".join(
        bytes([len(k)]) + k.encode() + b"\x07" + struct.pack(">H", len(v.encode())) + v.encode()
        for k, v in headers.items()
    )
    prelude = struct.pack(">II", 12 + len(encoded) + len(payload) + 4, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _event(kind: str, obj: dict[str, Any]) -> bytes:
    # Bedrock pads every event's JSON with a `p` field of varying length (against length side channels).
    payload = orjson.dumps({**obj, "p": "abcdefghijklmnopqrstuvwxyzABCDEFGH"[: 4 + len(kind)]})
    headers = {":event-type": kind, ":content-type": "application/json", ":message-type": "event"}
    return encode_event(headers, payload)


def _exception(error_type: str, message: str) -> bytes:
    kind = error_type[0].lower() + error_type[1:]  # ThrottlingException -> throttlingException, as sent
    headers = {":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"}
    return encode_event(headers, orjson.dumps({"message": message}))


def signature_matches(
    method: str, url: str, headers: dict[str, str], body: bytes, credentials: Credentials, region: str
) -> bool:
    """Re-sign the request as received (its signed headers, at its own X-Amz-Date) with botocore."""
    auth_header = headers.get("authorization", "")
    try:
        signed = auth_header.split("SignedHeaders=", 1)[1].split(",", 1)[0].split(";")
        sent = auth_header.split("Signature=", 1)[1].strip()
        amz_date = headers["x-amz-date"]
    except (IndexError, KeyError):
        return False
    request = AWSRequest(method=method, url=url, data=body, headers={h: headers.get(h, "") for h in signed})
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(credentials, "bedrock", region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    return bool(expected == sent and auth_header.startswith("AWS4-HMAC-SHA256 Credential="))


class BedrockSimulator:
    def __init__(
        self,
        *,
        credentials: tuple[str, str, str | None],
        region: str = "us-east-1",
        host: str = "127.0.0.1",
        api_key: str | None = None,
    ) -> None:
        self.credentials = Credentials(*credentials)
        self.api_key = api_key  # a Bedrock API key, accepted as `Authorization: Bearer` instead of SigV4
        self.region = region
        self.host = host
        self.port = 0
        self.requests: list[RecordedSigned] = []
        self._script: deque[BedrockReply] = deque()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def enqueue(self, *replies: BedrockReply) -> None:
        self._script.extend(replies)

    async def __aenter__(self) -> BedrockSimulator:
        app = web.Application()
        app.router.add_post("/model/{model}/converse", self._converse)
        app.router.add_post("/model/{model}/converse-stream", self._converse_stream)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _converse(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, stream=False)

    async def _converse_stream(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, stream=True)

    async def _serve(self, request: web.Request, *, stream: bool) -> web.StreamResponse:
        raw = await request.read()
        headers = {k.lower(): v for k, v in request.headers.items()}
        url = f"http://{request.host}{request.raw_path}"
        bearer = headers.get("authorization", "")
        if self.api_key is not None and bearer.startswith("Bearer "):
            ok = bearer == f"Bearer {self.api_key}"
        else:
            ok = signature_matches("POST", url, headers, raw, self.credentials, self.region)
        try:
            body = orjson.loads(raw)
        except ValueError:
            body = None
        self.requests.append(RecordedSigned(request.raw_path, headers, body, raw, ok))
        if not ok:
            message = "The request signature we calculated does not match the signature you provided."
            return _error(403, "InvalidSignatureException", message)
        problem = _problem(body)
        if problem:
            return _error(400, "ValidationException", problem)
        reply = self._script.popleft() if self._script else BedrockReply()
        if reply.latency_s:
            await asyncio.sleep(reply.latency_s)  # cancelled when the client goes away
        if reply.status >= 400:
            return _error(reply.status, reply.error_type, reply.message)
        if reply.body is not None:
            return web.Response(body=reply.body, content_type=reply.content_type)
        model = request.match_info["model"]
        text, uses, stop, usage = _answer(model, body, reply)
        if not stream:
            content: list[dict[str, Any]] = []
            if reply.reasoning:
                said = {"text": reply.reasoning, "signature": reply.signature}
                content.append({"reasoningContent": {"reasoningText": said}})
            content += [{"text": text}] if text else []
            content += [
                {"toolUse": {"toolUseId": f"tooluse_sim_{i + 1}", "name": n, "input": inp}}
                for i, (n, inp) in enumerate(uses)
            ]
            doc: dict[str, Any] = {"output": {"message": {"role": "assistant", "content": content}}, "stopReason": stop}
            if usage is not None:
                doc["usage"] = usage
            doc["metrics"] = {"latencyMs": 12}
            return web.Response(body=orjson.dumps(doc), content_type="application/json", headers=_REQUEST_ID)
        events = [_event("messageStart", {"role": "assistant"})]
        index = 0
        if reply.reasoning:
            for word in _words(reply.reasoning):
                delta = {"reasoningContent": {"text": word}}
                events.append(_event("contentBlockDelta", {"contentBlockIndex": index, "delta": delta}))
            delta = {"reasoningContent": {"signature": reply.signature}}
            events.append(_event("contentBlockDelta", {"contentBlockIndex": index, "delta": delta}))
            events.append(_event("contentBlockStop", {"contentBlockIndex": index}))
            index += 1
        if text:
            for word in _words(text):
                events.append(_event("contentBlockDelta", {"contentBlockIndex": index, "delta": {"text": word}}))
            events.append(_event("contentBlockStop", {"contentBlockIndex": index}))
            index += 1
        for i, (name, tool_input) in enumerate(uses):
            start = {"toolUse": {"toolUseId": f"tooluse_sim_{i + 1}", "name": name}}
            events.append(_event("contentBlockStart", {"contentBlockIndex": index, "start": start}))
            arguments = orjson.dumps(tool_input).decode()
            half = len(arguments) // 2
            for piece in (arguments[:half], arguments[half:]):
                delta = {"toolUse": {"input": piece}}
                events.append(_event("contentBlockDelta", {"contentBlockIndex": index, "delta": delta}))
            events.append(_event("contentBlockStop", {"contentBlockIndex": index}))
            index += 1
        events.append(_event("messageStop", {"stopReason": stop}))
        metadata: dict[str, Any] = {"metrics": {"latencyMs": 12}}
        if usage is not None:
            metadata["usage"] = usage
        events.append(_event("metadata", metadata))
        if reply.exception_after is not None:
            events = [*events[: reply.exception_after], _exception(reply.error_type, reply.message)]
        resp = web.StreamResponse(headers={"Content-Type": "application/vnd.amazon.eventstream", **_REQUEST_ID})
        await resp.prepare(request)
        data = b"".join(events)
        pieces = max(1, reply.stream_pieces)
        step = max(1, len(data) // pieces)
        for start_at in range(0, len(data), step):
            await resp.write(data[start_at : start_at + step])
        await resp.write_eof()
        return resp


def _words(text: str) -> list[str]:
    out, word = [], ""
    for ch in text:
        word += ch
        if ch == " ":
            out.append(word)
            word = ""
    return [*out, word] if word else out


def _texts(body: dict[str, Any]) -> list[str]:
    texts = [s.get("text", "") for s in body.get("system") or ()]
    for m in body["messages"]:
        texts += [b["text"] for b in m["content"] if "text" in b]
    return texts


def _answer(
    model: str, body: dict[str, Any], reply: BedrockReply
) -> tuple[str, tuple[tuple[str, dict[str, Any]], ...], str, dict[str, Any] | None]:
    last_user = next(
        (b["text"] for m in reversed(body["messages"]) if m["role"] == "user" for b in m["content"] if "text" in b),
        "",
    )
    text = reply.text if reply.text is not None else ("" if reply.tool_uses else f"Hello from {model}: {last_user}")
    stop = reply.stop_reason or ("tool_use" if reply.tool_uses else "end_turn")
    if reply.omit_usage:
        return text, reply.tool_uses, stop, None
    words = sum(len(t.split()) for t in _texts(body))
    inputs = reply.input_tokens if reply.input_tokens is not None else words + 3 * len(body["messages"])
    outputs = reply.output_tokens if reply.output_tokens is not None else len(text.split()) + len(reply.tool_uses)
    usage: dict[str, Any] = {
        "inputTokens": inputs,
        "outputTokens": outputs,
        "totalTokens": inputs + outputs + reply.cache_read + reply.cache_write,
    }
    if reply.cache_read or reply.cache_write:
        usage["cacheReadInputTokens"] = reply.cache_read
        usage["cacheWriteInputTokens"] = reply.cache_write
    if reply.cache_write_1h:
        usage["cacheDetails"] = [
            {"ttl": "5m", "inputTokens": reply.cache_write - reply.cache_write_1h},
            {"ttl": "1h", "inputTokens": reply.cache_write_1h},
        ]
    return text, reply.tool_uses, stop, usage


def _problem(body: Any) -> str:
    if not isinstance(body, dict):
        return "Malformed input request, please reformat your input and try again."
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "A conversation must start with a user message."
    config = body.get("inferenceConfig") or {}
    if "maxTokens" in config and (not isinstance(config["maxTokens"], int) or config["maxTokens"] < 1):
        return "1 validation error detected: Value at 'inferenceConfig.maxTokens' failed to satisfy constraint"
    previous_uses: set[str] = set()
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            return f"Value at 'messages.{i + 1}.member.role' failed to satisfy constraint"
        if i == 0 and role != "user":
            return "A conversation must start with a user message."
        if i > 0 and messages[i - 1].get("role") == role:
            return "A conversation must alternate between user and assistant roles."
        content = m.get("content")
        if not isinstance(content, list) or not content:
            return f"The content field in the Message object at messages.{i} is empty."
        uses: set[str] = set()
        for block in content:
            if "text" in block and not block["text"]:
                return f"The text field in the ContentBlock object at messages.{i} is blank."
            if "toolUse" in block:
                if role != "assistant" or not isinstance(block["toolUse"].get("input"), dict):
                    return "toolUse blocks need an assistant turn and an object input"
                uses.add(block["toolUse"].get("toolUseId"))
            if "toolResult" in block and block["toolResult"].get("toolUseId") not in previous_uses:
                return f"The toolResult blocks at messages.{i} do not match the previous turn's toolUse blocks."
        previous_uses = uses
    if any("toolUse" in b for m in messages for b in m["content"]) and not body.get("toolConfig"):
        return "The toolConfig field must be defined when using toolUse and toolResult content blocks."
    return ""


def _error(status: int, error_type: str, message: str) -> web.Response:
    headers = {"x-amzn-ErrorType": f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/"}
    return web.Response(
        status=status, body=orjson.dumps({"message": message}), content_type="application/json", headers=headers
    )
