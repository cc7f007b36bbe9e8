"""Amazon Bedrock (`bedrock`): SigV4 against botocore's, the adapter against sim/bedrock.py (which checks
every signature by re-signing with botocore, and frames streams in the binary event-stream format), the
credential chain off the loop, the gateway around it, and boto3's bedrock-runtime `converse` and
`converse_stream` against the simulator (so the simulator cannot drift from the real API)."""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import boto3
import botocore.auth
import grpc
import pytest
from botocore.awsrequest import AWSRequest
from botocore.config import Config as BotoConfig
from botocore.credentials import Credentials
from botocore.exceptions import EventStreamError

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
from feather_grpc.providers.bedrock import sign
from feather_grpc.providers.http import new_session
from feather_grpc.server.app import ServerOptions
from sim.bedrock import BedrockReply, BedrockSimulator, encode_event
from tests.gateway_harness import rich_error, user
from tests.ops_harness import running_server, scrape_text

ACCESS = "AKIDSIMULATOR0000001"
SECRET = "sim/secret+access+key/0123456789abcdefXYZ"
TOKEN = "sim-session-token-FwoGZXIvYXdzEJr-0123456789"
REGION = "us-west-2"
MODEL = "anthropic.claude-3-5-sonnet-20240620-v1:0"
WEATHER = ToolSpec(
    name="get_weather",
    description="Weather for a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The AWS chain sees only these credentials: no profile files, no instance metadata."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_ROLE_ARN", "AWS_WEB_IDENTITY_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", TOKEN)
    yield


@pytest.fixture
async def sim() -> AsyncIterator[BedrockSimulator]:
    async with BedrockSimulator(credentials=(ACCESS, SECRET, TOKEN), region=REGION) as s:
        yield s


@pytest.fixture
async def session() -> AsyncIterator[HttpClient]:
    client = new_session()
    try:
        yield client
    finally:
        await client.close()


def bedrock(sim: BedrockSimulator, session: HttpClient) -> Provider:
    return build_provider(ProviderSettings(name="bedrock", type="bedrock", base_url=sim.url, region=REGION), session)


def ask(text: str = "hello there", **kw: Any) -> ChatRequest:
    return ChatRequest(model="m", messages=[Message(Role.USER, text)], **kw)


# -- SigV4 ------------------------------------------------------------------------------------------


def test_sigv4_matches_botocore_for_the_same_request_and_time(monkeypatch: pytest.MonkeyPatch) -> None:
    fixed = datetime.datetime(2026, 1, 2, 3, 4, 5)
    monkeypatch.setattr(botocore.auth, "get_current_datetime", lambda: fixed)
    url = "https://bedrock-runtime.us-west-2.amazonaws.com/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    body = b'{"messages":[{"role":"user","content":[{"text":"hi"}]}]}'
    for creds in (Credentials(ACCESS, SECRET, TOKEN), Credentials(ACCESS, SECRET)):
        ours = dict(sign(creds.get_frozen_credentials(), REGION, url, body))
        reference = AWSRequest(method="POST", url=url, data=body, headers={"Content-Type": "application/json"})
        botocore.auth.SigV4Auth(creds, "bedrock", REGION).add_auth(reference)
        assert ours["X-Amz-Date"] == "20260102T030405Z" == reference.headers["X-Amz-Date"]
        assert ours["Authorization"] == reference.headers["Authorization"]
        assert ours["Authorization"].startswith(
            f"AWS4-HMAC-SHA256 Credential={ACCESS}/20260102/us-west-2/bedrock/aws4_request, SignedHeaders="
        )
        assert ours.get("X-Amz-Security-Token") == creds.token
        assert SECRET not in json.dumps(ours)


async def test_the_request_on_the_wire_is_the_one_signed(
    aws_env: None, sim: BedrockSimulator, session: HttpClient
) -> None:
    # The simulator re-signs what it received (host, raw path with %3A, headers, body) with botocore.
    provider = bedrock(sim, session)
    await provider.chat(MODEL, ask())
    [e async for e in provider.stream(MODEL, ask())]
    assert [r.signature_ok for r in sim.requests] == [True, True]
    assert sim.requests[0].path == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"
    assert sim.requests[1].path.endswith("/converse-stream")
    assert sim.requests[0].headers["x-amz-security-token"] == TOKEN
    await provider.aclose()


async def test_wrong_credentials_are_auth_failed_and_never_echoed(
    aws_env: None, monkeypatch: pytest.MonkeyPatch, sim: BedrockSimulator, session: HttpClient
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "a-different-secret-key-000000000000000000")
    provider = bedrock(sim, session)
    with pytest.raises(ProviderError) as caught:
        await provider.chat(MODEL, ask())
    assert caught.value.reason == "UPSTREAM_AUTH_FAILED" and not caught.value.retryable
    assert "InvalidSignatureException" in caught.value.message
    assert "a-different-secret" not in caught.value.message and TOKEN not in caught.value.message


# -- the adapter ------------------------------------------------------------------------------------


async def test_converse_request_and_reply(aws_env: None, sim: BedrockSimulator, session: HttpClient) -> None:
    provider = bedrock(sim, session)
    request = ChatRequest(
        model="m",
        messages=[
            Message(Role.SYSTEM, "Be brief."),
            Message(Role.USER, "weather in Paris?"),
            Message(Role.ASSISTANT, "", tool_calls=(ToolCall("t1", "get_weather", '{"city": "Paris"}'),)),
            Message(Role.TOOL, "sunny", tool_call_id="t1"),
            Message(Role.USER, "and so?"),
        ],
        max_tokens=200,
        temperature=0.5,
        top_p=0.9,
        stop=["END"],
        tools=[WEATHER],
        tool_choice=ToolChoice(mode="auto"),
    )
    sim.enqueue(BedrockReply(text="It is sunny.", input_tokens=40, output_tokens=5, cache_read=100, cache_write=20))
    out = await provider.chat(MODEL, request)
    assert out.content == "It is sunny." and out.finish_reason is FinishReason.STOP
    assert out.upstream.id == "sim-bedrock-request"  # the x-amzn-RequestId header, for the call log
    u = out.usage
    assert (u.input_tokens, u.output_tokens, u.cached_input_tokens, u.cache_write_tokens) == (160, 5, 100, 20)
    body = sim.requests[-1].body
    assert body["system"] == [{"text": "Be brief."}]
    assert body["inferenceConfig"] == {"maxTokens": 200, "temperature": 0.5, "topP": 0.9, "stopSequences": ["END"]}
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == [
        {"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {"city": "Paris"}}}
    ]
    assert body["messages"][2]["content"] == [
        {"toolResult": {"toolUseId": "t1", "content": [{"text": "sunny"}]}},
        {"text": "and so?"},
    ]
    assert body["toolConfig"]["toolChoice"] == {"auto": {}}
    assert body["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"] == {"json": WEATHER.parameters}


async def test_converse_tool_use_reply(aws_env: None, sim: BedrockSimulator, session: HttpClient) -> None:
    provider = bedrock(sim, session)
    sim.enqueue(BedrockReply(tool_uses=(("get_weather", {"city": "Oslo"}),)))
    out = await provider.chat(MODEL, ask(tools=[WEATHER], tool_choice=ToolChoice(function_name="get_weather")))
    assert out.finish_reason is FinishReason.TOOL_CALLS
    assert out.tool_calls == [ToolCall("tooluse_sim_1", "get_weather", '{"city":"Oslo"}')]
    assert sim.requests[-1].body["toolConfig"]["toolChoice"] == {"tool": {"name": "get_weather"}}
    assert sim.requests[-1].body["inferenceConfig"]["maxTokens"] == 4096  # never the model's small default


async def test_tool_choice_none(aws_env: None, sim: BedrockSimulator, session: HttpClient) -> None:
    provider = bedrock(sim, session)
    await provider.chat(MODEL, ask(tools=[WEATHER], tool_choice=ToolChoice(mode="none")))
    assert "toolConfig" not in sim.requests[-1].body  # the model cannot call what it was not given
    loop = ChatRequest(
        model="m",
        messages=[
            Message(Role.USER, "weather?"),
            Message(Role.ASSISTANT, "", tool_calls=(ToolCall("t1", "get_weather", '{"city": "Oslo"}'),)),
            Message(Role.TOOL, "cold", tool_call_id="t1"),
        ],
        tools=[WEATHER],
        tool_choice=ToolChoice(mode="none"),
    )
    out = await provider.chat(MODEL, loop)  # Converse needs the tools declared once the history has tool turns
    assert out.content and sim.requests[-1].body["toolConfig"]["toolChoice"] == {"auto": {}}


@pytest.mark.parametrize("pieces", [0, 7, 400])  # frames whole, and split across many network reads
async def test_converse_stream_text_tools_and_usage(
    aws_env: None, sim: BedrockSimulator, session: HttpClient, pieces: int
) -> None:
    provider = bedrock(sim, session)
    sim.enqueue(
        BedrockReply(
            text="Checking the weather now",
            tool_uses=(("get_weather", {"city": "Oslo"}),),
            input_tokens=30,
            output_tokens=12,
            cache_read=7,
            stream_pieces=pieces,
        )
    )
    events = [e async for e in provider.stream(MODEL, ask(tools=[WEATHER]))]
    assert "".join(e.content for e in events if isinstance(e, TextDelta)) == "Checking the weather now"
    calls = [e for e in events if isinstance(e, ToolCallDelta)]
    assert calls[0].id == "tooluse_sim_1" and calls[0].name == "get_weather"
    assert "".join(c.arguments for c in calls) == '{"city":"Oslo"}'
    end = events[-1]
    assert isinstance(end, StreamFinish) and end.finish_reason is FinishReason.TOOL_CALLS
    assert end.usage is not None
    assert (end.usage.input_tokens, end.usage.output_tokens, end.usage.cached_input_tokens) == (37, 12, 7)
    assert events[0] == ReplyId("sim-bedrock-request") and end.upstream.id == "sim-bedrock-request"


async def test_stream_exception_event_after_text(aws_env: None, sim: BedrockSimulator, session: HttpClient) -> None:
    provider = bedrock(sim, session)
    sim.enqueue(BedrockReply(text="one two three", exception_after=2, error_type="ThrottlingException"))
    seen: list[Any] = []
    with pytest.raises(ProviderError) as caught:
        async for e in provider.stream(MODEL, ask()):
            seen.append(e)
    assert [e.content for e in seen if isinstance(e, TextDelta)] == ["one "]
    assert caught.value.reason == "UPSTREAM_RATE_LIMITED" and caught.value.retryable


def _frames(*events: tuple[str, Any]) -> bytes:
    headers = {":content-type": "application/json", ":message-type": "event"}
    return b"".join(encode_event({":event-type": k, **headers}, json.dumps(p).encode()) for k, p in events)


@pytest.mark.parametrize(
    "events",
    [
        # a delta that is a number, not an object
        [("messageStart", {"role": "assistant"}), ("contentBlockDelta", {"contentBlockIndex": 0, "delta": 5})],
        # a block start that is text, not an object
        [("messageStart", {"role": "assistant"}), ("contentBlockStart", {"contentBlockIndex": 0, "start": "x"})],
        # text that is a number: refused, never turned into "5"
        [
            ("messageStart", {"role": "assistant"}),
            ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"text": 5}}),
        ],
    ],
)
async def test_a_stream_event_of_another_shape_is_a_bad_response(
    aws_env: None, sim: BedrockSimulator, session: HttpClient, events: list[tuple[str, Any]]
) -> None:
    """Found by bench/fuzz.py: `"text" in 5` failed the call with INTERNAL."""
    sim.enqueue(BedrockReply(body=_frames(*events), content_type="application/vnd.amazon.eventstream"))
    with pytest.raises(ProviderError) as caught:
        async for _ in bedrock(sim, session).stream(MODEL, ask()):
            pass
    assert (caught.value.reason, caught.value.retryable) == ("UPSTREAM_BAD_RESPONSE", True)


@pytest.mark.parametrize(
    ("status", "error_type", "message", "reason", "retryable"),
    [
        (429, "ThrottlingException", "Too many requests, please wait.", "UPSTREAM_RATE_LIMITED", True),
        (400, "ServiceQuotaExceededException", "Quota exceeded.", "UPSTREAM_QUOTA_EXHAUSTED", False),
        (400, "ValidationException", "Input is too long for requested model.", "UPSTREAM_CONTEXT_TOO_LONG", False),
        (400, "ValidationException", "Malformed input request.", "UPSTREAM_BAD_REQUEST", False),
        (403, "AccessDeniedException", "You don't have access to the model.", "UPSTREAM_AUTH_FAILED", False),
        (404, "ResourceNotFoundException", "Model not found.", "UPSTREAM_NOT_FOUND", False),
        (503, "ServiceUnavailableException", "Service unavailable.", "UPSTREAM_SERVER_ERROR", True),
    ],
)
async def test_http_errors(
    aws_env: None,
    sim: BedrockSimulator,
    session: HttpClient,
    status: int,
    error_type: str,
    message: str,
    reason: str,
    retryable: bool,
) -> None:
    provider = bedrock(sim, session)
    sim.enqueue(BedrockReply(status=status, error_type=error_type, message=message))
    with pytest.raises(ProviderError) as caught:
        await provider.chat(MODEL, ask())
    assert (caught.value.reason, caught.value.retryable) == (reason, retryable)
    assert error_type in caught.value.message


# -- the credential chain -------------------------------------------------------------------------------


async def test_credentials_resolved_once_off_the_loop(
    aws_env: None, sim: BedrockSimulator, session: HttpClient
) -> None:
    provider = bedrock(sim, session)
    await asyncio.gather(*(provider.chat(MODEL, ask()) for _ in range(8)))
    assert provider._credentials.fetches == 1  # type: ignore[attr-defined]
    assert all(r.signature_ok for r in sim.requests)


async def test_credentials_from_a_shared_profile(
    aws_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, sim: BedrockSimulator, session: HttpClient
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var)
    path = tmp_path / "credentials"
    path.write_text(
        f"[default]\naws_access_key_id = AKIDWRONG\naws_secret_access_key = wrong\n\n"
        f"[gateway]\naws_access_key_id = {ACCESS}\naws_secret_access_key = {SECRET}\naws_session_token = {TOKEN}\n"
    )
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(path))
    monkeypatch.setenv("AWS_PROFILE", "gateway")
    out = await bedrock(sim, session).chat(MODEL, ask())
    assert out.content and sim.requests[-1].signature_ok


async def test_no_credentials_is_auth_failed(
    aws_env: None, monkeypatch: pytest.MonkeyPatch, sim: BedrockSimulator, session: HttpClient
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(var)
    with pytest.raises(ProviderError) as caught:
        await bedrock(sim, session).chat(MODEL, ask())
    assert caught.value.reason == "UPSTREAM_AUTH_FAILED" and "no AWS credentials found" in caught.value.message
    assert sim.requests == []


# -- config -----------------------------------------------------------------------------------------


def _load(provider: dict[str, Any]) -> config.GatewayConfig:
    spec = {"type": "bedrock", "models": [{"name": MODEL, "allowUnpriced": True}], **provider}
    doc = {"ledger": {"type": "memory"}, "providers": {"aws": spec}}
    return config.resolve(config.parse_file_config(json.dumps(doc), "<test>"), {}, "<test>")


def test_config_region_names_the_endpoint() -> None:
    p = _load({"region": "eu-central-1"}).providers[0]
    assert (p.type, p.region, p.base_url) == (
        "bedrock",
        "eu-central-1",
        "https://bedrock-runtime.eu-central-1.amazonaws.com",
    )


@pytest.mark.parametrize(
    ("provider", "path"),
    [
        ({}, "providers.aws.region"),
        ({"region": "not a region"}, "providers.aws.region"),
    ],
)
def test_config_errors(provider: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _load(provider)
    assert caught.value.path == path


def test_a_bedrock_api_key_needs_no_botocore(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "botocore", None)
    spec: dict[str, Any] = {"type": "bedrock", "region": "us-east-1", "apiKeyEnv": "BEDROCK_KEY"}
    spec["models"] = [{"name": MODEL, "allowUnpriced": True}]
    doc = {"ledger": {"type": "memory"}, "providers": {"aws": spec}}
    cfg = config.resolve(config.parse_file_config(json.dumps(doc), "<test>"), {"BEDROCK_KEY": "bk"}, "<test>")
    assert cfg.providers[0].api_key == "bk"


async def test_a_bedrock_api_key_is_a_bearer_token_instead_of_sigv4(
    monkeypatch: pytest.MonkeyPatch, session: HttpClient
) -> None:
    monkeypatch.setitem(__import__("sys").modules, "botocore", None)  # never needed with a key
    key = "ABSKQmVkcm9ja0FQSUtleS1zaW0tMDEyMzQ1Njc4OQ=="
    async with BedrockSimulator(credentials=(ACCESS, SECRET, None), region=REGION, api_key=key) as keyed:
        settings = ProviderSettings(name="bedrock", type="bedrock", base_url=keyed.url, region=REGION, api_key=key)
        provider = build_provider(settings, session)
        out = await provider.chat(MODEL, ask())
        events = [e async for e in provider.stream(MODEL, ask())]
        assert out.content and isinstance(events[-1], StreamFinish)
        assert [r.headers["authorization"] for r in keyed.requests] == [f"Bearer {key}"] * 2
        assert all("x-amz-date" not in r.headers for r in keyed.requests)
        keyed.api_key = "another-key"
        with pytest.raises(ProviderError) as caught:
            await provider.chat(MODEL, ask())
        assert caught.value.reason == "UPSTREAM_AUTH_FAILED" and key not in caught.value.message


def test_bedrock_without_botocore_fails_at_load_naming_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(__import__("sys").modules, "botocore", None)  # as if not installed
    with pytest.raises(ConfigError) as caught:
        _load({"region": "us-east-1"})
    assert "pip install 'feather-grpc[bedrock]'" in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1


# -- the gateway around it ---------------------------------------------------------------------------


def gateway_doc(sim: BedrockSimulator) -> dict[str, Any]:
    return {
        "ledger": {"type": "memory"},
        "retry": {"maxAttempts": 3, "baseMs": 1, "maxMs": 5},
        "providers": {
            "bedrock": {
                "type": "bedrock",
                "region": REGION,
                "baseUrl": sim.url,
                "models": [
                    {
                        "name": MODEL,
                        "aliases": ["claude"],
                        "inputPer1M": 3,
                        "outputPer1M": 15,
                        "cachedInputPer1M": 0.3,
                        "cacheWritePer1M": 3.75,
                    }
                ],
            },
            "mock": {"type": "mock", "models": [{"name": "mock-fast", "inputPer1K": 0.001, "outputPer1K": 0.002}]},
        },
        "fallbacks": {"claude": ["mock-fast"]},
    }


async def test_gateway_bills_exactly_retries_throttling_and_keeps_secrets_out(
    aws_env: None, sim: BedrockSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    options = ServerOptions(metrics_port=0, metrics_host="127.0.0.1")
    async with running_server(gateway_doc(sim), {}, options) as gw:
        sim.enqueue(BedrockReply(input_tokens=1000, output_tokens=100, cache_read=2000, cache_write=400))
        reply = await gw.stub.Chat(pb.ChatRequest(model="claude", messages=[user("hi")]))
        assert reply.provider == "bedrock"
        u = reply.usage
        assert (u.input_tokens, u.cached_input_tokens, u.cache_write_tokens) == (3400, 2000, 400)
        # 1000 x $3 + 2000 x $0.30 + 400 x $3.75 + 100 x $15 per 1M, in nano-dollars
        assert reply.cost_nanos_usd == 1000 * 3000 + 2000 * 300 + 400 * 3750 + 100 * 15000

        before = len(sim.requests)
        sim.enqueue(BedrockReply(status=429, error_type="ThrottlingException", message="slow down"))
        reply = await gw.stub.Chat(pb.ChatRequest(model="claude", messages=[user("hi")]))
        assert reply.provider == "bedrock" and len(sim.requests) - before == 2

        ends = [m async for m in gw.stub.StreamChat(pb.StreamChatRequest(model="claude", messages=[user("yo")]))]
        assert ends[-1].end.finish_reason == pb.FINISH_REASON_STOP and ends[-1].end.usage.output_tokens > 0

        sim.enqueue(BedrockReply(status=400, error_type="ValidationException", message="Malformed input request."))
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gw.stub.Chat(pb.ChatRequest(model="claude", messages=[user("hi")]))
        assert rich_error(caught.value).code == grpc.StatusCode.INVALID_ARGUMENT

        # Converse has no schema-less JSON mode: such a call is never sent to Bedrock (the fallback answers it).
        before = len(sim.requests)
        json_call = pb.ChatRequest(
            model="claude",
            messages=[user("hi")],
            response_format=pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT),
        )
        assert (await gw.stub.Chat(json_call)).provider == "mock" and len(sim.requests) == before
        assert gw.server.metrics_port is not None
        metrics = scrape_text(gw.server.metrics_port)
    logged = " ".join(str(r.__dict__) for r in caplog.records)
    for secret in (SECRET, TOKEN):
        assert secret not in logged and secret not in metrics and secret not in (caught.value.details() or "")


# -- boto3 against the simulator ---------------------------------------------------------------------


def _client(sim: BedrockSimulator) -> Any:
    return boto3.client(
        "bedrock-runtime",
        region_name=REGION,
        endpoint_url=sim.url,
        aws_access_key_id=ACCESS,
        aws_secret_access_key=SECRET,
        aws_session_token=TOKEN,
        config=BotoConfig(retries={"total_max_attempts": 1}),
    )


async def test_boto3_converse_and_converse_stream_against_the_simulator(sim: BedrockSimulator) -> None:
    client = _client(sim)
    sim.enqueue(BedrockReply(text="hi there", input_tokens=5, output_tokens=2, cache_read=3, cache_write=1))
    messages = [{"role": "user", "content": [{"text": "hello"}]}]
    out = await asyncio.to_thread(
        client.converse,
        modelId=MODEL,
        messages=messages,
        system=[{"text": "Be brief."}],
        inferenceConfig={"maxTokens": 50},
    )
    assert out["output"]["message"]["content"] == [{"text": "hi there"}]
    assert out["stopReason"] == "end_turn"
    assert out["usage"]["cacheReadInputTokens"] == 3 and out["usage"]["cacheWriteInputTokens"] == 1
    assert sim.requests[-1].signature_ok  # boto3's signature passes the simulator's check
    assert sim.requests[-1].path == "/model/anthropic.claude-3-5-sonnet-20240620-v1%3A0/converse"

    sim.enqueue(BedrockReply(text="Checking now", tool_uses=(("get_weather", {"city": "Oslo"}),), stream_pieces=9))
    tools = {"tools": [{"toolSpec": {"name": "get_weather", "inputSchema": {"json": WEATHER.parameters}}}]}

    def stream() -> list[dict[str, Any]]:
        reply = client.converse_stream(modelId=MODEL, messages=messages, toolConfig=tools)
        return list(reply["stream"])

    events = await asyncio.to_thread(stream)
    kinds = [next(iter(e)) for e in events]
    assert kinds[0] == "messageStart" and kinds[-2:] == ["messageStop", "metadata"]
    text = "".join(e["contentBlockDelta"]["delta"].get("text", "") for e in events if "contentBlockDelta" in e)
    assert text == "Checking now"
    start = next(e["contentBlockStart"] for e in events if "contentBlockStart" in e)
    assert start["start"]["toolUse"]["name"] == "get_weather"
    assert events[-2]["messageStop"]["stopReason"] == "tool_use"
    assert events[-1]["metadata"]["usage"]["outputTokens"] > 0

    sim.enqueue(BedrockReply(text="one two", exception_after=2, error_type="ThrottlingException", message="slow"))
    with pytest.raises(EventStreamError) as caught:
        await asyncio.to_thread(stream)
    assert caught.value.response["Error"] == {"Code": "throttlingException", "Message": "slow"}

    sim.enqueue(BedrockReply(status=429, error_type="ThrottlingException", message="Too many requests"))
    with pytest.raises(client.exceptions.ThrottlingException):
        await asyncio.to_thread(client.converse, modelId=MODEL, messages=messages)

    bad = boto3.client(
        "bedrock-runtime",
        region_name=REGION,
        endpoint_url=sim.url,
        aws_access_key_id=ACCESS,
        aws_secret_access_key="wrong",
        config=BotoConfig(retries={"total_max_attempts": 1}),
    )
    with pytest.raises(Exception, match="InvalidSignatureException"):
        await asyncio.to_thread(bad.converse, modelId=MODEL, messages=messages)


def test_the_readme_example_loads() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme[readme.index("### Cloud providers") :]
    block = section[section.index("```json") + len("```json") : section.index("```\n\n")]
    cfg = config.resolve(config.parse_file_config(block, "README.md"), {"AZURE_OPENAI_API_KEY": "k"}, "README.md")
    by_name = {p.name: p for p in cfg.providers}
    assert by_name["bedrock"].region == "us-east-1"
    assert by_name["bedrock"].base_url == "https://bedrock-runtime.us-east-1.amazonaws.com"


async def test_an_event_stream_message_over_the_limit_fails_the_attempt(
    aws_env: None, sim: BedrockSimulator, session: HttpClient
) -> None:
    settings = ProviderSettings(
        name="bedrock", type="bedrock", base_url=sim.url, region=REGION, max_stream_event_bytes=4096
    )
    provider = build_provider(settings, session)
    sim.enqueue(BedrockReply(text="x" * 10_000, stream_pieces=20))  # one 10 kB delta, arriving in pieces
    with pytest.raises(ProviderError) as caught:
        [e async for e in provider.stream(MODEL, ask())]
    assert caught.value.reason == "UPSTREAM_RESPONSE_TOO_LARGE" and "maxStreamEventBytes" in caught.value.message


# -- the contract's parts, cache points, thinking and structured output (issue 13 item 5) -------------

PNG = b"\x89PNG\r\n\x1a\n" + bytes(16)
PDF = b"%PDF-1.7 /Type /Page"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def boto3_params(body: dict[str, Any]) -> dict[str, Any]:
    """The gateway's JSON body as boto3 parameters: blobs are bytes there, base64 text on the wire."""

    def walk(value: Any, key: str = "") -> Any:
        if isinstance(value, dict):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        if key in ("bytes", "redactedContent"):
            return base64.b64decode(value)
        return value

    params: dict[str, Any] = walk(body)
    return params


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
                    Part(PartKind.DOCUMENT, data=PDF, media_type="application/pdf", title="Q3 report.v2.pdf"),
                    Part(PartKind.DOCUMENT, data=PDF, media_type="application/pdf"),
                    Part(PartKind.AUDIO, data=b"RIFF", media_type="wav"),
                ),
            ),
            Message(
                Role.ASSISTANT,
                "Checking",
                tool_calls=(ToolCall("t1", "get_weather", '{"city": "Oslo"}'),),
                thinking=(
                    ThinkingBlock("Look it up.", "sig-1"),
                    ThinkingBlock(redacted_data=_b64(b"opaque")),
                    ThinkingBlock("Gemini's", "gemini:c2ln"),  # another family's: not sent to Claude
                ),
            ),
            Message(
                Role.TOOL,
                tool_call_id="t1",
                parts=(
                    Part(PartKind.TEXT, text="no such city"),
                    Part(PartKind.IMAGE, data=PNG, media_type="image/png"),
                ),
                is_error=True,
                cache_ttl="5m",
            ),
        ],
        tools=[ToolSpec(WEATHER.name, WEATHER.description, WEATHER.parameters, strict=True, cache_ttl="1h")],
        max_tokens=8000,
        reasoning_effort="high",
        extra_fields={"performanceConfig": {"latency": "optimized"}},
        **kw,
    )


async def test_parts_cache_points_and_thinking_in_the_request_body(
    aws_env: None, sim: BedrockSimulator, session: HttpClient
) -> None:
    await bedrock(sim, session).chat(MODEL, multimodal_request())
    body = sim.requests[-1].body
    assert body == {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"text": "Look"},
                    {"cachePoint": {"type": "default"}},
                    {"image": {"format": "png", "source": {"bytes": _b64(PNG)}}},
                    {"document": {"format": "pdf", "name": "Q3 report v2", "source": {"bytes": _b64(PDF)}}},
                    {"document": {"format": "pdf", "name": "document 2", "source": {"bytes": _b64(PDF)}}},
                    {"audio": {"format": "wav", "source": {"bytes": _b64(b"RIFF")}}},
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"reasoningContent": {"reasoningText": {"text": "Look it up.", "signature": "sig-1"}}},
                    {"reasoningContent": {"redactedContent": _b64(b"opaque")}},
                    {"text": "Checking"},
                    {"toolUse": {"toolUseId": "t1", "name": "get_weather", "input": {"city": "Oslo"}}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "toolResult": {
                            "toolUseId": "t1",
                            "content": [
                                {"text": "no such city"},
                                {"image": {"format": "png", "source": {"bytes": _b64(PNG)}}},
                            ],
                            "status": "error",
                        }
                    },
                    {"cachePoint": {"type": "default", "ttl": "5m"}},
                ],
            },
        ],
        "system": [{"text": "Rules"}, {"cachePoint": {"type": "default", "ttl": "1h"}}],
        "inferenceConfig": {"maxTokens": 8000},
        # Claude's extended thinking: an effort alone maps to a budget, as on the Anthropic API.
        "additionalModelRequestFields": {"thinking": {"type": "enabled", "budget_tokens": 4096}},
        "toolConfig": {
            "tools": [
                {
                    "toolSpec": {
                        "name": "get_weather",
                        "description": WEATHER.description,
                        "inputSchema": {"json": WEATHER.parameters},
                        "strict": True,
                    }
                },
                {"cachePoint": {"type": "default", "ttl": "1h"}},
            ]
        },
        "performanceConfig": {"latency": "optimized"},
    }
    # boto3 takes the same request (its service model validates every field) and puts the same body on the wire.
    await asyncio.to_thread(_client(sim).converse, modelId=MODEL, **boto3_params(body))
    assert sim.requests[-1].body == body

    schema = {"type": "object", "properties": {"a": {"type": "string"}}}
    await bedrock(sim, session).chat(MODEL, ask(response_format=ResponseFormat("json_schema", "answer", schema, True)))
    sent = sim.requests[-1].body
    assert sent["outputConfig"] == {
        "textFormat": {
            "type": "json_schema",
            "structure": {"jsonSchema": {"schema": json.dumps(schema, separators=(",", ":")), "name": "answer"}},
        }
    }
    await asyncio.to_thread(_client(sim).converse, modelId=MODEL, **boto3_params(sent))
    assert sim.requests[-1].body == sent


async def test_what_converse_cannot_take_is_refused(aws_env: None, sim: BedrockSimulator, session: HttpClient) -> None:
    provider = bedrock(sim, session)
    by_url = ChatRequest(
        model="m", messages=[Message(Role.USER, parts=(Part(PartKind.IMAGE, url="https://example.com/a.png"),))]
    )
    svg = ChatRequest(
        model="m",
        messages=[Message(Role.USER, parts=(Part(PartKind.IMAGE, data=b"<svg/>", media_type="image/svg+xml"),))],
    )
    for request, words in (
        (by_url, "as bytes, not by URL"),
        (svg, "png, jpeg, gif or webp"),
        (ask(thinking_budget=2048), "only for Claude models"),
    ):
        with pytest.raises(ProviderError) as caught:
            await provider.chat("meta.llama3-70b-instruct-v1:0", request)
        assert caught.value.reason == "UPSTREAM_BAD_REQUEST" and words in caught.value.message
    assert not sim.requests
    await provider.chat("meta.llama3-70b-instruct-v1:0", ask(reasoning_effort="none"))  # asks for no reasoning
    assert "additionalModelRequestFields" not in sim.requests[-1].body


async def test_thinking_and_one_hour_cache_writes_in_replies(
    aws_env: None, sim: BedrockSimulator, session: HttpClient
) -> None:
    provider = bedrock(sim, session)
    sim.enqueue(
        BedrockReply(
            text="It is sunny.",
            reasoning="Think about it.",
            signature="sig-9",
            input_tokens=10,
            output_tokens=20,
            cache_write=300,
            cache_write_1h=200,
        )
    )
    out = await provider.chat(MODEL, ask(thinking_budget=1024))
    assert out.content == "It is sunny." and out.thinking == [ThinkingBlock("Think about it.", "sig-9")]
    assert (out.usage.cache_write_tokens, out.usage.cache_write_1h_tokens) == (300, 200)
    sim.enqueue(BedrockReply(text="It is sunny.", reasoning="Think about it.", signature="sig-9", stream_pieces=7))
    events = [e async for e in provider.stream(MODEL, ask(thinking_budget=1024))]
    thinking = [e for e in events if isinstance(e, ThinkingDelta)]
    assert {e.index for e in thinking} == {0}
    assert "".join(e.text for e in thinking) == "Think about it." and thinking[-1].signature == "sig-9"
    assert "".join(e.content for e in events if isinstance(e, TextDelta)) == "It is sunny."


async def test_boto3_reads_the_simulators_reasoning_and_cache_details(sim: BedrockSimulator) -> None:
    client = _client(sim)
    sim.enqueue(BedrockReply(text="ok", reasoning="hmm", signature="sig", cache_write=3, cache_write_1h=2))
    messages = [{"role": "user", "content": [{"text": "hello"}]}]
    out = await asyncio.to_thread(client.converse, modelId=MODEL, messages=messages)
    assert out["output"]["message"]["content"][0] == {
        "reasoningContent": {"reasoningText": {"text": "hmm", "signature": "sig"}}
    }
    assert {"ttl": "1h", "inputTokens": 2} in out["usage"]["cacheDetails"]
    sim.enqueue(BedrockReply(text="ok", reasoning="hmm", signature="sig"))

    def stream() -> list[dict[str, Any]]:
        return list(client.converse_stream(modelId=MODEL, messages=messages)["stream"])

    events = await asyncio.to_thread(stream)
    deltas = [e["contentBlockDelta"]["delta"] for e in events if "contentBlockDelta" in e]
    assert deltas[0] == {"reasoningContent": {"text": "hmm"}} and deltas[1] == {
        "reasoningContent": {"signature": "sig"}
    }


async def test_gateway_routes_inline_parts_to_bedrock_and_urls_past_it(aws_env: None, sim: BedrockSimulator) -> None:
    image = pb.Part(image=pb.ImagePart(data=PNG, media_type="image/png"))
    by_url = pb.Part(image=pb.ImagePart(url="https://example.com/a.png"))
    async with running_server(gateway_doc(sim), {}, ServerOptions()) as gw:
        reply = await gw.stub.Chat(
            pb.ChatRequest(model="claude", messages=[pb.Message(role=pb.ROLE_USER, parts=[image])])
        )
        assert reply.provider == "bedrock"
        before = len(sim.requests)
        reply = await gw.stub.Chat(
            pb.ChatRequest(model="claude", messages=[pb.Message(role=pb.ROLE_USER, parts=[by_url])])
        )
        assert reply.provider == "mock" and len(sim.requests) == before  # Converse fetches no URL
        schema = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, schema_name="a")
        schema.json_schema.update({"type": "object"})
        reply = await gw.stub.Chat(pb.ChatRequest(model="claude", messages=[user("json")], response_format=schema))
        assert reply.provider == "bedrock" and "outputConfig" in sim.requests[-1].body


async def test_max_tokens_default_to_the_models_configured_limit(
    aws_env: None, sim: BedrockSimulator, session: HttpClient
) -> None:
    settings = ProviderSettings(
        name="bedrock", type="bedrock", base_url=sim.url, region=REGION, max_output_tokens=((MODEL, 64000),)
    )
    provider = build_provider(settings, session)
    await provider.chat(MODEL, ask())
    assert sim.requests[-1].body["inferenceConfig"] == {"maxTokens": 64000}
    await provider.chat(MODEL, ask(max_tokens=10))  # the caller's own wins
    assert sim.requests[-1].body["inferenceConfig"] == {"maxTokens": 10}
    # Unconfigured: the usual room for the answer, plus the thinking budget that max tokens includes.
    await bedrock(sim, session).chat(MODEL, ask(thinking_budget=2048))
    assert sim.requests[-1].body["inferenceConfig"] == {"maxTokens": 4096 + 2048}
