"""A real Redis Cluster for the tests: three `redis-server --cluster-enabled yes` masters on loopback ports,
the 16384 slots split evenly, joined with CLUSTER MEET; replicas on request (CLUSTER REPLICATE).

    with RedisCluster() as cluster:
        url = cluster.url                  # redis://127.0.0.1:PORT?cluster=true (the first node)
        cluster.owner_of(slot)             # index of the master serving a slot
        cluster.move_slot(slot, to=1)      # the documented IMPORTING/MIGRATING/NODE steps, keys included
"""

from __future__ import annotations

import random
import socket
import time
from collections.abc import Callable
from functools import partial
from types import TracebackType

import redis

from tests.redis_server import RedisServer

SLOTS = 16384


def _cluster_port() -> int:
    """A free port whose bus port (+10000) is free too: cluster nodes need both, so at most 55535."""
    for _ in range(200):
        port = random.randrange(20_000, 45_000)
        try:
            for p in (port, port + 10_000):
                with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free port pair for a cluster node")


def execute(client: redis.Redis, *args: str | int) -> object:
    """One raw command on one node: redis-py's `execute_command` is untyped, so it is called only here."""
    reply: object = client.execute_command(*args)  # type: ignore[no-untyped-call]
    return reply


class RedisCluster:
    def __init__(self, masters: int = 3, replicas_of: tuple[int, ...] = (), node_timeout_ms: int = 5000) -> None:
        """`replicas_of`: one replica per entry, of that master (servers[masters:] are the replicas)."""
        args: tuple[str, ...] = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        args += ("--cluster-node-timeout", str(node_timeout_ms))
        count = masters + len(replicas_of)
        self.servers = [RedisServer(port=_cluster_port(), extra_args=args) for _ in range(count)]
        self.masters = masters
        self.replicas_of = replicas_of
        self.clients: list[redis.Redis] = []
        self.ids: list[str] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.servers[0].port}?cluster=true"

    def node(self, index: int) -> redis.Redis:
        """A plain (not cluster-aware) connection to one node, for looking behind the client's back."""
        return self.clients[index]

    def start(self, timeout_s: float = 20.0) -> None:
        for server in self.servers:
            server.start()
        self.clients = [redis.Redis(port=s.port, decode_responses=True) for s in self.servers]
        self.ids = [self._myid(c) for c in self.clients]
        share = SLOTS // self.masters
        for i, client in enumerate(self.clients[: self.masters]):
            end = SLOTS if i == self.masters - 1 else (i + 1) * share
            execute(client, "CLUSTER", "ADDSLOTS", *range(i * share, end))
        for server in self.servers[1:]:
            execute(self.clients[0], "CLUSTER", "MEET", "127.0.0.1", server.port)
        self._until(lambda: all(self._agrees(c) for c in self.clients), timeout_s, "the cluster to form")
        for i, master in enumerate(self.replicas_of, start=self.masters):
            execute(self.clients[i], "CLUSTER", "REPLICATE", self.ids[master])
            self._until(partial(self._synced, i), timeout_s, "a replica to sync")

    @staticmethod
    def _myid(client: redis.Redis) -> str:
        node_id = execute(client, "CLUSTER", "MYID")
        assert isinstance(node_id, str)
        return node_id

    def _synced(self, replica: int) -> bool:
        return bool(self.clients[replica].info("replication").get("master_link_status") == "up")

    def owner_of(self, slot: int) -> int:
        """The index of the master serving `slot`, as the first node sees it."""
        owner = self._owner_seen(self.clients[0], slot)
        if owner is None:
            raise LookupError(slot)
        return owner

    def keyslot(self, key: str) -> int:
        slot = execute(self.clients[0], "CLUSTER", "KEYSLOT", key)
        assert isinstance(slot, int)
        return slot

    def begin_migration(self, slot: int, to: int) -> int:
        """Marks the slot IMPORTING on `to` and MIGRATING on its owner (whose index is returned)."""
        source = self.owner_of(slot)
        execute(self.clients[to], "CLUSTER", "SETSLOT", slot, "IMPORTING", self.ids[source])
        execute(self.clients[source], "CLUSTER", "SETSLOT", slot, "MIGRATING", self.ids[to])
        return source

    def end_migration(self, slot: int, source: int, to: int, timeout_s: float = 10.0) -> None:
        """Moves the slot's remaining keys, then gives the slot to `to` on every node."""
        src, port = self.clients[source], self.servers[to].port
        while keys := self._keys_in_slot(src, slot):
            execute(src, "MIGRATE", "127.0.0.1", port, "", 0, 5000, "KEYS", *keys)
        for index in (to, source, *(i for i in range(len(self.clients)) if i not in (to, source))):
            execute(self.clients[index], "CLUSTER", "SETSLOT", slot, "NODE", self.ids[to])
        self._until(lambda: all(self._owner_seen(c, slot) == to for c in self.clients), timeout_s, "the slot move")

    @staticmethod
    def _keys_in_slot(client: redis.Redis, slot: int) -> list[str]:
        keys = execute(client, "CLUSTER", "GETKEYSINSLOT", slot, 100)
        assert isinstance(keys, list) and all(isinstance(k, str) for k in keys)
        return keys

    def move_slot(self, slot: int, to: int) -> None:
        self.end_migration(slot, self.begin_migration(slot, to), to)

    def _owner_seen(self, client: redis.Redis, slot: int) -> int | None:
        slots = execute(client, "CLUSTER", "SLOTS")
        assert isinstance(slots, list)
        for start, end, master, *_ in slots:
            if int(start) <= slot <= int(end):
                return [s.port for s in self.servers].index(int(master[1]))
        return None

    def _agrees(self, client: redis.Redis) -> bool:
        info = execute(client, "CLUSTER", "INFO")
        assert isinstance(info, (str, bytes))
        text = info if isinstance(info, str) else info.decode()
        fields = dict(line.split(":", 1) for line in text.split() if ":" in line)
        return fields.get("cluster_state") == "ok" and fields.get("cluster_known_nodes") == str(len(self.servers))

    @staticmethod
    def _until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out waiting for {what}")
            time.sleep(0.05)

    def close(self) -> None:
        for client in self.clients:
            client.close()
        for server in self.servers:
            server.close()

    def __enter__(self) -> RedisCluster:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
