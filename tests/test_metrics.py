"""Prometheus metrics: the guide's names, exact counts, tokens and cost, overhead, in-flight, circuit state,
rate-limit and load-shedding refusals, scraped over HTTP from a live gateway."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import socket
import time
from typing import Any

import grpc
import pytest

from feather_grpc.config import ConfigError
from feather_grpc.core.ledger import UsageRecord
from feather_grpc.engine.observe import AfterReply
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.server.app import ListenError, ServerOptions
from feather_grpc.server.calls import ServerCall, current_call
from feather_grpc.server.metrics import GatewayMetrics, rate_limit_scope
from sim.upstream import Reply, SimUsage, UpstreamSimulator
from tests.gateway_harness import MOCK_CONFIG, user
from tests.ops_harness import eventually, running_server, sample, scrape
from tests.test_contract_accounting import ENV as ACCOUNTING_ENV
from tests.test_contract_accounting import config as accounting_config

ENV = {"SIM_OPENAI_KEY": "sk-sim-metrics-key"}
METRICS = ServerOptions(metrics_port=0, metrics_host="127.0.0.1")


def sim_doc(sim: UpstreamSimulator, **extra: Any) -> dict[str, Any]:
    return {
        "ledger": {"type": "memory"},
        "retry": {"maxAttempts": 1},
        "circuitBreaker": {"failureThreshold": 1, "resetTimeoutMs": 60_000},
        "providers": {
            "openai": {
                "type": "openai",
                "apiKeyEnv": "SIM_OPENAI_KEY",
                "baseUrl": sim.url + "/v1",
                "models": [{"name": "gpt-sim", "aliases": ["fast"], "inputPer1K": 0.03, "outputPer1K": 0.06}],
            }
        },
        **extra,
    }


def chat(text: str = "hello there", model: str = "fast") -> pb.ChatRequest:
    return pb.ChatRequest(model=model, messages=[user(text)])


async def test_calls_tokens_cost_latency_and_circuit_state() -> None:
    async with UpstreamSimulator() as sim, running_server(sim_doc(sim), ENV, METRICS) as gw:
        port = gw.server.metrics_port
        assert port
        idle = scrape(port)
        assert sample(idle, "feather_circuit_state", provider="openai", model="gpt-sim") == 0
        assert sample(idle, "feather_inflight_calls", method="Chat") == 0

        sim.enqueue(Reply(usage=SimUsage(12, 7, cached=3)), Reply(latency_s=0.3))
        first = await gw.stub.Chat(chat())
        second = await gw.stub.Chat(chat())
        ends = [r.end async for r in gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("go")]))]
        end = ends[-1]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(chat(model="no-such-model"))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND

        m = scrape(port)
        pm = {"provider": "openai", "model": "gpt-sim"}
        assert sample(m, "feather_requests_total", **pm, status="ok") == 3
        assert sample(m, "feather_requests_total", provider="", model="", status="error") == 1
        assert sample(m, "feather_request_errors_total", provider="", model="", reason="MODEL_NOT_FOUND") == 1
        assert sample(m, "feather_upstream_attempts_total", **pm, outcome="ok") == 3
        replies = [first.usage, second.usage, end.usage]
        assert sample(m, "feather_tokens_total", **pm, kind="input") == sum(u.input_tokens for u in replies)
        assert sample(m, "feather_tokens_total", **pm, kind="output") == sum(u.output_tokens for u in replies)
        assert sample(m, "feather_tokens_total", **pm, kind="cached_input") == 3
        cost = first.cost_nanos_usd + second.cost_nanos_usd + end.cost_nanos_usd
        assert cost > 0 and sample(m, "feather_cost_nanos_usd_total", **pm) == cost
        assert sample(m, "feather_request_duration_seconds_count", **pm) == 3
        assert sample(m, "feather_time_to_first_token_seconds_count", **pm) == 1
        assert sample(m, "feather_gateway_overhead_seconds_count", call="unary") == 2
        assert sample(m, "feather_gateway_overhead_seconds_count", call="stream") == 1
        # The slow call spent 0.3 s upstream: that is in its duration, not in the gateway's overhead.
        assert sample(m, "feather_request_duration_seconds_bucket", **pm, le="0.25") == 2
        assert sample(m, "feather_gateway_overhead_seconds_bucket", call="unary", le="0.1") == 2

        sim.enqueue(Reply(status=500))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(chat())
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        m = scrape(port)
        assert sample(m, "feather_circuit_state", **pm) == 2  # open after one failure (threshold 1)
        assert sample(m, "feather_upstream_attempts_total", **pm, outcome="retryable_error") == 1
        assert sample(m, "feather_request_errors_total", **pm, reason="UPSTREAM_UNAVAILABLE") == 1


async def test_web_searches_and_one_hour_cache_writes_are_counted() -> None:
    async with UpstreamSimulator() as sim:
        doc = accounting_config(sim)
        sim.enqueue(Reply(content="found", usage=SimUsage(input=100, output=5, web_search=3)))
        sim.enqueue(Reply(content="ok", usage=SimUsage(input=10, output=5, cache_write=3000, cache_write_1h=2000)))
        async with running_server(doc, ACCOUNTING_ENV, METRICS) as gw:
            port = gw.server.metrics_port
            assert port
            for _ in range(2):
                await gw.stub.Chat(chat(model="claude-sim"))
            await gw.server.engine.settled()
            m = scrape(port)
    pm = {"provider": "anthropic", "model": "claude-sim"}
    assert sample(m, "feather_web_search_requests_total", **pm) == 3
    assert sample(m, "feather_tokens_total", **pm, kind="cache_write") == 3000
    assert sample(m, "feather_tokens_total", **pm, kind="cache_write_1h") == 2000  # of the 3000, not more


async def test_inflight_calls_and_load_shedding() -> None:
    async with UpstreamSimulator() as sim:
        sim.default = Reply(latency_s=0.5)
        doc = sim_doc(sim, server={"maxInFlight": 1})
        async with running_server(doc, ENV, METRICS) as gw:
            port = gw.server.metrics_port
            assert port
            slow = asyncio.ensure_future(gw.stub.Chat(chat()))
            await eventually(
                lambda: sample(scrape(port), "feather_inflight_calls", method="Chat") == 1, what="one call in flight"
            )
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.Chat(chat())
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            await slow
            m = scrape(port)
            assert sample(m, "feather_inflight_calls", method="Chat") == 0
            assert sample(m, "feather_load_shed_total") == 1


async def test_rate_limit_refusals_by_scope() -> None:
    key = "fk_metrics_tenant_key"
    doc = {
        **MOCK_CONFIG,
        "rateLimitMode": "reject",
        "tenants": {"acme": {"keys": ["sha256:" + hashlib.sha256(key.encode()).hexdigest()], "limits": {"rpm": 1}}},
    }
    async with running_server(doc, {}, METRICS) as gw:
        port = gw.server.metrics_port
        assert port
        auth = (("authorization", f"Bearer {key}"),)
        await gw.stub.Chat(chat(), metadata=auth)
        for _ in range(2):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.Chat(chat(), metadata=auth)
            assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        m = scrape(port)
        assert sample(m, "feather_rate_limited_total", scope="tenant_requests") == 2
        assert sample(m, "feather_requests_total", provider="mock", model="mock-fast", status="ok") == 1


def test_rate_limit_scope_labels_stay_bounded() -> None:
    assert rate_limit_scope("tenant:acme:requests") == "tenant_requests"
    assert rate_limit_scope("tenant:a:b:c:tpm") == "tenant_tpm"
    assert rate_limit_scope("tenant:acme:concurrency") == "tenant_concurrency"
    assert rate_limit_scope("provider:openai:gpt-4o") == "provider_model"


async def test_metrics_are_off_unless_a_port_is_set() -> None:
    assert ServerOptions.from_env({}).metrics_port is None
    assert ServerOptions.from_env({"METRICS_PORT": "9464"}).metrics_port == 9464
    # Under --workers the supervisor sets each worker's METRICS_PORT (tests/test_workers.py).
    assert ServerOptions.from_env({"METRICS_PORT": "9466"}, worker=2).metrics_port == 9466
    async with running_server(MOCK_CONFIG) as gw:
        assert gw.server.metrics is None and gw.server.metrics_port is None
        assert not any(type(o).__name__ == "GatewayMetrics" for o in gw.server.engine.observers)


async def test_a_busy_metrics_port_says_so_and_a_malformed_one_is_a_configuration_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        options = ServerOptions(metrics_port=busy.getsockname()[1], metrics_host="127.0.0.1")
        with pytest.raises(ListenError, match=r"\(METRICS_PORT\): Address already in use. Fix: pick a free"):
            async with running_server(MOCK_CONFIG, {}, options):
                pass
    with pytest.raises(ConfigError, match="METRICS_PORT"):
        ServerOptions.from_env({"METRICS_PORT": "ninety"})


async def test_garbage_collections_are_timed_by_generation_until_the_server_stops() -> None:
    async with running_server(MOCK_CONFIG, options=METRICS) as gw:
        port = gw.server.metrics_port
        assert port
        before = sample(scrape(port), "feather_gc_pause_seconds_count", generation="2")
        gc.collect()  # a full collection
        after = scrape(port)
        assert sample(after, "feather_gc_pause_seconds_count", generation="2") == before + 1
        assert sample(after, "feather_gc_pause_seconds_sum", generation="2") > 0
        timer = gw.server.metrics._gc_pauses if gw.server.metrics else None
        assert timer is not None and timer in gc.callbacks
    assert timer not in gc.callbacks, "a stopped server's metrics no longer time this process's collections"


async def test_a_stall_between_two_scrapes_shows_in_the_loop_lateness_histogram() -> None:
    """The lag gauge is only the last sample; the histogram keeps every one, so a stall that ended before
    the scrape is still seen."""
    async with running_server(MOCK_CONFIG, options=METRICS) as gw:
        port = gw.server.metrics_port
        assert port

        def late(m: dict[tuple[str, frozenset[tuple[str, str]]], float]) -> float:  # samples over 100 ms
            all_ = sample(m, "feather_event_loop_lateness_seconds_bucket", le="+Inf")
            return all_ - sample(m, "feather_event_loop_lateness_seconds_bucket", le="0.1")

        await eventually(lambda: sample(scrape(port), "feather_event_loop_lateness_seconds_count") >= 2)
        before = late(scrape(port))
        time.sleep(0.3)  # noqa: ASYNC251 (blocking on purpose: the stall under test)
        await eventually(lambda: late(scrape(port)) == before + 1, what="the stalled sample")
        await eventually(lambda: sample(scrape(port), "feather_event_loop_lag_seconds") < 0.1, what="a later sample")
        assert late(scrape(port)) == before + 1, "the gauge has moved on; the histogram kept the stall"


async def test_a_busy_loop_before_the_metrics_hear_of_a_call_is_not_in_its_duration() -> None:
    """Metrics hear of a call on the loop's next turn, after its reply (AfterReply). Under load that turn can
    come tens of milliseconds later: the call's duration and the gateway's overhead still end when it
    settled."""
    metrics = GatewayMetrics()
    call = ServerCall("Chat", time.perf_counter())
    record = UsageRecord(request_id="r-1", time_ns=1, provider="openai", model="gpt-sim")
    token = current_call.set(call)  # what the deferred observer's copy of the context carries
    AfterReply(metrics).call_settled(record, [], None)
    time.sleep(0.3)  # noqa: ASYNC251 (blocking on purpose: the rest of a long loop turn)
    await asyncio.sleep(0)  # the metrics' turn runs before this task's next one
    current_call.reset(token)
    pm = {"provider": "openai", "model": "gpt-sim"}
    get = metrics.registry.get_sample_value
    assert get("feather_request_duration_seconds_count", pm) == 1
    assert (get("feather_request_duration_seconds_sum", pm) or 0) < 0.3
    assert get("feather_gateway_overhead_seconds_count", {"call": "unary"}) == 1
    assert (get("feather_gateway_overhead_seconds_sum", {"call": "unary"}) or 0) < 0.3


async def test_every_start_probe_is_kept_in_the_new_call_wait_histogram() -> None:
    """The new-call delay gauge is only the last probe's round trip; the histogram keeps every one."""
    async with running_server(MOCK_CONFIG, options=METRICS) as gw:
        port = gw.server.metrics_port
        assert port
        count = "feather_new_call_wait_seconds_count"
        await eventually(lambda: sample(scrape(port), count) >= 2, timeout_s=10, what="two probes")
        m = scrape(port)
        assert sample(m, "feather_new_call_wait_seconds_sum") > 0
        # An idle process answers its probes at once: every wait in the histogram is under a second.
        assert sample(m, "feather_new_call_wait_seconds_bucket", le="1.0") == sample(m, count)
