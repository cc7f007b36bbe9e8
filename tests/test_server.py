"""The gateway as a gRPC citizen: a real grpc.aio server on a loopback port, driven over a real channel."""

from __future__ import annotations

import asyncio
import copy
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import struct_pb2, timestamp_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from feather_grpc.core.results import ChatResult
from feather_grpc.core.types import ChatRequest
from feather_grpc.engine.call import CallContext
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.server.status import bounded
from feather_grpc.state.memory_ledger import MemoryLedger
from tests.gateway_harness import MOCK_CONFIG, rich_error, running_gateway, user


async def test_health_serves_both_names_and_watch_sees_shutdown() -> None:
    async with running_gateway(MOCK_CONFIG) as gw:
        health = health_pb2_grpc.HealthStub(gw.channel)
        for service in ("", "feather.v1.FeatherService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as unknown:
            await health.Check(health_pb2.HealthCheckRequest(service="nope.v1.Nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        listed = await health.List(health_pb2.HealthListRequest())
        assert {name: s.status for name, s in listed.statuses.items()} == dict.fromkeys(
            ["", "feather.v1.FeatherService", "liveness"], health_pb2.HealthCheckResponse.SERVING
        )

        watch = health.Watch(health_pb2.HealthCheckRequest(service="feather.v1.FeatherService"))
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        await gw.server.health.enter_graceful_shutdown()
        second = await asyncio.wait_for(watch.read(), timeout=5)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()


async def test_reflection_lists_the_services() -> None:
    async with running_gateway(MOCK_CONFIG) as gw:
        stub = reflection_pb2_grpc.ServerReflectionStub(gw.channel)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
        assert {"feather.v1.FeatherService", "grpc.health.v1.Health"} <= names


async def test_chat_resolves_alias_and_prices_exactly() -> None:
    async with running_gateway(MOCK_CONFIG) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hello there")], request_id="r-1"))
        assert reply.provider == "mock"
        assert reply.model == "mock-fast"
        assert reply.finish_reason == pb.FINISH_REASON_STOP
        assert reply.message.role == pb.ROLE_ASSISTANT
        assert "hello there" in reply.message.content
        assert reply.usage.input_tokens > 0 and reply.usage.output_tokens > 0
        # 0.001 USD per 1K input = 1,000 nano-USD per token; 0.002 per 1K output = 2,000.
        assert reply.cost_nanos_usd == reply.usage.input_tokens * 1_000 + reply.usage.output_tokens * 2_000
        assert reply.request_id == "r-1"
        assert [(a.provider, a.model, a.outcome) for a in reply.attempts] == [
            ("mock", "mock-fast", pb.ATTEMPT_OUTCOME_OK)
        ]


async def test_a_call_without_a_request_id_gets_a_uuid7_in_time_order() -> None:
    """The ids the gateway makes start with the time (the ledgers' unique index takes them at its end)."""
    async with running_gateway(MOCK_CONFIG) as gw:
        before_ms = time.time_ns() // 1_000_000
        ids = []
        for _ in range(3):
            ids.append((await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")]))).request_id)
        streamed = [e async for e in gw.stub.StreamChat(pb.StreamChatRequest(model="smart", messages=[user("hi")]))]
        ids.append(streamed[0].start.request_id)
        after_ms = time.time_ns() // 1_000_000
    for made in ids:
        as_uuid = uuid.UUID(hex=made)
        assert len(made) == 32 and as_uuid.hex == made
        assert (as_uuid.version, as_uuid.variant) == (7, uuid.RFC_4122)
    made_ms = [int(i[:12], 16) for i in ids]  # within one millisecond the order is random
    assert before_ms <= made_ms[0] and made_ms == sorted(made_ms) and made_ms[-1] <= after_ms
    assert len(set(ids)) == 4


async def test_stream_chat_starts_deltas_and_ends_with_usage() -> None:
    async with running_gateway(MOCK_CONFIG) as gw:
        events = [e async for e in gw.stub.StreamChat(pb.StreamChatRequest(model="smart", messages=[user("hi")]))]
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds[0] == "start" and kinds[-1] == "end"
        assert set(kinds[1:-1]) == {"delta"}
        assert events[0].start.provider == "mock" and events[0].start.model == "mock-smart"
        text = "".join(e.delta.content for e in events[1:-1])
        end = events[-1].end
        assert "hi" in text
        assert end.finish_reason == pb.FINISH_REASON_STOP
        # 2.5 USD per 1M input = 2.5 nano-USD per token; 10 per 1M output = 10: exact, rounded half up once.
        scaled = end.usage.input_tokens * 2_500_000_000 + end.usage.output_tokens * 10_000_000_000
        assert end.cost_nanos_usd == (scaled + 500_000) // 1_000_000


async def test_invalid_request_lists_every_field_violation() -> None:
    async with running_gateway(MOCK_CONFIG) as gw:
        bad = pb.ChatRequest(
            model="fast",
            messages=[user("ok"), pb.Message(role=pb.ROLE_USER, content=""), pb.Message(content="no role")],
            temperature=3.5,
            max_tokens=0,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(bad)
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert err.reason == "INVALID_REQUEST" and err.domain == "feather.v1" and err.error_info_count == 1
        assert [f for f, _ in err.violations] == ["messages[2].role"]  # conversion rejects what it cannot map

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(
                pb.ChatRequest(
                    model="fast",
                    messages=[user("ok"), pb.Message(role=pb.ROLE_USER)],
                    temperature=3.5,
                    max_tokens=0,
                    top_p=-1,
                )
            )
        fields = [f for f, _ in rich_error(caught.value).violations]
        assert fields == ["messages[1].content", "max_tokens", "temperature", "top_p"]


async def test_names_and_tags_are_bounded() -> None:
    """Tags and names go into every ledger record and log line, and into error details: a request cannot
    make them arbitrarily large."""
    async with running_gateway(MOCK_CONFIG) as gw:
        at_limit = {f"k{i:03d}".ljust(128, "k"): "v" * 512 for i in range(64)}
        reply = await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")], tags=at_limit))
        assert reply.usage.output_tokens > 0

        too_many = {f"t{i}": "v" for i in range(65)}
        oversized = {"": "empty key", "k" * 129: "long key", "ok": "v" * 513}
        cases = [
            (pb.ChatRequest(model="m" * 257, provider="p" * 257, messages=[user("hi")]), ["model", "provider"]),
            (pb.ChatRequest(model="fast", messages=[user("hi")], tags=too_many), ["tags"]),
            (pb.ChatRequest(model="fast", messages=[user("hi")], tags=oversized), ["tags", "tags"]),
        ]
        for request, fields in cases:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.Chat(request)
            err = rich_error(caught.value)
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT
            assert [f for f, _ in err.violations] == fields
            assert len(caught.value.details() or "") < 1000  # nothing echoed back at length
        descriptions = [d for _, d in err.violations]
        assert descriptions == [
            "keys must be 1 to 128 characters (2 are not)",
            "values must be at most 512 characters (1 is longer)",
        ]

        # An over-long request id is refused, not echoed back, and the record gets an id of its own.
        huge = pb.ChatRequest(model="x" * 100_000, messages=[user("hi")], request_id="r" * 100_000, tags=too_many)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(huge)
        err = rich_error(caught.value)
        assert [f for f, _ in err.violations] == ["model", "request_id", "tags"]
        assert "requestId" not in err.metadata

        ledger = gw.server.engine.ledger
        assert isinstance(ledger, MemoryLedger)
        refused = [r for r in ledger.records if r.error_code == "INVALID_ARGUMENT"]
        assert len(refused) == len(cases) + 1
        assert all(len(r.requested_model) <= 256 and len(r.request_id) <= 128 and not r.tags for r in refused)


async def test_a_request_that_does_not_parse_is_invalid_argument_and_recorded() -> None:
    """Bytes that are no valid message (bad UTF-8 in a string field, truncated or corrupt data) are the
    caller's error: INVALID_ARGUMENT with details, and a refused Chat/StreamChat is in the ledger."""
    bad_utf8 = b"\x0a\x04fast" + b"\x1a\x07\x08\x02\x12\x03h\xff\xfe"  # model "fast", content with 0xff 0xfe
    truncated = b"\x0a\x09fast"
    async with running_gateway(MOCK_CONFIG) as gw:

        def raw_method(name: str, reply: Any, streaming: bool = False) -> Any:  # sends the bytes as they are
            make = gw.channel.unary_stream if streaming else gw.channel.unary_unary
            return make(f"/feather.v1.FeatherService/{name}", lambda raw: raw, reply.FromString)

        chat = raw_method("Chat", pb.ChatResponse)
        stream = raw_method("StreamChat", pb.StreamChatResponse, streaming=True)
        usage = raw_method("Usage", pb.UsageResponse)
        for raw in (bad_utf8, truncated):
            for call in (chat(raw), _drain(stream(raw)), usage(raw)):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await call
                err = rich_error(caught.value)
                assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
                assert err.error_info_count == 1 and [f for f, _ in err.violations] == ["request"]
        total = (await gw.stub.Usage(pb.UsageRequest())).total
        assert (total.request_count, total.error_count) == (4, 4)  # two Chat and two StreamChat, refused


async def test_json_schemas_must_be_json() -> None:
    nan = struct_pb2.Struct()
    nan.update({"type": "object", "maximum": float("nan")})
    async with running_gateway(MOCK_CONFIG) as gw:
        request = pb.ChatRequest(
            model="fast",
            messages=[user("hi")],
            tools=[pb.Tool(name="ok"), pb.Tool(name="f", parameters=nan)],
            response_format=pb.ResponseFormat(
                type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, schema_name="s", json_schema=nan
            ),
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(request)
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in err.violations] == ["response_format.json_schema", "tools[1].parameters"]


async def test_an_internal_error_gives_the_id_its_log_line_has(caplog: pytest.LogCaptureFixture) -> None:
    async with running_gateway(MOCK_CONFIG) as gw:

        async def broken(request: ChatRequest, ctx: CallContext | None = None) -> ChatResult:
            raise RuntimeError("a bug")

        gw.server.engine.chat = broken  # type: ignore[method-assign]
        for sent in ("", "caller-id-1"):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")], request_id=sent))
            err = rich_error(caught.value)
            assert (err.code, err.reason) == (grpc.StatusCode.INTERNAL, "INTERNAL")
            request_id = err.metadata["requestId"]
            assert request_id == sent if sent else len(request_id) == 16  # made up when the caller sent none
            assert any(r.getMessage() == f"unexpected error handling request {request_id}" for r in caplog.records)


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


async def test_unknown_model_is_not_found_with_error_info() -> None:
    async with running_gateway(MOCK_CONFIG) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="gpt-17", messages=[user("hi")]))
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.NOT_FOUND
        assert err.reason == "MODEL_NOT_FOUND"
        assert err.metadata["model"] == "gpt-17"


async def test_pinned_provider_still_resolves_aliases_and_provider_slash_model_works() -> None:
    async with running_gateway(MOCK_CONFIG) as gw:
        pinned = await gw.stub.Chat(pb.ChatRequest(model="smart", provider="mock", messages=[user("a")]))
        assert pinned.model == "mock-smart"
        slashed = await gw.stub.Chat(pb.ChatRequest(model="mock/mock-fast", messages=[user("a")]))
        assert slashed.model == "mock-fast"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="smart", provider="openai", messages=[user("a")]))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND


async def test_list_models_shows_aliases_prices_and_state() -> None:
    async with running_gateway(MOCK_CONFIG) as gw:
        reply = await gw.stub.ListModels(pb.ListModelsRequest())
        by_name = {m.name: m for m in reply.models}
        assert list(by_name) == ["mock-fast", "mock-smart"]
        fast = by_name["mock-fast"]
        assert list(fast.aliases) == ["fast"] and fast.provider == "mock" and fast.provider_type == "mock"
        assert fast.price.input_nanos_usd_per_million == 1_000_000_000
        assert fast.price.output_nanos_usd_per_million == 2_000_000_000
        assert fast.circuit_state == pb.CIRCUIT_STATE_CLOSED


@pytest.mark.parametrize("ledger", ["sqlite", "memory"])
async def test_usage_takes_any_valid_timestamp_and_names_invalid_ones(ledger: str, tmp_path: Path) -> None:
    doc = copy.deepcopy(MOCK_CONFIG)
    doc["ledger"] = {"type": ledger, "path": str(tmp_path / "usage.db")}
    ts = timestamp_pb2.Timestamp
    first, last = ts(seconds=-62_135_596_800), ts(seconds=253_402_300_799, nanos=999_999_999)
    async with running_gateway(doc) as gw:
        await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")]))
        # Valid Timestamps beyond what int64 nanoseconds hold (1677-2262) mean "from the start", "to the end".
        for group_by in ([], [pb.USAGE_GROUP_BY_DAY], [pb.USAGE_GROUP_BY_HOUR, pb.USAGE_GROUP_BY_MODEL]):
            report = await gw.stub.Usage(pb.UsageRequest(start_time=first, end_time=last, group_by=group_by))
            assert report.total.request_count == 1
        far = await gw.stub.Usage(pb.UsageRequest(start_time=ts(seconds=10_000_000_000), end_time=last))
        assert far.total.request_count == 0
        for request, fields in [
            (pb.UsageRequest(start_time=ts(seconds=-62_135_596_801)), ["start_time"]),
            (pb.UsageRequest(end_time=ts(seconds=253_402_300_800)), ["end_time"]),
            (
                pb.UsageRequest(start_time=ts(nanos=-1), end_time=ts(nanos=2_000_000_000)),
                ["start_time.nanos", "end_time.nanos"],
            ),
            (pb.UsageRequest(start_time=ts(seconds=10_000_000_001), end_time=ts(seconds=10_000_000_000)), ["end_time"]),
        ]:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.Usage(request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert [f for f, _ in rich_error(caught.value).violations] == fields


async def test_usage_totals_match_calls_and_group_by_model() -> None:
    async with running_gateway(MOCK_CONFIG) as gw:
        costs = 0
        for model in ("fast", "fast", "smart"):
            costs += (await gw.stub.Chat(pb.ChatRequest(model=model, messages=[user("count me")]))).cost_nanos_usd
        with pytest.raises(grpc.aio.AioRpcError):
            await gw.stub.Chat(pb.ChatRequest(model="nope", messages=[user("fails")]))

        total_only = await gw.stub.Usage(pb.UsageRequest())
        assert list(total_only.rows) == []
        assert total_only.total.request_count == 4
        assert total_only.total.ok_count == 3 and total_only.total.error_count == 1
        assert total_only.total.cost_nanos_usd == costs

        grouped = await gw.stub.Usage(pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_MODEL]))
        counts = {r.model: r.request_count for r in grouped.rows}
        assert counts == {"": 1, "mock-fast": 2, "mock-smart": 1}
        assert sum(r.cost_nanos_usd for r in grouped.rows) == grouped.total.cost_nanos_usd

        future = timestamp_pb2.Timestamp(seconds=4_000_000_000)
        empty = await gw.stub.Usage(pb.UsageRequest(start_time=future))
        assert empty.total.request_count == 0

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Usage(pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TAG]))
        assert [f for f, _ in rich_error(caught.value).violations] == ["tag_key"]


async def test_an_error_with_many_violations_fits_a_clients_trailers() -> None:
    """A client reads at most 8 KiB of trailers (grpc.max_metadata_size); past it the call fails with a
    bare RESOURCE_EXHAUSTED and the error is lost. Found by bench/fuzz.py: a request with 130 tools of one
    name (each a violation) made a status longer than that."""
    tools = [pb.Tool(name="名前", description="é") for _ in range(128)]
    async with running_gateway(MOCK_CONFIG) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")], tools=tools))
        err = rich_error(caught.value)  # the default channel read the whole status
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "INVALID_REQUEST"
        assert err.violations[0][0] == "tools[1].name"
        assert err.violations[-1][0] == "request" and err.violations[-1][1].endswith("more violations")
        assert len(err.message.encode()) <= 768 and err.message.endswith("...")


def test_a_status_is_bounded_in_utf8_bytes_on_a_character_boundary() -> None:
    assert bounded("ok", 10) == "ok"
    cut = bounded("名" * 100, 20)  # 3 bytes each: 5 whole characters fit before the marker
    assert cut == "名" * 5 + "..." and len(cut.encode()) <= 20
