"""The gateway against upstreams that misbehave: redirects, compressed, huge or endless replies, odd keys.

Each test runs a real gateway (grpc.aio on loopback) in front of the upstream simulator or a small
asyncio server that plays the hostile part.
"""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
import pytest

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from sim.hostile import Behaviour, HostileUpstream
from sim.upstream import ANTHROPIC_PATH, OPENAI_PATH, Reply, UpstreamSimulator
from tests.gateway_harness import Gateway, rich_error, running_gateway, user
from tests.test_gateway_upstream import ENV, sim_config


async def _usage_total(gw: Gateway) -> pb.UsageRow:
    await gw.server.engine.settled()
    reply = await gw.stub.Usage(pb.UsageRequest())
    assert isinstance(reply, pb.UsageResponse)
    return reply.total


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


# -- replies too large: JSON bodies (maxResponseBytes) and stream lines/events (maxStreamEventBytes) --

BODY_CAP = 1 << 20
EVENT_CAP = 64 << 10


def hostile_config(hostile: HostileUpstream, sim: UpstreamSimulator) -> dict[str, Any]:
    """`smart` is on the hostile upstream first, then on Anthropic (the simulator); `hostile/big` only there."""
    doc = sim_config(sim)
    doc["timeoutMs"] = 600_000  # only a size limit can end these calls in a test's lifetime
    doc["providers"] = {
        "hostile": {
            "type": "openai-compatible",
            "baseUrl": hostile.url + "/v1",
            "maxResponseBytes": BODY_CAP,
            "maxStreamEventBytes": EVENT_CAP,
            "models": [{"name": "big", "aliases": ["smart"], "inputPer1M": 1, "outputPer1M": 2}],
        },
        "anthropic": doc["providers"]["anthropic"],
    }
    return doc


@pytest.mark.parametrize("behaviour", ["json-length", "json-chunked"])
async def test_a_reply_body_over_the_cap_fails_over_and_its_connection_is_closed(
    sim: UpstreamSimulator, behaviour: Behaviour
) -> None:
    async with HostileUpstream(behaviour, size=300 << 20) as hostile:
        async with running_gateway(hostile_config(hostile, sim), ENV) as gw:
            reply = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("hi")]))
            assert reply.provider == "anthropic" and reply.message.content
            assert [(a.provider, a.error_reason) for a in reply.attempts] == [
                ("hostile", "UPSTREAM_RESPONSE_TOO_LARGE"),  # not retried: a provider-side fault
                ("anthropic", ""),
            ]
            await hostile.wait_disconnects(1)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.Chat(pb.ChatRequest(model="hostile/big", messages=[user("hi")]))
            total = await _usage_total(gw)
        await hostile.wait_disconnects(2)
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.metadata["upstreamReason"] == "UPSTREAM_RESPONSE_TOO_LARGE"
    assert "hostile: reply body over the 1048576-byte limit (maxResponseBytes)" in err.message
    assert (total.ok_count, total.error_count) == (1, 1)  # the refused reply is an error, not `ok`
    assert total.estimated_count == 2  # each call paid for the answered-but-refused attempt: an estimate, not 0
    # The gateway stopped reading near the cap: what was written is what the socket buffers took.
    assert hostile.connections == 2 and max(hostile.sent) < 64 << 20


@pytest.mark.parametrize(("behaviour", "what"), [("sse-line", "a stream line"), ("sse-event", "a stream event")])
async def test_an_endless_stream_line_or_event_fails_at_its_cap_not_at_a_timeout(
    sim: UpstreamSimulator, behaviour: Behaviour, what: str
) -> None:
    async with HostileUpstream(behaviour) as hostile:
        async with running_gateway(hostile_config(hostile, sim), ENV) as gw:
            events = [e async for e in gw.stub.StreamChat(pb.StreamChatRequest(model="smart", messages=[user("hi")]))]
            assert events[0].start.provider == "anthropic"
            assert events[-1].end.attempts[0].error_reason == "UPSTREAM_RESPONSE_TOO_LARGE"
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in gw.stub.StreamChat(pb.StreamChatRequest(model="hostile/big", messages=[user("hi")])):
                    pass
        await hostile.wait_disconnects(2)
    err = rich_error(caught.value)
    assert err.code == grpc.StatusCode.UNAVAILABLE and err.metadata["upstreamReason"] == "UPSTREAM_RESPONSE_TOO_LARGE"
    assert f"hostile: {what} over the 65536-byte limit (maxStreamEventBytes)" in err.message
    assert max(hostile.sent) < 64 << 20


# -- compression ---------------------------------------------------------------------------------


def _openai_completion(content: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-sim",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14},
        }
    )


def _openai_sse(content: str) -> bytes:
    chunks = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": content}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}},
    ]
    return b"".join(b"data: " + orjson.dumps(c) + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"


async def test_a_compressed_reply_is_decoded_answered_once_and_billed(sim: UpstreamSimulator) -> None:
    gz = {"Content-Encoding": "gzip"}
    sim.enqueue(
        Reply(body=gzip.compress(_openai_completion("squeezed")), headers=gz),
        Reply(body=gzip.compress(_openai_sse("squeezed stream")), content_type="text/event-stream", headers=gz),
        path=OPENAI_PATH,
    )
    async with running_gateway(sim_config(sim), ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")]))
        assert reply.message.content == "squeezed" and reply.usage.output_tokens == 4 and reply.cost_nanos_usd > 0
        events = [e async for e in gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("hi")]))]
        assert "".join(e.delta.content for e in events) == "squeezed stream"
        assert events[-1].end.usage.output_tokens == 4 and events[-1].end.cost_nanos_usd > 0
        total = await _usage_total(gw)
    assert (total.ok_count, total.error_count, total.estimated_count) == (2, 0, 0)
    assert len(sim.requests) == 2  # nothing retried
    assert all(r.headers["accept-encoding"] == "identity" for r in sim.requests)


async def test_a_compression_bomb_stops_at_the_body_cap_and_an_unknown_coding_fails_over(
    sim: UpstreamSimulator,
) -> None:
    bomb = gzip.compress(b'{"pad":"' + b"x" * (32 << 20) + b'"}', compresslevel=1)
    doc = sim_config(sim)
    doc["providers"]["openai"]["maxResponseBytes"] = BODY_CAP
    sim.enqueue(
        Reply(body=bomb, headers={"Content-Encoding": "gzip"}),
        Reply(body=b"\x1b\x00", headers={"Content-Encoding": "br"}),
        path=OPENAI_PATH,
    )
    async with running_gateway(doc, ENV) as gw:
        for reason in ("UPSTREAM_RESPONSE_TOO_LARGE", "UPSTREAM_BAD_RESPONSE"):
            reply = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("hi")]))
            assert reply.provider == "anthropic"
            assert [a.error_reason for a in reply.attempts] == [reason, ""]
    assert [r.path for r in sim.requests] == [OPENAI_PATH, ANTHROPIC_PATH] * 2
