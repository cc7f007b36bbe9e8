"""Issue 12, item 5: tools completed: strict, parallel tool calls on/off, is_error, legacy function_call replies.

A real gateway in front of the upstream simulator; the bodies it sends upstream are compared whole.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypedDict

import grpc
import pytest
from google.protobuf import struct_pb2

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from sim.upstream import Reply, SimToolCall, SimUsage, UpstreamSimulator
from tests.gateway_harness import rich_error, running_gateway, user
from tests.test_contract_accounting import ENV, config

SCHEMA: dict[str, str | dict[str, dict[str, str]] | list[str]] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}


class ParallelToolCalls(TypedDict, total=False):
    """ChatRequest.parallel_tool_calls set or left unset (a typed `**kw`)."""

    parallel_tool_calls: bool


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSimulator]:
    async with UpstreamSimulator() as s:
        yield s


def weather_tool(strict: bool = True) -> pb.Tool:
    params = struct_pb2.Struct()
    params.update(SCHEMA)
    return pb.Tool(name="get_weather", description="Weather", parameters=params, strict=strict)


def failed_tool_turn() -> list[pb.Message]:
    return [
        user("weather?"),
        pb.Message(
            role=pb.ROLE_ASSISTANT,
            tool_calls=[pb.ToolCall(id="call_1", name="get_weather", arguments='{"city":"Paris"}')],
        ),
        pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="service down", is_error=True),
    ]


def request(model: str, **kw: Any) -> pb.ChatRequest:
    return pb.ChatRequest(model=model, messages=failed_tool_turn(), tools=[weather_tool()], **kw)


async def test_openai_body_carries_strict_parallel_tool_calls_and_the_failed_result(sim: UpstreamSimulator) -> None:
    async with running_gateway(config(sim), ENV) as gw:
        await gw.stub.Chat(
            request(
                "gpt-sim",
                parallel_tool_calls=False,
                tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
            )
        )
    assert sim.requests[0].body == {
        "model": "gpt-sim",
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            # OpenAI has no error flag on tool results: the content alone says it
            {"role": "tool", "tool_call_id": "call_1", "content": "service down"},
        ],
        "tools": [
            {
                "type": "function",
                "function": {"name": "get_weather", "description": "Weather", "parameters": SCHEMA, "strict": True},
            }
        ],
        "parallel_tool_calls": False,
        "tool_choice": "required",
    }


async def test_anthropic_body_carries_strict_disable_parallel_tool_use_and_is_error(sim: UpstreamSimulator) -> None:
    async with running_gateway(config(sim), ENV) as gw:
        await gw.stub.Chat(
            request(
                "claude-sim",
                parallel_tool_calls=False,
                tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_REQUIRED),
            )
        )
    assert sim.requests[0].body == {
        "model": "claude-sim",
        "max_tokens": 4096,
        "messages": [
            {"role": "user", "content": "weather?"},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}}],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "call_1", "content": "service down", "is_error": True}
                ],
            },
        ],
        "tools": [{"name": "get_weather", "description": "Weather", "input_schema": SCHEMA, "strict": True}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }


@pytest.mark.parametrize(
    ("parallel", "openai_field", "anthropic_choice"),
    [
        (None, None, None),  # the provider's default: nothing sent
        (True, True, None),  # Anthropic's default already allows parallel calls
        (False, False, {"type": "auto", "disable_parallel_tool_use": True}),
    ],
)
async def test_parallel_tool_calls_on_off_and_unset(
    sim: UpstreamSimulator, parallel: bool | None, openai_field: bool | None, anthropic_choice: Any
) -> None:
    kw: ParallelToolCalls = {} if parallel is None else {"parallel_tool_calls": parallel}
    async with running_gateway(config(sim), ENV) as gw:
        for model in ("gpt-sim", "claude-sim"):
            await gw.stub.Chat(pb.ChatRequest(model=model, messages=[user("hi")], tools=[weather_tool(False)], **kw))
        # without tools the flag is meaningless (OpenAI refuses it): never sent
        await gw.stub.Chat(pb.ChatRequest(model="gpt-sim", messages=[user("hi")], **kw))
    openai_body, anthropic_body, bare = (r.body for r in sim.requests)
    assert openai_body.get("parallel_tool_calls") == openai_field
    assert "strict" not in openai_body["tools"][0]["function"]
    assert anthropic_body.get("tool_choice") == anthropic_choice
    assert "strict" not in anthropic_body["tools"][0]
    assert "parallel_tool_calls" not in bare and "tools" not in bare


async def test_anthropic_tool_choice_none_never_carries_disable_parallel_tool_use(sim: UpstreamSimulator) -> None:
    async with running_gateway(config(sim), ENV) as gw:
        await gw.stub.Chat(
            request("claude-sim", parallel_tool_calls=False, tool_choice=pb.ToolChoice(mode=pb.TOOL_CHOICE_MODE_NONE))
        )
    assert sim.requests[0].body["tool_choice"] == {"type": "none"}


@pytest.mark.parametrize("streamed", [False, True])
async def test_legacy_function_call_reply_is_one_tool_call(sim: UpstreamSimulator, streamed: bool) -> None:
    sim.enqueue(
        Reply(
            tool_calls=(SimToolCall("get_weather", '{"city":"Paris","unit":"c"}'),),
            legacy_function_call=True,
            usage=SimUsage(input=20, output=9),
        )
    )
    async with running_gateway(config(sim), ENV) as gw:
        if streamed:
            events = [
                e
                async for e in gw.stub.StreamChat(
                    pb.StreamChatRequest(model="gpt-sim", messages=[user("hi")], tools=[weather_tool()])
                )
            ]
            fragments = [d for e in events if e.HasField("delta") for d in e.delta.tool_calls]
            assert {d.index for d in fragments} == {0}
            assert [(d.id, d.name) for d in fragments if d.id] == [("call_function_call", "get_weather")]
            arguments = "".join(d.arguments for d in fragments)
            finish = events[-1].end.finish_reason
        else:
            reply = await gw.stub.Chat(pb.ChatRequest(model="gpt-sim", messages=[user("hi")], tools=[weather_tool()]))
            [call] = reply.message.tool_calls
            assert (call.id, call.name) == ("call_function_call", "get_weather")
            arguments, finish = call.arguments, reply.finish_reason
    assert arguments == '{"city":"Paris","unit":"c"}'
    assert finish == pb.FINISH_REASON_TOOL_CALLS


async def test_misplaced_tool_options_are_invalid_argument_naming_the_field(sim: UpstreamSimulator) -> None:
    async with running_gateway(config(sim), ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Chat(
                pb.ChatRequest(
                    model="gpt-sim",
                    messages=[pb.Message(role=pb.ROLE_USER, content="hi", is_error=True)],
                    tools=[pb.Tool(name="loose", strict=True)],
                )
            )
    err = rich_error(info.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in err.violations] == ["messages[0].is_error", "tools[0].parameters"]
    assert not sim.requests


async def test_the_response_cache_tells_requests_apart_by_their_new_fields(sim: UpstreamSimulator) -> None:
    """The cache key covers every field that shapes the answer: `strict` and `parallel_tool_calls` included."""

    def cacheable(**kw: Any) -> pb.ChatRequest:
        return pb.ChatRequest(model="gpt-sim", messages=[user("hi")], temperature=0, **kw)

    async with running_gateway(config(sim), ENV) as gw:
        first = await gw.stub.Chat(cacheable(tools=[weather_tool(True)]))
        again = await gw.stub.Chat(cacheable(tools=[weather_tool(True)]))
        loose = await gw.stub.Chat(cacheable(tools=[weather_tool(False)]))
        serial = await gw.stub.Chat(cacheable(tools=[weather_tool(True)], parallel_tool_calls=False))
    assert (first.cached, again.cached, loose.cached, serial.cached) == (False, True, False, False)
    assert len(sim.requests) == 3
