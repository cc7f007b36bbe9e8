"""REDIS_URL as an address: read by config (to reject a URL that cannot work before serving) and by the
Redis clients in state/ (to connect)."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["RedisAddress", "parse_url"]


def parse_url(url: str) -> tuple[RedisAddress, bool]:
    """REDIS_URL as (address, is a cluster): `?cluster=true` names any one node of a Redis Cluster.
    Raises ValueError for a URL that cannot work."""
    address = RedisAddress.from_url(url)
    cluster = parse_qs(urlsplit(url).query).get("cluster", ["false"])[-1].lower()
    if cluster not in ("true", "false"):
        raise ValueError(f"cluster must be true or false, not {cluster!r}")
    if cluster == "true" and (address.unix_path is not None or address.db):
        raise ValueError("Redis Cluster needs a host:port address and database 0")
    return address, cluster == "true"


@dataclass(frozen=True, slots=True)
class RedisAddress:
    host: str = "127.0.0.1"
    port: int = 6379
    unix_path: str | None = None
    tls: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    db: int = 0

    @staticmethod
    def from_url(url: str) -> RedisAddress:
        """`redis://[[user]:password@]host[:port][/db]`, `rediss://...` (TLS; `?ssl_ca_certs=PATH`,
        `?ssl_cert_reqs=none`), `unix:///path/redis.sock[?db=N]`."""
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password is not None else None
        db = query.get("db") or parts.path.lstrip("/") or "0"
        if parts.scheme == "unix":
            return RedisAddress(unix_path=parts.path, username=username, password=password, db=int(query.get("db", 0)))
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"REDIS_URL must start with redis://, rediss:// or unix://, not {parts.scheme!r}://")
        tls = None
        if parts.scheme == "rediss":
            tls = ssl.create_default_context(cafile=query.get("ssl_ca_certs"))
            if query.get("ssl_cert_reqs", "required").lower() == "none":
                tls.check_hostname = False
                tls.verify_mode = ssl.CERT_NONE
        return RedisAddress(
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 6379,
            tls=tls,
            username=username,
            password=password,
            db=int(db),
        )
