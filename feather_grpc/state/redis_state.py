"""The hot shared state in Redis, so replicas hold limits, budgets and circuits together.

Every decision is ONE Lua script, so ONE round trip: called by EVALSHA, and by EVAL (which loads it)
only when Redis answers NOSCRIPT, e.g. after a restart. All decisions of one event-loop turn leave in
one write on one connection (`resp.RedisClient`; one per master on Redis Cluster, `resp_cluster`), so
under load many decisions share a round trip.
Scripts read the clock with `redis.call('TIME')`, so replicas with skewed clocks agree. Needs Redis
>= 5 (script effects replication); tested against 6.2.

Keys are namespaced and hash-tagged so that every key one script touches lives in one Redis Cluster slot:

    feather:{rl:<bucket>}                              GCRA theoretical arrival time (µs, server clock)
    feather:{tenant:<t>}:budget:<window>:<instance>    hash {spent, reserved} in nano-dollars
    feather:{tenant:<t>}:budget:leases / :lease-data   open reservations: expiry, and amount + windows
    feather:{cb:<provider:model>}                      hash {opened_at} (µs)
    feather:{cb:<provider:model>}:fails                sorted set of failure times in the rolling window
    feather:{cb:<provider:model>}:probe                the half-open probe flag (a token, with a TTL)

Failure handling: connects and replies are bounded by a short timeout (0.25 s by default); nothing is
retried (a retried reservation whose reply was lost would reserve twice) but budget settlements, which are
idempotent (a lease settles once) and must not hold their reservation; any Redis error or timeout
surfaces as `StateUnavailable`, and the next call reconnects, so after Redis comes back the same
objects work again. Note that a call that timed out may still have been applied.

The stores are redis_limiter, redis_budgets and redis_circuits, on the script runner of redis_scripts.

Wiring — one connection for all three (server.assembly does this when `REDIS_URL` is set):

    state = RedisState.from_url(os.environ["REDIS_URL"], breaker=config.routing.breaker)
    gateway = assemble(config, limiter=state.limiter, budgets=state.budgets, circuits=state.circuits)
    ...
    await state.aclose()
"""

from __future__ import annotations

from feather_grpc.core.breaker import BreakerSettings
from feather_grpc.core.limits import StateUnavailable
from feather_grpc.state.redis_budgets import RedisBudgetStore
from feather_grpc.state.redis_circuits import RedisCircuitStore
from feather_grpc.state.redis_connect import connect
from feather_grpc.state.redis_limiter import RedisRateLimiter
from feather_grpc.state.redis_scripts import Script, ScriptRunner
from feather_grpc.state.resp import RedisCommands, RedisUnavailable

# The health probe's write: what any decision needs Redis to allow (a script, a write, a key in the namespace).
_PROBE = Script.of("redis.call('SET', KEYS[1], ARGV[1], 'PX', 10000) return 1")


class RedisState:
    """The three Redis-backed stores on ONE shared client: all their decisions of one loop turn leave in
    one write (one per master on Redis Cluster)."""

    def __init__(
        self,
        client: RedisCommands,
        *,
        breaker: BreakerSettings | None = None,
        probe_ttl_s: float = 30.0,
        budget_lease_s: float = 60.0,
        namespace: str = "feather",
    ) -> None:
        self.client = client
        self.runner = ScriptRunner(client)
        self._probe_key = f"{namespace}:{{health}}:probe"
        self.limiter = RedisRateLimiter(self.runner, namespace=namespace)
        self.budgets = RedisBudgetStore(self.runner, lease_s=budget_lease_s, namespace=namespace)
        self.circuits = RedisCircuitStore(
            self.runner, breaker or BreakerSettings(), probe_ttl_s=probe_ttl_s, namespace=namespace
        )

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        timeout_s: float = 0.25,
        connect_timeout_s: float | None = None,
        breaker: BreakerSettings | None = None,
        probe_ttl_s: float = 30.0,
        budget_lease_s: float = 60.0,
        namespace: str = "feather",
    ) -> RedisState:
        """`redis://[user:pass@]host:port/db`, `rediss://...` (TLS) or `unix://...` (see resp.RedisAddress);
        `?cluster=true` for Redis Cluster, with any one node as the address (see redis_connect, resp_cluster).

        `timeout_s` bounds each batch of replies and (unless `connect_timeout_s` is given) each connect.
        `probe_ttl_s`: how long a half-open probe holds its circuit if its replica dies; `budget_lease_s`:
        how long a budget reservation holds its amount if its replica dies."""
        client = connect(url, timeout_s=timeout_s, connect_timeout_s=connect_timeout_s)
        return cls(client, breaker=breaker, probe_ttl_s=probe_ttl_s, budget_lease_s=budget_lease_s, namespace=namespace)

    async def ping(self) -> None:
        """Raises StateUnavailable unless Redis answers and takes a decision (for health checks).

        A `PING` alone passes while every decision fails: a read-only replica (READONLY), a full Redis
        with `noeviction` (OOM), failed snapshots with `stop-writes-on-bgsave-error` (MISCONF), an ACL
        without scripts or keys (NOPERM). So a one-key script writes under the namespace too, sent as
        every decision is (EVALSHA, EVAL on NOSCRIPT); on Redis Cluster it reaches the master that owns
        the probe's slot, and every master must answer the PING."""
        try:
            await self.client.ping()
        except RedisUnavailable as e:
            raise StateUnavailable(str(e)) from e
        await self.runner.start(_PROBE, [self._probe_key], ["1"])

    async def aclose(self) -> None:
        await self.budgets.aclose()
        await self.client.aclose()
