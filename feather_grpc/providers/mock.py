"""The `mock` provider: deterministic replies without a network, for demos, tests and the embedded default.

Reply: `"Feather mock reply to: <first 200 characters of the last user message>"`. When the request has
tools and `tool_choice` is `required` or names a function, the reply is instead one call to that function
(or the first tool) with arguments `{}`. Usage is estimated with `feather_grpc.engine.tokens`, so it is
exact for a given request; `max_tokens` truncates the text to fit that estimate (finish LENGTH).
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

from feather_grpc.engine.tokens import estimate_prompt_tokens, estimate_tokens
from feather_grpc.engine.types import (
    ChatRequest,
    FinishReason,
    ProviderResponse,
    Role,
    StreamEvent,
    StreamFinish,
    TextDelta,
    ToolCall,
    ToolCallDelta,
    Usage,
)
from feather_grpc.providers.base import ProviderSettings
from feather_grpc.providers.http_client import mark_sent

__all__ = ["REPLY_PREFIX", "MockProvider"]

REPLY_PREFIX = "Feather mock reply to: "
_QUOTE_LIMIT = 200
_CHARS_PER_TOKEN = 4  # keep in step with estimate_tokens, which the truncation must satisfy
_WORDS = re.compile(r"\S*\s*")


class MockProvider:
    def __init__(self, settings: ProviderSettings) -> None:
        self.settings = settings

    async def chat(self, model: str, request: ChatRequest) -> ProviderResponse:
        mark_sent()  # it "reached" this upstream at once
        return _reply(request)

    async def stream(self, model: str, request: ChatRequest) -> AsyncIterator[StreamEvent]:
        mark_sent()
        reply = _reply(request)
        for piece in _WORDS.findall(reply.content):
            if piece:
                yield TextDelta(piece)
        for i, call in enumerate(reply.tool_calls):
            yield ToolCallDelta(i, call.id, call.name)
            yield ToolCallDelta(i, arguments=call.arguments)
        yield StreamFinish(reply.finish_reason, reply.usage)

    async def aclose(self) -> None:
        return None


def _reply(request: ChatRequest) -> ProviderResponse:
    input_tokens = estimate_prompt_tokens(request.messages)
    choice = request.tool_choice
    if request.tools and choice is not None and (choice.function_name or choice.mode == "required"):
        call = ToolCall(id="call_mock_1", name=choice.function_name or request.tools[0].name, arguments="{}")
        output = estimate_tokens(call.name) + estimate_tokens(call.arguments)
        return ProviderResponse("", [call], FinishReason.TOOL_CALLS, Usage(input_tokens, output))

    last_user = next((m.text for m in reversed(request.messages) if m.role is Role.USER), "")
    content = REPLY_PREFIX + last_user[:_QUOTE_LIMIT]
    finish = FinishReason.STOP
    limit = request.max_tokens
    if limit is not None and estimate_tokens(content) > limit:
        content = content[: max(limit, 0) * _CHARS_PER_TOKEN]
        finish = FinishReason.LENGTH
    return ProviderResponse(content, [], finish, Usage(input_tokens, estimate_tokens(content)))
