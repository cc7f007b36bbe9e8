"""Issue 12, item 4: a JSON-schema reply from Anthropic through its structured-output API
(`output_config.format`, as the official SDK's MessageCreateParams types it); JSON mode stays OpenAI's."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from google.protobuf import struct_pb2

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from sim.upstream import Reply, UpstreamSimulator
from tests.gateway_harness import rich_error, running_gateway, user
from tests.test_contract_accounting import ENV, config
from tests.test_contract_parts import shared_alias

SCHEMA: dict[str, str | bool | dict[str, dict[str, str]] | list[str]] = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
    "additionalProperties": False,
}


@pytest.fixture
async def sim() -> AsyncIterator[UpstreamSimulator]:
    async with UpstreamSimulator() as s:
        yield s


def json_schema() -> pb.ResponseFormat:
    schema = struct_pb2.Struct()
    schema.update(SCHEMA)
    return pb.ResponseFormat(
        type=pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA, schema_name="place", json_schema=schema, strict=True
    )


@pytest.mark.parametrize("streamed", [False, True])
async def test_anthropic_gets_output_config_format(sim: UpstreamSimulator, streamed: bool) -> None:
    sim.enqueue(Reply(content='{"city":"Paris"}'))
    async with running_gateway(config(sim), ENV) as gw:
        if streamed:
            request = pb.StreamChatRequest(model="claude-sim", messages=[user("where?")], response_format=json_schema())
            events = [e async for e in gw.stub.StreamChat(request)]
            text = "".join(e.delta.content for e in events if e.HasField("delta"))
        else:
            reply = await gw.stub.Chat(
                pb.ChatRequest(model="claude-sim", messages=[user("where?")], response_format=json_schema())
            )
            text = reply.message.content
    assert text == '{"city":"Paris"}'
    body = sim.requests[0].body
    assert body["output_config"] == {"format": {"type": "json_schema", "schema": SCHEMA}}
    assert "response_format" not in body


async def test_routing_refuses_only_providers_that_truly_cannot(sim: UpstreamSimulator) -> None:
    json_object = pb.ResponseFormat(type=pb.RESPONSE_FORMAT_TYPE_JSON_OBJECT)
    async with running_gateway(shared_alias(sim), ENV) as gw:  # Anthropic first
        schema_reply = await gw.stub.Chat(
            pb.ChatRequest(model="any", messages=[user("x")], response_format=json_schema())
        )
        object_reply = await gw.stub.Chat(
            pb.ChatRequest(model="any", messages=[user("x")], response_format=json_object)
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await gw.stub.Chat(
                pb.ChatRequest(model="any", provider="anthropic", messages=[user("x")], response_format=json_object)
            )
    assert (schema_reply.provider, object_reply.provider) == ("anthropic", "openai")
    err = rich_error(info.value)
    assert err.violations == [
        (
            "response_format",
            "no provider serving 'any' supports json_object (the Anthropic Messages API takes a JSON schema: "
            "use RESPONSE_FORMAT_TYPE_JSON_SCHEMA)",
        )
    ]
    assert sim.requests[1].body["response_format"] == {"type": "json_object"}
