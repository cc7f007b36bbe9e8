"""What every new provider (azure-openai, bedrock, gemini, the Responses API) shares with the old ones in a
running gateway: hedging cancels the slow leg and bills it, circuit breakers open on its failures, and
the optional cloud SDKs are not needed to serve the providers that do not use them."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Any

import pytest

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from sim.azure import AzureSimulator
from sim.bedrock import BedrockReply, BedrockSimulator
from sim.gemini import GeminiReply, GeminiSimulator
from sim.responses import ResponsesReply, ResponsesSimulator
from sim.upstream import Reply
from tests.gateway_harness import running_gateway, user
from tests.ops_harness import running_server
from tests.test_tracing import Collector, _otel_env, collector

__all__ = ["collector"]  # a fixture used by parameter name below

AWS = ("AKIDCLOUDTEST0000001", "cloud/test/secret/key/0123456789abcdef", None)
MOCK = {
    "type": "mock",
    "models": [{"name": "mock-fast", "aliases": ["smart"], "inputPer1K": 0.001, "outputPer1K": 0.002}],
}
PRICE = {"aliases": ["smart"], "inputPer1M": 1, "outputPer1M": 2}


@dataclass
class Cloud:
    spec: dict[str, Any]  # the provider's config entry
    env: dict[str, str]
    slow: Callable[[], None]  # script the next request to hang
    fail: Callable[[], None]  # script the next request to fail with a 503
    received: Callable[[], int]
    headers: Callable[[], list[dict[str, str]]]  # of every request received, names lowercased


@asynccontextmanager
async def cloud(kind: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cloud]:
    async with AsyncExitStack() as stack:
        spec: dict[str, Any]  # Cloud.spec, built in each branch
        if kind == "azure":
            az = await stack.enter_async_context(AzureSimulator(api_key="az-key"))
            spec = {"type": "azure-openai", "baseUrl": az.url, "apiKeyEnv": "AZ", "apiVersion": "2024-10-21"}
            spec["models"] = [{"name": "gpt-4o", **PRICE}]
            yield Cloud(
                spec,
                {"AZ": "az-key"},
                lambda: az.enqueue(Reply(latency_s=30)),
                lambda: az.enqueue(Reply(status=503)),
                lambda: az.received,
                lambda: [{k.lower(): v for k, v in r.headers.items()} for r in az.requests],
            )
        elif kind == "bedrock":
            br = await stack.enter_async_context(BedrockSimulator(credentials=AWS, region="us-east-1"))
            for var, value in (("AWS_ACCESS_KEY_ID", AWS[0]), ("AWS_SECRET_ACCESS_KEY", AWS[1])):
                monkeypatch.setenv(var, value)
            monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
            monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
            spec = {"type": "bedrock", "region": "us-east-1", "baseUrl": br.url}
            spec["models"] = [{"name": "amazon.nova-pro-v1:0", **PRICE}]
            yield Cloud(
                spec,
                {},
                lambda: br.enqueue(BedrockReply(latency_s=30)),
                lambda: br.enqueue(BedrockReply(status=503, error_type="ServiceUnavailableException")),
                lambda: len(br.requests),
                lambda: [r.headers for r in br.requests],
            )
        elif kind == "gemini":
            gm = await stack.enter_async_context(GeminiSimulator(api_key="gm-key"))
            spec = {"type": "gemini", "baseUrl": gm.url + "/v1beta", "apiKeyEnv": "GM"}
            spec["models"] = [{"name": "gemini-2.5-flash", **PRICE}]
            yield Cloud(
                spec,
                {"GM": "gm-key"},
                lambda: gm.enqueue(GeminiReply(latency_s=30)),
                lambda: gm.enqueue(GeminiReply(status=503)),
                lambda: len(gm.requests),
                lambda: [r.headers for r in gm.requests],
            )
        else:
            rs = await stack.enter_async_context(ResponsesSimulator(api_key="sk-rs"))
            spec = {"type": "openai", "baseUrl": rs.url + "/v1", "apiKeyEnv": "RS", "api": "responses"}
            spec["models"] = [{"name": "o3", **PRICE}]
            yield Cloud(
                spec,
                {"RS": "sk-rs"},
                lambda: rs.enqueue(ResponsesReply(latency_s=30)),
                lambda: rs.enqueue(ResponsesReply(status=503)),
                lambda: len(rs.requests),
                lambda: [r.headers for r in rs.requests],
            )


KINDS = ["azure", "bedrock", "gemini", "responses"]


@pytest.mark.parametrize("kind", KINDS)
async def test_hedging_cancels_the_slow_cloud_leg_and_bills_it(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with cloud(kind, monkeypatch) as c:
        doc = {
            "ledger": {"type": "memory"},
            "providers": {"cloud": c.spec, "mock": MOCK},
            "routes": {"smart": {"hedgeAfterMs": 50}},
        }
        async with running_gateway(doc, c.env) as gw:
            # A first call resolves the provider's credentials (bedrock: botocore's chain, in a thread).
            warm = await gw.stub.Chat(pb.ChatRequest(model="smart", provider="cloud", messages=[user("warm")]))
            assert warm.provider == "cloud" and c.received() == 1
            c.slow()
            reply = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("race")]))
            assert reply.provider == "mock"
            outcomes = {(a.provider, a.outcome) for a in reply.attempts}
            assert outcomes == {("cloud", pb.ATTEMPT_OUTCOME_CANCELLED), ("mock", pb.ATTEMPT_OUTCOME_OK)}
            assert c.received() == 2


@pytest.mark.parametrize("kind", KINDS)
async def test_breaker_opens_on_cloud_failures(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with cloud(kind, monkeypatch) as c:
        doc = {
            "ledger": {"type": "memory"},
            "retry": {"maxAttempts": 1},
            "circuitBreaker": {"failureThreshold": 1, "resetTimeoutMs": 60_000},
            "providers": {"cloud": c.spec, "mock": MOCK},
        }
        async with running_gateway(doc, c.env) as gw:
            c.fail()
            first = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("one")]))
            assert first.provider == "mock" and c.received() == 1  # the 503 failed over
            second = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("two")]))
            assert second.provider == "mock" and c.received() == 1  # the open circuit skipped the cloud
            models = {m.provider: m for m in (await gw.stub.ListModels(pb.ListModelsRequest())).models}
            assert models["cloud"].circuit_state == pb.CIRCUIT_STATE_OPEN


async def test_the_cloud_sdks_are_not_needed_by_the_providers_that_do_not_use_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for module in ("botocore", "azure", "azure.identity", "google.auth", "boto3"):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: importing them fails
    async with cloud("azure", monkeypatch) as az, cloud("gemini", monkeypatch) as gm:
        doc = {
            "ledger": {"type": "memory"},
            "providers": {"azure": az.spec, "gemini": gm.spec, "mock": MOCK},
        }
        async with running_gateway(doc, {**az.env, **gm.env}) as gw:
            for provider in ("azure", "gemini", "mock"):
                reply = await gw.stub.Chat(pb.ChatRequest(model="smart", provider=provider, messages=[user("hi")]))
                assert reply.provider == provider and reply.message.content


@pytest.mark.parametrize("kind", KINDS)
async def test_each_attempt_carries_trace_context(
    kind: str, monkeypatch: pytest.MonkeyPatch, collector: tuple[Collector, int]
) -> None:
    _, port = collector
    options = _otel_env(monkeypatch, port)
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    metadata = (("traceparent", f"00-{caller_trace}-00f067aa0ba902b7-01"),)
    async with cloud(kind, monkeypatch) as c:
        doc = {"ledger": {"type": "memory"}, "providers": {"cloud": c.spec}}
        async with running_server(doc, c.env, options) as gw:
            await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("hi")]), metadata=metadata)
            events = gw.stub.StreamChat(pb.StreamChatRequest(model="smart", messages=[user("go")]), metadata=metadata)
            assert [e async for e in events][-1].HasField("end")
        sent = c.headers()
    assert len(sent) == 2
    spans = {h["traceparent"].split("-")[2] for h in sent}
    assert all(h["traceparent"].split("-")[1] == caller_trace for h in sent) and len(spans) == 2
