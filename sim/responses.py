"""A local OpenAI Responses API: `POST /v1/responses`, whole responses and their SSE event streams.

    async with ResponsesSimulator(api_key="sk-test") as sim:   # openai base_url sim.url + "/v1"

Requests are validated as the API does: `input` items of known types, a `function_call_output` only for
a call id that a `function_call` item of the same input introduced, reasoning items sent back whole
(with their `encrypted_content`, as `store: false` requires), `max_output_tokens` at least 16.
Default reply: "Hello from <model>: <last user text>", status completed, usage input = words of every
text (instructions included) + 3 per item, output = words of the reply. `enqueue(ResponsesReply(...))`
scripts one request: text, function calls, a reasoning item, a refusal, an incomplete reason, usage
(cached, reasoning), an HTTP error, or an error event mid-stream. Streams send the events the real API
sends: response.created, in_progress, output_item.added/done, content_part.added/done,
output_text.delta/done, function_call_arguments.delta/done, completed (or incomplete).
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

__all__ = ["RecordedResponses", "ResponsesReply", "ResponsesSimulator"]

_CREATED = 1_700_000_000


@dataclass(frozen=True, slots=True)
class ResponsesReply:
    text: str | None = None  # None: the default reply (none when there are function calls)
    function_calls: tuple[tuple[str, str], ...] = ()  # (name, arguments JSON)
    reasoning: str = ""  # a reasoning item with this encrypted content before the output
    summary: tuple[str, ...] = ()  # that item's summary parts (summary_text), when asked for
    refusal: str = ""
    incomplete: str = ""  # "max_output_tokens" | "content_filter": status incomplete
    input_tokens: int | None = None
    output_tokens: int | None = None
    cached: int = 0
    reasoning_tokens: int = 0
    web_searches: int = 0  # web_search_call items (completed) before the message
    latency_s: float = 0.0  # wait before answering
    status: int = 200
    error_code: str = "server_error"
    message: str = "The server had an error."
    error_after: int | None = None  # streams: after N events, an `error` event
    # A raw reply instead of anything above: these bytes with `content_type` (a fuzzer's mutated replies)
    body: bytes | None = None
    content_type: str = "application/json"


@dataclass(slots=True)
class RecordedResponses:
    headers: dict[str, str]
    body: Any


class ResponsesSimulator:
    def __init__(
        self,
        *,
        api_key: str | None = None,
        path: str = "/v1/responses",
        azure: bool = False,
        no_reasoning: tuple[str, ...] = (),
    ) -> None:
        self.api_key = api_key
        self.no_reasoning = no_reasoning  # models that, like gpt-4o, refuse `include: reasoning.encrypted_content`
        self.path = path  # Azure's v1 endpoint: /openai/v1/responses
        self.azure = azure  # the key may come in Azure's api-key header
        self.port = 0
        self.requests: list[RecordedResponses] = []
        self._script: deque[ResponsesReply] = deque()
        self._runner: web.AppRunner | None = None
        self._calls = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def enqueue(self, *replies: ResponsesReply) -> None:
        self._script.extend(replies)

    async def __aenter__(self) -> ResponsesSimulator:
        app = web.Application()
        app.router.add_post(self.path, self._responses)
        self._runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _responses(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
        except ValueError:
            body = None
        self.requests.append(RecordedResponses({k.lower(): v for k, v in request.headers.items()}, body))
        bearer_ok = request.headers.get("authorization") == f"Bearer {self.api_key}"
        azure_ok = self.azure and request.headers.get("api-key") == self.api_key
        if self.api_key is not None and not (bearer_ok or azure_ok):
            return _error(401, "invalid_api_key", "Incorrect API key provided.")
        if isinstance(body, dict) and isinstance(body.get("input"), str):
            body["input"] = [{"role": "user", "content": body["input"]}]  # the API's shorthand for one message
        problem = _problem(body)
        if (
            not problem
            and body.get("model") in self.no_reasoning
            and "reasoning.encrypted_content" in (body.get("include") or ())
        ):
            problem = "Encrypted content is not supported with this model."
        if problem:
            return _error(400, "invalid_request_error", problem)
        reply = self._script.popleft() if self._script else ResponsesReply()
        if reply.latency_s:
            await asyncio.sleep(reply.latency_s)  # cancelled when the client goes away
        if reply.status >= 400:
            return _error(reply.status, reply.error_code, reply.message)
        if reply.body is not None:
            return web.Response(body=reply.body, content_type=reply.content_type)
        self._calls += 1
        response = self._response(body, reply)
        if not body.get("stream"):
            return web.Response(body=orjson.dumps(response), content_type="application/json")
        events = _events(response, reply)
        if reply.error_after is not None:
            error = {"type": "error", "code": reply.error_code, "message": reply.message, "param": None}
            events = [*events[: reply.error_after], error]
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
        await resp.prepare(request)
        data = b"".join(
            b"event: " + e["type"].encode() + b"\ndata: " + orjson.dumps({**e, "sequence_number": i}) + b"\n\n"
            for i, e in enumerate(events)
        )
        await resp.write(data)
        await resp.write_eof()
        return resp

    def _response(self, body: dict[str, Any], reply: ResponsesReply) -> dict[str, Any]:
        n = self._calls
        model = body["model"]
        texts = [body.get("instructions") or ""]
        last_user = ""
        for item in body["input"]:
            content = item.get("content")
            if isinstance(content, str):
                texts.append(content)
                if item.get("role") == "user":
                    last_user = content
        text = (
            reply.text
            if reply.text is not None
            else ("" if reply.function_calls else f"Hello from {model}: {last_user}")
        )
        output: list[dict[str, Any]] = []
        if reply.reasoning:
            output.append(
                {
                    "type": "reasoning",
                    "id": f"rs_sim_{n}",
                    "summary": [{"type": "summary_text", "text": t} for t in reply.summary],
                    "encrypted_content": reply.reasoning,
                    "status": None,
                }
            )
        for i in range(reply.web_searches):
            action = {"type": "search", "query": f"{last_user} {i}", "sources": None}
            output.append({"type": "web_search_call", "id": f"ws_sim_{n}_{i}", "status": "completed", "action": action})
        if text or reply.refusal:
            part = (
                {"type": "refusal", "refusal": reply.refusal}
                if reply.refusal
                else {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            )
            output.append(
                {"type": "message", "id": f"msg_sim_{n}", "role": "assistant", "status": "completed", "content": [part]}
            )
        for i, (name, arguments) in enumerate(reply.function_calls):
            output.append(
                {
                    "type": "function_call",
                    "id": f"fc_sim_{n}_{i}",
                    "call_id": f"call_sim_{n}_{i}",
                    "name": name,
                    "arguments": arguments,
                    "status": "completed",
                }
            )
        words = sum(len(t.split()) for t in texts)
        inputs = reply.input_tokens if reply.input_tokens is not None else words + 3 * len(body["input"])
        outputs = (
            reply.output_tokens if reply.output_tokens is not None else len(text.split()) + len(reply.function_calls)
        )
        usage = {
            "input_tokens": inputs,
            "input_tokens_details": {"cached_tokens": reply.cached},
            "output_tokens": outputs,
            "output_tokens_details": {"reasoning_tokens": reply.reasoning_tokens},
            "total_tokens": inputs + outputs,
        }
        return {
            "id": f"resp_sim_{n}",
            "object": "response",
            "created_at": _CREATED,
            "status": "incomplete" if reply.incomplete else "completed",
            "error": None,
            "incomplete_details": {"reason": reply.incomplete} if reply.incomplete else None,
            "instructions": body.get("instructions"),
            "model": model,
            "output": output,
            "service_tier": body.get("service_tier") or "default",
            "parallel_tool_calls": True,
            "tool_choice": body.get("tool_choice", "auto"),
            "tools": body.get("tools", []),
            "store": body.get("store", True),
            "usage": usage,
            "metadata": {},
        }


def _events(response: dict[str, Any], reply: ResponsesReply) -> list[dict[str, Any]]:
    shell = {**response, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    events: list[dict[str, Any]] = [
        {"type": "response.created", "response": shell},
        {"type": "response.in_progress", "response": shell},
    ]
    for index, item in enumerate(response["output"]):
        kind = item["type"]
        if kind == "reasoning":
            events.append(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**item, "encrypted_content": None, "summary": []},
                }
            )
            for at, summary in enumerate(item["summary"]):
                where = {"item_id": item["id"], "output_index": index, "summary_index": at}
                events.append(
                    {"type": "response.reasoning_summary_part.added", **where, "part": {**summary, "text": ""}}
                )
                words = summary["text"].split(" ")
                for w, word in enumerate(words):
                    delta = word if w == len(words) - 1 else word + " "
                    events.append({"type": "response.reasoning_summary_text.delta", **where, "delta": delta})
                events.append({"type": "response.reasoning_summary_text.done", **where, "text": summary["text"]})
                events.append({"type": "response.reasoning_summary_part.done", **where, "part": summary})
            events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        elif kind == "message":
            part = item["content"][0]
            empty = {
                "type": part["type"],
                **({"refusal": ""} if part["type"] == "refusal" else {"text": "", "annotations": []}),
            }
            events.append(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**item, "status": "in_progress", "content": []},
                }
            )
            events.append(
                {
                    "type": "response.content_part.added",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "part": empty,
                }
            )
            if part["type"] == "refusal":
                events.append(
                    {
                        "type": "response.refusal.delta",
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "delta": part["refusal"],
                    }
                )
                events.append(
                    {
                        "type": "response.refusal.done",
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "refusal": part["refusal"],
                    }
                )
            else:
                words = part["text"].split(" ")
                for i, word in enumerate(words):
                    delta = word + (" " if i < len(words) - 1 else "")
                    events.append(
                        {
                            "type": "response.output_text.delta",
                            "item_id": item["id"],
                            "output_index": index,
                            "content_index": 0,
                            "delta": delta,
                            "logprobs": [],
                        }
                    )
                events.append(
                    {
                        "type": "response.output_text.done",
                        "item_id": item["id"],
                        "output_index": index,
                        "content_index": 0,
                        "text": part["text"],
                        "logprobs": [],
                    }
                )
            events.append(
                {
                    "type": "response.content_part.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "content_index": 0,
                    "part": part,
                }
            )
            events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        elif kind == "web_search_call":
            events.append(
                {"type": "response.output_item.added", "output_index": index, "item": {**item, "status": "in_progress"}}
            )
            for step in ("in_progress", "searching", "completed"):
                events.append(
                    {"type": f"response.web_search_call.{step}", "item_id": item["id"], "output_index": index}
                )
            events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        elif kind == "function_call":
            events.append(
                {
                    "type": "response.output_item.added",
                    "output_index": index,
                    "item": {**item, "arguments": "", "status": "in_progress"},
                }
            )
            half = len(item["arguments"]) // 2
            for piece in (item["arguments"][:half], item["arguments"][half:]):
                events.append(
                    {
                        "type": "response.function_call_arguments.delta",
                        "item_id": item["id"],
                        "output_index": index,
                        "delta": piece,
                    }
                )
            events.append(
                {
                    "type": "response.function_call_arguments.done",
                    "item_id": item["id"],
                    "output_index": index,
                    "arguments": item["arguments"],
                }
            )
            events.append({"type": "response.output_item.done", "output_index": index, "item": item})
    final = "response.incomplete" if reply.incomplete else "response.completed"
    events.append({"type": final, "response": response})
    return events


def _problem(body: Any) -> str:
    if not isinstance(body, dict):
        return "We could not parse the JSON body of your request."
    if not body.get("model"):
        return "Missing required parameter: 'model'."
    items = body.get("input")
    if not isinstance(items, list) or not items:
        return "Missing required parameter: 'input'."
    max_tokens = body.get("max_output_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 16):
        return "Invalid 'max_output_tokens': integer below minimum value. Expected a value >= 16."
    calls: set[str] = set()
    for i, item in enumerate(items):
        kind = item.get("type", "message")
        if kind == "message":
            if item.get("role") not in ("user", "assistant", "system", "developer"):
                return f"Invalid value for 'input[{i}].role'."
            if not isinstance(item.get("content"), str | list):
                return f"Missing required parameter: 'input[{i}].content'."
        elif kind == "function_call":
            if not item.get("call_id") or not item.get("name") or not isinstance(item.get("arguments"), str):
                return f"Missing required parameter: 'input[{i}].call_id'."
            calls.add(item["call_id"])
        elif kind == "function_call_output":
            if item.get("call_id") not in calls:
                return f"No tool call found for function call output with call_id {item.get('call_id')}."
        elif kind == "reasoning":
            if not item.get("id") or "summary" not in item:
                return f"Missing required parameter: 'input[{i}].summary'."
            if body.get("store") is False and not item.get("encrypted_content"):
                return f"Item with id '{item.get('id')}' not found. Items are not persisted when `store` is false."
        else:
            return f"Invalid value: '{kind}'. Supported values are: 'message', 'function_call', 'function_call_output'."
    return ""


def _error(status: int, code: str, message: str) -> web.Response:
    err_type = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:
        err_type = "requests"
    body = {"error": {"message": message, "type": err_type, "param": None, "code": code}}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")
