"""Exact-match response cache: a repeated deterministic request is answered without calling a provider.

Only calls that would give the same answer again are cached: temperature at or below a threshold and, by
default, a single user turn (plus system prompts). The key is a SHA-256 of the tenant, the requested
model and provider pin, the whitespace-collapsed messages and every sampling parameter, so tenants never
share entries.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from typing import Protocol

import orjson

from feather_grpc.core.types import ChatRequest, FinishReason, Role, ToolCall

_SPACES = re.compile(r"\s+")


@dataclass(frozen=True, slots=True)
class CacheSettings:
    enabled: bool = True
    ttl_s: float = 300.0
    max_size: int = 1000
    max_temperature: float = 0.3
    single_turn_only: bool = True


@dataclass(frozen=True, slots=True)
class CachedReply:
    provider: str
    model: str
    content: str
    tool_calls: tuple[ToolCall, ...]
    finish_reason: FinishReason

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "p": self.provider,
                "m": self.model,
                "c": self.content,
                "f": self.finish_reason.value,
                "t": [[c.id, c.name, c.arguments] for c in self.tool_calls],
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> CachedReply:
        d = orjson.loads(raw)
        calls = tuple(ToolCall(i, n, a) for i, n, a in d["t"])
        return cls(d["p"], d["m"], d["c"], calls, FinishReason(d["f"]))


class ResponseCache(Protocol):
    async def get(self, key: str) -> CachedReply | None: ...

    async def put(self, key: str, reply: CachedReply) -> None: ...

    async def aclose(self) -> None: ...


def cache_key(settings: CacheSettings, tenant: str, request: ChatRequest) -> str | None:
    """The request's cache key, or None when the request must not be cached."""
    if not settings.enabled or request.cache_bypass:
        return None
    if request.temperature is None or request.temperature > settings.max_temperature:
        return None
    if settings.single_turn_only and sum(m.role is not Role.SYSTEM for m in request.messages) != 1:
        return None
    # Every field that shapes the answer, generically (a new request field cannot be forgotten here);
    # attribution, routing and retry settings do not change the answer and are left out.
    keyed = replace(
        request,
        messages=[replace(m, content=_SPACES.sub(" ", m.content).strip()) for m in request.messages],
        policy="",
        retry=None,
        cache_bypass=False,
        tags={},
        request_id="",
    )
    material = orjson.dumps([tenant, keyed], option=orjson.OPT_SORT_KEYS, default=_digest)
    return hashlib.sha256(material).hexdigest()


def _digest(value: object) -> str:
    """Inline bytes (images, documents) in a cache key: their digest, not their size."""
    if isinstance(value, bytes | bytearray | memoryview):
        return hashlib.sha256(value).hexdigest()
    raise TypeError(f"{type(value).__name__} in a request")
