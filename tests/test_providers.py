"""Provider adapters over real HTTP against the upstream simulator, plus the mock provider."""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest

from feather_grpc.core.errors import ProviderError
from feather_grpc.core.tokens import estimate_prompt_tokens, estimate_tokens
from feather_grpc.core.types import (
    ChatRequest,
    FinishReason,
    Message,
    PromptUsage,
    ReplyId,
    ResponseFormat,
    Role,
    StreamEvent,
    StreamFinish,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    ToolChoice,
    ToolSpec,
    UpstreamReply,
    Usage,
)
from feather_grpc.providers import (
    AnthropicProvider,
    HttpClient,
    MockProvider,
    OpenAIProvider,
    Provider,
    ProviderSettings,
    build_provider,
)
from feather_grpc.providers.http import parse_retry_after, safe_text
from sim.upstream import (
    ANTHROPIC_PATH,
    OPENAI_PATH,
    Reply,
    SimToolCall,
    SimUsage,
    UpstreamSimulator,
    default_usage,
)
from tests.sim_fixtures import http_session, upstream

__all__ = ["http_session", "upstream"]  # fixtures used by parameter name below

OPENAI_KEY = "sk-test-0123456789abcdef"
ANTHROPIC_KEY = "sk-ant-test-0123456789"
UNICODE_TEXT = "Grüße, 世界! 🦊 ünïcödé done"
WEATHER = ToolSpec(
    name="get_weather",
    description="Weather for a city",
    parameters={"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def openai(sim: UpstreamSimulator, session: HttpClient, **kw: Any) -> Provider:
    settings = ProviderSettings(
        name=kw.pop("name", "openai"),
        type=kw.pop("type", "openai"),
        base_url=sim.url + "/v1",
        api_key=kw.pop("api_key", OPENAI_KEY),
        **kw,
    )
    return build_provider(settings, session)


def anthropic(sim: UpstreamSimulator, session: HttpClient, **kw: Any) -> Provider:
    settings = ProviderSettings(
        name="anthropic", type="anthropic", base_url=sim.url, api_key=kw.pop("api_key", ANTHROPIC_KEY), **kw
    )
    return build_provider(settings, session)


def ask(text: str = "hello there", **kw: Any) -> ChatRequest:
    return ChatRequest(model="any", messages=[Message(Role.USER, text)], **kw)


async def collect(stream: AsyncIterator[StreamEvent]) -> list[StreamEvent]:
    return [event async for event in stream]


def text_of(events: list[StreamEvent]) -> str:
    return "".join(e.content for e in events if isinstance(e, TextDelta))


def calls_of(events: list[StreamEvent]) -> list[ToolCall]:
    """Reassemble tool calls as a consumer does: id/name from the first delta of an index, arguments joined."""
    parts: dict[int, list[str]] = {}
    for e in events:
        if isinstance(e, ToolCallDelta):
            if e.index not in parts:
                parts[e.index] = [e.id, e.name, ""]
            else:
                assert not e.id and not e.name, "id and name come once, on the first delta"
            parts[e.index][2] += e.arguments
    assert sorted(parts) == list(range(len(parts))), "tool call indexes are dense ordinals"
    return [ToolCall(*parts[i]) for i in sorted(parts)]


def finish_of(events: list[StreamEvent]) -> StreamFinish:
    assert isinstance(events[-1], StreamFinish)
    assert sum(isinstance(e, StreamFinish) for e in events) == 1
    return events[-1]


async def failure(call: Any) -> ProviderError:
    """The ProviderError a chat coroutine or a stream raises."""
    with pytest.raises(ProviderError) as info:
        if hasattr(call, "__anext__"):
            await collect(call)
        else:
            await call
    return info.value


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def awkward(**kw: Any) -> Reply:
    """Bytes cut at awkward places, paced so a client in this same event loop sees each piece alone."""
    return Reply(split="awkward", piece_delay_s=0.001, **kw)


# -- the simulator itself ---------------------------------------------------------------------------


async def test_sim_awkward_split_reaches_the_client_as_separate_reads(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    upstream.enqueue(awkward(content=UNICODE_TEXT, line_ending="\r\n"))
    body = {"model": "m", "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]}
    headers = [("Content-Type", "application/json"), ("anthropic-version", "2023-06-01")]
    resp = await http_session.endpoint(upstream.url + ANTHROPIC_PATH, headers).request(orjson.dumps(body))
    try:
        reads = [chunk async for chunk in resp]
    finally:
        resp.close()
    assert len(reads) > 20
    assert any(r.endswith(b"\r") for r in reads), "some read ends between CR and LF"
    assert any(r[-1] >= 0xC0 for r in reads), "some read ends inside a multi-byte character"
    assert any(r.endswith(b"dat") or r.endswith(b"eve") for r in reads), "some read ends inside a field name"
    assert b"".join(reads).decode().count("\r\n\r\n") == b"".join(reads).decode().count("event: ")


async def test_sim_validates_like_the_real_apis(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    json_type = ("Content-Type", "application/json")
    bad = {"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "x"}]}
    anthropic_api = http_session.endpoint(
        upstream.url + ANTHROPIC_PATH, [json_type, ("anthropic-version", "2023-06-01")]
    )
    resp = await anthropic_api.request(orjson.dumps(bad))
    assert resp.status == 400
    assert orjson.loads(await resp.read())["error"]["type"] == "invalid_request_error"
    orphan = {"model": "m", "messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]}
    resp = await http_session.endpoint(upstream.url + OPENAI_PATH, [json_type]).request(orjson.dumps(orphan))
    assert resp.status == 400
    await resp.read()
    assert len(upstream.requests) == 2


async def test_sim_script_matches_path_and_model(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    upstream.enqueue(Reply(content="for b"), model="model-b")
    upstream.enqueue(Reply(content="for anthropic"), path=ANTHROPIC_PATH)
    oa = openai(upstream, http_session)
    assert (await oa.chat("model-a", ask("hi"))).content == "Hello from model-a: hi"
    assert (await oa.chat("model-b", ask("hi"))).content == "for b"
    assert (await anthropic(upstream, http_session).chat("model-b", ask("hi"))).content == "for anthropic"
    assert upstream.pending == 0


async def test_sim_rejects_wrong_key_when_it_has_one(http_session: HttpClient) -> None:
    async with UpstreamSimulator(api_key="right") as sim:
        err = await failure(openai(sim, http_session, api_key="wrong").chat("m", ask()))
        assert err.reason == "UPSTREAM_AUTH_FAILED"
        assert (await openai(sim, http_session, api_key="right").chat("m", ask("x"))).content == "Hello from m: x"


# -- OpenAI -------------------------------------------------------------------------------------------


async def test_openai_chat_default_reply_and_usage_formula(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    request = ChatRequest(
        model="fast", messages=[Message(Role.SYSTEM, "Be brief."), Message(Role.USER, "Say hi to Ada")]
    )
    reply = await openai(upstream, http_session).chat("gpt-test", request)
    assert reply.content == "Hello from gpt-test: Say hi to Ada"
    assert reply.tool_calls == []
    assert reply.finish_reason is FinishReason.STOP
    expected = default_usage(["Be brief.", "Say hi to Ada"], 2, reply.content)
    assert (expected.input, expected.output) == (2 + 4 + 3 * 2, 7)
    assert reply.usage == Usage(input_tokens=12, output_tokens=7)


async def test_default_usage_follows_the_whole_prompt(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    provider = openai(upstream, http_session)
    short = await provider.chat("m", ask("same question"))
    messages = [Message(Role.SYSTEM, "four words of system"), Message(Role.USER, "same question")]
    longer = ChatRequest(model="m", messages=messages)
    assert (await provider.chat("m", longer)).usage.input_tokens == short.usage.input_tokens + 4 + 3


async def test_openai_sends_the_documented_request(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    request = ChatRequest(
        model="fast",
        messages=[
            Message(Role.SYSTEM, "You are terse."),
            Message(Role.USER, "Weather in Paris?", name="ada"),
            Message(Role.ASSISTANT, "", tool_calls=(ToolCall("call_1", "get_weather", '{"city":"Paris"}'),)),
            Message(Role.TOOL, '{"temp_c": 21}', tool_call_id="call_1"),
        ],
        max_tokens=50,
        temperature=0.2,
        top_p=0.9,
        stop=["\n\n"],
        seed=7,
        response_format=ResponseFormat("json_schema", "weather", {"type": "object"}, strict=True),
        tools=[WEATHER],
        tool_choice=ToolChoice(function_name="get_weather"),
    )
    await openai(upstream, http_session, extra_headers=(("OpenAI-Project", "proj_1"),)).chat("gpt-test", request)
    sent = upstream.requests[-1]
    assert sent.path == OPENAI_PATH
    assert sent.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert sent.headers["Content-Type"] == "application/json"
    assert sent.headers["OpenAI-Project"] == "proj_1"
    assert sent.body == {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Weather in Paris?", "name": "ada"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
        ],
        "max_completion_tokens": 50,
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["\n\n"],
        "seed": 7,
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "weather", "schema": {"type": "object"}, "strict": True},
        },
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather for a city",
                    "parameters": WEATHER.parameters,
                },
            }
        ],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }


@pytest.mark.parametrize(
    ("choice", "wire"),
    [(ToolChoice("auto"), "auto"), (ToolChoice("none"), "none"), (ToolChoice("required"), "required"), (None, None)],
)
async def test_openai_tool_choice_modes(
    upstream: UpstreamSimulator, http_session: HttpClient, choice: ToolChoice | None, wire: str | None
) -> None:
    await openai(upstream, http_session).chat("m", ask(tools=[WEATHER], tool_choice=choice))
    assert upstream.requests[-1].body.get("tool_choice") == wire


async def test_openai_compatible_uses_max_tokens_and_sends_no_auth_without_key(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    provider = openai(upstream, http_session, type="openai-compatible", name="local", api_key="")
    assert isinstance(provider, OpenAIProvider)
    await provider.chat("llama", ask(max_tokens=9, response_format=ResponseFormat("json_object")))
    sent = upstream.requests[-1]
    assert "Authorization" not in sent.headers
    assert sent.body["max_tokens"] == 9
    assert "max_completion_tokens" not in sent.body
    assert sent.body["response_format"] == {"type": "json_object"}


async def test_openai_usage_normalisation_with_cached_and_reasoning_tokens(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    upstream.enqueue(Reply(content="ok", usage=SimUsage(12, 7, cached=3, reasoning=2)))
    reply = await openai(upstream, http_session).chat("m", ask())
    assert reply.usage == Usage(input_tokens=12, output_tokens=7, cached_input_tokens=3, reasoning_tokens=2)


async def test_openai_without_usage_estimates_instead_of_billing_zero(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    upstream.enqueue(Reply(content="twelve chars", omit_usage=True))
    request = ask("how many tokens is this?")
    reply = await openai(upstream, http_session).chat("m", request)
    assert reply.usage == Usage(input_tokens=estimate_prompt_tokens(request.messages), output_tokens=3)


async def test_openai_tool_calls_read_back(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    calls = (SimToolCall("get_weather", '{"city":"Paris"}', "call_a"), SimToolCall("get_time", "{}", "call_b"))
    upstream.enqueue(Reply(tool_calls=calls))
    reply = await openai(upstream, http_session).chat("m", ask(tools=[WEATHER]))
    assert reply.content == ""
    assert reply.tool_calls == [
        ToolCall("call_a", "get_weather", '{"city":"Paris"}'),
        ToolCall("call_b", "get_time", "{}"),
    ]
    assert reply.finish_reason is FinishReason.TOOL_CALLS


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ("stop", FinishReason.STOP),
        ("length", FinishReason.LENGTH),
        ("content_filter", FinishReason.CONTENT_FILTER),
        ("function_call", FinishReason.TOOL_CALLS),
        ("something_new", FinishReason.UNSPECIFIED),
    ],
)
async def test_openai_finish_reasons(
    upstream: UpstreamSimulator, http_session: HttpClient, wire: str, expected: FinishReason
) -> None:
    upstream.enqueue(Reply(content="x", finish_reason=wire), Reply(content="x", finish_reason=wire))
    provider = openai(upstream, http_session)
    assert (await provider.chat("m", ask())).finish_reason is expected
    assert finish_of(await collect(provider.stream("m", ask()))).finish_reason is expected


@pytest.mark.parametrize("line_ending", ["\n", "\r\n", "\r"], ids=["lf", "crlf", "cr"])
async def test_openai_stream_with_awkward_framing(
    upstream: UpstreamSimulator, http_session: HttpClient, line_ending: str
) -> None:
    upstream.enqueue(
        awkward(content=UNICODE_TEXT, usage=SimUsage(12, 7, cached=3), line_ending=line_ending, comments=True)
    )
    events = await collect(openai(upstream, http_session).stream("m", ask()))
    assert text_of(events) == UNICODE_TEXT
    assert sum(isinstance(e, TextDelta) for e in events) == len(UNICODE_TEXT.split())
    upstream_reply = UpstreamReply(id="chatcmpl-sim", model="m")  # the sim's id, and the model it was asked for
    assert finish_of(events) == StreamFinish(FinishReason.STOP, Usage(12, 7, cached_input_tokens=3), upstream_reply)
    sent = upstream.requests[-1].body
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


async def test_openai_stream_tool_calls(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    calls = (
        SimToolCall("get_weather", '{"city": "Zürich", "unit": "c"}', "call_a"),
        SimToolCall("get_time", '{"tz": "Europe/Paris"}', "call_b"),
    )
    upstream.enqueue(Reply(tool_calls=calls, split=7, piece_delay_s=0.0))
    events = await collect(openai(upstream, http_session).stream("m", ask(tools=[WEATHER])))
    assert text_of(events) == ""
    assert calls_of(events) == [
        ToolCall("call_a", "get_weather", '{"city": "Zürich", "unit": "c"}'),
        ToolCall("call_b", "get_time", '{"tz": "Europe/Paris"}'),
    ]
    assert finish_of(events).finish_reason is FinishReason.TOOL_CALLS


async def test_openai_stream_takes_the_last_usage_when_every_chunk_has_one(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    upstream.enqueue(Reply(content="one two three four", usage=SimUsage(20, 9), usage_every_chunk=True))
    events = await collect(openai(upstream, http_session).stream("m", ask()))
    assert finish_of(events).usage == Usage(20, 9)


async def test_openai_stream_without_usage_reports_none(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    upstream.enqueue(Reply(content="a b", omit_usage=True))
    events = await collect(openai(upstream, http_session).stream("m", ask()))
    assert text_of(events) == "a b"
    assert finish_of(events) == StreamFinish(FinishReason.STOP, None, UpstreamReply(id="chatcmpl-sim", model="m"))


async def test_openai_stream_that_got_json_instead_of_sse(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    doc = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "whole"}, "finish_reason": "length"}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 1},
    }
    upstream.enqueue(Reply(body=json.dumps(doc).encode()))
    events = await collect(openai(upstream, http_session).stream("m", ask()))
    assert events == [TextDelta("whole"), StreamFinish(FinishReason.LENGTH, Usage(4, 1))]


@pytest.mark.parametrize(
    "reply", [Reply(content="a b c d", cut_after=3), Reply(content="a b c d", reset_after=3)], ids=["eof", "reset"]
)
async def test_openai_stream_cut(upstream: UpstreamSimulator, http_session: HttpClient, reply: Reply) -> None:
    upstream.enqueue(reply)
    seen: list[StreamEvent] = []
    with pytest.raises(ProviderError) as info:
        async for event in openai(upstream, http_session).stream("m", ask()):
            seen.append(event)
    assert info.value.reason == "UPSTREAM_STREAM_CUT"
    assert info.value.retryable
    if reply.cut_after is not None:
        assert "[DONE]" in info.value.message
        # role chunk + two pieces before the cut (one delta or two: pieces read together are joined)
        assert "".join(e.content for e in seen if isinstance(e, TextDelta)) == "a b "
        assert seen[0] == ReplyId("chatcmpl-sim")  # said by the first chunk: a cut stream still names its reply
        assert all(isinstance(e, TextDelta) for e in seen[1:])


async def test_deltas_of_one_read_are_joined_and_nothing_waits_for_more(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    events = [
        b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"content":"Hel"}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"content":"lo"}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"tool_calls":[{"index":0,"id":"c1","function":{"name":"f"}}]}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{"content":" again"}}]}\n\n',
        b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
        b"data: [DONE]\n\n",
    ]
    upstream.enqueue(Reply(body=b"".join(events), content_type="text/event-stream"))
    got = await collect(openai(upstream, http_session).stream("m", ask()))
    assert got[:3] == [TextDelta("Hello"), ToolCallDelta(0, "c1", "f", ""), TextDelta(" again")]
    assert len(got) == 4 and isinstance(got[3], StreamFinish)


async def test_openai_mid_stream_error_chunk(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    upstream.enqueue(Reply(content="a b c", error_after=2, stream_error_type="server_error", error_message="boom"))
    err = await failure(openai(upstream, http_session).stream("m", ask()))
    assert (err.reason, err.retryable) == ("UPSTREAM_SERVER_ERROR", True)
    assert err.message == "openai: 500 server_error: boom"


# -- error classification (both formats) --------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "reason", "retryable"),
    [
        (Reply(status=400), "UPSTREAM_BAD_REQUEST", False),
        (Reply(status=400, error_code="context_length_exceeded"), "UPSTREAM_CONTEXT_TOO_LONG", False),
        (
            Reply(status=400, error_code="", error_message="This model's maximum context length is 8192 tokens."),
            "UPSTREAM_CONTEXT_TOO_LONG",
            False,
        ),
        (Reply(status=401), "UPSTREAM_AUTH_FAILED", False),
        (Reply(status=403), "UPSTREAM_AUTH_FAILED", False),
        (Reply(status=404), "UPSTREAM_NOT_FOUND", False),
        (Reply(status=408), "UPSTREAM_TIMEOUT", True),
        (Reply(status=409), "UPSTREAM_CONFLICT", True),
        (Reply(status=413), "UPSTREAM_CONTEXT_TOO_LONG", False),
        (Reply(status=422), "UPSTREAM_BAD_REQUEST", False),
        (Reply(status=429), "UPSTREAM_RATE_LIMITED", True),
        (
            Reply(status=429, error_type="insufficient_quota", error_code="insufficient_quota"),
            "UPSTREAM_QUOTA_EXHAUSTED",
            False,
        ),
        (Reply(status=500), "UPSTREAM_SERVER_ERROR", True),
        (Reply(status=502), "UPSTREAM_SERVER_ERROR", True),
        (Reply(status=503), "UPSTREAM_SERVER_ERROR", True),
        (Reply(status=504), "UPSTREAM_SERVER_ERROR", True),
        (Reply(status=529), "UPSTREAM_OVERLOADED", True),
        (Reply(status=599), "UPSTREAM_SERVER_ERROR", True),
    ],
)
async def test_openai_http_errors(
    upstream: UpstreamSimulator, http_session: HttpClient, reply: Reply, reason: str, retryable: bool
) -> None:
    upstream.enqueue(reply, reply)
    provider = openai(upstream, http_session)
    for err in (await failure(provider.chat("m", ask())), await failure(provider.stream("m", ask()))):
        assert (err.reason, err.retryable, err.http_status) == (reason, retryable, reply.status)
        assert err.message.startswith(f"openai: {reply.status} ")


@pytest.mark.parametrize(
    ("reply", "reason", "retryable"),
    [
        (Reply(status=400), "UPSTREAM_BAD_REQUEST", False),
        (
            Reply(status=400, error_message="prompt is too long: 210000 tokens > 200000 maximum"),
            "UPSTREAM_CONTEXT_TOO_LONG",
            False,
        ),
        (Reply(status=401), "UPSTREAM_AUTH_FAILED", False),
        (Reply(status=403), "UPSTREAM_AUTH_FAILED", False),
        (Reply(status=404), "UPSTREAM_NOT_FOUND", False),
        (Reply(status=413), "UPSTREAM_CONTEXT_TOO_LONG", False),
        (Reply(status=429), "UPSTREAM_RATE_LIMITED", True),
        (Reply(status=500), "UPSTREAM_SERVER_ERROR", True),
        (Reply(status=529), "UPSTREAM_OVERLOADED", True),
        (Reply(status=503, error_type="overloaded_error"), "UPSTREAM_OVERLOADED", True),
    ],
)
async def test_anthropic_http_errors(
    upstream: UpstreamSimulator, http_session: HttpClient, reply: Reply, reason: str, retryable: bool
) -> None:
    upstream.enqueue(reply, reply)
    provider = anthropic(upstream, http_session)
    for err in (await failure(provider.chat("m", ask())), await failure(provider.stream("m", ask()))):
        assert (err.reason, err.retryable, err.http_status) == (reason, retryable, reply.status)


async def test_error_message_format_and_no_secrets(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    upstream.enqueue(Reply(status=401, error_message=f"Incorrect API key provided: {OPENAI_KEY}. " + "x" * 500))
    err = await failure(openai(upstream, http_session).chat("m", ask("my secret prompt")))
    prefix = "openai: 401 invalid_request_error (invalid_api_key): Incorrect API key provided: [redacted]. xxx"
    assert err.message.startswith(prefix)
    assert len(err.message) <= len("openai: 401 invalid_request_error (invalid_api_key): ") + 300
    assert OPENAI_KEY not in err.message
    assert "secret prompt" not in err.message
    assert "Bearer" not in err.message


async def test_error_body_arriving_in_many_reads_is_read_whole(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    long_message = "Rate limit reached. " * 20
    upstream.enqueue(Reply(status=429, error_message=long_message, split=40, piece_delay_s=0.001))
    err = await failure(openai(upstream, http_session).chat("m", ask()))
    assert err.reason == "UPSTREAM_RATE_LIMITED"
    assert err.message.startswith("openai: 429 requests (rate_limit_exceeded): Rate limit reached. Rate limit")


async def test_rate_limit_message_names_provider_status_and_type(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    upstream.enqueue(Reply(status=429, retry_after="2"))
    err = await failure(anthropic(upstream, http_session).chat("m", ask()))
    assert err.message == (
        "anthropic: 429 rate_limit_error: Number of request tokens has exceeded your per-minute rate limit."
    )
    assert err.retry_after_s == 2.0


@pytest.mark.parametrize(
    ("headers", "low", "high"),
    [
        ({"retry-after": "2"}, 2.0, 2.0),
        ({"retry-after": "1.5"}, 1.5, 1.5),
        ({"retry-after-ms": "250"}, 0.25, 0.25),
        ({"retry-after-ms": "250", "retry-after": "1"}, 0.25, 0.25),
        ({"retry-after": "soon"}, None, None),
        ({"retry-after": "-3"}, None, None),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, 0.0, 0.0),  # in the past: no wait
    ],
)
async def test_retry_after_header_forms(
    upstream: UpstreamSimulator,
    http_session: HttpClient,
    headers: dict[str, str],
    low: float | None,
    high: float | None,
) -> None:
    upstream.enqueue(Reply(status=503, headers=headers))
    err = await failure(openai(upstream, http_session).chat("m", ask()))
    if low is None:
        assert err.retry_after_s is None
    else:
        assert err.retry_after_s is not None
        assert low <= err.retry_after_s <= (high or low)


async def test_retry_after_http_date(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    upstream.enqueue(Reply(status=429, retry_after=email.utils.formatdate(time.time() + 30, usegmt=True)))
    err = await failure(anthropic(upstream, http_session).chat("m", ask()))
    assert err.retry_after_s is not None
    assert 28.0 <= err.retry_after_s <= 30.0  # whole seconds on the wire, a few ms of test in between


def test_parse_retry_after_with_a_fixed_clock() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 42, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == 42.0
    assert parse_retry_after({"retry-after": date}, now=now + 100) == 0.0
    assert parse_retry_after({"retry-after": "inf"}) is None
    assert parse_retry_after({"retry-after": "nan"}) is None
    assert parse_retry_after({}) is None


def test_safe_text_redacts_key_shaped_strings() -> None:
    text = 'bad key sk-abc123***xyz and Authorization: Bearer abc.def and "x-api-key": "k-123"'
    out = safe_text(text, api_key="")
    assert "sk-abc123" not in out
    assert "abc.def" not in out
    assert "k-123" not in out
    assert safe_text("short\n\nmulti  line") == "short multi line"


async def test_non_json_error_body_uses_the_status_text(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    upstream.enqueue(Reply(status=502, body=b"<html><body>nginx says no</body></html>", content_type="text/html"))
    err = await failure(openai(upstream, http_session).chat("m", ask()))
    assert (err.reason, err.retryable) == ("UPSTREAM_SERVER_ERROR", True)
    assert err.message == "openai: 502 http_error: Bad Gateway"


@pytest.mark.parametrize("body", [b"not json", b'{"unexpected": true}', b"[1, 2]"])
async def test_unparseable_success_body(upstream: UpstreamSimulator, http_session: HttpClient, body: bytes) -> None:
    upstream.enqueue(Reply(body=body), Reply(body=body))
    for provider in (openai(upstream, http_session), anthropic(upstream, http_session)):
        err = await failure(provider.chat("m", ask()))
        assert (err.reason, err.retryable) == ("UPSTREAM_BAD_RESPONSE", True)


async def test_garbage_stream_chunk_is_a_bad_response(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    upstream.enqueue(Reply(body=b"data: {not json}\n\n", content_type="text/event-stream"))
    err = await failure(openai(upstream, http_session).stream("m", ask()))
    assert err.reason == "UPSTREAM_BAD_RESPONSE"


_CALL = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.mark.parametrize(
    "chunk",
    [
        {"choices": [1.5]},  # a choice that is not an object
        {"choices": ["x"]},
        {"choices": [{"delta": {"tool_calls": [{**_CALL, "index": 0, "id": 7}]}}]},  # an id that is not text
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"name": ["f"]}}]}}]},
        {"choices": [{"delta": {"refusal": 5}}]},
    ],
)
async def test_a_stream_chunk_of_another_shape_is_a_bad_response(
    upstream: UpstreamSimulator, http_session: HttpClient, chunk: dict[str, Any]
) -> None:
    """Found by bench/fuzz.py: these reached the engine as AttributeError/TypeError (INTERNAL)."""
    body = b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n"
    upstream.enqueue(Reply(body=body, content_type="text/event-stream"))
    err = await failure(openai(upstream, http_session).stream("m", ask()))
    assert (err.reason, err.retryable) == ("UPSTREAM_BAD_RESPONSE", True)
    assert err.message == "openai: 200 bad response: a stream event is not in the API's shape"


@pytest.mark.parametrize(
    "message",
    [
        {"role": "assistant", "content": None, "tool_calls": [{**_CALL, "id": 5}]},
        {"role": "assistant", "content": None, "tool_calls": [{**_CALL, "function": {"name": "f", "arguments": {}}}]},
    ],
)
async def test_a_tool_call_that_is_not_text_is_a_bad_response(
    upstream: UpstreamSimulator, http_session: HttpClient, message: dict[str, Any]
) -> None:
    """Found by bench/fuzz.py: an id or arguments that were not strings failed the call INTERNAL when the
    reply was turned into protobuf."""
    doc = {"id": "c", "object": "chat.completion", "choices": [{"index": 0, "message": message}]}
    upstream.enqueue(Reply(body=json.dumps(doc).encode()))
    err = await failure(openai(upstream, http_session).chat("m", ask()))
    assert (err.reason, err.retryable) == ("UPSTREAM_BAD_RESPONSE", True)


@pytest.mark.parametrize(
    "content",
    [[{"type": "text", "text": 1.5}], [{"type": "tool_use", "id": 7, "name": "f", "input": {}}]],
)
async def test_an_anthropic_message_of_another_shape_is_a_bad_response(
    upstream: UpstreamSimulator, http_session: HttpClient, content: list[dict[str, Any]]
) -> None:
    """Found by bench/fuzz.py: a text block whose text was a number failed the call with INTERNAL."""
    doc = {"type": "message", "role": "assistant", "content": content, "stop_reason": "end_turn"}
    upstream.enqueue(Reply(body=json.dumps(doc).encode()))
    err = await failure(anthropic(upstream, http_session).chat("m", ask()))
    assert (err.reason, err.retryable) == ("UPSTREAM_BAD_RESPONSE", True)


async def test_an_anthropic_text_delta_that_is_not_text_is_a_bad_response(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    events: list[dict[str, Any]] = [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}},
    ]
    body = b"".join(b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n" for e in events)
    upstream.enqueue(Reply(body=body, content_type="text/event-stream"))
    err = await failure(anthropic(upstream, http_session).stream("m", ask()))
    assert (err.reason, err.retryable) == ("UPSTREAM_BAD_RESPONSE", True)


async def test_usage_details_of_another_shape_count_nothing(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    """Found by bench/fuzz.py: details that were not objects failed a call the upstream had answered."""
    usage = {"prompt_tokens": 5, "completion_tokens": 2, "prompt_tokens_details": "x", "completion_tokens_details": 3}
    doc = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}], "usage": usage}
    upstream.enqueue(Reply(body=json.dumps(doc).encode()))
    out = await openai(upstream, http_session).chat("m", ask())
    assert (out.content, out.usage.input_tokens, out.usage.output_tokens) == ("hi", 5, 2)
    assert (out.usage.cached_input_tokens, out.usage.reasoning_tokens) == (0, 0)
    chunks = [{"choices": [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]}, {"usage": "many"}]
    body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
    upstream.enqueue(Reply(body=body, content_type="text/event-stream"))
    events = [e async for e in openai(upstream, http_session).stream("m", ask())]
    assert isinstance(events[-1], StreamFinish) and events[-1].usage is None  # no usage: the engine estimates


@pytest.mark.parametrize("reply", [Reply(drop=True), Reply(truncate_body=True)])
async def test_read_errors(upstream: UpstreamSimulator, http_session: HttpClient, reply: Reply) -> None:
    upstream.enqueue(reply, reply)
    for provider in (openai(upstream, http_session), anthropic(upstream, http_session)):
        err = await failure(provider.chat("m", ask()))
        assert (err.reason, err.retryable) == ("UPSTREAM_READ_ERROR", True)
    # The pool recovers: the next call gets a fresh connection.
    assert (await openai(upstream, http_session).chat("m", ask("x"))).content == "Hello from m: x"


async def test_connect_error_on_a_closed_port(http_session: HttpClient) -> None:
    settings = ProviderSettings("openai", "openai", f"http://127.0.0.1:{closed_port()}/v1", api_key=OPENAI_KEY)
    provider = build_provider(settings, http_session)
    for err in (await failure(provider.chat("m", ask())), await failure(provider.stream("m", ask()))):
        assert (err.reason, err.retryable) == ("UPSTREAM_CONNECT_ERROR", True)
        assert err.message.startswith("openai: connect error: ")
        assert OPENAI_KEY not in err.message


# -- cancellation -------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [openai, anthropic], ids=["openai", "anthropic"])
async def test_closing_a_stream_early_closes_the_upstream_connection(
    upstream: UpstreamSimulator, http_session: HttpClient, make: Any
) -> None:
    upstream.enqueue(Reply(content="first second third", hang_after=4))
    stream = make(upstream, http_session).stream("m", ask())
    first = await anext(stream)
    while isinstance(first, ReplyId | PromptUsage):  # the reply's id, Anthropic's prompt usage: before any text
        first = await anext(stream)
    assert isinstance(first, TextDelta) and first.content.startswith("first ")  # later pieces may come with it
    assert upstream.stream_disconnects == 0
    await stream.aclose()
    await upstream.wait_stream_disconnect(timeout_s=2.0)
    assert upstream.stream_disconnects == 1


@pytest.mark.parametrize("make", [openai, anthropic], ids=["openai", "anthropic"])
async def test_cancelling_a_stream_propagates_and_closes_the_upstream_connection(
    upstream: UpstreamSimulator, http_session: HttpClient, make: Any
) -> None:
    upstream.enqueue(Reply(content="first second third", hang_after=4))
    got_first = asyncio.Event()

    async def consume() -> None:
        async for _ in make(upstream, http_session).stream("m", ask()):
            got_first.set()

    task = asyncio.create_task(consume())
    async with asyncio.timeout(2.0):
        await got_first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()
    await upstream.wait_stream_disconnect(timeout_s=2.0)
    # The connection was closed, not pooled half-read: the next stream works on a fresh one.
    events = await collect(make(upstream, http_session).stream("m", ask("again")))
    assert text_of(events).endswith("again")


async def test_cancelling_a_chat_propagates_and_closes_the_connection(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    upstream.enqueue(Reply(latency_s=30))
    task = asyncio.create_task(openai(upstream, http_session).chat("m", ask()))
    await upstream.wait_requests(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await upstream.wait_disconnect(timeout_s=2.0)
    assert upstream.stream_disconnects == 0


# -- Anthropic ----------------------------------------------------------------------------------------


async def test_anthropic_chat_request_shape_and_defaults(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    request = ChatRequest(
        model="smart",
        messages=[
            Message(Role.SYSTEM, "Be brief."),
            Message(Role.SYSTEM, "Answer in French."),
            Message(Role.USER, "Hi"),
        ],
        temperature=1.7,  # outside Anthropic's range: passed through, the upstream decides
        top_p=0.5,
        stop=["END"],
    )
    reply = await anthropic(upstream, http_session).chat("claude-test", request)
    assert reply.content == "Hello from claude-test: Hi"
    sent = upstream.requests[-1]
    assert sent.path == ANTHROPIC_PATH
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY
    assert sent.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in sent.headers
    assert sent.body == {
        "model": "claude-test",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": "Hi"}],
        "system": "Be brief.\n\nAnswer in French.",
        "temperature": 1.7,
        "top_p": 0.5,
        "stop_sequences": ["END"],
    }
    texts = ["Be brief.\n\nAnswer in French.", "Hi"]
    assert reply.usage == Usage(input_tokens=default_usage(texts, 1, reply.content).input, output_tokens=4)


async def test_anthropic_base_url_may_already_end_in_v1(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    settings = ProviderSettings("anthropic", "anthropic", upstream.url + "/v1/", api_key=ANTHROPIC_KEY)
    reply = await AnthropicProvider(settings, http_session).chat("m", ask("x", max_tokens=5))
    assert reply.content == "Hello from m: x"
    assert upstream.requests[-1].body["max_tokens"] == 5


async def test_anthropic_tools_and_tool_results_in_its_format(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    request = ChatRequest(
        model="smart",
        messages=[
            Message(Role.SYSTEM, "Use tools."),
            Message(Role.USER, "Weather and time in Paris?"),
            Message(Role.USER, "Quickly."),
            Message(
                Role.ASSISTANT,
                "Checking.",
                tool_calls=(
                    ToolCall("toolu_1", "get_weather", '{"city": "Paris"}'),
                    ToolCall("toolu_2", "get_time", ""),
                ),
            ),
            Message(Role.TOOL, "21C", tool_call_id="toolu_1"),
            Message(Role.TOOL, "14:00", tool_call_id="toolu_2"),
            Message(Role.USER, "Thanks, and tomorrow?"),
        ],
        tools=[WEATHER, ToolSpec("get_time")],
        tool_choice=ToolChoice("required"),
    )
    await anthropic(upstream, http_session).chat("claude-test", request)
    body = upstream.requests[-1].body
    assert body["system"] == "Use tools."
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Weather and time in Paris?"},
                {"type": "text", "text": "Quickly."},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_2", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "21C"},
                {"type": "tool_result", "tool_use_id": "toolu_2", "content": "14:00"},
                {"type": "text", "text": "Thanks, and tomorrow?"},
            ],
        },
    ]
    assert body["tools"] == [
        {"name": "get_weather", "description": "Weather for a city", "input_schema": WEATHER.parameters},
        {"name": "get_time", "input_schema": {"type": "object"}},
    ]
    assert body["tool_choice"] == {"type": "any"}


@pytest.mark.parametrize(
    ("choice", "wire"),
    [
        (ToolChoice("auto"), {"type": "auto"}),
        (ToolChoice("none"), {"type": "none"}),
        (ToolChoice(function_name="get_weather"), {"type": "tool", "name": "get_weather"}),
    ],
)
async def test_anthropic_tool_choice(
    upstream: UpstreamSimulator, http_session: HttpClient, choice: ToolChoice, wire: dict[str, str]
) -> None:
    await anthropic(upstream, http_session).chat("m", ask(tools=[WEATHER], tool_choice=choice))
    assert upstream.requests[-1].body["tool_choice"] == wire


async def test_anthropic_rejects_tool_arguments_that_are_not_an_object(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    request = ChatRequest(
        model="m",
        messages=[
            Message(Role.USER, "hi"),
            Message(Role.ASSISTANT, tool_calls=(ToolCall("t1", "f", "[1, 2]"),)),
            Message(Role.TOOL, "ok", tool_call_id="t1"),
        ],
    )
    err = await failure(anthropic(upstream, http_session).chat("m", request))
    assert (err.reason, err.retryable) == ("UPSTREAM_BAD_REQUEST", False)
    assert not upstream.requests


async def test_anthropic_reads_all_text_blocks_tool_use_and_cache_usage(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [
            {"type": "thinking", "thinking": "hmm", "signature": "s"},
            {"type": "text", "text": "Hello "},
            {"type": "tool_use", "id": "toolu_9", "name": "get_weather", "input": {"city": "Oslo"}},
            {"type": "text", "text": "world"},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 10,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 3,
            "output_tokens": 7,
        },
    }
    upstream.enqueue(Reply(body=json.dumps(message).encode()))
    reply = await anthropic(upstream, http_session).chat("m", ask())
    assert reply.content == "Hello world"
    assert len(reply.tool_calls) == 1
    call = reply.tool_calls[0]
    assert (call.id, call.name, json.loads(call.arguments)) == ("toolu_9", "get_weather", {"city": "Oslo"})
    assert reply.finish_reason is FinishReason.TOOL_CALLS
    assert reply.usage == Usage(input_tokens=18, output_tokens=7, cached_input_tokens=3, cache_write_tokens=5)


async def test_anthropic_usage_normalisation_from_the_simulator(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    usage = SimUsage(10, 7, cached=3, cache_write=5)
    upstream.enqueue(Reply(content="ok", usage=usage), Reply(content="ok", usage=usage))
    provider = anthropic(upstream, http_session)
    expected = Usage(input_tokens=18, output_tokens=7, cached_input_tokens=3, cache_write_tokens=5)
    assert (await provider.chat("m", ask())).usage == expected
    assert finish_of(await collect(provider.stream("m", ask()))).usage == expected


@pytest.mark.parametrize(
    ("wire", "expected"),
    [
        ("end_turn", FinishReason.STOP),
        ("stop_sequence", FinishReason.STOP),
        ("pause_turn", FinishReason.STOP),
        ("max_tokens", FinishReason.LENGTH),
        ("tool_use", FinishReason.TOOL_CALLS),
        ("refusal", FinishReason.CONTENT_FILTER),
    ],
)
async def test_anthropic_finish_reasons(
    upstream: UpstreamSimulator, http_session: HttpClient, wire: str, expected: FinishReason
) -> None:
    upstream.enqueue(Reply(content="x", finish_reason=wire), Reply(content="x", finish_reason=wire))
    provider = anthropic(upstream, http_session)
    assert (await provider.chat("m", ask())).finish_reason is expected
    assert finish_of(await collect(provider.stream("m", ask()))).finish_reason is expected


@pytest.mark.parametrize("line_ending", ["\n", "\r\n"], ids=["lf", "crlf"])
async def test_anthropic_stream_with_awkward_framing_pings_and_cumulative_usage(
    upstream: UpstreamSimulator, http_session: HttpClient, line_ending: str
) -> None:
    # message_start says output 5 so far; message_delta says 7 in total. Adding would give 12.
    usage = SimUsage(10, 7, cached=3, cache_write=5, start_output=5)
    upstream.enqueue(awkward(content=UNICODE_TEXT, usage=usage, pings=True, comments=True, line_ending=line_ending))
    events = await collect(anthropic(upstream, http_session).stream("m", ask()))
    assert text_of(events) == UNICODE_TEXT
    assert finish_of(events) == StreamFinish(
        FinishReason.STOP,
        Usage(input_tokens=18, output_tokens=7, cached_input_tokens=3, cache_write_tokens=5),
        UpstreamReply(id="msg_sim", model="m"),
    )
    assert upstream.requests[-1].body["stream"] is True


async def test_anthropic_stream_tool_calls_use_call_ordinals(
    upstream: UpstreamSimulator, http_session: HttpClient
) -> None:
    calls = (SimToolCall("get_weather", '{"city": "Zürich"}', "toolu_a"), SimToolCall("get_time", "{}", "toolu_b"))
    upstream.enqueue(Reply(content="Let me check.", tool_calls=calls))
    events = await collect(anthropic(upstream, http_session).stream("m", ask(tools=[WEATHER])))
    assert text_of(events) == "Let me check."
    # Block 0 is the text; the calls are blocks 1 and 2 but tool calls 0 and 1.
    assert [e.index for e in events if isinstance(e, ToolCallDelta) and e.id] == [0, 1]
    assert calls_of(events) == [
        ToolCall("toolu_a", "get_weather", '{"city": "Zürich"}'),
        ToolCall("toolu_b", "get_time", "{}"),
    ]
    assert finish_of(events).finish_reason is FinishReason.TOOL_CALLS


@pytest.mark.parametrize(
    ("error_type", "reason", "retryable", "status"),
    [
        ("overloaded_error", "UPSTREAM_OVERLOADED", True, 529),
        ("api_error", "UPSTREAM_SERVER_ERROR", True, 500),
        ("invalid_request_error", "UPSTREAM_BAD_REQUEST", False, 400),
    ],
)
async def test_anthropic_mid_stream_error_event(
    upstream: UpstreamSimulator,
    http_session: HttpClient,
    error_type: str,
    reason: str,
    retryable: bool,
    status: int,
) -> None:
    upstream.enqueue(Reply(content="a b c d", error_after=4, stream_error_type=error_type))
    seen: list[StreamEvent] = []
    with pytest.raises(ProviderError) as info:
        async for event in anthropic(upstream, http_session).stream("m", ask()):
            seen.append(event)
    err = info.value
    assert (err.reason, err.retryable, err.http_status) == (reason, retryable, status)
    assert err.message.startswith(f"anthropic: {status} {error_type}: ")
    # message_start (the reply's id, the prompt's usage: 2 words + 3 per message), block start, ping, first
    # delta, then the error
    assert seen == [ReplyId("msg_sim"), PromptUsage(Usage(input_tokens=5)), TextDelta("a ")]


async def test_anthropic_stream_cut(upstream: UpstreamSimulator, http_session: HttpClient) -> None:
    upstream.enqueue(Reply(content="a b c", cut_after=5))
    err = await failure(anthropic(upstream, http_session).stream("m", ask()))
    assert (err.reason, err.retryable) == ("UPSTREAM_STREAM_CUT", True)
    assert "message_stop" in err.message


# -- mock ---------------------------------------------------------------------------------------------


def mock() -> Provider:
    return build_provider(ProviderSettings("demo", "mock", ""), session=None)  # type: ignore[arg-type]


async def test_mock_replies_to_the_last_user_message() -> None:
    request = ChatRequest(
        model="m",
        messages=[Message(Role.USER, "first"), Message(Role.ASSISTANT, "ok"), Message(Role.USER, "x" * 300)],
    )
    reply = await mock().chat("mock-1", request)
    assert isinstance(mock(), MockProvider)
    assert reply.content == "Feather mock reply to: " + "x" * 200
    assert reply.finish_reason is FinishReason.STOP
    assert reply.tool_calls == []
    assert reply.usage == Usage(estimate_prompt_tokens(request.messages), estimate_tokens(reply.content))
    assert reply == await mock().chat("mock-1", request)  # deterministic


async def test_mock_max_tokens_truncates() -> None:
    request = ask("a fairly long question about many things", max_tokens=3)
    reply = await mock().chat("m", request)
    assert reply.finish_reason is FinishReason.LENGTH
    assert reply.usage.output_tokens == 3
    assert reply.content == "Feather mock"  # 12 characters: 3 estimated tokens


@pytest.mark.parametrize(
    ("choice", "name"), [(ToolChoice("required"), "get_weather"), (ToolChoice(function_name="get_time"), "get_time")]
)
async def test_mock_tool_call_when_required(choice: ToolChoice, name: str) -> None:
    request = ask("weather?", tools=[WEATHER, ToolSpec("get_time")], tool_choice=choice)
    reply = await mock().chat("m", request)
    assert reply.content == ""
    assert reply.tool_calls == [ToolCall("call_mock_1", name, "{}")]
    assert reply.finish_reason is FinishReason.TOOL_CALLS
    events = await collect(mock().stream("m", request))
    assert calls_of(events) == reply.tool_calls
    assert finish_of(events) == StreamFinish(FinishReason.TOOL_CALLS, reply.usage)


async def test_mock_auto_tool_choice_answers_in_text() -> None:
    reply = await mock().chat("m", ask("hi", tools=[WEATHER], tool_choice=ToolChoice("auto")))
    assert reply.content == "Feather mock reply to: hi"


async def test_mock_stream_word_deltas_match_chat() -> None:
    request = ask("  spaced   out words ")
    reply = await mock().chat("m", request)
    events = await collect(mock().stream("m", request))
    deltas = [e.content for e in events if isinstance(e, TextDelta)]
    assert deltas[:3] == ["Feather ", "mock ", "reply "]
    assert "".join(deltas) == reply.content
    assert finish_of(events) == StreamFinish(reply.finish_reason, reply.usage)


async def test_build_provider_rejects_unknown_types(http_session: HttpClient) -> None:
    with pytest.raises(ValueError, match="unknown provider type 'cohere'"):
        build_provider(ProviderSettings("g", "cohere", "http://x"), http_session)
