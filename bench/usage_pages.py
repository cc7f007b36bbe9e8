"""One tenant's big Usage query against another tenant's Chat latency (issue 10, item 8).

A SQLite ledger holds `--rows` records with distinct tag values (so `group_by tag` has that many rows). A
`feather-grpc serve` process with the `mock` provider serves it; tenant `caller` runs Chat at concurrency
4 for `--seconds`, first alone, then while tenant `ops` (an admin) reads `Usage(group_by tag)` over and
over, following `next_page_token` to the last page. Reported: Chat p50/p99/max alone and during, and their
ratio (same run, same machine); for Usage, replies, rows and the largest reply.

`--baseline DIR` runs a second gateway from another checkout (`git archive main | tar -x -C DIR`) on a copy
of the same ledger, measured right after this one, e.g. the code before pages (one reply of every row).

    .venv/bin/python bench/usage_pages.py [--rows 200000] [--seconds 10] [--baseline /tmp/main]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb  # noqa: E402
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc  # noqa: E402
from feather_grpc.state.ledger import UsageRecord  # noqa: E402
from feather_grpc.state.sqlite_ledger import SqliteLedger  # noqa: E402

ADMIN_KEY, CALLER_KEY = "fk_bench_ops", "fk_bench_caller"
_BIG = [("grpc.max_receive_message_length", 1 << 30)]  # the unpaged reply of the code before pages


def _digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


async def build_ledger(path: Path, rows: int) -> None:
    ledger = await SqliteLedger.open(path)
    now = time.time_ns()
    for start in range(0, rows, 2_000):
        await asyncio.gather(
            *(
                ledger.record(
                    UsageRecord(
                        request_id=f"bulk-{i}",
                        time_ns=now,
                        tenant="bulk",
                        provider="mock",
                        model="mock-fast",
                        cost_nanos_usd=1_000,
                        tags={"job": f"job-{i:07d}"},
                    )
                )
                for i in range(start, min(start + 2_000, rows))
            )
        )
    await ledger.aclose()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_gateway(checkout: Path, workdir: Path, ledger: Path) -> tuple[subprocess.Popen[bytes], str]:
    config = {
        "ledger": {"type": "sqlite", "path": str(ledger)},
        "providers": {
            "mock": {"type": "mock", "models": [{"name": "mock-fast", "inputPer1K": 0.001, "outputPer1K": 0.002}]}
        },
        "tenants": {
            "ops": {"keys": [_digest(ADMIN_KEY)], "role": "admin"},
            "caller": {"keys": [_digest(CALLER_KEY)]},
        },
    }
    (workdir / "feather.config.json").write_text(json.dumps(config))
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(checkout), "LOG_LEVEL": "warning"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "feather_grpc.cli", "serve", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, f"127.0.0.1:{port}"


async def wait_serving(address: str) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            try:
                reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{address} never served")


async def chat_latencies(address: str, seconds: float, concurrency: int = 4) -> list[float]:
    metadata = (("authorization", f"Bearer {CALLER_KEY}"),)
    latencies: list[float] = []
    deadline = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.FeatherServiceStub(channel)
        request = pb.ChatRequest(model="mock-fast", messages=[pb.Message(role=pb.ROLE_USER, content="hi")])

        async def worker() -> None:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                await stub.Chat(request, metadata=metadata, timeout=60)
                latencies.append(time.perf_counter() - t0)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


async def read_usage(address: str, stop: asyncio.Event, stats: dict[str, Any]) -> None:
    metadata = (("authorization", f"Bearer {ADMIN_KEY}"),)
    async with grpc.aio.insecure_channel(address, options=_BIG) as channel:
        stub = pb_grpc.FeatherServiceStub(channel)
        while not stop.is_set():
            token, passes_rows = "", 0
            t0 = time.perf_counter()
            while True:
                request = pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_TAG], tag_key="job", page_token=token)
                reply = await stub.Usage(request, metadata=metadata, timeout=600)
                stats["replies"] += 1
                stats["largest_reply_bytes"] = max(stats["largest_reply_bytes"], reply.ByteSize())
                passes_rows += len(reply.rows)
                token = reply.next_page_token
                if not token or stop.is_set():
                    break
            if not token:
                stats["full_passes"] += 1
                stats["rows_per_pass"] = passes_rows
                stats["pass_s"].append(time.perf_counter() - t0)


def summary(latencies: list[float]) -> dict[str, float]:
    ordered = sorted(latencies)
    return {
        "calls": len(ordered),
        "p50_ms": round(1000 * statistics.median(ordered), 2),
        "p99_ms": round(1000 * ordered[int(0.99 * (len(ordered) - 1))], 2),
        "max_ms": round(1000 * ordered[-1], 2),
    }


async def measure(name: str, checkout: Path, workdir: Path, ledger: Path, seconds: float) -> dict[str, Any]:
    proc, address = start_gateway(checkout, workdir, ledger)
    try:
        await wait_serving(address)
        await chat_latencies(address, 1.0)  # warm-up
        alone = await chat_latencies(address, seconds)
        stop = asyncio.Event()
        stats: dict[str, Any] = {"replies": 0, "largest_reply_bytes": 0, "full_passes": 0, "pass_s": []}
        reader = asyncio.ensure_future(read_usage(address, stop, stats))
        await asyncio.sleep(0.5)  # the reader is at work
        during = await chat_latencies(address, seconds)
        stop.set()
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    a, d = summary(alone), summary(during)
    return {
        "gateway": name,
        "chat_alone": a,
        "chat_during_usage": d,
        "p99_ratio_during_over_alone": round(d["p99_ms"] / a["p99_ms"], 2),
        "usage": {**stats, "pass_s": [round(s, 2) for s in stats["pass_s"]]},
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--baseline", type=Path, help="another checkout to run the same way, right after")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="feather-usage-bench-") as tmp:
        root = Path(tmp)
        ledger = root / "usage.db"
        t0 = time.perf_counter()
        await build_ledger(ledger, args.rows)
        print(f"ledger: {args.rows} rows in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        results = []
        runs = [("this", REPO)] + ([("baseline", args.baseline.resolve())] if args.baseline else [])
        for name, checkout in runs:
            workdir = root / name
            workdir.mkdir()
            copy = workdir / "usage.db"
            shutil.copy(ledger, copy)
            results.append(await measure(name, checkout, workdir, copy, args.seconds))
            print(json.dumps(results[-1]), file=sys.stderr)
    print(json.dumps({"rows": args.rows, "seconds": args.seconds, "results": results}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
