"""Feather gRPC client: typed async and sync facades over the generated feather.v1 stubs.

```python
from feather_client import FeatherClient

async with FeatherClient("localhost:50051") as client:
    reply = await client.chat("Say hello", model="fast")
    print(reply.text, reply.usage.output_tokens, reply.cost_usd)
```
"""

from .channel import TLS, RetryPolicy
from .client import DEFAULT_TIMEOUT, ChatStream, FeatherClient
from .errors import FeatherError, FieldViolation, QuotaViolation
from .gen.feather.v1 import feather_service_pb2 as pb
from .options import ChatOptions, UsageOptions
from .parts import audio, cached, image, image_url, pdf, pdf_url, reasoning, text
from .results import (
    ChatResult,
    MessageLike,
    Thinking,
    TokenUsage,
    ToolLike,
    assistant,
    format_usd,
    message,
    system,
    tool,
    tool_result,
    usd,
    user,
)
from .sync_client import SyncChatStream, SyncFeatherClient

__all__ = [
    "DEFAULT_TIMEOUT",
    "TLS",
    "ChatOptions",
    "ChatResult",
    "ChatStream",
    "FeatherClient",
    "FeatherError",
    "FieldViolation",
    "MessageLike",
    "QuotaViolation",
    "RetryPolicy",
    "SyncChatStream",
    "SyncFeatherClient",
    "Thinking",
    "TokenUsage",
    "ToolLike",
    "UsageOptions",
    "assistant",
    "audio",
    "cached",
    "format_usd",
    "image",
    "image_url",
    "message",
    "pb",
    "pdf",
    "pdf_url",
    "reasoning",
    "system",
    "text",
    "tool",
    "tool_result",
    "usd",
    "user",
]
