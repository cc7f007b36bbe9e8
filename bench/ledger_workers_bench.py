"""`serve --workers N` with SQLite, the ledger alone: N worker processes recording at once into one file.

Two ways, interleaved round by round so that both see the same machine:

- shared: each process opens the file itself (SqliteLedger, WAL + busy_timeout), as `--workers` did
  before the ledger writer process: the processes take turns through SQLite's write lock;
- writer: one writer process owns the file (state.ledger_writer.serve_writer) and each worker sends its
  rows over a Unix socket (SocketLedger), as `--workers` does now.

Each worker runs --concurrency tasks that await `record()` in a loop for --seconds (as gateway calls
settling usage do). Reported per round: records/s over all workers, p50/p99 of `record()` and the
workers' own CPU per record (what a worker spends on the ledger, taken from the calls it serves).

    .venv/bin/python bench/ledger_workers_bench.py [--workers 2] [--seconds 3] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


async def worker(mode: str, path: str, socket_path: str, index: int, concurrency: int, seconds: float) -> None:
    from feather_grpc.core.ledger import Outcome, UsageRecord
    from feather_grpc.state.ledger_writer import SocketLedger
    from feather_grpc.state.sqlite_ledger import SqliteLedger

    ledger = SocketLedger(path, socket_path) if mode == "writer" else SqliteLedger(path)
    await ledger.ready()
    latencies: list[float] = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    deadline = time.perf_counter() + seconds

    async def one(n: int) -> None:
        i = 0
        while time.perf_counter() < deadline:
            record = UsageRecord(
                request_id=f"p{index}-w{n}-{i}",
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
    await asyncio.gather(*(one(n) for n in range(concurrency)))
    elapsed = time.perf_counter() - started
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    await ledger.aclose()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    print(json.dumps({"count": len(latencies), "elapsed": elapsed, "latencies": latencies, "cpu": cpu}), flush=True)


async def _create(path: str) -> None:
    from feather_grpc.state.sqlite_ledger import SqliteLedger

    await (await SqliteLedger.open(path)).aclose()


def round_of(mode: str, workers: int, concurrency: int, seconds: float) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="feather-ledger-bench-"))
    path, socket_path = str(tmp / "usage.db"), str(tmp / "writer.sock")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    writer = None
    if mode == "writer":
        cmd = [sys.executable, "-m", "feather_grpc.server.workers", "ledger-writer", path, "NORMAL", socket_path]
        writer = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
        while not os.path.exists(socket_path):
            time.sleep(0.01)
    else:  # the file and its schema exist before the workers start, as after the first worker is up
        asyncio.run(_create(path))

    def start(i: int) -> subprocess.Popen[str]:
        args = ["--role", "worker", "--mode", mode, "--path", path, "--socket", socket_path, "--index", str(i)]
        args += ["--concurrency", str(concurrency), "--seconds", str(seconds)]
        return subprocess.Popen([sys.executable, __file__, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)

    procs = [start(i) for i in range(workers)]
    results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    if writer is not None:
        writer.terminate()
        writer.wait()
    latencies = sorted(x for r in results for x in r["latencies"])
    count = sum(r["count"] for r in results)
    return {
        "records_per_s": count / max(r["elapsed"] for r in results),
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1e3,
        "worker_cpu_us_per_record": sum(r["cpu"] for r in results) / count * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", default="main", choices=["main", "worker"])
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mode")
    ap.add_argument("--path")
    ap.add_argument("--socket")
    ap.add_argument("--index", type=int)
    opts = ap.parse_args()
    if opts.role == "worker":
        asyncio.run(worker(opts.mode, opts.path, opts.socket, opts.index, opts.concurrency, opts.seconds))
        return
    load = os.getloadavg()[0]
    print(f"{opts.workers} workers x {opts.concurrency} concurrent record() for {opts.seconds:g} s, load {load:.1f}")
    for r in range(opts.rounds):
        for mode in ("shared", "writer") if r % 2 == 0 else ("writer", "shared"):
            f = round_of(mode, opts.workers, opts.concurrency, opts.seconds)
            print(
                f"round {r + 1} {mode:<6} {f['records_per_s']:>8,.0f} records/s  p50 {f['p50_ms']:6.2f} ms  "
                f"p99 {f['p99_ms']:7.2f} ms  worker CPU {f['worker_cpu_us_per_record']:5.0f} us/record"
            )


if __name__ == "__main__":
    main()
