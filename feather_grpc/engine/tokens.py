"""Token estimates for when a provider reports no usage (cut streams) and for admission sizing."""

from __future__ import annotations

from collections.abc import Iterable

from feather_grpc.engine.types import Message

# About four characters per token for English text with the common BPE vocabularies; erring high is
# the safe side for billing estimates of cut streams.
_CHARS_PER_TOKEN = 4
_PER_MESSAGE_OVERHEAD = 4


def estimate_tokens(text: str) -> int:
    return (len(text) + _CHARS_PER_TOKEN - 1) // _CHARS_PER_TOKEN


def estimate_prompt_tokens(messages: Iterable[Message]) -> int:
    total = 0
    for m in messages:
        total += _PER_MESSAGE_OVERHEAD + estimate_tokens(m.content)
        for call in m.tool_calls:
            total += estimate_tokens(call.name) + estimate_tokens(call.arguments)
    return total
