"""Issue 12, items 8 and 9: exact accounting for what providers report, and Anthropic-format leniency.

A real gateway in front of the upstream simulator; every expected usage and nano-dollar cost is written out.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from feather_grpc import config as feather_config
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from sim.upstream import Reply, SimToolCall, SimUsage, UpstreamSimulator
from tests.gateway_harness import Gateway, running_gateway, user

ENV = {"SIM_OPENAI_KEY": "sk-test", "SIM_ANTHROPIC_KEY": "ak-test"}
# Nano-dollars per token of each price below (USD per 1M tokens x 1000).
OPENAI_PRICE = {"inputPer1M": 2, "outputPer1M": 8, "cachedInputPer1M": 0.5, "cacheWritePer1M": 2.5}
ANTHROPIC_PRICE = {
    "inputPer1M": 3,
    "outputPer1M": 15,
    "cachedInputPer1M": 0.3,
    "cacheWritePer1M": 3.75,
    "webSearchPer1K": 10,  # 0.01 USD = 10,000,000 nano-dollars a search
}


def config(sim: UpstreamSimulator, max_attempts: int = 1) -> dict[str, Any]:
    return {
        "ledger": {"type": "memory"},
        "retry": {"maxAttempts": max_attempts, "baseMs": 1, "maxMs": 5},
        "providers": {
            "openai": {
                "type": "openai",
                "apiKeyEnv": "SIM_OPENAI_KEY",
                "baseUrl": sim.url + "/v1",
                "models": [{"name": "gpt-sim", **OPENAI_PRICE}],
            },
            "anthropic": {
                "type": "anthropic",
                "apiKeyEnv": "SIM_ANTHROPIC_KEY",
                "baseUrl": sim.url,
                "models": [{"name": "claude-sim", **ANTHROPIC_PRICE}],
            },
        },
    }


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSimulator]:
    async with UpstreamSimulator() as s:
        yield s


async def total(gw: Gateway) -> pb.UsageRow:
    await gw.server.engine.settled()
    response: pb.UsageResponse = await gw.stub.Usage(pb.UsageRequest())
    return response.total


async def stream_end(gw: Gateway, model: str, text: str = "hello") -> tuple[str, pb.StreamEnd]:
    parts, end = [], None
    async for event in gw.stub.StreamChat(pb.StreamChatRequest(model=model, messages=[user(text)])):
        if event.HasField("delta"):
            parts.append(event.delta.content)
        elif event.HasField("end"):
            end = event.end
    assert end is not None
    return "".join(parts), end


async def answer(gw: Gateway, model: str, streamed: bool) -> pb.ChatResponse | pb.StreamEnd:
    """The accounting of one reply to "hello", by Chat or by StreamChat: both carry usage, cost and upstream."""
    if streamed:
        return (await stream_end(gw, model))[1]
    reply: pb.ChatResponse = await gw.stub.Chat(pb.ChatRequest(model=model, messages=[user("hello")]))
    return reply


def usage_of(u: pb.TokenUsage) -> tuple[int, int, int, int, int, int]:
    return (
        u.input_tokens,
        u.output_tokens,
        u.cached_input_tokens,
        u.cache_write_tokens,
        u.reasoning_tokens,
        u.web_search_requests,
    )


@pytest.mark.parametrize("streamed", [False, True])
async def test_openai_cache_write_tokens_are_billed_at_the_cache_write_price(
    sim: UpstreamSimulator, streamed: bool
) -> None:
    # prompt_tokens 1000 = 500 uncached + 200 read from the cache + 300 written to it
    sim.enqueue(Reply(content="ok", usage=SimUsage(input=1000, output=100, cached=200, cache_write=300)))
    # 500 x 2000 + 200 x 500 + 300 x 2500 + 100 x 8000 (the write at the input price would be 2,500,000)
    cost = 2_650_000
    async with running_gateway(config(sim), ENV) as gw:
        reply = await answer(gw, "gpt-sim", streamed)
        usage, billed = reply.usage, reply.cost_nanos_usd
        assert usage_of(usage) == (1000, 100, 200, 300, 0, 0)
        assert billed == cost
        row = await total(gw)
        assert (row.cache_write_tokens, row.cost_nanos_usd) == (300, cost)


@pytest.mark.parametrize("streamed", [False, True])
async def test_anthropic_thinking_tokens_are_reasoning_tokens(sim: UpstreamSimulator, streamed: bool) -> None:
    sim.enqueue(Reply(content="42", usage=SimUsage(input=50, output=400, reasoning=300)))
    cost = 50 * 3000 + 400 * 15000  # reasoning is output, priced as output
    async with running_gateway(config(sim), ENV) as gw:
        reply = await answer(gw, "claude-sim", streamed)
        usage, billed = reply.usage, reply.cost_nanos_usd
        assert usage_of(usage) == (50, 400, 0, 0, 300, 0)
        assert billed == cost
        row = await total(gw)
        assert (row.reasoning_tokens, row.cost_nanos_usd) == (300, cost)
    body = sim.requests[0].body
    assert body["model"] == "claude-sim" and body["stream"] is streamed if streamed else "stream" not in body


@pytest.mark.parametrize("streamed", [False, True])
async def test_anthropic_web_search_requests_are_counted_and_priced(sim: UpstreamSimulator, streamed: bool) -> None:
    sim.enqueue(Reply(content="found it", usage=SimUsage(input=100, output=50, web_search=3)))
    cost = 100 * 3000 + 50 * 15000 + 3 * 10_000_000
    async with running_gateway(config(sim), ENV) as gw:
        reply = await answer(gw, "claude-sim", streamed)
        usage, billed = reply.usage, reply.cost_nanos_usd
        assert usage_of(usage) == (100, 50, 0, 0, 0, 3)
        assert billed == cost == 31_050_000
        row = await total(gw)
        assert (row.web_search_requests, row.cost_nanos_usd) == (3, cost)  # recorded in the ledger
        models = {m.name: m for m in (await gw.stub.ListModels(pb.ListModelsRequest())).models}
        assert models["claude-sim"].price.web_search_nanos_usd_per_million == 10_000_000_000_000
        assert models["gpt-sim"].price.web_search_nanos_usd_per_million == 0  # not configured: not billed


def with_tiers(sim: UpstreamSimulator) -> dict[str, Any]:
    doc = config(sim)
    doc["providers"]["openai"]["models"][0]["serviceTiers"] = {
        "priority": {"inputPer1M": 4, "outputPer1M": 16, "cachedInputPer1M": 1},  # 2x
        "flex": {"inputPer1M": 1, "outputPer1M": 4},
    }
    doc["providers"]["anthropic"]["models"][0]["serviceTiers"] = {"priority": {"inputPer1M": 6, "outputPer1M": 30}}
    return doc


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    ("model", "tier", "cost"),
    [
        ("gpt-sim", "priority", 800 * 4000 + 200 * 1000 + 100 * 16000),  # the tier's cached price too
        ("gpt-sim", "flex", 800 * 1000 + 200 * 1000 + 100 * 4000),  # unset: the tier's input price
        ("gpt-sim", "default", 800 * 2000 + 200 * 500 + 100 * 8000),  # no price of its own: the model's
        ("gpt-sim", None, 800 * 2000 + 200 * 500 + 100 * 8000),  # no tier said
        # Anthropic says it in its usage, where input_tokens leaves the cache reads out
        ("claude-sim", "priority", 1000 * 6000 + 200 * 6000 + 100 * 30000),
        ("claude-sim", "standard", 1000 * 3000 + 200 * 300 + 100 * 15000),
    ],
)
async def test_a_reply_is_priced_on_the_service_tier_it_was_served_on(
    sim: UpstreamSimulator, streamed: bool, model: str, tier: str | None, cost: int
) -> None:
    """OpenAI's priority processing costs about twice the standard price, flex half: a caller may ask for a
    tier (extra_fields.service_tier), and the reply says which one served it."""
    sim.enqueue(Reply(content="ok", usage=SimUsage(input=1000, output=100, cached=200), service_tier=tier))
    async with running_gateway(with_tiers(sim), ENV) as gw:
        reply = await answer(gw, model, streamed)
        billed, said = reply.cost_nanos_usd, reply.upstream.service_tier
        assert said == (tier or "")
        assert billed == cost
        assert (await total(gw)).cost_nanos_usd == cost  # the ledger's too
        if (model, tier, streamed) == ("gpt-sim", "priority", True):  # once: what ListModels shows
            models = {m.name: m for m in (await gw.stub.ListModels(pb.ListModelsRequest())).models}
            gpt = models["gpt-sim"]
            assert sorted(gpt.service_tier_prices) == ["flex", "priority"]
            priority = gpt.service_tier_prices["priority"]
            assert priority.input_nanos_usd_per_million == 4_000_000_000
            assert priority.output_nanos_usd_per_million == 16_000_000_000
            assert priority.cached_input_nanos_usd_per_million == 1_000_000_000
            assert gpt.price.output_nanos_usd_per_million == 8_000_000_000  # the model's own, unchanged


async def test_a_budget_reserves_the_dearest_service_tier(sim: UpstreamSimulator) -> None:
    """Which tier serves a call is known only from its reply, so admission reserves the worst of them."""
    doc = with_tiers(sim)
    doc["tenants"] = {"default": {"budget": {"dailyUsd": 0.0001}}}  # 100,000 nano-dollars
    ask = pb.ChatRequest(model="gpt-sim", messages=[user("hi")], max_tokens=10)  # ~10 x 16,000 at priority
    async with running_gateway(doc, ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Chat(ask)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not sim.requests
    del doc["providers"]["openai"]["models"][0]["serviceTiers"]
    async with running_gateway(doc, ENV) as gw:  # at the standard price (~10 x 8,000) the same call fits
        assert (await gw.stub.Chat(ask)).message.content


@pytest.mark.parametrize("streamed", [False, True])
async def test_audio_tokens_are_priced_at_the_audio_price(sim: UpstreamSimulator, streamed: bool) -> None:
    """gpt-4o-audio's audio input costs 16x its text input: without its own price an audio prompt would be
    billed as text."""
    doc = config(sim)
    doc["providers"]["openai"]["models"][0].update(audioInputPer1M=40, audioOutputPer1M=80)
    # 1,000 prompt tokens: 100 read from the cache, 700 of audio, 200 of text; 300 output: 250 of audio
    sim.enqueue(Reply(content="heard", usage=SimUsage(1000, 300, cached=100, audio_input=700, audio_output=250)))
    cost = 200 * 2000 + 700 * 40_000 + 100 * 500 + 50 * 8000 + 250 * 80_000
    async with running_gateway(doc, ENV) as gw:
        reply = await answer(gw, "gpt-sim", streamed)
        usage, billed = reply.usage, reply.cost_nanos_usd
        assert (usage.audio_input_tokens, usage.audio_output_tokens) == (700, 250)
        assert billed == cost
        row = await total(gw)
        assert (row.audio_input_tokens, row.audio_output_tokens, row.cost_nanos_usd) == (700, 250, cost)
        models = {m.name: m for m in (await gw.stub.ListModels(pb.ListModelsRequest())).models}
        gpt, claude = models["gpt-sim"].price, models["claude-sim"].price
        assert gpt.audio_input_nanos_usd_per_million == 40_000_000_000
        assert gpt.audio_output_nanos_usd_per_million == 80_000_000_000
        assert claude.audio_input_nanos_usd_per_million == claude.input_nanos_usd_per_million  # unset: the text's


LONG_CONTEXT = {"aboveInputTokens": 200_000, "inputPer1M": 6, "outputPer1M": 22.5, "cachedInputPer1M": 0.6}


@pytest.mark.parametrize("streamed", [False, True])
@pytest.mark.parametrize(
    ("uncached", "cached", "cost"),
    [
        # 210,000 prompt tokens with the cache reads: all the call's tokens at the long-context price
        (150_000, 60_000, 150_000 * 6000 + 60_000 * 600 + 100 * 22_500),
        (150_000, 40_000, 150_000 * 3000 + 40_000 * 300 + 100 * 15_000),  # 190,000: the model's price
        (200_000, 0, 200_000 * 3000 + 100 * 15_000),  # the threshold itself is not over it
    ],
)
async def test_a_long_prompt_is_priced_at_the_long_context_price(
    sim: UpstreamSimulator, streamed: bool, uncached: int, cached: int, cost: int
) -> None:
    """Claude's 1M-token context and Gemini 2.5 Pro bill a call whose prompt is over 200,000 tokens (cache reads
    and writes included) at a higher price, for all its tokens."""
    doc = config(sim)
    doc["providers"]["anthropic"]["models"][0]["longContext"] = LONG_CONTEXT
    sim.enqueue(Reply(content="ok", usage=SimUsage(input=uncached, output=100, cached=cached)))
    async with running_gateway(doc, ENV) as gw:
        billed = (await answer(gw, "claude-sim", streamed)).cost_nanos_usd
        assert billed == cost
        assert (await total(gw)).cost_nanos_usd == cost
        if streamed and cached == 60_000:  # once: what ListModels shows
            models = {m.name: m for m in (await gw.stub.ListModels(pb.ListModelsRequest())).models}
            claude, gpt = models["claude-sim"], models["gpt-sim"]
            assert claude.long_context_above_input_tokens == 200_000
            assert claude.long_context_price.output_nanos_usd_per_million == 22_500_000_000
            assert claude.long_context_price.cache_write_nanos_usd_per_million == 6_000_000_000  # its input's
            assert not gpt.HasField("long_context_price") and gpt.long_context_above_input_tokens == 0


async def test_a_budget_reserves_the_long_context_price_for_a_long_prompt(sim: UpstreamSimulator) -> None:
    doc = config(sim)
    prompt = "word " * 800  # ~1,000 tokens
    doc["providers"]["anthropic"]["models"][0]["longContext"] = {
        **LONG_CONTEXT,
        "aboveInputTokens": 500,
        "inputPer1M": 300,  # 100x: ~1,000 x 300,000 nano-dollars
    }
    doc["tenants"] = {"default": {"budget": {"dailyUsd": 0.1}}}
    async with running_gateway(doc, ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Chat(pb.ChatRequest(model="claude-sim", messages=[user(prompt)], max_tokens=10))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert not sim.requests
        # a short prompt stays under the threshold: reserved, and billed, at the model's price
        assert (await gw.stub.Chat(pb.ChatRequest(model="claude-sim", messages=[user("hi")], max_tokens=10))).message


TIER = "providers.openai.models[0].serviceTiers"


@pytest.mark.parametrize(
    ("fields", "path"),
    [
        ({"serviceTiers": {"priority": {"inputPer1M": 4}}}, f"{TIER}.priority"),
        ({"serviceTiers": {"priority": {"inputPer1M": -1, "outputPer1M": 1}}}, f"{TIER}.priority"),
        ({"serviceTiers": {"": {"inputPer1M": 1, "outputPer1M": 1}}}, f"{TIER}."),  # it would price every reply
        ({"longContext": {"aboveInputTokens": 9, "inputPer1M": 4}}, "providers.openai.models[0].longContext"),
        (  # which would win is not settled: refused until a provider needs both
            {"longContext": LONG_CONTEXT, "serviceTiers": {"priority": {"inputPer1M": 4, "outputPer1M": 16}}},
            "providers.openai.models[0].longContext",
        ),
    ],
)
def test_a_second_price_needs_to_be_whole(fields: dict[str, Any], path: str) -> None:
    doc = {"providers": {"openai": {"models": [{"name": "m", **OPENAI_PRICE, **fields}]}}}
    with pytest.raises(feather_config.ConfigError) as info:
        feather_config.resolve(feather_config.parse_file_config(json.dumps(doc), "<test>"), {}, "<test>")
    assert f"<test>: {path}" in str(info.value)


def test_a_second_price_needs_a_priced_model() -> None:
    tier = {"priority": {"inputPer1M": 4, "outputPer1M": 16}}
    doc = {"providers": {"openai": {"models": [{"name": "m", "allowUnpriced": True, "serviceTiers": tier}]}}}
    with pytest.raises(feather_config.ConfigError) as info:
        feather_config.resolve(feather_config.parse_file_config(json.dumps(doc), "<test>"), {}, "<test>")
    assert f"<test>: {TIER}.priority: is a second price of a model with no price" in str(info.value)


async def test_anthropic_stream_cut_after_message_start_bills_the_announced_prompt(sim: UpstreamSimulator) -> None:
    # Events: message_start, then the stream ends. Anthropic's input_tokens excludes cache reads and writes.
    sim.enqueue(
        Reply(content="never sent", usage=SimUsage(input=5000, output=9, cached=1000, cache_write=200), cut_after=1)
    )
    async with running_gateway(config(sim), ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream_end(gw, "claude-sim")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        row = await total(gw)
    assert (row.input_tokens, row.output_tokens, row.cached_input_tokens, row.cache_write_tokens) == (
        6200,
        0,
        1000,
        200,
    )
    assert row.estimated_count == 1  # the output is unknown
    assert row.cost_nanos_usd == 5000 * 3000 + 1000 * 300 + 200 * 3750  # 15,300,000 + 750,000: the exact prompt


async def test_anthropic_stream_cut_mid_reply_bills_the_announced_prompt_and_estimates_the_output(
    sim: UpstreamSimulator,
) -> None:
    # message_start, content_block_start, ping, then one text piece: the caller has seen text when it is cut.
    sim.enqueue(Reply(content="abcdefgh more words", usage=SimUsage(input=700, output=9, cached=300), cut_after=4))
    async with running_gateway(config(sim), ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stream_end(gw, "claude-sim")
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        row = await total(gw)
    # exact prompt (700 + 300 read); output estimated from the text relayed: "abcdefgh " is 9 characters, 3 tokens
    assert (row.input_tokens, row.output_tokens, row.cached_input_tokens, row.estimated_count) == (1000, 3, 300, 1)
    assert row.cost_nanos_usd == 700 * 3000 + 300 * 300 + 3 * 15000


async def test_anthropic_server_answering_a_stream_with_one_json_body(sim: UpstreamSimulator) -> None:
    """Item 9: proxies and mocks in front of Claude that ignore `stream: true` answer with a whole message."""
    sim.enqueue(
        Reply(
            content="whole answer",
            tool_calls=(SimToolCall("lookup", '{"q":"x"}', id="toolu_1"),),
            usage=SimUsage(input=30, output=12, cached=10, reasoning=5),
            ignore_stream=True,
        )
    )
    async with running_gateway(config(sim), ENV) as gw:
        events = [e async for e in gw.stub.StreamChat(pb.StreamChatRequest(model="claude-sim", messages=[user("hi")]))]
    assert sim.requests[0].body["stream"] is True
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["start", "delta", "delta", "end"]
    assert events[1].delta.content == "whole answer"
    call = events[2].delta.tool_calls[0]
    assert (call.index, call.id, call.name, call.arguments) == (0, "toolu_1", "lookup", '{"q":"x"}')
    end = events[3].end
    assert end.finish_reason == pb.FINISH_REASON_TOOL_CALLS
    assert usage_of(end.usage) == (40, 12, 10, 0, 5, 0) and not end.usage_estimated
    assert end.cost_nanos_usd == 30 * 3000 + 10 * 300 + 12 * 15000


async def test_a_retried_anthropic_stream_bills_the_cut_attempts_announced_prompt(sim: UpstreamSimulator) -> None:
    # The first attempt is cut after message_start (the provider took and billed the prompt); the retry answers.
    sim.enqueue(
        Reply(content="lost", usage=SimUsage(input=800, output=9, cached=200), cut_after=1),
        Reply(content="fine", usage=SimUsage(input=800, output=4, cached=1000)),
    )
    async with running_gateway(config(sim, max_attempts=2), ENV) as gw:
        text, end = await stream_end(gw, "claude-sim")
        row = await total(gw)
    assert text == "fine"
    # 1,000 + 1,800 prompt tokens, both exact; the cut attempt's output is unknown (so: estimated)
    assert usage_of(end.usage) == (2800, 4, 1200, 0, 0, 0) and end.usage_estimated
    cost = (800 * 3000 + 200 * 300) + (800 * 3000 + 1000 * 300 + 4 * 15000)
    assert end.cost_nanos_usd == row.cost_nanos_usd == cost
