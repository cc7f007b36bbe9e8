"""Issue 12, item 2: prompt caching: breakpoints with a TTL on parts, messages (the system prompt) and tools
sent as Anthropic `cache_control`, OpenAI's `prompt_cache_key`, and 5-minute and 1-hour writes priced apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import feather_client as fc
import grpc
import pytest
from google.protobuf import struct_pb2

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from sim.upstream import Reply, SimUsage, UpstreamSimulator
from tests.gateway_harness import rich_error, running_gateway, user
from tests.test_contract_accounting import ENV, config

HOUR = pb.CacheBreakpoint(ttl=pb.CACHE_TTL_ONE_HOUR)
FIVE = pb.CacheBreakpoint(ttl=pb.CACHE_TTL_FIVE_MINUTES)
DEFAULT = pb.CacheBreakpoint()
LONG_RULES = "You are a support agent. " * 200


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSimulator]:
    async with UpstreamSimulator() as s:
        yield s


def tool(name: str, breakpoint: pb.CacheBreakpoint | None = None) -> pb.Tool:
    params = struct_pb2.Struct()
    params.update({"type": "object"})
    t = pb.Tool(name=name, parameters=params)
    if breakpoint is not None:
        t.cache_breakpoint.CopyFrom(breakpoint)
    return t


def cached_conversation() -> list[pb.Message]:
    return [
        pb.Message(role=pb.ROLE_SYSTEM, content=LONG_RULES, cache_breakpoint=HOUR),
        pb.Message(role=pb.ROLE_SYSTEM, content="Today is Monday."),
        pb.Message(
            role=pb.ROLE_USER,
            parts=[pb.Part(text="A long document...", cache_breakpoint=FIVE), pb.Part(text="Summarise it.")],
        ),
        pb.Message(role=pb.ROLE_ASSISTANT, content="It says hello.", cache_breakpoint=DEFAULT),
        user("Thanks"),
    ]


async def test_anthropic_gets_cache_control_on_system_tools_parts_and_messages(sim: UpstreamSimulator) -> None:
    async with running_gateway(config(sim), ENV) as gw:
        await gw.stub.Chat(
            pb.ChatRequest(
                model="claude-sim",
                messages=cached_conversation(),
                tools=[tool("lookup"), tool("escalate", HOUR)],
                prompt_cache_key="ignored-by-anthropic",
            )
        )
    body = sim.requests[0].body
    assert body["system"] == [
        {"type": "text", "text": LONG_RULES, "cache_control": {"type": "ephemeral", "ttl": "1h"}},
        {"type": "text", "text": "Today is Monday."},
    ]
    assert body["tools"] == [
        {"name": "lookup", "input_schema": {"type": "object"}},
        {"name": "escalate", "input_schema": {"type": "object"}, "cache_control": {"type": "ephemeral", "ttl": "1h"}},
    ]
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "A long document...", "cache_control": {"type": "ephemeral", "ttl": "5m"}},
                {"type": "text", "text": "Summarise it."},
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "It says hello.", "cache_control": {"type": "ephemeral"}}],
        },
        {"role": "user", "content": "Thanks"},
    ]
    assert "prompt_cache_key" not in body


async def test_openai_gets_prompt_cache_key_and_no_breakpoints(sim: UpstreamSimulator) -> None:
    async with running_gateway(config(sim), ENV) as gw:
        await gw.stub.Chat(
            pb.ChatRequest(
                model="gpt-sim",
                messages=cached_conversation(),
                tools=[tool("escalate", HOUR)],
                prompt_cache_key="tenant-7",
            )
        )
        await gw.stub.Chat(pb.ChatRequest(model="gpt-sim", messages=[user("hi")]))
    keyed, plain = (r.body for r in sim.requests)
    assert keyed["prompt_cache_key"] == "tenant-7"
    assert "cache_control" not in str(keyed)  # OpenAI caches prefixes on its own
    assert keyed["messages"][0] == {"role": "system", "content": LONG_RULES}
    assert "prompt_cache_key" not in plain


def priced(sim: UpstreamSimulator, one_hour: bool) -> dict[str, Any]:
    doc = config(sim)
    if one_hour:
        doc["providers"]["anthropic"]["models"][0]["cacheWrite1hPer1M"] = 6
    return doc


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    ("one_hour_price", "cost"),
    [
        # 100 x 3000 + 1000 read x 300 + 1000 5m-written x 3750 + 2000 1h-written x 6000 + 20 x 15000
        (True, 16_650_000),
        # no 1-hour price configured: every write at the cache-write price (3000 x 3750)
        (False, 12_150_000),
    ],
)
async def test_five_minute_and_one_hour_writes_are_priced_apart(
    sim: UpstreamSimulator, streamed: bool, one_hour_price: bool, cost: int
) -> None:
    sim.enqueue(
        Reply(content="ok", usage=SimUsage(input=100, output=20, cached=1000, cache_write=3000, cache_write_1h=2000))
    )
    async with running_gateway(priced(sim, one_hour_price), ENV) as gw:
        if streamed:
            events = [
                e async for e in gw.stub.StreamChat(pb.StreamChatRequest(model="claude-sim", messages=[user("x")]))
            ]
            usage, billed = events[-1].end.usage, events[-1].end.cost_nanos_usd
        else:
            reply = await gw.stub.Chat(pb.ChatRequest(model="claude-sim", messages=[user("x")]))
            usage, billed = reply.usage, reply.cost_nanos_usd
        models = {m.name: m for m in (await gw.stub.ListModels(pb.ListModelsRequest())).models}
        await gw.server.engine.settled()
        total = (await gw.stub.Usage(pb.UsageRequest())).total
    assert (usage.input_tokens, usage.cached_input_tokens, usage.cache_write_tokens, usage.cache_write_1h_tokens) == (
        4100,
        1000,
        3000,
        2000,
    )
    assert billed == total.cost_nanos_usd == cost
    assert (total.cache_write_tokens, total.cache_write_1h_tokens) == (3000, 2000)  # recorded in the ledger
    price = models["claude-sim"].price
    assert price.cache_write_nanos_usd_per_million == 3_750_000_000
    assert price.cache_write_1h_nanos_usd_per_million == (6_000_000_000 if one_hour_price else 3_750_000_000)


async def test_too_many_breakpoints_and_a_long_cache_key_are_invalid_argument(sim: UpstreamSimulator) -> None:
    messages = [pb.Message(role=pb.ROLE_USER, content=f"m{i}", cache_breakpoint=FIVE) for i in range(4)]
    async with running_gateway(config(sim), ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Chat(
                pb.ChatRequest(
                    model="claude-sim", messages=messages, tools=[tool("t", FIVE)], prompt_cache_key="k" * 257
                )
            )
    err = rich_error(info.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert err.violations == [
        ("cache_breakpoint", "at most 4 cache breakpoints in a request (5 given)"),
        ("prompt_cache_key", "at most 256 characters"),
    ]
    assert not sim.requests


async def test_python_client_cache_helpers(sim: UpstreamSimulator) -> None:
    async with running_gateway(config(sim), ENV) as gw, fc.FeatherClient(gw.address) as client:
        await client.chat(
            [fc.cached(fc.system(LONG_RULES), ttl="1h"), fc.user(fc.cached(fc.text("doc")), "question")],
            model="claude-sim",
        )
    body = sim.requests[0].body
    assert body["system"] == [{"type": "text", "text": LONG_RULES, "cache_control": {"type": "ephemeral", "ttl": "1h"}}]
    assert body["messages"][0]["content"][0] == {"type": "text", "text": "doc", "cache_control": {"type": "ephemeral"}}
