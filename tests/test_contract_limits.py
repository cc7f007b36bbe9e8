"""Issue 12, item 7: a per-model `maxOutputTokens`, sent as Anthropic's required max_tokens when the caller
sets none (it was a fixed 4,096), and reserved on by budgets."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from feather_grpc import config as feather_config
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from sim.upstream import UpstreamSimulator
from tests.gateway_harness import rich_error, running_gateway, user
from tests.test_contract_accounting import ENV, config


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSimulator]:
    async with UpstreamSimulator() as s:
        yield s


def with_max_output(sim: UpstreamSimulator, tokens: int) -> dict[str, Any]:
    doc = config(sim)
    anthropic = doc["providers"]["anthropic"]["models"]
    anthropic[0]["maxOutputTokens"] = tokens
    anthropic.append({"name": "claude-other", "inputPer1M": 3, "outputPer1M": 15})
    return doc


async def test_anthropic_max_tokens_is_the_models_max_output_tokens_unless_the_caller_sets_one(
    sim: UpstreamSimulator,
) -> None:
    async with running_gateway(with_max_output(sim, 64_000), ENV) as gw:
        await gw.stub.Chat(pb.ChatRequest(model="claude-sim", messages=[user("write a book")]))
        await gw.stub.Chat(pb.ChatRequest(model="claude-sim", messages=[user("one line")], max_tokens=100))
        await gw.stub.Chat(pb.ChatRequest(model="claude-other", messages=[user("hi")]))
        stream = gw.stub.StreamChat(pb.StreamChatRequest(model="claude-sim", messages=[user("write a book")]))
        assert [e.WhichOneof("event") async for e in stream][-1] == "end"
        # OpenAI has no required limit: none is sent for it
        await gw.stub.Chat(pb.ChatRequest(model="gpt-sim", messages=[user("hi")]))
    sent = [r.body.get("max_tokens", r.body.get("max_completion_tokens")) for r in sim.requests]
    assert sent == [64_000, 100, 4096, 64_000, None]


async def test_the_budget_reserves_the_models_max_output_tokens(sim: UpstreamSimulator) -> None:
    # 64,000 output tokens at 15,000 nano-dollars each is 0.96 USD: more than the 0.50 a day left
    doc = with_max_output(sim, 64_000)
    doc["tenants"] = {"default": {"budget": {"dailyUsd": 0.5}}}
    async with running_gateway(doc, ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Chat(pb.ChatRequest(model="claude-sim", messages=[user("write a book")]))
        assert rich_error(info.value).reason == "BUDGET_EXCEEDED"
        reply = await gw.stub.Chat(pb.ChatRequest(model="claude-sim", messages=[user("one line")], max_tokens=1000))
        assert reply.cost_nanos_usd > 0
    assert [r.body["max_tokens"] for r in sim.requests] == [1000]


@pytest.mark.parametrize("bad", [0, -5, "many"])
def test_a_bad_max_output_tokens_names_the_field(bad: Any) -> None:
    doc = {
        "providers": {"mock": {"models": [{"name": "m", "inputPer1K": 1, "outputPer1K": 1, "maxOutputTokens": bad}]}}
    }
    with pytest.raises(feather_config.ConfigError) as info:
        feather_config.parse_file_config(json.dumps(doc), "<test>")
    assert "providers.mock.models[0].maxOutputTokens" in str(info.value)
