"""The Redis client for a REDIS_URL: one server (resp) or a Redis Cluster (resp_cluster).

It lives apart from both so that neither imports the other back: resp_cluster builds on resp's
`RedisClient`, and only this module knows both.
"""

from __future__ import annotations

from feather_grpc.state.resp import RedisClient, RedisCommands, parse_url
from feather_grpc.state.resp_cluster import RedisClusterClient

__all__ = ["connect"]


def connect(url: str, *, timeout_s: float = 0.25, connect_timeout_s: float | None = None) -> RedisCommands:
    """A client for REDIS_URL: `RedisClient`, or `RedisClusterClient` for `?cluster=true`."""
    address, cluster = parse_url(url)
    if cluster:
        return RedisClusterClient(address, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
    return RedisClient(address, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
