"""The gateway against upstreams that misbehave: redirects, compressed, huge or endless replies, odd keys.

Each test runs a real gateway (grpc.aio on loopback) in front of the upstream simulator or a small
asyncio server that plays the hostile part.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from sim.upstream import ANTHROPIC_PATH, OPENAI_PATH, Reply, UpstreamSimulator
from tests.gateway_harness import rich_error, running_gateway, user
from tests.test_gateway_upstream import ENV, sim_config


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSimulator]:
    async with UpstreamSimulator() as s:
        yield s


async def test_a_key_from_the_environment_is_sent_without_its_trailing_newline(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(content="hi"), Reply(content="hi"))
    env = {"SIM_OPENAI_KEY": "sk-test\n", "SIM_ANTHROPIC_KEY": "  ak-test\r\n"}
    async with running_gateway(sim_config(sim), env) as gw:
        for model in ("openai/gpt-sim", "anthropic/claude-sim"):
            await gw.stub.Chat(pb.ChatRequest(model=model, messages=[user("hello")]))
    assert sim.requests[0].headers["authorization"] == "Bearer sk-test"
    assert sim.requests[1].headers["x-api-key"] == "ak-test"


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_fails_over_and_is_never_followed_with_the_key(sim: UpstreamSimulator, status: int) -> None:
    async with UpstreamSimulator() as elsewhere:
        moved = Reply(status=status, body=b"", headers={"Location": elsewhere.url + "/v1/chat/completions?x=1"})
        sim.enqueue(moved, moved, path=OPENAI_PATH)
        async with running_gateway(sim_config(sim), ENV) as gw:
            # "smart" is on OpenAI (first) and Anthropic: the redirect is OpenAI's fault, so fail over at once
            reply = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("hi")]))
            assert reply.provider == "anthropic"
            assert [(a.provider, a.error_reason) for a in reply.attempts] == [
                ("openai", "UPSTREAM_REDIRECT"),
                ("anthropic", ""),
            ]
            events = [e async for e in gw.stub.StreamChat(pb.StreamChatRequest(model="smart", messages=[user("hi")]))]
            assert events[0].start.provider == "anthropic" and events[-1].HasField("end")
        assert not elsewhere.requests  # the key never went to the other host
    assert [r.path for r in sim.requests] == [OPENAI_PATH, ANTHROPIC_PATH] * 2  # never retried on OpenAI


async def test_a_redirect_with_no_other_candidate_is_unavailable_and_says_where_it_pointed(
    sim: UpstreamSimulator,
) -> None:
    sim.enqueue(Reply(status=301, body=b"moved", headers={"Location": "https://user:pw@api.example.com/v1?k=sk-x"}))
    async with running_gateway(sim_config(sim), ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")]))
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "UPSTREAM_UNAVAILABLE"
    assert err.metadata["upstreamReason"] == "UPSTREAM_REDIRECT"
    assert "openai: 301 redirect to https://api.example.com not followed; set baseUrl to the final URL" in err.message
    assert "pw" not in err.message and "sk-x" not in err.message
    assert len(sim.requests) == 1
