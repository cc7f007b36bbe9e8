"""Calls refused before the engine (bad key, tenant rpm/concurrency, load shedding, state store down, a request
that does not convert) are calls too: one ledger record and one call-log line each, billed once per request id."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from feather_grpc import config
from feather_grpc.core.ledger import Outcome, UsageRecord
from feather_grpc.core.limits import BucketSpec, StateUnavailable
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from feather_grpc.server.app import GatewayServer
from feather_grpc.server.assembly import assemble
from feather_grpc.server.logs import CALLS_LOGGER
from feather_grpc.state.memory_ledger import MemoryLedger
from feather_grpc.state.memory_limits import MemoryRateLimiter
from sim.upstream import Reply, UpstreamSimulator
from tests.gateway_harness import MOCK_CONFIG, rich_error, running_gateway, user
from tests.ops_harness import eventually

ACME_KEY, OPS_KEY = "fk_acme_refusals", "fk_ops_refusals"


def _h(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def tenants_doc(base: dict[str, Any] = MOCK_CONFIG, **acme: Any) -> dict[str, Any]:
    doc = copy.deepcopy(base)
    doc["rateLimitMode"] = "reject"
    doc["cache"] = {"enabled": False}
    doc["tenants"] = {"acme": {"keys": [_h(ACME_KEY)], **acme}, "ops": {"keys": [_h(OPS_KEY)], "role": "admin"}}
    return doc


def ledger_of(server: GatewayServer) -> MemoryLedger:
    ledger = server.engine.ledger
    assert isinstance(ledger, MemoryLedger)
    return ledger


def call_lines(caplog: pytest.LogCaptureFixture) -> dict[str, dict[str, Any]]:
    """The call log's lines by request id."""
    return {r.__dict__["request_id"]: r.__dict__ for r in caplog.records if r.name == CALLS_LOGGER}


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def refused_stream(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call:
            pass
    return caught.value


def only(records: list[UsageRecord], request_id: str) -> UsageRecord:
    (record,) = [r for r in records if r.request_id == request_id]
    return record


async def test_refused_calls_are_in_the_ledger_and_the_call_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=CALLS_LOGGER)
    async with running_gateway(tenants_doc(limits={"rpm": 1})) as gw:
        tags = {"team": "search"}
        no_key = await refused(gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")], request_id="r-no-key")))
        wrong_key = await refused_stream(
            gw.stub.StreamChat(
                pb.StreamChatRequest(model="smart", messages=[user("hi")], request_id="r-wrong", tags=tags),
                metadata=bearer("fk_wrong"),
            )
        )
        assert no_key.code() == wrong_key.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")]), metadata=bearer(ACME_KEY))
        limited = await refused(
            gw.stub.Chat(
                pb.ChatRequest(model="fast", messages=[user("hi")], request_id="r-rpm", tags=tags),
                metadata=bearer(ACME_KEY),
            )
        )
        assert rich_error(limited).reason == "RATE_LIMITED"

        records = ledger_of(gw.server).records
        assert len(records) == 4
        for request_id, streamed in (("r-no-key", False), ("r-wrong", True)):
            r = only(records, request_id)
            assert (r.tenant, r.outcome, r.error_code, r.error_reason) == (
                "",
                Outcome.ERROR,
                "UNAUTHENTICATED",
                "API_KEY_INVALID",
            )
            assert r.streamed is streamed and r.tags == {}  # an unknown caller's tags are not kept
            assert (r.provider, r.model) == ("", "")
        assert only(records, "r-wrong").requested_model == "smart"
        r = only(records, "r-rpm")
        assert (r.tenant, r.error_code, r.error_reason, r.requested_model) == (
            "acme",
            "RESOURCE_EXHAUSTED",
            "RATE_LIMITED",
            "fast",
        )
        assert r.tags == tags and r.streamed is False
        for r in records:
            if r.request_id != ok.request_id:
                assert (r.input_tokens, r.output_tokens, r.cost_nanos_usd, r.attempt_count) == (0, 0, 0, 0)

        lines = call_lines(caplog)
        assert set(lines) == {"r-no-key", "r-wrong", "r-rpm", ok.request_id}
        assert (lines["r-wrong"]["tenant"], lines["r-wrong"]["outcome"], lines["r-wrong"]["error_code"]) == (
            "",
            "error",
            "UNAUTHENTICATED",
        )
        assert (lines["r-rpm"]["tenant"], lines["r-rpm"]["error_reason"]) == ("acme", "RATE_LIMITED")

        rows = (
            await gw.stub.Usage(pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TENANT]), metadata=bearer(OPS_KEY))
        ).rows
        assert [(r.tenant, r.request_count, r.ok_count, r.error_count, r.cost_nanos_usd) for r in rows] == [
            ("", 2, 0, 2, 0),
            ("acme", 2, 1, 1, ok.cost_nanos_usd),
        ]
        own = await gw.stub.Usage(pb.UsageRequest(), metadata=bearer(ACME_KEY))
        assert (own.total.request_count, own.total.error_count) == (2, 1)


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSimulator]:
    async with UpstreamSimulator() as s:
        yield s


def sim_doc(sim: UpstreamSimulator, **extra: Any) -> dict[str, Any]:
    doc = tenants_doc(
        {
            "ledger": {"type": "memory"},
            "providers": {
                "openai": {
                    "type": "openai",
                    "apiKeyEnv": "SIM_OPENAI_KEY",
                    "baseUrl": sim.url + "/v1",
                    "models": [{"name": "gpt-sim", "aliases": ["fast"], "inputPer1K": 0.03, "outputPer1K": 0.06}],
                }
            },
        }
    )
    doc.update(extra)
    return doc


async def test_a_shed_request_retried_with_its_id_is_billed_once(sim: UpstreamSimulator) -> None:
    # The first stream hangs after its first events, holding the only in-flight slot until it is cancelled.
    sim.enqueue(Reply(content="one two three four", hang_after=2))
    async with running_gateway(sim_doc(sim, server={"maxInFlight": 1}), {"SIM_OPENAI_KEY": "sk-test"}) as gw:
        auth = bearer(ACME_KEY)
        holder = gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("hold")]), metadata=auth)
        assert (await holder.read()).WhichOneof("event") == "start"
        again = pb.ChatRequest(model="fast", messages=[user("hi")], request_id="retry-me")
        shed = await refused(gw.stub.Chat(again, metadata=auth))
        assert rich_error(shed).reason == "OVERLOADED"
        holder.cancel()
        await eventually(lambda: gw.server.gate.in_flight == 0, what="the held slot to be given back")
        reply = await gw.stub.Chat(again, metadata=auth)  # the client retries with the same request id
        assert reply.request_id == "retry-me"
        await gw.server.engine.settled()

        ledger = ledger_of(gw.server)
        retried = [r for r in ledger.records if r.request_id == "retry-me"]
        assert [(r.outcome, r.error_reason) for r in retried] == [(Outcome.ERROR, "OVERLOADED"), (Outcome.OK, "")]
        assert [r.outcome for r in ledger.billed_records if r.request_id == "retry-me"] == [Outcome.OK]
        total = (await gw.stub.Usage(pb.UsageRequest(), metadata=bearer(OPS_KEY))).total
        # The held stream (cancelled) and the retried request, counted once; the refusal is not billed.
        assert (total.request_count, total.ok_count, total.cancelled_count, total.error_count) == (2, 1, 1, 0)
        assert retried[0].cost_nanos_usd == 0
        assert total.cost_nanos_usd == sum(r.cost_nanos_usd for r in ledger.billed_records) > reply.cost_nanos_usd


async def test_a_tenant_at_its_concurrency_cap_is_refused_and_recorded(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(content="one two three four", hang_after=2))
    doc = sim_doc(sim)
    doc["tenants"]["acme"]["limits"] = {"concurrency": 1}
    async with running_gateway(doc, {"SIM_OPENAI_KEY": "sk-test"}) as gw:
        holder = gw.stub.StreamChat(
            pb.StreamChatRequest(model="fast", messages=[user("hold")]), metadata=bearer(ACME_KEY)
        )
        assert (await holder.read()).WhichOneof("event") == "start"
        err = await refused_stream(
            gw.stub.StreamChat(
                pb.StreamChatRequest(model="fast", messages=[user("hi")], request_id="second"),
                metadata=bearer(ACME_KEY),
            )
        )
        assert rich_error(err).metadata["subject"] == "tenant:acme:concurrency"
        holder.cancel()
        r = only(ledger_of(gw.server).records, "second")
        assert (r.tenant, r.error_code, r.error_reason, r.streamed) == (
            "acme",
            "RESOURCE_EXHAUSTED",
            "RATE_LIMITED",
            True,
        )


class _StoreDown(MemoryRateLimiter):
    async def reserve(self, key: str, spec: BucketSpec, amount: float, max_wait_s: float) -> float:
        raise StateUnavailable("redis is down")


async def test_state_store_down_before_admission_is_recorded(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=CALLS_LOGGER)
    cfg = config.resolve(config.parse_file_config(json.dumps(tenants_doc(limits={"rpm": 60})), "<test>"), {}, "<test>")
    server = GatewayServer(cfg, engine=assemble(cfg, ledger=MemoryLedger(), limiter=_StoreDown()).engine)
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FeatherServiceStub(channel)
            request = pb.ChatRequest(model="fast", messages=[user("hi")], request_id="store-down")
            err = await refused(stub.Chat(request, metadata=bearer(ACME_KEY)))
        assert err.code() == grpc.StatusCode.UNAVAILABLE
        r = only(ledger_of(server).records, "store-down")
        assert (r.tenant, r.error_code, r.error_reason) == ("acme", "UNAVAILABLE", "STATE_UNAVAILABLE")
        assert call_lines(caplog)["store-down"]["outcome"] == "error"
    finally:
        await server.stop(0)


async def test_a_request_that_does_not_convert_is_recorded() -> None:
    async with running_gateway(tenants_doc()) as gw:
        bad = pb.StreamChatRequest(
            model="fast", messages=[pb.Message(role=pb.Role.ValueType(99), content="hi")], request_id="bad-role"
        )
        err = await refused_stream(gw.stub.StreamChat(bad, metadata=bearer(ACME_KEY)))
        assert rich_error(err).reason == "INVALID_REQUEST"
        r = only(ledger_of(gw.server).records, "bad-role")
        assert (r.tenant, r.error_code, r.error_reason, r.streamed) == (
            "acme",
            "INVALID_ARGUMENT",
            "INVALID_REQUEST",
            True,
        )


async def test_a_chat_that_does_not_convert_is_refused_once_and_gives_its_slot_back() -> None:
    """Refused by the interceptor (the one place refusals are recorded): its status names its request id,
    it has exactly one record, and the tenant's only concurrency slot is free again for the next call."""
    async with running_gateway(tenants_doc(limits={"concurrency": 1})) as gw:
        bad = pb.ChatRequest(
            model="fast", messages=[pb.Message(role=pb.Role.ValueType(99), content="hi")], request_id="bad-unary"
        )
        err = rich_error(await refused(gw.stub.Chat(bad, metadata=bearer(ACME_KEY))))
        assert (err.code, err.reason, err.metadata.get("requestId")) == (
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_REQUEST",
            "bad-unary",
        )
        ok = await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")]), metadata=bearer(ACME_KEY))
        records = ledger_of(gw.server).records
        assert [r.request_id for r in records] == ["bad-unary", ok.request_id]
        assert (records[0].tenant, records[0].streamed, records[0].error_code) == ("acme", False, "INVALID_ARGUMENT")


async def test_a_request_over_the_size_limit_is_refused_with_the_limit_named_and_recorded() -> None:
    """Up to twice server.maxMessageBytes the gateway refuses it itself (INVALID_ARGUMENT naming the limit,
    one record, the slot given back); past that gRPC refuses it before reading it, RESOURCE_EXHAUSTED."""
    doc = tenants_doc(limits={"concurrency": 1})
    doc["server"] = {"maxMessageBytes": 4096}
    async with running_gateway(doc) as gw:
        over = pb.ChatRequest(model="fast", messages=[user("x" * 6000)], request_id="too-big")
        err = rich_error(await refused(gw.stub.Chat(over, metadata=bearer(ACME_KEY))))
        assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
        limit = "this server takes at most 4096 (server.maxMessageBytes)"
        assert err.violations == [("request", f"is {over.ByteSize()} bytes; {limit}")]
        stream = pb.StreamChatRequest(model="fast", messages=[user("x" * 6000)])
        assert rich_error(await refused_stream(gw.stub.StreamChat(stream, metadata=bearer(ACME_KEY)))).violations
        far_over = pb.ChatRequest(model="fast", messages=[user("x" * 9000)])
        assert (await refused(gw.stub.Chat(far_over, metadata=bearer(ACME_KEY)))).code() == (
            grpc.StatusCode.RESOURCE_EXHAUSTED
        )
        ok = await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")]), metadata=bearer(ACME_KEY))
        records = ledger_of(gw.server).records
        assert len(records) == 3 and records[-1].request_id == ok.request_id, "the slot came back each time"
        assert [(r.tenant, r.streamed, r.error_code, r.requested_model) for r in records[:2]] == [
            ("acme", False, "INVALID_ARGUMENT", ""),  # not parsed: no model, and a fresh request id
            ("acme", True, "INVALID_ARGUMENT", ""),
        ]
        assert records[0].request_id != "too-big"


async def test_a_refused_callers_oversized_fields_are_not_kept() -> None:
    async with running_gateway(tenants_doc()) as gw:
        await refused(gw.stub.Chat(pb.ChatRequest(model="m" * 10_000, messages=[user("hi")], request_id="x" * 500)))
        (r,) = ledger_of(gw.server).records
        assert len(r.requested_model) == 256 and len(r.request_id) == 32  # a fresh id instead of an invalid one


async def test_concurrent_refusals_are_each_recorded() -> None:
    async with running_gateway(tenants_doc()) as gw:
        calls = [
            refused(gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")], request_id=f"n{i}")))
            for i in range(20)
        ]
        errors = await asyncio.gather(*calls)
        assert {e.code() for e in errors} == {grpc.StatusCode.UNAUTHENTICATED}
        assert sorted(r.request_id for r in ledger_of(gw.server).records) == sorted(f"n{i}" for i in range(20))
