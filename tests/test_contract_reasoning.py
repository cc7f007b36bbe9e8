"""Issue 12, item 3: reasoning effort (OpenAI), extended thinking with a budget (Anthropic), thinking as its own
reply field and stream event with signatures and redacted blocks kept, so a tool-use turn continues."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypedDict

import feather_client as fc
import grpc
import pytest

from feather_grpc.core.types import StreamEvent, TextDelta, ThinkingDelta, ToolCallDelta
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.providers.base import coalesce
from sim.upstream import Reply, SimToolCall, SimUsage, UpstreamSimulator
from tests.gateway_harness import rich_error, running_gateway, user
from tests.test_contract_accounting import ENV, config

THOUGHTS = ("Let me check the weather tool.", "redacted:EncryptedBlob==")


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSimulator]:
    async with UpstreamSimulator() as s:
        yield s


def compatible(sim: UpstreamSimulator) -> dict[str, Any]:
    doc = config(sim)
    doc["providers"]["local"] = {
        "type": "openai-compatible",
        "baseUrl": sim.url + "/v1",
        "models": [{"name": "deepseek-sim", "inputPer1M": 1, "outputPer1M": 2}],
    }
    return doc


class MaxTokens(TypedDict, total=False):
    """ChatRequest.max_tokens set or left unset (a typed `**kw`)."""

    max_tokens: int


class ChatOptions(MaxTokens, total=False):
    """The optional ChatRequest fields a test sets or leaves unset (a typed `**kw`)."""

    reasoning: pb.ReasoningOptions


def effort(level: pb.ReasoningEffort.ValueType, budget: int | None = None) -> pb.ReasoningOptions:
    options = pb.ReasoningOptions(effort=level)
    if budget is not None:
        options.thinking_budget_tokens = budget
    return options


async def test_openai_gets_reasoning_effort_and_no_thinking_back(sim: UpstreamSimulator) -> None:
    earlier = pb.Message(role=pb.ROLE_ASSISTANT, content="4", thinking=[pb.ThinkingBlock(text="2+2", signature="s")])
    async with running_gateway(config(sim), ENV) as gw:
        await gw.stub.Chat(
            pb.ChatRequest(
                model="gpt-sim",
                messages=[user("2+2?"), earlier, user("and 3+3?")],
                reasoning=effort(pb.REASONING_EFFORT_HIGH, budget=5000),  # a budget is Anthropic's: not sent
            )
        )
    body = sim.requests[0].body
    assert body["reasoning_effort"] == "high"
    assert "thinking" not in body
    assert body["messages"][1] == {"role": "assistant", "content": "4"}


@pytest.mark.parametrize(
    ("options", "max_tokens", "configured", "thinking", "sent_max"),
    [
        (effort(pb.REASONING_EFFORT_UNSPECIFIED, 2000), None, None, 2000, 4096 + 2000),
        (effort(pb.REASONING_EFFORT_MEDIUM), None, None, 2048, 4096 + 2048),  # the effort's budget
        (effort(pb.REASONING_EFFORT_LOW, 3000), 8000, None, 3000, 8000),  # the caller's budget and limit win
        (effort(pb.REASONING_EFFORT_HIGH), None, 64_000, 4096, 64_000),  # the model's maxOutputTokens
        (effort(pb.REASONING_EFFORT_NONE), None, None, None, 4096),
        (effort(pb.REASONING_EFFORT_MINIMAL), None, None, None, 4096),
    ],
)
async def test_anthropic_gets_extended_thinking_with_a_budget(
    sim: UpstreamSimulator,
    options: pb.ReasoningOptions,
    max_tokens: int | None,
    configured: int | None,
    thinking: int | None,
    sent_max: int,
) -> None:
    doc = config(sim)
    if configured:
        doc["providers"]["anthropic"]["models"][0]["maxOutputTokens"] = configured
    kw: MaxTokens = {} if max_tokens is None else {"max_tokens": max_tokens}
    async with running_gateway(doc, ENV) as gw:
        await gw.stub.Chat(pb.ChatRequest(model="claude-sim", messages=[user("think")], reasoning=options, **kw))
    body = sim.requests[0].body
    assert body.get("thinking") == (None if thinking is None else {"type": "enabled", "budget_tokens": thinking})
    assert body["max_tokens"] == sent_max
    assert "reasoning_effort" not in body


def thinking_reply() -> Reply:
    return Reply(
        content="Checking.",
        thinking=THOUGHTS,
        tool_calls=(SimToolCall("get_weather", '{"city":"Paris"}', id="toolu_1"),),
        usage=SimUsage(input=10, output=500, reasoning=400),
    )


COST = 10 * 3000 + 500 * 15000  # reasoning is part of the output, priced as output
EXPECTED_BLOCKS = [
    pb.ThinkingBlock(text="Let me check the weather tool.", signature="sig_sim_1"),
    pb.ThinkingBlock(redacted_data="EncryptedBlob=="),
]


async def test_anthropic_thinking_is_its_own_field_and_goes_back_unchanged(sim: UpstreamSimulator) -> None:
    sim.enqueue(thinking_reply())
    request = pb.ChatRequest(
        model="claude-sim", messages=[user("weather?")], reasoning=effort(pb.REASONING_EFFORT_UNSPECIFIED, 2000)
    )
    async with running_gateway(config(sim), ENV) as gw:
        reply = await gw.stub.Chat(request)
        assert list(reply.message.thinking) == EXPECTED_BLOCKS
        assert reply.message.content == "Checking."  # never mixed with the thinking
        assert (reply.usage.output_tokens, reply.usage.reasoning_tokens, reply.cost_nanos_usd) == (500, 400, COST)
        # the next turn: the reply's message as it came, then the tool's answer
        request.messages.extend([reply.message, pb.Message(role=pb.ROLE_TOOL, tool_call_id="toolu_1", content="sunny")])
        await gw.stub.Chat(request)
    assert sim.requests[1].body["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Let me check the weather tool.", "signature": "sig_sim_1"},
            {"type": "redacted_thinking", "data": "EncryptedBlob=="},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
        ],
    }


def assemble(events: list[pb.StreamChatResponse]) -> tuple[str, list[pb.ThinkingBlock]]:
    text = ""
    blocks: dict[int, pb.ThinkingBlock] = {}
    for e in events:
        if not e.HasField("delta"):
            continue
        text += e.delta.content
        for t in e.delta.thinking:
            block = blocks.setdefault(t.index, pb.ThinkingBlock())
            block.text += t.text
            block.signature += t.signature
            block.redacted_data += t.redacted_data
    return text, [blocks[i] for i in sorted(blocks)]


async def test_anthropic_streamed_thinking_is_its_own_event(sim: UpstreamSimulator) -> None:
    sim.enqueue(thinking_reply())
    async with running_gateway(config(sim), ENV) as gw:
        events = [
            e
            async for e in gw.stub.StreamChat(
                pb.StreamChatRequest(
                    model="claude-sim",
                    messages=[user("weather?")],
                    reasoning=effort(pb.REASONING_EFFORT_UNSPECIFIED, 2000),
                )
            )
        ]
    text, blocks = assemble(events)
    assert (text, blocks) == ("Checking.", EXPECTED_BLOCKS)
    assert not any(e.delta.content and e.delta.thinking for e in events if e.HasField("delta"))
    end = events[-1].end
    assert (end.usage.reasoning_tokens, end.cost_nanos_usd, end.finish_reason) == (
        400,
        COST,
        pb.FINISH_REASON_TOOL_CALLS,
    )


@pytest.mark.parametrize("streamed", [False, True])
async def test_compatible_reasoning_content_is_thinking(sim: UpstreamSimulator, streamed: bool) -> None:
    sim.enqueue(
        Reply(content="The answer is 4.", thinking=("Two plus two ", "is four."), usage=SimUsage(5, 30, reasoning=20))
    )
    async with running_gateway(compatible(sim), ENV) as gw:
        if streamed:
            events = [
                e async for e in gw.stub.StreamChat(pb.StreamChatRequest(model="deepseek-sim", messages=[user("2+2")]))
            ]
            text, blocks = assemble(events)
            reasoning = events[-1].end.usage.reasoning_tokens
        else:
            reply = await gw.stub.Chat(pb.ChatRequest(model="deepseek-sim", messages=[user("2+2")]))
            text, blocks, reasoning = reply.message.content, list(reply.message.thinking), reply.usage.reasoning_tokens
    assert (text, blocks, reasoning) == ("The answer is 4.", [pb.ThinkingBlock(text="Two plus two is four.")], 20)


async def test_a_reply_with_thinking_is_never_served_from_the_response_cache(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(content="a", thinking=("hmm",)), Reply(content="b", thinking=("hmm",)))
    async with running_gateway(config(sim), ENV) as gw:
        for _ in range(2):
            reply = await gw.stub.Chat(pb.ChatRequest(model="claude-sim", messages=[user("same")], temperature=0))
            assert not reply.cached
    assert len(sim.requests) == 2


async def test_bad_reasoning_options_are_invalid_argument(sim: UpstreamSimulator) -> None:
    async with running_gateway(config(sim), ENV) as gw:
        for kw, field in [
            (ChatOptions(reasoning=effort(pb.REASONING_EFFORT_UNSPECIFIED, 500)), "reasoning.thinking_budget_tokens"),
            (
                ChatOptions(reasoning=effort(pb.REASONING_EFFORT_UNSPECIFIED, 2000), max_tokens=2000),
                "reasoning.thinking_budget_tokens",
            ),
            # without max_tokens, past the output limit (safety.maxOutputTokens, 65,536 by default)
            (
                ChatOptions(reasoning=effort(pb.REASONING_EFFORT_UNSPECIFIED, 65_536)),
                "reasoning.thinking_budget_tokens",
            ),
            (ChatOptions(reasoning=pb.ReasoningOptions(effort=pb.ReasoningEffort.ValueType(99))), "reasoning.effort"),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await gw.stub.Chat(pb.ChatRequest(model="claude-sim", messages=[user("x")], **kw))
            assert [f for f, _ in rich_error(info.value).violations] == [field]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            thought = pb.Message(role=pb.ROLE_USER, content="x", thinking=[pb.ThinkingBlock(text="t")])
            await gw.stub.Chat(pb.ChatRequest(model="claude-sim", messages=[thought]))
        assert [f for f, _ in rich_error(info.value).violations] == ["messages[0].thinking"]
    assert not sim.requests


async def test_python_client_reasoning_options(sim: UpstreamSimulator) -> None:
    sim.enqueue(thinking_reply())
    async with running_gateway(config(sim), ENV) as gw, fc.FeatherClient(gw.address) as client:
        reply = await client.chat("weather?", model="claude-sim", reasoning=fc.reasoning(budget_tokens=2000))
        await client.chat(
            "think",
            model="gpt-sim",
            reasoning=fc.reasoning("low"),
            tools=[fc.pb.Tool(name="t")],
            parallel_tool_calls=False,
            prompt_cache_key="k1",
        )
        async with client.stream_chat("weather?", model="claude-sim", reasoning=fc.reasoning("high")) as stream:
            assert "".join([piece async for piece in stream]) == "Hello from claude-sim: weather?"
        assert stream.result.thinking == ()
        assert reply.assistant_turn().thinking[1] == pb.ThinkingBlock(redacted_data="EncryptedBlob==")
    assert reply.thinking == (
        fc.Thinking("Let me check the weather tool.", "sig_sim_1"),
        fc.Thinking(redacted_data="EncryptedBlob=="),
    )
    assert sim.requests[0].body["thinking"] == {"type": "enabled", "budget_tokens": 2000}
    openai_body = sim.requests[1].body
    assert (openai_body["reasoning_effort"], openai_body["parallel_tool_calls"], openai_body["prompt_cache_key"]) == (
        "low",
        False,
        "k1",
    )
    assert sim.requests[2].body["thinking"] == {"type": "enabled", "budget_tokens": 4096}


def test_one_reads_thinking_fragments_are_joined_per_block_like_text() -> None:
    events: list[StreamEvent] = [
        ThinkingDelta(0, "a"),
        ThinkingDelta(0, "b"),
        ThinkingDelta(0, signature="s"),
        ThinkingDelta(1, redacted_data="r"),
        TextDelta("x"),
        TextDelta("y"),
        ToolCallDelta(0, "id", "f"),
        ThinkingDelta(1, "c"),
        ThinkingDelta(2, "d"),
    ]
    assert coalesce(events) == [
        ThinkingDelta(0, "ab"),
        ThinkingDelta(0, signature="s"),
        ThinkingDelta(1, redacted_data="r"),
        TextDelta("xy"),
        ToolCallDelta(0, "id", "f"),
        ThinkingDelta(1, "c"),
        ThinkingDelta(2, "d"),
    ]
