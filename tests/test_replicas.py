"""Across replicas: a real redis-server (or a three-master Redis Cluster), a real Postgres and two
`feather-grpc serve` processes.

The admitted rate for a provider:model stays within burst + rps x elapsed over the pair, a tenant's
budget is never overspent, and Usage on either replica returns the same totals once the ledger has
caught up. Also: with `stateFailureMode: closed`, a Redis outage turns health NOT_SERVING and calls
UNAVAILABLE, and both recover when Redis is back; with `open`, calls keep being served."""

from __future__ import annotations

import asyncio
import copy
import datetime as dt
import hashlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from sim.upstream import Reply, SimUsage, UpstreamSimulator
from tests.gateway_harness import MOCK_CONFIG, rich_error, running_gateway, user
from tests.ops_harness import GatewayProcess, free_port
from tests.pg_server import PgServer
from tests.redis_cluster import RedisCluster
from tests.redis_relay import RedisRelay
from tests.redis_server import RedisServer

ACME, GLOBEX, ADMIN = "fk_replica_acme", "fk_replica_globex", "fk_replica_admin"
RPS, BURST = 4, 4


def _h(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _auth(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


@pytest.fixture(scope="module")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="module")
def redis_cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="module")
def postgres() -> Iterator[PgServer]:
    with PgServer() as server:
        yield server


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSimulator]:
    async with UpstreamSimulator() as s:
        yield s


def replica_config(sim: UpstreamSimulator) -> dict[str, Any]:
    return {
        "rateLimitMode": "reject",
        "retry": {"maxAttempts": 1},
        "limits": {"openai:gpt-limited": {"rps": RPS, "burst": BURST}},
        "tenants": {
            "acme": {"keys": [_h(ACME)], "budget": {"dailyUsd": 0.02}},
            "globex": {"keys": [_h(GLOBEX)]},
            "ops": {"keys": [_h(ADMIN)], "role": "admin"},
        },
        "providers": {
            "openai": {
                "type": "openai",
                "apiKeyEnv": "SIM_OPENAI_KEY",
                "baseUrl": sim.url + "/v1",
                "models": [
                    {"name": "gpt-limited", "inputPer1K": 0.03, "outputPer1K": 0.06},
                    {"name": "gpt-sim", "inputPer1K": 0.03, "outputPer1K": 0.06},
                ],
            }
        },
    }


async def _start_replica(tmp: Path, name: str, config_path: Path, env: dict[str, str]) -> tuple[GatewayProcess, str]:
    cwd = tmp / name
    cwd.mkdir()
    port = free_port()
    proc = GatewayProcess.start(["feather-grpc", "serve", "--config", str(config_path), "--port", str(port)], env, cwd)
    await proc.wait_logged("serving on", timeout_s=30)
    return proc, f"127.0.0.1:{port}"


@pytest.mark.parametrize("shared", ["redis", "redis-cluster"])
async def test_two_replicas_share_limits_budgets_and_the_ledger(
    tmp_path: Path, shared: str, request: pytest.FixtureRequest, postgres: PgServer, sim: UpstreamSimulator
) -> None:
    sim.default = Reply(latency_s=0.2, usage=SimUsage(input=10, output=20))
    config_path = tmp_path / "feather.config.json"
    config_path.write_text(json.dumps(replica_config(sim)))
    dsn = postgres.create_database(f"replicas_{shared.replace('-', '_')}")
    fixture = "redis_cluster" if shared == "redis-cluster" else "redis_server"
    redis: RedisServer | RedisCluster = request.getfixturevalue(fixture)
    env = {"SIM_OPENAI_KEY": "sk-replicas", "REDIS_URL": redis.url, "DATABASE_URL": dsn}
    replicas = [await _start_replica(tmp_path, n, config_path, env) for n in ("a", "b")]
    channels = [grpc.aio.insecure_channel(address) for _, address in replicas]
    stubs = [pb_grpc.FeatherServiceStub(c) for c in channels]
    try:
        # 1. provider:model bucket shared through Redis: fire at both replicas for ~1.5 s.
        started = time.monotonic()
        admitted = refused = 0
        while time.monotonic() - started < 1.5:
            batch = [
                stubs[i % 2].Chat(pb.ChatRequest(model="gpt-limited", messages=[user("go")]), metadata=_auth(GLOBEX))
                for i in range(6)
            ]
            for outcome in await asyncio.gather(*batch, return_exceptions=True):
                if isinstance(outcome, pb.ChatResponse):
                    admitted += 1
                else:
                    assert isinstance(outcome, grpc.aio.AioRpcError)
                    assert rich_error(outcome).reason == "RATE_LIMITED"
                    refused += 1
        elapsed = time.monotonic() - started
        assert refused > 0
        assert BURST <= admitted <= BURST + RPS * elapsed + 1  # +1: a token refilled at the boundary

        # 2. acme's budget: 12 concurrent calls over both replicas; worst case ~6.2M nanos, cap 20M -> 3 fit.
        calls = [
            stubs[i % 2].Chat(
                pb.ChatRequest(model="gpt-sim", messages=[user("spend")], max_tokens=100), metadata=_auth(ACME)
            )
            for i in range(12)
        ]
        results = await asyncio.gather(*calls, return_exceptions=True)
        ok = [r for r in results if isinstance(r, pb.ChatResponse)]
        assert len(ok) == 3
        assert {rich_error(r).reason for r in results if isinstance(r, grpc.aio.AioRpcError)} == {"BUDGET_EXCEEDED"}

        # 3. both replicas answer Usage from Postgres with the same totals once the spools have shipped.
        expected = admitted + refused + 12
        deadline = time.monotonic() + 15
        while True:
            totals = [(await s.Usage(pb.UsageRequest(), metadata=_auth(ADMIN))).total for s in stubs]
            if all(t.request_count == expected for t in totals) or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        assert [t.request_count for t in totals] == [expected, expected]
        assert totals[0] == totals[1]
        acme = (await stubs[1].Usage(pb.UsageRequest(), metadata=_auth(ACME))).total
        assert acme.cost_nanos_usd == sum(r.cost_nanos_usd for r in ok) <= 20_000_000
        if isinstance(redis, RedisCluster):  # the shared state really is spread over the masters
            assert sum(1 for i in range(3) if redis.node(i).dbsize() > 0) >= 2
    finally:
        for c in channels:
            await c.close()
        for proc, _ in replicas:
            proc.proc.terminate()
        for proc, _ in replicas:
            assert await proc.wait_exit(30) == 0


def _redis_config(mode: str) -> dict[str, Any]:
    doc = copy.deepcopy(MOCK_CONFIG)
    doc["stateFailureMode"] = mode
    doc["tenants"] = {"default": {"limits": {"rpm": 6000}}}  # every call touches Redis
    return doc


async def test_fail_closed_turns_not_serving_while_redis_is_down_and_recovers() -> None:
    with RedisServer() as redis:
        async with running_gateway(_redis_config("closed"), {"REDIS_URL": redis.url}) as gw:
            health = health_pb2_grpc.HealthStub(gw.channel)
            await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("a")]))
            watch = health.Watch(health_pb2.HealthCheckRequest(service="feather.v1.FeatherService"))
            assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
            redis.stop()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("b")]), timeout=10)
            err = rich_error(caught.value)
            assert err.code == grpc.StatusCode.UNAVAILABLE and err.reason == "STATE_UNAVAILABLE"
            assert (await asyncio.wait_for(watch.read(), 10)).status == health_pb2.HealthCheckResponse.NOT_SERVING
            redis.start()
            assert (await asyncio.wait_for(watch.read(), 10)).status == health_pb2.HealthCheckResponse.SERVING
            await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("c")]))
            watch.cancel()


async def test_a_misconfigured_redis_says_why_it_is_unreachable(caplog: pytest.LogCaptureFixture) -> None:
    with RedisServer(extra_args=("--requirepass", "right-pw")) as redis:
        url = f"redis://:wrong-pw-in-url@127.0.0.1:{redis.port}/0"
        async with running_gateway(_redis_config("closed"), {"REDIS_URL": url}) as gw:
            watch = health_pb2_grpc.HealthStub(gw.channel).Watch(
                health_pb2.HealthCheckRequest(service="feather.v1.FeatherService")
            )
            while (await asyncio.wait_for(watch.read(), 10)).status != health_pb2.HealthCheckResponse.NOT_SERVING:
                pass
            watch.cancel()
    (line,) = [r.getMessage() for r in caplog.records if "UNAVAILABLE" in r.getMessage()]
    assert "AUTH refused" in line and "WRONGPASS" in line and "wrong-pw-in-url" not in line


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_a_redis_that_lost_its_data_does_not_hand_out_a_spent_budget_again(mode: str) -> None:
    """Redis restarted without persistence (or failed over, or evicted the key) forgets the spend counters;
    the first reservation that finds a window missing has the gateway restore it from the ledger."""
    doc = _redis_config(mode)
    doc["tenants"]["default"]["budget"] = {"dailyUsd": 0.0005}  # ~25 calls of 19,000 nano-dollars
    ask = pb.ChatRequest(model="fast", messages=[user("spend")], max_tokens=10)

    costs: set[int] = set()

    async def spend_until_refused(gw: Any) -> int:
        admitted = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                costs.add((await gw.stub.Chat(ask)).cost_nanos_usd)
                admitted += 1
            except grpc.aio.AioRpcError as e:
                reason = rich_error(e).reason
                if reason == "BUDGET_EXCEEDED":
                    return admitted
                assert reason == "STATE_UNAVAILABLE", reason  # Redis still coming back
                await asyncio.sleep(0.05)
        raise AssertionError("the budget never ran out")

    with RedisServer() as redis:
        async with running_gateway(doc, {"REDIS_URL": redis.url}) as gw:
            before = await spend_until_refused(gw)
            assert before > 10
            redis.stop()
            redis.start()  # empty: every counter is gone
            after = await spend_until_refused(gw)
            billed = (await gw.stub.Usage(pb.UsageRequest())).total.cost_nanos_usd
    assert after <= 2, f"{after} calls admitted again after the restart"  # the one that found it missing
    (per_call,) = costs
    assert billed <= 500_000 + 2 * per_call


@pytest.mark.parametrize("mode", ["closed", "open"])
async def test_no_call_racing_the_restore_of_a_lost_budget_is_admitted(mode: str) -> None:
    """Right after Redis restarts empty, 50 concurrent calls of a tenant whose budget is spent all find its
    window missing at once: none may be judged before the spend is restored from the ledger."""
    doc = _redis_config(mode)
    doc["tenants"]["default"]["budget"] = {"dailyUsd": 0.0005}
    doc["tenants"]["other"] = {"keys": [_h("fk-other")], "limits": {"rpm": 6000}}  # no budget
    doc["tenants"]["default"]["keys"] = [_h("fk-spender")]
    spender, other = _auth("fk-spender"), _auth("fk-other")
    ask = pb.ChatRequest(model="fast", messages=[user("spend")], max_tokens=10)
    with RedisServer() as redis:
        async with running_gateway(doc, {"REDIS_URL": redis.url}) as gw:
            for _ in range(500):  # spend the budget
                try:
                    await gw.stub.Chat(ask, metadata=spender)
                except grpc.aio.AioRpcError as e:
                    assert rich_error(e).reason == "BUDGET_EXCEEDED"
                    break
            else:
                raise AssertionError("the budget never ran out")
            redis.stop()
            redis.start()  # SIGKILL, back empty
            while True:  # a call that touches Redis but no budget, until the gateway has reconnected
                try:
                    await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("hi")]), metadata=other)
                    break
                except grpc.aio.AioRpcError as e:
                    assert rich_error(e).reason == "STATE_UNAVAILABLE"
            assert await _redis_keys(redis, "*budget:day*") == []  # the spent window really is gone
            results = await asyncio.gather(
                *(gw.stub.Chat(ask, metadata=spender) for _ in range(50)), return_exceptions=True
            )
    admitted = [r for r in results if isinstance(r, pb.ChatResponse)]
    assert not admitted, f"{len(admitted)} of 50 calls admitted before the restore"
    assert {rich_error(r).reason for r in results if isinstance(r, grpc.aio.AioRpcError)} == {"BUDGET_EXCEEDED"}


async def test_settlements_lost_on_the_way_to_redis_neither_hold_reservations_nor_overspend() -> None:
    """A relay resets the Redis connection as settlements pass (alternately before Redis gets them and
    after, losing the reply): the reservations are given back and the spend matches the ledger within
    seconds, and spending until refused never passes the cap."""
    from feather_grpc.state.redis_budgets import _BUDGET_SETTLE
    from feather_grpc.state.redis_scripts import Script

    doc = _redis_config("closed")
    cap = 500_000
    doc["tenants"]["default"]["budget"] = {"dailyUsd": cap / 1e9}
    ask = pb.ChatRequest(model="fast", messages=[user("spend")], max_tokens=10)
    window = f"feather:{{tenant:default}}:budget:day:{dt.datetime.now(dt.UTC):%Y-%m-%d}"

    async def spend_until_refused(gw: Any) -> None:
        for _ in range(500):
            try:
                await gw.stub.Chat(ask)
            except grpc.aio.AioRpcError as e:
                reason = rich_error(e).reason
                if reason == "BUDGET_EXCEEDED":
                    return
                assert reason == "STATE_UNAVAILABLE", reason  # a reset also failed an admission in flight
        raise AssertionError("the budget never ran out")

    async def reconciled(gw: Any, redis: RedisServer) -> tuple[int, int, int]:
        """(spent, reserved, billed) once Redis's counters match the ledger, or as they were after 10 s."""
        deadline = time.monotonic() + 10
        while True:
            billed = (await gw.stub.Usage(pb.UsageRequest())).total.cost_nanos_usd
            spent, reserved = (int(v or 0) for v in await _redis_call(redis, "HMGET", window, "spent", "reserved"))
            if (spent, reserved) == (billed, 0) or time.monotonic() > deadline:
                return spent, reserved, billed
            await asyncio.sleep(0.05)

    with RedisServer() as redis:
        relay = RedisRelay(redis.port, trigger=Script.of(_BUDGET_SETTLE).sha.encode())
        async with relay, running_gateway(doc, {"REDIS_URL": relay.url}) as gw:
            await gw.stub.Chat(ask)  # loads the scripts (EVAL carries the text, not the sha)
            relay.resets_left = 6  # the next settlements, and their re-sends, are lost
            for _ in range(5):
                await gw.stub.Chat(ask)
            assert relay.resets >= 3 and relay.dropped >= 2
            spent, reserved, billed = await reconciled(gw, redis)
            assert (spent, reserved) == (billed, 0), "a lost settlement still holds its reservation"

            relay.resets_left = 6
            await spend_until_refused(gw)
            spent, reserved, billed = await reconciled(gw, redis)
            assert (spent, reserved) == (billed, 0)
            await spend_until_refused(gw)  # once reconciled: the tenant was not stopped short of its cap
            final = (await gw.stub.Usage(pb.UsageRequest())).total
    per_call = final.cost_nanos_usd // (final.request_count - final.error_count)
    assert cap - 2 * per_call < final.cost_nanos_usd <= cap


async def test_a_restarted_gateway_lifts_the_shared_spend_to_its_ledger(tmp_path: Path) -> None:
    """A gateway that died with settlements Redis never got (their leases then expire and give the
    reservations back) left the cost in its ledger: the next start reconciles the spend with it."""
    doc = _redis_config("closed")
    doc["ledger"] = {"type": "sqlite", "path": str(tmp_path / "usage.db")}
    doc["tenants"]["default"]["budget"] = {"dailyUsd": 1}
    window = f"feather:{{tenant:default}}:budget:day:{dt.datetime.now(dt.UTC):%Y-%m-%d}"
    with RedisServer() as redis:
        async with running_gateway(doc, {"REDIS_URL": redis.url}) as gw:
            for _ in range(3):
                await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("spend")]))
            billed = (await gw.stub.Usage(pb.UsageRequest())).total.cost_nanos_usd
        assert int(await _redis_call(redis, "HGET", window, "spent")) == billed
        await _redis_call(redis, "HSET", window, "spent", "0")  # as if none of the settlements had landed
        async with running_gateway(doc, {"REDIS_URL": redis.url}):
            deadline = time.monotonic() + 10
            while True:
                spent = int(await _redis_call(redis, "HGET", window, "spent"))
                if spent == billed or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.05)
        assert spent == billed


async def _redis_call(redis: RedisServer, *args: str) -> Any:
    from feather_grpc.state.resp import RedisClient

    client = RedisClient.from_url(redis.url)
    try:
        return await client.call(*args)
    finally:
        await client.aclose()


async def _redis_keys(redis: RedisServer, pattern: str) -> list[bytes]:
    from feather_grpc.state.resp import RedisClient

    client = RedisClient.from_url(redis.url)
    try:
        return list(await client.call("KEYS", pattern))
    finally:
        await client.aclose()


async def test_fail_open_keeps_serving_with_local_limits() -> None:
    with RedisServer() as redis:
        async with running_gateway(_redis_config("open"), {"REDIS_URL": redis.url}) as gw:
            await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("a")]))
            redis.stop()
            reply = await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("b")]), timeout=10)
            assert reply.provider == "mock"
            health = health_pb2_grpc.HealthStub(gw.channel)
            status = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
            assert status == health_pb2.HealthCheckResponse.SERVING


async def test_fail_open_reconciles_budget_spend_from_the_ledger_when_redis_returns() -> None:
    import datetime as dt

    from feather_grpc.state.limits import BudgetWindow
    from feather_grpc.state.redis_state import RedisState

    doc = _redis_config("open")
    doc["tenants"] = {"default": {"budget": {"dailyUsd": 5}}}
    with RedisServer() as redis:
        async with running_gateway(doc, {"REDIS_URL": redis.url}) as gw:
            costs = [(await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("before")]))).cost_nanos_usd]
            redis.stop()
            for text in ("during", "the outage"):
                costs.append((await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user(text)]))).cost_nanos_usd)
            redis.start()  # back, and empty: it forgot even the spend it had seen
            probe = RedisState.from_url(redis.url)
            today = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")
            window = BudgetWindow("day", today, 5_000_000_000, 2 * 86_400)
            deadline = time.monotonic() + 10
            spent = None
            while spent != sum(costs) and time.monotonic() < deadline:  # the watcher pings once a second
                spent = await _spent_or_none(probe, window)
                await asyncio.sleep(0.05)
            await probe.aclose()
            assert spent == sum(costs)


async def _spent_or_none(state: Any, window: Any) -> int | None:
    try:
        return int(await state.budgets.spent("default", window))
    except Exception:
        return None
