"""The response cache in Redis, shared by replicas: one GET per lookup, one SET PX per store."""

from __future__ import annotations

import logging

from redis.asyncio import Redis
from redis.exceptions import RedisError

from feather_grpc.engine.cache import CachedReply, CacheSettings

log = logging.getLogger(__name__)


class RedisResponseCache:
    def __init__(self, client: Redis, settings: CacheSettings, namespace: str = "feather") -> None:
        self._client = client
        self._ttl_ms = int(settings.ttl_s * 1000)
        self._prefix = f"{namespace}:cache:"

    async def get(self, key: str) -> CachedReply | None:
        try:
            raw = await self._client.get(self._prefix + key)
        except (RedisError, OSError, TimeoutError):
            return None  # a cache outage is a miss, never an error
        if raw is None:
            return None
        return CachedReply.decode(raw if isinstance(raw, bytes) else raw.encode())

    async def put(self, key: str, reply: CachedReply) -> None:
        try:
            await self._client.set(self._prefix + key, reply.encode(), px=self._ttl_ms)
        except (RedisError, OSError, TimeoutError):
            log.debug("response cache store skipped: redis unreachable")

    async def aclose(self) -> None:
        return None  # the client belongs to RedisState
