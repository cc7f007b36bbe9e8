"""Tracing: with OTEL_* pointing at a local OTLP collector, each RPC and each upstream attempt becomes a span
with the GenAI attributes; with no OTEL_* set, opentelemetry is not even imported."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from feather_grpc.config import ConfigError
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.server.app import ServerOptions
from feather_grpc.server.tracing import Tracing, tracing_requested
from sim.upstream import Reply, SimUsage, UpstreamSimulator
from tests.gateway_harness import user
from tests.ops_harness import REPO, running_server

ENV = {"SIM_OPENAI_KEY": "sk-sim-tracing-key"}


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """A minimal OTLP/gRPC trace receiver."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []

    def Export(self, request: Any, context: Any) -> Any:
        self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict[str, Any], Any]]:
        """(resource attributes, span) for every span received."""
        out = []
        for req in self.requests:
            for rs in req.resource_spans:
                resource = {a.key: _value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    out += [(resource, span) for span in ss.spans]
        return out


def _value(v: Any) -> Any:
    return getattr(v, v.WhichOneof("value")) if v.WhichOneof("value") else None


def attrs(span: Any) -> dict[str, Any]:
    return {a.key: _value(a.value) for a in span.attributes}


@pytest.fixture
def collector() -> Iterator[tuple[Collector, int]]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    receiver = Collector()
    # opentelemetry-proto ships no types for its generated gRPC module: this is its one call here.
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield receiver, port
    finally:
        server.stop(0)


async def test_rpc_and_attempt_spans_reach_an_otlp_collector(
    collector: tuple[Collector, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    receiver, port = collector
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "feather-under-test")
    options = ServerOptions.from_env(os.environ)
    assert options.tracing
    async with UpstreamSimulator() as sim:
        doc = {
            "ledger": {"type": "memory"},
            "retry": {"maxAttempts": 2, "baseMs": 1, "maxMs": 2},
            "providers": {
                "openai": {
                    "type": "openai",
                    "apiKeyEnv": "SIM_OPENAI_KEY",
                    "baseUrl": sim.url + "/v1",
                    "models": [{"name": "gpt-sim", "aliases": ["fast"], "inputPer1K": 0.03, "outputPer1K": 0.06}],
                }
            },
        }
        sim.enqueue(Reply(status=503), Reply(usage=SimUsage(21, 9)))
        async with running_server(doc, ENV, options) as gw:
            reply = await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")], request_id="trace-me-1"))
            events = [e async for e in gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("go")]))]
            assert reply.usage.input_tokens == 21
            # The process's start probes, a StreamChat and a Chat, answered OK (else these raise) and untraced.
            probe = gw.server.start_probes.probe(gw.channel, 5.0)
            await probe()
            await probe()
        # Leaving the block stopped the server, which flushed every span to the collector.
    spans = receiver.spans()
    assert spans, "no spans exported"
    assert {r["service.name"] for r, _ in spans} == {"feather-under-test"}
    by_name: dict[str, list[Any]] = {}
    for _, s in spans:
        by_name.setdefault(s.name, []).append(s)
    (chat_rpc,) = by_name["/feather.v1.FeatherService/Chat"]
    (stream_rpc,) = by_name["/feather.v1.FeatherService/StreamChat"]
    assert not any("Health" in name for name in by_name)
    assert attrs(chat_rpc)["feather.request_id"] == "trace-me-1"
    attempts = sorted(by_name["chat gpt-sim"], key=lambda s: s.start_time_unix_nano)
    assert len(attempts) == 3  # a 503, the retry that answered, the stream
    failed, answered, streamed = attempts
    for span in (failed, answered):
        assert span.trace_id == chat_rpc.trace_id and span.parent_span_id == chat_rpc.span_id
    assert streamed.trace_id == stream_rpc.trace_id and streamed.parent_span_id == stream_rpc.span_id
    for span in attempts:
        a = attrs(span)
        assert a["gen_ai.system"] == "openai" and a["gen_ai.request.model"] == "gpt-sim"
        assert a["gen_ai.operation.name"] == "chat"
        assert span.kind == span.SPAN_KIND_CLIENT
    assert attrs(failed)["error.type"] == "UPSTREAM_SERVER_ERROR"
    assert failed.status.code == failed.status.STATUS_CODE_ERROR
    ok = attrs(answered)
    assert "error.type" not in ok
    assert (ok["gen_ai.usage.input_tokens"], ok["gen_ai.usage.output_tokens"]) == (21, 9)
    end = events[-1].end
    assert attrs(streamed)["gen_ai.usage.output_tokens"] == end.usage.output_tokens
    assert attrs(streamed)["feather.streamed"] is True


def test_tracing_is_off_without_otel_variables_and_imports_nothing() -> None:
    assert not tracing_requested({})
    assert not tracing_requested({"OTEL_SERVICE_NAME": "x"})
    assert not tracing_requested({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317"})
    assert not tracing_requested({"OTEL_SDK_DISABLED": "true", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317"})
    assert tracing_requested({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:4318/v1/traces"})
    assert tracing_requested({"OTEL_TRACES_EXPORTER": "console"})
    script = textwrap.dedent(
        """
        import asyncio, sys
        from feather_grpc import config
        from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb, feather_service_pb2_grpc as pb_grpc
        from feather_grpc.server.app import GatewayServer, ServerOptions
        import grpc

        async def main():
            cfg = config.resolve(config.parse_file_config(
                '{"ledger": {"type": "memory"}, "providers": {"mock": {"type": "mock", "models": '
                '[{"name": "m", "aliases": ["fast"], "inputPer1M": 1, "outputPer1M": 1}]}}}', "t"), {}, "t")
            server = GatewayServer(cfg, options=ServerOptions.from_env({}))
            port = await server.start("127.0.0.1", 0)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                stub = pb_grpc.FeatherServiceStub(ch)
                await stub.Chat(pb.ChatRequest(model="fast", messages=[pb.Message(role=pb.ROLE_USER, content="x")]))
            await server.stop(0)
            print(sorted(m for m in sys.modules if m.startswith("opentelemetry")))

        asyncio.run(main())
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    run = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]"


def test_unknown_exporter_or_protocol_is_a_configuration_error() -> None:
    with pytest.raises(ConfigError, match="OTEL_TRACES_EXPORTER"):
        Tracing({"OTEL_TRACES_EXPORTER": "zipkin"}, {})
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL"):
        Tracing({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "carrier-pigeon"}, {})


@pytest.mark.parametrize("protocol", ["grpc", "http/protobuf"])
def test_shutdown_is_bounded_when_the_collector_is_unreachable(protocol: str) -> None:
    """With spans buffered for a collector nobody listens to, the SDK's own shutdown waits 30 s (the exporter
    retrying): past a container's stop timeout. The gateway gives the flush a few seconds, then stops."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}" + ("" if protocol == "grpc" else "/v1/traces")
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": protocol}
    env["OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"] = endpoint
    tracing = Tracing(env, {})
    with tracing.provider.get_tracer("t").start_as_current_span("buffered"):
        pass
    started = time.monotonic()
    tracing.shutdown(timeout_s=1.0)
    assert time.monotonic() - started < 5  # the SDK alone: ~30 s


def _otel_env(monkeypatch: pytest.MonkeyPatch, port: int) -> ServerOptions:
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    return ServerOptions.from_env(os.environ)


def _provider(url: str, model: str, alias: str = "fast", **extra: Any) -> dict[str, Any]:
    return {
        "type": "openai",
        "apiKeyEnv": "SIM_OPENAI_KEY",
        "baseUrl": url + "/v1",
        "models": [{"name": model, "aliases": [alias], "inputPer1K": 0.03, "outputPer1K": 0.06}],
        **extra,
    }


async def test_the_rpc_span_carries_the_status_code_the_caller_received(
    collector: tuple[Collector, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gateway ends failed calls with abort_with_status, which the instrumentation does not see: the span
    still carries the code, and is ERROR only for server-side failures (the gRPC semantic conventions)."""
    receiver, port = collector
    options = _otel_env(monkeypatch, port)
    async with UpstreamSimulator() as sim:
        doc = {
            "ledger": {"type": "memory"},
            "retry": {"maxAttempts": 2, "baseMs": 1, "maxMs": 2},
            "rateLimitMode": "reject",
            "limits": {"limited:gpt-limited": {"rps": 0.001, "burst": 1}},
            "providers": {
                "openai": _provider(sim.url, "gpt-sim"),
                "limited": _provider(sim.url, "gpt-limited", "slow"),
            },
        }
        calls: list[tuple[str, grpc.StatusCode]] = []
        async with running_server(doc, ENV, options) as gw:

            async def chat(request_id: str, model: str, text: str = "hi") -> None:
                try:
                    await gw.stub.Chat(pb.ChatRequest(model=model, messages=[user(text)], request_id=request_id))
                    code = grpc.StatusCode.OK
                except grpc.aio.AioRpcError as e:
                    code = e.code()
                calls.append((request_id, code))

            await chat("ok-1", "fast")
            sim.enqueue(Reply(status=503), Reply(status=503), model="gpt-sim")  # both attempts fail
            await chat("unavailable-1", "fast")
            await chat("invalid-1", "fast", text="")
            await chat("limited-ok", "slow")
            await chat("limited-1", "slow")
            sim.enqueue(Reply(status=503), Reply(status=503), model="gpt-sim")
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                async for _ in gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("go")])):
                    pass
            assert streamed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert calls == [
            ("ok-1", grpc.StatusCode.OK),
            ("unavailable-1", grpc.StatusCode.UNAVAILABLE),
            ("invalid-1", grpc.StatusCode.INVALID_ARGUMENT),
            ("limited-ok", grpc.StatusCode.OK),
            ("limited-1", grpc.StatusCode.RESOURCE_EXHAUSTED),
        ]
    rpcs = [s for _, s in receiver.spans() if s.kind == s.SPAN_KIND_SERVER]
    by_id = {attrs(s).get("feather.request_id"): s for s in rpcs if s.name.endswith("/Chat")}
    unset, error = rpcs[0].status.STATUS_CODE_UNSET, rpcs[0].status.STATUS_CODE_ERROR
    expected = {
        "ok-1": (0, unset),
        "unavailable-1": (14, error),
        "invalid-1": (3, unset),
        "limited-ok": (0, unset),
        "limited-1": (8, unset),
    }
    for request_id, (code, status) in expected.items():
        span = by_id[request_id]
        assert (request_id, attrs(span)["rpc.grpc.status_code"], span.status.code) == (request_id, code, status)
        assert ("error.type" in attrs(span)) == (status == error), request_id
    assert attrs(by_id["unavailable-1"])["error.type"] == "UNAVAILABLE"
    assert attrs(by_id["unavailable-1"])["feather.error_reason"] == "UPSTREAM_UNAVAILABLE"
    assert attrs(by_id["invalid-1"])["feather.error_reason"] == "INVALID_REQUEST"
    (stream,) = [s for s in rpcs if s.name.endswith("/StreamChat")]
    assert (attrs(stream)["rpc.grpc.status_code"], stream.status.code) == (14, error)


def _traceparent(header: str) -> tuple[str, str, str]:
    version, trace_id, span_id, flags = header.split("-")
    assert (version, len(trace_id), len(span_id)) == ("00", 32, 16)
    return trace_id, span_id, flags


async def test_every_upstream_attempt_carries_its_own_span_as_trace_context(
    collector: tuple[Collector, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retries and both legs of a hedged call: each request the upstream received names the caller's trace and
    the attempt's own CLIENT span, with the caller's tracestate; a provider may opt out."""
    receiver, port = collector
    options = _otel_env(monkeypatch, port)
    caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    metadata = (("traceparent", f"00-{caller_trace}-00f067aa0ba902b7-01"), ("tracestate", "acme=t61rcWkgMzE"))
    async with UpstreamSimulator() as sim, UpstreamSimulator() as private:
        doc = {
            "ledger": {"type": "memory"},
            "retry": {"maxAttempts": 3, "baseMs": 1, "maxMs": 2},
            "routes": {"hedged": {"hedgeAfterMs": 30}},
            "providers": {
                "openai": {
                    **_provider(sim.url, "gpt-sim"),
                    "models": [
                        {"name": "gpt-sim", "aliases": ["fast"], "inputPer1K": 0.03, "outputPer1K": 0.06},
                        {"name": "gpt-slow", "aliases": ["hedged"], "inputPer1K": 0.03, "outputPer1K": 0.06},
                        {"name": "gpt-quick", "aliases": ["hedged"], "inputPer1K": 0.03, "outputPer1K": 0.06},
                    ],
                },
                "private": _provider(private.url, "gpt-private", "private", propagateTraceContext=False),
            },
        }
        sim.enqueue(Reply(status=503), Reply(status=500), model="gpt-sim")  # two retries, then the default reply
        sim.enqueue(Reply(latency_s=30), model="gpt-slow")  # the hedge's first leg never answers in time
        async with running_server(doc, ENV, options) as gw:
            await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")]), metadata=metadata)
            sim.enqueue(Reply(status=503), model="gpt-sim")  # the stream: one retry
            events = gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("go")]), metadata=metadata)
            assert [e async for e in events][-1].HasField("end")
            hedged = await gw.stub.Chat(pb.ChatRequest(model="hedged", messages=[user("hi")]), metadata=metadata)
            assert hedged.model == "gpt-quick"
            await gw.stub.Chat(pb.ChatRequest(model="private", messages=[user("hi")]), metadata=metadata)
        received = [r.headers for r in sim.requests]
        assert [r.model for r in sim.requests] == ["gpt-sim"] * 5 + ["gpt-slow", "gpt-quick"]
        (to_private,) = private.requests
        assert "traceparent" not in to_private.headers and "tracestate" not in to_private.headers
    attempts = {s.span_id.hex(): s for _, s in receiver.spans() if s.kind == s.SPAN_KIND_CLIENT}
    rpcs = {s.span_id: s for _, s in receiver.spans() if s.kind == s.SPAN_KIND_SERVER}
    seen: set[str] = set()
    for headers in received:
        trace_id, span_id, flags = _traceparent(headers["traceparent"])
        assert (trace_id, flags) == (caller_trace, "01")
        assert headers["tracestate"] == "acme=t61rcWkgMzE"
        span = attempts[span_id]  # the attempt's own CLIENT span, exported
        assert span.trace_id.hex() == caller_trace and span.parent_span_id in rpcs
        seen.add(span_id)
    assert len(seen) == len(received) == 7  # one span per attempt, none shared
    outcomes = sorted(attrs(attempts[s])["feather.attempt.outcome"] for s in seen)
    assert outcomes == ["cancelled", "ok", "ok", "ok", "retryable_error", "retryable_error", "retryable_error"]


async def test_without_tracing_no_request_carries_trace_context() -> None:
    """A caller's traceparent is not passed through by a gateway that does not trace."""
    assert not ServerOptions.from_env({}).tracing
    metadata = (("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),)
    async with UpstreamSimulator() as sim:
        doc = {"ledger": {"type": "memory"}, "providers": {"openai": _provider(sim.url, "gpt-sim")}}
        async with running_server(doc, ENV, ServerOptions.from_env({})) as gw:
            await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")]), metadata=metadata)
        (request,) = sim.requests
        assert "traceparent" not in request.headers and "tracestate" not in request.headers
