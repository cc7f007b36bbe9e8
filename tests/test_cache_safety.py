"""Response cache, PII redaction, input limits, load shedding, and TLS / mutual TLS."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import subprocess
import sys
from pathlib import Path
from subprocess import PIPE, STDOUT
from typing import Any

import grpc
import pytest

from feather_grpc import config
from feather_grpc.core.cache import CachedReply, CacheSettings
from feather_grpc.core.types import FinishReason
from feather_grpc.engine.redaction import Redactor
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from feather_grpc.server.app import GatewayServer
from feather_grpc.state.memory_cache import MemoryResponseCache
from sim.upstream import Reply, UpstreamSimulator
from tests.gateway_harness import MOCK_CONFIG, rich_error, running_gateway, user
from tests.test_gateway_upstream import ENV, sim_config


@pytest.fixture
async def sim() -> Any:
    async with UpstreamSimulator() as s:
        yield s


def ask(text: str = "What is 2+2?", temperature: float | None = 0.0, **kw: Any) -> pb.ChatRequest:
    return pb.ChatRequest(model="fast", messages=[user(text)], temperature=temperature, **kw)


async def test_repeat_of_a_deterministic_request_is_a_free_cache_hit(sim: UpstreamSimulator) -> None:
    async with running_gateway(sim_config(sim), ENV) as gw:
        first = await gw.stub.Chat(ask())
        second = await gw.stub.Chat(ask("  What is   2+2? "))  # whitespace-collapsed: same key
        assert not first.cached and first.cost_nanos_usd > 0
        assert second.cached and second.cost_nanos_usd == 0 and second.attempts == []
        assert (second.message.content, second.provider, second.model) == (
            first.message.content,
            first.provider,
            first.model,
        )
        events = [
            e
            async for e in gw.stub.StreamChat(
                pb.StreamChatRequest(model="fast", messages=[user("What is 2+2?")], temperature=0.0)
            )
        ]
        assert events[-1].end.cached and "".join(e.delta.content for e in events[1:-1]) == first.message.content
        assert len(sim.requests) == 1
        total = (await gw.stub.Usage(pb.UsageRequest())).total
        assert (total.request_count, total.cached_count, total.ok_count) == (3, 2, 3)
        assert total.cost_nanos_usd == first.cost_nanos_usd


async def test_what_is_not_cached(sim: UpstreamSimulator) -> None:
    async with running_gateway(sim_config(sim), ENV) as gw:
        for _ in range(2):
            await gw.stub.Chat(ask(temperature=0.9))  # sampling: not deterministic
            await gw.stub.Chat(ask(temperature=None))  # provider default temperature
            await gw.stub.Chat(ask(cache=pb.CACHE_MODE_BYPASS))  # caller opted out
            await gw.stub.Chat(
                pb.ChatRequest(
                    model="fast",
                    temperature=0.0,
                    messages=[user("a"), pb.Message(role=pb.ROLE_ASSISTANT, content="b"), user("c")],
                )
            )  # multi-turn
        assert len(sim.requests) == 8


async def test_cache_entries_expire_and_are_bounded() -> None:
    now = [0.0]
    cache = MemoryResponseCache(CacheSettings(ttl_s=10, max_size=2), clock=lambda: now[0])
    reply = CachedReply("p", "m", "x", (), FinishReason.STOP)
    await cache.put("a", reply)
    await cache.put("b", reply)
    await cache.get("a")  # a is now the most recently used
    await cache.put("c", reply)
    assert await cache.get("b") is None and await cache.get("a") == reply
    now[0] = 10.0
    assert await cache.get("a") is None
    assert CachedReply.decode(reply.encode()) == reply


def test_cache_env_overrides() -> None:
    cfg = config.load(None, {"CACHE_TTL_MS": "1500", "CACHE_MAX_SIZE": "7"})
    assert (cfg.routing.cache.ttl_s, cfg.routing.cache.max_size) == (1.5, 7)


async def test_pii_is_redacted_before_the_request_leaves(sim: UpstreamSimulator) -> None:
    doc = sim_config(sim, safety={"redactPii": True})
    text = (
        "card 4111 1111 1111 1111, ssn 123-45-6789, mail jane.doe@example.com, call +1 415 555 0100; "
        "order 1234567890123 stays"
    )
    async with running_gateway(doc, ENV) as gw:
        await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user(text)]))
    sent = sim.requests[0].body["messages"][0]["content"]
    assert sent == (
        "card [REDACTED_CARD], ssn [REDACTED_SSN], mail [REDACTED_EMAIL], call [REDACTED_PHONE]; "
        "order 1234567890123 stays"
    )


def test_redactor_kinds_are_selectable() -> None:
    assert Redactor(["email"]).text("x@y.io 123-45-6789") == "[REDACTED_EMAIL] 123-45-6789"


async def test_input_limits_are_invalid_argument_with_field_paths() -> None:
    doc = copy.deepcopy(MOCK_CONFIG)
    doc["safety"] = {"maxMessages": 2, "maxContentChars": 10, "maxOutputTokens": 100}
    doc["server"] = {"maxMessageBytes": 4096}
    async with running_gateway(doc) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("a"), user("b"), user("c")]))
        assert [f for f, _ in rich_error(caught.value).violations] == ["messages"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("x" * 11)], max_tokens=101))
        assert [f for f, _ in rich_error(caught.value).violations] == ["messages[0].content", "max_tokens"]
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="fast", messages=[user("x" * 5000)]))
        assert [f for f, _ in rich_error(caught.value).violations] == ["request"]  # over server.maxMessageBytes


async def test_load_shedding_answers_overloaded_with_retry_info(sim: UpstreamSimulator) -> None:
    sim.default = Reply(latency_s=0.5)
    doc = sim_config(sim, server={"maxInFlight": 1})
    async with running_gateway(doc, ENV) as gw:
        slow = asyncio.ensure_future(gw.stub.Chat(ask(temperature=1.0)))
        await sim.wait_requests(1, timeout_s=5)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(ask(temperature=1.0))
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.reason == "OVERLOADED"
        assert err.retry_delay_s is not None and err.retry_delay_s > 0
        assert (await slow).provider == "openai"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_pki(d: Path) -> None:
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        "/CN=feather-test-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        cwd=d,
    )
    for name, san in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1"), ("client", "subjectAltName=DNS:client")):
        _openssl(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            f"/CN={name}",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            cwd=d,
        )
        (d / f"{name}.ext").write_text(san + "\n")
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
            "-out",
            f"{name}.pem",
            cwd=d,
        )


@pytest.mark.parametrize("mutual", [False, True])
async def test_tls_and_mutual_tls(tmp_path: Path, mutual: bool) -> None:
    _make_pki(tmp_path)
    doc = copy.deepcopy(MOCK_CONFIG)
    tls: dict[str, str] = {"certFile": str(tmp_path / "server.pem"), "keyFile": str(tmp_path / "server.key")}
    if mutual:
        tls["clientCaFile"] = str(tmp_path / "ca.pem")
    doc["server"] = {"tls": tls}
    cfg = config.resolve(config.parse_file_config(json.dumps(doc), "<test>"), {}, "<test>")
    server = GatewayServer(cfg)
    port = await server.start("127.0.0.1", 0)
    ca = (tmp_path / "ca.pem").read_bytes()
    client_pair = ((tmp_path / "client.key").read_bytes(), (tmp_path / "client.pem").read_bytes())
    try:
        creds = grpc.ssl_channel_credentials(ca, *client_pair) if mutual else grpc.ssl_channel_credentials(ca)
        async with grpc.aio.secure_channel(f"localhost:{port}", creds) as channel:
            reply = await pb_grpc.FeatherServiceStub(channel).Chat(ask(), timeout=10)
            assert reply.provider == "mock"
        async with grpc.aio.insecure_channel(f"localhost:{port}") as plain:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await pb_grpc.FeatherServiceStub(plain).Chat(ask(), timeout=5)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        if mutual:  # a client without a certificate is turned away
            async with grpc.aio.secure_channel(f"localhost:{port}", grpc.ssl_channel_credentials(ca)) as anon:
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await pb_grpc.FeatherServiceStub(anon).Chat(ask(), timeout=5)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # The command line speaks TLS too: the health check (the container's HEALTHCHECK) and chat.
        pki = ["--ca-cert", str(tmp_path / "ca.pem")]
        if mutual:
            pki += ["--cert", str(tmp_path / "client.pem"), "--key", str(tmp_path / "client.key")]
        code, out = await _cli("health", "--address", f"localhost:{port}", *pki)
        assert code == 0 and "SERVING" in out
        code, out = await _cli("health", "--address", f"localhost:{port}")  # plaintext to a TLS server
        assert code == 1 and "UNAVAILABLE" in out
        code, out = await _cli("chat", "--addr", f"localhost:{port}", *pki, "--model", "fast", "hello over tls")
        assert code == 0 and "hello over tls" in out and "mock/mock-fast" in out
    finally:
        await server.stop(0)


async def _cli(*args: str) -> tuple[int, str]:
    """Runs `feather-grpc ARGS` without blocking this event loop (the server under test runs on it)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "feather_grpc.cli", *args, stdout=PIPE, stderr=STDOUT, env={**os.environ, "PORT": ""}
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=60)
    assert proc.returncode is not None
    return proc.returncode, out.decode()
