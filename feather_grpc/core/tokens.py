"""Token estimates for when a provider reports no usage (cut streams) and for admission sizing."""

from __future__ import annotations

import re
from collections.abc import Iterable

from feather_grpc.core.types import Message, Part, PartKind

# About four characters per token for English text with the common BPE vocabularies; erring high is
# the safe side for billing estimates of cut streams.
_CHARS_PER_TOKEN = 4
_PER_MESSAGE_OVERHEAD = 4

# Non-text parts, by conservative bounds (estimates size admission; the provider's count settles the bill):
# an image is at most ~2,500 tokens with either provider (Anthropic resizes to ~1.15 megapixels, ~1,600;
# OpenAI's patch-based models cap at 1,536 patches x 1.62);
IMAGE_TOKENS = 2_500
# a PDF page is text plus an image of the page, 1,500 to 3,000 tokens; pages are the `/Type /Page` objects
# of inline bytes (at least 1), and a document by URL, whose length is unknown, counts as 10 pages;
DOCUMENT_PAGE_TOKENS = 3_000
URL_DOCUMENT_PAGES = 10
# audio is ~10 tokens a second; 400 bytes a token holds down to 32 kbit/s.
AUDIO_BYTES_PER_TOKEN = 400
_PAGE = re.compile(rb"/Type\s*/Page(?![a-zA-Z])")


def estimate_tokens(text: str) -> int:
    return tokens_for_chars(len(text))


def tokens_for_chars(chars: int) -> int:
    """The estimate for `chars` characters of text (a stream's output is counted, not kept)."""
    return (chars + _CHARS_PER_TOKEN - 1) // _CHARS_PER_TOKEN


def estimate_part_tokens(part: Part) -> int:
    if part.kind is PartKind.TEXT:
        return estimate_tokens(part.text)
    if part.kind is PartKind.IMAGE:
        return IMAGE_TOKENS
    if part.kind is PartKind.DOCUMENT:
        pages = URL_DOCUMENT_PAGES if not part.data else max(1, len(_PAGE.findall(part.data)))
        return pages * DOCUMENT_PAGE_TOKENS
    return -(-len(part.data) // AUDIO_BYTES_PER_TOKEN)


def estimate_prompt_tokens(messages: Iterable[Message]) -> int:
    total = 0
    for m in messages:
        total += _PER_MESSAGE_OVERHEAD + estimate_tokens(m.content)
        for part in m.parts:
            total += estimate_part_tokens(part)
        for call in m.tool_calls:
            total += estimate_tokens(call.name) + estimate_tokens(call.arguments)
    return total
