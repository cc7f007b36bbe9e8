"""The simulators and the gateway's request bodies against the official `openai` and `anthropic` SDKs.

- Every kind of simulated reply and stream is fetched raw and validated strictly against the SDK's response
  models (types checked; a key the SDK does not know fails), then the SDK client itself is pointed at the
  simulator and has to parse it: a simulator cannot drift from the real API unnoticed.
- Every body the gateway sends for the contract's features is validated against the SDK's request TypedDicts
  (`CompletionCreateParams`, `MessageCreateParams`): an unknown key or a wrongly typed value fails.
"""

from __future__ import annotations

import base64
import collections.abc
import json
from collections.abc import AsyncIterator
from functools import cache
from typing import Any

import aiohttp
import anthropic
import openai
import pytest
from anthropic.types import Message as AnthropicMessage
from anthropic.types import RawMessageStreamEvent
from anthropic.types.message_create_params import MessageCreateParamsNonStreaming, MessageCreateParamsStreaming
from anthropic.types.shared.error_response import ErrorResponse as AnthropicErrorResponse
from google.protobuf import struct_pb2
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.chat.completion_create_params import (
    CompletionCreateParamsNonStreaming,
    CompletionCreateParamsStreaming,
)
from pydantic import BaseModel, TypeAdapter

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from sim.upstream import ANTHROPIC_PATH, OPENAI_PATH, Reply, SimToolCall, SimUsage, UpstreamSimulator
from tests.gateway_harness import running_gateway, user
from tests.test_contract_accounting import ENV, config

# Fields a simulated reply may carry that the official SDK does not type, each on purpose.
OPENAI_EXTENSIONS = frozenset({"reasoning_content"})  # DeepSeek/vLLM's reasoning text (openai-compatible)

OPENAI_REPLIES = {
    "text": Reply(content="Hello there", usage=SimUsage(12, 3, cached=4)),
    "tool calls": Reply(tool_calls=(SimToolCall("get_weather", '{"city":"Paris"}'), SimToolCall("get_time"))),
    "legacy function_call": Reply(
        tool_calls=(SimToolCall("get_weather", '{"city":"Oslo"}'),), legacy_function_call=True
    ),
    "refusal": Reply(refusal="I can't help with that."),
    "cache writes and reasoning": Reply(
        content="ok", usage=SimUsage(2000, 500, cached=1000, cache_write=300, reasoning=400)
    ),
    "snapshot, fingerprint, tier": Reply(
        content="ok", model="gpt-4o-2024-08-06", system_fingerprint="fp_1", service_tier="default"
    ),
    "audio tokens": Reply(content="heard", usage=SimUsage(900, 300, audio_input=800, audio_output=250)),
    "length": Reply(content="cut", finish_reason="length"),
    "no usage": Reply(content="unmetered", omit_usage=True),
    "usage on every chunk": Reply(content="a b c d", usage_every_chunk=True),
    "reasoning_content": Reply(content="4", thinking=("2+2 is 4",)),
}
ANTHROPIC_REPLIES = {
    "text": Reply(content="Hello there", usage=SimUsage(12, 3, cached=4, cache_write=5)),
    "tool calls": Reply(tool_calls=(SimToolCall("get_weather", '{"city":"Paris"}'), SimToolCall("get_time"))),
    "thinking and redacted thinking": Reply(
        content="Done.", thinking=("Let me think.", "redacted:EncBlob=="), usage=SimUsage(9, 90, reasoning=60)
    ),
    "1-hour cache writes": Reply(content="ok", usage=SimUsage(10, 2, cache_write=3000, cache_write_1h=2000)),
    "web search": Reply(content="found", usage=SimUsage(10, 2, web_search=3)),
    "stop sequence, snapshot, tier": Reply(
        content="x", stop_sequence="END", model="claude-x-20250514", service_tier="standard"
    ),
    "max_tokens": Reply(content="cut", finish_reason="max_tokens"),
    "refusal stop": Reply(content="I cannot help with that.", finish_reason="refusal"),
    "pings": Reply(content="one two three", pings=True),
}
ERRORS = [400, 401, 403, 404, 429, 500]


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSimulator]:
    async with UpstreamSimulator() as s:
        yield s


def no_unknown_keys(value: object, allowed: frozenset[str] = frozenset(), where: str = "reply") -> None:
    """Fails on any key the SDK's models do not declare (they accept extras silently)."""
    if isinstance(value, BaseModel):
        extra = set(value.model_extra or {}) - allowed
        assert not extra, f"{where}: keys the SDK does not know: {sorted(extra)}"
        for name in type(value).model_fields:
            no_unknown_keys(getattr(value, name), allowed, f"{where}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            no_unknown_keys(item, allowed, f"{where}[{i}]")


def strict(model: Any, data: Any, allowed: frozenset[str] = frozenset()) -> Any:
    parsed = TypeAdapter(model).validate_python(data)
    no_unknown_keys(parsed, allowed)
    return parsed


async def raw(sim: UpstreamSimulator, path: str, body: dict[str, Any]) -> tuple[int, bytes]:
    headers = {"anthropic-version": "2023-06-01"} if path == ANTHROPIC_PATH else {}
    async with aiohttp.ClientSession() as http, http.post(sim.url + path, json=body, headers=headers) as resp:
        return resp.status, await resp.read()


def sse_data(data: bytes) -> list[tuple[str, str]]:
    """(event name, data) of each SSE event."""
    events = []
    for block in data.decode().split("\n\n"):
        if not block.strip():
            continue
        name = "".join(line[7:] for line in block.split("\n") if line.startswith("event: "))
        events.append((name, "\n".join(line[6:] for line in block.split("\n") if line.startswith("data: "))))
    return events


OPENAI_ASK = {"model": "gpt-sim", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_ASK = {"model": "claude-sim", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("case", list(OPENAI_REPLIES))
async def test_openai_sdk_parses_every_simulated_reply_and_stream(sim: UpstreamSimulator, case: str) -> None:
    reply = OPENAI_REPLIES[case]
    sim.enqueue(reply, reply, reply, reply)
    status, body = await raw(sim, OPENAI_PATH, OPENAI_ASK)
    assert status == 200
    completion = strict(ChatCompletion, json.loads(body), OPENAI_EXTENSIONS)
    status, body = await raw(
        sim, OPENAI_PATH, {**OPENAI_ASK, "stream": True, "stream_options": {"include_usage": True}}
    )
    events = sse_data(body)
    assert events[-1] == ("", "[DONE]")
    chunks = [strict(ChatCompletionChunk, json.loads(data), OPENAI_EXTENSIONS) for _, data in events[:-1]]
    assert all(c.id == completion.id and c.model == completion.model for c in chunks)

    client = openai.AsyncOpenAI(api_key="sk-test", base_url=sim.url + "/v1", max_retries=0)
    try:
        parsed = await client.chat.completions.create(model="gpt-sim", messages=[{"role": "user", "content": "hi"}])
        assert parsed.model_dump() == completion.model_dump()
        stream = await client.chat.completions.create(
            model="gpt-sim",
            messages=[{"role": "user", "content": "hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        sdk_chunks = [chunk async for chunk in stream]
        assert [c.model_dump() for c in sdk_chunks] == [c.model_dump() for c in chunks]
    finally:
        await client.close()
    message = completion.choices[0].message
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == (message.content or "")


@pytest.mark.parametrize("case", list(ANTHROPIC_REPLIES))
async def test_anthropic_sdk_parses_every_simulated_reply_and_stream(sim: UpstreamSimulator, case: str) -> None:
    reply = ANTHROPIC_REPLIES[case]
    sim.enqueue(reply, reply, reply, reply)
    status, body = await raw(sim, ANTHROPIC_PATH, ANTHROPIC_ASK)
    assert status == 200
    message = strict(AnthropicMessage, json.loads(body))
    status, body = await raw(sim, ANTHROPIC_PATH, {**ANTHROPIC_ASK, "stream": True})
    events = [(name, json.loads(data)) for name, data in sse_data(body)]
    for name, data in events:
        assert name == data["type"]
        if name != "ping":  # the SDK skips pings; they are not a typed event
            strict(RawMessageStreamEvent, data)

    client = anthropic.AsyncAnthropic(api_key="ak-test", base_url=sim.url, max_retries=0)
    try:
        parsed = await client.messages.create(
            model="claude-sim", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        )
        assert parsed.model_dump() == message.model_dump()
        async with client.messages.stream(
            model="claude-sim", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
        ) as stream:
            final = await stream.get_final_message()
    finally:
        await client.close()
    # The SDK's own accumulation of the stream gives the same message as the non-streamed reply.
    assert final.model_dump(exclude={"usage"}) == message.model_dump(exclude={"usage"})
    assert final.usage.output_tokens == message.usage.output_tokens
    assert final.usage.input_tokens == message.usage.input_tokens


@pytest.mark.parametrize("status", ERRORS)
async def test_both_sdks_parse_the_simulated_error_bodies(sim: UpstreamSimulator, status: int) -> None:
    sim.enqueue(Reply(status=status), path=OPENAI_PATH)
    sim.enqueue(Reply(status=status), path=OPENAI_PATH)
    sim.enqueue(Reply(status=status), path=ANTHROPIC_PATH)
    sim.enqueue(Reply(status=status), path=ANTHROPIC_PATH)
    _, body = await raw(sim, OPENAI_PATH, OPENAI_ASK)
    strict(openai.types.shared.ErrorObject, json.loads(body)["error"])
    _, body = await raw(sim, ANTHROPIC_PATH, ANTHROPIC_ASK)
    strict(AnthropicErrorResponse, json.loads(body))
    oa = openai.AsyncOpenAI(api_key="sk-test", base_url=sim.url + "/v1", max_retries=0)
    an = anthropic.AsyncAnthropic(api_key="ak-test", base_url=sim.url, max_retries=0)
    try:
        with pytest.raises(openai.APIStatusError) as oa_err:
            await oa.chat.completions.create(model="gpt-sim", messages=[{"role": "user", "content": "hi"}])
        with pytest.raises(anthropic.APIStatusError) as an_err:
            await an.messages.create(model="claude-sim", max_tokens=8, messages=[{"role": "user", "content": "hi"}])
    finally:
        await oa.close()
        await an.close()
    assert oa_err.value.status_code == an_err.value.status_code == status


# -- the gateway's request bodies against the SDKs' request types ---------------------------------------


@cache
def request_types() -> dict[tuple[str, bool], TypeAdapter[Any]]:
    """Built once: the SDK TypedDicts are large."""
    return {
        ("openai", False): TypeAdapter(CompletionCreateParamsNonStreaming),
        ("openai", True): TypeAdapter(CompletionCreateParamsStreaming),
        ("anthropic", False): TypeAdapter(MessageCreateParamsNonStreaming),
        ("anthropic", True): TypeAdapter(MessageCreateParamsStreaming),
    }


def materialise(value: Any) -> Any:
    """What the TypeAdapter kept (unknown keys are dropped; `Iterable` fields validate lazily, as iterated)."""
    if isinstance(value, dict):
        return {k: materialise(v) for k, v in value.items()}
    if isinstance(value, list | tuple | collections.abc.Iterator):
        return [materialise(v) for v in value]
    return value


# Fields the gateway sends when a caller sets them that the installed SDK no longer types: anthropic 2.17's
# MessageCreateParams dropped `temperature` and `top_p` (newer Claude models refuse them; older ones take them).
UNTYPED = {"openai": frozenset[str](), "anthropic": frozenset({"temperature", "top_p"})}


def conforms(kind: str, body: dict[str, Any]) -> None:
    body = {k: v for k, v in body.items() if k not in UNTYPED[kind]}
    kept = materialise(request_types()[(kind, bool(body.get("stream")))].validate_python(body))
    assert kept == body, f"{kind} body has what the SDK's request type does not: {body}"


PNG = b"\x89PNG\r\n\x1a\n" + bytes(16)
PDF = b"%PDF-1.7 /Type /Page"


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def feature_requests(model: str) -> list[dict[str, Any]]:
    """ChatRequest fields exercising every part of the contract that reaches an upstream body."""
    anthropic_model = model == "claude-sim"
    schema = struct({"type": "object", "properties": {"city": {"type": "string"}}, "additionalProperties": False})
    weather = pb.Tool(name="get_weather", description="Weather", parameters=schema, strict=True)
    if anthropic_model:
        weather.cache_breakpoint.CopyFrom(pb.CacheBreakpoint(ttl=pb.CACHE_TTL_ONE_HOUR))
    parts = [
        pb.Part(text="Look", cache_breakpoint=pb.CacheBreakpoint()),
        pb.Part(image=pb.ImagePart(data=PNG, media_type="image/png")),
    ]
    parts += [pb.Part(image=pb.ImagePart(url="https://example.com/a.jpg", detail=pb.IMAGE_DETAIL_LOW))]
    parts += [pb.Part(document=pb.DocumentPart(data=PDF, title="a.pdf"))]
    if anthropic_model:
        parts += [pb.Part(document=pb.DocumentPart(url="https://example.com/a.pdf"))]
    else:
        parts += [pb.Part(audio=pb.AudioPart(data=b"RIFF", format="wav"))]
    assistant = pb.Message(
        role=pb.ROLE_ASSISTANT,
        content="Checking",
        tool_calls=[pb.ToolCall(id="call_1", name="get_weather", arguments='{"city":"Paris"}')],
        thinking=[pb.ThinkingBlock(text="hmm", signature="sig"), pb.ThinkingBlock(redacted_data="blob")],
    )
    tool_parts = [pb.Part(text="sunny")] + (
        [pb.Part(image=pb.ImagePart(data=PNG, media_type="image/png"))] if anthropic_model else []
    )
    conversation = [
        pb.Message(
            role=pb.ROLE_SYSTEM, content="Rules", cache_breakpoint=pb.CacheBreakpoint(ttl=pb.CACHE_TTL_ONE_HOUR)
        ),
        pb.Message(role=pb.ROLE_USER, parts=parts, name="" if anthropic_model else "ann"),
        assistant,
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", parts=tool_parts, is_error=True),
    ]
    json_schema = pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, schema_name="place", json_schema=schema, strict=True
    )
    extra = {"metadata": {"user_id": "u1"}} if anthropic_model else {"service_tier": "priority", "user": "u1"}
    return [
        {
            "messages": conversation,
            "tools": [weather],
            "parallel_tool_calls": False,
            "prompt_cache_key": "k1",
            "tool_choice": pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
        },
        {
            "messages": [user("json please")],
            "response_format": json_schema,
            "temperature": 1.0,
            "top_p": 0.9,
            "stop": ["END"],
            "max_tokens": 9000,
            "reasoning": pb.ReasoningOptions(effort=pb.REASONING_EFFORT_HIGH, thinking_budget_tokens=2048),
        },
        {
            "messages": [user("hi")],
            "tools": [weather],
            "parallel_tool_calls": True,
            "extra_fields": struct(extra),
            "tool_choice": pb.ToolChoice(function_name="get_weather"),
            "seed": 7,
        },
        {"messages": [user("hi")], "reasoning": pb.ReasoningOptions(effort=pb.REASONING_EFFORT_LOW)},
    ]


@pytest.mark.parametrize("model", ["gpt-sim", "claude-sim"])
async def test_gateway_bodies_match_the_sdk_request_types(sim: UpstreamSimulator, model: str) -> None:
    async with running_gateway(config(sim), ENV) as gw:
        for fields in feature_requests(model):
            await gw.stub.Chat(pb.ChatRequest(model=model, **fields))
            stream = gw.stub.StreamChat(pb.StreamChatRequest(model=model, **fields))
            assert [e.WhichOneof("event") async for e in stream][-1] == "end"
    kind = "openai" if model == "gpt-sim" else "anthropic"
    assert len(sim.requests) == 8
    for request in sim.requests:
        conforms(kind, request.body)


def test_the_request_type_check_catches_an_unknown_or_mistyped_field() -> None:
    good = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    conforms("anthropic", good)
    with pytest.raises(AssertionError):
        conforms("anthropic", {**good, "max_output_tokens": 5})
    with pytest.raises(AssertionError):
        conforms(
            "anthropic",
            {**good, "messages": [{"role": "user", "content": [{"type": "text", "text": "x", "cache": 1}]}]},
        )
    with pytest.raises(ValueError):
        conforms("openai", {"model": "m", "messages": [{"role": "user", "content": "x"}], "reasoning_effort": "huge"})
    assert base64.b64encode(PNG)  # the inline bytes above are real base64 material
