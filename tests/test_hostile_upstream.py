"""The gateway against upstreams that misbehave: redirects, compressed, huge or endless replies, odd keys.

Each test runs a real gateway (grpc.aio on loopback) in front of the upstream simulator or a small
asyncio server that plays the hostile part.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from sim.upstream import Reply, UpstreamSimulator
from tests.gateway_harness import running_gateway, user
from tests.test_gateway_upstream import sim_config


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
