"""The gateway benchmark: throughput, added latency and TTFT overhead, gateway vs. straight to the upstream.

    make bench                         # or: .venv/bin/python bench/run.py   (about 1.5 minutes)
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
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
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
_GATEWAY_ENV_NAMES = ("PORT", "REDIS_URL", "JWT_SECRET")


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


def _os_name() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return platform.system()


def system_busy_seconds() -> float:
    """CPU seconds all CPUs spent not idle so far (to see what else ran during a measurement)."""
    parts = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


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


_UVLOOP_BOOT = "import sys, uvloop; uvloop.install(); from feather_grpc.cli import main; sys.exit(main(sys.argv[1:]))"


class Gateway:
    def __init__(self, config_path: Path, port: int, log_path: Path, loop: str, extra_env: dict[str, str]) -> None:
        self.port = port
        self.log_path = log_path
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(_GATEWAY_ENV_PREFIXES) and k not in _GATEWAY_ENV_NAMES
        }
        env.update(extra_env)
        self.env_overrides = extra_env
        serve = ["serve", "--config", str(config_path), "--host", "127.0.0.1", "--port", str(port)]
        if loop == "uvloop":
            self.cmd = [sys.executable, "-c", _UVLOOP_BOOT, *serve]
        else:
            self.cmd = [sys.executable, "-m", "feather_grpc.cli", *serve]
        self._log = log_path.open("wb")
        self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout_s
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise BenchFailure(f"the gateway exited with {self.proc.returncode}:\n{self.log_tail()}")
                try:
                    reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                    if reply.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise BenchFailure(f"the gateway was not SERVING after {timeout_s}s:\n{self.log_tail()}")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        self._log.flush()
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
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

    def close(self) -> None:
        self._channel.close()


def smoke_test(port: int) -> None:
    """One Chat and one StreamChat: the gateway parses the fixed replies into the expected answer."""
    import grpc

    from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
    from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc

    msgs = [pb.Message(role=pb.ROLE_USER, content=upstream.PROMPT)]
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
    clients: int  # gateway connections; streams per connection = concurrency / clients


def _count_for(rate: float, seconds: float, floor: int, cap: int) -> int:
    return int(min(cap, max(floor, rate * seconds)))


def measure_case(
    case: Case,
    gateway: Gateway,
    nginx: upstream.Nginx,
    ledger: Ledger,
    tmp: Path,
    seconds: float,
    label_suffix: str = "",
) -> dict[str, Any]:
    c = case.concurrency
    streams = c // case.clients
    tag = f"{case.rpc}-c{c}{label_suffix}"
    gw_url = f"http://127.0.0.1:{gateway.port}{SERVICE}/{case.rpc}"
    direct_url = nginx.url + upstream.PATHS[case.model]
    watch = {"gateway": [gateway.proc.pid], "upstream": nginx.pids()}

    def gw_run(label: str, n: int) -> loadgen.RunResult:
        r = loadgen.run_h2load(
            label,
            gw_url,
            case.grpc_body,
            loadgen.GRPC_HEADERS,
            clients=case.clients,
            streams_per_client=streams,
            requests=n,
            log_dir=tmp,
            watch=watch,
        )
        ledger.expect(case.model, r.succeeded)
        problems = loadgen.check_all_ok(r)
        if problems or not gateway.alive():
            raise BenchFailure("; ".join(problems) or f"the gateway died:\n{gateway.log_tail()}")
        ledger.verify(label)
        return r

    def direct_run(label: str, n: int) -> loadgen.RunResult:
        r = loadgen.run_h2load(
            label,
            direct_url,
            case.direct_body,
            loadgen.JSON_HEADERS,
            clients=c,
            requests=n,
            h1=True,
            log_dir=tmp,
            watch=watch,
        )
        problems = loadgen.check_all_ok(r)
        if problems:
            raise BenchFailure("; ".join(problems))
        return r

    # Warm-up runs (discarded) also size the measured runs to about `seconds` each.
    warm_gw = gw_run(f"{tag}-gateway-warmup", 300 if c == 1 else 3000)
    warm_direct = direct_run(f"{tag}-direct-warmup", 2000 if c == 1 else 20000)
    n_gw = _count_for(warm_gw.rps, seconds, 1000, 200_000)
    n_direct = _count_for(warm_direct.rps, seconds / 2, 5000, 400_000)
    busy0 = system_busy_seconds()
    direct = direct_run(f"{tag}-direct", n_direct)
    busy1 = system_busy_seconds()
    gw = gw_run(f"{tag}-gateway", n_gw)
    busy2 = system_busy_seconds()
    # CPU used by everything other than the gateway, nginx and h2load (roughly: h2load is not watched,
    # so this is "h2load + other processes"); reported to spot a noisy machine.
    gw_cores = gw.cpu.get("gateway", 0.0) / gw.elapsed_s if gw.elapsed_s else math.nan
    out = {
        "rpc": case.rpc,
        "concurrency": c,
        "gateway_connections": case.clients,
        "streams_per_connection": streams,
        "gateway": gw.to_json(),
        "direct": direct.to_json(),
        "rps_ratio": gw.rps / direct.rps,
        "added_p50_ms": (gw.p50_us - direct.p50_us) / 1000,
        "added_p99_ms": (gw.p99_us - direct.p99_us) / 1000,
        "gateway_cpu_cores_busy": round(gw_cores, 2),
        "machine_cpu_cores_busy_gateway_run": round((busy2 - busy1) / gw.elapsed_s, 2) if gw.elapsed_s else None,
        "machine_cpu_cores_busy_direct_run": round((busy1 - busy0) / direct.elapsed_s, 2) if direct.elapsed_s else None,
    }
    log(
        f"{tag}: gateway {gw.rps:,.0f} req/s p50 {gw.p50_us / 1000:.3f} ms p99 {gw.p99_us / 1000:.3f} ms "
        f"({gw.cpu_us_per_request.get('gateway', math.nan):.0f} us CPU/call, {gw_cores:.2f} cores) | "
        f"direct {direct.rps:,.0f} req/s p50 {direct.p50_us / 1000:.3f} ms p99 {direct.p99_us / 1000:.3f} ms"
    )
    return out


def profile_gateway(
    case: Case, gateway: Gateway, ledger: Ledger, tmp: Path, seconds: float, out_dir: Path
) -> dict[str, Any]:
    """py-spy samples the gateway while h2load drives `case`; returns the hottest functions."""
    py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if py_spy is None:
        raise BenchFailure("--profile needs py-spy: .venv/bin/pip install py-spy")
    raw = out_dir / f"profile-{case.rpc}-c{case.concurrency}.txt"
    svg = out_dir / f"profile-{case.rpc}-c{case.concurrency}.svg"
    duration = max(3, int(seconds))
    spy_cmd = [
        py_spy,
        "record",
        "-p",
        str(gateway.proc.pid),
        "-d",
        str(duration),
        "-r",
        "250",
        "--nonblocking",
        "--threads",
        "--idle",
    ]
    spy_raw = subprocess.Popen(
        [*spy_cmd, "-f", "raw", "-o", str(raw)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    time.sleep(0.5)
    url = f"http://127.0.0.1:{gateway.port}{SERVICE}/{case.rpc}"
    streams = case.concurrency // case.clients
    r = loadgen.run_h2load(
        f"profile-{case.rpc}",
        url,
        case.grpc_body,
        loadgen.GRPC_HEADERS,
        clients=case.clients,
        streams_per_client=streams,
        duration_s=duration + 1,
        log_dir=tmp,
    )
    spy_raw.wait(timeout=60)
    ledger.expect(case.model, r.succeeded)
    try:
        ledger.verify("the profiled run")
    except BenchFailure as e:
        log(f"note: ledger check after the profiled run (time-based, may cut calls): {e}")
    subprocess.run([*spy_cmd[:-2], "-d", "3", "-f", "flamegraph", "-o", str(svg)], capture_output=True)
    return summarize_profile(raw)


def summarize_profile(raw: Path, top: int = 25) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks, for the busy thread."""
    per_thread: dict[str, int] = {}
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    lines = raw.read_text().splitlines()
    # the event loop thread is the one with asyncio frames; idle frames are dropped from the shares
    for line in lines:
        stack, _, count_s = line.rpartition(" ")
        frames = stack.split(";")
        n = int(count_s)
        thread = frames[0]
        per_thread[thread] = per_thread.get(thread, 0) + n
        if not any("run_forever" in f or "_run_once" in f for f in frames):
            continue
        if _idle(frames[-1]):
            continue
        total += n
        leaf = _short(frames[-1])
        self_t[leaf] = self_t.get(leaf, 0) + n
        for f in set(_short(f) for f in frames[1:]):
            incl[f] = incl.get(f, 0) + n
    pct = (lambda v: round(100 * v / total, 1)) if total else (lambda v: 0.0)
    return {
        "busy_samples_event_loop_thread": total,
        "samples_per_thread": per_thread,
        "self_top": [(f, pct(v)) for f, v in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]],
        "inclusive_top": [(f, pct(v)) for f, v in sorted(incl.items(), key=lambda kv: -kv[1])[: top * 2]],
        "raw": str(raw),
    }


def _short(frame: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py)"
    m = re.match(r"(.*) \((.*?):\d+\)$", frame)
    if not m:
        return frame
    func, path = m.groups()
    parts = Path(path).parts
    where = "/".join(parts[-2:]) if "site-packages" in path or "feather_grpc" in path else parts[-1]
    return f"{func} ({where})"


def _idle(frame: str) -> bool:
    return frame.startswith(
        (
            "select (selectors.py",
            "_run_once (asyncio/base_events.py",
            "poll (selectors.py",
            "epoll",
            "wait (threading.py",
        )
    )


# ---- report ----


def _f(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def render(results: dict[str, Any]) -> str:
    rows = results["cases"]
    lines = []
    head = (
        f"{'RPC':<11}{'conc':>5} | {'gateway/s':>10}{'direct/s':>10}{'ratio':>7} | "
        f"{'p50 gw':>8}{'p50 dir':>8}{'added':>8} | {'p99 gw':>8}{'p99 dir':>8}{'added':>8} | {'gw CPU':>8}"
    )
    lines += [
        "latency in ms; ratio = gateway req/s / direct req/s; gw CPU = gateway CPU per call (us)",
        head,
        "-" * len(head),
    ]
    for r in rows:
        gw, d = r["gateway"], r["direct"]
        conc = f"{r['concurrency']}"
        if r.get("variant"):
            conc += "*"
        lines.append(
            f"{r['rpc']:<11}{conc:>5} | {gw['rps']:>10,.0f}{d['rps']:>10,.0f}{r['rps_ratio']:>7.3f} | "
            f"{gw['p50_us'] / 1000:>8.3f}{d['p50_us'] / 1000:>8.3f}{r['added_p50_ms']:>8.3f} | "
            f"{gw['p99_us'] / 1000:>8.3f}{d['p99_us'] / 1000:>8.3f}{r['added_p99_ms']:>8.3f} | "
            f"{gw['cpu_us_per_request'].get('gateway', math.nan):>8.0f}"
        )
    if any(r.get("variant") for r in rows):
        lines.append("* " + "; ".join(sorted({r["variant"] for r in rows if r.get("variant")})))
    t = results.get("ttft")
    if t:
        lines += [
            "",
            f"TTFT (c1, {t['samples']} alternating samples, upstream holds the rest {t['hold_ms']:g} ms): "
            f"gateway p50 {_f(t['gateway_p50_ms'])} ms / direct p50 {_f(t['direct_p50_ms'])} ms -> "
            f"overhead {_f(t['overhead_p50_ms'])} ms (ratio {_f(t['ratio_p50'], 2)}x); "
            f"p99 {_f(t['gateway_p99_ms'])} / {_f(t['direct_p99_ms'])} ms",
        ]
    lines += ["", "targets:"]
    for tg in results["targets"]:
        lines.append(f"  [{'PASS' if tg['pass'] else 'FAIL'}] {tg['name']}: {tg['measured']} (target {tg['target']})")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    by = {(r["rpc"], r["concurrency"]): r for r in results["cases"] if not r.get("variant")}
    out = []
    chat64 = by.get(("Chat", 64))
    if chat64:
        rps = chat64["gateway"]["rps"]
        out.append(
            {
                "name": "Chat calls/s at concurrency 64",
                "measured": f"{rps:,.0f}/s",
                "target": f">= {TARGET_CHAT_RPS:,.0f}/s",
                "pass": rps >= TARGET_CHAT_RPS,
            }
        )
    for rpc in ("Chat", "StreamChat"):
        r = by.get((rpc, 1))
        if r:
            added = r["added_p50_ms"]
            out.append(
                {
                    "name": f"{rpc} added p50 latency at concurrency 1",
                    "measured": f"{added:.3f} ms",
                    "target": f"<= {TARGET_ADDED_P50_MS:g} ms",
                    "pass": added <= TARGET_ADDED_P50_MS,
                }
            )
    t = results.get("ttft")
    if t:
        o = t["overhead_p50_ms"]
        out.append(
            {
                "name": "TTFT overhead (p50, concurrency 1)",
                "measured": f"{o:.3f} ms",
                "target": f"<= {TARGET_TTFT_OVERHEAD_MS:g} ms",
                "pass": o <= TARGET_TTFT_OVERHEAD_MS,
            }
        )
    return out


# ---- main ----


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="length of each measured gateway run (default 6)")
    parser.add_argument(
        "--ledger", choices=("sqlite", "memory"), default="sqlite", help="gateway ledger (default sqlite)"
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop of the gateway process (uvloop: pip install uvloop into the venv)",
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
        "--multiplexed",
        action="store_true",
        help="also run Chat at concurrency 64 as 64 streams on one HTTP/2 connection",
    )
    parser.add_argument("--no-ttft", action="store_true", help="skip the time-to-first-token measurement")
    parser.add_argument("--ttft-samples", type=int, default=300)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="afterwards, profile the gateway with py-spy under Chat c64 (and StreamChat c64)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json", help="results file")
    parser.add_argument("--strict", action="store_true", help="exit 3 when a target is missed")
    args = parser.parse_args(argv)

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
            "load": "h2load, 1 thread; gateway: HTTP/2 gRPC, 1 stream per connection; direct: HTTP/1.1 keep-alive",
            "seconds_per_gateway_run": args.seconds,
        },
        "cases": [],
    }
    log(
        f"{results['machine']['cpu_model']}, {results['machine']['cpus']} CPUs, load average "
        f"{' '.join(f'{x:.2f}' for x in results['machine']['loadavg_at_start'])}"
    )
    failure: str | None = None
    with tempfile.TemporaryDirectory(prefix="feather-bench-") as t:
        tmp = Path(t)
        nginx = upstream.Nginx(upstream.free_port(), tmp / "nginx").start()
        gateway: Gateway | None = None
        ledger: Ledger | None = None
        try:
            cfg_path = tmp / "feather.config.json"
            cfg_path.write_text(json.dumps(gateway_config(nginx.url, args.ledger, tmp / "bench.db"), indent=2))
            gateway = Gateway(cfg_path, upstream.free_port(), tmp / "gateway.log", args.loop, extra_env)
            gateway.wait_ready()
            log(
                f"upstream {nginx.url} (nginx pids {nginx.pids()}), gateway 127.0.0.1:{gateway.port} "
                f"(pid {gateway.proc.pid}, ledger {args.ledger}, loop {args.loop})"
            )
            smoke_test(gateway.port)
            ledger = Ledger(gateway.port)
            ledger.expect(upstream.MODEL_CHAT, 1)
            ledger.expect(upstream.MODEL_STREAM, 1)
            ledger.verify("the smoke test")

            bodies: dict[str, tuple[Path, Path, str]] = {}
            for rpc, model, make_grpc, stream in (
                ("Chat", upstream.MODEL_CHAT, loadgen.grpc_chat_body, False),
                ("StreamChat", upstream.MODEL_STREAM, loadgen.grpc_stream_body, True),
            ):
                g, d = tmp / f"{rpc}.grpc", tmp / f"{rpc}.json"
                g.write_bytes(make_grpc(model))
                d.write_bytes(loadgen.openai_body(model, stream=stream))
                bodies[rpc] = (g, d, model)
            cases = [
                Case(rpc, c, bodies[rpc][2], bodies[rpc][0], bodies[rpc][1], clients=c)
                for rpc in ("Chat", "StreamChat")
                if args.only in (None, rpc)
                for c in (1, 64)
            ]
            for case in cases:
                results["cases"].append(measure_case(case, gateway, nginx, ledger, tmp, args.seconds))
            if args.multiplexed and args.only in (None, "Chat"):
                case = Case("Chat", 64, bodies["Chat"][2], bodies["Chat"][0], bodies["Chat"][1], clients=1)
                r = measure_case(case, gateway, nginx, ledger, tmp, args.seconds, "-1conn")
                r["variant"] = "gateway side: 64 concurrent streams on 1 HTTP/2 connection"
                results["cases"].append(r)
            if not args.no_ttft:
                log(f"TTFT: {args.ttft_samples} samples each way, alternating")
                tr = ttft.measure(nginx.port, gateway.port, samples=args.ttft_samples)
                ledger.expect(upstream.MODEL_TTFT, tr.samples + 30)
                ledger.verify("the TTFT samples")
                results["ttft"] = tr.to_json()
            results["ledger_final"] = ledger.counts()
            if args.profile:
                prof_dir = args.out.parent
                prof_dir.mkdir(parents=True, exist_ok=True)
                results["profile"] = {}
                for rpc in ("Chat", "StreamChat"):
                    if args.only not in (None, rpc):
                        continue
                    log(f"profiling the gateway under {rpc} c64 with py-spy")
                    case = Case(rpc, 64, bodies[rpc][2], bodies[rpc][0], bodies[rpc][1], clients=64)
                    results["profile"][rpc] = profile_gateway(case, gateway, ledger, tmp, args.seconds, prof_dir)
        except (BenchFailure, loadgen.LoadgenError) as e:
            failure = str(e)
            if gateway is not None:
                failure += f"\n--- gateway log (tail) ---\n{gateway.log_tail()}"
        finally:
            if ledger is not None:
                ledger.close()
            if gateway is not None:
                gateway.stop()
            nginx.stop()

    results["duration_s"] = round(time.monotonic() - started, 1)
    results["targets"] = targets(results)
    if failure:
        results["failure"] = failure
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print()
    print(render(results))
    if "profile" in results:
        for rpc, p in results["profile"].items():
            print(f"\nprofile, {rpc} c64 (event-loop thread, {p['busy_samples_event_loop_thread']} busy samples):")
            print("  inclusive:", ", ".join(f"{f} {v}%" for f, v in p["inclusive_top"][:20]))
            print("  self:     ", ", ".join(f"{f} {v}%" for f, v in p["self_top"][:12]))
    print(f"\nresults: {args.out} ({results['duration_s']} s)")
    if failure:
        print(f"\nBENCHMARK FAILED: {failure}", file=sys.stderr)
        return 1
    if args.strict and not all(t["pass"] for t in results["targets"]):
        return 3
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
