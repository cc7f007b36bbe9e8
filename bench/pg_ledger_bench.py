"""Benchmark of PostgresLedger: records/s for 1 and 64 concurrent writers.

Each writer awaits record() in a loop, as gateway calls settling usage do; record() returns once
the local spool has committed. Reported per run:
  acked/s      records acknowledged per second (the latency a call pays: the spool commit)
  end-to-end/s records per second until every one of them is committed in Postgres (flushed)
  ship/s       the shipper alone: a spool pre-filled with the same number of records, drained

Starts a throwaway PostgreSQL 16 (the pgserver wheel, fsync on) unless --dsn names a database.

Request ids are made as the gateway makes them (UUIDv7: the time first) unless `--ids random` (128 random
bits, as before 2026-12-07).

    .venv/bin/python bench/pg_ledger_bench.py [--seconds 3] [--synchronous NORMAL|FULL] [--dsn URL]
        [--ids gateway|random]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from feather_grpc.core.ledger import Outcome, UsageRecord
from feather_grpc.engine.call import new_request_id
from feather_grpc.state.ledger_spool import LedgerSpool
from feather_grpc.state.postgres_ledger import PostgresLedger
from feather_grpc.state.sqlite_ledger import Synchronous

RANDOM_IDS = False  # --ids random


def make_record(writer: int, i: int) -> UsageRecord:
    return UsageRecord(
        request_id=os.urandom(16).hex() if RANDOM_IDS else new_request_id(time.time_ns()),
        time_ns=time.time_ns(),
        tenant="bench",
        provider="openai",
        model="gpt-4o-mini",
        outcome=Outcome.OK,
        input_tokens=812,
        output_tokens=95,
        cost_nanos_usd=178_800,
        attempt_count=1,
        latency_ms=420,
        tags={"team": "search", "env": "prod"},
    )


async def run(dsn: str, spool: Path, writers: int, seconds: float, synchronous: Synchronous) -> None:
    ledger = await PostgresLedger.open(dsn, spool, synchronous=synchronous)
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def writer(n: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            record = make_record(n, i)
            started = time.perf_counter()
            await ledger.record(record)
            latencies.append(time.perf_counter() - started)
            i += 1

    started = time.perf_counter()
    await asyncio.gather(*(writer(n) for n in range(writers)))
    acked_s = time.perf_counter() - started
    assert await ledger.flushed(300), "the spool did not drain"
    e2e_s = time.perf_counter() - started
    count = len(latencies)
    batches = ledger.batch_count
    commits = ledger.spool.commit_count
    await ledger.aclose()

    latencies.sort()
    print(
        f"writers={writers:<3} synchronous={synchronous:<6} {count / acked_s:>8,.0f} acked/s  "
        f"{count / e2e_s:>8,.0f} end-to-end/s  p50 {statistics.median(latencies) * 1e3:.2f} ms  "
        f"p99 {latencies[int(0.99 * (count - 1))] * 1e3:.2f} ms  "
        f"{count / commits:.1f} records/spool commit  {count / max(batches, 1):.0f} records/Postgres tx"
    )


async def ship_only(dsn: str, spool_path: Path, count: int) -> None:
    spool = LedgerSpool(spool_path)
    await spool.open()
    for start in range(0, count, 1000):
        await asyncio.gather(*(spool.append(make_record(0, i)) for i in range(start, min(count, start + 1000))))
    await spool.aclose()
    started = time.perf_counter()
    ledger = await PostgresLedger.open(dsn, spool_path)
    assert await ledger.flushed(300)
    elapsed = time.perf_counter() - started
    await ledger.aclose()
    print(f"shipper alone: {count:,} spooled records to Postgres in {elapsed:.2f}s = {count / elapsed:>8,.0f} ship/s")


@contextlib.contextmanager
def database(dsn: str | None) -> Iterator[str]:
    """Yields `dsn`, or that of a throwaway server (fsync on) if none was given."""
    if dsn:
        yield dsn
        return
    from tests.pg_server import PgServer

    with PgServer(fsync=True) as server:
        yield server.dsn()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL")
    parser.add_argument("--dsn", help="an existing database to use (default: a throwaway server)")
    parser.add_argument("--ids", choices=["gateway", "random"], default="gateway", help="request ids (see above)")
    args = parser.parse_args()
    global RANDOM_IDS
    RANDOM_IDS = args.ids == "random"
    print(f"ids {args.ids}")
    with database(args.dsn) as dsn, tempfile.TemporaryDirectory() as tmp:
        for n, writers in enumerate([1, 64]):
            await run(dsn, Path(tmp) / f"spool-{n}.db", writers, args.seconds, args.synchronous)
        await ship_only(dsn, Path(tmp) / "spool-ship.db", 50_000)


if __name__ == "__main__":
    asyncio.run(main())
