"""The Python client (clients/python) against real in-process gateways and a scripted FeatherService."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import importlib.metadata
import inspect
import re
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import grpc
import pytest
from feather_client import (
    TLS,
    ChatOptions,
    FeatherClient,
    FeatherError,
    FieldViolation,
    RetryPolicy,
    SyncFeatherClient,
    UsageOptions,
    format_usd,
    pb,
    system,
    user,
)
from feather_client.channel import service_config, target
from feather_client.gen.feather.v1 import feather_service_pb2_grpc as client_pb_grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.json_format import MessageToDict
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from feather_grpc.gen.feather.v1 import feather_service_pb2 as server_pb
from tests.gateway_harness import MOCK_CONFIG, running_gateway


async def test_chat_returns_text_route_usage_and_cost() -> None:
    async with running_gateway(MOCK_CONFIG) as gw, FeatherClient(gw.address) as client:
        reply = await client.chat(
            [system("Be brief."), user("Say hello")], model="fast", tags={"team": "docs"}, request_id="req-1"
        )
    assert reply.text == "Feather mock reply to: Say hello"
    assert (reply.provider, reply.model, reply.finish_reason) == ("mock", "mock-fast", "stop")
    assert reply.request_id == "req-1"
    assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0
    # mock-fast: $0.001 / $0.002 per 1K tokens = 1000 / 2000 nano-USD per token
    assert reply.cost_nanos_usd == reply.usage.input_tokens * 1000 + reply.usage.output_tokens * 2000
    assert reply.cost_usd == Decimal(reply.cost_nanos_usd) / 10**9
    assert [a.provider for a in reply.attempts] == ["mock"]


async def test_chat_generates_one_request_id_per_call() -> None:
    async with running_gateway(MOCK_CONFIG) as gw, FeatherClient(gw.address) as client:
        first = await client.chat("a", model="fast")
        second = await client.chat("b", model="fast")
    assert len(first.request_id) == 32 and first.request_id != second.request_id
    # UUIDv7s, as the gateway makes them: the time first, so the ledger's index takes them at its end
    assert [uuid.UUID(hex=i).version for i in (first.request_id, second.request_id)] == [7, 7]
    assert int(first.request_id[:12], 16) <= int(second.request_id[:12], 16) <= time.time_ns() // 1_000_000


async def test_stream_chat_yields_deltas_then_exposes_the_summary() -> None:
    async with running_gateway(MOCK_CONFIG) as gw, FeatherClient(gw.address) as client:
        stream = client.stream_chat("Stream a short answer", model="smart")
        with pytest.raises(RuntimeError, match="not ended"):
            _ = stream.usage
        pieces = [piece async for piece in stream]
    assert len(pieces) > 1
    assert "".join(pieces) == stream.text == stream.result.text == "Feather mock reply to: Stream a short answer"
    assert (stream.provider, stream.model, stream.finish_reason) == ("mock", "mock-smart", "stop")
    assert stream.done and stream.usage.output_tokens > 0
    # mock-smart: $2.50 / $10 per 1M tokens = 2500 / 10000 nano-USD per token
    assert stream.cost_nanos_usd == stream.usage.input_tokens * 2500 + stream.usage.output_tokens * 10_000
    assert stream.latency >= timedelta(0) and len(stream.request_id) == 32


async def test_stream_can_be_stopped_early() -> None:
    async with running_gateway(MOCK_CONFIG) as gw, FeatherClient(gw.address) as client:
        async with client.stream_chat("one two three four five", model="fast") as stream:
            async for _ in stream:
                break
        assert not stream.done
        assert (await client.chat("still fine", model="fast")).finish_reason == "stop"


async def test_usage_groups_the_ledger_and_list_models_describes_the_routes() -> None:
    async with running_gateway(MOCK_CONFIG) as gw, FeatherClient(gw.address) as client:
        fast = await client.chat("one", model="fast")
        smart = await client.chat("two", model="smart")
        report = await client.usage(group_by=["model"])
        models = await client.list_models()
        only_fast = await client.usage(model="mock-fast")
    rows = {r.model: r for r in report.rows}
    assert set(rows) == {"mock-fast", "mock-smart"}
    assert rows["mock-fast"].cost_nanos_usd == fast.cost_nanos_usd
    assert report.total.cost_nanos_usd == fast.cost_nanos_usd + smart.cost_nanos_usd
    assert report.total.request_count == 2 and only_fast.total.request_count == 1
    assert [(m.name, list(m.aliases)) for m in models] == [("mock-fast", ["fast"]), ("mock-smart", ["smart"])]
    assert models[0].price.input_nanos_usd_per_million == 1_000_000_000
    assert models[0].circuit_state == pb.CIRCUIT_STATE_CLOSED


async def test_usage_rejects_unknown_groupings_before_calling() -> None:
    client = FeatherClient("127.0.0.1:1")
    with pytest.raises(ValueError, match="group_by"):
        await client.usage(group_by=["color"])
    with pytest.raises(ValueError, match="tag_key"):
        await client.usage(group_by=["tag"])


async def test_invalid_argument_carries_reason_and_field_violations() -> None:
    async with running_gateway(MOCK_CONFIG) as gw, FeatherClient(gw.address) as client:
        with pytest.raises(FeatherError) as caught:
            await client.chat([pb.Message(role=pb.ROLE_USER)], model="fast", temperature=7, request_id="bad-1")
    err = caught.value
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert (err.reason, err.domain, err.request_id) == ("INVALID_REQUEST", "feather.v1", "bad-1")
    assert [v.field for v in err.field_violations] == ["messages[0].content", "temperature"]
    assert isinstance(err.field_violations[0], FieldViolation) and err.field_violations[0].description
    assert err.retry_delay is None and err.status is not None
    assert str(err).startswith("INVALID_ARGUMENT INVALID_REQUEST: ")


async def test_not_found_carries_reason_and_metadata_in_chat_and_stream() -> None:
    async with running_gateway(MOCK_CONFIG) as gw, FeatherClient(gw.address) as client:
        with pytest.raises(FeatherError) as unary:
            await client.chat("hi", model="no-such-model")
        with pytest.raises(FeatherError) as streamed:
            async for _ in client.stream_chat("hi", model="no-such-model"):
                pass
    for err in (unary.value, streamed.value):
        assert err.code == grpc.StatusCode.NOT_FOUND
        assert err.reason == "MODEL_NOT_FOUND" and err.metadata["model"] == "no-such-model"


# --- A scripted FeatherService: answers each Chat with the next scripted outcome and records what it saw. ---


class ScriptedService(client_pb_grpc.FeatherServiceServicer):
    def __init__(self, script: list[Callable[[grpc.aio.ServicerContext], Any]] | None = None) -> None:
        self.script = list(script or [])
        self.calls: list[tuple[pb.ChatRequest, dict[str, str], float | None]] = []
        self.stream_events: list[pb.StreamChatResponse] = []
        self.stream_delay = 0.0
        self.stream_sent = 0
        self.stream_cancelled = False

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> pb.ChatResponse:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.calls.append((request, metadata, context.time_remaining()))
        if self.script:
            await self.script.pop(0)(context)
        return pb.ChatResponse(
            message=pb.Message(role=pb.ROLE_ASSISTANT, content="scripted"),
            finish_reason=pb.FINISH_REASON_STOP,
            provider="script",
            model="m",
            request_id=request.request_id,
        )

    async def StreamChat(
        self, request: pb.StreamChatRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamChatResponse]:
        try:
            for event in self.stream_events:
                yield event
                self.stream_sent += 1
                await asyncio.sleep(self.stream_delay)
        except asyncio.CancelledError:
            self.stream_cancelled = True
            raise

    # Not scripted: answered as the generated base class answers them (its stub marks them abstract).
    async def Usage(self, request: pb.UsageRequest, context: grpc.aio.ServicerContext) -> pb.UsageResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        raise AssertionError("abort always raises")

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        raise AssertionError("abort always raises")


def fail(code: grpc.StatusCode, reason: str, *details: Any) -> Callable[[grpc.aio.ServicerContext], Any]:
    async def abort(context: grpc.aio.ServicerContext) -> None:
        packed = []
        for detail in (error_details_pb2.ErrorInfo(reason=reason, domain="feather.v1"), *details):
            any_detail = any_pb2.Any()
            any_detail.Pack(detail)
            packed.append(any_detail)
        status = status_pb2.Status(code=getattr(code_pb2, code.name), message=reason.lower(), details=packed)
        await context.abort_with_status(rpc_status.to_status(status))

    return abort


@asynccontextmanager
async def scripted_server(service: ScriptedService) -> AsyncIterator[str]:
    server = grpc.aio.server()
    client_pb_grpc.add_FeatherServiceServicer_to_server(service, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(0)


async def test_unavailable_is_retried_by_the_service_config_with_the_same_request_id() -> None:
    service = ScriptedService([fail(grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")])
    async with scripted_server(service) as address, FeatherClient(address) as client:
        reply = await client.chat("hi", model="m")
    assert reply.text == "scripted"
    assert len(service.calls) == 2
    assert service.calls[0][0].request_id == service.calls[1][0].request_id == reply.request_id


async def test_retries_give_up_after_max_attempts_and_can_be_disabled() -> None:
    unavailable = fail(grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")
    service = ScriptedService([unavailable] * 5)
    fast_retry = RetryPolicy(max_attempts=2, initial_backoff=timedelta(milliseconds=10))
    async with scripted_server(service) as address:
        async with FeatherClient(address, retry=fast_retry) as client:
            with pytest.raises(FeatherError) as caught:
                await client.chat("hi", model="m")
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE and len(service.calls) == 2
        async with FeatherClient(address, retry=None) as client:
            with pytest.raises(FeatherError):
                await client.chat("hi", model="m")
        assert len(service.calls) == 3


async def test_other_codes_are_not_retried_and_carry_retry_info_and_quota_failures() -> None:
    retry_info = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=1, nanos=500_000_000))
    quota = error_details_pb2.QuotaFailure(
        violations=[error_details_pb2.QuotaFailure.Violation(subject="tenant:default", description="10 rps")]
    )
    service = ScriptedService([fail(grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED", retry_info, quota)])
    async with scripted_server(service) as address, FeatherClient(address) as client:
        with pytest.raises(FeatherError) as caught:
            await client.chat("hi", model="m")
    err = caught.value
    assert len(service.calls) == 1
    assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert err.retry_delay == timedelta(seconds=1.5)
    assert [(q.subject, q.description) for q in err.quota_violations] == [("tenant:default", "10 rps")]


async def test_the_callers_channel_options_replace_the_clients_own() -> None:
    service = ScriptedService([fail(grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")])
    async with scripted_server(service) as address:
        async with FeatherClient(address, channel_options=[("grpc.enable_retries", 0)]) as client:
            with pytest.raises(FeatherError) as unavailable:
                await client.chat("hi", model="m")
        assert unavailable.value.code == grpc.StatusCode.UNAVAILABLE and len(service.calls) == 1
        async with FeatherClient(address, channel_options=[("grpc.max_receive_message_length", 10)]) as client:
            with pytest.raises(FeatherError) as too_big:
                await client.chat("hi", model="m")
        assert too_big.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    options = FeatherClient(
        "127.0.0.1:1",
        channel_options=[
            ("grpc.max_receive_message_length", 10),
            ("x.custom", 1),
            ("grpc.max_receive_message_length", 20),
        ],
    ).settings.options
    assert [v for k, v in options if k == "grpc.max_receive_message_length"] == [20]
    assert ("x.custom", 1) in options and [k for k, _ in options].count("grpc.enable_retries") == 1


def test_tls_client_certificate_and_key_go_together() -> None:
    with pytest.raises(ValueError, match="certificate_chain and private_key"):
        TLS(certificate_chain=b"-----BEGIN CERTIFICATE-----")
    with pytest.raises(ValueError, match="certificate_chain and private_key"):
        TLS(root_certificates=b"ca", private_key=b"-----BEGIN PRIVATE KEY-----")
    assert TLS(certificate_chain=b"chain", private_key=b"key").private_key == b"key"


async def test_api_key_metadata_and_deadline_reach_the_server() -> None:
    service = ScriptedService()
    async with (
        scripted_server(service) as address,
        FeatherClient(address, api_key="fk_secret", timeout=timedelta(seconds=30)) as client,
    ):
        await client.chat("hi", model="m", metadata=[("x-trace", "t1")])
        await client.chat("hi", model="m", timeout=5)
    (_, metadata, remaining), (_, _, shorter) = service.calls
    assert metadata["authorization"] == "Bearer fk_secret" and metadata["x-trace"] == "t1"
    assert remaining is not None and 25 < remaining < 31
    assert shorter is not None and shorter < 6


def test_chat_stream_chat_and_usage_of_both_clients_take_one_options_object_as_keywords() -> None:
    """One options object per call: the methods' keyword arguments are ChatOptions' (UsageOptions') fields (what
    help() shows), an unknown keyword or a missing model is a TypeError, and async methods stay coroutine functions."""
    fields = [f.name for f in dataclasses.fields(ChatOptions)]
    assert fields[0] == "model" and {"temperature", "tags", "request_id", "timeout", "metadata"} <= set(fields)
    methods: list[Callable[..., object]] = [
        FeatherClient.chat,
        FeatherClient.stream_chat,
        SyncFeatherClient.chat,
        SyncFeatherClient.stream_chat,
    ]
    for method in methods:
        params = list(inspect.signature(method).parameters.values())
        assert [p.name for p in params[:2]] == ["self", "messages"]
        assert [p.name for p in params[2:]] == fields
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[2:])
    usage_fields = [f.name for f in dataclasses.fields(UsageOptions)]
    usage_methods: list[Callable[..., object]] = [FeatherClient.usage, SyncFeatherClient.usage]
    for method in usage_methods:
        params = list(inspect.signature(method).parameters.values())
        assert [p.name for p in params] == ["self", *usage_fields]
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params[1:])
    assert inspect.iscoroutinefunction(FeatherClient.chat) and inspect.iscoroutinefunction(FeatherClient.usage)
    assert not inspect.iscoroutinefunction(FeatherClient.stream_chat)
    with SyncFeatherClient("localhost:1") as client:
        with pytest.raises(TypeError, match="modle"):
            client.chat("hi", modle="fast")  # type: ignore[call-arg]
        with pytest.raises(TypeError, match="model"):
            client.stream_chat("hi")  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="policy must be one of"):
            client.chat("hi", model="fast", policy="fastest-ever")
        with pytest.raises(TypeError, match="group"):
            client.usage(group="tenant")  # type: ignore[call-arg]
        with pytest.raises(ValueError, match="group_by must be among"):
            client.usage(group_by=["week"])


async def test_a_stream_that_closes_without_end_is_an_error() -> None:
    service = ScriptedService()
    service.stream_events = [
        pb.StreamChatResponse(start=pb.StreamStart(provider="p", model="m")),
        pb.StreamChatResponse(delta=pb.ChatDelta(content="half")),
    ]
    async with scripted_server(service) as address, FeatherClient(address) as client:
        stream = client.stream_chat("hi", model="m")
        with pytest.raises(FeatherError, match="without its end"):
            async for _ in stream:
                pass
    assert stream.text == "half" and stream.provider == "p" and not stream.done


def _slow_stream(service: ScriptedService, deltas: int = 100) -> None:
    service.stream_delay = 0.02
    service.stream_sent = 0
    service.stream_cancelled = False
    service.stream_events = [
        pb.StreamChatResponse(start=pb.StreamStart(provider="p", model="m")),
        *(pb.StreamChatResponse(delta=pb.ChatDelta(content=f"w{i} ")) for i in range(deltas)),
        pb.StreamChatResponse(end=pb.StreamEnd(finish_reason=pb.FINISH_REASON_STOP)),
    ]


async def _until(condition: Callable[[], bool], seconds: float = 1.5) -> bool:
    for _ in range(int(seconds / 0.05)):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def test_breaking_out_of_an_async_stream_cancels_the_call_while_the_client_stays_open() -> None:
    service = ScriptedService()
    async with scripted_server(service) as address, FeatherClient(address) as client:
        _slow_stream(service)
        async for _ in client.stream_chat("hi", model="m"):
            break
        assert await _until(lambda: service.stream_cancelled), f"still streaming: {service.stream_sent} sent"
        assert service.stream_sent < 50

        _slow_stream(service)  # the caller keeps the stream to read what arrived
        stream = client.stream_chat("hi", model="m")
        async for _ in stream:
            break
        assert await _until(lambda: service.stream_cancelled), f"still streaming: {service.stream_sent} sent"
        assert stream.text == "w0 " and not stream.done

        _slow_stream(service, deltas=3)  # a stream read to its end is not cancelled
        assert [t async for t in client.stream_chat("hi", model="m")] == ["w0 ", "w1 ", "w2 "]
        assert service.stream_sent == 5 and not service.stream_cancelled


async def test_a_closed_client_raises_feather_error_and_does_not_reopen() -> None:
    service = ScriptedService()
    async with scripted_server(service) as address:
        client = FeatherClient(address)
        await client.chat("hi", model="m")
        await client.close()
        for call in (
            lambda: client.chat("hi", model="m"),
            lambda: client.list_models(),
            lambda: client.stream_chat("hi", model="m").__anext__(),
        ):
            with pytest.raises(FeatherError, match="client is closed") as caught:
                await call()
            assert caught.value.code == grpc.StatusCode.CANCELLED
        with pytest.raises(FeatherError, match="client is closed"):
            _ = client.stub
        assert len(service.calls) == 1

        never_used = FeatherClient(address)
        await never_used.close()
        with pytest.raises(FeatherError, match="client is closed"):
            await never_used.chat("hi", model="m")

        def sync_calls() -> list[FeatherError]:
            sync = SyncFeatherClient(address)
            sync.close()
            errors = []
            for call in (lambda: sync.chat("hi", model="m"), lambda: sync.stream_chat("hi", model="m")):
                try:
                    call()
                except FeatherError as e:
                    errors.append(e)
            return errors

        errors = await asyncio.to_thread(sync_calls)
    assert [(e.code, e.message) for e in errors] == [(grpc.StatusCode.CANCELLED, "the client is closed")] * 2
    assert len(service.calls) == 1


async def test_stream_assembles_tool_call_fragments() -> None:
    service = ScriptedService()
    service.stream_events = [
        pb.StreamChatResponse(start=pb.StreamStart(provider="p", model="m")),
        pb.StreamChatResponse(delta=pb.ChatDelta(tool_calls=[pb.ToolCallDelta(index=0, id="c1", name="get")])),
        pb.StreamChatResponse(delta=pb.ChatDelta(tool_calls=[pb.ToolCallDelta(index=0, arguments='{"a"')])),
        pb.StreamChatResponse(delta=pb.ChatDelta(tool_calls=[pb.ToolCallDelta(index=0, arguments=": 1}")])),
        pb.StreamChatResponse(end=pb.StreamEnd(finish_reason=pb.FINISH_REASON_TOOL_CALLS, cost_nanos_usd=7)),
    ]
    async with scripted_server(service) as address, FeatherClient(address) as client:
        stream = client.stream_chat("hi", model="m")
        assert [t async for t in stream] == []
    assert stream.finish_reason == "tool_calls" and stream.cost_nanos_usd == 7
    assert [(c.id, c.name, c.arguments) for c in stream.result.tool_calls] == [("c1", "get", '{"a": 1}')]


# --- OpenAI-style messages and tools. ---


async def test_openai_style_messages_with_lowercase_roles_reach_a_real_gateway() -> None:
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hello"}]
    async with running_gateway(MOCK_CONFIG) as gw, FeatherClient(gw.address) as client:
        reply = await client.chat(conversation, model="fast")
        stream = client.stream_chat(conversation, model="fast")
        streamed = "".join([t async for t in stream])

        def sync_call() -> str:
            with SyncFeatherClient(gw.address) as sync_client:
                return sync_client.chat([{"role": "user", "content": "sync"}], model="fast").text

        synced = await asyncio.to_thread(sync_call)
    assert reply.text == streamed == "Feather mock reply to: Say hello"
    assert synced == "Feather mock reply to: sync"


async def test_openai_style_tool_calls_tool_results_and_tools_are_sent_as_the_proto_says() -> None:
    conversation: list[dict[str, Any]] = [
        {"role": "developer", "content": "Use the tools."},
        {"role": "user", "content": "Weather in Paris?", "name": "ann"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
                {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": {"tz": "CET"}}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "TOOL", "tool_call_id": "call_2", "content": "12:00"},
    ]
    schema = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "weather", "description": "Weather now", "parameters": schema}}]
    service = ScriptedService()
    async with scripted_server(service) as address, FeatherClient(address) as client:
        await client.chat(conversation, model="m", tools=tools, tool_choice="required")
        await client.chat("again", model="m", tool_choice={"type": "function", "function": {"name": "weather"}})
        with pytest.raises(ValueError, match="tool_choice: 'sometimes' is not one of auto, none, required"):
            await client.chat("no", model="m", tool_choice="sometimes")
    (request, _, _), (named, _, _) = service.calls
    assert request.tool_choice.mode == pb.TOOL_CHOICE_MODE_REQUIRED
    assert named.tool_choice.function_name == "weather"
    assert [m.role for m in request.messages] == [
        pb.ROLE_SYSTEM,
        pb.ROLE_USER,
        pb.ROLE_ASSISTANT,
        pb.ROLE_TOOL,
        pb.ROLE_TOOL,
    ]
    assert request.messages[1].name == "ann" and request.messages[2].content == ""
    calls = [(c.id, c.name, c.arguments) for c in request.messages[2].tool_calls]
    assert calls == [("call_1", "weather", '{"city":"Paris"}'), ("call_2", "time", '{"tz":"CET"}')]
    assert [(m.tool_call_id, m.content) for m in request.messages[3:]] == [("call_1", "18C"), ("call_2", "12:00")]
    (sent_tool,) = request.tools
    assert (sent_tool.name, sent_tool.description) == ("weather", "Weather now")
    assert MessageToDict(sent_tool.parameters) == schema


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([{"role": "usr", "content": "hi"}], "messages[0].role: 'usr' is not one of system, developer, user"),
        ([{"content": "hi"}], "messages[0].role: None is not one of"),
        ([{"role": "user", "content": 7}], "messages[0].content: must be a string or a list of parts, got int"),
        ([{"role": "user", "content": [{"type": "txt", "text": "hi"}]}], "messages[0].content[0].type: 'txt' is"),
        ([{"role": "user", "content": "hi", "contnet": "x"}], "messages[0]: unknown field(s) contnet"),
        ([user("ok"), {"role": "assistant", "tool_calls": ["x"]}], "messages[1].tool_calls[0]: a tool call is a"),
        ([user("ok"), "hi"], "messages[1]: a message is a mapping like"),
    ],
)
async def test_a_malformed_openai_style_message_is_a_value_error_naming_its_field(
    messages: list[Any], expected: str
) -> None:
    async with FeatherClient("127.0.0.1:1") as client:  # refused before any call is made
        with pytest.raises(ValueError, match=re.escape(expected)):
            await client.chat(messages, model="fast")


# --- Several gateways, balanced round robin. ---


async def test_calls_are_balanced_round_robin_across_gateways() -> None:
    async with running_gateway(MOCK_CONFIG) as one, running_gateway(MOCK_CONFIG) as two:
        async with FeatherClient([one.address, two.address]) as client:
            for i in range(20):
                await client.chat(f"call {i}", model="fast")
        counts = [(await gw.stub.Usage(server_pb.UsageRequest())).total.request_count for gw in (one, two)]
    assert sum(counts) == 20
    assert min(counts) >= 5, f"round robin should spread calls, got {counts}"


async def test_a_dead_gateway_in_the_list_is_skipped() -> None:
    with socket.socket() as s:  # a port nothing listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    async with (
        running_gateway(MOCK_CONFIG) as live,
        FeatherClient(f"127.0.0.1:{dead_port},{live.address}") as client,
    ):
        for i in range(6):
            assert (await client.chat(f"call {i}", model="fast")).provider == "mock"


def test_targets_for_one_or_several_gateways() -> None:
    assert target("localhost:50051") == "localhost:50051"
    assert target("dns:///feather.internal:50051") == "dns:///feather.internal:50051"
    assert target(["127.0.0.1:1", "localhost:2"]) == "ipv4:127.0.0.1:1,127.0.0.1:2"
    assert target("127.0.0.1:1, 127.0.0.2:2") == "ipv4:127.0.0.1:1,127.0.0.2:2"
    assert target(["[::1]:1", "[::1]:2"]) == "ipv6:[::1]:1,[::1]:2"
    with pytest.raises(ValueError, match="IP literals"):
        target(["gw-a:50051", "gw-b:50051"])
    with pytest.raises(ValueError, match="all IPv4 or all IPv6"):
        target(["127.0.0.1:1", "[::1]:2"])
    config = service_config(RetryPolicy())
    assert '"round_robin"' in config and '"retryableStatusCodes": ["UNAVAILABLE"]' in config
    assert "retryPolicy" not in service_config(None)
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=9)


def _make_pki(d: Path) -> None:
    """A throwaway CA, a server certificate for localhost / 127.0.0.1 and a client certificate."""

    def openssl(command: str) -> None:
        subprocess.run(["openssl", *command.split()], cwd=d, check=True, capture_output=True, timeout=60)

    openssl("req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=ca -keyout ca.key -out ca.pem")
    for name, san in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"), ("client", "subjectAltName=DNS:client")):
        openssl(f"req -newkey rsa:2048 -nodes -subj /CN={name} -keyout {name}.key -out {name}.csr")
        (d / f"{name}.ext").write_text(san + "\n")
        sign = "-CA ca.pem -CAkey ca.key -CAcreateserial -days 2"
        openssl(f"x509 -req -in {name}.csr {sign} -extfile {name}.ext -out {name}.pem")


async def test_mutual_tls_with_a_private_ca(tmp_path: Path) -> None:
    _make_pki(tmp_path)
    document = copy.deepcopy(MOCK_CONFIG)
    document["server"] = {
        "tls": {
            "certFile": str(tmp_path / "server.pem"),
            "keyFile": str(tmp_path / "server.key"),
            "clientCaFile": str(tmp_path / "ca.pem"),
        }
    }

    def read(name: str) -> bytes:
        return (tmp_path / name).read_bytes()

    mtls = TLS(root_certificates=read("ca.pem"), certificate_chain=read("client.pem"), private_key=read("client.key"))
    async with running_gateway(document) as gw:
        async with FeatherClient(f"localhost:{gw.port}", tls=mtls) as client:
            assert (await client.chat("over mTLS", model="fast")).text == "Feather mock reply to: over mTLS"
        no_client_cert = TLS(root_certificates=read("ca.pem"))
        async with FeatherClient(f"localhost:{gw.port}", tls=no_client_cert, retry=None, timeout=5) as client:
            with pytest.raises(FeatherError) as caught:
                await client.chat("refused", model="fast")
        assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_tls_settings_build_secure_credentials() -> None:
    client = SyncFeatherClient("127.0.0.1:1", tls=TLS(server_name="feather.internal"))
    assert client.settings.credentials is not None
    assert ("grpc.ssl_target_name_override", "feather.internal") in client.settings.options
    client.close()


def test_cost_formatting_is_exact() -> None:
    assert format_usd(0) == "$0.00"
    assert format_usd(1_234) == "$0.000001234"
    assert format_usd(1_500_000_000) == "$1.50"
    assert format_usd(12_345_678_901_234_567) == "$12345678.901234567"


# --- The sync client (run in a worker thread: the in-process gateway lives on this event loop). ---


async def test_sync_client_does_everything_the_async_one_does() -> None:
    def session(address: str) -> tuple[Any, ...]:
        with SyncFeatherClient(address) as client:
            reply = client.chat("Say hello", model="fast")
            stream = client.stream_chat("Stream it", model="smart")
            pieces = list(stream)
            report = client.usage(group_by=["model", "provider"])
            models = client.list_models(provider="mock")
            try:
                client.chat("hi", model="missing")
            except FeatherError as e:
                error = e
            return reply, stream, pieces, report, models, error

    async with running_gateway(MOCK_CONFIG) as gw:
        reply, stream, pieces, report, models, error = await asyncio.to_thread(session, gw.address)
    assert reply.text == "Feather mock reply to: Say hello" and reply.cost_nanos_usd > 0
    assert "".join(pieces) == stream.result.text and stream.usage.output_tokens > 0
    assert stream.model == "mock-smart" and stream.cost_nanos_usd > 0
    assert report.total.request_count == 2 and {r.provider for r in report.rows} == {"mock"}
    assert [m.name for m in models] == ["mock-fast", "mock-smart"]
    assert (error.code, error.reason) == (grpc.StatusCode.NOT_FOUND, "MODEL_NOT_FOUND")


async def test_sync_client_retries_unavailable() -> None:
    service = ScriptedService([fail(grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE")])

    def call(address: str) -> str:
        with SyncFeatherClient(address) as client:
            return client.chat("hi", model="m").text

    async with scripted_server(service) as address:
        assert await asyncio.to_thread(call, address) == "scripted"
    assert len(service.calls) == 2


# --- Packaging. ---


def test_client_and_server_stubs_share_one_descriptor() -> None:
    """Both register feather/v1/feather_service.proto in the default pool; that works because the bytes are
    identical (both generated from proto/ with the same pinned protoc, both checked fresh in CI)."""
    assert pb.DESCRIPTOR.serialized_pb == server_pb.DESCRIPTOR.serialized_pb
    assert pb.ChatRequest.DESCRIPTOR.full_name == server_pb.ChatRequest.DESCRIPTOR.full_name


def test_client_installs_and_imports_without_the_server_dependencies() -> None:
    requires = importlib.metadata.requires("feather-grpc-client") or []
    names = {r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires}
    assert names == {"grpcio", "protobuf", "googleapis-common-protos"}
    # (grpc itself imports grpc_health / grpc_reflection when they happen to be installed, so those are not checked)
    probe = (
        "import sys, feather_client; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('feather_grpc', 'aiohttp', 'pydantic', 'grpc_status')); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", probe], check=True, timeout=60)
