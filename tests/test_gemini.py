"""Gemini (`gemini`, an AI Studio key) and Vertex AI (`vertex`, ADC through the real google-auth against a
local OAuth token endpoint): the adapter against sim/gemini.py, the gateway around it, and the official
google-genai SDK against the simulator (so the simulator cannot drift from the real API)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google import genai
from google.genai import errors as genai_errors
from google.genai import types as gt

from feather_grpc import config
from feather_grpc.config import ConfigError
from feather_grpc.core.errors import ProviderError
from feather_grpc.core.types import (
    ChatRequest,
    FinishReason,
    Message,
    Part,
    PartKind,
    ReplyId,
    ResponseFormat,
    Role,
    StreamFinish,
    TextDelta,
    ThinkingBlock,
    ThinkingDelta,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
)
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.providers import HttpClient, Provider, ProviderSettings, build_provider
from feather_grpc.providers.anthropic import AnthropicProvider
from feather_grpc.providers.bedrock import BedrockProvider
from feather_grpc.providers.gemini import GeminiProvider
from feather_grpc.providers.http import new_session
from feather_grpc.server.app import ServerOptions
from sim.gemini import GeminiReply, GeminiSimulator
from tests.gateway_harness import user
from tests.ops_harness import running_server, scrape_text

KEY = "AIzaSy-gemini-sim-key-0123456789"
PROJECT = "feather-sim-project"
WEATHER = ToolSpec(
    name="get_weather",
    description="Weather for a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.fixture
async def sim() -> AsyncIterator[GeminiSimulator]:
    async with GeminiSimulator(api_key=KEY, vertex_token="ya29.sim-token-1") as s:
        yield s


@pytest.fixture
async def session() -> AsyncIterator[HttpClient]:
    client = new_session()
    try:
        yield client
    finally:
        await client.close()


def gemini(sim: GeminiSimulator, session: HttpClient, **kw: Any) -> Provider:
    settings = ProviderSettings(name="gemini", type="gemini", base_url=sim.url + "/v1beta", api_key=KEY, **kw)
    return build_provider(settings, session)


def vertex(sim: GeminiSimulator, session: HttpClient) -> Provider:
    settings = ProviderSettings(
        name="vertex", type="vertex", base_url=sim.url + "/v1", region="us-central1", project=PROJECT
    )
    return build_provider(settings, session)


def ask(text: str = "hello there", **kw: Any) -> ChatRequest:
    return ChatRequest(model="m", messages=[Message(Role.USER, text)], **kw)


# -- the adapter ------------------------------------------------------------------------------------


async def test_generate_content_request_and_reply(sim: GeminiSimulator, session: HttpClient) -> None:
    request = ChatRequest(
        model="m",
        messages=[
            Message(Role.SYSTEM, "Be brief."),
            Message(Role.USER, "weather in Paris?"),
            Message(Role.ASSISTANT, "", tool_calls=(ToolCall("c1", "get_weather", '{"city": "Paris"}'),)),
            Message(Role.TOOL, '{"sky": "sunny"}', tool_call_id="c1"),
            Message(Role.TOOL, "plain text result", tool_call_id="c1"),
        ],
        max_tokens=100,
        temperature=0.2,
        top_p=0.8,
        stop=["END"],
        seed=7,
        tools=[WEATHER],
        tool_choice=ToolChoice(mode="required"),
    )
    sim.enqueue(
        GeminiReply(
            text="Sunny.",
            prompt_tokens=50,
            candidates_tokens=2,
            cached_tokens=30,
            thoughts_tokens=9,
            thought="thinking...",
        )
    )
    out = await gemini(sim, session).chat("gemini-2.5-flash", request)
    assert out.content == "Sunny." and out.finish_reason is FinishReason.STOP  # the thought part is not the reply
    u = out.usage
    assert (u.input_tokens, u.output_tokens, u.cached_input_tokens, u.reasoning_tokens) == (50, 11, 30, 9)
    req = sim.requests[-1]
    assert req.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert req.headers["x-goog-api-key"] == KEY and "key" not in req.query  # never in the URL (logs, proxies)
    body = req.body
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert [c["role"] for c in body["contents"]] == ["user", "model", "user"]
    assert body["contents"][1]["parts"] == [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}, "id": "c1"}}
    ]
    assert body["contents"][2]["parts"] == [
        {"functionResponse": {"name": "get_weather", "response": {"sky": "sunny"}, "id": "c1"}},
        {"functionResponse": {"name": "get_weather", "response": {"result": "plain text result"}, "id": "c1"}},
    ]
    assert body["generationConfig"] == {
        "maxOutputTokens": 100,
        "temperature": 0.2,
        "topP": 0.8,
        "stopSequences": ["END"],
        "seed": 7,
    }
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {"name": "get_weather", "description": "Weather for a city", "parametersJsonSchema": WEATHER.parameters}
            ]
        }
    ]
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "ANY"}}


async def test_json_schema_output_and_function_calls(sim: GeminiSimulator, session: HttpClient) -> None:
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    sim.enqueue(GeminiReply(text='{"answer": "4"}'))
    out = await gemini(sim, session).chat("g", ask(response_format=ResponseFormat("json_schema", "a", schema, True)))
    assert json.loads(out.content) == {"answer": "4"}
    config_sent = sim.requests[-1].body["generationConfig"]
    assert config_sent == {"responseMimeType": "application/json", "responseJsonSchema": schema}

    sim.enqueue(GeminiReply(function_calls=(("get_weather", {"city": "Oslo"}), ("get_weather", {"city": "Rome"}))))
    out = await gemini(sim, session).chat(
        "g", ask(tools=[WEATHER], tool_choice=ToolChoice(function_name="get_weather"))
    )
    assert out.finish_reason is FinishReason.TOOL_CALLS
    assert out.tool_calls == [
        ToolCall("call_1", "get_weather", '{"city":"Oslo"}'),
        ToolCall("call_2", "get_weather", '{"city":"Rome"}'),
    ]
    assert sim.requests[-1].body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}
    }


async def test_a_models_thinking_budget_is_sent(sim: GeminiSimulator, session: HttpClient) -> None:
    provider = gemini(sim, session, thinking_budgets=(("gemini-2.5-pro", 2048),))
    await provider.chat("gemini-2.5-pro", ask(max_tokens=100))
    assert sim.requests[-1].body["generationConfig"] == {
        "maxOutputTokens": 100,
        "thinkingConfig": {"thinkingBudget": 2048},
    }
    [e async for e in provider.stream("gemini-2.5-pro", ask())]
    assert sim.requests[-1].body["generationConfig"] == {"thinkingConfig": {"thinkingBudget": 2048}}
    await provider.chat("gemini-2.5-flash", ask())  # a model without one sends none
    assert "generationConfig" not in sim.requests[-1].body


async def test_stream_generate_content(sim: GeminiSimulator, session: HttpClient) -> None:
    sim.enqueue(
        GeminiReply(
            text="one two three",
            function_calls=(("get_weather", {"city": "Oslo"}),),
            prompt_tokens=12,
            candidates_tokens=5,
            thoughts_tokens=4,
            cached_tokens=6,
            thought="hmm",
        )
    )
    events = [e async for e in gemini(sim, session).stream("g", ask(tools=[WEATHER]))]
    assert sim.requests[-1].path == "/v1beta/models/g:streamGenerateContent" and sim.requests[-1].query == {
        "alt": "sse"
    }
    assert "".join(e.content for e in events if isinstance(e, TextDelta)) == "one two three"
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert [(c.index, c.name, c.arguments) for c in calls] == [(0, "get_weather", '{"city":"Oslo"}')]
    end = events[-1]
    assert isinstance(end, StreamFinish) and end.finish_reason is FinishReason.TOOL_CALLS and end.usage is not None
    assert (
        end.usage.input_tokens,
        end.usage.output_tokens,
        end.usage.cached_input_tokens,
        end.usage.reasoning_tokens,
    ) == (12, 9, 6, 4)


async def test_safety_and_blocked_prompts_are_content_filter(sim: GeminiSimulator, session: HttpClient) -> None:
    provider = gemini(sim, session)
    sim.enqueue(GeminiReply(text="partial", finish_reason="SAFETY"))
    filtered = await provider.chat("g", ask())
    assert filtered.finish_reason is FinishReason.CONTENT_FILTER
    assert filtered.upstream.id == "sim-response"  # the reply's responseId, for the call log
    sim.enqueue(GeminiReply(block_reason="PROHIBITED_CONTENT"))
    out = await provider.chat("g", ask())
    assert (out.content, out.finish_reason) == ("", FinishReason.CONTENT_FILTER)
    sim.enqueue(GeminiReply(block_reason="SAFETY"))
    events = [e async for e in provider.stream("g", ask())]
    assert isinstance(events[-1], StreamFinish) and events[-1].finish_reason is FinishReason.CONTENT_FILTER
    assert events[-1].upstream.id == "sim-response" and events[0] == ReplyId("sim-response")  # said at once


@pytest.mark.parametrize(
    ("status", "message", "reason", "retryable"),
    [
        (429, "Resource has been exhausted (e.g. check quota).", "UPSTREAM_RATE_LIMITED", True),
        (
            400,
            "The input token count (1200000) exceeds the maximum number of tokens allowed (1048576).",
            "UPSTREAM_CONTEXT_TOO_LONG",
            False,
        ),
        (400, "Invalid value at 'contents'.", "UPSTREAM_BAD_REQUEST", False),
        (403, "Permission denied.", "UPSTREAM_AUTH_FAILED", False),
        (503, "The model is overloaded.", "UPSTREAM_SERVER_ERROR", True),
    ],
)
async def test_http_errors(
    sim: GeminiSimulator, session: HttpClient, status: int, message: str, reason: str, retryable: bool
) -> None:
    sim.enqueue(GeminiReply(status=status, message=message))
    with pytest.raises(ProviderError) as caught:
        await gemini(sim, session).chat("g", ask())
    assert (caught.value.reason, caught.value.retryable) == (reason, retryable)


async def test_error_inside_a_stream_and_a_cut_stream(sim: GeminiSimulator, session: HttpClient) -> None:
    sim.enqueue(GeminiReply(text="one two three", error_after=1, message="overloaded"))
    seen: list[Any] = []
    with pytest.raises(ProviderError) as caught:
        async for e in gemini(sim, session).stream("g", ask()):
            seen.append(e)
    assert [e.content for e in seen if isinstance(e, TextDelta)] == ["one "]
    assert caught.value.reason == "UPSTREAM_SERVER_ERROR" and caught.value.retryable


@pytest.mark.parametrize(
    "part", [{"text": 5}, {"functionCall": {"name": 7, "args": {}}}, {"text": "x", "thoughtSignature": 9}]
)
async def test_answer_fields_that_are_not_strings_are_a_bad_response(
    sim: GeminiSimulator, session: HttpClient, part: dict[str, Any]
) -> None:
    """Text, a function's name and a signature are the answer: a number is refused, never turned into "5"."""
    chunk = {"candidates": [{"content": {"role": "model", "parts": [part]}}], "responseId": "r1"}
    sim.enqueue(
        GeminiReply(body=b"data: " + json.dumps(chunk).encode() + b"\r\n\r\n", content_type="text/event-stream")
    )
    with pytest.raises(ProviderError) as caught:
        async for _ in gemini(sim, session).stream("g", ask()):
            pass
    assert caught.value.reason == "UPSTREAM_BAD_RESPONSE"


async def test_a_wrong_key_is_never_echoed(sim: GeminiSimulator, session: HttpClient) -> None:
    wrong = "AIzaSy-wrong-key-abcdefghijk"
    settings = ProviderSettings(name="gemini", type="gemini", base_url=sim.url + "/v1beta", api_key=wrong)
    with pytest.raises(ProviderError) as caught:
        await build_provider(settings, session).chat("g", ask())
    assert caught.value.reason == "UPSTREAM_BAD_REQUEST"  # Google answers a bad key with a 400
    assert wrong not in caught.value.message


# -- Vertex AI with Application Default Credentials ---------------------------------------------------


class TokenEndpoint:
    """An OAuth 2.0 token endpoint for a service-account ADC file: JWT-bearer grants -> access tokens."""

    def __init__(self) -> None:
        self.calls = 0
        self.forms: list[dict[str, str]] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> TokenEndpoint:
        app = web.Application()
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/token"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.forms.append({k: str(v) for k, v in form.items()})
        if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" or not form.get("assertion"):
            return web.json_response({"error": "invalid_grant"}, status=400)
        self.calls += 1
        await asyncio.sleep(0.05)  # slow: concurrent calls must share one refresh
        return web.json_response(
            {"access_token": f"ya29.sim-token-{self.calls}", "expires_in": 3600, "token_type": "Bearer"}
        )


@pytest.fixture
async def adc(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> AsyncIterator[TokenEndpoint]:
    async with TokenEndpoint() as endpoint:
        path = tmp_path / "adc.json"
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        info = {
            "type": "service_account",
            "project_id": PROJECT,
            "private_key_id": "sim-key-1",
            "private_key": pem,
            "client_email": f"gateway@{PROJECT}.iam.gserviceaccount.com",
            "client_id": "1234567890",
            "token_uri": endpoint.url,
        }
        path.write_text(json.dumps(info))
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
        monkeypatch.setenv("NO_GCE_CHECK", "True")
        yield endpoint


async def test_vertex_uses_adc_once_off_the_loop(adc: TokenEndpoint, sim: GeminiSimulator, session: HttpClient) -> None:
    provider = vertex(sim, session)
    outs = await asyncio.gather(*(provider.chat("gemini-2.5-pro", ask()) for _ in range(6)))
    assert all(o.content == "Hello from gemini-2.5-pro: hello there" for o in outs)
    events = [e async for e in provider.stream("gemini-2.5-pro", ask())]
    assert isinstance(events[-1], StreamFinish)
    assert adc.calls == 1
    claims = jwt.decode(adc.forms[0]["assertion"], options={"verify_signature": False})
    assert claims["scope"] == "https://www.googleapis.com/auth/cloud-platform"
    paths = {r.path for r in sim.requests}
    base = f"/v1/projects/{PROJECT}/locations/us-central1/publishers/google/models/gemini-2.5-pro"
    assert paths == {f"{base}:generateContent", f"{base}:streamGenerateContent"}
    assert {r.headers["authorization"] for r in sim.requests} == {"Bearer ya29.sim-token-1"}
    assert all("x-goog-api-key" not in r.headers for r in sim.requests)
    await provider.aclose()


async def test_claude_on_vertex_uses_the_anthropic_format_and_the_same_token(
    adc: TokenEndpoint, sim: GeminiSimulator, session: HttpClient
) -> None:
    provider = vertex(sim, session)
    model = "claude-3-5-sonnet-v2@20241022"
    out = await provider.chat(model, ask(max_tokens=64))
    assert out.content == f"Hello from {model}: hello there" and out.finish_reason is FinishReason.STOP
    events = [e async for e in provider.stream(model, ask())]
    assert "".join(e.content for e in events if isinstance(e, TextDelta)) == out.content
    end = events[-1]
    assert (
        isinstance(end, StreamFinish) and end.usage is not None and end.usage.output_tokens == out.usage.output_tokens
    )
    await provider.chat("gemini-2.5-pro", ask())
    base = f"/v1/projects/{PROJECT}/locations/us-central1/publishers"
    assert [r.path for r in sim.requests] == [
        f"{base}/anthropic/models/{model}:rawPredict",
        f"{base}/anthropic/models/{model}:streamRawPredict",
        f"{base}/google/models/gemini-2.5-pro:generateContent",
    ]
    assert sim.requests[0].body["anthropic_version"] == "vertex-2023-10-16" and "model" not in sim.requests[0].body
    assert sim.requests[0].body["max_tokens"] == 64
    assert {r.headers["authorization"] for r in sim.requests} == {"Bearer ya29.sim-token-1"} and adc.calls == 1
    assert all("x-api-key" not in r.headers for r in sim.requests)
    with pytest.raises(ProviderError) as caught:  # refused, not silently ignored
        await provider.chat(model, ask(response_format=ResponseFormat("json_object")))
    assert caught.value.reason == "UPSTREAM_BAD_REQUEST" and "not JSON mode" in caught.value.message
    # A JSON schema goes as Anthropic's structured output, which Vertex serves for Claude.
    await provider.chat(model, ask(response_format=ResponseFormat("json_schema", "a", {"type": "object"}, True)))
    assert sim.requests[-1].body["output_config"] == {"format": {"type": "json_schema", "schema": {"type": "object"}}}
    await provider.aclose()


async def test_vertex_without_credentials_is_auth_failed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sim: GeminiSimulator, session: HttpClient
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    with pytest.raises(ProviderError) as caught:
        await vertex(sim, session).chat("g", ask())
    assert caught.value.reason == "UPSTREAM_AUTH_FAILED" and caught.value.message.startswith(
        "vertex: could not get credentials"
    )
    assert sim.requests == []


# -- config -----------------------------------------------------------------------------------------


def _load(name: str, provider: dict[str, Any], env: dict[str, str] | None = None) -> config.GatewayConfig:
    spec = {"models": [{"name": "gemini-2.5-flash", "allowUnpriced": True}], **provider}
    doc = {"ledger": {"type": "memory"}, "providers": {name: spec}}
    return config.resolve(config.parse_file_config(json.dumps(doc), "<test>"), env or {}, "<test>")


def test_config_thinking_budget_per_model() -> None:
    models = [
        {"name": "gemini-2.5-pro", "thinkingBudget": -1, "allowUnpriced": True},
        {"name": "g2", "allowUnpriced": True},
    ]
    p = _load("gemini", {"apiKeyEnv": "K", "models": models}, {"K": "k"}).providers[0]
    assert p.thinking_budgets == (("gemini-2.5-pro", -1),)
    doc = {"ledger": {"type": "memory"}, "allowUnpriced": True}
    doc["providers"] = {"openai": {"apiKeyEnv": "K", "models": [{"name": "o3", "thinkingBudget": 100}]}}
    with pytest.raises(ConfigError) as caught:
        config.resolve(config.parse_file_config(json.dumps(doc), "<test>"), {"K": "k"}, "<test>")
    assert caught.value.path == "providers.openai.models[0].thinkingBudget"


def test_config_defaults() -> None:
    p = _load("gemini", {"apiKeyEnv": "GEMINI_API_KEY"}, {"GEMINI_API_KEY": "k"}).providers[0]
    assert (p.type, p.base_url, p.api_key) == ("gemini", "https://generativelanguage.googleapis.com/v1beta", "k")
    v = _load("vx", {"type": "vertex", "region": "europe-west4", "project": PROJECT}).providers[0]
    assert (v.base_url, v.region, v.project) == (
        "https://europe-west4-aiplatform.googleapis.com/v1",
        "europe-west4",
        PROJECT,
    )
    g = _load("vx", {"type": "vertex", "region": "global", "project": PROJECT}).providers[0]
    assert g.base_url == "https://aiplatform.googleapis.com/v1"


@pytest.mark.parametrize(
    ("name", "provider", "path"),
    [
        ("gemini", {}, "providers.gemini"),
        ("vx", {"type": "vertex", "project": PROJECT}, "providers.vx.region"),
        ("vx", {"type": "vertex", "region": "us-central1"}, "providers.vx.project"),
        (
            "vx",
            {"type": "vertex", "region": "us-central1", "project": PROJECT, "apiKeyEnv": "K"},
            "providers.vx.apiKeyEnv",
        ),
        ("gemini", {"apiKeyEnv": "K", "project": PROJECT}, "providers.gemini.project"),
    ],
)
def test_config_errors(name: str, provider: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(name, provider, {"K": "k"})
    assert caught.value.path == path


def test_vertex_without_google_auth_fails_at_load_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "google.auth", None)
    with pytest.raises(ConfigError) as caught:
        _load("vx", {"type": "vertex", "region": "us-central1", "project": PROJECT})
    assert "pip install 'feather-grpc[vertex]'" in str(caught.value)
    assert _load("gemini", {"apiKeyEnv": "K"}, {"K": "k"}).providers  # gemini needs no extra


async def test_json_calls_skip_claude_on_vertex_for_a_capable_candidate(
    adc: TokenEndpoint, sim: GeminiSimulator
) -> None:
    doc = {
        "ledger": {"type": "memory"},
        "providers": {
            "vertex": {
                "type": "vertex",
                "project": PROJECT,
                "region": "us-central1",
                "baseUrl": sim.url + "/v1",
                "models": [
                    {"name": "claude-sonnet-4@20250514", "aliases": ["smart"], "inputPer1M": 3, "outputPer1M": 15}
                ],
            },
            "mock": {
                "type": "mock",
                "models": [{"name": "mock-fast", "aliases": ["smart"], "inputPer1K": 0.001, "outputPer1K": 0.002}],
            },
        },
    }
    async with running_server(doc, {}) as gw:
        fmt = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
        reply = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("hi")], response_format=fmt))
        assert reply.provider == "mock" and sim.requests == []  # Claude was never asked for JSON
        plain = await gw.stub.Chat(pb.ChatRequest(model="smart", messages=[user("hi")]))
        assert plain.provider == "vertex" and sim.requests[-1].path.endswith(":rawPredict")


def test_the_readme_example_loads() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("### Cloud providers") :]
    block = section[section.index("```json") + len("```json") : section.index("```\n\n")]
    env = {"AZURE_OPENAI_API_KEY": "k", "GEMINI_API_KEY": "g"}
    by_name = {
        p.name: p for p in config.resolve(config.parse_file_config(block, "README.md"), env, "README.md").providers
    }
    assert by_name["gemini"].type == "gemini" and by_name["gemini"].api_key == "g"
    assert (by_name["vertex"].type, by_name["vertex"].region) == ("vertex", "us-central1")
    assert by_name["vertex"].thinking_budgets == (("gemini-2.5-pro", 4096),)


# -- the gateway around it ---------------------------------------------------------------------------


async def test_gateway_serves_gemini_bills_thoughts_and_retries(
    sim: GeminiSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    doc = {
        "ledger": {"type": "memory"},
        "retry": {"maxAttempts": 3, "baseMs": 1, "maxMs": 5},
        "providers": {
            "gemini": {
                "apiKeyEnv": "GEMINI_API_KEY",
                "baseUrl": sim.url + "/v1beta",
                "models": [
                    {
                        "name": "gemini-2.5-flash",
                        "aliases": ["flash"],
                        "inputPer1M": 0.3,
                        "outputPer1M": 2.5,
                        "cachedInputPer1M": 0.075,
                    }
                ],
            }
        },
    }
    options = ServerOptions(metrics_port=0, metrics_host="127.0.0.1")
    async with running_server(doc, {"GEMINI_API_KEY": KEY}, options) as gw:
        sim.enqueue(GeminiReply(prompt_tokens=1000, cached_tokens=600, candidates_tokens=100, thoughts_tokens=50))
        reply = await gw.stub.Chat(pb.ChatRequest(model="flash", messages=[user("hi")]))
        u = reply.usage
        assert (u.input_tokens, u.cached_input_tokens, u.output_tokens, u.reasoning_tokens) == (1000, 600, 150, 50)
        assert reply.cost_nanos_usd == 400 * 300 + 600 * 75 + 150 * 2500
        sim.enqueue(GeminiReply(status=429, message="Resource exhausted"))
        reply = await gw.stub.Chat(pb.ChatRequest(model="flash", messages=[user("hi")]))
        assert reply.provider == "gemini"
        json_reply = await gw.stub.Chat(
            pb.ChatRequest(
                model="flash",
                messages=[user("hi")],
                response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
            )
        )
        assert json_reply.provider == "gemini"
        assert sim.requests[-1].body["generationConfig"]["responseMimeType"] == "application/json"
        ends = [m async for m in gw.stub.StreamChat(pb.StreamChatRequest(model="flash", messages=[user("yo")]))]
        assert ends[-1].end.finish_reason == pb.FINISH_REASON_STOP
        sim.api_key = "another-key"
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="flash", messages=[user("hi")]))
        assert gw.server.metrics_port is not None
        metrics = scrape_text(gw.server.metrics_port)
    logged = " ".join(str(r.__dict__) for r in caplog.records)
    assert KEY not in logged and KEY not in metrics and KEY not in (caught.value.details() or "")


# -- google-genai against the simulator -------------------------------------------------------------


async def test_audio_tokens_are_read_by_modality(sim: GeminiSimulator, session: HttpClient) -> None:
    """Gemini prices audio input apart (2.5 Flash: 3.3x text) and tells it apart only by modality: the audio of
    the prompt not read from the cache, and of the candidates."""
    reply = GeminiReply(
        text="heard",
        prompt_tokens=1000,
        candidates_tokens=40,
        cached_tokens=300,
        audio_prompt_tokens=700,
        audio_cached_tokens=200,
        audio_candidates_tokens=10,
    )
    sim.enqueue(reply, reply)
    usage = (await gemini(sim, session).chat("gemini-2.5-flash", ask())).usage
    assert (usage.input_tokens, usage.cached_input_tokens, usage.output_tokens) == (1000, 300, 40)
    assert (usage.audio_input_tokens, usage.audio_output_tokens) == (500, 10)

    client = genai.Client(api_key=KEY, http_options=gt.HttpOptions(base_url=sim.url))  # the SDK reads the same
    meta = (await client.aio.models.generate_content(model="gemini-2.5-flash", contents="hi")).usage_metadata
    assert meta is not None and meta.prompt_tokens_details and meta.cache_tokens_details
    assert [(d.modality, d.token_count) for d in meta.prompt_tokens_details] == [
        (gt.MediaModality.TEXT, 300),
        (gt.MediaModality.AUDIO, 700),
    ]
    assert [(d.modality, d.token_count) for d in meta.cache_tokens_details][-1] == (gt.MediaModality.AUDIO, 200)


async def test_google_genai_sdk_against_the_simulator(sim: GeminiSimulator) -> None:
    client = genai.Client(api_key=KEY, http_options=gt.HttpOptions(base_url=sim.url))
    sim.enqueue(
        GeminiReply(
            text="hi there", prompt_tokens=8, candidates_tokens=2, cached_tokens=3, thoughts_tokens=5, thought="hmm"
        )
    )
    out = await client.aio.models.generate_content(
        model="gemini-2.5-flash",
        contents="hello",
        config=gt.GenerateContentConfig(
            system_instruction="Be brief.",
            thinking_config=gt.ThinkingConfig(thinking_budget=128, include_thoughts=True),
            response_mime_type="application/json",
            response_json_schema={"type": "object"},
        ),
    )
    assert out.text == "hi there"
    assert out.usage_metadata is not None
    assert (out.usage_metadata.cached_content_token_count, out.usage_metadata.thoughts_token_count) == (3, 5)
    details = out.usage_metadata.prompt_tokens_details
    assert details is not None and [(d.modality, d.token_count) for d in details] == [(gt.MediaModality.TEXT, 8)]
    sent = sim.requests[-1]
    assert sent.path == "/v1/models/gemini-2.5-flash:generateContent"
    thinking = sent.body["generationConfig"]["thinkingConfig"]  # the SDK's field spelling varies by version
    assert {k.replace("_", "").lower(): v for k, v in thinking.items()} == {
        "thinkingbudget": 128,
        "includethoughts": True,
    }

    sim.enqueue(GeminiReply(function_calls=(("get_weather", {"city": "Oslo"}),)))
    tool = gt.Tool(
        function_declarations=[gt.FunctionDeclaration(name="get_weather", parameters_json_schema=WEATHER.parameters)]
    )
    out = await client.aio.models.generate_content(
        model="gemini-2.5-flash",
        contents="weather?",
        config=gt.GenerateContentConfig(
            tools=[tool], automatic_function_calling=gt.AutomaticFunctionCallingConfig(disable=True)
        ),
    )
    assert out.function_calls is not None and out.function_calls[0].args == {"city": "Oslo"}

    sim.enqueue(GeminiReply(text="one two three"))
    chunks = [
        c async for c in await client.aio.models.generate_content_stream(model="gemini-2.5-flash", contents="hello")
    ]
    assert "".join(c.text or "" for c in chunks) == "one two three"
    assert chunks[-1].usage_metadata is not None and chunks[-1].usage_metadata.candidates_token_count == 3
    assert sim.requests[-1].query == {"alt": "sse"}

    sim.enqueue(GeminiReply(status=429, message="Resource exhausted"))
    with pytest.raises(genai_errors.ClientError) as caught:
        await client.aio.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert caught.value.code == 429 and caught.value.status == "RESOURCE_EXHAUSTED"

    from google.oauth2.credentials import Credentials as UserCredentials

    vertex_client = genai.Client(
        vertexai=True,
        project=PROJECT,
        location="us-central1",
        credentials=UserCredentials(token="ya29.sim-token-1"),  # type: ignore[no-untyped-call]
        http_options=gt.HttpOptions(base_url=sim.url),
    )
    out = await vertex_client.aio.models.generate_content(model="gemini-2.5-flash", contents="hello")
    assert out.text == "Hello from gemini-2.5-flash: hello"
    assert (
        sim.requests[-1].vertex
        and "/publishers/google/models/gemini-2.5-flash:generateContent" in sim.requests[-1].path
    )
    await client.aio.aclose()
    await vertex_client.aio.aclose()


async def test_anthropic_vertex_sdk_against_the_claude_simulator(sim: GeminiSimulator) -> None:
    from anthropic import AsyncAnthropicVertex

    model = "claude-3-5-sonnet-v2@20241022"
    client = AsyncAnthropicVertex(
        region="us-central1",
        project_id=PROJECT,
        access_token="ya29.sim-token-1",
        base_url=sim.url + "/v1",
        max_retries=0,
    )
    async with client:
        messages: Any = [{"role": "user", "content": "hello"}]
        message = await client.messages.create(model=model, max_tokens=64, messages=messages)
        assert message.content[0].type == "text" and message.content[0].text == f"Hello from {model}: hello"
        assert message.usage.output_tokens == 4
        async with client.messages.stream(model=model, max_tokens=64, messages=messages) as stream:
            assert await stream.get_final_text() == f"Hello from {model}: hello"
        assert sim.requests[-1].path.endswith(f"/publishers/anthropic/models/{model}:streamRawPredict")


# -- the contract's parts, reasoning and provider fields (issue 13 item 5) ----------------------------

PNG = b"\x89PNG\r\n\x1a\n" + bytes(16)
PDF = b"%PDF-1.7 /Type /Page"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def conforms(body: dict[str, Any]) -> None:
    """Each piece of a generateContent body is what google-genai's types take (they forbid unknown fields)."""
    for content in body["contents"]:
        gt.Content.model_validate_json(json.dumps(content))
    if "systemInstruction" in body:
        gt.Content.model_validate_json(json.dumps(body["systemInstruction"]))
    if "generationConfig" in body:
        gt.GenerationConfig.model_validate_json(json.dumps(body["generationConfig"]))
    for tool in body.get("tools", ()):
        gt.Tool.model_validate_json(json.dumps(tool))


def multimodal_request(**kw: Any) -> ChatRequest:
    return ChatRequest(
        model="m",
        messages=[
            Message(Role.SYSTEM, parts=(Part(PartKind.TEXT, text="Rules"),), cache_ttl="1h"),
            Message(
                Role.USER,
                parts=(
                    Part(PartKind.TEXT, text="Look", cache_ttl=""),
                    Part(PartKind.IMAGE, data=PNG, media_type="image/png"),
                    Part(PartKind.IMAGE, url="https://example.com/a.jpg"),
                    Part(PartKind.DOCUMENT, data=PDF, media_type="application/pdf", title="a.pdf"),
                    Part(PartKind.DOCUMENT, url="gs://bucket/b.pdf"),
                    Part(PartKind.AUDIO, data=b"RIFF", media_type="wav"),
                ),
            ),
            Message(
                Role.ASSISTANT,
                "Checking",
                tool_calls=(ToolCall("c1", "get_weather", '{"city":"Oslo"}'),),
                thinking=(ThinkingBlock("I should look it up", "gemini:c2lnLTE="),),
            ),
            Message(
                Role.TOOL,
                tool_call_id="c1",
                parts=(
                    Part(PartKind.TEXT, text="no such city"),
                    Part(PartKind.IMAGE, data=PNG, media_type="image/png"),
                ),
                is_error=True,
            ),
        ],
        **kw,
    )


async def test_provider_fields_meet_the_gateways_objects_key_by_key(sim: GeminiSimulator, session: HttpClient) -> None:
    """generationConfig holds both the output limit the gateway sets (its own) and options the contract does
    not model: a default or an extra field adds to it rather than replacing it (and the limit with it)."""
    defaults = {"generationConfig": {"temperature": 0.3, "topK": 40}, "labels": {"team": "a"}}
    provider = gemini(sim, session, default_fields=defaults)
    extra = {"generationConfig": {"topK": 5, "responseModalities": ["TEXT"]}, "labels": {"app": "b"}}
    await provider.chat("gemini-3-pro", ask(max_tokens=100, extra_fields=extra))
    body = sim.requests[-1].body
    assert body["generationConfig"] == {
        "maxOutputTokens": 100,  # the gateway's
        "temperature": 0.3,  # the provider's default, under the request
        "topK": 5,  # the request's extra field, over the default
        "responseModalities": ["TEXT"],
    }
    assert body["labels"] == {"team": "a", "app": "b"}
    assert defaults == {"generationConfig": {"temperature": 0.3, "topK": 40}, "labels": {"team": "a"}}  # unchanged

    await provider.chat("gemini-3-pro", ask(temperature=0.9))  # the request's own field over the default
    assert sim.requests[-1].body["generationConfig"] == {"temperature": 0.9, "topK": 40}


async def test_parts_thinking_and_extra_fields_in_the_request_body(sim: GeminiSimulator, session: HttpClient) -> None:
    request = multimodal_request(reasoning_effort="high", extra_fields={"labels": {"team": "a"}})
    await gemini(sim, session).chat("gemini-3-pro", request)
    body = sim.requests[-1].body
    assert body == {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "Look"},
                    {"inlineData": {"mimeType": "image/png", "data": _b64(PNG)}},
                    {"fileData": {"fileUri": "https://example.com/a.jpg", "mimeType": "image/jpeg"}},
                    {"inlineData": {"mimeType": "application/pdf", "data": _b64(PDF)}},
                    {"fileData": {"fileUri": "gs://bucket/b.pdf", "mimeType": "application/pdf"}},
                    {"inlineData": {"mimeType": "audio/wav", "data": _b64(b"RIFF")}},
                ],
            },
            {
                "role": "model",
                "parts": [
                    {"text": "Checking"},
                    # The thought signature goes back on the function call it came with.
                    {
                        "functionCall": {"name": "get_weather", "args": {"city": "Oslo"}, "id": "c1"},
                        "thoughtSignature": "c2lnLTE=",
                    },
                ],
            },
            {
                "role": "user",
                "parts": [
                    {
                        "functionResponse": {
                            "name": "get_weather",
                            "response": {"error": "no such city"},
                            "id": "c1",
                            "parts": [{"inlineData": {"mimeType": "image/png", "data": _b64(PNG)}}],
                        }
                    }
                ],
            },
        ],
        "systemInstruction": {"parts": [{"text": "Rules"}]},
        "generationConfig": {"thinkingConfig": {"thinkingLevel": "HIGH", "includeThoughts": True}},
        "labels": {"team": "a"},
    }
    conforms({k: v for k, v in body.items() if k != "labels"})  # labels: a Vertex request field, not typed here

    # A token budget is Gemini 2.5's thinkingBudget, and wins over a configured one; "none" turns thinking off.
    provider = gemini(sim, session, thinking_budgets=(("gemini-2.5-pro", 512),))
    await provider.chat("gemini-2.5-pro", ask(thinking_budget=2048, reasoning_effort="low"))
    assert sim.requests[-1].body["generationConfig"] == {
        "thinkingConfig": {"thinkingBudget": 2048, "includeThoughts": True}
    }
    await provider.chat("gemini-2.5-pro", ask(reasoning_effort="none"))
    assert sim.requests[-1].body["generationConfig"] == {"thinkingConfig": {"thinkingBudget": 0}}
    conforms(sim.requests[-1].body)


async def test_thought_summaries_and_signatures_come_back_as_thinking(
    sim: GeminiSimulator, session: HttpClient
) -> None:
    provider = gemini(sim, session)
    sim.enqueue(
        GeminiReply(function_calls=(("get_weather", {"city": "Oslo"}),), thought="Look it up.", signature="c2lnLTE=")
    )
    out = await provider.chat("gemini-3-pro", ask(tools=[WEATHER], reasoning_effort="low"))
    assert out.thinking == [ThinkingBlock("Look it up.", "gemini:c2lnLTE=")]  # marked as Gemini's
    assert out.content == "" and out.tool_calls[0].name == "get_weather"

    sim.enqueue(GeminiReply(text="sunny and warm", thought="Answer.", signature="c2lnLTI="))
    events = [e async for e in provider.stream("gemini-3-pro", ask(reasoning_effort="low"))]
    thinking = [e for e in events if isinstance(e, ThinkingDelta)]
    assert [(e.index, e.text, e.signature) for e in thinking] == [(0, "Answer.", ""), (0, "", "gemini:c2lnLTI=")]
    assert "".join(e.content for e in events if isinstance(e, TextDelta)) == "sunny and warm"

    # The reply's thinking carried back on the next turn puts its signature where Gemini wants it.
    follow = ChatRequest(
        model="m",
        messages=[
            Message(Role.USER, "weather?"),
            Message(Role.ASSISTANT, tool_calls=tuple(out.tool_calls), thinking=tuple(out.thinking)),
            Message(Role.TOOL, "sunny", tool_call_id=out.tool_calls[0].id),
        ],
        tools=[WEATHER],
    )
    await provider.chat("gemini-3-pro", follow)
    model_turn = sim.requests[-1].body["contents"][1]
    assert model_turn["parts"] == [
        {
            "functionCall": {"name": "get_weather", "args": {"city": "Oslo"}, "id": "call_1"},
            "thoughtSignature": "c2lnLTE=",
        }
    ]
    conforms(sim.requests[-1].body)

    # Another family's thinking (Claude's, when the conversation falls back to Gemini) is not sent: Gemini
    # would refuse its signature.
    claude = Message(Role.ASSISTANT, tool_calls=tuple(out.tool_calls), thinking=(ThinkingBlock("hm", "EqQBCkYIARgC"),))
    await provider.chat(
        "gemini-3-pro", ChatRequest(model="m", messages=[follow.messages[0], claude, follow.messages[2]])
    )
    assert "thoughtSignature" not in sim.requests[-1].body["contents"][1]["parts"][0]


async def test_google_genai_sdk_reads_thought_signatures_from_the_simulator(sim: GeminiSimulator) -> None:
    client = genai.Client(api_key=KEY, http_options=gt.HttpOptions(base_url=sim.url))
    sim.enqueue(GeminiReply(function_calls=(("get_weather", {"city": "Oslo"}),), thought="hm", signature="c2lnLTE="))
    out = await client.aio.models.generate_content(model="gemini-3-pro", contents="weather?")
    await client.aio.aclose()
    assert out.candidates and out.candidates[0].content and out.candidates[0].content.parts
    parts = out.candidates[0].content.parts
    assert (parts[0].thought, parts[1].thought_signature) == (True, b"sig-1")


async def test_gateway_routes_an_image_to_gemini(sim: GeminiSimulator) -> None:
    doc = {
        "ledger": {"type": "memory"},
        "providers": {
            "gemini": {
                "type": "gemini",
                "apiKeyEnv": "GEMINI_API_KEY",
                "baseUrl": sim.url + "/v1beta",
                "models": [{"name": "gemini-2.5-flash", "inputPer1M": 0.3, "outputPer1M": 2.5}],
            }
        },
    }
    image = pb.Message(
        role=pb.ROLE_USER,
        parts=[pb.Part(text="what is it?"), pb.Part(image=pb.ImagePart(data=PNG, media_type="image/png"))],
    )
    async with running_server(doc, {"GEMINI_API_KEY": KEY}, ServerOptions()) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="gemini-2.5-flash", messages=[image]))
    assert reply.provider == "gemini"
    assert sim.requests[-1].body["contents"][0]["parts"] == [
        {"text": "what is it?"},
        {"inlineData": {"mimeType": "image/png", "data": _b64(PNG)}},
    ]


def test_claude_formats_leave_geminis_thinking_out() -> None:
    """A Gemini turn's thinking carried to Claude (a fallback the other way) is dropped, not refused there."""
    settings = ProviderSettings(name="anthropic", type="anthropic", base_url="https://api.anthropic.com")
    turn = Message(
        Role.ASSISTANT, "Sunny.", thinking=(ThinkingBlock("Gemini's", "gemini:c2ln"), ThinkingBlock("Claude's", "EqQB"))
    )
    request = ChatRequest(model="m", messages=[Message(Role.USER, "weather?"), turn, Message(Role.USER, "and?")])
    body = AnthropicProvider(settings, new_session()).build_body("claude-x", request, stream=False)
    assert body["messages"][1]["content"] == [
        {"type": "thinking", "thinking": "Claude's", "signature": "EqQB"},
        {"type": "text", "text": "Sunny."},
    ]


def test_tool_arguments_that_are_no_json_object_are_refused_alike_by_every_format_that_needs_one() -> None:
    """Anthropic, Bedrock and Gemini send a tool call's arguments as an object (one rule: providers/base.py);
    arguments that are not one are the caller's error, never guessed into one."""
    call = ToolCall("call_1", "get_weather", "[1, 2]")
    turns = [Message(Role.USER, "weather?"), Message(Role.ASSISTANT, "", tool_calls=(call,))]
    request = ChatRequest(model="m", messages=[*turns, Message(Role.TOOL, "sunny", tool_call_id="call_1")])
    session = new_session()
    anthropic = AnthropicProvider(ProviderSettings(name="a", type="anthropic", base_url="https://x"), session)
    bedrock = BedrockProvider(ProviderSettings(name="b", type="bedrock", base_url="https://x", region="r"), session)
    gemini = GeminiProvider(ProviderSettings(name="g", type="gemini", base_url="https://x", api_key=KEY), session)
    builds: list[tuple[str, Callable[[], object]]] = [
        ("a", lambda: anthropic.build_body("m", request, stream=False)),
        ("b", lambda: bedrock.build_body(request, "m")),
        ("g", lambda: gemini.build_body(request, "m")),
    ]
    for name, build in builds:
        with pytest.raises(ProviderError) as refused:
            build()
        assert refused.value.reason == "UPSTREAM_BAD_REQUEST"
        assert refused.value.message == f"{name}: tool call 'call_1' arguments are not a JSON object"
        assert refused.value.retryable is False
