"""Saturation is explicit: a process that cannot start a new call promptly (its event loop runs late, or it
holds its in-flight cap) refuses it at once with RESOURCE_EXHAUSTED OVERLOADED and RetryInfo, and every
call that reaches it ends in a status and exactly one ledger record. Shedding is on out of the box."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from feather_grpc import config
from feather_grpc.core.ledger import Outcome
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.server.app import GatewayServer, queue_limits
from feather_grpc.server.loop_lag import PROBE_HEADER, LoopLag
from feather_grpc.server.memory import return_memory_when_idle
from feather_grpc.state.memory_ledger import MemoryLedger
from sim.upstream import Reply, UpstreamSimulator
from tests.gateway_harness import Gateway, rich_error, running_gateway, user
from tests.ops_harness import eventually

ENV = {"SIM_OPENAI_KEY": "sk-test"}


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSimulator]:
    async with UpstreamSimulator() as s:
        yield s


def doc(sim: UpstreamSimulator, **server: Any) -> dict[str, Any]:
    return {
        "ledger": {"type": "memory"},
        "cache": {"enabled": False},
        "server": server,
        "providers": {
            "openai": {
                "type": "openai",
                "apiKeyEnv": "SIM_OPENAI_KEY",
                "baseUrl": sim.url + "/v1",
                "models": [{"name": "gpt-sim", "aliases": ["fast"], "inputPer1K": 0.03, "outputPer1K": 0.06}],
            }
        },
    }


def records(gw: Gateway) -> dict[str, list[tuple[Outcome, str]]]:
    ledger = gw.server.engine.ledger
    assert isinstance(ledger, MemoryLedger)
    by_id: dict[str, list[tuple[Outcome, str]]] = {}
    for r in ledger.records:
        by_id.setdefault(r.request_id, []).append((r.outcome, r.error_reason))
    return by_id


async def stall_the_loop(stop: asyncio.Event, block_s: float) -> None:
    """Holds the event loop for block_s at every turn, as thousands of busy streams would."""
    while not stop.is_set():
        time.sleep(block_s)  # noqa: ASYNC251 (blocking on purpose: this is the saturation under test)
        await asyncio.sleep(0)


async def test_a_late_event_loop_sheds_new_calls_with_retry_info_and_records_them(sim: UpstreamSimulator) -> None:
    async with running_gateway(doc(sim, maxLoopLagMs=50), ENV) as gw:
        stop = asyncio.Event()
        staller = asyncio.create_task(stall_the_loop(stop, 0.3))
        try:
            await eventually(lambda: gw.server.loop_lag.saturated, timeout_s=30, what="the loop to report lag")
            request = pb.ChatRequest(model="fast", messages=[user("hi")], request_id="while-late")
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.Chat(request, timeout=60)
        finally:
            stop.set()
            await staller
        err = rich_error(caught.value)
        assert (err.code, err.reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "OVERLOADED")
        assert "a new call waits" in err.message
        assert err.retry_delay_s is not None and err.retry_delay_s >= 0.25
        assert sim.requests == [] or all(r.path != "/v1/chat/completions" for r in sim.requests)

        await eventually(lambda: not gw.server.loop_lag.saturated, timeout_s=30, what="the lag to clear")
        again = pb.ChatRequest(model="fast", messages=[user("hi")], request_id="after")
        # A probe header without this process's secret token is an ordinary call.
        forged = ((PROBE_HEADER, "guessed"),)
        assert (await gw.stub.Chat(again, timeout=30, metadata=forged)).request_id == "after"
        await gw.server.engine.settled()
        seen = records(gw)
        assert seen["while-late"] == [(Outcome.ERROR, "OVERLOADED")]
        assert seen["after"] == [(Outcome.OK, "")]
        # The process's own probes (a StreamChat or a Chat every 100 ms) ran and are recorded nowhere.
        assert gw.server.loop_lag.start_delay_s > 0 and set(seen) == {"while-late", "after"}


async def test_a_new_call_stuck_in_grpcs_queue_is_saturation() -> None:
    """The probe: a call to the process itself that has waited past the limit means saturation at once
    (gRPC's queue can be long while each event-loop turn is short); one that answers clears it."""
    answer = asyncio.Event()

    async def probe() -> None:
        await answer.wait()

    lag = LoopLag(0.05, probe=probe, probe_every_s=0.01)
    lag.start()
    try:
        await eventually(lambda: lag.saturated, what="the waiting probe to count")
        assert lag.waiting_s > 0.1 and lag.retry_after_s >= 0.25
        answer.set()  # the queue drained: probes come back at once
        await eventually(lambda: not lag.saturated, what="fast probes to clear it")
    finally:
        await lag.stop()


async def test_a_quiet_process_probes_less_often_and_a_busy_one_at_once() -> None:
    """A probe costs a call's CPU: with few calls in flight and small measures the process probes every
    quiet_probe_every_s; as soon as calls pile up, the lag sampler sends the next one at once."""
    sent: list[float] = []
    in_flight = {"n": 0}

    async def probe() -> None:
        sent.append(time.perf_counter())

    lag = LoopLag(
        0.5, interval_s=0.01, probe=probe, probe_every_s=0.01, in_flight=lambda: in_flight["n"], quiet_probe_every_s=60
    )
    lag.start()
    try:
        await eventually(lambda: len(sent) == 1, what="the first probe")
        assert lag.quiet
        await asyncio.sleep(0.2)  # 20 probe intervals
        assert len(sent) == 1, "quiet: the next probe waits for quiet_probe_every_s"
        in_flight["n"] = 8
        assert not lag.quiet
        await eventually(lambda: len(sent) >= 3, what="probes every probe_every_s again")
    finally:
        await lag.stop()


async def test_a_burst_past_the_in_flight_cap_loses_no_call(sim: UpstreamSimulator) -> None:
    holders_n, burst_n = 3, 40
    for _ in range(holders_n):
        sim.enqueue(Reply(content="one two three four", hang_after=2))
    sim.default = Reply(latency_s=0.05)
    async with running_gateway(doc(sim, maxInFlight=holders_n, maxLoopLagMs=0), ENV) as gw:
        # The process probes itself (a health Check on its own loopback port) whatever the limit.
        await eventually(lambda: gw.server.loop_lag.start_delay_s > 0, what="a probe round trip")
        holders = [
            gw.stub.StreamChat(pb.StreamChatRequest(model="fast", messages=[user("hold")], request_id=f"hold-{i}"))
            for i in range(holders_n)
        ]
        for h in holders:
            assert (await h.read()).WhichOneof("event") == "start"

        async def call(rid: str) -> tuple[str, str]:
            try:
                await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")], request_id=rid), timeout=30)
            except grpc.aio.AioRpcError as e:
                return rid, rich_error(e).reason
            return rid, "OK"

        # Every slot is held: the whole burst is refused at once, each with its record.
        full = await asyncio.gather(*(call(f"full-{i}") for i in range(burst_n)))
        assert {reason for _, reason in full} == {"OVERLOADED"}
        # One slot free: some get it in turn, the rest are refused; none waits, none vanishes.
        holders[0].cancel()
        await eventually(lambda: gw.server.gate.in_flight == holders_n - 1, what="the held slot to be given back")
        mixed = await asyncio.gather(*(call(f"mixed-{i}") for i in range(burst_n)))
        assert {reason for _, reason in mixed} <= {"OK", "OVERLOADED"}
        assert any(reason == "OK" for _, reason in mixed)
        for h in holders[1:]:
            h.cancel()
        await eventually(lambda: gw.server.gate.in_flight == 0, what="every slot to be given back")
        await gw.server.engine.settled()

        # Exactly one record per call, saying what the caller saw.
        expected = {rid: [(Outcome.OK, "")] if r == "OK" else [(Outcome.ERROR, r)] for rid, r in full + mixed}
        expected.update({f"hold-{i}": [(Outcome.CANCELLED, "")] for i in range(holders_n)})
        assert records(gw) == expected


async def test_shedding_is_on_by_default_and_grpc_queue_is_bounded() -> None:
    base = {"providers": {"mock": {"type": "mock", "models": [{"name": "m", "inputPer1M": 1, "outputPer1M": 1}]}}}
    cfg = config.resolve(config.parse_file_config(json.dumps(base), "<test>"), {}, "<test>")
    assert cfg.server.max_in_flight == 5000 and cfg.server.max_loop_lag_s == 0.5
    server = GatewayServer(cfg)
    assert server.gate._loop_lag is server.loop_lag and server.loop_lag.limit_s == 0.5
    limits = dict(queue_limits())
    # gRPC cuts no burst the gateway should judge itself (its default: at random past 1,000).
    assert limits["grpc.server.max_pending_requests"] == limits["grpc.server.max_pending_requests_hard_limit"] == 20_000
    assert limits["grpc.server_max_unrequested_time_in_server"] == 30


async def test_memory_is_trimmed_once_a_burst_is_over() -> None:
    calls = {"n": 1}
    trims: list[int] = []

    def trim(pad: int) -> int:
        trims.append(calls["n"])
        return 1

    task = asyncio.create_task(
        return_memory_when_idle(lambda: calls["n"], interval_s=0.01, trim=trim, again_after_s=3600)
    )
    try:
        await eventually(lambda: calls["n"] == 1 and not trims, what="a busy check")
        await asyncio.sleep(0.05)
        assert trims == [], "never while a call is in flight"
        calls["n"] = 0
        await eventually(lambda: trims == [0], what="one trim after the burst")
        await asyncio.sleep(0.05)
        assert trims == [0], "once per burst, not on every idle check"
    finally:
        task.cancel()


async def test_memory_is_trimmed_again_once_the_bursts_connections_have_closed() -> None:
    """The pools close a burst's idle connections a keep-alive later, and only then is what they held
    free: a second trim follows the first, once, unless a new burst came (which gets its own two)."""
    state = {"n": 1, "checks": 0}
    trims: list[int] = []

    def in_flight() -> int:
        state["checks"] += 1
        return state["n"]

    def trim(pad: int) -> int:
        trims.append(state["n"])
        return 1

    async def a_busy_check() -> None:
        state["n"], seen = 1, state["checks"]
        await eventually(lambda: state["checks"] > seen + 1, what="a check seeing the burst")

    task = asyncio.create_task(return_memory_when_idle(in_flight, interval_s=0.01, trim=trim, again_after_s=0.1))
    try:
        await a_busy_check()
        state["n"] = 0
        await eventually(lambda: len(trims) == 2, what="the second trim, a keep-alive after the first")
        seen = state["checks"]
        await eventually(lambda: state["checks"] > seen + 20, what="twenty idle checks more")
        assert trims == [0, 0], "twice per burst, not on every idle check"
        await a_busy_check()
        state["n"] = 0  # the new burst ends: it gets two trims of its own
        await eventually(lambda: len(trims) == 4, what="the new burst's two trims")
    finally:
        task.cancel()


async def test_calls_that_come_and_go_between_checks_are_not_idle() -> None:
    """Light traffic (no call in flight at any check, yet one started in every interval) is not a lull:
    each check would otherwise cost a full collection."""
    checks = {"n": 0, "started": 0, "traffic": True}
    trims: list[int] = []

    def in_flight() -> int:
        checks["n"] += 1
        if checks["traffic"]:
            checks["started"] += 1  # a call came and went since the last check
        return 0

    def trim(pad: int) -> int:
        trims.append(checks["n"])
        return 1

    task = asyncio.create_task(
        return_memory_when_idle(in_flight, interval_s=0.01, trim=trim, started=lambda: checks["started"])
    )
    try:
        await eventually(lambda: checks["n"] >= 10, what="ten checks")
        assert trims == [], "calls started between the checks: not idle"
        checks["traffic"] = False
        await eventually(lambda: len(trims) == 1, what="one trim once the traffic stopped")
    finally:
        task.cancel()


# Long-lived objects piling up, as thousands of held streams leave them; prints how many objects start-up
# left frozen and how many full collections the pile-up cost.
_GROWING_HEAP = """
import gc, sys
from feather_grpc.server.memory import tune_garbage_collector
if sys.argv[1] == "tuned":
    tune_garbage_collector()
full = gc.get_stats()[2]["collections"]
held = [[i] for i in range(300_000)]
print(gc.get_freeze_count(), gc.get_stats()[2]["collections"] - full)
"""


def test_a_serving_process_freezes_start_up_and_a_growing_heap_costs_no_full_collection() -> None:
    def run(mode: str) -> tuple[int, int]:  # a process of its own: the collector's settings are global
        done = subprocess.run([sys.executable, "-c", _GROWING_HEAP, mode], capture_output=True, text=True, check=True)
        frozen, full = done.stdout.split()
        return int(frozen), int(full)

    frozen, full = run("default")
    assert frozen == 0 and full >= 2, "CPython's defaults: a full collection each time the heap grows by a quarter"
    frozen, full = run("tuned")
    assert frozen > 10_000, "start-up's objects (modules, descriptors) are out of the collector's reach"
    assert full == 0


async def test_the_sqlite_ledger_is_told_when_the_server_is_backlogged_or_has_one_call(tmp_path: Any) -> None:
    base = {
        "providers": {"mock": {"type": "mock", "models": [{"name": "m", "inputPer1M": 1, "outputPer1M": 1}]}},
        "ledger": {"type": "sqlite", "path": str(tmp_path / "usage.db")},
    }
    cfg = config.resolve(config.parse_file_config(json.dumps(base), "<test>"), {}, "<test>")
    server = GatewayServer(cfg)
    try:
        hint = server.engine.ledger.backlogged  # type: ignore[attr-defined]
        assert hint is not None and not hint()  # idle: no record waits for company
        server.gate.in_flight = 8  # many calls in flight: records may wait a few ms to share a commit
        assert hint()
        server.gate.in_flight = 0
        server.loop_lag.start_delay_s = 0.01  # new calls wait to start
        assert hint()
        alone = server.engine.ledger.alone  # type: ignore[attr-defined]
        assert alone is not None and not alone()  # new calls wait to start: company is coming
        server.loop_lag.start_delay_s = 0.0
        server.gate.in_flight = 1  # the recording call only: its record is committed at once
        assert alone()
        server.gate.in_flight = 2
        assert not alone()
    finally:
        await server.engine.aclose()
        if server.assembly is not None:
            await server.assembly.aclose()
    # With Postgres as the ledger of record, the local spool it writes first is told the same.
    env = {"DATABASE_URL": "postgresql://feather@127.0.0.1:1/unused"}  # never connected to here
    cfg = config.resolve(config.parse_file_config(json.dumps(base), "<test>"), env, "<test>")
    server = GatewayServer(cfg)
    try:
        spool_alone = server.engine.ledger.spool.alone  # type: ignore[attr-defined]
        spool_backlogged = server.engine.ledger.spool.backlogged  # type: ignore[attr-defined]
        server.gate.in_flight = 1
        assert spool_alone is not None and spool_alone()
        assert spool_backlogged is not None and not spool_backlogged()
        server.gate.in_flight = 8
        assert spool_backlogged()
    finally:
        await server.engine.aclose()
        if server.assembly is not None:
            await server.assembly.aclose()
