"""Typed helpers for content parts: text, images, PDF documents and audio in one message.

```python
from feather_client import image, pdf, user

reply = await client.chat([user("What is in this picture?", image(png_bytes, "image/png"))], model="smart")
```
"""

from __future__ import annotations

from typing import Literal, TypeVar

from .gen.feather.v1 import feather_service_pb2 as pb

__all__ = ["Effort", "ImageMediaType", "audio", "cached", "image", "image_url", "pdf", "pdf_url", "reasoning", "text"]

ImageMediaType = Literal["image/jpeg", "image/png", "image/gif", "image/webp"]
_DETAIL = {
    "": pb.IMAGE_DETAIL_UNSPECIFIED,
    "auto": pb.IMAGE_DETAIL_AUTO,
    "low": pb.IMAGE_DETAIL_LOW,
    "high": pb.IMAGE_DETAIL_HIGH,
}


def text(value: str) -> pb.Part:
    return pb.Part(text=value)


def image(data: bytes, media_type: ImageMediaType, *, detail: Literal["", "auto", "low", "high"] = "") -> pb.Part:
    """An inline image (sent base64-encoded); `detail` is OpenAI's detail level."""
    return pb.Part(image=pb.ImagePart(data=data, media_type=media_type, detail=_DETAIL[detail]))


def image_url(url: str, *, detail: Literal["", "auto", "low", "high"] = "") -> pb.Part:
    """An image the provider fetches from an http(s) URL."""
    return pb.Part(image=pb.ImagePart(url=url, detail=_DETAIL[detail]))


def pdf(data: bytes, *, title: str = "") -> pb.Part:
    """An inline PDF document."""
    return pb.Part(document=pb.DocumentPart(data=data, media_type="application/pdf", title=title))


def pdf_url(url: str, *, title: str = "") -> pb.Part:
    """A PDF document by URL (Anthropic only: routing skips providers that cannot fetch one)."""
    return pb.Part(document=pb.DocumentPart(url=url, media_type="application/pdf", title=title))


def audio(data: bytes, audio_format: Literal["wav", "mp3"]) -> pb.Part:
    """Audio input (OpenAI only: routing skips providers that take none)."""
    return pb.Part(audio=pb.AudioPart(data=data, format=audio_format))


_TTL = {"": pb.CACHE_TTL_UNSPECIFIED, "5m": pb.CACHE_TTL_FIVE_MINUTES, "1h": pb.CACHE_TTL_ONE_HOUR}
Cacheable = TypeVar("Cacheable", pb.Message, pb.Part, pb.Tool)


def cached(item: Cacheable, *, ttl: Literal["", "5m", "1h"] = "") -> Cacheable:
    """Marks a prompt-cache breakpoint after a message (a system prompt), a part or a tool, and returns it:
    `cached(system(rules), ttl="1h")`. Anthropic caches the prompt up to there; "" is its default TTL (5m)."""
    item.cache_breakpoint.CopyFrom(pb.CacheBreakpoint(ttl=_TTL[ttl]))
    return item


Effort = Literal["", "none", "minimal", "low", "medium", "high", "xhigh"]


def reasoning(effort: Effort = "", *, budget_tokens: int | None = None) -> pb.ReasoningOptions:
    """Reasoning options: `effort` is OpenAI's reasoning_effort (on Anthropic without a budget, thinking
    with the effort's budget); `budget_tokens` is Anthropic's extended-thinking budget (at least 1,024)."""
    options = pb.ReasoningOptions(
        effort=pb.ReasoningEffort.Value(f"REASONING_EFFORT_{(effort or 'unspecified').upper()}")
    )
    if budget_tokens is not None:
        options.thinking_budget_tokens = budget_tokens
    return options
