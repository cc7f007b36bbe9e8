"""Azure OpenAI (`azure-openai`): the adapter against sim/azure.py, Entra tokens from the real azure-identity
against a local managed-identity endpoint, the gateway around it, and the official `openai` SDK's
AzureOpenAI client against the simulator (so the simulator cannot drift from what the SDK sends and reads)."""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from aiohttp import web

from feather_grpc import config
from feather_grpc.config import ConfigError
from feather_grpc.core.errors import ProviderError
from feather_grpc.core.types import (
    ChatRequest,
    FinishReason,
    Message,
    Part,
    PartKind,
    Role,
    StreamFinish,
    TextDelta,
    ToolSpec,
)
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.providers import HttpClient, Provider, ProviderSettings, build_provider
from feather_grpc.providers.azure import AzureOpenAIProvider
from feather_grpc.providers.http import new_session
from feather_grpc.server.app import ServerOptions
from sim.azure import AzureSimulator
from sim.upstream import Reply, SimUsage
from tests.gateway_harness import rich_error, user
from tests.ops_harness import eventually, running_server, scrape_text
from tests.test_sdk_conformance import conforms

KEY = "azure-key-0123456789abcdef"
VERSION = "2024-10-21"


@pytest.fixture
async def sim() -> AsyncIterator[AzureSimulator]:
    async with AzureSimulator(api_key=KEY) as s:
        yield s


@pytest.fixture
async def session() -> AsyncIterator[HttpClient]:
    client = new_session()
    try:
        yield client
    finally:
        await client.close()


def azure(sim: AzureSimulator, session: HttpClient, **kw: Any) -> Provider:
    settings = ProviderSettings(
        name="azure", type="azure-openai", base_url=sim.url, api_key=kw.pop("api_key", KEY), **kw
    )
    return build_provider(settings, session)


def ask(text: str = "hello there") -> ChatRequest:
    return ChatRequest(model="m", messages=[Message(Role.USER, text)], max_tokens=50)


# -- the adapter ------------------------------------------------------------------------------------


async def test_deployment_urls_with_api_version_and_the_api_key_header(
    sim: AzureSimulator, session: HttpClient
) -> None:
    provider = azure(sim, session, api_version=VERSION, upstream_ids=(("gpt-4o", "prod-gpt4o"),))
    out = await provider.chat("gpt-4o", ask())
    assert out.content == "Hello from prod-gpt4o: hello there"
    assert out.finish_reason is FinishReason.STOP
    req = sim.requests[-1]
    assert req.path == "/openai/deployments/prod-gpt4o/chat/completions"
    assert req.headers["api-key"] == KEY
    assert "authorization" not in req.headers  # the key goes in api-key only
    assert req.body["max_completion_tokens"] == 50 and "max_tokens" not in req.body
    assert sim.api_versions == [VERSION]
    # A model without a deployment of its own is deployed under its name.
    await provider.chat("gpt-4o-mini", ask())
    assert sim.requests[-1].path == "/openai/deployments/gpt-4o-mini/chat/completions"


async def test_v1_endpoint_names_the_deployment_in_the_body(sim: AzureSimulator, session: HttpClient) -> None:
    provider = azure(sim, session, upstream_ids=(("gpt-4o", "prod-gpt4o"),))
    out = await provider.chat("gpt-4o", ask())
    req = sim.requests[-1]
    assert req.path == "/openai/v1/chat/completions"
    assert req.body["model"] == "prod-gpt4o"
    assert req.headers["api-key"] == KEY
    assert out.usage.input_tokens > 0


async def test_stream_skips_the_prompt_filter_chunk_and_reports_usage(sim: AzureSimulator, session: HttpClient) -> None:
    sim.enqueue(Reply(content="one two three", usage=SimUsage(9, 3, cached=4, reasoning=1)))
    provider = azure(sim, session, api_version=VERSION)
    events = [e async for e in provider.stream("dep", ask())]
    assert "".join(e.content for e in events if isinstance(e, TextDelta)) == "one two three"
    end = events[-1]
    assert isinstance(end, StreamFinish) and end.finish_reason is FinishReason.STOP
    assert end.usage is not None
    assert (end.usage.input_tokens, end.usage.output_tokens, end.usage.cached_input_tokens) == (9, 3, 4)
    assert end.usage.reasoning_tokens == 1


async def test_content_filter_finish_and_filtered_prompt_are_content_filter(
    sim: AzureSimulator, session: HttpClient
) -> None:
    provider = azure(sim, session, api_version=VERSION)
    sim.enqueue(Reply(content="partial", finish_reason="content_filter"))
    assert (await provider.chat("dep", ask())).finish_reason is FinishReason.CONTENT_FILTER
    sim.enqueue(Reply(content="cut", finish_reason="content_filter"))
    events = [e async for e in provider.stream("dep", ask())]
    assert isinstance(events[-1], StreamFinish) and events[-1].finish_reason is FinishReason.CONTENT_FILTER
    sim.filter_prompt = True
    assert (await provider.chat("dep", ask())).finish_reason is FinishReason.CONTENT_FILTER
    sim.filter_prompt = False
    assert (await provider.chat("dep", ask())).finish_reason is FinishReason.STOP


async def test_content_filter_400_is_the_requests_fault_and_not_retryable(
    sim: AzureSimulator, session: HttpClient
) -> None:
    provider = azure(sim, session, api_version=VERSION)
    for call in (provider.chat("dep", ask()), _drain(provider, "dep")):
        sim.enqueue(Reply(status=400, error_code="content_filter"))
        with pytest.raises(ProviderError) as caught:
            await call
        assert caught.value.reason == "UPSTREAM_CONTENT_FILTERED"
        assert not caught.value.retryable and caught.value.http_status == 400
        assert "content management policy" in caught.value.message


async def _drain(provider: Provider, model: str) -> None:
    async for _ in provider.stream(model, ask()):
        pass


async def test_a_rejected_key_is_auth_failed_and_never_echoed(sim: AzureSimulator, session: HttpClient) -> None:
    wrong = "azure-wrong-key-abcdef0123456789"
    provider = azure(sim, session, api_version=VERSION, api_key=wrong)
    with pytest.raises(ProviderError) as caught:
        await provider.chat("dep", ask())
    assert caught.value.reason == "UPSTREAM_AUTH_FAILED" and not caught.value.retryable
    assert wrong not in caught.value.message


# -- Microsoft Entra tokens through azure-identity ----------------------------------------------------


class ManagedIdentityEndpoint:
    """App Service's managed-identity endpoint (IDENTITY_ENDPOINT/IDENTITY_HEADER), as azure-identity
    calls it: GET ?api-version=2019-08-01&resource=...; answers tokens numbered per request."""

    def __init__(self, secret: str, expires_in_s: int = 3600) -> None:
        self.secret = secret
        self.expires_in_s = expires_in_s
        self.calls = 0
        self.resources: list[str] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> ManagedIdentityEndpoint:
        app = web.Application()
        app.router.add_get("/msi/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/msi/token"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        if request.headers.get("X-IDENTITY-HEADER") != self.secret:
            return web.json_response({"error": "bad header"}, status=401)
        self.calls += 1
        self.resources.append(request.query.get("resource", ""))
        await asyncio.sleep(0.05)  # a slow identity endpoint: concurrent calls must still share one fetch
        expires = int(__import__("time").time()) + self.expires_in_s
        token = f"entra-token-{self.calls}"
        return web.json_response(
            {"access_token": token, "expires_on": str(expires), "resource": "x", "token_type": "Bearer"}
        )


@pytest.fixture
async def identity(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ManagedIdentityEndpoint]:
    for var in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    async with ManagedIdentityEndpoint("identity-header-secret") as endpoint:
        monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint.url)
        monkeypatch.setenv("IDENTITY_HEADER", endpoint.secret)
        yield endpoint


async def test_entra_token_is_fetched_once_off_the_loop_and_sent_as_bearer(
    identity: ManagedIdentityEndpoint, session: HttpClient
) -> None:
    async with AzureSimulator(entra_token="entra-token-1") as sim:
        provider = azure(sim, session, api_key="", auth="entra", api_version=VERSION)
        # The loop keeps running while azure-identity blocks in its thread: ten calls at once, one fetch.
        outs = await asyncio.gather(*(provider.chat("dep", ask()) for _ in range(10)))
        assert all(o.content for o in outs)
        events = [e async for e in provider.stream("dep", ask())]
        assert isinstance(events[-1], StreamFinish)
        assert identity.calls == 1
        assert identity.resources == ["https://cognitiveservices.azure.com"]
        assert {r.headers["authorization"] for r in sim.requests} == {"Bearer entra-token-1"}
        assert all("api-key" not in r.headers for r in sim.requests)
        await provider.aclose()


async def test_entra_token_near_expiry_is_refreshed(identity: ManagedIdentityEndpoint, session: HttpClient) -> None:
    identity.expires_in_s = 60  # inside the 5-minute refresh margin, beyond the 5 s hard margin
    async with AzureSimulator() as sim:
        provider = azure(sim, session, api_key="", auth="entra", api_version=VERSION)
        await provider.chat("dep", ask())
        await provider.chat("dep", ask())  # answered with token 1, starts a background refresh
        assert sim.requests[-1].headers["authorization"] == "Bearer entra-token-1"
        await eventually(lambda: identity.calls == 2, what="a background refresh")
        token = provider._token if isinstance(provider, AzureOpenAIProvider) else None
        assert token is not None
        await eventually(lambda: token._task is None, what="the refresh to land")
        await provider.chat("dep", ask())
        assert sim.requests[-1].headers["authorization"] == "Bearer entra-token-2"
        await provider.aclose()


async def test_entra_failure_is_auth_failed_with_a_safe_message(
    monkeypatch: pytest.MonkeyPatch, session: HttpClient
) -> None:
    async with ManagedIdentityEndpoint("right-secret") as endpoint, AzureSimulator() as sim:
        monkeypatch.setenv("IDENTITY_ENDPOINT", endpoint.url)
        monkeypatch.setenv("IDENTITY_HEADER", "wrong-secret-value")
        for var in ("AZURE_CLIENT_ID", "AZURE_TENANT_ID", "AZURE_CLIENT_SECRET", "AZURE_FEDERATED_TOKEN_FILE"):
            monkeypatch.delenv(var, raising=False)
        provider = azure(sim, session, api_key="", auth="entra", api_version=VERSION)
        with pytest.raises(ProviderError) as caught:
            await provider.chat("dep", ask())
        assert caught.value.reason == "UPSTREAM_AUTH_FAILED" and not caught.value.retryable
        assert caught.value.message.startswith("azure: could not get credentials: ")
        assert "wrong-secret-value" not in caught.value.message
        assert sim.received == 0


# -- config -----------------------------------------------------------------------------------------


def _doc(**provider: Any) -> dict[str, Any]:
    spec = {"type": "azure-openai", "models": [{"name": "gpt-4o", "allowUnpriced": True}], **provider}
    return {"ledger": {"type": "memory"}, "providers": {"az": spec}}


def _load(doc: dict[str, Any], env: dict[str, str] | None = None) -> config.GatewayConfig:
    import json

    return config.resolve(config.parse_file_config(json.dumps(doc), "<test>"), env or {}, "<test>")


@pytest.mark.parametrize(
    ("provider", "path", "words"),
    [
        ({"apiKeyEnv": "K"}, "providers.az.baseUrl", "resource endpoint"),
        ({"baseUrl": "https://r.openai.azure.com"}, "providers.az", "api-key or Entra"),
        ({"baseUrl": "https://r.openai.azure.com", "auth": "entra", "apiKeyEnv": "K"}, "providers.az.auth", "no API"),
    ],
)
def test_config_errors_name_the_field(provider: dict[str, Any], path: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(_doc(**provider), {"K": "key"})
    assert caught.value.path == path and words in str(caught.value)


def test_azure_settings_on_other_providers_are_refused() -> None:
    doc = {
        "ledger": {"type": "memory"},
        "providers": {"openai": {"apiKeyEnv": "K", "apiVersion": "2024-10-21", "models": [{"name": "gpt-4o"}]}},
        "allowUnpriced": True,
    }
    with pytest.raises(ConfigError) as caught:
        _load(doc, {"K": "key"})
    assert caught.value.path == "providers.openai.apiVersion"


def test_config_maps_models_to_deployments() -> None:
    doc = _doc(baseUrl="https://r.openai.azure.com/", apiKeyEnv="K", apiVersion=VERSION)
    doc["providers"]["az"]["models"] = [{"name": "gpt-4o", "deployment": "prod", "allowUnpriced": True}]
    p = _load(doc, {"K": "key"}).providers[0]
    assert (p.type, p.base_url, p.api_version, p.upstream_ids) == (
        "azure-openai",
        "https://r.openai.azure.com",
        VERSION,
        (("gpt-4o", "prod"),),
    )


def test_entra_without_azure_identity_fails_at_load_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "azure.identity", None)  # as if not installed
    with pytest.raises(ConfigError) as caught:
        _load(_doc(baseUrl="https://r.openai.azure.com", auth="entra"))
    assert caught.value.path == "providers.az.auth"
    assert "pip install 'feather-grpc[azure]'" in str(caught.value)
    # The extra is needed only by the provider that uses it: a key-authenticated one loads.
    assert _load(_doc(baseUrl="https://r.openai.azure.com", apiKeyEnv="K"), {"K": "k"}).providers


def test_the_readme_example_loads() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("### Cloud providers") :]
    block = section[section.index("```json") + len("```json") : section.index("```\n\n")]
    cfg = config.resolve(config.parse_file_config(block, "README.md"), {"AZURE_OPENAI_API_KEY": "k"}, "README.md")
    by_name = {p.name: p for p in cfg.providers}
    assert by_name["azure"].upstream_ids == (("gpt-4o", "prod-gpt4o"),)
    assert by_name["azure"].api_version == "2024-10-21"
    assert by_name["azure-eu"].auth == "entra" and by_name["azure-eu"].api_key == ""


# -- the gateway around it ---------------------------------------------------------------------------


def gateway_doc(sim: AzureSimulator, **extra: Any) -> dict[str, Any]:
    return {
        "ledger": {"type": "memory"},
        "retry": {"maxAttempts": 3, "baseMs": 1, "maxMs": 5},
        "providers": {
            "azure": {
                "type": "azure-openai",
                "baseUrl": sim.url,
                "apiKeyEnv": "AZURE_OPENAI_API_KEY",
                "apiVersion": VERSION,
                "models": [
                    {"name": "gpt-4o", "deployment": "prod-gpt4o", "inputPer1M": 2.5, "outputPer1M": 10},
                ],
            },
            "mock": {"type": "mock", "models": [{"name": "mock-fast", "inputPer1K": 0.001, "outputPer1K": 0.002}]},
        },
        "fallbacks": {"gpt-4o": ["mock-fast"]},
        **extra,
    }


ENV = {"AZURE_OPENAI_API_KEY": KEY}


async def test_gateway_serves_bills_retries_and_does_not_fail_over_a_content_filter(sim: AzureSimulator) -> None:
    options = ServerOptions(metrics_port=0, metrics_host="127.0.0.1")
    async with running_server(gateway_doc(sim), ENV, options) as gw:
        sim.enqueue(Reply(usage=SimUsage(1000, 100, cached=0)))
        reply = await gw.stub.Chat(pb.ChatRequest(model="gpt-4o", messages=[user("hi")]))
        assert reply.provider == "azure" and reply.usage.input_tokens == 1000
        assert reply.cost_nanos_usd == 1000 * 2500 + 100 * 10_000  # exact: 2.5 and 10 USD per 1M
        assert sim.requests[-1].path == "/openai/deployments/prod-gpt4o/chat/completions"

        # A 429 with Retry-After is retried on Azure itself.
        before = sim.received
        sim.enqueue(Reply(status=429, retry_after="0"), Reply(content="after the wait"))
        reply = await gw.stub.Chat(pb.ChatRequest(model="gpt-4o", messages=[user("hi")]))
        assert (reply.message.content, reply.provider, sim.received - before) == ("after the wait", "azure", 2)

        # The content filter refusing the prompt: INVALID_ARGUMENT at once, no retry, no fallback to mock.
        before = sim.received
        sim.enqueue(Reply(status=400, error_code="content_filter"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="gpt-4o", messages=[user("hi")]))
        err = rich_error(caught.value)
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT and err.reason == "UPSTREAM_INVALID_REQUEST"
        assert err.metadata["upstreamReason"] == "UPSTREAM_CONTENT_FILTERED"
        assert sim.received - before == 1

        # Streaming through the gateway, and a 503 that falls back to the mock once Azure is out of attempts.
        ends = [m async for m in gw.stub.StreamChat(pb.StreamChatRequest(model="gpt-4o", messages=[user("yo")]))]
        assert ends[-1].end.finish_reason == pb.FINISH_REASON_STOP
        sim.enqueue(*(Reply(status=503) for _ in range(3)))
        reply = await gw.stub.Chat(pb.ChatRequest(model="gpt-4o", messages=[user("hi")]))
        assert reply.provider == "mock"
        assert gw.server.metrics_port is not None
        assert KEY not in scrape_text(gw.server.metrics_port)


async def test_gateway_never_shows_the_key(sim: AzureSimulator, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    options = ServerOptions(metrics_port=0, metrics_host="127.0.0.1")
    async with running_server(gateway_doc(sim), ENV, options) as gw:
        # An upstream that echoes the key in its error message.
        sim.enqueue(Reply(status=400, error_message=f"bad request from key {KEY}"))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="gpt-4o", messages=[user("hi")]))
        details = caught.value.details() or ""
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert KEY not in details and "bad request from key [redacted]" in details
        # Azure refusing the key: the call falls back to the mock, and nothing shows the key.
        sim.azure_key = "the-only-accepted-key"
        reply = await gw.stub.Chat(pb.ChatRequest(model="gpt-4o", messages=[user("hi")]))
        assert reply.provider == "mock"
        assert gw.server.metrics_port is not None
        metrics = scrape_text(gw.server.metrics_port)
    assert 'outcome="fatal_error",provider="azure"' in metrics  # the failures are counted...
    logged = " ".join(str(r.__dict__) for r in caplog.records)  # messages and their structured fields
    assert KEY not in logged and KEY not in metrics  # ...and nothing shows the key


# -- the official SDK against the simulator ---------------------------------------------------------


async def test_openai_sdk_azure_client_against_the_simulator(sim: AzureSimulator) -> None:
    client = openai.AsyncAzureOpenAI(azure_endpoint=sim.url, api_key=KEY, api_version=VERSION, max_retries=0)
    async with client:
        sim.enqueue(Reply(content="hi there", usage=SimUsage(5, 2, cached=1)))
        done = await client.chat.completions.create(model="prod", messages=[{"role": "user", "content": "hello"}])
        assert done.choices[0].message.content == "hi there"
        assert done.usage is not None and done.usage.prompt_tokens_details is not None
        assert done.usage.prompt_tokens_details.cached_tokens == 1
        assert sim.requests[-1].path == "/openai/deployments/prod/chat/completions"
        assert sim.requests[-1].headers["api-key"] == KEY

        stream = await client.chat.completions.create(
            model="prod",
            messages=[{"role": "user", "content": "hello"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = [c async for c in stream]
        assert chunks[0].choices == []  # Azure's prompt-filter chunk, which the SDK reads as a chunk
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == "Hello from prod: hello"
        assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4

        sim.enqueue(Reply(status=400, error_code="content_filter"))
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model="prod", messages=[{"role": "user", "content": "x"}])
        assert caught.value.code == "content_filter"

    v1 = openai.AsyncOpenAI(base_url=sim.url + "/openai/v1", api_key=KEY, max_retries=0)
    async with v1:
        done = await v1.chat.completions.create(model="prod", messages=[{"role": "user", "content": "hello"}])
        assert done.choices[0].message.content == "Hello from prod: hello"
        assert sim.requests[-1].path == "/openai/v1/chat/completions"
    with pytest.raises(openai.AuthenticationError):
        async with openai.AsyncAzureOpenAI(
            azure_endpoint=sim.url, api_key="wrong", api_version=VERSION, max_retries=0
        ) as bad:
            await bad.chat.completions.create(model="prod", messages=[{"role": "user", "content": "x"}])


async def test_responses_api_models_on_azure(session: HttpClient) -> None:
    from sim.responses import ResponsesReply, ResponsesSimulator

    async with ResponsesSimulator(api_key=KEY, path="/openai/v1/responses", azure=True) as rs:
        settings = ProviderSettings(
            name="azure",
            type="azure-openai",
            base_url=rs.url,
            api_key=KEY,
            api_version=VERSION,
            upstream_ids=(("o3-pro", "prod-o3-pro"),),
            responses_models=("o3-pro",),
        )
        provider = build_provider(settings, session)
        rs.enqueue(ResponsesReply(text="deep answer", reasoning_tokens=30, output_tokens=40))
        out = await provider.chat("o3-pro", ask())
        assert out.content == "deep answer" and out.usage.reasoning_tokens == 30
        sent = rs.requests[-1]
        assert sent.body["model"] == "prod-o3-pro" and sent.headers["api-key"] == KEY
        assert "authorization" not in sent.headers
        events = [e async for e in provider.stream("o3-pro", ask())]
        assert isinstance(events[-1], StreamFinish) and events[-1].finish_reason is FinishReason.STOP
    # The provider's chat models keep Chat Completions at their deployment URLs.
    async with AzureSimulator(api_key=KEY) as chat_sim:
        settings = ProviderSettings(
            name="azure",
            type="azure-openai",
            base_url=chat_sim.url,
            api_key=KEY,
            api_version=VERSION,
            responses_models=("o3-pro",),
        )
        out = await build_provider(settings, session).chat("gpt-4o", ask())
        assert out.content == "Hello from gpt-4o: hello there"
        assert chat_sim.requests[-1].path == "/openai/deployments/gpt-4o/chat/completions"


def test_config_api_responses_on_azure() -> None:
    doc = _doc(baseUrl="https://r.openai.azure.com", apiKeyEnv="K")
    doc["providers"]["az"]["models"] = [
        {"name": "o3-pro", "api": "responses", "deployment": "prod-o3", "allowUnpriced": True},
        {"name": "gpt-4o", "allowUnpriced": True},
    ]
    p = _load(doc, {"K": "k"}).providers[0]
    assert p.responses_models == ("o3-pro",) and p.upstream_ids == (("o3-pro", "prod-o3"),)


# -- the contract's parts, reasoning, caching and tool options (issue 13 item 5) ----------------------

PNG = b"\x89PNG\r\n\x1a\n" + bytes(16)
PDF = b"%PDF-1.7 /Type /Page"


def _data_url(media_type: str, data: bytes) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


async def test_parts_reasoning_and_tool_options_go_as_on_openai(sim: AzureSimulator, session: HttpClient) -> None:
    request = ChatRequest(
        model="m",
        messages=[
            Message(
                Role.USER,
                parts=(
                    Part(PartKind.TEXT, text="Look"),
                    Part(PartKind.IMAGE, data=PNG, media_type="image/png", detail="high"),
                    Part(PartKind.DOCUMENT, data=PDF, media_type="application/pdf", title="a.pdf"),
                    Part(PartKind.AUDIO, data=b"RIFF", media_type="wav"),
                ),
            )
        ],
        tools=[ToolSpec("get_weather", "Weather", {"type": "object", "properties": {}}, strict=True)],
        parallel_tool_calls=False,
        reasoning_effort="low",
        prompt_cache_key="k1",
        extra_fields={"user": "u1"},
    )
    await azure(sim, session, upstream_ids=(("gpt-4o", "prod-gpt4o"),)).chat("gpt-4o", request)
    body = sim.requests[-1].body
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look"},
                {"type": "image_url", "image_url": {"url": _data_url("image/png", PNG), "detail": "high"}},
                {"type": "file", "file": {"filename": "a.pdf", "file_data": _data_url("application/pdf", PDF)}},
                {"type": "input_audio", "input_audio": {"data": base64.b64encode(b"RIFF").decode(), "format": "wav"}},
            ],
        }
    ]
    assert body["tools"][0]["function"]["strict"] is True and body["parallel_tool_calls"] is False
    assert (body["reasoning_effort"], body["prompt_cache_key"], body["user"]) == ("low", "k1", "u1")
    conforms("openai", body)  # what the official SDK's chat.completions.create takes


async def test_routing_sends_an_image_to_azure_rather_than_past_it(sim: AzureSimulator) -> None:
    image = pb.Message(role=pb.ROLE_USER, parts=[pb.Part(image=pb.ImagePart(url="https://example.com/a.jpg"))])
    async with running_server(gateway_doc(sim), ENV, ServerOptions()) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="gpt-4o", messages=[image]))
    assert reply.provider == "azure"  # not the mock fallback: Azure's chat API takes images
    assert sim.requests[-1].body["messages"][0]["content"] == [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.jpg"}}
    ]
