"""Tenants: API keys and JWTs, allow-lists, usage isolation, request/token limits, concurrency, budgets."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import subprocess
import sys
import time
from typing import Any

import grpc
import jwt
import pytest

from feather_grpc import config
from feather_grpc.core.errors import Unauthenticated
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.server.tenancy import TenantGate
from feather_grpc.state.memory_limits import MemoryRateLimiter
from sim.upstream import Reply, SimUsage, UpstreamSimulator
from tests.gateway_harness import MOCK_CONFIG, rich_error, running_gateway, user
from tests.test_gateway_upstream import ENV, sim_config

ACME_KEY, GLOBEX_KEY, ADMIN_KEY = "fk_acme_secret", "fk_globex_secret", "fk_admin_secret"


def _h(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def tenant_config(**acme: Any) -> dict[str, Any]:
    doc = copy.deepcopy(MOCK_CONFIG)
    doc["rateLimitMode"] = "reject"
    doc["tenants"] = {
        "acme": {"keys": [_h(ACME_KEY)], **acme},
        "globex": {"keys": [_h(GLOBEX_KEY)]},
        "ops": {"keys": [_h(ADMIN_KEY)], "role": "admin"},
    }
    return doc


def bearer(key: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {key}"),)


def chat(text: str = "hi", model: str = "fast", **kw: Any) -> pb.ChatRequest:
    return pb.ChatRequest(model=model, messages=[user(text)], **kw)


async def test_keys_authenticate_and_unknown_or_missing_keys_are_rejected() -> None:
    async with running_gateway(tenant_config()) as gw:
        assert (await gw.stub.Chat(chat(), metadata=bearer(ACME_KEY))).provider == "mock"
        for metadata in ((), bearer("fk_wrong"), (("authorization", ACME_KEY),)):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.Chat(chat(), metadata=metadata)
            err = rich_error(caught.value)
            assert err.code == grpc.StatusCode.UNAUTHENTICATED and err.reason == "API_KEY_INVALID"
            assert ACME_KEY not in err.message
        rows = (
            await gw.stub.Usage(pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TENANT]), metadata=bearer(ADMIN_KEY))
        ).rows
        # The refused calls are in the ledger too, under no tenant ("": nobody authenticated).
        assert [(r.tenant, r.request_count, r.error_count) for r in rows] == [("", 3, 3), ("acme", 1, 0)]


async def test_jwt_with_tenant_claim_and_expiry() -> None:

    doc = tenant_config()
    secret = "s3cret-for-tests-only-32-bytes-long!!"
    good = jwt.encode({"tenant": "globex", "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    expired = jwt.encode({"tenant": "globex", "exp": int(time.time()) - 60}, secret, algorithm="HS256")
    forged = jwt.encode(
        {"tenant": "globex", "exp": int(time.time()) + 60}, "another-secret-that-is-32-bytes-long!", algorithm="HS256"
    )
    async with running_gateway(doc, {"JWT_SECRET": secret}) as gw:
        await gw.stub.Chat(chat(), metadata=bearer(good))
        for token in (expired, forged):
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.Chat(chat(), metadata=bearer(token))
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        own = await gw.stub.Usage(pb.UsageRequest(), metadata=bearer(good))
        assert own.total.request_count == 1


JWT_SECRET = "s3cret-for-tests-only-32-bytes-long!!"


def _jwt(tenant: str) -> str:
    return jwt.encode({"tenant": tenant, "exp": int(time.time()) + 60}, JWT_SECRET, algorithm="HS256")


def test_a_verified_jwt_is_not_verified_again_until_it_expires(monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller sends the same token with every call: it is verified once, then only its expiry is checked
    (on the gate's clock, as PyJWT reads `exp`); a forged token is never kept."""
    cfg = config.resolve(
        config.parse_file_config(json.dumps(tenant_config()), "<test>"), {"JWT_SECRET": JWT_SECRET}, "<test>"
    )
    now = time.time()
    gate = TenantGate(cfg, MemoryRateLimiter(), clock=lambda: now)
    verified: list[str] = []
    decode = jwt.decode

    def counted(token: str, *args: Any, **kwargs: Any) -> Any:
        verified.append(token)
        return decode(token, *args, **kwargs)

    monkeypatch.setattr(jwt, "decode", counted)
    token = jwt.encode({"tenant": "globex", "exp": int(now) + 60}, JWT_SECRET, algorithm="HS256")
    forged = jwt.encode(
        {"tenant": "globex", "exp": int(now) + 60}, "another-secret-32-bytes-long!!!!", algorithm="HS256"
    )
    for _ in range(3):
        assert gate.authenticate(f"Bearer {token}").name == "globex"
        with pytest.raises(Unauthenticated):
            gate.authenticate(f"Bearer {forged}")
    assert verified == [token, forged, forged, forged]
    now = int(now) + 60  # the token's `exp`: expired from that second on
    with pytest.raises(Unauthenticated):
        gate.authenticate(f"Bearer {token}")


async def test_a_jwt_tenant_missing_from_the_config_may_call_nothing_without_a_default_policy() -> None:
    async with running_gateway(tenant_config(), {"JWT_SECRET": JWT_SECRET}) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(chat(), metadata=bearer(_jwt("ghost")))
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.PERMISSION_DENIED and err.reason == "MODEL_NOT_ALLOWED"
        assert err.metadata["tenant"] == "ghost"
        assert not (await gw.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(_jwt("ghost")))).models
        await gw.stub.Chat(chat(), metadata=bearer(_jwt("globex")))  # a listed tenant is unaffected


async def test_a_jwt_tenant_missing_from_the_config_gets_the_jwt_default_policy_under_its_own_name() -> None:
    doc = tenant_config()
    # mock-fast bills 1,000 nano-dollars per prompt token: the budget fits about one call.
    doc["jwtDefaultPolicy"] = {"allowedModels": ["fast"], "budget": {"dailyUsd": 0.00003}, "limits": {"rpm": 600}}
    async with running_gateway(doc, {"JWT_SECRET": JWT_SECRET}) as gw:
        ghost = bearer(_jwt("ghost"))
        listed = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=ghost)
        assert [m.name for m in listed.models] == ["mock-fast"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(chat(model="smart"), metadata=ghost)
        assert rich_error(caught.value).reason == "MODEL_NOT_ALLOWED"
        admitted = 0
        while True:
            try:
                await gw.stub.Chat(chat(max_tokens=10), metadata=ghost)
                admitted += 1
            except grpc.aio.AioRpcError as e:
                err = rich_error(e)
                assert err.reason == "BUDGET_EXCEEDED" and err.metadata["tenant"] == "ghost"
                assert err.metadata["budgetNanosUsd"] == "30000"
                break
            assert admitted < 100, "the default policy's budget never ran out"
        assert admitted >= 1
        await gw.stub.Chat(chat(max_tokens=10), metadata=bearer(_jwt("phantom")))  # its own budget


async def test_a_jwt_tenant_missing_from_the_config_gets_the_default_request_limit() -> None:
    secret = JWT_SECRET
    ghost = jwt.encode({"tenant": "ghost", "exp": int(time.time()) + 60}, secret, algorithm="HS256")
    env = {"JWT_SECRET": secret, "RATE_LIMIT_ENABLED": "true", "RATE_LIMIT_RPS": "1", "RATE_LIMIT_BURST": "2"}
    doc = tenant_config()
    doc["jwtDefaultPolicy"] = {}  # every model; the request limit of tenants without an rpm (RATE_LIMIT_*)
    async with running_gateway(doc, env) as gw:
        results = await asyncio.gather(
            *(gw.stub.Chat(chat(), metadata=bearer(ghost)) for _ in range(5)), return_exceptions=True
        )
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(results) - len(refused) == 2  # the burst
        assert {rich_error(r).reason for r in refused} == {"RATE_LIMITED"}


async def test_allowed_models_give_permission_denied_for_the_rest() -> None:
    async with running_gateway(tenant_config(allowedModels=["fast"])) as gw:
        await gw.stub.Chat(chat(model="fast"), metadata=bearer(ACME_KEY))
        await gw.stub.Chat(chat(model="mock-fast"), metadata=bearer(ACME_KEY))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(chat(model="smart"), metadata=bearer(ACME_KEY))
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.PERMISSION_DENIED and err.reason == "MODEL_NOT_ALLOWED"
        assert err.metadata == {"tenant": "acme", "model": "smart"}
        # ListModels shows each tenant what it may call.
        listed = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(ACME_KEY))
        assert [m.name for m in listed.models] == ["mock-fast"]
        listed = await gw.stub.ListModels(pb.ListModelsRequest(), metadata=bearer(GLOBEX_KEY))
        assert [m.name for m in listed.models] == ["mock-fast", "mock-smart"]


async def test_a_tenant_sees_only_its_own_usage_and_an_admin_sees_all() -> None:
    async with running_gateway(tenant_config()) as gw:
        await gw.stub.Chat(chat(), metadata=bearer(ACME_KEY))
        await gw.stub.Chat(chat(), metadata=bearer(GLOBEX_KEY))
        await gw.stub.Chat(chat(), metadata=bearer(GLOBEX_KEY))
        assert (await gw.stub.Usage(pb.UsageRequest(), metadata=bearer(ACME_KEY))).total.request_count == 1
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Usage(pb.UsageRequest(tenant="globex"), metadata=bearer(ACME_KEY))
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        everyone = await gw.stub.Usage(pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TENANT]), metadata=bearer(ADMIN_KEY))
        assert {r.tenant: r.request_count for r in everyone.rows} == {"acme": 1, "globex": 2}
        assert everyone.total.request_count == 3
        one = await gw.stub.Usage(pb.UsageRequest(tenant="globex"), metadata=bearer(ADMIN_KEY))
        assert one.total.request_count == 2


async def test_requests_per_minute_reject_with_quota_failure_and_retry_info() -> None:
    async with running_gateway(tenant_config(limits={"rpm": 2})) as gw:
        for _ in range(2):
            await gw.stub.Chat(chat(), metadata=bearer(ACME_KEY))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(chat(), metadata=bearer(ACME_KEY))
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "RATE_LIMITED"
        assert err.metadata["subject"] == "tenant:acme:requests"
        assert err.retry_delay_s is not None and 25 < err.retry_delay_s <= 30  # one token per 30 s
        await gw.stub.Chat(chat(), metadata=bearer(GLOBEX_KEY))  # other tenants are unaffected


async def test_provider_model_bucket_limits_in_the_engine() -> None:
    doc = tenant_config()
    doc["limits"] = {"mock:mock-fast": {"rps": 0.5, "burst": 1}}
    async with running_gateway(doc) as gw:
        await gw.stub.Chat(chat(), metadata=bearer(ACME_KEY))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(chat(), metadata=bearer(GLOBEX_KEY))
        err = rich_error(caught.value)
        assert err.reason == "RATE_LIMITED" and err.metadata["subject"] == "provider:mock:mock-fast"
        assert err.retry_delay_s is not None and 1.5 < err.retry_delay_s <= 2.0
        await gw.stub.Chat(chat(model="smart"), metadata=bearer(GLOBEX_KEY))  # other models unaffected


async def test_queued_caller_waits_for_its_token_within_its_deadline() -> None:
    doc = tenant_config(limits={"rpm": 600})  # 10/s, burst 600: drain the burst first
    doc["rateLimitMode"] = "queue"
    doc["limits"] = {"mock:mock-fast": {"rps": 20, "burst": 1}}
    async with running_gateway(doc) as gw:
        calls = [gw.stub.Chat(chat(), metadata=bearer(ACME_KEY), timeout=5) for _ in range(5)]
        replies = await asyncio.gather(*calls)
        assert len(replies) == 5  # 4 of them waited ~50 ms each, in order, instead of failing
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.gather(*[gw.stub.Chat(chat(), metadata=bearer(ACME_KEY), timeout=0.12) for _ in range(8)])
        assert rich_error(caught.value).reason == "RATE_LIMITED"


async def test_queue_admits_only_waiters_whose_deadline_leaves_room_for_the_call() -> None:
    """A waiter whose deadline would run out at the upstream (the route's observed latency after its wait)
    is refused at once, RATE_LIMITED with RetryInfo: every admitted call finishes, and the upstream, which
    bills whatever it starts, sees only those."""
    async with UpstreamSimulator() as sim:
        sim.default = Reply(latency_s=0.5, usage=SimUsage(input=10, output=20))
        doc = sim_config(sim)
        doc["retry"] = {"maxAttempts": 1}
        doc["rateLimitMode"] = "queue"
        doc["limits"] = {"openai:gpt-sim": {"rps": 2.5, "burst": 1}}  # one call every 400 ms
        async with running_gateway(doc, ENV) as gw:
            await gw.stub.Chat(chat(model="gpt-sim"))  # the route's latency is now known: ~0.5 s
            seen = sim.received
            # Waits of 0, 0.4, 0.8, 1.2 ... s. Deadline 1.55 s: waits up to 0.8 s leave room for the call;
            # 1.2 s fits the deadline but leaves less than the call needs.
            results = await asyncio.gather(
                *(gw.stub.Chat(chat(model="gpt-sim"), timeout=1.55) for _ in range(8)), return_exceptions=True
            )
            reached = sim.received - seen
    ok = [r for r in results if isinstance(r, pb.ChatResponse)]
    refused = [rich_error(r) for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert [e.reason for e in refused] == ["RATE_LIMITED"] * len(refused)
    assert all(e.retry_delay_s is not None and e.retry_delay_s > 0 for e in refused)
    assert reached == len(ok) and 2 <= len(ok) <= 3


async def test_queue_leaves_at_least_queue_min_call_ms_for_the_call() -> None:
    """Before a route's latency is known (the mock answers at once), `queueMinCallMs` is the room a
    waiter's deadline must leave; the tenant's request token is judged by the same rule."""
    doc = copy.deepcopy(MOCK_CONFIG)
    doc["rateLimitMode"] = "queue"
    doc["queueMinCallMs"] = 600
    env = {"RATE_LIMIT_ENABLED": "true", "RATE_LIMIT_RPS": "5", "RATE_LIMIT_BURST": "1"}  # one call per 200 ms
    async with running_gateway(doc, env) as gw:
        # Waits of 0, 0.2, ... 1.4 s, deadline 1.5 s: only waits up to 0.9 s leave 600 ms.
        results = await asyncio.gather(*(gw.stub.Chat(chat(), timeout=1.5) for _ in range(8)), return_exceptions=True)
    ok = [r for r in results if isinstance(r, pb.ChatResponse)]
    refused = [rich_error(r) for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert 4 <= len(ok) <= 5
    assert {(e.reason, e.metadata["subject"]) for e in refused} == {("RATE_LIMITED", "tenant:default:requests")}
    assert all(e.retry_delay_s is not None for e in refused)


async def test_budget_is_never_overspent_by_concurrent_calls() -> None:
    async with UpstreamSimulator() as sim:
        sim.default = Reply(latency_s=0.3, usage=SimUsage(input=10, output=20))
        doc = sim_config(sim)
        doc["tenants"] = {"acme": {"keys": [_h(ACME_KEY)], "budget": {"dailyUsd": 0.02}}}
        async with running_gateway(doc, ENV) as gw:
            # gpt-sim: 30,000 nano-USD per input token, 60,000 per output token. Worst case of one call with
            # max_tokens 100: ~ (5 + 100) tokens -> a bit over 6,000,000 nanos, so 3 fit in 20,000,000.
            results = await asyncio.gather(
                *[gw.stub.Chat(chat(model="fast", max_tokens=100), metadata=bearer(ACME_KEY)) for _ in range(12)],
                return_exceptions=True,
            )
            ok = [r for r in results if isinstance(r, pb.ChatResponse)]
            refused = [rich_error(r) for r in results if isinstance(r, grpc.aio.AioRpcError)]
            assert len(ok) == 3 and len(refused) == 9
            assert {e.reason for e in refused} == {"BUDGET_EXCEEDED"}
            meta = refused[0].metadata
            assert meta["window"] == "day" and meta["budgetNanosUsd"] == "20000000" and meta["tenant"] == "acme"
            spent = (await gw.stub.Usage(pb.UsageRequest(), metadata=bearer(ACME_KEY))).total.cost_nanos_usd
            assert spent == sum(r.cost_nanos_usd for r in ok) == 3 * (10 * 30_000 + 20 * 60_000)
            # settled to the real cost: the freed worst-case headroom admits more calls now
            assert (await gw.stub.Chat(chat(max_tokens=100), metadata=bearer(ACME_KEY))).cost_nanos_usd > 0


def _keys_new(tenant: str) -> str:
    run = [sys.executable, "-m", "feather_grpc.cli", "keys", "new", "--tenant", tenant]
    return subprocess.run(run, capture_output=True, text=True, check=True, timeout=60).stdout


async def test_keys_new_prints_a_key_whose_digest_authenticates() -> None:
    out = _keys_new("initech")
    key = out.split("not stored anywhere): ")[1].split()[0]
    snippet = json.loads(out[out.index("{") :])
    doc = copy.deepcopy(MOCK_CONFIG)
    doc["tenants"] = snippet["tenants"]
    assert snippet["tenants"]["initech"]["keys"] == [_h(key)]
    async with running_gateway(doc) as gw:
        await gw.stub.Chat(chat(), metadata=bearer(key))
        assert (await gw.stub.Usage(pb.UsageRequest(), metadata=bearer(key))).total.request_count == 1


async def test_a_request_larger_than_the_token_bucket_is_refused_without_retry_info() -> None:
    async with running_gateway(tenant_config(limits={"tpm": 50})) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(chat(max_tokens=1000), metadata=bearer(ACME_KEY))
        err = rich_error(caught.value)
        assert err.reason == "RATE_LIMITED" and err.metadata["subject"] == "tenant:acme:tpm"
        assert err.retry_delay_s is None  # waiting would not help
        await gw.stub.Chat(chat(max_tokens=10), metadata=bearer(ACME_KEY))


async def test_cache_hits_count_against_the_request_rate_and_refused_requests_take_a_token() -> None:
    """The interceptor asks for the request token and the engine judges it with its own admission; a
    cache hit (which never reaches admission) and a request refused before admission are held to it too."""
    async with running_gateway(tenant_config(limits={"rpm": 3})) as gw:
        repeat = chat("What is 2+2?", temperature=0.0)
        assert not (await gw.stub.Chat(repeat, metadata=bearer(ACME_KEY))).cached  # token 1
        assert (await gw.stub.Chat(repeat, metadata=bearer(ACME_KEY))).cached  # token 2: a hit
        with pytest.raises(grpc.aio.AioRpcError) as invalid:  # token 3, although refused before admission
            await gw.stub.Chat(chat("", temperature=0.0), metadata=bearer(ACME_KEY))
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for request in (repeat, chat("a new question")):  # a hit and a miss alike: no token left
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gw.stub.Chat(request, metadata=bearer(ACME_KEY))
            err = rich_error(caught.value)
            assert err.reason == "RATE_LIMITED" and err.metadata["subject"] == "tenant:acme:requests"
        events = gw.stub.StreamChat(
            pb.StreamChatRequest(model="fast", messages=[user("hi")]), metadata=bearer(ACME_KEY)
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in events:
                pass
        assert rich_error(caught.value).reason == "RATE_LIMITED"
        usage = (await gw.stub.Usage(pb.UsageRequest(), metadata=bearer(ACME_KEY))).total
        assert (usage.ok_count, usage.cached_count, usage.error_count) == (2, 1, 4)
