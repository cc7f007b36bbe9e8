"""h2load as the load generator: request bodies, one run, its summary and per-request percentiles.

h2load is C (nghttp2); it speaks HTTP/2 (so gRPC, given a framed body and the gRPC headers) and, with
`--h1`, HTTP/1.1 keep-alive. It prints only min/max/mean latency, so every run writes `--log-file`
(one line per request: start µs, HTTP status, µs until the end of the response) and the percentiles
are computed here from all requests of the run.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import upstream

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")
JSON_HEADERS = ("content-type: application/json",)
_TICKS = os.sysconf("SC_CLK_TCK")


# ---- request bodies ----


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message: compressed flag 0, 4-byte big-endian length, the message."""
    return b"\x00" + len(message).to_bytes(4, "big") + message


def grpc_chat_body(model: str) -> bytes:
    from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb

    req = pb.ChatRequest(model=model, messages=[pb.Message(role=pb.ROLE_USER, content=upstream.PROMPT)])
    return grpc_frame(req.SerializeToString())


def grpc_stream_body(model: str) -> bytes:
    from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb

    req = pb.StreamChatRequest(model=model, messages=[pb.Message(role=pb.ROLE_USER, content=upstream.PROMPT)])
    return grpc_frame(req.SerializeToString())


def openai_body(model: str, *, stream: bool) -> bytes:
    """The JSON the gateway's openai-compatible adapter sends for the same request (byte for byte
    the same fields: model, messages, and for streams `stream` + `stream_options.include_usage`)."""
    import json

    body: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": upstream.PROMPT}]}
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return json.dumps(body, separators=(",", ":")).encode()


# ---- CPU accounting ----


def system_busy_seconds() -> float:
    """CPU seconds all CPUs together spent not idle so far (to see what else ran during a measurement)."""
    parts = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in parts[:8])
    return (user + nice + system + irq + softirq + steal) / _TICKS


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def thread_cpu(pid: int) -> dict[int, float]:
    """CPU seconds so far of each thread of `pid`."""
    out: dict[int, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            fields = Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[int(tid)] = (int(fields[11]) + int(fields[12])) / _TICKS
    return out


def thread_names(pid: int) -> dict[int, str]:
    """Python thread names by OS thread id, from `py-spy dump` when py-spy is there (else /proc comm)."""
    names: dict[int, str] = {}
    for tid in thread_cpu(pid):
        with contextlib.suppress(OSError):
            names[tid] = Path(f"/proc/{pid}/task/{tid}/comm").read_text().strip()
    py_spy = shutil.which("py-spy", path=os.path.dirname(sys.executable)) or shutil.which("py-spy")
    if py_spy:
        try:
            dump = subprocess.run([py_spy, "dump", "-p", str(pid)], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.TimeoutExpired):
            dump = ""
        for m in re.finditer(r'^Thread (\d+) \([^)]*\): "([^"]+)"', dump, re.MULTILINE):
            names[int(m.group(1))] = m.group(2)
    return names


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU of these processes (all their threads) so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / _TICKS


# ---- one run ----


@dataclass
class RunResult:
    label: str
    url: str
    protocol: str  # "h2" | "h1"
    clients: int
    streams_per_client: int
    requests: int
    succeeded: int
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    elapsed_s: float
    rps: float
    p50_us: float
    p90_us: float
    p99_us: float
    mean_us: float
    max_us: float
    cpu: dict[str, float] = field(default_factory=dict)  # process name -> CPU seconds during the run
    cpu_us_per_request: dict[str, float] = field(default_factory=dict)
    threads_cpu_s: dict[int, float] = field(default_factory=dict)  # per thread of `threads_of`, CPU seconds
    h2load_cores: float = 0.0  # CPU h2load used, in cores (CPU seconds / elapsed)
    other_load_cores: float = 0.0  # CPU everything else on the machine used meanwhile, in cores
    command: str = ""
    started: int = 0  # requests h2load sent; more than `requests` done when a timed run (-D) stops mid-call

    @property
    def concurrency(self) -> int:
        return self.clients * self.streams_per_client

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class LoadgenError(RuntimeError):
    pass


def have_h2load() -> bool:
    return shutil.which("h2load") is not None


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return float(sorted_values[rank - 1])


_RE_FINISHED = re.compile(r"finished in ([\d.]+)(us|ms|s), ([\d.]+) req/s")
_RE_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout"
)
_RE_STATUS = re.compile(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx")


def run_h2load(
    label: str,
    url: str,
    body_file: Path,
    headers: tuple[str, ...],
    *,
    clients: int,
    streams_per_client: int = 1,
    requests: int | None = None,
    duration_s: float | None = None,
    h1: bool = False,
    log_dir: Path,
    watch: dict[str, list[int]] | None = None,
    threads_of: int | None = None,
    timeout_s: float = 300.0,
) -> RunResult:
    """One h2load run: `requests` in total, or for `duration_s` seconds. `watch` maps a name to the pids
    whose CPU time is measured over the run."""
    log_file = log_dir / f"{label}.log"
    cmd = ["h2load", "-c", str(clients), "-m", str(streams_per_client), "-t", "1", "-d", str(body_file)]
    if requests is not None:
        cmd += ["-n", str(max(requests, clients))]
    elif duration_s is not None:
        cmd += ["-D", f"{round(duration_s * 1000)}ms"]  # h2load takes whole units
    for h in headers:
        cmd += ["-H", h]
    if h1:
        cmd.append("--h1")
    cmd += ["--log-file", str(log_file), url]
    watch = watch or {}
    cpu_before = {name: cpu_seconds(pids) for name, pids in watch.items()}
    children_before, busy_before = _children_cpu(), system_busy_seconds()
    threads_before = thread_cpu(threads_of) if threads_of else {}
    started = time.monotonic()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        raise LoadgenError(f"{label}: h2load did not finish within {timeout_s}s") from e
    wall = time.monotonic() - started
    cpu = {name: cpu_seconds(pids) - cpu_before[name] for name, pids in watch.items()}
    h2load_cpu = _children_cpu() - children_before
    threads_after = thread_cpu(threads_of) if threads_of else {}
    threads = {tid: round(t - threads_before.get(tid, 0.0), 3) for tid, t in threads_after.items()}
    other_cpu = max(0.0, system_busy_seconds() - busy_before - h2load_cpu - sum(cpu.values()))
    out = proc.stdout
    if proc.returncode != 0:
        raise LoadgenError(f"{label}: h2load exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    m_fin, m_req, m_status = _RE_FINISHED.search(out), _RE_REQUESTS.search(out), _RE_STATUS.search(out)
    if not (m_fin and m_req and m_status):
        raise LoadgenError(f"{label}: cannot parse h2load output:\n{out}\n{proc.stderr}")
    value, unit = float(m_fin.group(1)), m_fin.group(2)
    elapsed = value / {"us": 1e6, "ms": 1e3, "s": 1.0}[unit]
    total, started_n, _done, succeeded, failed, errored, timeouts = (int(g) for g in m_req.groups())
    latencies: list[int] = []
    statuses: dict[str, int] = {}
    for line in log_file.read_text().splitlines():
        parts = line.split("\t")
        if len(parts) < 3:
            continue
        statuses[parts[1]] = statuses.get(parts[1], 0) + 1
        latencies.append(int(parts[2]))
    latencies.sort()
    log_file.unlink()  # they get large; the percentiles are kept
    done = len(latencies)
    return RunResult(
        label=label,
        url=url,
        protocol="h1" if h1 else "h2",
        clients=clients,
        streams_per_client=streams_per_client,
        requests=total,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeouts,
        status_2xx=int(m_status.group(1)),
        elapsed_s=elapsed,
        rps=float(m_fin.group(3)),
        p50_us=percentile(latencies, 50),
        p90_us=percentile(latencies, 90),
        p99_us=percentile(latencies, 99),
        mean_us=sum(latencies) / done if done else math.nan,
        max_us=float(latencies[-1]) if latencies else math.nan,
        cpu={k: round(v, 3) for k, v in cpu.items()},
        cpu_us_per_request={k: round(v / succeeded * 1e6, 1) if succeeded else math.nan for k, v in cpu.items()},
        threads_cpu_s=threads,
        h2load_cores=round(h2load_cpu / wall, 2),
        other_load_cores=round(other_cpu / wall, 2),
        command=" ".join(cmd) + f"  # wall {wall:.2f}s",
        started=started_n,
    )


def check_all_ok(result: RunResult) -> list[str]:
    """What h2load itself saw go wrong (it cannot see grpc-status; the caller checks that separately)."""
    problems = []
    if result.failed or result.errored or result.timeout:
        problems.append(
            f"{result.label}: h2load counted {result.failed} failed, {result.errored} errored, "
            f"{result.timeout} timed out of {result.requests}"
        )
    if result.status_2xx != result.succeeded or result.succeeded != result.requests:
        problems.append(f"{result.label}: {result.status_2xx} responses were 2xx of {result.requests} requests")
    return problems
