"""Micro-benchmark of SqliteLedger.record(): records/s for 1 and 64 concurrent writers.

Each writer awaits record() in a loop, as gateway calls settling usage do. `max_batch=1` is a
commit per call, i.e. the ledger without group commit, for comparison. With `synchronous=NORMAL` the
event loop commits each turn's records itself (see sqlite_ledger): "loop held" is how long each of those
turns' sends held the loop (the commit included), p50/p99/max, i.e. what the ledger adds to the loop's lag,
and of it the time the loop's thread was blocked rather than running or preempted.

Request ids are made as the gateway makes them (UUIDv7: the time first) unless `--ids random` (128 random
bits, as before 2026-12-07): a random id lands on a random leaf of the ledger's unique index on (tenant,
request_id). `--prefill N` puts N rows in the file first, as a ledger in service has them. "CPU per record"
is the loop thread's, the record's own work and its share of the commits.

    .venv/bin/python bench/ledger_bench.py [--seconds 3] [--synchronous NORMAL|FULL] [--dir /tmp]
        [--ids gateway|random] [--prefill 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from feather_grpc.core.ledger import Outcome, UsageRecord
from feather_grpc.engine.call import new_request_id
from feather_grpc.state.sqlite_ledger import SqliteLedger, Synchronous


def _on_cpu_and_waiting() -> tuple[int, int]:
    """This thread's time on a CPU (precise) and waiting for one (the scheduler's count), in ns."""
    with open("/proc/thread-self/schedstat") as f:
        waiting = int(f.read().split()[1])
    return time.thread_time_ns(), waiting


def _random_id(_now_ns: int) -> str:
    return os.urandom(16).hex()


def prefill(path: Path, rows: int, ids: str) -> None:
    """`rows` rows of another tenant's past, with ids of the kind given, written by SQLite itself."""
    request_id = (
        "lower(hex(randomblob(16)))"
        if ids == "random"
        else "printf('%012x', 1700000000000 + x / 100) || lower(hex(randomblob(10)))"  # 100 calls a millisecond
    )
    conn = sqlite3.connect(path)
    conn.execute(
        f"""INSERT INTO usage_records (request_id, time_ns, tenant, provider, model, requested_model, outcome,
            error_code, error_reason, input_tokens, output_tokens, cached_input_tokens, cache_write_tokens,
            reasoning_tokens, cost_nanos_usd, estimated, unpriced, streamed, attempt_count, latency_ms, tags)
        WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < {rows})
        SELECT {request_id}, 1700000000000000000 + x * 10000, 'earlier', 'openai', 'gpt-4o-mini', 'gpt-4o-mini',
            'ok', '', '', 812, 95, 0, 0, 0, 178800, 0, 0, 0, 1, 420, '{{}}' FROM c"""
    )
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


async def run(
    path: Path, writers: int, seconds: float, synchronous: Synchronous, max_batch: int, ids: str, rows: int
) -> None:
    make_id = _random_id if ids == "random" else new_request_id
    if rows:
        await (await SqliteLedger.open(path)).aclose()  # the schema
        prefill(path, rows, ids)
    ledger = await SqliteLedger.open(path, synchronous=synchronous, max_batch=max_batch)
    latencies: list[float] = []
    held: list[float] = []  # the loop's time in each send (the on-loop commit)
    # Of that, the time the loop's thread was blocked (in a write(), on a lock): neither running nor
    # preempted. On a shared machine the wall time includes preemption; this is what the loop must not do.
    blocked: list[float] = []
    send = ledger._send

    def timed_send(loop: asyncio.AbstractEventLoop) -> None:
        cpu, waiting = _on_cpu_and_waiting()
        started = time.perf_counter()
        send(loop)
        wall = time.perf_counter() - started
        cpu_after, waiting_after = _on_cpu_and_waiting()
        held.append(wall)
        blocked.append(max(0.0, wall - (cpu_after - cpu + waiting_after - waiting) / 1e9))

    ledger._send = timed_send  # type: ignore[method-assign]
    deadline = time.perf_counter() + seconds

    async def writer(n: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            record = UsageRecord(
                request_id=make_id(time.time_ns()),
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
            started = time.perf_counter()
            await ledger.record(record)
            latencies.append(time.perf_counter() - started)
            i += 1

    started = time.perf_counter()
    cpu_started = time.thread_time()
    await asyncio.gather(*(writer(n) for n in range(writers)))
    elapsed = time.perf_counter() - started
    cpu = time.thread_time() - cpu_started
    await ledger.aclose()

    count = len(latencies)
    latencies.sort()
    p50 = statistics.median(latencies) * 1e3
    p99 = latencies[int(0.99 * (count - 1))] * 1e3
    held.sort()
    blocked.sort()
    loop_held = (
        f"loop held p50 {statistics.median(held) * 1e6:.0f} p99 {held[int(0.99 * (len(held) - 1))] * 1e6:.0f} "
        f"max {held[-1] * 1e6:.0f} us, of it blocked p99 {blocked[int(0.99 * (len(blocked) - 1))] * 1e6:.0f} "
        f"max {blocked[-1] * 1e6:.0f} us ({ledger.loop_commit_count:,} of {ledger.commit_count:,} commits on the loop)"
    )
    print(
        f"writers={writers:<3} synchronous={synchronous:<6} max_batch={max_batch:<4} "
        f"{count / elapsed:>9,.0f} records/s  {count / ledger.commit_count:>6.1f} records/commit  "
        f"CPU per record {cpu / count * 1e6:.1f} us  "
        f"p50 {p50:.2f} ms  p99 {p99:.2f} ms  {loop_held}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--synchronous", choices=["NORMAL", "FULL"], default="NORMAL")
    parser.add_argument("--dir", help="where to put the database (default: a temp dir)")
    parser.add_argument("--ids", choices=["gateway", "random"], default="gateway", help="request ids (see above)")
    parser.add_argument("--prefill", type=int, default=0, metavar="ROWS", help="rows in the file before the run")
    args = parser.parse_args()
    print(f"ids {args.ids}, {args.prefill:,} rows in the file before each run")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for n, (writers, max_batch) in enumerate([(1, 512), (64, 512), (64, 1)]):
            path = Path(tmp) / f"bench-{n}.db"
            await run(path, writers, args.seconds, args.synchronous, max_batch, args.ids, args.prefill)


if __name__ == "__main__":
    asyncio.run(main())
