"""`feather-grpc serve --workers N`: fresh processes on one port, calls spread across them, one SQLite ledger
written by one writer process (every call recorded exactly once, Usage in any worker sees every worker's
rows), SIGTERM stops all cleanly (the writer last), a crashed worker or writer stops the rest with a
non-zero exit; `--workers auto` is one per CPU."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from feather_grpc.cli import serve
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from feather_grpc.server import workers
from tests.gateway_harness import user
from tests.ops_harness import REPO, GatewayProcess, eventually, free_port, scrape


def alive(pid: int) -> bool:
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def start_workers(tmp_path: Path, count: int = 2, env: dict[str, str] | None = None) -> tuple[GatewayProcess, int]:
    cfg = tmp_path / "feather.config.json"
    cfg.write_text(
        json.dumps(
            {
                "ledger": {"type": "sqlite", "path": str(tmp_path / "usage.db")},
                "server": {"gracePeriodS": 5},
                "providers": {
                    "mock": {
                        "type": "mock",
                        "models": [{"name": "mock-fast", "aliases": ["fast"], "inputPer1M": 1, "outputPer1M": 2}],
                    }
                },
            }
        )
    )
    port = free_port()
    args = ["feather-grpc", "serve", "--workers", str(count), "--config", str(cfg), "--port", str(port)]
    return GatewayProcess.start(args, {"LOG_LEVEL": "info", **(env or {})}, tmp_path), port


def call_lines(gw: GatewayProcess) -> list[dict[str, object]]:
    return [e for e in list(gw.lines) if e.get("logger") == "feather_grpc.calls"]


async def worker_pids(gw: GatewayProcess, count: int = 2) -> set[int]:
    serving = await gw.wait_logged("serving on", count=count)
    started = {e["worker_pid"] for e in gw.logged("supervisor: worker")}
    pids = {e["pid"] for e in serving}
    assert pids == started and len(pids) == count and gw.proc.pid not in pids
    assert sorted(e["worker"] for e in serving) == list(range(count))
    return pids


async def test_two_workers_share_the_port_and_the_ledger_and_stop_cleanly(tmp_path: Path) -> None:
    metrics_port = free_port()
    gw, port = start_workers(tmp_path, env={"METRICS_PORT": str(metrics_port), "METRICS_HOST": "127.0.0.1"})
    try:
        pids = await worker_pids(gw)
        # Each channel is its own TCP connection; the kernel spreads connections across the workers.
        sent: list[str] = []
        deadline = time.monotonic() + 15
        while {e["pid"] for e in call_lines(gw)} != pids:
            assert time.monotonic() < deadline and len(sent) < 200, "calls never reached both workers"
            opts = [("grpc.use_local_subchannel_pool", 1)]
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as channel:
                rid = f"call-{len(sent)}"
                reply = await pb_grpc.FeatherServiceStub(channel).Chat(
                    pb.ChatRequest(model="fast", messages=[user("hi")], request_id=rid), timeout=5
                )
                assert reply.request_id == rid
                sent.append(rid)
            await eventually(lambda: len(call_lines(gw)) >= len(sent), what="the call's log line")
        by_pid: dict[object, int] = {}
        for entry in call_lines(gw):
            by_pid[entry["pid"]] = by_pid.get(entry["pid"], 0) + 1
        assert set(by_pid) == pids and sum(by_pid.values()) == len(sent)
        # One scrape of the supervisor's port has every worker's calls, labelled by worker.
        served = {
            labels: value
            for (name, labels), value in scrape(metrics_port).items()
            if name == "feather_requests_total" and ("status", "ok") in labels
        }
        assert {dict(labels)["worker"] for labels in served} == {"0", "1"}
        assert sum(served.values()) == len(sent)
        # Whichever worker answers, Usage counts the calls both recorded.
        for _ in range(4):
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=opts) as channel:
                usage = await pb_grpc.FeatherServiceStub(channel).Usage(pb.UsageRequest(), timeout=10)
                assert usage.total.request_count == usage.total.ok_count == len(sent)

        gw.proc.send_signal(signal.SIGTERM)
        assert await gw.wait_exit() == 0, gw.output()
        assert not any(alive(pid) for pid in pids)
        stopped = [e for e in gw.logged("stopped") if e["logger"] == "feather_grpc.server.app"]
        (writer_stopped,) = gw.logged("ledger writer: stopped")
        assert len(stopped) == 2 and all(e["time"] <= writer_stopped["time"] for e in stopped)
    finally:
        gw.kill()
    with sqlite3.connect(tmp_path / "usage.db") as db:
        rows = db.execute("SELECT request_id, outcome FROM usage_records ORDER BY request_id").fetchall()
    assert sorted(rows) == sorted((rid, "ok") for rid in sent)


async def test_a_crashed_worker_stops_the_others_and_the_supervisor_fails(tmp_path: Path) -> None:
    gw, _ = start_workers(tmp_path)
    try:
        victim, survivor = sorted(await worker_pids(gw))
        os.kill(victim, signal.SIGKILL)
        code = await gw.wait_exit()
        assert code != 0
        assert not alive(survivor)
        (crash,) = [e for e in gw.logged("exited with") if e["worker_pid"] == victim]
        assert crash["level"] == "error"
    finally:
        gw.kill()


async def test_workers_stop_when_their_supervisor_dies(tmp_path: Path) -> None:
    gw, _ = start_workers(tmp_path)
    pids: set[int] = set()
    try:
        pids = await worker_pids(gw)
        gw.proc.kill()
        await eventually(lambda: not any(alive(pid) for pid in pids), timeout_s=10, what="orphaned workers to exit")
    finally:
        gw.kill()
        for pid in pids:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


async def test_a_dead_ledger_writer_stops_the_workers_and_the_supervisor_fails(tmp_path: Path) -> None:
    gw, _ = start_workers(tmp_path)
    try:
        pids = await worker_pids(gw)
        (started,) = gw.logged("ledger writer started")
        os.kill(started["worker_pid"], signal.SIGKILL)
        assert await gw.wait_exit() != 0
        assert not any(alive(pid) for pid in pids)
        assert gw.logged("the ledger writer exited")[0]["level"] == "error"
    finally:
        gw.kill()


def test_workers_auto_is_one_per_cpu(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cpus = workers.cpu_count()
    assert 1 <= cpus <= len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # a container limited to 1.5 CPUs: 2 workers
    assert workers.cpu_count(str(quota)) == min(2, len(os.sched_getaffinity(0)))
    quota.write_text("max 100000\n")
    assert workers.cpu_count(str(quota)) == len(os.sched_getaffinity(0))
    assert serve._workers(argparse.Namespace(workers=serve._worker_count("auto"))) == cpus
    assert serve._workers(argparse.Namespace(workers=serve._worker_count("3"))) == 3
    monkeypatch.setenv("FEATHER_WORKERS", "auto")
    assert serve._workers(argparse.Namespace(workers=None)) == cpus
    run = subprocess.run(
        [sys.executable, "-m", "feather_grpc.cli", "serve", "--workers", "many"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "or auto" in run.stderr


def test_workers_need_a_fixed_port() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "feather_grpc.cli", "serve", "--workers", "2", "--port", "0"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 2 and "fixed port" in run.stderr
