"""Issue 12, item 1: content parts (text, images, PDF documents, audio) mapped to each provider's format,
routing that skips providers which cannot take a part, and the bounds on them.

A real gateway in front of the upstream simulator; the bodies it sends upstream are compared whole.
"""

from __future__ import annotations

import base64
import re
from collections.abc import AsyncIterator
from typing import Any

import feather_client as fc
import grpc
import pytest

from feather_grpc.core.errors import ProviderError
from feather_grpc.core.tokens import estimate_prompt_tokens
from feather_grpc.core.types import ChatRequest, Message, Part, PartKind, Role
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.providers import ProviderSettings, build_provider
from feather_grpc.providers.http import new_session
from sim.upstream import ANTHROPIC_PATH, OPENAI_PATH, Reply, SimToolCall, UpstreamSimulator
from tests.gateway_harness import rich_error, running_gateway, user
from tests.test_contract_accounting import ENV, config

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(40))
PDF = b"%PDF-1.7\n1 0 obj << /Type /Pages /Count 2 >>\n2 0 obj << /Type /Page >>\n3 0 obj <</Type/Page>>\n%%EOF"
WAV = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(200)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSimulator]:
    async with UpstreamSimulator() as s:
        yield s


def shared_alias(sim: UpstreamSimulator) -> dict[str, Any]:
    """Both models answer to `any`, Anthropic's first in routing order."""
    doc = config(sim)
    doc["providers"] = {"anthropic": doc["providers"]["anthropic"], "openai": doc["providers"]["openai"]}
    for provider in doc["providers"].values():
        provider["models"][0]["aliases"] = ["any"]
    return doc


def text(t: str) -> pb.Part:
    return pb.Part(text=t)


def image_url(url: str, detail: pb.ImageDetail.ValueType = pb.IMAGE_DETAIL_UNSPECIFIED) -> pb.Part:
    return pb.Part(image=pb.ImagePart(url=url, detail=detail))


def image_data(data: bytes = PNG, media_type: str = "image/png") -> pb.Part:
    return pb.Part(image=pb.ImagePart(data=data, media_type=media_type))


def pdf(data: bytes = PDF, title: str = "") -> pb.Part:
    return pb.Part(document=pb.DocumentPart(data=data, title=title))


def pdf_url(url: str, title: str = "") -> pb.Part:
    return pb.Part(document=pb.DocumentPart(url=url, title=title))


def audio(data: bytes = WAV, fmt: str = "wav") -> pb.Part:
    return pb.Part(audio=pb.AudioPart(data=data, format=fmt))


def msg(role: pb.Role.ValueType, *parts: pb.Part, **kw: Any) -> pb.Message:
    return pb.Message(role=role, parts=parts, **kw)


async def test_openai_gets_chat_content_parts(sim: UpstreamSimulator) -> None:
    async with running_gateway(config(sim), ENV) as gw:
        await gw.stub.Chat(
            pb.ChatRequest(
                model="gpt-sim",
                messages=[
                    msg(pb.ROLE_SYSTEM, text("Be brief.")),
                    msg(
                        pb.ROLE_USER,
                        text("What is in these?"),
                        image_url("https://example.com/cat.jpg", pb.IMAGE_DETAIL_HIGH),
                        image_data(),
                        pdf(title="report.pdf"),
                        audio(),
                    ),
                ],
            )
        )
    assert sim.requests[0].body["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in these?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}},
                {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(PNG)}"}},
                {
                    "type": "file",
                    "file": {"filename": "report.pdf", "file_data": f"data:application/pdf;base64,{b64(PDF)}"},
                },
                {"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav"}},
            ],
        },
    ]


async def test_anthropic_gets_image_and_document_blocks_and_tool_results_with_parts(sim: UpstreamSimulator) -> None:
    async with running_gateway(config(sim), ENV) as gw:
        await gw.stub.Chat(
            pb.ChatRequest(
                model="claude-sim",
                messages=[
                    msg(pb.ROLE_SYSTEM, text("Be brief.")),
                    msg(
                        pb.ROLE_USER,
                        text("Compare"),
                        image_url("https://example.com/cat.jpg"),
                        image_data(PNG, "image/png"),
                        pdf_url("https://example.com/a.pdf", title="A"),
                        pdf(),
                    ),
                    pb.Message(
                        role=pb.ROLE_ASSISTANT,
                        tool_calls=[pb.ToolCall(id="toolu_1", name="screenshot", arguments="{}")],
                    ),
                    msg(pb.ROLE_TOOL, text("here it is"), image_data(), tool_call_id="toolu_1"),
                ],
            )
        )
    body = sim.requests[0].body
    assert body["system"] == "Be brief."
    assert body["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Compare"},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(PNG)}},
                {"type": "document", "source": {"type": "url", "url": "https://example.com/a.pdf"}, "title": "A"},
                {
                    "type": "document",
                    "source": {"type": "base64", "media_type": "application/pdf", "data": b64(PDF)},
                },
            ],
        },
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "screenshot", "input": {}}]},
        {
            "role": "user",
            "content": [
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_1",
                    "content": [
                        {"type": "text", "text": "here it is"},
                        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(PNG)}},
                    ],
                }
            ],
        },
    ]


async def test_a_text_only_parts_message_is_the_same_as_content(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(content="fine"))
    async with running_gateway(config(sim), ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="claude-sim", messages=[msg(pb.ROLE_USER, text("hello"))]))
    assert reply.message.content == "fine"
    assert sim.requests[0].body["messages"] == [{"role": "user", "content": "hello"}]


@pytest.mark.parametrize(
    ("part", "provider"),
    [
        (audio(), "openai"),  # Anthropic takes no audio: skipped although it comes first
        (pdf_url("https://example.com/a.pdf"), "anthropic"),  # OpenAI chat takes PDFs only inline
        (image_data(), "anthropic"),  # both take images: the first candidate serves
    ],
)
async def test_routing_skips_candidates_that_cannot_take_a_part(
    sim: UpstreamSimulator, part: pb.Part, provider: str
) -> None:
    async with running_gateway(shared_alias(sim), ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="any", messages=[msg(pb.ROLE_USER, text("hi"), part)]))
        stream = gw.stub.StreamChat(pb.StreamChatRequest(model="any", messages=[msg(pb.ROLE_USER, text("hi"), part)]))
        events = [e async for e in stream]
        start = events[0].start
    assert reply.provider == start.provider == provider
    assert len(sim.requests) == 2


async def test_a_tool_result_image_skips_openai(sim: UpstreamSimulator) -> None:
    doc = shared_alias(sim)
    doc["providers"] = {"openai": doc["providers"]["openai"], "anthropic": doc["providers"]["anthropic"]}
    messages = [
        user("look"),
        pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[pb.ToolCall(id="t1", name="shot", arguments="{}")]),
        msg(pb.ROLE_TOOL, image_data(), tool_call_id="t1"),
    ]
    async with running_gateway(doc, ENV) as gw:
        reply = await gw.stub.Chat(pb.ChatRequest(model="any", messages=messages))
    assert reply.provider == "anthropic"


async def test_a_part_no_candidate_can_take_is_invalid_argument_naming_it(sim: UpstreamSimulator) -> None:
    async with running_gateway(shared_alias(sim), ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Chat(
                pb.ChatRequest(model="any", provider="anthropic", messages=[msg(pb.ROLE_USER, text("hi"), audio())])
            )
        err = rich_error(info.value)
        assert (err.code, err.reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST")
        assert err.violations == [
            ("messages[0].parts[1]", "audio cannot be sent to the anthropic API serving 'any'"),
        ]
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Chat(
                pb.ChatRequest(model="any", messages=[msg(pb.ROLE_USER, audio(), pdf_url("https://example.com/a.pdf"))])
            )
        assert [f for f, _ in rich_error(info.value).violations] == ["messages[0].parts[0]", "messages[0].parts[1]"]
    assert not sim.requests


async def test_malformed_parts_are_invalid_argument_with_field_paths(sim: UpstreamSimulator) -> None:
    messages = [
        pb.Message(role=pb.ROLE_USER, content="both", parts=[text("x")]),
        msg(
            pb.ROLE_USER,
            text(""),
            pb.Part(),
            pb.Part(image=pb.ImagePart(data=PNG)),
            pb.Part(image=pb.ImagePart(url="file:///etc/passwd")),
            audio(fmt="ogg"),
            pb.Part(document=pb.DocumentPart(data=PDF, media_type="text/plain")),
        ),
        msg(pb.ROLE_ASSISTANT, image_data()),
    ]
    async with running_gateway(config(sim), ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Chat(pb.ChatRequest(model="gpt-sim", messages=messages))
        err = rich_error(info.value)
    assert err.code == grpc.StatusCode.INVALID_ARGUMENT
    assert [f for f, _ in err.violations] == ["messages[1].parts[1]"]  # a part with no kind: found at conversion
    messages[1].parts.pop(1)
    async with running_gateway(config(sim), ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Chat(pb.ChatRequest(model="gpt-sim", messages=messages))
    assert [f for f, _ in rich_error(info.value).violations] == [
        "messages[0].parts",
        "messages[1].parts[0].text",
        "messages[1].parts[1].image.media_type",
        "messages[1].parts[2].image.url",
        "messages[1].parts[3].audio.format",
        "messages[1].parts[4].document.media_type",
        "messages[2].parts[0]",
    ]
    assert not sim.requests


async def test_inline_bytes_count_against_max_message_bytes(sim: UpstreamSimulator) -> None:
    doc = config(sim)
    doc["server"] = {"maxMessageBytes": 64 * 1024}
    async with running_gateway(doc, ENV) as gw:
        small = await gw.stub.Chat(
            pb.ChatRequest(model="gpt-sim", messages=[msg(pb.ROLE_USER, image_data(bytes(60_000)))])
        )
        assert small.message.content
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Chat(pb.ChatRequest(model="gpt-sim", messages=[msg(pb.ROLE_USER, image_data(bytes(70_000)))]))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "server.maxMessageBytes" in info.value.details()
    assert len(sim.requests) == 1


def test_prompt_estimate_counts_images_documents_and_audio_by_documented_bounds() -> None:
    def one(*parts: Part) -> int:
        return estimate_prompt_tokens([Message(Role.USER, parts=parts)])

    overhead = 4
    assert one(Part(PartKind.TEXT, text="12345678")) == overhead + 2
    assert one(Part(PartKind.IMAGE, url="https://x/y.png")) == overhead + 2_500
    assert one(Part(PartKind.IMAGE, data=PNG, media_type="image/png")) == overhead + 2_500
    assert one(Part(PartKind.DOCUMENT, data=PDF, media_type="application/pdf")) == overhead + 2 * 3_000  # 2 pages
    assert one(Part(PartKind.DOCUMENT, data=b"%PDF compressed", media_type="application/pdf")) == overhead + 3_000
    assert one(Part(PartKind.DOCUMENT, url="https://x/y.pdf", media_type="application/pdf")) == overhead + 30_000
    assert one(Part(PartKind.AUDIO, data=bytes(4001), media_type="wav")) == overhead + 11  # 400 bytes a token, up


async def test_the_tpm_limit_sees_the_image_estimate(sim: UpstreamSimulator) -> None:
    doc = config(sim)
    doc["tenants"] = {"default": {"limits": {"tpm": 2_000}}}
    doc["rateLimitMode"] = "reject"
    async with running_gateway(doc, ENV) as gw:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Chat(
                pb.ChatRequest(model="gpt-sim", max_tokens=10, messages=[msg(pb.ROLE_USER, image_data())])
            )
        assert rich_error(info.value).reason == "RATE_LIMITED"  # 2,504 estimated prompt tokens > 2,000 a minute
        ok = await gw.stub.Chat(
            pb.ChatRequest(model="gpt-sim", max_tokens=10, messages=[msg(pb.ROLE_USER, text("hi"))])
        )
        assert ok.message.content


async def test_the_response_cache_tells_images_apart(sim: UpstreamSimulator) -> None:
    async with running_gateway(config(sim), ENV) as gw:
        for data in (PNG, PNG, PNG + b"x"):
            await gw.stub.Chat(
                pb.ChatRequest(
                    model="gpt-sim", temperature=0, messages=[msg(pb.ROLE_USER, text("hi"), image_data(data))]
                )
            )
    assert len(sim.requests) == 2


async def test_text_parts_are_redacted_like_content(sim: UpstreamSimulator) -> None:
    doc = config(sim)
    doc["safety"] = {"redactPii": True}
    async with running_gateway(doc, ENV) as gw:
        await gw.stub.Chat(
            pb.ChatRequest(model="gpt-sim", messages=[msg(pb.ROLE_USER, text("mail bob@example.com"), image_data())])
        )
    sent = sim.requests[0].body["messages"][0]["content"][0]["text"]
    assert "bob@example.com" not in sent and sent.startswith("mail ")


async def test_tool_calls_survive_alongside_parts(sim: UpstreamSimulator) -> None:
    sim.enqueue(Reply(tool_calls=(SimToolCall("zoom", '{"x":1}'),)))
    async with running_gateway(config(sim), ENV) as gw:
        reply = await gw.stub.Chat(
            pb.ChatRequest(
                model="claude-sim",
                messages=[msg(pb.ROLE_USER, text("zoom in"), image_data())],
                tools=[pb.Tool(name="zoom")],
            )
        )
    assert [c.name for c in reply.message.tool_calls] == ["zoom"]


async def test_python_client_part_helpers(sim: UpstreamSimulator) -> None:
    async with running_gateway(config(sim), ENV) as gw, fc.FeatherClient(gw.address) as client:
        messages = [
            fc.system("Be brief."),
            fc.user("Compare", fc.image(PNG, "image/png"), fc.image_url("https://x/c.jpg", detail="low"), fc.pdf(PDF)),
            fc.pb.Message(role=fc.pb.ROLE_ASSISTANT, tool_calls=[fc.pb.ToolCall(id="t1", name="shot", arguments="{}")]),
            fc.tool_result("t1", "failed", is_error=True),
        ]
        await client.chat(messages, model="claude-sim")
    assert messages[0] == pb.Message(role=pb.ROLE_SYSTEM, content="Be brief.")  # one string stays `content`
    assert messages[3] == pb.Message(role=pb.ROLE_TOOL, content="failed", tool_call_id="t1", is_error=True)
    sent = sim.requests[0].body["messages"]
    assert [b["type"] for b in sent[0]["content"]] == ["text", "image", "image", "document"]
    assert sent[2]["content"][0] == {"type": "tool_result", "tool_use_id": "t1", "content": "failed", "is_error": True}


async def test_python_client_openai_style_content_parts_reach_openai_as_written(sim: UpstreamSimulator) -> None:
    """OpenAI-style content part lists (issue 15 item 7 with issue 12's parts): text, image_url by http URL and
    by data: URL, file with inline file_data, input_audio arrive upstream exactly as the caller wrote them."""
    content: list[dict[str, Any]] = [
        {"type": "text", "text": "What is in these?"},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(PNG)}"}},
        {"type": "file", "file": {"filename": "report.pdf", "file_data": f"data:application/pdf;base64,{b64(PDF)}"}},
        {"type": "input_audio", "input_audio": {"data": b64(WAV), "format": "wav"}},
    ]
    system = {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]}
    async with running_gateway(config(sim), ENV) as gw, fc.FeatherClient(gw.address) as client:
        await client.chat([system, {"role": "user", "content": content}], model="gpt-sim")
    assert sim.requests[0].body["messages"] == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": content},
    ]


@pytest.mark.parametrize(
    ("part", "expected"),
    [
        ({"type": "image_url", "image_url": {"url": "data:image/png,abc"}}, "content[0].image_url.url: a data URL"),
        ({"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}, "image_url.url: not valid base64"),
        ({"type": "image_url", "image_url": {"url": "https://x/a.png", "detail": "max"}}, "detail: 'max' is not"),
        ({"type": "file", "file": {"file_id": "file-abc"}}, "content[0].file.file_id: uploaded files are not"),
        ({"type": "input_audio", "input_audio": "x"}, "content[0].input_audio: must be a mapping"),
        ({"type": "refusal", "refusal": "no"}, "content[0].type: 'refusal' is not one of text, image_url"),
        (42, "messages[0].content[0]: must be a mapping, got int"),
    ],
)
async def test_python_client_refuses_a_malformed_openai_style_part_naming_its_field(part: Any, expected: str) -> None:
    async with fc.FeatherClient("127.0.0.1:1") as client:  # refused before any call is made
        with pytest.raises(ValueError, match=re.escape(expected)):
            await client.chat([{"role": "user", "content": [part]}], model="gpt-sim")


async def test_a_context_window_fallback_must_take_the_parts_too(sim: UpstreamSimulator) -> None:
    too_long = Reply(status=400, error_code="context_length_exceeded", error_message="too long")
    sim.enqueue(too_long, too_long, path=OPENAI_PATH)
    doc = config(sim)
    doc["contextWindowFallbacks"] = {"gpt-sim": ["claude-sim"]}
    async with running_gateway(doc, ENV) as gw:
        reply = await gw.stub.Chat(
            pb.ChatRequest(model="gpt-sim", messages=[msg(pb.ROLE_USER, text("hi"), image_data())])
        )
        assert reply.provider == "anthropic"  # the larger model takes images
        with pytest.raises(grpc.aio.AioRpcError) as info:  # ... but not audio: the call ends as too long
            await gw.stub.Chat(pb.ChatRequest(model="gpt-sim", messages=[msg(pb.ROLE_USER, text("hi"), audio())]))
    assert rich_error(info.value).reason == "UPSTREAM_INVALID_REQUEST"
    assert [r.path for r in sim.requests] == [OPENAI_PATH, ANTHROPIC_PATH, OPENAI_PATH]


async def test_adapters_used_directly_refuse_parts_their_api_cannot_take(sim: UpstreamSimulator) -> None:
    session = new_session()
    try:
        claude = build_provider(ProviderSettings("anthropic", "anthropic", sim.url, "k"), session)
        gpt = build_provider(ProviderSettings("openai", "openai", sim.url + "/v1", "k"), session)
        wav = Part(PartKind.AUDIO, data=b"RIFF", media_type="wav")
        pdf_link = Part(PartKind.DOCUMENT, url="https://x/a.pdf", media_type="application/pdf")
        for provider, part in ((claude, wav), (gpt, pdf_link)):
            with pytest.raises(ProviderError) as info:
                await provider.chat("m", ChatRequest(model="m", messages=[Message(Role.USER, parts=(part,))]))
            assert (info.value.reason, info.value.retryable) == ("UPSTREAM_BAD_REQUEST", False)
    finally:
        await session.close()
    assert not sim.requests
