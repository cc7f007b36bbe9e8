"""OpenAI's Responses API (`"api": "responses"`): the adapter against sim/responses.py, reasoning items kept
for the next turn, the gateway around it, and the official `openai` SDK's `responses.create` (stream and
not) against the simulator (so the simulator cannot drift from what the SDK sends and reads)."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import grpc
import openai
import pytest
from google.protobuf import struct_pb2
from openai.types.responses import (
    FunctionToolParam,
    ResponseCompletedEvent,
    ResponseFunctionWebSearch,
    ResponseInputItemParam,
    ResponseReasoningSummaryPartAddedEvent,
    ResponseReasoningSummaryPartDoneEvent,
    ResponseReasoningSummaryTextDeltaEvent,
    ResponseReasoningSummaryTextDoneEvent,
)
from openai.types.responses.response_create_params import ResponseCreateParamsNonStreaming
from pydantic import TypeAdapter

from feather_grpc import config
from feather_grpc.config import ConfigError
from feather_grpc.core.errors import ProviderError
from feather_grpc.core.types import (
    ChatRequest,
    FinishReason,
    Message,
    Part,
    PartKind,
    ReplyId,
    ResponseFormat,
    Role,
    StreamFinish,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
)
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.providers import HttpClient, Provider, ProviderSettings, build_provider
from feather_grpc.providers.http import new_session
from feather_grpc.server.app import ServerOptions
from sim.responses import ResponsesReply, ResponsesSimulator
from sim.upstream import UpstreamSimulator
from tests.gateway_harness import rich_error, running_gateway, user
from tests.ops_harness import running_server, scrape_text
from tests.raw_http import RawServer, Req, chunked
from tests.test_sdk_conformance import materialise

KEY = "sk-responses-test-0123456789"
WEATHER = ToolSpec(
    name="get_weather",
    description="Weather for a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.fixture
async def sim() -> AsyncIterator[ResponsesSimulator]:
    async with ResponsesSimulator(api_key=KEY) as s:
        yield s


@pytest.fixture
async def session() -> AsyncIterator[HttpClient]:
    client = new_session()
    try:
        yield client
    finally:
        await client.close()


def responses(sim: ResponsesSimulator, session: HttpClient, models: tuple[str, ...] = ("o3",)) -> Provider:
    settings = ProviderSettings(
        name="openai", type="openai", base_url=sim.url + "/v1", api_key=KEY, responses_models=models
    )
    return build_provider(settings, session)


def ask(text: str = "hello there", **kw: Any) -> ChatRequest:
    return ChatRequest(model="m", messages=[Message(Role.USER, text)], **kw)


async def test_request_items_and_reply(sim: ResponsesSimulator, session: HttpClient) -> None:
    request = ChatRequest(
        model="m",
        messages=[
            Message(Role.SYSTEM, "Be brief."),
            Message(Role.USER, "weather in Paris?"),
            Message(Role.ASSISTANT, "Checking.", tool_calls=(ToolCall("call_1", "get_weather", '{"city":"Paris"}'),)),
            Message(Role.TOOL, "sunny", tool_call_id="call_1"),
        ],
        max_tokens=100,
        temperature=0.3,
        tools=[WEATHER],
        tool_choice=ToolChoice(function_name="get_weather"),
        response_format=ResponseFormat("json_schema", "weather", {"type": "object"}, True),
    )
    sim.enqueue(ResponsesReply(text="It is sunny.", input_tokens=40, output_tokens=30, cached=10, reasoning_tokens=20))
    out = await responses(sim, session).chat("o3", request)
    assert out.content == "It is sunny." and out.finish_reason is FinishReason.STOP
    assert out.upstream.id.startswith("resp_sim_")  # the response's own id, for the call log
    assert (out.upstream.model, out.upstream.service_tier) == ("o3", "default")  # as the response said
    u = out.usage
    assert (u.input_tokens, u.output_tokens, u.cached_input_tokens, u.reasoning_tokens) == (40, 30, 10, 20)
    body = sim.requests[-1].body
    assert sim.requests[-1].headers["authorization"] == f"Bearer {KEY}"
    assert body["instructions"] == "Be brief." and body["store"] is False
    assert body["include"] == ["reasoning.encrypted_content"]
    assert body["input"] == [
        {"role": "user", "content": "weather in Paris?"},
        {"role": "assistant", "content": "Checking."},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
    ]
    assert body["max_output_tokens"] == 100 and body["temperature"] == 0.3
    assert body["tool_choice"] == {"type": "function", "name": "get_weather"}
    assert body["tools"][0] == {
        "type": "function",
        "name": "get_weather",
        "strict": False,
        "description": "Weather for a city",
        "parameters": WEATHER.parameters,
    }
    assert body["text"] == {
        "format": {"type": "json_schema", "name": "weather", "schema": {"type": "object"}, "strict": True}
    }


async def test_other_models_of_the_provider_keep_chat_completions(session: HttpClient) -> None:
    async with UpstreamSimulator() as chat_sim:
        settings = ProviderSettings(
            name="openai", type="openai", base_url=chat_sim.url + "/v1", api_key=KEY, responses_models=("o3",)
        )
        out = await build_provider(settings, session).chat("gpt-4o", ask())
        assert out.content == "Hello from gpt-4o: hello there"
        assert chat_sim.requests[-1].path == "/v1/chat/completions"


@pytest.mark.parametrize("stream", [False, True])
async def test_reasoning_items_are_sent_back_with_the_function_calls(
    sim: ResponsesSimulator, session: HttpClient, stream: bool
) -> None:
    provider = responses(sim, session)
    sim.enqueue(ResponsesReply(reasoning="gAAAA-encrypted-1", function_calls=(("get_weather", '{"city":"Oslo"}'),)))
    if stream:
        events = [e async for e in provider.stream("o3", ask(tools=[WEATHER]))]
        calls = [e for e in events if isinstance(e, ToolCallDelta)]
        call = ToolCall(calls[0].id, calls[0].name, "".join(c.arguments for c in calls))
        end = events[-1]
        assert isinstance(end, StreamFinish) and end.finish_reason is FinishReason.TOOL_CALLS
    else:
        out = await provider.chat("o3", ask(tools=[WEATHER]))
        assert out.finish_reason is FinishReason.TOOL_CALLS
        call = out.tool_calls[0]
    assert call.name == "get_weather" and call.arguments == '{"city":"Oslo"}' and call.id.startswith("call_sim_")
    follow_up = ChatRequest(
        model="m",
        messages=[
            Message(Role.USER, "hello there"),
            Message(Role.ASSISTANT, "", tool_calls=(call,)),
            Message(Role.TOOL, "cold", tool_call_id=call.id),
        ],
        tools=[WEATHER],
    )
    out = await provider.chat("o3", follow_up)
    assert out.content
    items = sim.requests[-1].body["input"]
    assert [i.get("type", "message") for i in items] == [
        "message",
        "reasoning",
        "function_call",
        "function_call_output",
    ]
    assert items[1]["encrypted_content"] == "gAAAA-encrypted-1" and items[1]["id"].startswith("rs_sim_")


async def test_a_model_without_reasoning_is_asked_again_without_encrypted_content(session: HttpClient) -> None:
    async with ResponsesSimulator(api_key=KEY, no_reasoning=("gpt-4o",)) as sim:
        provider = responses(sim, session, models=("gpt-4o",))
        out = await provider.chat("gpt-4o", ask())
        assert out.content == "Hello from gpt-4o: hello there"
        assert [r.body.get("include") for r in sim.requests] == [["reasoning.encrypted_content"], None]
        events = [e async for e in provider.stream("gpt-4o", ask())]  # remembered: asked without it at once
        assert isinstance(events[-1], StreamFinish) and len(sim.requests) == 3
        assert sim.requests[-1].body.get("include") is None

    async with ResponsesSimulator(api_key=KEY, no_reasoning=("gpt-4.1",)) as sim:
        provider = responses(sim, session, models=("gpt-4.1",))
        events = [e async for e in provider.stream("gpt-4.1", ask())]  # a stream finds out the same way
        assert isinstance(events[-1], StreamFinish) and events[-1].finish_reason is FinishReason.STOP
        assert [r.body.get("include") for r in sim.requests] == [["reasoning.encrypted_content"], None]


async def test_stream_text_usage_and_incomplete(sim: ResponsesSimulator, session: HttpClient) -> None:
    provider = responses(sim, session)
    sim.enqueue(ResponsesReply(text="one two three", input_tokens=9, output_tokens=3, cached=2, reasoning_tokens=1))
    events = [e async for e in provider.stream("o3", ask())]
    assert [e.content for e in events if isinstance(e, TextDelta)] == ["one two three"]  # one read: joined
    end = events[-1]
    assert isinstance(end, StreamFinish) and end.finish_reason is FinishReason.STOP and end.usage is not None
    assert (end.usage.input_tokens, end.usage.output_tokens, end.usage.cached_input_tokens) == (9, 3, 2)
    assert end.upstream.id.startswith("resp_sim_") and events[0] == ReplyId(end.upstream.id)  # said at once
    assert (end.upstream.model, end.upstream.service_tier) == ("o3", "default")

    sim.enqueue(ResponsesReply(text="cut", incomplete="max_output_tokens"))
    events = [e async for e in provider.stream("o3", ask())]
    assert isinstance(events[-1], StreamFinish) and events[-1].finish_reason is FinishReason.LENGTH
    sim.enqueue(ResponsesReply(text="", refusal="I can't help with that."))
    out = await provider.chat("o3", ask())
    assert (out.content, out.finish_reason) == ("I can't help with that.", FinishReason.CONTENT_FILTER)
    sim.enqueue(ResponsesReply(text="", refusal="No."))
    events = [e async for e in provider.stream("o3", ask())]
    assert [e.content for e in events if isinstance(e, TextDelta)] == ["No."]
    assert isinstance(events[-1], StreamFinish) and events[-1].finish_reason is FinishReason.CONTENT_FILTER


async def test_errors(sim: ResponsesSimulator, session: HttpClient) -> None:
    provider = responses(sim, session)
    sim.enqueue(ResponsesReply(status=429, error_code="rate_limit_exceeded", message="Rate limit reached"))
    with pytest.raises(ProviderError) as caught:
        await provider.chat("o3", ask())
    assert caught.value.reason == "UPSTREAM_RATE_LIMITED" and caught.value.retryable
    sim.enqueue(ResponsesReply(text="a b c d", error_after=6, error_code="server_error", message="boom"))
    seen: list[Any] = []
    with pytest.raises(ProviderError) as caught:
        async for e in provider.stream("o3", ask()):
            seen.append(e)
    assert caught.value.reason == "UPSTREAM_SERVER_ERROR" and caught.value.retryable
    assert "".join(e.content for e in seen if isinstance(e, TextDelta)) == "a b "
    with pytest.raises(ProviderError) as caught:
        await provider.chat("o3", ask(max_tokens=5))  # the API's minimum is 16
    assert caught.value.reason == "UPSTREAM_BAD_REQUEST" and "max_output_tokens" in caught.value.message


# -- config -----------------------------------------------------------------------------------------


async def test_usage_details_of_another_shape_count_nothing(sim: ResponsesSimulator, session: HttpClient) -> None:
    """Found by bench/fuzz.py: usage details that were a number failed an answered call with INTERNAL."""
    message = {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "hi"}]}
    usage = {"input_tokens": 4, "output_tokens": 2, "input_tokens_details": [], "output_tokens_details": 7}
    doc = {"id": "resp_1", "status": "completed", "output": [message], "usage": usage}
    sim.enqueue(ResponsesReply(body=json.dumps(doc).encode()))
    out = await responses(sim, session).chat("o3", ask())
    assert (out.content, out.usage.input_tokens, out.usage.output_tokens, out.usage.reasoning_tokens) == ("hi", 4, 2, 0)


def _load(spec: dict[str, Any]) -> config.GatewayConfig:
    doc = {"ledger": {"type": "memory"}, "allowUnpriced": True, "providers": {"openai": {"apiKeyEnv": "K", **spec}}}
    return config.resolve(config.parse_file_config(json.dumps(doc), "<test>"), {"K": "k"}, "<test>")


def test_config_api_per_model_or_provider() -> None:
    p = _load({"models": [{"name": "o3", "api": "responses"}, {"name": "gpt-4o"}]}).providers[0]
    assert p.responses_models == ("o3",)
    p = _load({"api": "responses", "models": [{"name": "o3"}, {"name": "gpt-4o", "api": "chat"}]}).providers[0]
    assert p.responses_models == ("o3",)


def test_config_api_only_for_openai_formats() -> None:
    doc = {
        "ledger": {"type": "memory"},
        "allowUnpriced": True,
        "providers": {"anthropic": {"apiKeyEnv": "K", "models": [{"name": "claude", "api": "responses"}]}},
    }
    with pytest.raises(ConfigError) as caught:
        config.resolve(config.parse_file_config(json.dumps(doc), "<test>"), {"K": "k"}, "<test>")
    assert caught.value.path == "providers.anthropic.models[0].api"


def test_the_readme_example_loads() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("### Cloud providers") :]
    block = section[section.index("```json") + len("```json") : section.index("```\n\n")]
    env = {"AZURE_OPENAI_API_KEY": "k", "GEMINI_API_KEY": "g", "OPENAI_API_KEY": "o"}
    cfg = config.resolve(config.parse_file_config(block, "README.md"), env, "README.md")
    assert {p.name: p for p in cfg.providers}["openai"].responses_models == ("o3-pro",)


# -- the gateway around it ---------------------------------------------------------------------------


def gateway_config(sim: ResponsesSimulator, model: dict[str, Any]) -> dict[str, Any]:
    """A gateway with one OpenAI provider serving `model` through the Responses API of `sim`."""
    return {
        "ledger": {"type": "memory"},
        "providers": {
            "openai": {
                "apiKeyEnv": "OPENAI_API_KEY",
                "baseUrl": sim.url + "/v1",
                "models": [{**model, "api": "responses"}],
            }
        },
    }


async def test_gateway_serves_a_responses_model(sim: ResponsesSimulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    doc = gateway_config(sim, {"name": "o3-pro", "inputPer1M": 20, "outputPer1M": 80, "cachedInputPer1M": 5})
    doc["retry"] = {"maxAttempts": 3, "baseMs": 1, "maxMs": 5}
    options = ServerOptions(metrics_port=0, metrics_host="127.0.0.1")
    async with running_server(doc, {"OPENAI_API_KEY": KEY}, options) as gw:
        sim.enqueue(ResponsesReply(input_tokens=1000, cached=400, output_tokens=200, reasoning_tokens=150))
        reply = await gw.stub.Chat(pb.ChatRequest(model="o3-pro", messages=[user("hi")]))
        assert reply.usage.reasoning_tokens == 150 and reply.usage.cached_input_tokens == 400
        assert reply.cost_nanos_usd == 600 * 20_000 + 400 * 5_000 + 200 * 80_000
        sim.enqueue(ResponsesReply(status=503, message="overloaded"))
        assert (await gw.stub.Chat(pb.ChatRequest(model="o3-pro", messages=[user("hi")]))).provider == "openai"
        ends = [m async for m in gw.stub.StreamChat(pb.StreamChatRequest(model="o3-pro", messages=[user("yo")]))]
        assert ends[-1].end.finish_reason == pb.FINISH_REASON_STOP and ends[-1].end.usage.output_tokens > 0
        sim.api_key = "another"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="o3-pro", messages=[user("hi")]))
        assert gw.server.metrics_port is not None
        metrics = scrape_text(gw.server.metrics_port)
    logged = " ".join(str(r.__dict__) for r in caplog.records)
    assert KEY not in logged and KEY not in metrics and KEY not in (caught.value.details() or "")


@pytest.mark.parametrize("streamed", [False, True])
async def test_web_search_calls_are_counted_and_priced(sim: ResponsesSimulator, streamed: bool) -> None:
    """The Responses API's web search tool (asked for through extra_fields.tools) is billed per call, as
    Anthropic's web searches are: each completed web_search_call item is one."""
    # webSearchPer1K 10: 10,000,000 nano-dollars a search
    doc = gateway_config(sim, {"name": "gpt-5", "inputPer1M": 2, "outputPer1M": 8, "webSearchPer1K": 10})
    tools = struct_pb2.Struct()
    tools.update({"tools": [{"type": "web_search"}]})
    sim.enqueue(ResponsesReply(text="found", input_tokens=100, output_tokens=20, web_searches=2))
    async with running_server(doc, {"OPENAI_API_KEY": KEY}) as gw:
        if streamed:
            ask = pb.StreamChatRequest(model="gpt-5", messages=[user("news?")], extra_fields=tools)
            events = [e async for e in gw.stub.StreamChat(ask)]
            usage, cost = events[-1].end.usage, events[-1].end.cost_nanos_usd
        else:
            reply = await gw.stub.Chat(pb.ChatRequest(model="gpt-5", messages=[user("news?")], extra_fields=tools))
            usage, cost = reply.usage, reply.cost_nanos_usd
        assert usage.web_search_requests == 2
        assert cost == 100 * 2000 + 20 * 8000 + 2 * 10_000_000
    assert sim.requests[-1].body["tools"] == [{"type": "web_search"}]


# -- the openai SDK against the simulator -------------------------------------------------------------


async def test_openai_sdk_responses_against_the_simulator(sim: ResponsesSimulator) -> None:
    async with openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key=KEY, max_retries=0) as client:
        sim.enqueue(ResponsesReply(text="hi there", reasoning="gAAAA-enc", cached=2, reasoning_tokens=7))
        out = await client.responses.create(
            model="o3", input="hello", instructions="Be brief.", store=False, include=["reasoning.encrypted_content"]
        )
        assert out.output_text == "hi there" and out.status == "completed"
        assert out.usage is not None and out.usage.output_tokens_details.reasoning_tokens == 7
        assert out.output[0].type == "reasoning"
        # The SDK's own items go back as input as they are (reasoning included).
        follow = await client.responses.create(
            model="o3",
            # model_dump() is declared as dict[str, Any]; an output item's dump is the matching input item
            input=[
                *[cast(ResponseInputItemParam, i.model_dump(exclude_none=True)) for i in out.output],
                {"role": "user", "content": "and?"},
            ],
            store=False,
        )
        assert follow.output_text == "Hello from o3: and?"

        sim.enqueue(ResponsesReply(text="one two", function_calls=(("get_weather", '{"city":"Oslo"}'),)))
        tools: list[FunctionToolParam] = [
            {"type": "function", "name": "get_weather", "parameters": WEATHER.parameters, "strict": False}
        ]
        stream = await client.responses.create(model="o3", input="weather?", tools=tools, stream=True)
        events = [e async for e in stream]
        kinds = [e.type for e in events]
        assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
        assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "one two"
        args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert args == '{"city":"Oslo"}'
        completed = events[-1]
        assert isinstance(completed, ResponseCompletedEvent)
        final = completed.response
        assert final.usage is not None and final.output[-1].type == "function_call"

        sim.enqueue(ResponsesReply(status=429, error_code="rate_limit_exceeded", message="slow down"))
        with pytest.raises(openai.RateLimitError):
            await client.responses.create(model="o3", input="x")

        sim.enqueue(ResponsesReply(text="found", web_searches=1), ResponsesReply(text="found", web_searches=1))
        out = await client.responses.create(model="gpt-5", input="news?", tools=[{"type": "web_search"}])
        search = out.output[0]
        assert isinstance(search, ResponseFunctionWebSearch) and search.status == "completed"
        stream = await client.responses.create(
            model="gpt-5", input="news?", tools=[{"type": "web_search"}], stream=True
        )
        kinds = [e.type async for e in stream]
        assert "response.web_search_call.completed" in kinds and kinds[-1] == "response.completed"


# -- the contract's parts, reasoning, caching and tool options (issue 13 item 5) ----------------------

PNG = b"\x89PNG\r\n\x1a\n" + bytes(16)
PDF = b"%PDF-1.7 /Type /Page"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def contract_request() -> ChatRequest:
    strict_tool = ToolSpec("get_weather", "Weather", {"type": "object", "properties": {}}, strict=True)
    return ChatRequest(
        model="m",
        messages=[
            Message(Role.SYSTEM, parts=(Part(PartKind.TEXT, text="Rules"),), cache_ttl="1h"),
            Message(
                Role.USER,
                parts=(
                    Part(PartKind.TEXT, text="Look", cache_ttl=""),
                    Part(PartKind.IMAGE, data=PNG, media_type="image/png"),
                    Part(PartKind.IMAGE, url="https://example.com/a.jpg", detail="low"),
                    Part(PartKind.DOCUMENT, data=PDF, media_type="application/pdf", title="a.pdf"),
                    Part(PartKind.DOCUMENT, url="https://example.com/b.pdf"),
                ),
            ),
            Message(
                Role.ASSISTANT,
                parts=(Part(PartKind.TEXT, text="Checking"),),
                tool_calls=(ToolCall("c1", "get_weather", "{}"),),
            ),
            Message(
                Role.TOOL,
                tool_call_id="c1",
                parts=(Part(PartKind.TEXT, text="sunny"), Part(PartKind.IMAGE, data=PNG, media_type="image/png")),
                is_error=True,
            ),
        ],
        tools=[strict_tool],
        parallel_tool_calls=False,
        reasoning_effort="high",
        thinking_budget=2048,  # Anthropic's: the Responses API takes the effort
        prompt_cache_key="k1",
        extra_fields={"service_tier": "priority"},
    )


async def test_parts_reasoning_and_cache_key_in_the_request_body(sim: ResponsesSimulator, session: HttpClient) -> None:
    sim.enqueue(ResponsesReply(text="ok"))
    await responses(sim, session).chat("o3", contract_request())
    body = sim.requests[-1].body
    assert body == {
        "model": "o3",
        "store": False,
        "include": ["reasoning.encrypted_content"],
        "instructions": "Rules",
        "input": [
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "Look"},
                    {"type": "input_image", "image_url": f"data:image/png;base64,{_b64(PNG)}", "detail": "auto"},
                    {"type": "input_image", "image_url": "https://example.com/a.jpg", "detail": "low"},
                    {
                        "type": "input_file",
                        "filename": "a.pdf",
                        "file_data": f"data:application/pdf;base64,{_b64(PDF)}",
                    },
                    {"type": "input_file", "file_url": "https://example.com/b.pdf"},
                ],
            },
            {"role": "assistant", "content": "Checking"},
            {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": "{}"},
            {
                "type": "function_call_output",
                "call_id": "c1",
                "output": [
                    {"type": "input_text", "text": "sunny"},
                    {"type": "input_image", "image_url": f"data:image/png;base64,{_b64(PNG)}", "detail": "auto"},
                ],
            },
        ],
        "tools": [
            {
                "type": "function",
                "name": "get_weather",
                "strict": True,
                "description": "Weather",
                "parameters": {"type": "object", "properties": {}},
            }
        ],
        "parallel_tool_calls": False,
        "reasoning": {"effort": "high"},
        "prompt_cache_key": "k1",
        "service_tier": "priority",
    }
    # The body is what the official SDK's request type accepts, nothing more.
    adapter = TypeAdapter(ResponseCreateParamsNonStreaming)  # alive while its lazy validators iterate
    assert materialise(adapter.validate_python(body)) == body


async def test_audio_is_refused_by_the_adapter(sim: ResponsesSimulator, session: HttpClient) -> None:
    request = ChatRequest(
        model="m", messages=[Message(Role.USER, parts=(Part(PartKind.AUDIO, data=b"RIFF", media_type="wav"),))]
    )
    with pytest.raises(ProviderError) as caught:
        await responses(sim, session).chat("o3", request)
    assert caught.value.reason == "UPSTREAM_BAD_REQUEST" and "no audio" in caught.value.message
    assert not sim.requests


async def test_routing_keeps_audio_from_a_responses_model(sim: ResponsesSimulator) -> None:
    doc = gateway_config(sim, {"name": "o3-pro", "inputPer1M": 20, "outputPer1M": 80})
    audio = pb.Message(role=pb.ROLE_USER, parts=[pb.Part(audio=pb.AudioPart(data=b"RIFF", format="wav"))])
    image = pb.Message(role=pb.ROLE_USER, parts=[pb.Part(image=pb.ImagePart(url="https://example.com/a.jpg"))])
    async with running_gateway(doc, {"OPENAI_API_KEY": KEY}) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="o3-pro", messages=[audio]))
        err = rich_error(caught.value)
        assert (err.code, err.violations) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            [("messages[0].parts[0]", "audio cannot be sent to the responses API serving 'o3-pro'")],
        )
        assert not sim.requests
        sim.enqueue(ResponsesReply(text="a cat"))
        assert (await gw.stub.Chat(pb.ChatRequest(model="o3-pro", messages=[image]))).message.content == "a cat"
    assert sim.requests[-1].body["input"][0]["content"] == [
        {"type": "input_image", "image_url": "https://example.com/a.jpg", "detail": "auto"}
    ]


async def test_reasoning_summaries_are_the_replys_thinking(sim: ResponsesSimulator, session: HttpClient) -> None:
    provider = responses(sim, session)
    summary = ("Weigh the options.", "Pick one.")
    sim.enqueue(ResponsesReply(text="B", reasoning="gAAAA-enc", summary=summary))
    out = await provider.chat(
        "o3", ask(reasoning_effort="high", extra_fields={"reasoning": {"effort": "high", "summary": "auto"}})
    )
    assert out.content == "B" and out.thinking == [ThinkingBlock("Weigh the options.\n\nPick one.")]
    assert sim.requests[-1].body["reasoning"] == {"effort": "high", "summary": "auto"}  # the caller's own ask

    sim.enqueue(ResponsesReply(text="B", reasoning="gAAAA-enc", summary=summary))
    events = [e async for e in provider.stream("o3", ask())]
    thinking = [e for e in events if isinstance(e, ThinkingDelta)]
    assert {e.index for e in thinking} == {0} and "".join(e.text for e in thinking) == "Weigh the options.\n\nPick one."
    assert "".join(e.content for e in events if isinstance(e, TextDelta)) == "B"

    sim.enqueue(ResponsesReply(text="B"))  # no reasoning item: no thinking
    assert (await provider.chat("o3", ask())).thinking == []


async def test_openai_sdk_reads_the_simulators_reasoning_summaries(sim: ResponsesSimulator) -> None:
    async with openai.AsyncOpenAI(base_url=sim.url + "/v1", api_key=KEY, max_retries=0) as client:
        sim.enqueue(ResponsesReply(text="B", reasoning="enc", summary=("Weigh it.",)))
        out = await client.responses.create(model="o3", input="x", reasoning={"effort": "low", "summary": "auto"})
        item = out.output[0]
        assert item.type == "reasoning" and [s.text for s in item.summary] == ["Weigh it."]
        sim.enqueue(ResponsesReply(text="B", reasoning="enc", summary=("Weigh it.",)))
        stream = await client.responses.create(model="o3", input="x", stream=True)
        events = [e async for e in stream]
    summary_events = [e for e in events if e.type.startswith("response.reasoning_summary_")]
    assert [type(e) for e in summary_events] == [
        ResponseReasoningSummaryPartAddedEvent,
        ResponseReasoningSummaryTextDeltaEvent,
        ResponseReasoningSummaryTextDeltaEvent,
        ResponseReasoningSummaryTextDoneEvent,
        ResponseReasoningSummaryPartDoneEvent,
    ]
    for e in summary_events:  # the SDK's types, with every required field (validated, not just constructed)
        type(e).model_validate(e.model_dump(exclude_unset=True))
    deltas = [e.delta for e in events if e.type == "response.reasoning_summary_text.delta"]
    assert "".join(deltas) == "Weigh it."


@pytest.mark.parametrize(
    "event",
    [
        {"type": "response.output_text.delta", "output_index": 0, "delta": 5},
        {"type": "response.output_item.added", "output_index": 0, "item": {"type": "function_call", "name": 7}},
    ],
)
async def test_stream_text_that_is_not_a_string_is_a_bad_response(session: HttpClient, event: dict[str, Any]) -> None:
    """A delta or a tool's name the answer is made of must be a string: 5 is refused, never turned into "5"."""
    created: dict[str, Any] = {
        "type": "response.created",
        "response": {"id": "resp_1", "status": "in_progress", "output": []},
    }
    sse = [b"event: %s\ndata: %s\n\n" % (e["type"].encode(), json.dumps(e).encode()) for e in (created, event)]

    async def handler(req: Req) -> None:
        req.writer.write(chunked(sse))
        await req.writer.drain()

    async with RawServer(handler) as upstream:
        settings = ProviderSettings(
            name="openai", type="openai", base_url=upstream.url, api_key=KEY, responses_models=("o3",)
        )
        with pytest.raises(ProviderError) as caught:
            [e async for e in build_provider(settings, session).stream("o3", ask())]
    assert caught.value.reason == "UPSTREAM_BAD_RESPONSE"
