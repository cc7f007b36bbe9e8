"""A local upstream that speaks OpenAI Chat Completions and Anthropic Messages, SSE included.

Serves `POST /v1/chat/completions` (OpenAI: adapter base_url `sim.url + "/v1"`) and `POST /v1/messages`
(Anthropic: adapter base_url `sim.url`), in the bytes the real APIs send (compact JSON, `data: ...\\n\\n`
chunks, `event: ...\\ndata: ...\\n\\n` for Anthropic), for tests and for benchmarks:

    async with UpstreamSimulator() as sim:
        sim.enqueue(Reply(status=429, retry_after="2"), Reply(content="hi", usage=SimUsage(12, 7, cached=3)))
        ...                                   # first request gets the 429, the second "hi", then defaults
        assert sim.requests[0].headers["authorization"] == "Bearer sk-test"

    python -m sim.upstream --port 8080 [--stream-chunks K] [--reply TEXT] [--latency-ms N]

Default reply (no script queued): content `"Hello from <model>: <last user text>"`, finish `stop` /
`end_turn`, usage from `default_usage`: input = whitespace-separated words of every text in the request
(messages, and Anthropic's `system`) + 3 per message; output = words of the reply + 1 per tool call; no
cache counts. Streams send the content in word-sized pieces (each piece a word plus its trailing space).
("Text" is every string `content` and `text` block; Anthropic tool_use/tool_result blocks count 0.) Default
replies are encoded once per (model, last user text, prompt word count, stream, include_usage) and
then served from a cache, so the benchmark path does no per-request encoding.

`SimUsage` counts are written as the wire says them: `input` is OpenAI `prompt_tokens` (which
includes `cached`) or Anthropic `input_tokens` (which excludes cache reads `cached` and writes
`cache_write`). Anthropic streams report `output_tokens` 1 in `message_start` (0 if the total is 0) and
the cumulative total in `message_delta`, as the real API does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import ssl
import sys
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Self

import orjson
from aiohttp import web
from multidict import CIMultiDictProxy

__all__ = [
    "ANTHROPIC_PATH",
    "OPENAI_PATH",
    "RecordedRequest",
    "Reply",
    "SimToolCall",
    "SimUsage",
    "UpstreamSimulator",
    "default_usage",
]

OPENAI_PATH = "/v1/chat/completions"
ANTHROPIC_PATH = "/v1/messages"
_CREATED = 1_700_000_000  # a fixed timestamp keeps replies byte-for-byte reproducible
_JSON = {"Content-Type": "application/json"}


@dataclass(frozen=True, slots=True)
class SimUsage:
    """Token counts to report, in the wire's own terms (see the module docstring)."""

    input: int
    output: int
    cached: int = 0
    # Anthropic `cache_creation_input_tokens`; OpenAI `prompt_tokens_details.cache_write_tokens` (sent when
    # not 0, and part of `input` there)
    cache_write: int = 0
    # OpenAI `completion_tokens_details.reasoning_tokens`; Anthropic `output_tokens_details.thinking_tokens`
    # (sent when not 0); part of `output` on both
    reasoning: int = 0
    web_search: int = 0  # Anthropic `server_tool_use.web_search_requests` (sent when not 0)
    # Anthropic: of `cache_write`, those with a 1-hour TTL (`cache_creation` is sent when cache_write is not 0)
    cache_write_1h: int = 0
    # Anthropic streams: `output_tokens` in message_start (None: 1, or 0 when `output` is 0)
    start_output: int | None = None
    # OpenAI `prompt_tokens_details.audio_tokens` / `completion_tokens_details.audio_tokens`: part of
    # `input` / `output`
    audio_input: int = 0
    audio_output: int = 0


@dataclass(frozen=True, slots=True)
class SimToolCall:
    name: str
    arguments: str = "{}"  # JSON text; Anthropic replies send it parsed, as `input`
    id: str = ""  # "" means call_sim_<n> (OpenAI) / toolu_sim_<n> (Anthropic)


@dataclass(frozen=True, slots=True)
class Reply:
    """One scripted behaviour, consumed by one request. Every field has a harmless default."""

    # What a successful reply says.
    content: str | None = None  # None: the default reply text, or no text when there are tool calls
    tool_calls: tuple[SimToolCall, ...] = ()
    usage: SimUsage | None = None  # None: default_usage(...)
    finish_reason: str | None = None  # wire value; None: stop/end_turn, or tool_calls/tool_use with calls
    omit_usage: bool = False  # send no usage at all (some compatible servers)
    usage_every_chunk: bool = False  # OpenAI streams: usage on every chunk, growing (compatible servers)
    ignore_stream: bool = False  # answer `stream: true` with the whole JSON reply (proxies and mocks do)
    # OpenAI: send the first tool call as the deprecated `function_call` (finish `function_call`)
    legacy_function_call: bool = False
    # Thinking before the answer: Anthropic `thinking` blocks (signed `sig_sim_<n>`, or `redacted_thinking`
    # when the text starts with "redacted:"), OpenAI-compatible `reasoning_content` (the texts joined)
    thinking: tuple[str, ...] = ()
    # What the reply says about itself: the model snapshot (None: the requested model), OpenAI's
    # system_fingerprint and refusal, the service tier (OpenAI top level, Anthropic usage), and for Anthropic
    # the stop sequence that matched (finish `stop_sequence` unless finish_reason says otherwise)
    model: str | None = None
    system_fingerprint: str | None = None
    service_tier: str | None = None
    stop_sequence: str | None = None
    refusal: str | None = None
    response_id: str | None = None  # the reply's own id; None: chatcmpl-sim (OpenAI) / msg_sim (Anthropic)

    # Failures.
    status: int = 200  # >= 400: a provider-formatted error body
    error_type: str = ""  # "" means the provider's usual type for `status`
    error_code: str | None = None  # OpenAI's `code` ("" for none); None means the usual one for `status`
    error_message: str = ""
    retry_after: str | None = None  # `retry-after` header value, sent as given
    headers: Mapping[str, str] = field(default_factory=dict)  # extra response headers
    body: bytes | None = None  # raw body instead of anything above (with `status`, `content_type`)
    content_type: str = "application/json"
    latency_s: float = 0.0  # wait before answering (and before the stream's first byte)
    drop: bool = False  # close the connection without sending a response
    truncate_body: bool = False  # non-streaming: send the head and half the body, then reset

    # Stream shaping. Event counts include every SSE event written (pings too, not comments).
    stream_chunks: int | None = None  # split the content into this many pieces (fewer if shorter) instead of words
    cut_after: int | None = None  # end the body cleanly after N events, without [DONE]/message_stop
    reset_after: int | None = None  # abort the TCP connection after N events
    hang_after: int | None = None  # after N events, send nothing more and never finish
    error_after: int | None = None  # after N events send an error event, then end the body
    stream_error_type: str = "overloaded_error"  # the mid-stream error's type
    # Write a stream's bytes in pieces of N, or cut 3 bytes into every line, between CR and LF and inside
    # every multi-byte character ("awkward"), flushing each; an int also splits an error body. A client in
    # the same event loop only sees separate reads with a pause between pieces: piece_delay_s >= 0.001.
    split: int | Literal["awkward"] | None = None
    piece_delay_s: float = 0.0
    line_ending: Literal["\n", "\r\n", "\r"] = "\n"
    pings: bool = False  # Anthropic: a ping event between every two events
    comments: bool = False  # an SSE comment line (": keep-alive") before every event


@dataclass(slots=True)
class RecordedRequest:
    path: str
    headers: CIMultiDictProxy[str]  # as received, secrets included: tests check auth headers
    body: Any  # parsed JSON, or None when the body was not JSON
    raw: bytes

    @property
    def model(self) -> str:
        return str(self.body.get("model", "")) if isinstance(self.body, dict) else ""

    @property
    def stream(self) -> bool:
        return bool(self.body.get("stream")) if isinstance(self.body, dict) else False


def default_usage(prompt_texts: Iterable[str], messages: int, reply: str, tool_calls: int = 0) -> SimUsage:
    """The usage a default reply reports (see the module docstring)."""
    words = sum(len(t.split()) for t in prompt_texts)
    return SimUsage(input=words + 3 * messages, output=len(reply.split()) + tool_calls)


# Error bodies, per status, in each provider's vocabulary.
_OPENAI_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", "unsupported_country_region_territory", "Country not supported."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    408: ("timeout", None, "Request timed out."),
    409: ("conflict", None, "Conflict."),
    413: ("invalid_request_error", None, "Request too large."),
    422: ("invalid_request_error", None, "Unprocessable entity."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
}
_ANTHROPIC_ERRORS: dict[int, tuple[str, str]] = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "An unexpected error has occurred internal to Anthropic's systems."),
    529: ("overloaded_error", "Overloaded"),
}


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)  # compact and UTF-8, like the real APIs


def _openai_error_body(status: int, err_type: str, code: str | None, message: str) -> bytes:
    usual = _OPENAI_ERRORS.get(status, ("server_error" if status >= 500 else "invalid_request_error", None, ""))
    return _dumps(
        {
            "error": {
                "message": message or usual[2] or f"HTTP {status}",
                "type": err_type or usual[0],
                "param": None,
                "code": (code or None) if code is not None else usual[1],
            }
        }
    )


def _anthropic_error_obj(status: int, err_type: str, message: str) -> dict[str, Any]:
    usual = _ANTHROPIC_ERRORS.get(status, ("api_error" if status >= 500 else "invalid_request_error", ""))
    return {"type": "error", "error": {"type": err_type or usual[0], "message": message or usual[1] or "Error"}}


_WORD_PIECES = re.compile(r"\S*\s*")


def _pieces(text: str, chunks: int | None) -> list[str]:
    if not text:
        return []
    if chunks is None:
        return [p for p in _WORD_PIECES.findall(text) if p]
    # Exactly `chunks` pieces (fewer only when the text is shorter), sizes differing by at most one.
    count = max(1, min(chunks, len(text)))
    base, extra = divmod(len(text), count)
    pieces, start = [], 0
    for i in range(count):
        end = start + base + (1 if i < extra else 0)
        pieces.append(text[start:end])
        start = end
    return pieces


def _arg_pieces(arguments: str) -> list[str]:
    """Tool arguments arrive in fragments; three roughly equal ones exercise the reassembly."""
    if len(arguments) < 3:
        return [arguments] if arguments else []
    third = len(arguments) // 3
    return [arguments[:third], arguments[third : 2 * third], arguments[2 * third :]]


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(b.get("text") or "" for b in content if isinstance(b, dict) and b.get("type", "text") == "text")
    return ""


def _awkward_cuts(data: bytes) -> list[int]:
    """Cut positions that hurt a naive parser: 3 bytes into every line (inside `data:`/`event:`), between
    `\\r` and `\\n`, and inside every multi-byte UTF-8 character."""
    cuts: set[int] = set()
    line_start = 0
    for i, byte in enumerate(data):
        if i == line_start + 3:
            cuts.add(i)
        if byte == 0x0A or byte == 0x0D:
            if byte == 0x0A and i > 0 and data[i - 1] == 0x0D:
                cuts.add(i)
            line_start = i + 1
        elif 0x80 <= byte <= 0xBF and not (0x80 <= data[i - 1] <= 0xBF):
            cuts.add(i)  # right after the lead byte of a multi-byte character
    return sorted(c for c in cuts if 0 < c < len(data))


class UpstreamSimulator:
    """An aiohttp server on 127.0.0.1 (port 0 by default), scripted per request. See the module docstring."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        validate: bool = True,
        record: bool = True,
        default: Reply | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.host = host
        self.ssl_context = ssl_context  # set: serve https (a test's own CA; CERT_REQUIRED for mutual TLS)
        self.port = port
        self.api_key = api_key  # when set, requests carrying another key get a 401
        self.validate = validate  # reject what the real API rejects (missing max_tokens, system roles...)
        self.requests: deque[RecordedRequest] = deque(maxlen=None if record else 0)
        self.stream_disconnects = 0  # streams whose client went away before the stream ended
        self.disconnects = 0  # any request whose client went away before the reply was complete
        self.received = 0  # requests received, whether recorded or not
        self._default = default or Reply()
        self._script: list[tuple[str | None, str | None, Reply]] = []
        self._cache: dict[tuple[Any, ...], bytes] = {}
        self._changed = asyncio.Event()  # set on every recorded request and disconnect
        self._handlers: set[asyncio.Task[Any]] = set()
        self._runner: web.AppRunner | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://{self.host}:{self.port}"

    async def start(self) -> None:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        self._routes(app)
        # handler_cancellation: a client that goes away cancels its handler, which is how a hung
        # stream notices the disconnect.
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, backlog=1024, ssl_context=self.ssl_context)
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    def _routes(self, app: web.Application) -> None:
        """The paths served (simulators of other formats add or replace theirs)."""
        app.router.add_post(OPENAI_PATH, self._openai)
        app.router.add_post(ANTHROPIC_PATH, self._anthropic)

    async def stop(self) -> None:
        self._closing = True
        for task in list(self._handlers):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- scripting ---------------------------------------------------------------------------------

    @property
    def default(self) -> Reply:
        return self._default

    @default.setter
    def default(self, reply: Reply) -> None:
        self._default = reply
        self._cache.clear()

    def enqueue(self, *replies: Reply, path: str | None = None, model: str | None = None) -> None:
        """Queue replies, each consumed by one request (in order) whose path and model match."""
        for reply in replies:
            self._script.append((path, model, reply))

    @property
    def pending(self) -> int:
        """Scripted replies not consumed yet."""
        return len(self._script)

    def _next_reply(self, path: str, model: str) -> Reply | None:
        for i, (want_path, want_model, reply) in enumerate(self._script):
            if (want_path is None or want_path == path) and (want_model is None or want_model == model):
                del self._script[i]
                return reply
        return None

    async def wait_stream_disconnect(self, timeout_s: float = 2.0, count: int = 1) -> None:
        """Wait until at least `count` streams saw their client disconnect (TimeoutError otherwise)."""
        await self._wait_for(lambda: self.stream_disconnects >= count, timeout_s)

    async def wait_disconnect(self, timeout_s: float = 2.0, count: int = 1) -> None:
        """Like `wait_stream_disconnect`, counting any request whose client left before the reply ended."""
        await self._wait_for(lambda: self.disconnects >= count, timeout_s)

    async def wait_requests(self, count: int = 1, timeout_s: float = 2.0) -> None:
        """Wait until at least `count` requests have arrived (recorded or not)."""
        await self._wait_for(lambda: self.received >= count, timeout_s)

    async def _wait_for(self, done: Callable[[], bool], timeout_s: float) -> None:
        async with asyncio.timeout(timeout_s):
            while not done():
                self._changed.clear()
                await self._changed.wait()

    def _note_disconnect(self, streaming: bool) -> None:
        if self._closing:
            return
        self.disconnects += 1
        if streaming:
            self.stream_disconnects += 1
        self._changed.set()

    # -- request handling --------------------------------------------------------------------------

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, openai=True)

    async def _anthropic(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, openai=False)

    async def _handle(self, request: web.Request, *, openai: bool) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            return await self._serve(request, openai)
        finally:
            self._handlers.discard(task)

    async def _serve(self, request: web.Request, openai: bool) -> web.StreamResponse:
        raw = await request.read()
        try:
            body: Any = orjson.loads(raw)
        except ValueError:
            body = None
        self.requests.append(RecordedRequest(request.path, request.headers, body, raw))
        self.received += 1
        self._changed.set()
        if not isinstance(body, dict):
            return self._error(openai, 400, "", None, "Request body is not a JSON object.")
        if self.api_key is not None:
            sent = request.headers.get("authorization", "") if openai else request.headers.get("x-api-key", "")
            if sent != (f"Bearer {self.api_key}" if openai else self.api_key):
                return self._error(openai, 401, "", None, "")
        if self.validate:
            problem = _openai_problem(body) if openai else _anthropic_problem(body, request.headers)
            if problem:
                return self._error(openai, 400, "", None, problem)

        model = str(body.get("model") or "")
        stream = bool(body.get("stream"))
        reply = self._next_reply(request.path, model) if self._script else None
        if reply is None:
            reply = self._default
            if reply.latency_s == 0 and _plain(reply):
                return await self._cached(request, body, model, stream, openai)
        return await self._scripted(request, body, model, stream, openai, reply)

    def _error(
        self, openai: bool, status: int, err_type: str, code: str | None, message: str, reply: Reply | None = None
    ) -> web.Response:
        headers = dict(_JSON)
        if reply is not None:
            if reply.retry_after is not None:
                headers["retry-after"] = reply.retry_after
            headers.update(reply.headers)
        if openai:
            data = _openai_error_body(status, err_type, code, message)
        else:
            data = _dumps(_anthropic_error_obj(status, err_type, message))
        return web.Response(status=status, body=data, headers=headers)

    async def _cached(
        self, request: web.Request, body: dict[str, Any], model: str, stream: bool, openai: bool
    ) -> web.StreamResponse:
        text = _last_user_text(body, openai)
        include_usage = openai and stream and bool((body.get("stream_options") or {}).get("include_usage"))
        # The default usage depends on every prompt word, so the key must too.
        words = 0 if self._default.usage is not None else _prompt_words(body, openai)
        key = (openai, stream, include_usage, model, text, words)
        data = self._cache.get(key)
        if data is None:
            if len(self._cache) > 4096:
                self._cache.clear()
            encoded = self._encode(body, model, stream, openai, self._default, text, include_usage)
            data = encoded if isinstance(encoded, bytes) else b"".join(encoded)
            self._cache[key] = data
        if not stream:
            return web.Response(body=data, headers=_JSON)
        resp = _sse_response()
        await resp.prepare(request)
        try:
            await resp.write(data)
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            self._note_disconnect(streaming=True)
            raise
        return resp

    def _encode(
        self,
        body: dict[str, Any],
        model: str,
        stream: bool,
        openai: bool,
        reply: Reply,
        last_user: str,
        include_usage: bool,
    ) -> bytes | list[bytes]:
        if reply.content is not None:
            content = reply.content
        else:
            content = "" if reply.tool_calls or reply.refusal else f"Hello from {model}: {last_user}"
        model = reply.model or model
        if reply.usage is not None:
            usage = reply.usage
        else:
            texts, count = _prompt_texts(body, openai)
            usage = default_usage(texts, count, content, len(reply.tool_calls))
        if openai:
            if stream:
                return _openai_stream(model, content, reply, usage, include_usage)
            return _openai_completion(model, content, reply, usage)
        if stream:
            return _anthropic_stream(model, content, reply, usage)
        return _anthropic_message(model, content, reply, usage)

    async def _scripted(
        self, request: web.Request, body: dict[str, Any], model: str, stream: bool, openai: bool, reply: Reply
    ) -> web.StreamResponse:
        try:
            if reply.latency_s:
                await asyncio.sleep(reply.latency_s)
        except asyncio.CancelledError:
            self._note_disconnect(streaming=stream)
            raise
        if reply is self._default and _plain(reply):
            return await self._cached(request, body, model, stream, openai)
        if reply.drop:
            if request.transport is not None:
                request.transport.abort()
            raise asyncio.CancelledError  # nothing to send; aiohttp drops the request quietly
        if reply.body is not None:
            headers = {"Content-Type": reply.content_type, **reply.headers}
            return web.Response(status=reply.status, body=reply.body, headers=headers)
        if reply.status >= 400:
            error = self._error(openai, reply.status, reply.error_type, reply.error_code, reply.error_message, reply)
            if reply.split is not None and isinstance(reply.split, int) and error.body is not None:
                return await self._in_pieces(request, error, reply)
            return error

        stream = stream and not reply.ignore_stream
        include_usage = openai and stream and bool((body.get("stream_options") or {}).get("include_usage"))
        encoded = self._encode(body, model, stream, openai, reply, _last_user_text(body, openai), include_usage)
        if isinstance(encoded, bytes):
            if reply.truncate_body:
                return await self._truncated(request, encoded, reply)
            return web.Response(status=reply.status, body=encoded, headers={**_JSON, **reply.headers})
        return await self._stream(request, encoded, openai, reply)

    async def _in_pieces(self, request: web.Request, whole: web.Response, reply: Reply) -> web.StreamResponse:
        """An error body written `reply.split` bytes at a time, so a client must read until the end."""
        data = whole.body
        assert isinstance(data, bytes)
        resp = web.StreamResponse(status=whole.status, headers=whole.headers)
        resp.content_length = len(data)
        await resp.prepare(request)
        step = int(reply.split or len(data))
        for start in range(0, len(data), step):
            await resp.write(data[start : start + step])
            await asyncio.sleep(reply.piece_delay_s)
        await resp.write_eof()
        return resp

    async def _truncated(self, request: web.Request, data: bytes, reply: Reply) -> web.StreamResponse:
        resp = web.StreamResponse(status=reply.status, headers={**_JSON, **reply.headers})
        resp.content_length = len(data)
        await resp.prepare(request)
        await resp.write(data[: len(data) // 2])
        if request.transport is not None:
            request.transport.abort()
        raise asyncio.CancelledError

    async def _stream(
        self, request: web.Request, events: list[bytes], openai: bool, reply: Reply
    ) -> web.StreamResponse:
        events = self._shape(events, openai, reply)
        resp = _sse_response(reply.headers)
        await resp.prepare(request)
        limit, ending = len(events), "eof"
        for after, how in (
            (reply.cut_after, "eof"),
            (reply.reset_after, "reset"),
            (reply.hang_after, "hang"),
            (reply.error_after, "error"),
        ):
            if after is not None:
                limit, ending = min(after, len(events)), how
                break
        out = events[:limit]
        if ending == "error":
            out.append(self._stream_error_event(openai, reply))
        nl = reply.line_ending
        if nl != "\n":
            out = [e.replace(b"\n", nl.encode()) for e in out]
        try:
            if reply.split is None:
                if out:
                    await resp.write(b"".join(out))
            else:
                data = b"".join(out)
                if reply.split == "awkward":
                    cuts = _awkward_cuts(data)
                else:
                    cuts = list(range(reply.split, len(data), reply.split))
                start = 0
                for cut in [*cuts, len(data)]:
                    await resp.write(data[start:cut])
                    await asyncio.sleep(reply.piece_delay_s)
                    start = cut
            if ending == "reset":
                if request.transport is not None:
                    request.transport.abort()
                raise asyncio.CancelledError
            if ending == "hang":
                await asyncio.Event().wait()
            await resp.write_eof()
        except (asyncio.CancelledError, ConnectionError):
            if ending != "reset":
                self._note_disconnect(streaming=True)
            raise
        return resp

    def _shape(self, events: list[bytes], openai: bool, reply: Reply) -> list[bytes]:
        if not (reply.pings or reply.comments):
            return events
        shaped: list[bytes] = []
        for i, event in enumerate(events):
            if reply.comments:
                shaped.append(b": keep-alive\n")
            if reply.pings and not openai and i > 0:
                shaped.append(_PING)
            shaped.append(event)
        if reply.comments:
            # Comment chunks glue to the event that follows them; the count must only see events.
            glued: list[bytes] = []
            pending = b""
            for piece in shaped:
                if piece.startswith(b":"):
                    pending += piece
                else:
                    glued.append(pending + piece)
                    pending = b""
            shaped = glued
        return shaped

    def _stream_error_event(self, openai: bool, reply: Reply) -> bytes:
        err_type = reply.stream_error_type
        if openai:
            err = {"message": reply.error_message or "The server had an error.", "type": err_type, "code": None}
            return b"data: " + _dumps({"error": err}) + b"\n\n"
        status = next((s for s, (t, _) in _ANTHROPIC_ERRORS.items() if t == err_type), 500)
        obj = _anthropic_error_obj(status, err_type, reply.error_message)
        return b"event: error\ndata: " + _dumps(obj) + b"\n\n"


def _plain(reply: Reply) -> bool:
    """A reply whose bytes depend only on the request's model and text: cacheable."""
    return (
        reply.status == 200
        and reply.body is None
        and not reply.drop
        and not reply.truncate_body
        and not reply.headers
        and reply.cut_after is None
        and reply.reset_after is None
        and reply.hang_after is None
        and reply.error_after is None
        and reply.split is None
        and reply.line_ending == "\n"
        and not reply.pings
        and not reply.comments
        and not reply.ignore_stream
        and not reply.thinking
    )


def _sse_response(extra: Mapping[str, str] | None = None) -> web.StreamResponse:
    headers = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}
    if extra:
        headers.update(extra)
    return web.StreamResponse(headers=headers)


def _last_user_text(body: dict[str, Any], openai: bool) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user":
            text = _text_of(m.get("content"))
            if text or openai:
                return text
    return ""


def _prompt_texts(body: dict[str, Any], openai: bool) -> tuple[list[str], int]:
    messages = body.get("messages")
    messages = messages if isinstance(messages, list) else []
    texts = [_text_of(m.get("content")) for m in messages if isinstance(m, dict)]
    if not openai:
        texts.append(_text_of(body.get("system")))
    return texts, len(messages)


def _prompt_words(body: dict[str, Any], openai: bool) -> int:
    texts, count = _prompt_texts(body, openai)
    return default_usage(texts, count, "").input


# -- validation: what the real APIs reject, so adapter mistakes show up in tests ----------------------


def _openai_problem(body: dict[str, Any]) -> str:
    if not body.get("model"):
        return "you must provide a model parameter"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array"
    if body.get("stream_options") is not None and not body.get("stream"):
        return "The 'stream_options' parameter is only allowed when 'stream' is enabled."
    open_calls: set[str] = set()
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("system", "developer", "user", "assistant", "tool"):
            return f"Invalid value for 'messages[{i}].role'."
        if role == "assistant":
            open_calls = {c.get("id") for c in m.get("tool_calls") or ()}
        elif role == "tool":
            if m.get("tool_call_id") not in open_calls:
                return (
                    "Invalid parameter: messages with role 'tool' must be a response to a preceeding "
                    "message with 'tool_calls'."
                )
        else:
            open_calls = set()
    return ""


def _anthropic_problem(body: dict[str, Any], headers: Mapping[str, str]) -> str:
    if not headers.get("anthropic-version"):
        return "anthropic-version: header is required"
    if not body.get("model"):
        return "model: Field required"
    if not isinstance(body.get("max_tokens"), int):
        return "max_tokens: Field required"
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return "messages: Field required"
    marked = _count_cache_control(body)
    if marked > 4:
        return f"A maximum of 4 blocks with cache_control may be provided. Found {marked}."
    tool_ids: set[str] = set()
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in ("user", "assistant"):
            return (
                f"messages.{i}.role: Input should be 'user' or 'assistant'; found \"{role}\". The Messages "
                'API accepts a top-level `system` parameter, not "system" as an input message role.'
            )
        content = m.get("content")
        blocks = content if isinstance(content, list) else []
        for block in blocks:
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and not block.get("text"):
                return f"messages.{i}.content: text content blocks must be non-empty"
            if kind == "tool_use":
                if role != "assistant" or not isinstance(block.get("input"), dict):
                    return f"messages.{i}.content: tool_use blocks need an assistant turn and an object input"
                tool_ids.add(block.get("id"))
            if kind == "tool_result" and (role != "user" or block.get("tool_use_id") not in tool_ids):
                return f"messages.{i}.content: tool_result block(s) provided without a matching tool_use"
    return ""


def _count_cache_control(value: Any) -> int:
    if isinstance(value, dict):
        return ("cache_control" in value) + sum(_count_cache_control(v) for v in value.values())
    if isinstance(value, list):
        return sum(_count_cache_control(v) for v in value)
    return 0


# -- wire encodings ---------------------------------------------------------------------------------


def _finish(reply: Reply, openai: bool) -> str:
    if reply.finish_reason is not None:
        return reply.finish_reason
    if not openai and reply.stop_sequence is not None:
        return "stop_sequence"
    if openai and reply.legacy_function_call and reply.tool_calls:
        return "function_call"
    if reply.tool_calls:
        return "tool_calls" if openai else "tool_use"
    return "stop" if openai else "end_turn"


def _openai_usage(u: SimUsage) -> dict[str, Any]:
    prompt_details: dict[str, int] = {"cached_tokens": u.cached, "audio_tokens": u.audio_input}
    if u.cache_write:
        prompt_details["cache_write_tokens"] = u.cache_write
    return {
        "prompt_tokens": u.input,
        "completion_tokens": u.output,
        "total_tokens": u.input + u.output,
        "prompt_tokens_details": prompt_details,
        "completion_tokens_details": {
            "reasoning_tokens": u.reasoning,
            "audio_tokens": u.audio_output,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _openai_calls(reply: Reply) -> list[dict[str, Any]]:
    return [
        {
            "id": c.id or f"call_sim_{i + 1}",
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for i, c in enumerate(reply.tool_calls)
    ]


def _openai_completion(model: str, content: str, reply: Reply, usage: SimUsage) -> bytes:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": content if content or not (reply.tool_calls or reply.refusal) else None,
        "refusal": reply.refusal,
    }
    if reply.thinking:
        message["reasoning_content"] = "".join(reply.thinking)
    if reply.tool_calls and reply.legacy_function_call:
        call = reply.tool_calls[0]
        message["function_call"] = {"name": call.name, "arguments": call.arguments}
    elif reply.tool_calls:
        message["tool_calls"] = _openai_calls(reply)
    doc: dict[str, Any] = {
        "id": reply.response_id or "chatcmpl-sim",
        "object": "chat.completion",
        "created": _CREATED,
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": _finish(reply, True)}],
    }
    if not reply.omit_usage:
        doc["usage"] = _openai_usage(usage)
    if reply.service_tier is not None:
        doc["service_tier"] = reply.service_tier
    doc["system_fingerprint"] = reply.system_fingerprint
    return _dumps(doc)


def _openai_stream(model: str, content: str, reply: Reply, usage: SimUsage, include_usage: bool) -> list[bytes]:
    head = 'data: {"id":' + json.dumps(reply.response_id or "chatcmpl-sim")
    head += f',"object":"chat.completion.chunk","created":{_CREATED},"model":'
    head += json.dumps(model)
    if reply.service_tier is not None:
        head += ',"service_tier":' + json.dumps(reply.service_tier)
    head += ',"system_fingerprint":' + json.dumps(reply.system_fingerprint) + ',"choices":['
    with_usage = include_usage and not reply.omit_usage
    every = reply.usage_every_chunk and not reply.omit_usage
    pieces = _pieces(content, reply.stream_chunks)
    total = len(pieces) + 2 + sum(1 + len(_arg_pieces(c.arguments)) for c in reply.tool_calls)
    sent = 0

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        nonlocal sent
        sent += 1
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        tail = "]"
        if every:
            # Growing counts, as servers that report usage on every chunk do; the last one is final.
            grown = SimUsage(
                usage.input, usage.output * sent // total, usage.cached, usage.cache_write, usage.reasoning
            )
            tail += ',"usage":' + json.dumps(_openai_usage(grown), separators=(",", ":"))
        elif with_usage:
            tail += ',"usage":null'
        return (head + json.dumps(choice, separators=(",", ":"), ensure_ascii=False) + tail + "}\n\n").encode()

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"reasoning_content": p}) for p in _pieces("".join(reply.thinking), reply.stream_chunks)]
    events += [chunk({"content": p}) for p in pieces]
    events += [chunk({"refusal": p}) for p in _pieces(reply.refusal or "", reply.stream_chunks)]
    if reply.legacy_function_call and reply.tool_calls:
        legacy = reply.tool_calls[0]
        events.append(chunk({"function_call": {"name": legacy.name, "arguments": ""}}))
        for frag in _arg_pieces(legacy.arguments):
            events.append(chunk({"function_call": {"arguments": frag}}))
    for i, call in enumerate([] if reply.legacy_function_call else _openai_calls(reply)):
        first = {"index": i, "id": call["id"], "type": "function", "function": {"name": call["function"]["name"]}}
        first["function"]["arguments"] = ""
        events.append(chunk({"tool_calls": [first]}))
        for frag in _arg_pieces(call["function"]["arguments"]):
            events.append(chunk({"tool_calls": [{"index": i, "function": {"arguments": frag}}]}))
    events.append(chunk({}, _finish(reply, True)))
    if with_usage:
        final = json.dumps(_openai_usage(usage), separators=(",", ":"))
        events.append((head + '],"usage":' + final + "}\n\n").encode())
    events.append(b"data: [DONE]\n\n")
    return events


def _anthropic_usage(u: SimUsage, output: int, final: bool = True) -> dict[str, Any]:
    """The usage object; `final` adds what only the end of a reply knows (thinking, server tool use)."""
    usage: dict[str, Any] = {
        "input_tokens": u.input,
        "cache_creation_input_tokens": u.cache_write,
        "cache_read_input_tokens": u.cached,
        "output_tokens": output,
    }
    if u.cache_write:
        usage["cache_creation"] = {
            "ephemeral_5m_input_tokens": u.cache_write - u.cache_write_1h,
            "ephemeral_1h_input_tokens": u.cache_write_1h,
        }
    if final and u.reasoning:
        usage["output_tokens_details"] = {"thinking_tokens": u.reasoning}
    if final and u.web_search:
        usage["server_tool_use"] = {"web_search_requests": u.web_search, "web_fetch_requests": 0}
    return usage


def _thinking_blocks(reply: Reply) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    for i, text in enumerate(reply.thinking):
        if text.startswith("redacted:"):
            blocks.append({"type": "redacted_thinking", "data": text.removeprefix("redacted:")})
        else:
            blocks.append({"type": "thinking", "thinking": text, "signature": f"sig_sim_{i + 1}"})
    return blocks


def _anthropic_blocks(content: str, reply: Reply) -> list[dict[str, Any]]:
    blocks = _thinking_blocks(reply)
    if content:
        blocks.append({"type": "text", "text": content})
    for i, c in enumerate(reply.tool_calls):
        blocks.append(
            {"type": "tool_use", "id": c.id or f"toolu_sim_{i + 1}", "name": c.name, "input": json.loads(c.arguments)}
        )
    return blocks


def _anthropic_message(model: str, content: str, reply: Reply, usage: SimUsage) -> bytes:
    doc: dict[str, Any] = {
        "id": reply.response_id or "msg_sim",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": _anthropic_blocks(content, reply),
        "stop_reason": _finish(reply, False),
        "stop_sequence": reply.stop_sequence,
    }
    if not reply.omit_usage:
        doc["usage"] = _anthropic_usage(usage, usage.output)
        if reply.service_tier is not None:
            doc["usage"]["service_tier"] = reply.service_tier
    return _dumps(doc)


_START_ONLY = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "cache_creation")
_PING = b'event: ping\ndata: {"type": "ping"}\n\n'


def _event(name: str, obj: dict[str, Any]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + _dumps(obj) + b"\n\n"


def _thinking_events(index: int, block: dict[str, Any], chunks: int | None) -> list[bytes]:
    """A thinking block as the API streams one: opened empty, thinking deltas, the signature, closed."""
    if block["type"] == "redacted_thinking":
        start = {"type": "content_block_start", "index": index, "content_block": block}
        return [
            _event("content_block_start", start),
            _event("content_block_stop", {"type": "content_block_stop", "index": index}),
        ]
    opened = {"type": "thinking", "thinking": "", "signature": ""}
    events = [_event("content_block_start", {"type": "content_block_start", "index": index, "content_block": opened})]
    deltas = [{"type": "thinking_delta", "thinking": piece} for piece in _pieces(block["thinking"], chunks)]
    deltas.append({"type": "signature_delta", "signature": block["signature"]})
    for delta in deltas:
        events.append(_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
    events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


def _anthropic_stream(model: str, content: str, reply: Reply, usage: SimUsage) -> list[bytes]:
    start_output = usage.start_output if usage.start_output is not None else min(1, usage.output)
    message: dict[str, Any] = {
        "id": reply.response_id or "msg_sim",
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": _anthropic_usage(usage, start_output, final=False),
    }
    if reply.service_tier is not None:
        message["usage"]["service_tier"] = reply.service_tier
    events = [_event("message_start", {"type": "message_start", "message": message})]
    index = 0
    for block in _thinking_blocks(reply):
        events += _thinking_events(index, block, reply.stream_chunks)
        index += 1
    if content or not reply.tool_calls:
        events.append(
            _event(
                "content_block_start",
                {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}},
            )
        )
        if index == 0:
            events.append(_PING)  # the real API sends one here
        for piece in _pieces(content, reply.stream_chunks):
            delta = {"type": "text_delta", "text": piece}
            events.append(
                _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            )
        events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    for i, call in enumerate(reply.tool_calls):
        block = {"type": "tool_use", "id": call.id or f"toolu_sim_{i + 1}", "name": call.name, "input": {}}
        events.append(
            _event("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})
        )
        for frag in ["", *_arg_pieces(call.arguments if call.arguments != "{}" else "")]:
            delta = {"type": "input_json_delta", "partial_json": frag}
            events.append(
                _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
            )
        events.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        index += 1
    message_delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": _finish(reply, False), "stop_sequence": reply.stop_sequence},
    }
    if not reply.omit_usage:
        final = _anthropic_usage(usage, usage.output)
        # message_delta's usage carries the output count and what only the end knows, cumulative
        message_delta["usage"] = {k: v for k, v in final.items() if k not in _START_ONLY}
    events.append(_event("message_delta", message_delta))
    events.append(_event("message_stop", {"type": "message_stop"}))
    return events


# -- standalone ---------------------------------------------------------------------------------------


async def _serve_forever(args: argparse.Namespace) -> None:
    default = Reply(
        content=args.reply,
        stream_chunks=args.stream_chunks,
        latency_s=args.latency_ms / 1000.0,
    )
    sim = UpstreamSimulator(host=args.host, port=args.port, record=False, default=default)
    async with sim:
        print(sim.url, flush=True)
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m sim.upstream", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--stream-chunks", type=int, default=None, help="content pieces per stream")
    parser.add_argument("--reply", default=None, help="fixed reply text (default: echo the last user text)")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="added before every reply")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_forever(args))


if __name__ == "__main__":
    main(sys.argv[1:])
