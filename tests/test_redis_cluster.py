"""The gateway's Redis Cluster client against a real three-master cluster: slots as Redis computes them,
commands at the master owning their key, MOVED and ASK followed, a dead master failing only its slots, a
promoted replica found.
The stores' semantics on a cluster are in test_limits (the `redis-cluster` parameter) and two gateway
replicas sharing a cluster in test_replicas."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Iterator

import pytest

from feather_grpc.config import ConfigError, FileConfig, parse_file_config, resolve
from feather_grpc.state.redis_connect import connect
from feather_grpc.state.resp import RedisUnavailable, ReplyError
from feather_grpc.state.resp_cluster import RedisClusterClient, key_slot
from tests.gateway_harness import MOCK_CONFIG
from tests.redis_cluster import RedisCluster, execute


@pytest.fixture(scope="module")
def cluster() -> Iterator[RedisCluster]:
    with RedisCluster() as c:
        yield c


@pytest.fixture
async def client(cluster: RedisCluster) -> AsyncIterator[RedisClusterClient]:
    c = connect(cluster.url)
    assert isinstance(c, RedisClusterClient)
    yield c
    await c.aclose()


def _other(index: int) -> int:
    return (index + 1) % 3


def test_key_slots_are_the_ones_redis_computes(cluster: RedisCluster) -> None:
    keys = [
        "123456789",
        "foo",
        "",
        "{user1000}.following",
        "{user1000}.followers",
        "foo{}{bar}",  # an empty tag: the whole key
        "foo{{bar}}zap",  # the tag is "{bar"
        "foo{bar}{zap}",  # the first tag only
        "{",
        "}{",
        "feather:{tenant:acme}:budget:day:2026-11-26",
        "feather:{rl:provider:openai:gpt-4o}",
        "feather:{cb:openai:gpt-4o}:fails",
        "ключ{ü}",
    ]
    assert [key_slot(k) for k in keys] == [cluster.keyslot(k) for k in keys]
    assert key_slot("123456789") == 0x31C3 % 16384  # the CRC16 check value from the cluster spec


async def test_each_command_reaches_the_master_owning_its_slot(
    cluster: RedisCluster, client: RedisClusterClient
) -> None:
    keys = [f"route:{i}" for i in range(120)]
    assert await asyncio.gather(*(client.call("SET", k, k.upper()) for k in keys)) == ["OK"] * len(keys)
    for k in keys:
        assert cluster.node(cluster.owner_of(key_slot(k))).get(k) == k.upper()
    owners = {cluster.owner_of(key_slot(k)) for k in keys}
    assert owners == {0, 1, 2}
    # One map load, then one write per master for the whole batch.
    assert client.map_loads == 1 and client.round_trips == 1 + 3
    assert await client.call("GET", keys[7]) == keys[7].upper().encode()


async def test_a_moved_slot_is_followed_and_the_map_reloaded(cluster: RedisCluster, client: RedisClusterClient) -> None:
    key = "moving:{m1}"
    assert await client.call("SET", key, "before") == "OK"
    slot = key_slot(key)
    source = cluster.owner_of(slot)
    cluster.move_slot(slot, _other(source))  # the key goes with it; the client still has the old map

    assert await client.call("GET", key) == b"before"  # MOVED from the old owner, answered by the new
    assert await client.call("SET", key, "after") == "OK"
    assert cluster.node(_other(source)).get(key) == "after"
    await _until(lambda: client.map_loads == 2, "the map to reload after MOVED")


async def test_a_migrating_slot_is_asked_of_its_target_without_changing_the_map(
    cluster: RedisCluster, client: RedisClusterClient
) -> None:
    stays, arrives = "asking:{a1}:old", "asking:{a1}:new"
    assert await client.call("SET", stays, "here") == "OK"
    slot = key_slot(stays)
    target = _other(cluster.owner_of(slot))
    source = cluster.begin_migration(slot, target)
    try:
        # A key the source still has is served there; a new one is sent on with ASK, after ASKING.
        assert await client.call("GET", stays) == b"here"
        assert await client.call("SET", arrives, "there") == "OK"
        assert execute(cluster.node(target), "CLUSTER", "COUNTKEYSINSLOT", slot) == 1
        assert await client.call("GET", arrives) == b"there"
        assert client.map_loads == 1  # ASK is for one command: the slot still belongs to the source
    finally:
        cluster.end_migration(slot, source, target)
    assert await client.call("GET", stays) == b"here"


async def test_scripts_are_routed_by_their_first_key(cluster: RedisCluster, client: RedisClusterClient) -> None:
    script = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
    keys = [f"script:{{s{i}}}" for i in range(30)]
    replies = await asyncio.gather(*(client.call("EVAL", script, 1, k, 5) for k in keys))
    assert replies == [5] * len(keys)
    crossing = await client.call("EVAL", script, 2, "script:{s1}", "script:{s2}", 1)
    assert isinstance(crossing, ReplyError) and "CROSSSLOT" in str(crossing)


async def test_send_now_writes_to_every_node_at_once(cluster: RedisCluster, client: RedisClusterClient) -> None:
    keys = [f"now:{{n{i}}}" for i in range(30)]  # spread over the masters
    assert await asyncio.gather(*(client.call("SET", k, "1") for k in keys)) == ["OK"] * len(keys)  # mapped
    nodes = {cluster.owner_of(cluster.keyslot(k)) for k in keys}
    trips = client.round_trips
    pending = [client.call("INCR", k) for k in keys]
    client.send_now()
    assert client.round_trips - trips == len(nodes) > 1  # one write per node, within this turn
    assert await asyncio.gather(*pending) == [2] * len(keys)


async def test_a_dead_master_fails_only_its_slots_and_ping_says_so(cluster: RedisCluster) -> None:
    client = connect(cluster.url, timeout_s=0.5)
    assert isinstance(client, RedisClusterClient)
    victim = 2
    dead_key = next(k for k in (f"dead:{i}" for i in range(1000)) if cluster.owner_of(key_slot(k)) == victim)
    live_key = next(k for k in (f"live:{i}" for i in range(1000)) if cluster.owner_of(key_slot(k)) != victim)
    try:
        await client.ping()
        cluster.servers[victim].stop()
        with pytest.raises(RedisUnavailable):
            await client.call("SET", dead_key, "x")
        assert await client.call("SET", live_key, "x") == "OK"  # the other masters' slots carry on
        with pytest.raises(RedisUnavailable):
            await client.ping()
        cluster.servers[victim].start()  # it keeps its nodes.conf, so it rejoins with its slots
        await _until(lambda: cluster.owner_of(key_slot(dead_key)) == victim, "the master to rejoin")
        await _until_ok(client, dead_key)
        await client.ping()
    finally:
        await client.aclose()
        cluster.servers[victim].start()


async def test_a_promoted_replica_takes_over_and_the_client_finds_it() -> None:
    with RedisCluster(replicas_of=(2,), node_timeout_ms=1000) as cluster:
        client = connect(cluster.url, timeout_s=0.5)
        assert isinstance(client, RedisClusterClient)
        key = next(k for k in (f"failover:{i}" for i in range(1000)) if cluster.owner_of(key_slot(k)) == 2)
        try:
            assert await client.call("SET", key, "before") == "OK"
            cluster.servers[2].stop()
            with pytest.raises(RedisUnavailable):
                await client.ping()
            await _until(lambda: cluster.owner_of(key_slot(key)) == 3, "the replica to be promoted")
            # Pings alone find the new master (health says NOT_SERVING meanwhile, so no traffic would).
            await _until_pinged(client)
            assert await client.call("SET", key, "back") == "OK"
            assert cluster.node(3).get(key) == "back"
        finally:
            await client.aclose()


def test_cluster_urls_are_checked_at_start() -> None:
    def load(url: str) -> None:
        resolve(_mock_only(), {"REDIS_URL": url})

    load("redis://127.0.0.1:7000?cluster=true")
    for bad, problem in [
        ("redis://127.0.0.1:7000/2?cluster=true", "database 0"),
        ("unix:///tmp/r.sock?cluster=true", "host:port"),
        ("redis://127.0.0.1:7000?cluster=maybe", "true or false"),
        ("http://127.0.0.1:7000", "redis://"),
    ]:
        with pytest.raises(ConfigError, match=problem) as info:
            load(bad)
        assert info.value.path == "REDIS_URL"


def _mock_only() -> FileConfig:
    return parse_file_config(json.dumps({"providers": MOCK_CONFIG["providers"]}), "<test>")


async def _until(condition: Callable[[], bool], what: str, timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def _until_pinged(client: RedisClusterClient, timeout_s: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            return await client.ping()
        except RedisUnavailable:
            assert asyncio.get_running_loop().time() < deadline, "ping never found the promoted replica"
        await asyncio.sleep(0.05)


async def _until_ok(client: RedisClusterClient, key: str, timeout_s: float = 15.0) -> None:
    """Commands for the restarted master's slots work again (the client reconnects by itself)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            if await client.call("SET", key, "back") == "OK":
                return
        except RedisUnavailable:
            pass
        assert asyncio.get_running_loop().time() < deadline, "the restarted master never answered"
        await asyncio.sleep(0.05)
