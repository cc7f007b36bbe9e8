"""The response cache in Redis, shared by replicas: one GET per lookup, one SET PX per store."""

from __future__ import annotations

import logging

from feather_grpc.core.cache import CachedReply, CacheSettings
from feather_grpc.state.resp import RedisCommands, RedisUnavailable

log = logging.getLogger(__name__)


class RedisResponseCache:
    def __init__(self, client: RedisCommands, settings: CacheSettings, namespace: str = "feather") -> None:
        self._client = client
        self._ttl_ms = int(settings.ttl_s * 1000)
        self._prefix = f"{namespace}:cache:"

    async def get(self, key: str) -> CachedReply | None:
        try:
            raw = await self._client.call("GET", self._prefix + key)
        except RedisUnavailable:
            return None  # a cache outage is a miss, never an error
        if not isinstance(raw, bytes):  # nil, or an error reply
            return None
        return CachedReply.decode(raw)

    async def put(self, key: str, reply: CachedReply) -> None:
        try:
            await self._client.call("SET", self._prefix + key, reply.encode(), "PX", self._ttl_ms)
        except RedisUnavailable:
            log.debug("response cache store skipped: redis unreachable")

    async def aclose(self) -> None:
        return None  # the client belongs to RedisState
