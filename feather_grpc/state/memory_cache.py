"""The response cache of one process (the shared one is state/redis_cache.py): an LRU with a TTL per entry,
implementing core.cache.ResponseCache."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from feather_grpc.core.cache import CachedReply, CacheSettings


class MemoryResponseCache:
    """LRU with a TTL per entry, for one process."""

    def __init__(self, settings: CacheSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = settings.ttl_s
        self._max = settings.max_size
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, CachedReply]] = OrderedDict()

    async def get(self, key: str) -> CachedReply | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        expires, reply = entry
        if self._clock() >= expires:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return reply

    async def put(self, key: str, reply: CachedReply) -> None:
        self._entries[key] = (self._clock() + self._ttl, reply)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)

    async def aclose(self) -> None:
        self._entries.clear()
