"""A local Gemini API and Vertex AI: generateContent and streamGenerateContent (`?alt=sse`).

    async with GeminiSimulator(api_key="gem-key", vertex_token="ya29.sim") as sim:
        POST {sim.url}/{v1beta|v1}/models/{model}:generateContent                (x-goog-api-key or ?key=)
        POST {sim.url}/v1beta/models/{model}:streamGenerateContent?alt=sse
        POST {sim.url}/{v1|v1beta1}/projects/{p}/locations/{l}/publishers/google/models/{model}:...
                                                                         (Authorization: Bearer <token>)

Requests are validated as the API does (roles user/model, non-empty parts, functionResponse names that
match a preceding functionCall, JSON output config). Default reply: "Hello from <model>: <last user
text>", finishReason STOP, usage prompt = words of every text + 3 per content, candidates = words of
the reply. `enqueue(GeminiReply(...))` scripts one request: text, function calls, thought text, finish
reason, usage (cached, thoughts), a blocked prompt, or an HTTP error with Google's error body. Streams
send one chunk per word, each `data: {...}\\r\\n\\r\\n` as Google does, usage on the last chunk.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

__all__ = ["GeminiReply", "GeminiSimulator", "RecordedGoogle"]

_STATUS_NAMES = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED", 404: "NOT_FOUND"}
_STATUS_NAMES |= {429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


@dataclass(frozen=True, slots=True)
class GeminiReply:
    text: str | None = None  # None: the default reply (none when there are function calls)
    function_calls: tuple[tuple[str, dict[str, Any]], ...] = ()
    thought: str = ""  # a thought-summary part before the answer (thought: true)
    signature: str = ""  # a thoughtSignature, on the first function call (else the last part) as Gemini 3 puts it
    finish_reason: str | None = None  # None: STOP
    prompt_tokens: int | None = None
    candidates_tokens: int | None = None
    cached_tokens: int = 0
    thoughts_tokens: int = 0
    # Of the prompt (cache included), of the cached part and of the candidates, the AUDIO modality's tokens
    # (the rest are TEXT): usageMetadata's promptTokensDetails, cacheTokensDetails, candidatesTokensDetails
    audio_prompt_tokens: int = 0
    audio_cached_tokens: int = 0
    audio_candidates_tokens: int = 0
    block_reason: str = ""  # the prompt was blocked: promptFeedback.blockReason, no candidates
    latency_s: float = 0.0  # wait before answering
    status: int = 200
    message: str = "Request failed."
    error_after: int | None = None  # streams: after N chunks, an error chunk (Google's error object)
    # A raw reply instead of anything above: these bytes with `content_type` (a fuzzer's mutated replies)
    body: bytes | None = None
    content_type: str = "application/json"


@dataclass(slots=True)
class RecordedGoogle:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: Any
    vertex: bool


class GeminiSimulator:
    def __init__(self, *, api_key: str | None = None, vertex_token: str | None = None) -> None:
        self.api_key = api_key
        self.vertex_token = vertex_token
        self.port = 0
        self.requests: list[RecordedGoogle] = []
        self._script: deque[GeminiReply] = deque()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def enqueue(self, *replies: GeminiReply) -> None:
        self._script.extend(replies)

    async def __aenter__(self) -> GeminiSimulator:
        app = web.Application()
        app.router.add_post("/v1beta/models/{call}", self._gemini)
        app.router.add_post("/v1/models/{call}", self._gemini)  # google-genai's default version
        app.router.add_post(
            "/{version}/projects/{project}/locations/{location}/publishers/google/models/{call}", self._vertex
        )
        app.router.add_post(
            "/{version}/projects/{project}/locations/{location}/publishers/anthropic/models/{call}", self._claude
        )
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _gemini(self, request: web.Request) -> web.StreamResponse:
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if self.api_key is not None and key != self.api_key:
            return _error(400, "API key not valid. Please pass a valid API key.")
        return await self._serve(request, vertex=False)

    async def _vertex(self, request: web.Request) -> web.StreamResponse:
        if request.match_info["version"] not in ("v1", "v1beta1"):
            return _error(404, "Not found.")
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.vertex_token is not None and bearer != self.vertex_token:
            return _error(401, "Request had invalid authentication credentials.")
        return await self._serve(request, vertex=True)

    async def _claude(self, request: web.Request) -> web.StreamResponse:
        """Claude on Vertex: Anthropic's Messages format at rawPredict / streamRawPredict."""
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if self.vertex_token is not None and bearer != self.vertex_token:
            return _error(401, "Request had invalid authentication credentials.")
        model, _, action = request.match_info["call"].partition(":")
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(RecordedGoogle(request.path, dict(request.query), headers, body, True))
        problem = ""
        # Vertex documents vertex-2023-10-16; the anthropic SDK sends its own dated version.
        if not isinstance(body, dict) or not isinstance(body.get("anthropic_version"), str):
            problem = "anthropic_version: Field required"
        elif "model" in body:
            problem = "model: Extra inputs are not permitted"  # the URL names the model
        elif not isinstance(body.get("max_tokens"), int) or not body.get("messages"):
            problem = "max_tokens and messages: Field required"
        if problem:
            err = {"type": "error", "error": {"type": "invalid_request_error", "message": problem}}
            return web.Response(status=400, body=orjson.dumps(err), content_type="application/json")
        last = body["messages"][-1]["content"]
        text = f"Hello from {model}: {last if isinstance(last, str) else last[0].get('text', '')}"
        prompt = sum(len(str(m["content"]).split()) for m in body["messages"]) + 3 * len(body["messages"])
        usage: dict[str, Any] = {
            "input_tokens": prompt,
            "output_tokens": len(text.split()),
            "cache_read_input_tokens": 0,
        }
        if action == "rawPredict":
            message = {
                "id": "msg_vrtx_sim",
                "type": "message",
                "role": "assistant",
                "model": model,
                "content": [{"type": "text", "text": text}],
                "stop_reason": "end_turn",
                "stop_sequence": None,
                "usage": usage,
            }
            return web.Response(body=orjson.dumps(message), content_type="application/json")
        if action != "streamRawPredict":
            return _error(404, f"Method {action!r} not found.")
        start: dict[str, Any] = {
            "id": "msg_vrtx_sim",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
        }
        start |= {"stop_reason": None, "stop_sequence": None, "usage": {**usage, "output_tokens": 1}}
        events: list[tuple[str, dict[str, Any]]] = [
            ("message_start", {"type": "message_start", "message": start}),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
        ]
        words = text.split(" ")
        for i, word in enumerate(words):
            delta = {"type": "text_delta", "text": word + (" " if i < len(words) - 1 else "")}
            events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
        events.append(("content_block_stop", {"type": "content_block_stop", "index": 0}))
        end = {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None}}
        events.append(("message_delta", {**end, "usage": {"output_tokens": usage["output_tokens"]}}))
        events.append(("message_stop", {"type": "message_stop"}))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"".join(f"event: {n}\ndata: ".encode() + orjson.dumps(o) + b"\n\n" for n, o in events))
        await resp.write_eof()
        return resp

    async def _serve(self, request: web.Request, *, vertex: bool) -> web.StreamResponse:
        model, _, action = request.match_info["call"].partition(":")
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except ValueError:
            body = None
        headers = {k.lower(): v for k, v in request.headers.items()}
        self.requests.append(RecordedGoogle(request.path, dict(request.query), headers, body, vertex))
        if action not in ("generateContent", "streamGenerateContent"):
            return _error(404, f"Method {action!r} not found.")
        stream = action == "streamGenerateContent"
        if stream and request.query.get("alt") != "sse":
            return _error(400, "this simulator streams only with alt=sse")
        problem = _problem(body)
        if problem:
            return _error(400, problem)
        reply = self._script.popleft() if self._script else GeminiReply()
        if reply.latency_s:
            await asyncio.sleep(reply.latency_s)  # cancelled when the client goes away
        if reply.status >= 400:
            return _error(reply.status, reply.message)
        if reply.body is not None:
            return web.Response(body=reply.body, content_type=reply.content_type)
        chunks = _chunks(model, body, reply, stream)
        if not stream:
            return web.Response(body=orjson.dumps(chunks[0]), content_type="application/json")
        if reply.error_after is not None:
            error = {"error": {"code": 503, "message": reply.message, "status": "UNAVAILABLE"}}
            chunks = [*chunks[: reply.error_after], error]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in chunks:
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\r\n\r\n")
        await resp.write_eof()
        return resp


def _texts(body: dict[str, Any]) -> list[str]:
    texts = [p.get("text", "") for p in (body.get("systemInstruction") or {}).get("parts") or ()]
    for c in body["contents"]:
        texts += [p["text"] for p in c["parts"] if "text" in p]
    return texts


def _chunks(model: str, body: dict[str, Any], reply: GeminiReply, stream: bool) -> list[dict[str, Any]]:
    version: dict[str, Any] = {"modelVersion": model, "responseId": "sim-response"}
    words = sum(len(t.split()) for t in _texts(body))
    prompt = reply.prompt_tokens if reply.prompt_tokens is not None else words + 3 * len(body["contents"])
    if reply.block_reason:
        blocked = {"promptTokenCount": prompt, "totalTokenCount": prompt}
        return [{"promptFeedback": {"blockReason": reply.block_reason}, "usageMetadata": blocked, **version}]
    last_user = next(
        (p["text"] for c in reversed(body["contents"]) if c["role"] == "user" for p in c["parts"] if "text" in p), ""
    )
    text = (
        reply.text if reply.text is not None else ("" if reply.function_calls else f"Hello from {model}: {last_user}")
    )
    output = (
        reply.candidates_tokens
        if reply.candidates_tokens is not None
        else len(text.split()) + len(reply.function_calls)
    )
    usage: dict[str, Any] = {
        "promptTokenCount": prompt,
        "candidatesTokenCount": output,
        "totalTokenCount": prompt + output + reply.thoughts_tokens,
    }
    usage["promptTokensDetails"] = _modalities(prompt, reply.audio_prompt_tokens)
    usage["candidatesTokensDetails"] = _modalities(output, reply.audio_candidates_tokens)
    if reply.cached_tokens:
        usage["cachedContentTokenCount"] = reply.cached_tokens
        usage["cacheTokensDetails"] = _modalities(reply.cached_tokens, reply.audio_cached_tokens)
    if reply.thoughts_tokens:
        usage["thoughtsTokenCount"] = reply.thoughts_tokens
    parts: list[dict[str, Any]] = []
    if reply.thought:
        parts.append({"text": reply.thought, "thought": True})
    pieces = [w + " " for w in text.split(" ")] if stream else [text]
    if pieces and stream:
        pieces[-1] = pieces[-1][:-1]
    parts += [{"text": p} for p in pieces if p]
    calls: list[dict[str, Any]] = [{"functionCall": {"name": n, "args": a}} for n, a in reply.function_calls]
    parts += calls
    if reply.signature and parts:
        (calls or parts)[0 if calls else -1]["thoughtSignature"] = reply.signature
    finish = reply.finish_reason or "STOP"
    if not stream:
        whole = {"content": {"role": "model", "parts": parts}, "finishReason": finish, "index": 0}
        return [{"candidates": [whole], "usageMetadata": usage, **version}]
    out: list[dict[str, Any]] = []
    for i, part in enumerate(parts):
        candidate: dict[str, Any] = {"content": {"role": "model", "parts": [part]}, "index": 0}
        last = i == len(parts) - 1
        if last:
            candidate["finishReason"] = finish
        chunk: dict[str, Any] = {"candidates": [candidate], **version}
        # Google sends the prompt count on every chunk and the full usage on the last.
        chunk["usageMetadata"] = usage if last else {"promptTokenCount": prompt, "totalTokenCount": prompt}
        out.append(chunk)
    if not parts:
        out.append(
            {
                "candidates": [{"content": {"role": "model", "parts": []}, "finishReason": finish}],
                "usageMetadata": usage,
                **version,
            }
        )
    return out


def _problem(body: Any) -> str:
    if not isinstance(body, dict):
        return "Invalid JSON payload received."
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    calls: set[str] = set()
    for i, c in enumerate(contents):
        if c.get("role") not in ("user", "model"):
            return f"Please use a valid role: user, model. (contents[{i}])"
        parts = c.get("parts")
        if not isinstance(parts, list) or not parts:
            return f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
        for p in parts:
            if "functionCall" in p:
                if c["role"] != "model" or not isinstance(p["functionCall"].get("args", {}), dict):
                    return "functionCall parts belong to model turns and take an object of args"
                calls.add(p["functionCall"]["name"])
            if "functionResponse" in p and p["functionResponse"].get("name") not in calls:
                return "function response parts must answer a preceding function call"
            if "text" in p and not isinstance(p["text"], str):
                return "text must be a string"
    config = body.get("generationConfig") or {}
    if ("responseSchema" in config or "responseJsonSchema" in config) and config.get(
        "responseMimeType"
    ) != "application/json":
        return "responseMimeType must be application/json when a response schema is set"
    return ""


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"code": status, "message": message, "status": _STATUS_NAMES.get(status, "UNKNOWN")}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


def _modalities(total: int, audio: int) -> list[dict[str, Any]]:
    """A ModalityTokenCount list: `audio` of `total` tokens AUDIO, the rest TEXT."""
    counts = [{"modality": "TEXT", "tokenCount": total - audio}]
    if audio:
        counts.append({"modality": "AUDIO", "tokenCount": audio})
    return counts
