"""kill -9 of `feather-grpc serve` mid-load, restart on the same files, reconcile.

Concurrent Chat calls with caller-chosen request ids run against a real server process until it is
SIGKILLed. Every call whose response was received must then be in the ledger exactly once: right
after the kill (in the SQLite file, or in the local spool or Postgres), and after a restart on the
same files (the spool shipped to Postgres). Clients then retry, with the same request ids, the calls
the kill cut off and some that had succeeded: every request is still billed exactly once, in the
ledger's tables and through the Usage RPC. Two ledgers: the default SQLite file, and Postgres
(`DATABASE_URL`) behind its local spool (`FEATHER_SPOOL_PATH`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sqlite3
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg
import grpc
import pytest

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from tests.gateway_harness import MOCK_CONFIG, user
from tests.ops_harness import GatewayProcess, free_port
from tests.pg_server import PgServer

CLIENTS = 16  # concurrent callers, each sending one call after another
KILL_AFTER = 150  # acknowledged calls before the SIGKILL
RETRIED_ACKED = 20  # acknowledged calls sent again after the restart
DEADLINE_S = 15.0  # bounds a failure; a passing run waits on conditions, never on this

# request_id -> (records, billed records, cost of the billed record)
LedgerRows = dict[str, tuple[int, int, int]]


@dataclass
class Load:
    acked: dict[str, int] = field(default_factory=dict)  # request_id -> cost_nanos_usd in its response
    cut_off: set[str] = field(default_factory=set)  # sent, but no response: the server died first
    errors: set[grpc.StatusCode] = field(default_factory=set)


@pytest.fixture(scope="module")
def pg() -> Iterator[PgServer]:
    with PgServer() as server:
        yield server


_db_counter = itertools.count()


def write_config(tmp_path: Path) -> Path:
    path = tmp_path / "feather.config.json"
    document = {**MOCK_CONFIG, "ledger": {"type": "sqlite", "path": str(tmp_path / "usage.db")}}
    path.write_text(json.dumps(document))
    return path


async def start_server(tmp_path: Path, config: Path, env: dict[str, str]) -> tuple[GatewayProcess, str]:
    port = free_port()
    gw = GatewayProcess.start(
        ["feather-grpc", "serve", "--config", str(config), "--port", str(port)], {"LOG_LEVEL": "info", **env}, tmp_path
    )
    try:
        await gw.wait_logged("serving on", timeout_s=DEADLINE_S)
    except BaseException:
        gw.kill()
        raise
    return gw, f"127.0.0.1:{port}"


def chat(request_id: str) -> pb.ChatRequest:
    return pb.ChatRequest(model="fast", messages=[user(f"call {request_id}")], request_id=request_id)


async def load_then_kill(gw: GatewayProcess, address: str) -> Load:
    """Drive CLIENTS concurrent callers until KILL_AFTER calls are acknowledged, SIGKILL the server
    while they are still calling, and collect what each caller saw."""
    load = Load()
    enough = asyncio.Event()
    channels = [grpc.aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(4)]

    async def caller(n: int) -> None:
        stub = pb_grpc.FeatherServiceStub(channels[n % len(channels)])
        for i in itertools.count():
            request_id = f"c{n}-{i}"
            try:
                reply = await stub.Chat(chat(request_id), timeout=DEADLINE_S)
            except grpc.aio.AioRpcError as e:
                load.cut_off.add(request_id)
                load.errors.add(e.code())
                return  # the server is gone
            assert reply.request_id == request_id and reply.cost_nanos_usd > 0
            load.acked[request_id] = reply.cost_nanos_usd
            if len(load.acked) >= KILL_AFTER:
                enough.set()

    callers = [asyncio.create_task(caller(n)) for n in range(CLIENTS)]
    try:
        async with asyncio.timeout(DEADLINE_S):
            await enough.wait()
            assert not any(c.done() for c in callers), "every caller must still be calling at the kill"
            gw.proc.send_signal(signal.SIGKILL)
            await asyncio.gather(*callers)
    finally:
        for c in callers:
            c.cancel()
        for channel in channels:
            await channel.close()
    assert await gw.wait_exit() == -signal.SIGKILL
    assert len(load.cut_off) == CLIENTS  # each caller's last call died with the server
    assert load.errors <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}, load.errors
    return load


async def retry(address: str, request_ids: list[str]) -> dict[str, int]:
    """Send each request again, with its request id; all must succeed. Returns the costs."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.FeatherServiceStub(channel)
        replies = await asyncio.gather(*(stub.Chat(chat(r), timeout=DEADLINE_S) for r in request_ids))
    return {r: reply.cost_nanos_usd for r, reply in zip(request_ids, replies, strict=True)}


async def usage_total(address: str) -> pb.UsageRow:
    async with grpc.aio.insecure_channel(address) as channel:
        reply = await pb_grpc.FeatherServiceStub(channel).Usage(pb.UsageRequest(), timeout=DEADLINE_S)
    assert isinstance(reply, pb.UsageResponse)
    return reply.total


async def wait_until(predicate: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def sqlite_rows(path: Path) -> LedgerRows:
    """Per request id, straight from the SQLite ledger file (as another process reads it)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT request_id, COUNT(*), SUM(billed), SUM(CASE WHEN billed THEN cost_nanos_usd ELSE 0 END) "
            "FROM usage_records GROUP BY request_id"
        ).fetchall()
    return {rid: (n, billed, cost) for rid, n, billed, cost in rows}


def spool_ids(path: Path) -> list[str]:
    """Request ids still waiting in the Postgres ledger's local spool."""
    if not path.exists():
        return []
    with contextlib.closing(sqlite3.connect(path)) as conn:
        return [rid for (rid,) in conn.execute("SELECT request_id FROM usage_records")]


async def postgres_rows(dsn: str) -> LedgerRows:
    conn = await asyncpg.connect(dsn)
    try:
        if not await conn.fetchval("SELECT to_regclass('feather_usage') IS NOT NULL"):
            return {}
        rows = await conn.fetch(
            "SELECT request_id, COUNT(*) AS n, COUNT(*) FILTER (WHERE billed) AS billed, "
            "COALESCE(SUM(cost_nanos_usd) FILTER (WHERE billed), 0) AS cost FROM feather_usage GROUP BY request_id"
        )
    finally:
        await conn.close()
    return {r["request_id"]: (r["n"], r["billed"], int(r["cost"])) for r in rows}


def check_acked_once(rows: LedgerRows, load: Load) -> None:
    """Every acknowledged call is in the ledger exactly once, billed, at the cost its caller was told;
    nothing is there that was not sent."""
    missing = [rid for rid in load.acked if rid not in rows]
    assert not missing, f"{len(missing)} acknowledged calls lost, e.g. {missing[:5]}"
    assert {rid: rows[rid] for rid in load.acked} == {rid: (1, 1, cost) for rid, cost in load.acked.items()}
    assert set(rows) <= set(load.acked) | load.cut_off
    for rid in set(rows) & load.cut_off:  # done, but the response was lost with the server
        assert rows[rid][:2] == (1, 1)


async def check_usage(address: str, rows: LedgerRows) -> None:
    """The Usage RPC agrees with the ledger's tables: one billed record per request."""
    assert all(billed == 1 for _, billed, _ in rows.values())
    total = await usage_total(address)
    assert total.request_count == total.ok_count == len(rows)
    assert total.cost_nanos_usd == sum(cost for _, _, cost in rows.values())


async def retry_and_reconcile(
    address: str, load: Load, read_rows: Callable[[], Awaitable[LedgerRows]], settled: Callable[[], Awaitable[bool]]
) -> None:
    """Clients retry the cut-off calls and some acknowledged ones with the same request ids: each
    request is still billed exactly once, the acknowledged ones at their original record."""
    before = await read_rows()
    again = sorted(load.cut_off) + sorted(load.acked)[:RETRIED_ACKED]
    costs = await retry(address, again)
    await wait_until(settled, "the retries to reach the ledger")
    rows = await read_rows()
    assert set(rows) == set(load.acked) | load.cut_off
    for rid in again:
        assert rows[rid][:2] == (1 + (rid in before), 1), rid  # every attempt kept, one billed
    for rid in load.cut_off - set(before):
        assert rows[rid][2] == costs[rid]
    assert {rid: rows[rid][2] for rid in load.acked} == load.acked
    await check_usage(address, rows)


async def stop(gw: GatewayProcess) -> None:
    gw.proc.send_signal(signal.SIGTERM)
    assert await gw.wait_exit() == 0, gw.output()


async def test_sqlite_ledger_survives_kill_9_mid_load(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    ledger_file = tmp_path / "usage.db"
    gw, address = await start_server(tmp_path, config, {})
    try:
        load = await load_then_kill(gw, address)
    finally:
        gw.kill()
    # Before any restart: the file alone holds every acknowledged call (committed before the reply).
    check_acked_once(sqlite_rows(ledger_file), load)

    gw, address = await start_server(tmp_path, config, {})
    try:
        rows = sqlite_rows(ledger_file)
        check_acked_once(rows, load)
        await check_usage(address, rows)

        async def written() -> bool:
            return True  # SqliteLedger commits before the reply: nothing to wait for

        async def read_rows() -> LedgerRows:
            return sqlite_rows(ledger_file)

        await retry_and_reconcile(address, load, read_rows, written)
        await stop(gw)
    finally:
        gw.kill()


async def test_postgres_ledger_survives_kill_9_mid_load(tmp_path: Path, pg: PgServer) -> None:
    dsn = pg.create_database(f"crash_{os.getpid()}_{next(_db_counter)}")
    spool = tmp_path / "ledger.spool.db"
    env = {"DATABASE_URL": dsn, "FEATHER_SPOOL_PATH": str(spool)}
    config = write_config(tmp_path)
    gw, address = await start_server(tmp_path, config, env)
    try:
        load = await load_then_kill(gw, address)
    finally:
        gw.kill()
    # Before any restart: each acknowledged call is in the spool or already in Postgres (or both: a
    # batch shipped but not yet deleted from the spool at the kill, which the restart ships again as
    # a no-op), and in Postgres at most once.
    spooled = Counter(spool_ids(spool))
    shipped = await postgres_rows(dsn)
    lost = [rid for rid in load.acked if rid not in spooled and rid not in shipped]
    assert not lost, f"{len(lost)} acknowledged calls neither spooled nor shipped, e.g. {lost[:5]}"
    assert set(spooled) | set(shipped) <= set(load.acked) | load.cut_off
    assert max(spooled.values(), default=1) == 1
    assert {n for n, _, _ in shipped.values()} <= {1}
    assert not (tmp_path / "usage.db").exists(), "with DATABASE_URL nothing goes to the SQLite ledger"

    gw, address = await start_server(tmp_path, config, env)
    try:

        async def drained() -> bool:
            return not spool_ids(spool)

        async def read_rows() -> LedgerRows:
            return await postgres_rows(dsn)

        await wait_until(drained, "the spool to ship to Postgres after the restart")
        rows = await read_rows()
        check_acked_once(rows, load)
        await check_usage(address, rows)
        await retry_and_reconcile(address, load, read_rows, drained)
        await stop(gw)
    finally:
        gw.kill()
    assert not spool_ids(spool)
