"""Redis Cluster for the lean client: one pipelined `RedisClient` per master, each command sent to the
master that owns its key's slot.

The gateway's keys are hash-tagged so that every key one script touches shares a slot (see
redis_state), so a decision is still one command to one node. Commands of one loop turn leave in one
write per node, so a batch that spans three masters costs three writes, sent together.

The slot map comes from `CLUSTER SLOTS` (asked of the node that answered last, the seed address, then
any node known; nodes that just failed last). Commands wait for the first map; later maps are loaded in
the background, after a redirect or a failed command, while commands go on with the map they have:

- `MOVED <slot> <host>:<port>`: the slot lives elsewhere now (resharding, failover). The command is
  sent again there, and the whole map is reloaded in the background.
- `ASK <slot> <host>:<port>`: the slot is being migrated and this key has moved already. The command is
  sent once more, to the target, preceded by `ASKING`; the map does not change.

At most `max_redirects` redirects per command; then the last error reply is the answer. A node that
cannot be reached fails its commands with `RedisUnavailable`, as the single-node client does, and
triggers a map load, so once the cluster has promoted a replica the gateway finds it; commands for the
other masters' slots are not held up meanwhile. Cluster mode has one database, so a URL naming another
is refused.
"""

from __future__ import annotations

import asyncio
import binascii
import dataclasses
from functools import partial
from typing import Any

from feather_grpc.core.redis_url import RedisAddress
from feather_grpc.state.resp import RedisClient, RedisUnavailable, ReplyError

__all__ = ["SLOT_COUNT", "RedisClusterClient", "key_slot"]

SLOT_COUNT = 16384
_Node = tuple[str, int]
_Args = tuple[str | bytes | int, ...]


def key_slot(key: str | bytes) -> int:
    """The key's cluster slot: CRC16 (XMODEM) of the key, or of its `{hash tag}` when it has one."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return binascii.crc_hqx(raw, 0) % SLOT_COUNT


def _routing_key(args: _Args) -> str | bytes | None:
    """The key that picks the node: a script's first key, a plain command's first argument; none for
    PING and scripts without keys."""
    name = args[0].upper() if isinstance(args[0], str) else args[0]
    if name in ("EVALSHA", "EVAL", b"EVALSHA", b"EVAL"):
        key = args[3] if len(args) > 3 and int(args[2]) > 0 else None
    else:
        key = args[1] if len(args) > 1 and name not in ("PING", b"PING") else None
    return str(key) if isinstance(key, int) else key


def _redirect(reply: ReplyError, asked: _Node) -> tuple[str, int, _Node] | None:
    """`MOVED 3999 127.0.0.1:6381` -> ("MOVED", 3999, ("127.0.0.1", 6381)); None for other errors. An
    empty host means the host of the node that answered."""
    kind, _, rest = str(reply).partition(" ")
    if kind not in ("MOVED", "ASK"):
        return None
    slot, _, where = rest.partition(" ")
    host, _, port = where.rpartition(":")
    try:
        return kind, int(slot), (host or asked[0], int(port))
    except ValueError:
        return None


class RedisClusterClient:
    """`RedisClient`'s interface over a Redis Cluster (see the module docstring)."""

    def __init__(
        self,
        seed: RedisAddress,
        *,
        timeout_s: float = 0.25,
        connect_timeout_s: float | None = None,
        max_redirects: int = 5,
    ) -> None:
        if seed.unix_path is not None or seed.db:
            raise ValueError("Redis Cluster needs a host:port address and database 0")
        self.seed = seed
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.max_redirects = max_redirects
        self.map_loads = 0  # slot maps loaded so far
        self._slots: list[_Node | None] = [None] * SLOT_COUNT
        self._nodes: dict[_Node, RedisClient] = {}
        self._loading: asyncio.Task[None] | None = None
        self._answering: _Node | None = None  # asked first for the next map: it answered the last time
        self._mapped = False  # a map was loaded: commands no longer wait for one
        self._suspects: set[_Node] = set()  # nodes whose last command failed: asked for the map last
        self._waiting: list[tuple[asyncio.Future[Any], _Args]] = []  # commands held while the map loads
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def round_trips(self) -> int:
        """Writes to all nodes so far (a batch of commands to one node counts once)."""
        return sum(node.round_trips for node in self._nodes.values())

    def call(self, *args: str | bytes | int) -> asyncio.Future[Any]:
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self._closed:
            future.set_exception(RedisUnavailable("redis: client closed"))
        elif not self._mapped:
            self._waiting.append((future, args))
            self._load_map()
        else:
            self._send(future, args, self._owner(args), 0, asking=False)
        return future

    def send_now(self) -> None:
        """Writes what this loop turn has queued for each node now (RedisClient.send_now)."""
        for node in self._nodes.values():
            node.send_now()

    async def ping(self) -> None:
        """Raises RedisUnavailable unless every master answers. A failed ping reloads the map: health
        checks alone (no traffic while health says NOT_SERVING) must find a promoted replica."""
        if not self._mapped:
            await self.call("PING")
        try:
            masters = set(self._slots)
            if None in masters:
                raise RedisUnavailable("redis: cluster slot map has unassigned slots")
            pings = [self._client(node).call("PING") for node in masters if node is not None]
            for reply in await asyncio.gather(*pings):
                if isinstance(reply, ReplyError):
                    raise RedisUnavailable(f"redis: {reply}")
        except RedisUnavailable:
            self._load_map()
            raise

    async def aclose(self) -> None:
        self._closed = True
        if self._loading is not None:
            self._loading.cancel()
        for node in self._nodes.values():
            await node.aclose()
        self._fail_waiting(RedisUnavailable("redis: client closed"))

    # -- routing ---------------------------------------------------------------------------

    def _owner(self, args: _Args) -> _Node:
        key = _routing_key(args)
        node = self._slots[key_slot(key)] if key is not None else None
        if node is None:  # keyless, or a slot no master serves (the node will say CLUSTERDOWN)
            node = next((n for n in self._slots if n is not None), (self.seed.host, self.seed.port))
        return node

    def _client(self, node: _Node) -> RedisClient:
        client = self._nodes.get(node)
        if client is None:
            address = dataclasses.replace(self.seed, host=node[0], port=node[1])
            client = RedisClient(address, timeout_s=self.timeout_s, connect_timeout_s=self.connect_timeout_s)
            self._nodes[node] = client
        return client

    def _send(self, future: asyncio.Future[Any], args: _Args, node: _Node, redirects: int, *, asking: bool) -> None:
        client = self._client(node)
        if asking:  # same loop turn, same connection: ASKING reaches the node right before the command
            client.call("ASKING").add_done_callback(_consume)
        client.call(*args).add_done_callback(partial(self._answered, future, args, node, redirects))

    def _answered(
        self, future: asyncio.Future[Any], args: _Args, node: _Node, redirects: int, reply: asyncio.Future[Any]
    ) -> None:
        if future.done() or reply.cancelled():  # its caller gave up, or the client is closing
            _consume(reply)
            if not future.done():
                future.cancel()
            return
        error = reply.exception()
        if error is not None:
            self._suspects.add(node)
            self._load_map()  # the node may be gone for good: a replica may have taken its slots
            future.set_exception(error)
            return
        self._suspects.discard(node)
        value = reply.result()
        target = _redirect(value, node) if isinstance(value, ReplyError) else None
        if target is None or redirects >= self.max_redirects:
            future.set_result(value)
            return
        kind, slot, where = target
        if kind == "MOVED":
            self._slots[slot] = where
            self._load_map()
        self._send(future, args, where, redirects + 1, asking=kind == "ASK")

    # -- the slot map ----------------------------------------------------------------------

    def _load_map(self) -> None:
        if self._loading is None and not self._closed:
            assert self._loop is not None
            self._loading = self._loop.create_task(self._reload(), name="feather-redis-cluster-slots")

    async def _reload(self) -> None:
        try:
            slots = await self._fetch_slots()
        except RedisUnavailable as e:
            self._loading = None
            self._fail_waiting(e)
            return
        except BaseException as e:
            self._loading = None
            self._fail_waiting(RedisUnavailable(f"redis: cannot load the cluster slot map: {e!r}"))
            raise
        self._slots, self._mapped, self._loading = slots, True, None
        self.map_loads += 1
        waiting, self._waiting = self._waiting, []
        for future, args in waiting:
            if not future.done():
                self._send(future, args, self._owner(args), 0, asking=False)

    async def _fetch_slots(self) -> list[_Node | None]:
        """CLUSTER SLOTS from the node that answered last, the seed, then the others, nodes that just failed
        last: the first answer wins."""
        seed = (self.seed.host, self.seed.port)
        first = [self._answering] if self._answering is not None else []
        candidates = sorted(dict.fromkeys([*first, seed, *self._nodes]), key=self._suspects.__contains__)
        problem = RedisUnavailable("redis: no cluster node to ask")
        for node in candidates:
            try:
                reply = await self._client(node).call("CLUSTER", "SLOTS")
            except RedisUnavailable as e:
                problem = e
                self._suspects.add(node)
                continue
            if isinstance(reply, ReplyError):  # e.g. "ERR This instance has cluster support disabled"
                problem = RedisUnavailable(f"redis: CLUSTER SLOTS refused by {node[0]}:{node[1]}: {reply}")
                continue
            slots: list[_Node | None] = [None] * SLOT_COUNT
            for start, end, master, *_replicas in reply:
                host = master[0].decode() if master[0] else node[0]
                owner = (host, int(master[1]))
                slots[int(start) : int(end) + 1] = [owner] * (int(end) - int(start) + 1)
            self._answering = node
            self._suspects.discard(node)
            return slots
        raise problem

    def _fail_waiting(self, error: RedisUnavailable) -> None:
        waiting, self._waiting = self._waiting, []
        for future, _ in waiting:
            if not future.done():
                future.set_exception(error)


def _consume(reply: asyncio.Future[Any]) -> None:
    """Retrieves a reply nobody waits for, so asyncio does not log it as never retrieved."""
    if not reply.cancelled():
        reply.exception()
