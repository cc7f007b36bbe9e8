"""The gateway end to end over real HTTP: a grpc.aio server in front of the OpenAI/Anthropic simulator."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
import uvloop

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.server.logs import CALLS_LOGGER
from sim.upstream import ANTHROPIC_PATH, OPENAI_PATH, Reply, SimToolCall, SimUsage, UpstreamSimulator
from tests.gateway_harness import Gateway, rich_error, running_gateway, user
from tests.redis_server import RedisServer

ENV = {"SIM_OPENAI_KEY": "sk-test", "SIM_ANTHROPIC_KEY": "ak-test"}


def sim_config(sim: UpstreamSimulator, **extra: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "ledger": {"type": "memory"},
        "retry": {"maxAttempts": 3, "baseMs": 1, "maxMs": 5},
        "providers": {
            "openai": {
                "type": "openai",
                "apiKeyEnv": "SIM_OPENAI_KEY",
                "baseUrl": sim.url + "/v1",
                "models": [
                    {
                        "name": "gpt-sim",
                        "aliases": ["fast", "smart"],
                        "inputPer1K": 0.03,
                        "outputPer1K": 0.06,
                        "cachedInputPer1K": 0.015,
                    }
                ],
            },
            "anthropic": {
                "type": "anthropic",
                "apiKeyEnv": "SIM_ANTHROPIC_KEY",
                "baseUrl": sim.url,
                "models": [
                    {
                        "name": "claude-sim",
                        "aliases": ["smart", "big"],
                        "inputPer1M": 3,
                        "outputPer1M": 15,
                        "cachedInputPer1M": 0.3,
                        "cacheWritePer1M": 3.75,
                    }
                ],
            },
        },
    }
    for key, value in extra.items():
        doc[key] = value
    return doc


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSimulator]:
    async with UpstreamSimulator() as s:
        yield s


async def _usage_total(gw: Gateway) -> pb.UsageRow:
    await gw.server.engine.settled()
    reply = await gw.stub.Usage(pb.UsageRequest())
    assert isinstance(reply, pb.UsageResponse)
    return reply.total


async def test_openai_chat_cost_is_tokens_times_price_to_the_nano(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(content="hi there", usage=SimUsage(input=12, output=7, cached=3)))
    async with running_gateway(sim_config(sim), ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hello")]))
        assert (reply.provider, reply.model, reply.message.content) == ("openai", "gpt-sim", "hi there")
        u = reply.usage
        assert (u.input_tokens, u.output_tokens, u.cached_input_tokens) == (12, 7, 3)
        # $0.03/1K = 30,000 nano/token uncached; cached $0.015/1K = 15,000; output $0.06/1K = 60,000
        assert reply.cost_nanos_usd == 9 * 30_000 + 3 * 15_000 + 7 * 60_000
        assert (await _usage_total(gw)).cost_nanos_usd == reply.cost_nanos_usd
    assert sim.requests[0].headers["authorization"] == "Bearer sk-test"


@pytest.mark.parametrize("model", ["fast", "big"])  # OpenAI, Anthropic
async def test_impossible_upstream_counts_are_made_billable_not_fatal(sim: UpstreamSimulator, model: str) -> None:
    """A buggy compatible server must not bill negative amounts, more cache reads than prompt, or overflow
    int64 (the call was answered: it is recorded and returned like any other)."""
    path = OPENAI_PATH if model == "fast" else ANTHROPIC_PATH
    sim.enqueue(
        Reply(content="a", usage=SimUsage(input=-5, output=-7)),
        Reply(content="b", usage=SimUsage(input=5, output=2, cached=50)),
        Reply(content="c", usage=SimUsage(input=2**62, output=2**62)),
        path=path,
    )
    async with running_gateway(sim_config(sim), ENV) as gw:
        replies = [await gw.stub.Chat(pb.ChatRequest(model=model, messages=[user(t)])) for t in "abc"]
        usages = [(r.usage.input_tokens, r.usage.output_tokens, r.usage.cached_input_tokens) for r in replies]
        if model == "fast":  # prompt_tokens includes cached_tokens, so the cache reads are capped at it
            assert usages == [(0, 0, 0), (5, 2, 5), (10**9, 10**9, 0)]
        else:  # Anthropic reports cache reads apart from input_tokens: both are in the prompt
            assert usages == [(0, 0, 0), (55, 2, 50), (10**9, 10**9, 0)]
        assert replies[0].cost_nanos_usd == 0 and all(r.cost_nanos_usd >= 0 for r in replies)
        total = await _usage_total(gw)
        assert total.ok_count == 3 and total.cost_nanos_usd == sum(r.cost_nanos_usd for r in replies)


@pytest.mark.parametrize("model", ["fast", "big"])
async def test_a_reply_without_usage_is_billed_as_an_estimate_once(sim: UpstreamSimulator, model: str) -> None:
    path = OPENAI_PATH if model == "fast" else ANTHROPIC_PATH
    sim.enqueue(Reply(content="unmetered answer", omit_usage=True), path=path)
    sim.enqueue(Reply(content="unmetered stream", omit_usage=True), path=path)
    async with running_gateway(sim_config(sim), ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model=model, messages=[user("hi")]))
        assert reply.usage_estimated and reply.usage.output_tokens > 0 and len(reply.attempts) == 1
        events = [e async for e in gw.stub.StreamChat(pb.StreamChatRequest(model=model, messages=[user("hi")]))]
        end = events[-1].end
        assert end.usage_estimated and end.usage.output_tokens > 1  # not Anthropic's placeholder of 1
        total = await _usage_total(gw)
        assert total.ok_count == 2 and total.estimated_count == 2
    assert len(sim.requests) == 2  # nothing retried: the provider answered


async def test_a_json_reply_is_never_routed_to_an_api_without_json_mode(sim: UpstreamSimulator) -> None:
    json_object = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    async with running_gateway(sim_config(sim, policy="roundrobin"), ENV) as gw:
        for _ in range(2):  # "smart" is on OpenAI and Anthropic; round robin would alternate
            request = pb.ChatRequest(model="smart", messages=[user("where?")], response_format=json_object)
            assert (await gw.stub.Chat(request)).provider == "openai"
        assert all(r.body["response_format"]["type"] == "json_object" for r in sim.requests)
        with pytest.raises(grpc.aio.AioRpcError) as caught:  # "big" is only on Anthropic
            await gw.stub.Chat(pb.ChatRequest(model="big", messages=[user("where?")], response_format=json_object))
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and [f for f, _ in err.violations] == ["response_format"]
        text = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_TEXT)
        reply = await gw.stub.Chat(pb.ChatRequest(model="big", messages=[user("hi")], response_format=text))
        assert reply.provider == "anthropic"


async def test_anthropic_chat_normalises_cache_counts_and_prices_them(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(content="bonjour", usage=SimUsage(input=10, output=5, cached=4, cache_write=2)))
    async with running_gateway(sim_config(sim), ENV) as gw:
        reply = await gw.stub.Chat(
            pb.ChatRequest(
                model="smart",
                provider="anthropic",
                messages=[pb.Message(role=pb.ROLE_SYSTEM, content="be terse"), user("hello")],
            )
        )
        u = reply.usage
        assert (u.input_tokens, u.cached_input_tokens, u.cache_write_tokens, u.output_tokens) == (16, 4, 2, 5)
        # $3/1M = 3,000 nano/token; cache read 300; cache write 3,750; output 15,000
        assert reply.cost_nanos_usd == 10 * 3_000 + 4 * 300 + 2 * 3_750 + 5 * 15_000
        assert reply.finish_reason == pb.FINISH_REASON_STOP
    body = sim.requests[0].body
    assert body["system"] == "be terse" and all(m["role"] != "system" for m in body["messages"])
    assert sim.requests[0].headers["x-api-key"] == "ak-test"


async def test_usage_sums_cache_writes_and_reasoning_tokens_per_provider(sim: UpstreamSimulator) -> None:
    # Anthropic reports cache writes (in a reply and in a stream's message_start); OpenAI reports reasoning tokens.
    sim.enqueue(Reply(content="one", usage=SimUsage(input=10, output=5, cached=4, cache_write=2)))
    sim.enqueue(Reply(content="two", usage=SimUsage(input=8, output=3, cache_write=6)))
    sim.enqueue(Reply(content="three", usage=SimUsage(input=12, output=7, reasoning=5)))
    async with running_gateway(sim_config(sim), ENV) as gw:
        chat = await gw.stub.Chat(pb.ChatRequest(model="smart", provider="anthropic", messages=[user("a")]))
        events = [
            e
            async for e in gw.stub.StreamChat(
                pb.StreamChatRequest(model="smart", provider="anthropic", messages=[user("b")])
            )
        ]
        reasoned = await gw.stub.Chat(pb.ChatRequest(model="smart", provider="openai", messages=[user("c")]))
        assert (chat.usage.cache_write_tokens, events[-1].end.usage.cache_write_tokens) == (2, 6)
        assert (reasoned.usage.reasoning_tokens, reasoned.usage.output_tokens) == (5, 7)
        await gw.server.engine.settled()
        usage = await gw.stub.Usage(pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_PROVIDER]))
    rows = [(r.provider, r.cache_write_tokens, r.reasoning_tokens) for r in usage.rows]
    assert rows == [("anthropic", 8, 0), ("openai", 0, 5)]
    assert (usage.total.cache_write_tokens, usage.total.reasoning_tokens) == (8, 5)
    assert usage.total.input_tokens == 16 + 14 + 12  # cache reads and writes are part of input_tokens


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_stream_split_at_awkward_places_reassembles_exactly(sim: UpstreamSimulator, provider: str) -> None:
    text = "Grüße — ünïcödé text, split anywhere ✓"
    sim.enqueue(
        Reply(
            content=text,
            usage=SimUsage(input=20, output=9),
            split="awkward",
            line_ending="\r\n",
            pings=True,
            comments=True,
        )
    )
    async with running_gateway(sim_config(sim), ENV) as gw:
        events = [
            e
            async for e in gw.stub.StreamChat(
                pb.StreamChatRequest(model="smart", provider=provider, messages=[user("go")], temperature=0.2)
            )
        ]
        assert events[0].start.provider == provider
        assert "".join(e.delta.content for e in events[1:-1]) == text
        end = events[-1].end
        assert (end.usage.input_tokens, end.usage.output_tokens) == (20, 9)
        assert not end.usage_estimated
        price_in, price_out = (30_000, 60_000) if provider == "openai" else (3_000, 15_000)
        assert end.cost_nanos_usd == 20 * price_in + 9 * price_out
    body = sim.requests[0].body
    if provider == "openai":
        assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.2


async def test_tool_calls_round_trip_through_the_gateway(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(tool_calls=(SimToolCall("get_weather", '{"city": "Paris"}', id="call_1"),)))
    async with running_gateway(sim_config(sim), ENV) as gw:
        tool = pb.Tool(name="get_weather", description="weather by city")
        tool.parameters.update({"type": "object", "properties": {"city": {"type": "string"}}})
        reply = await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("weather?")], tools=[tool]))
        assert reply.finish_reason == pb.FINISH_REASON_TOOL_CALLS
        call = reply.message.tool_calls[0]
        assert (call.id, call.name, call.arguments) == ("call_1", "get_weather", '{"city": "Paris"}')
    sent = sim.requests[0].body["tools"][0]
    assert sent["type"] == "function" and sent["function"]["name"] == "get_weather"
    assert sent["function"]["parameters"]["properties"]["city"]["type"] == "string"


async def test_deadline_shorter_than_upstream_latency_is_deadline_exceeded(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(latency_s=5.0))
    async with running_gateway(sim_config(sim), ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("slow")]), timeout=0.3)
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        total = await _usage_total(gw)
        assert total.request_count == 1 and total.ok_count == 0
        # The upstream got the prompt and works on it: billed as an estimate of that prompt, never 0.
        assert total.estimated_count == 1 and total.input_tokens > 0 and total.output_tokens == 0
        assert total.cost_nanos_usd == total.input_tokens * 30_000


def _prompt_cost() -> int:
    """What one abandoned attempt of user("abandoned") on gpt-sim bills: its prompt estimate."""
    from feather_grpc.core.tokens import estimate_prompt_tokens
    from feather_grpc.core.types import Message, Role

    return estimate_prompt_tokens([Message(Role.USER, "abandoned")]) * 30_000


async def test_a_stream_abandoned_at_the_deadline_before_its_first_token_is_billed(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(latency_s=5.0))
    async with running_gateway(sim_config(sim), ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in gw.stub.StreamChat(
                pb.StreamChatRequest(model="fast", messages=[user("abandoned")]), timeout=0.3
            ):
                pass
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        total = await _usage_total(gw)
        assert total.estimated_count == 1 and total.cost_nanos_usd == _prompt_cost() > 0


async def test_attempts_abandoned_before_a_retry_answers_are_billed_with_it(sim: UpstreamSimulator) -> None:
    """An attempt that timed out, and one whose 2xx reply could not be used (here not JSON; a reply over
    a size limit is the same case), were paid upstream: the call that finally answers bills them too."""
    sim.enqueue(Reply(latency_s=5.0), Reply(body=b"not json at all"), Reply(usage=SimUsage(input=10, output=20)))
    doc = sim_config(sim, timeoutMs=300, retry={"maxAttempts": 3, "baseMs": 1, "maxMs": 5})
    async with running_gateway(doc, ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("abandoned")]))
        assert [a.error_reason for a in reply.attempts] == ["UPSTREAM_TIMEOUT", "UPSTREAM_BAD_RESPONSE", ""]
        answered = 10 * 30_000 + 20 * 60_000
        assert reply.cost_nanos_usd == answered + 2 * _prompt_cost()
        assert reply.usage_estimated
        total = await _usage_total(gw)
        assert total.cost_nanos_usd == reply.cost_nanos_usd and total.estimated_count == 1


async def test_a_chat_cancelled_while_the_upstream_works_is_billed(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(latency_s=30.0))
    async with running_gateway(sim_config(sim), ENV) as gw:
        call = gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("abandoned")]))
        await sim.wait_requests(1, timeout_s=5)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await sim.wait_disconnect(timeout_s=5)
        total = await _usage_total(gw)
        assert total.cancelled_count == 1 and total.estimated_count == 1
        assert total.cost_nanos_usd == _prompt_cost() > 0


def test_a_short_caller_deadline_never_counts_against_the_provider() -> None:
    """The caller's deadline running out is DEADLINE_EXCEEDED and no failure of the provider's. On uvloop
    (as `serve` runs) timers fire up to a millisecond early; reading the clock then took some of these
    for the upstream's own timeout (UNAVAILABLE), which opened the circuit for every caller."""

    async def scenario() -> None:
        async with UpstreamSimulator() as sim:
            sim.default = Reply(latency_s=0.2)
            breaker = {"failureThreshold": 3, "windowMs": 60_000, "resetTimeoutMs": 60_000}
            async with running_gateway(sim_config(sim, retry={"maxAttempts": 1}, circuitBreaker=breaker), ENV) as gw:
                codes: Counter[grpc.StatusCode] = Counter()
                for i in range(30):
                    with pytest.raises(grpc.aio.AioRpcError) as caught:
                        await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user(f"hi {i}")]), timeout=0.05)
                    codes[caught.value.code()] += 1
                assert codes == {grpc.StatusCode.DEADLINE_EXCEEDED: 30}
                models = (await gw.stub.ListModels(pb.ListModelsRequest(provider="openai"))).models
                assert [m.circuit_state for m in models] == [pb.CIRCUIT_STATE_CLOSED]

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


async def test_cancelled_stream_closes_upstream_and_is_billed(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(content="one two three four five six", hang_after=4))
    async with running_gateway(sim_config(sim), ENV) as gw:
        call = gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("talk to me")]))
        first = await call.read()
        assert first.WhichOneof("event") == "start"
        delta = await call.read()
        assert delta.delta.content
        call.cancel()
        await sim.wait_stream_disconnect(timeout_s=5)
        total = await _usage_total(gw)
        assert total.cancelled_count == 1 and total.estimated_count == 1
        assert total.input_tokens > 0 and total.output_tokens > 0
        assert total.cost_nanos_usd == (total.input_tokens * 30_000 + total.output_tokens * 60_000)


async def test_a_stream_that_stalls_mid_way_ends_after_the_providers_timeout(sim: UpstreamSimulator) -> None:
    """No caller deadline and no idleTimeoutMs: a silence as long as timeoutMs still ends the stream."""
    sim.enqueue(Reply(content="one two three four", hang_after=2), path=OPENAI_PATH)
    doc = sim_config(sim, timeoutMs=300)
    async with running_gateway(doc, ENV) as gw:
        events = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(10):  # a bound for the test itself, far above the 0.3 s
                async for event in gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("hi")])):
                    events.append(event.WhichOneof("event"))
        assert events[0] == "start" and "delta" in events
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        total = await _usage_total(gw)
        assert total.error_count == 1 and total.estimated_count == 1  # billed for what was streamed


def _with_idle_timeout(doc: dict[str, Any], idle_ms: int) -> dict[str, Any]:
    doc["providers"]["openai"]["idleTimeoutMs"] = idle_ms
    return doc


async def test_a_silence_longer_than_idle_timeout_ends_the_stream_as_the_upstreams_failure(
    sim: UpstreamSimulator,
) -> None:
    sim.enqueue(Reply(content="one two three four", hang_after=2), path=OPENAI_PATH)
    async with running_gateway(_with_idle_timeout(sim_config(sim), 300), ENV) as gw:
        events = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async with asyncio.timeout(10):  # a bound for the test itself, far above the 0.3 s
                async for event in gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("hi")])):
                    events.append(event.WhichOneof("event"))
        assert events[0] == "start" and "delta" in events
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "no stream event for 300 ms" in (caught.value.details() or "")
        models = (await gw.stub.ListModels(pb.ListModelsRequest(provider="openai"))).models
        assert models[0].last_failure.reason == "UPSTREAM_IDLE_TIMEOUT"  # the provider's failure


async def test_a_stream_longer_than_idle_timeout_with_shorter_gaps_is_not_cut(sim: UpstreamSimulator) -> None:
    """The idle limit is per wait, not per stream: its one timer is pushed back as events come (~0.1 s
    apart here, 40 of them), so a stream lasting several times idleTimeoutMs ends normally."""
    words = " ".join(f"w{i}" for i in range(40))
    sim.enqueue(Reply(content=words, split=120, piece_delay_s=0.05), path=OPENAI_PATH)
    async with running_gateway(_with_idle_timeout(sim_config(sim), 600), ENV) as gw:
        loop = asyncio.get_running_loop()
        began = loop.time()
        text = []
        async for event in gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("hi")])):
            if event.HasField("delta"):
                text.append(event.delta.content)
            elif event.HasField("end"):
                assert event.end.finish_reason == pb.FINISH_REASON_STOP
        assert "".join(text) == words
        assert loop.time() - began > 1.2  # the premise: the stream outlasted two idle limits


async def test_the_callers_deadline_mid_stream_is_not_the_upstreams_failure(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(content="one two three four", hang_after=2), path=OPENAI_PATH)
    async with running_gateway(_with_idle_timeout(sim_config(sim), 30_000), ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("hi")]), timeout=0.5):
                pass
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await gw.server.engine.settled()
        models = (await gw.stub.ListModels(pb.ListModelsRequest(provider="openai"))).models
        assert not models[0].HasField("last_failure")  # nothing counted against the provider's circuit
        assert models[0].circuit_state == pb.CIRCUIT_STATE_CLOSED


async def test_retryable_failures_retry_then_fail_over_with_attempt_trail(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(status=500), Reply(status=502), Reply(status=503), path=OPENAI_PATH)
    async with running_gateway(sim_config(sim), ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("hi")]))
        assert reply.provider == "anthropic"
        trail = [(a.provider, a.outcome, a.error_reason, a.http_status) for a in reply.attempts]
        assert trail == [
            ("openai", pb.ATTEMPT_OUTCOME_RETRYABLE_ERROR, "UPSTREAM_SERVER_ERROR", 500),
            ("openai", pb.ATTEMPT_OUTCOME_RETRYABLE_ERROR, "UPSTREAM_SERVER_ERROR", 502),
            ("openai", pb.ATTEMPT_OUTCOME_RETRYABLE_ERROR, "UPSTREAM_SERVER_ERROR", 503),
            ("anthropic", pb.ATTEMPT_OUTCOME_OK, "", 0),
        ]


async def test_retry_after_beyond_the_deadline_fails_over_instead_of_sleeping(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(status=429, retry_after="30"), path=OPENAI_PATH)
    async with running_gateway(sim_config(sim), ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("hi")]), timeout=10)
        assert [(a.provider, a.error_reason) for a in reply.attempts] == [
            ("openai", "UPSTREAM_RATE_LIMITED"),
            ("anthropic", ""),
        ]


async def test_all_candidates_unavailable_carries_retry_info(sim: UpstreamSimulator) -> None:
    sim.default = Reply(status=503, retry_after="7")
    async with running_gateway(sim_config(sim, retry={"maxAttempts": 1}), ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("hi")]))
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "UPSTREAM_UNAVAILABLE"
        assert err.retry_delay_s == 7
        assert "ak-test" not in err.message and "sk-test" not in err.message


async def test_upstream_bad_request_stops_at_once_as_invalid_argument(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(status=400, error_message="bad stop sequence"), path=OPENAI_PATH)
    async with running_gateway(sim_config(sim), ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("hi")]))
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "UPSTREAM_INVALID_REQUEST"
        assert err.metadata["provider"] == "openai"
    assert len(sim.requests) == 1  # neither retried nor failed over


async def test_upstream_auth_failure_is_internal_not_unauthenticated(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(status=401), path=OPENAI_PATH)
    async with running_gateway(sim_config(sim), ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")]))
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.INTERNAL and err.reason == "UPSTREAM_AUTH_FAILED"
        assert "sk-test" not in err.message


async def test_context_too_long_falls_back_to_a_larger_model(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(status=400, error_code="context_length_exceeded", error_message="too long"), path=OPENAI_PATH)
    doc = sim_config(sim, contextWindowFallbacks={"fast": ["big"]})
    async with running_gateway(doc, ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("a very long prompt")]))
        assert (reply.provider, reply.model) == ("anthropic", "claude-sim")
        assert reply.attempts[0].error_reason == "UPSTREAM_CONTEXT_TOO_LONG"


async def test_the_budget_reservation_covers_the_context_window_fallbacks(sim: UpstreamSimulator) -> None:
    """ "big" (Anthropic, $3/$15 per 1M) falls back to "fast" (OpenAI, $30/$60 per 1M) on a too-long prompt: the
    worst case reserved at admission is the pricier one, so a budget that only fits "big" refuses the call
    before any upstream is paid, rather than letting the fallback overspend."""
    prompt = "word " * 800  # ~1,000 tokens: worst case ~$0.003 on "big", ~$0.03 on "fast"
    doc = sim_config(sim, contextWindowFallbacks={"big": ["fast"]}, tenants={"default": {"budget": {"dailyUsd": 0.01}}})
    async with running_gateway(doc, ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="big", messages=[user(prompt)], max_tokens=10))
        assert rich_error(caught.value).reason == "BUDGET_EXCEEDED"
        assert len(sim.requests) == 0
        doc.pop("contextWindowFallbacks")
    async with running_gateway(doc, ENV) as gw:  # without the fallback the same call fits
        reply = await gw.stub.Chat(pb.ChatRequest(model="big", messages=[user(prompt)], max_tokens=10))
        assert reply.provider == "anthropic"


async def test_the_budget_reservation_covers_a_thinking_budget_without_max_tokens(sim: UpstreamSimulator) -> None:
    """Without max_tokens, Anthropic is sent 4,096 plus the thinking budget (thinking is output): the worst case
    reserved must be the same, or a large budget would let the call spend far past what was reserved."""
    doc = sim_config(sim, tenants={"default": {"budget": {"dailyUsd": 0.5}}})
    thinking = pb.ReasoningOptions(thinking_budget_tokens=60_000)  # ~64k output at $15/1M: ~$0.96
    async with running_gateway(doc, ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="big", messages=[user("think")], reasoning=thinking))
        assert rich_error(caught.value).reason == "BUDGET_EXCEEDED"
        assert len(sim.requests) == 0
        small = pb.ReasoningOptions(thinking_budget_tokens=2_000)  # ~6k output: ~$0.09, fits
        reply = await gw.stub.Chat(pb.ChatRequest(model="big", messages=[user("think")], reasoning=small))
        assert reply.provider == "anthropic"
    assert sim.requests[-1].body["max_tokens"] == 4096 + 2_000


async def test_a_hedged_calls_losing_leg_counts_against_the_budget(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(latency_s=30), path=OPENAI_PATH)
    doc = sim_config(sim, routes={"smart": {"hedgeAfterMs": 50}}, tenants={"default": {"budget": {"dailyUsd": 10}}})
    async with running_gateway(doc, ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("race")]))
        assert reply.provider == "anthropic"
        await gw.server.engine.settled()  # the loser is settled on its own task
        billed = (await _usage_total(gw)).cost_nanos_usd
        assert billed > reply.cost_nanos_usd  # the cancelled leg's estimate is billed too
        engine = gw.server.engine
        (day,) = engine.admission.windows(engine.config.tenancy.default_tenant)
        assert await engine.budgets.spent("default", day) == billed


async def test_configured_fallback_chain(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(status=503), path=OPENAI_PATH)
    doc = sim_config(sim, retry={"maxAttempts": 1}, fallbacks={"fast": ["big"]})
    async with running_gateway(doc, ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")]))
        assert reply.provider == "anthropic"


async def test_circuit_opens_and_routing_skips_the_failing_provider(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(status=500), Reply(status=500), path=OPENAI_PATH)
    doc = sim_config(
        sim,
        retry={"maxAttempts": 1},
        circuitBreaker={"failureThreshold": 2, "windowMs": 60_000, "resetTimeoutMs": 60_000},
    )
    async with running_gateway(doc, ENV) as gw:
        for _ in range(2):
            assert (await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("x")]))).provider == "anthropic"
        models = {m.provider: m for m in (await gw.stub.ListModels(pb.ListModelsRequest())).models}
        assert models["openai"].circuit_state == pb.CIRCUIT_STATE_OPEN
        assert models["anthropic"].circuit_state == pb.CIRCUIT_STATE_CLOSED
        sent_before = len(sim.requests)
        reply = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("x")]))
        assert [a.outcome for a in reply.attempts] == [pb.ATTEMPT_OUTCOME_CIRCUIT_OPEN, pb.ATTEMPT_OUTCOME_OK]
        assert len(sim.requests) == sent_before + 1  # nothing sent to the open circuit
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("x")]))
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.UNAVAILABLE and err.retry_delay_s is not None and err.retry_delay_s > 50


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_a_circuit_opened_by_one_replica_shows_open_in_every_replicas_list_models(
    sim: UpstreamSimulator, mode: str
) -> None:
    """Circuits shared through Redis (stateFailureMode closed: the Redis store; open: its fail-open wrapper)
    live outside the process: ListModels reads them before answering, so a replica that never called the
    failing provider shows its circuit open too."""
    sim.enqueue(Reply(status=500), Reply(status=500), path=OPENAI_PATH)
    breaker = {"failureThreshold": 2, "windowMs": 60_000, "resetTimeoutMs": 60_000}
    doc = sim_config(sim, retry={"maxAttempts": 1}, circuitBreaker=breaker, stateFailureMode=mode)

    async def states(gw: Gateway) -> dict[str, int]:
        return {m.provider: m.circuit_state for m in (await gw.stub.ListModels(pb.ListModelsRequest())).models}

    with RedisServer() as redis:
        env = {**ENV, "REDIS_URL": redis.url}
        async with running_gateway(doc, env) as a, running_gateway(doc, env) as b:
            assert await states(b) == {"openai": pb.CIRCUIT_STATE_CLOSED, "anthropic": pb.CIRCUIT_STATE_CLOSED}
            for _ in range(2):
                assert (await a.stub.Chat(pb.ChatRequest(model="smart", messages=[user("x")]))).provider == "anthropic"
            for gw in (a, b):
                assert await states(gw) == {"openai": pb.CIRCUIT_STATE_OPEN, "anthropic": pb.CIRCUIT_STATE_CLOSED}


async def test_stream_retries_before_first_token_are_invisible(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(status=503), Reply(reset_after=0), path=OPENAI_PATH)
    async with running_gateway(sim_config(sim), ENV) as gw:
        events = [e async for e in gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("hi")]))]
        assert events[0].WhichOneof("event") == "start" and events[-1].WhichOneof("event") == "end"
        assert [a.outcome for a in events[-1].end.attempts] == [
            pb.ATTEMPT_OUTCOME_RETRYABLE_ERROR,
            pb.ATTEMPT_OUTCOME_RETRYABLE_ERROR,
            pb.ATTEMPT_OUTCOME_OK,
        ]


async def test_stream_failing_after_first_token_ends_with_unavailable_and_is_billed(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(content="alpha beta gamma delta", reset_after=3), path=OPENAI_PATH)
    async with running_gateway(sim_config(sim), ENV) as gw:
        call = gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("hi")]))
        seen = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for event in call:
                seen.append(event.WhichOneof("event"))
        assert seen[0] == "start" and "end" not in seen and "delta" in seen
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "UPSTREAM_UNAVAILABLE"
        total = await _usage_total(gw)
        assert total.error_count == 1 and total.estimated_count == 1 and total.cost_nanos_usd > 0


async def test_hedged_route_takes_the_first_answer_and_bills_the_loser(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(latency_s=30), path=OPENAI_PATH)
    doc = sim_config(sim, routes={"smart": {"hedgeAfterMs": 50}})
    async with running_gateway(doc, ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("race")]))
        assert reply.provider == "anthropic"
        outcomes = {(a.provider, a.outcome) for a in reply.attempts}
        assert outcomes == {("openai", pb.ATTEMPT_OUTCOME_CANCELLED), ("anthropic", pb.ATTEMPT_OUTCOME_OK)}
        total = await _usage_total(gw)
        assert total.request_count == 2 and total.cancelled_count == 1  # the loser has its own record
        models = {m.provider: m for m in (await gw.stub.ListModels(pb.ListModelsRequest())).models}
        assert models["openai"].circuit_state == pb.CIRCUIT_STATE_CLOSED


async def test_per_request_retry_override(sim: UpstreamSimulator) -> None:
    sim.enqueue(*[Reply(status=500)] * 4, path=OPENAI_PATH)  # one short of the default breaker threshold
    async with running_gateway(sim_config(sim), ENV) as gw:
        reply = await gw.stub.Chat(
            pb.ChatRequest(
                model="fast",
                provider="openai",
                messages=[user("x")],
                retry=pb.RetryOptions(max_attempts=5, base_ms=1, max_ms=2),
            )
        )
        assert len(reply.attempts) == 5 and reply.attempts[-1].outcome == pb.ATTEMPT_OUTCOME_OK


async def test_a_burst_of_events_goes_out_as_fewer_deltas_with_the_same_text_and_order(sim: UpstreamSimulator) -> None:
    """Events that are already buffered when the gateway reads (a burst, or whatever arrived while the
    previous message was being written to a slow caller) are joined: consecutive text deltas become one
    delta, reasoning and tool calls keep their own messages, in order."""
    words = " ".join(f"w{i}" for i in range(30))
    call = SimToolCall("lookup", '{"q": "x"}')
    sim.enqueue(Reply(content=words, thinking=("think ", "hard"), tool_calls=(call,)), path=OPENAI_PATH)
    async with running_gateway(sim_config(sim), ENV) as gw:
        kinds: list[str] = []
        text: list[str] = []
        thought: list[str] = []
        args: list[str] = []
        async for event in gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("hi")])):
            if event.HasField("delta"):
                d = event.delta
                kind = "tool" if d.tool_calls else "thinking" if d.thinking else "text"
                if not kinds or kinds[-1] != kind:
                    kinds.append(kind)
                text.append(d.content)
                thought += [t.text for t in d.thinking]
                args += [t.arguments for t in d.tool_calls]
        assert kinds == ["thinking", "text", "tool"]  # the order of the kinds, as the upstream sent them
        assert "".join(text) == words and "".join(thought) == "think hard" and "".join(args) == '{"q": "x"}'
        deltas = len(text)
        assert deltas < 10  # 30 text events, 2 reasoning events, the tool call's: one read, a few messages


async def test_an_idle_gateway_sends_each_delta_as_it_comes() -> None:
    """Nothing waits for more text: this upstream sends its next event only once the caller has the
    previous one as its own delta, so a gateway that held a delta back would never finish."""
    from aiohttp import web

    words = [f"w{i} " for i in range(5)]
    received: asyncio.Queue[str] = asyncio.Queue()

    def sse(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        doc = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}
        return b"data: " + json.dumps(doc).encode() + b"\n\n"

    async def completions(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for word in words:
            await resp.write(sse({"content": word}))
            assert await asyncio.wait_for(received.get(), 10) == word  # the caller has it, alone
        await resp.write(sse({}, "stop") + b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", completions)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    doc = {
        "ledger": {"type": "memory"},
        "providers": {
            "up": {
                "type": "openai-compatible",
                "baseUrl": f"http://127.0.0.1:{port}/v1",
                "models": [{"name": "m", "inputPer1M": 1, "outputPer1M": 2}],
            }
        },
    }
    try:
        async with running_gateway(doc) as gw:
            deltas = []
            async with asyncio.timeout(20):  # a bound for the test itself: a held delta would hang here
                async for event in gw.stub.StreamChat(pb.StreamChatRequest(model="m", messages=[user("hi")])):
                    if event.HasField("delta"):
                        deltas.append(event.delta.content)
                        received.put_nowait(event.delta.content)
            assert deltas == words
    finally:
        await runner.cleanup()


def _call_lines(caplog: pytest.LogCaptureFixture) -> dict[str, dict[str, Any]]:
    """The call log's lines by request id."""
    return {r.__dict__["request_id"]: r.__dict__ for r in caplog.records if r.name == CALLS_LOGGER}


@pytest.mark.parametrize(("provider", "path"), [("openai", OPENAI_PATH), ("anthropic", ANTHROPIC_PATH)])
async def test_the_call_log_names_the_reply_id_the_upstream_gave(
    sim: UpstreamSimulator, caplog: pytest.LogCaptureFixture, provider: str, path: str
) -> None:
    """Support correlates a call with the provider's own logs by the provider's id of its reply: Chat and
    StreamChat each log the id of the reply that answered them, and nothing else from its body."""
    caplog.set_level(logging.INFO, logger=CALLS_LOGGER)
    sim.enqueue(Reply(content="secret-answer-1", response_id=f"{provider}-reply-chat"), path=path)
    sim.enqueue(Reply(content="secret-answer-2", response_id=f"{provider}-reply-stream"), path=path)
    async with running_gateway(sim_config(sim), ENV) as gw:
        chat = await gw.stub.Chat(pb.ChatRequest(model="smart", provider=provider, messages=[user("a")]))
        stream = pb.StreamChatRequest(model="smart", provider=provider, messages=[user("b")], request_id="r-stream")
        events = [e async for e in gw.stub.StreamChat(stream)]
        await gw.server.engine.settled()
    assert chat.message.content == "secret-answer-1" and events[-1].WhichOneof("event") == "end"
    lines = _call_lines(caplog)
    assert lines[chat.request_id]["upstream_response_id"] == f"{provider}-reply-chat"
    assert lines["r-stream"]["upstream_response_id"] == f"{provider}-reply-stream"
    assert "secret-answer" not in repr(lines)


async def test_the_call_log_names_the_reply_id_of_the_fallback_that_answered(
    sim: UpstreamSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=CALLS_LOGGER)
    sim.enqueue(Reply(status=401, response_id="chatcmpl-never"), path=OPENAI_PATH)  # the provider's fault: fail over
    sim.enqueue(Reply(response_id="msg_fallback"), path=ANTHROPIC_PATH)
    async with running_gateway(sim_config(sim), ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("x")]))
        await gw.server.engine.settled()
    assert reply.provider == "anthropic"
    line = _call_lines(caplog)[reply.request_id]
    assert line["upstream_response_id"] == "msg_fallback"
    ((failed),) = line["attempt_errors"]
    assert failed["provider"] == "openai" and "chatcmpl-never" not in str(failed)


@pytest.mark.parametrize("streamed", [False, True])
async def test_a_hedged_calls_log_names_the_winners_reply_id(
    sim: UpstreamSimulator, caplog: pytest.LogCaptureFixture, streamed: bool
) -> None:
    caplog.set_level(logging.INFO, logger=CALLS_LOGGER)
    sim.enqueue(Reply(latency_s=30, response_id="chatcmpl-loser"), path=OPENAI_PATH)
    sim.enqueue(Reply(response_id="msg_winner"), path=ANTHROPIC_PATH)
    doc = sim_config(sim, routes={"smart": {"hedgeAfterMs": 50}})
    async with running_gateway(doc, ENV) as gw:
        if streamed:
            request = pb.StreamChatRequest(model="smart", messages=[user("race")], request_id="r-hedged")
            events = [e async for e in gw.stub.StreamChat(request)]
            assert events[0].start.provider == "anthropic" and events[-1].WhichOneof("event") == "end"
        else:
            reply = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("race")], request_id="r-hedged"))
            assert reply.provider == "anthropic"
        await gw.server.engine.settled()
    line = _call_lines(caplog)["r-hedged"]
    assert (line["provider"], line["upstream_response_id"]) == ("anthropic", "msg_winner")


async def test_a_stream_cut_after_its_first_token_logs_its_reply_id_on_the_attempt_that_answered(
    sim: UpstreamSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream failed mid-way: the line still names the reply (the id comes with the stream's first
    chunk), and the failure, with that id, is on the attempt that streamed, not a hedge's cancelled loser."""
    caplog.set_level(logging.INFO, logger=CALLS_LOGGER)
    # The first leg answers after the hedge started (so the loser's record is listed after the winner's).
    sim.enqueue(
        Reply(content="a b c d e f", latency_s=0.3, reset_after=5, response_id="chatcmpl-cut"), path=OPENAI_PATH
    )
    sim.enqueue(Reply(latency_s=30), path=ANTHROPIC_PATH)
    doc = sim_config(sim, routes={"smart": {"hedgeAfterMs": 50}})
    async with running_gateway(doc, ENV) as gw:
        request = pb.StreamChatRequest(model="smart", messages=[user("race")], request_id="r-cut")
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in gw.stub.StreamChat(request):
                pass
        await gw.server.engine.settled()
    line = _call_lines(caplog)["r-cut"]
    assert (line["provider"], line["outcome"], line["upstream_response_id"]) == ("openai", "error", "chatcmpl-cut")
    errors = [(e["provider"], e["reason"], e.get("upstream_response_id")) for e in line["attempt_errors"]]
    assert errors == [("openai", "UPSTREAM_STREAM_CUT", "chatcmpl-cut")]


async def test_an_oversized_reply_id_is_bounded_in_the_call_log(
    sim: UpstreamSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    """The id is the upstream's text: a broken or hostile one must not bloat every line."""
    caplog.set_level(logging.INFO, logger=CALLS_LOGGER)
    sim.enqueue(Reply(response_id="chatcmpl-" + "x" * 100_000), path=OPENAI_PATH)
    async with running_gateway(sim_config(sim), ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="fast", provider="openai", messages=[user("x")]))
        await gw.server.engine.settled()
    logged = _call_lines(caplog)[reply.request_id]["upstream_response_id"]
    assert logged == ("chatcmpl-" + "x" * 100_000)[:200]
