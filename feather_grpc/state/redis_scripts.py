"""What every Redis-backed store is built on: Lua decisions run by EVALSHA, one round trip each.

Every decision is ONE Lua script: called by EVALSHA, and by EVAL (which loads it) only when Redis answers
NOSCRIPT, e.g. after a restart. Scripts read the clock with `redis.call('TIME')` (PRELUDE), so replicas
with skewed clocks agree. Any Redis error or timeout surfaces as `StateUnavailable`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from feather_grpc.state.limits import StateUnavailable
from feather_grpc.state.resp import RedisCommands, RedisUnavailable, ReplyError

# Shared Lua prelude: the server clock in microseconds (an exact integer in a double until year 2255),
# and number formatting that keeps full precision (Lua's default tostring keeps only 14 digits).
PRELUDE = """
local function now_us()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local function fmt(x) return string.format('%.17g', x) end
"""


@dataclass(frozen=True, slots=True)
class Script:
    lua: str
    sha: str

    @staticmethod
    def of(lua: str) -> Script:
        return Script(lua, hashlib.sha1(lua.encode()).hexdigest())


class ScriptRunner:
    """Runs Lua decisions by EVALSHA, and by EVAL (which loads the script) when Redis answers NOSCRIPT,
    e.g. after a restart. Decisions issued in one event-loop turn leave in one write (RedisClient), so
    at high concurrency many share a network round trip; each script stays atomic on its own, and
    Redis runs them in arrival order, so a replica's waiters stay first-in-first-out."""

    def __init__(self, client: RedisCommands) -> None:
        self.client = client
        self.decisions = 0  # scripts run

    @property
    def round_trips(self) -> int:
        """Writes to Redis so far (a batch of decisions counts once)."""
        return self.client.round_trips

    def start(self, script: Script, keys: Sequence[str], args: Sequence[str]) -> Coroutine[Any, Any, Any]:
        """Sends the decision now (with the others of this loop turn) and returns a coroutine for its
        reply: a caller that starts several decisions before awaiting any pays one round trip. Always
        await the coroutine."""
        self.decisions += 1
        argv: tuple[str | int, ...] = (len(keys), *keys, *args)
        return self._reply(self.client.call("EVALSHA", script.sha, *argv), script, argv)

    async def _reply(self, sent: Awaitable[Any], script: Script, argv: tuple[str | int, ...]) -> Any:
        try:
            reply = await sent
            if isinstance(reply, ReplyError) and str(reply).startswith("NOSCRIPT"):
                reply = await self.client.call("EVAL", script.lua, *argv)
        except RedisUnavailable as e:
            raise StateUnavailable(str(e)) from e
        if isinstance(reply, ReplyError):  # e.g. OOM, or a script error: no verdict
            raise StateUnavailable(f"redis: {reply}")
        return reply


async def nothing() -> None:
    return None


class RedisStore:
    def __init__(self, runner: ScriptRunner, *, namespace: str) -> None:
        self._runner = runner
        self._client = runner.client
        self._ns = namespace

    def _run(self, script: Script, keys: Sequence[str], args: Sequence[str]) -> Coroutine[Any, Any, Any]:
        """One decision: one round trip, shared with the other decisions of this loop turn."""
        return self._runner.start(script, keys, args)

    async def aclose(self) -> None:
        return None  # the client belongs to RedisState


def float_arg(x: float) -> str:
    """A number for a script's ARGV: repr keeps every digit of the double."""
    return repr(float(x))


async def command(client: RedisCommands, *args: str) -> Any:
    """A plain command (not a decision), with Redis trouble as StateUnavailable."""
    try:
        reply = await client.call(*args)
    except RedisUnavailable as e:
        raise StateUnavailable(str(e)) from e
    if isinstance(reply, ReplyError):
        raise StateUnavailable(f"redis: {reply}")
    return reply
