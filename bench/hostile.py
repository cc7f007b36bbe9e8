"""One upstream attacks; what does it cost everyone else? The gateway's peak RSS, and another tenant's Chat
latency while one tenant's calls go to an upstream answering huge or endless replies.

    .venv/bin/python bench/hostile.py                      # this checkout, about 1 minute
    .venv/bin/python bench/hostile.py --against main       # and the same run against another git ref

One `feather-grpc serve` process (in-memory ledger) with two tenants and two providers: `calm`, the
upstream simulator (`python -m sim.upstream`), and `hostile` (`python -m sim.hostile`), each in its own
process. Per attack (`json-length`: a 300 MB JSON reply declared by Content-Length; `json-chunked`: the
same without a declared length; `sse-line`: a stream whose one line never ends), and for each gateway
(this checkout, then `--against REF` exported with `git archive` and run with the same interpreter):

1. quiet: the bystander tenant runs `--concurrency` closed-loop Chat calls on `calm` for `--seconds`;
2. attack: the same, while the attacker tenant runs `--attackers` closed-loop calls on `hostile`
   (each with a `--attack-timeout-s` deadline, as a caller would set).

Reported: the gateway's peak RSS (VmHWM, and RSS sampled every 10 ms) before and during the attack, the
bystander's p50/p99/max latency and failures quiet vs. attack (same run, so the ratio is the figure that
matters on a shared machine), and how the attacker's calls ended. Writes bench/results/hostile.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
ATTACKER_KEY = "fk_attacker_bench_key"
BYSTANDER_KEY = "fk_bystander_bench_key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def _config(calm_url: str, hostile_url: str) -> dict[str, Any]:
    price = {"inputPer1M": 1, "outputPer1M": 2}
    return {
        "ledger": {"type": "memory"},
        "timeoutMs": 60_000,
        "retry": {"maxAttempts": 1},
        "tenants": {
            "attacker": {"keys": [_digest(ATTACKER_KEY)]},
            "bystander": {"keys": [_digest(BYSTANDER_KEY)]},
        },
        "providers": {
            "calm": {"type": "openai-compatible", "baseUrl": calm_url + "/v1", "models": [{"name": "calm", **price}]},
            "hostile": {
                "type": "openai-compatible",
                "baseUrl": hostile_url + "/v1",
                "models": [{"name": "huge", **price}],
            },
        },
    }


def _source_tree(ref: str, into: Path) -> Path:
    """`ref`'s files (git archive), for running another version of the gateway with this interpreter."""
    archive = subprocess.run(["git", "archive", ref], cwd=ROOT, capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    return into


class RssSampler:
    """Samples a process's VmRSS every 10 ms on a thread; `peak_mb` since the last `reset`."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _field(self, name: str) -> int:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(name + ":"):
                    return int(line.split()[1])
        return 0

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            self.peak_kb = max(self.peak_kb, self._field("VmRSS"))

    def reset(self) -> None:
        self.peak_kb = self._field("VmRSS")

    def hwm_mb(self) -> float:
        return self._field("VmHWM") / 1024

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def _spawn(cmd: list[str], cwd: Path, log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(cmd, cwd=cwd, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def _wait_ready(address: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + 30
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"gateway did not start:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(grpc.RpcError):
                reply = stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            time.sleep(0.1)


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _bystander(stub: Any, seconds: float, concurrency: int) -> dict[str, Any]:
    import grpc

    from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb

    request = pb.ChatRequest(model="calm/calm", messages=[pb.Message(role=pb.ROLE_USER, content="hello there")])
    metadata = (("authorization", f"Bearer {BYSTANDER_KEY}"),)
    latencies: list[float] = []
    failures: Counter[str] = Counter()
    end = time.monotonic() + seconds

    async def worker() -> None:
        while time.monotonic() < end:
            started = time.perf_counter()
            try:
                await stub.Chat(request, metadata=metadata, timeout=30)
            except grpc.aio.AioRpcError as e:
                failures[e.code().name] += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {
        "calls": len(latencies),
        "failures": dict(failures),
        "p50_ms": round(_pct(latencies, 0.50), 2),
        "p99_ms": round(_pct(latencies, 0.99), 2),
        "max_ms": round(max(latencies, default=float("nan")), 2),
    }


async def _attacker(stub: Any, stop: asyncio.Event, attackers: int, stream: bool, timeout_s: float) -> dict[str, int]:
    import grpc

    from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb

    messages = [pb.Message(role=pb.ROLE_USER, content="give me everything")]
    metadata = (("authorization", f"Bearer {ATTACKER_KEY}"),)
    outcomes: Counter[str] = Counter()

    async def worker() -> None:
        while not stop.is_set():
            try:
                if stream:
                    call = stub.StreamChat(
                        pb.StreamChatRequest(model="hostile/huge", messages=messages),
                        metadata=metadata,
                        timeout=timeout_s,
                    )
                    async for _ in call:
                        pass
                else:
                    await stub.Chat(
                        pb.ChatRequest(model="hostile/huge", messages=messages), metadata=metadata, timeout=timeout_s
                    )
                outcomes["OK"] += 1
            except grpc.aio.AioRpcError as e:
                outcomes[e.code().name] += 1

    tasks = [asyncio.create_task(worker()) for _ in range(attackers)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return dict(outcomes)


def _measure(tree: Path, attack: str, args: argparse.Namespace, work: Path, label: str) -> dict[str, Any]:
    """Starts the upstreams and the gateway from `tree`, runs both phases, stops everything."""
    calm_port, gw_port = _free_port(), _free_port()
    logs = work / f"{label}-{attack}"
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        procs.append(_spawn([sys.executable, "-m", "sim.upstream", "--port", str(calm_port)], ROOT, logs / "calm.log"))
        size = str(args.size_mb << 20) if attack.startswith("json") else "0"
        hostile = subprocess.Popen(
            [sys.executable, "-m", "sim.hostile", "--behaviour", attack, "--size", size],
            cwd=ROOT,
            stdout=subprocess.PIPE,
        )
        procs.append(hostile)
        assert hostile.stdout is not None
        hostile_port = int(hostile.stdout.readline())
        config = logs / "feather.config.json"
        config.write_text(json.dumps(_config(f"http://127.0.0.1:{calm_port}", f"http://127.0.0.1:{hostile_port}")))
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("FEATHER_", "RATE_LIMIT_", "OTEL_", "METRICS_"))
        }
        env.update(LOG_LEVEL="warning", PYTHONPATH=str(tree))
        cmd = [sys.executable, "-m", "feather_grpc.cli", "serve", "--config", str(config), "--port", str(gw_port)]
        gateway = _spawn(cmd, tree, logs / "gateway.log", env)
        procs.append(gateway)
        address = f"127.0.0.1:{gw_port}"
        _wait_ready(address, gateway, logs / "gateway.log")
        sampler = RssSampler(gateway.pid)
        try:
            quiet, under, outcomes = asyncio.run(_phases(address, sampler, attack, args))
            hwm = round(sampler.hwm_mb(), 1)
        finally:
            sampler.stop()
        return {
            "gateway": label,
            "attack": attack,
            "quiet": quiet,
            "attack_phase": under,
            "vm_hwm_mb": hwm,
            "attacker_calls": outcomes,
        }
    finally:
        for proc in reversed(procs):
            proc.terminate()
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(10)
            if proc.poll() is None:
                proc.kill()


async def _phases(
    address: str, sampler: RssSampler, attack: str, args: argparse.Namespace
) -> tuple[dict[str, Any], dict[str, Any], dict[str, int]]:
    import grpc

    from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as by_channel, grpc.aio.insecure_channel(address) as at_channel:
        bystander, attacker = pb_grpc.FeatherServiceStub(by_channel), pb_grpc.FeatherServiceStub(at_channel)
        await _bystander(bystander, 1.0, args.concurrency)  # warm up: connections, pools
        sampler.reset()
        quiet = await _bystander(bystander, args.seconds, args.concurrency)
        quiet["peak_rss_mb"] = round(sampler.peak_kb / 1024, 1)
        sampler.reset()
        stop = asyncio.Event()
        attack_task = asyncio.create_task(
            _attacker(attacker, stop, args.attackers, attack == "sse-line", args.attack_timeout_s)
        )
        under = await _bystander(bystander, args.seconds, args.concurrency)
        stop.set()
        under["peak_rss_mb"] = round(sampler.peak_kb / 1024, 1)
        return quiet, under, await attack_task


_PARSER_SCALING = """
import sys, time
from feather_grpc.providers.sse import SSEParser
piece = b"x" * 4096
def feed(mib):
    try:
        parser = SSEParser(1 << 40)  # no limit: time the buffering alone
    except TypeError:
        parser = SSEParser()  # a version without limits
    parser.feed(b"data: ")
    started = time.perf_counter()
    for _ in range(mib * 256):
        parser.feed(piece)
    parser.feed(b"\\n\\n")
    return time.perf_counter() - started
small, large = feed(4), feed(8)
print(f"{small:.4f} {large:.4f}")
"""


def _parser_scaling(tree: Path) -> dict[str, float]:
    """Seconds to buffer a 4 MiB and an 8 MiB line fed in 4 KiB reads: linear buffering doubles, quadratic
    quadruples (the ratio is the figure; absolute times depend on the machine's load)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    out = subprocess.run(
        [sys.executable, "-c", _PARSER_SCALING], cwd=tree, env=env, capture_output=True, text=True, check=True
    ).stdout
    small, large = (float(x) for x in out.split())
    return {"line_4mib_s": small, "line_8mib_s": large, "ratio": round(large / small, 2)}


def _print(rows: list[dict[str, Any]]) -> None:
    head = (
        f"{'gateway':<10} {'attack':<13} {'RSS quiet':>10} {'RSS attack':>11} {'VmHWM':>8} "
        f"{'p50 quiet':>10} {'p99 quiet':>10} {'p50 attack':>11} {'p99 attack':>11} {'max attack':>11} "
        f"{'by. fails':>9}  attacker calls"
    )
    print(head)
    for r in rows:
        q, a = r["quiet"], r["attack_phase"]
        fails = sum(a["failures"].values())
        print(
            f"{r['gateway']:<10} {r['attack']:<13} {q['peak_rss_mb']:>8.0f}MB {a['peak_rss_mb']:>9.0f}MB "
            f"{r['vm_hwm_mb']:>6.0f}MB {q['p50_ms']:>8.1f}ms {q['p99_ms']:>8.1f}ms {a['p50_ms']:>9.1f}ms "
            f"{a['p99_ms']:>9.1f}ms {a['max_ms']:>9.1f}ms {fails:>9}  {r['attacker_calls']}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each phase")
    parser.add_argument("--concurrency", type=int, default=4, help="bystander calls in flight")
    parser.add_argument("--attackers", type=int, default=4, help="attacker calls in flight")
    parser.add_argument("--attack-timeout-s", type=float, default=10.0, help="deadline of each attacker call")
    parser.add_argument("--size-mb", type=int, default=300, help="size of the hostile JSON reply")
    parser.add_argument("--attacks", default="json-length,json-chunked,sse-line")
    parser.add_argument("--against", default="", help="also measure this git ref (e.g. main)")
    args = parser.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="feather-hostile-") as tmp:
        work = Path(tmp)
        trees = [("this", ROOT)]
        if args.against:
            trees.append((args.against, _source_tree(args.against, work / "ref")))
        for attack in args.attacks.split(","):
            for label, tree in trees:
                row = _measure(tree, attack, args, work, label)
                rows.append(row)
                _print([row])
        scaling = {label: _parser_scaling(tree) for label, tree in trees}
    print()
    _print(rows)
    print("\nSSE line buffering (one line fed in 4 KiB reads):")
    for label, figures in scaling.items():
        print(
            f"  {label:<10} 4 MiB {figures['line_4mib_s']:.3f} s, 8 MiB {figures['line_8mib_s']:.3f} s, "
            f"ratio {figures['ratio']} (2 = linear, 4 = quadratic)"
        )
    RESULTS.mkdir(parents=True, exist_ok=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout
    out = {"commit": commit.strip(), "args": vars(args), "cpus": os.cpu_count(), "rows": rows, "sse": scaling}
    (RESULTS / "hostile.json").write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
