"""Held streams: how many open streams one gateway process holds, what each costs, and what a new call sees.

LLM streams are long, so a gateway's real limit is how many calls it holds open at once. This scenario
opens N StreamChat calls (ramped over --ramp seconds) against an upstream that sends one content chunk
every --interval seconds for --chunks chunks, and while they are all open it starts a new probe call
every --probe-every seconds and times its first token. It reports:

- the gateway's RSS idle (before), at the peak (all streams open) and after the load (streams ended,
  --settle seconds later), and the memory per open stream = (peak - idle) / streams held;
- new-call time to first token, p50/p99 (probe calls started while the streams are held);
- the shed count: calls refused RESOURCE_EXHAUSTED OVERLOADED (explicit saturation, with RetryInfo);
- the lost count: calls the client saw end (in any way) without a ledger row. It must be 0;
- every other status the clients saw, and the gateway's CPU over the hold.

Processes: the upstream (a small uvloop HTTP/1.1 server, `--role upstream`), the gateway (`feather-grpc
serve`, SQLite ledger in a temporary directory, response cache off, the provider's maxConnections raised
above the stream count so that the pool is not what is measured), --holders client processes holding the
streams, and one probe process. With --pin (the default on a machine with 2 CPUs or more) the server under
test gets the first CPU this bench may use and every other process (the upstream, holders, probe and this
orchestrator) the others, so "on one core" is measured as one core and the rig does not compete with what
it measures; the JSON names each role's CPUs and the rig's own CPU use during the hold.

    .venv/bin/python bench/held_streams.py --streams 1000 --interval 0.2 --ramp 5 --hold 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODEL = "held"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sse(doc: dict[str, Any]) -> bytes:
    data = b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"
    return b"%x\r\n%s\r\n" % (len(data), data)


def _chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return _sse({"id": "c", "object": "chat.completion.chunk", "created": 1, "model": MODEL, "choices": [choice]})


# ---- the upstream: one content chunk every `interval` seconds -------------------------------------------

_TICK_S = 0.005


async def upstream_main(port: int, chunks: int, interval: float) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
    first = head + _chunk({"role": "assistant", "content": ""}) + _chunk({"content": "tok "})
    piece = _chunk({"content": "tok "})
    usage = {"prompt_tokens": 10, "completion_tokens": chunks + 1, "total_tokens": chunks + 11}
    tail = (
        _chunk({}, "stop")
        + _sse({"id": "c", "object": "chat.completion.chunk", "created": 1, "choices": [], "usage": usage})
        + b"%x\r\n%s\r\n" % (len(b"data: [DONE]\n\n"), b"data: [DONE]\n\n")
        + b"0\r\n\r\n"
    )

    # One ticker for every stream instead of a timer and a task wake-up per chunk: at 2,000 streams the
    # upstream sends 10,000 chunks/s from the rig's one core, and the rig must not be what is measured.
    # A stream joins the slot the ticker has just served, so its chunks come every `interval` (to the
    # tick, _TICK_S) from its request, as a sleep per chunk had them.
    slots = max(1, round(interval / _TICK_S))
    due: list[list[tuple[asyncio.StreamWriter, list[int], asyncio.Future[None]]]] = [[] for _ in range(slots)]
    served = [0]  # the last tick served
    loop = asyncio.get_running_loop()

    async def tick() -> None:
        start = loop.time()
        while True:
            n = served[0] + 1
            await asyncio.sleep(max(0.0, start + n * _TICK_S - loop.time()))
            served[0] = n
            kept = []
            for writer, left, done in due[n % slots]:
                if writer.is_closing():  # the gateway let go (a probe call keeps only its first token)
                    done.set_result(None)
                    continue
                left[0] -= 1
                if left[0] > 0:
                    writer.write(piece)
                    kept.append((writer, left, done))
                else:
                    writer.write(piece + tail)
                    done.set_result(None)
            due[n % slots] = kept

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head_bytes = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head_bytes.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                writer.write(first)
                done: asyncio.Future[None] = loop.create_future()
                due[served[0] % slots].append((writer, [chunks], done))
                await done
                if writer.is_closing():
                    return
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    ticker = asyncio.create_task(tick())
    server = await asyncio.start_server(serve, "127.0.0.1", port, backlog=4096)
    print(json.dumps({"ready": True}), flush=True)
    async with server:
        await server.serve_forever()
    ticker.cancel()


async def start_upstream(chunks: int, interval: float) -> tuple[asyncio.subprocess.Process, int]:
    """For the in-process benches (stream_path.py, held_memory.py): this bench's upstream as a child process
    that dies with the caller, once it is ready, and its port."""
    port = _free_port()
    upstream = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--role", "upstream", "--port", str(port), "--chunks", str(chunks),
        "--interval", str(interval), stdout=subprocess.PIPE, preexec_fn=_die_with_us,
    )  # fmt: skip
    assert upstream.stdout is not None
    await upstream.stdout.readline()  # ready
    return upstream, port


def in_process_config(upstream_port: int, streams: int, **provider: Any) -> dict[str, Any]:
    """A gateway config for that upstream: pool above the stream count, no cache, shedding off, a SQLite
    ledger in a temporary directory; `provider` adds to the provider's settings."""
    return {
        "providers": {
            "up": {
                "type": "openai-compatible",
                "baseUrl": f"http://127.0.0.1:{upstream_port}/v1",
                "maxConnections": max(2 * streams, 1000),
                "models": [{"name": MODEL, "inputPer1M": 0.15, "outputPer1M": 0.6}],
                **provider,
            }
        },
        "cache": {"enabled": False},
        "ledger": {"type": "sqlite", "path": str(Path(tempfile.mkdtemp()) / "usage.db")},
        "server": {"host": "127.0.0.1", "maxLoopLagMs": 0, "maxInFlight": 0},
    }


# ---- the clients --------------------------------------------------------------------------------------


def _client_imports() -> tuple[Any, Any, Any]:
    import grpc

    from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
    from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc

    return grpc, pb, pb_grpc


def _reason(err: Any) -> str:
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    if status is not None:
        from google.rpc import error_details_pb2

        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                return f"{err.code().name}/{info.reason}"
    return str(err.code().name)


async def holder_main(address: str, prefix: str, count: int, ramp: float, per_channel: int, interval: float) -> None:
    """Opens `count` streams evenly over `ramp` seconds, reads each to its end; prints one JSON summary.
    Messages are received as bytes and parsed only until a stream's first delta (its TTFT): the holders
    receive 10,000 messages/s at 2,000 streams, and a protobuf parse each would make the rig, not the
    server, what is measured once it has one core of its own."""
    grpc, pb, _ = _client_imports()
    channels = [grpc.aio.insecure_channel(address) for _ in range(max(1, -(-count // per_channel)))]
    calls = [
        c.unary_stream(
            "/feather.v1.FeatherService/StreamChat",
            request_serializer=pb.StreamChatRequest.SerializeToString,
            response_deserializer=None,  # bytes as received
        )
        for c in channels
    ]
    outcomes: dict[str, str] = {}
    ttft: list[float] = []
    gaps: list[float] = []  # each stream's longest wait between two of its messages once it had one
    late = 0  # gaps over twice the upstream's interval, all streams
    opened = asyncio.Event()
    open_now = 0
    messages = 0

    async def one(i: int) -> None:
        nonlocal open_now, messages, late
        rid = f"{prefix}-{i}"
        t0 = time.perf_counter()
        request = pb.StreamChatRequest(model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="hi")])
        request.request_id = rid
        counted = False
        event = pb.StreamChatResponse()
        last = longest = 0.0
        try:
            async for raw in calls[i // per_channel](request):
                messages += 1
                now = time.perf_counter()
                if counted:
                    gap = now - last
                    longest = max(longest, gap)
                    late += gap > 2 * interval
                last = now
                if not counted:
                    event.ParseFromString(raw)
                    if event.HasField("delta"):
                        counted = True
                        open_now += 1
                        ttft.append(time.perf_counter() - t0)
            outcomes[rid] = "OK"
        except grpc.aio.AioRpcError as e:
            outcomes[rid] = _reason(e)
        if counted:
            gaps.append(longest)

    tasks = []
    start = time.perf_counter()
    for i in range(count):
        delay = start + ramp * i / max(count, 1) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(i)))
    opened.set()
    await asyncio.gather(*tasks)
    for c in channels:
        await c.close()
    print(json.dumps({"outcomes": outcomes, "held_ttft": ttft, "messages": messages, "gaps": gaps, "late": late}))


async def direct_first_token(upstream_port: int) -> float:
    """The reference: a new connection straight to the upstream, POST, until the first content chunk."""
    t0 = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", upstream_port)
    body = b'{"model":"held","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    buf = b""
    while b'"content":"tok' not in buf:
        data = await reader.read(65536)
        if not data:
            break
        buf += data
    elapsed = time.perf_counter() - t0
    writer.close()
    return elapsed


async def probe_main(address: str, delay: float, duration: float, every: float, upstream_port: int) -> None:
    """After `delay`, starts a new StreamChat every `every` seconds for `duration`; times its first token,
    and the same straight from the upstream (a new connection each time) as the same-run reference."""
    grpc, pb, pb_grpc = _client_imports()
    await asyncio.sleep(delay)
    outcomes: dict[str, str] = {}
    ttft: list[float] = []
    direct: list[float] = []
    # Each probe's wall-clock start and first token (s since the epoch), to split its wait at the moment the
    # gateway started the call (its ledger row's time_ns): before it, gRPC's queue; after it, the gateway.
    walls: dict[str, tuple[float, float]] = {}
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.FeatherServiceStub(channel)

        async def one(i: int) -> None:
            rid = f"probe-{i}"
            request = pb.StreamChatRequest(model=MODEL, messages=[pb.Message(role=pb.ROLE_USER, content="hi")])
            request.request_id = rid
            wall, t0 = time.time(), time.perf_counter()
            call = stub.StreamChat(request, timeout=60)
            try:
                async for event in call:
                    if event.HasField("delta") and event.delta.content:
                        ttft.append(time.perf_counter() - t0)
                        walls[rid] = (wall, wall + ttft[-1])
                        call.cancel()  # a probe needs only its first token
                        break
                outcomes[rid] = "OK(first token)"
            except grpc.aio.AioRpcError as e:
                outcomes[rid] = _reason(e)
            except asyncio.CancelledError:
                outcomes[rid] = "OK(first token)"

        async def reference() -> None:
            direct.append(await direct_first_token(upstream_port))

        tasks = []
        end = time.perf_counter() + duration
        i = 0
        while time.perf_counter() < end:
            tasks.append(asyncio.create_task(one(i)))
            tasks.append(asyncio.create_task(reference()))
            i += 1
            await asyncio.sleep(every)
        await asyncio.gather(*tasks)
    print(json.dumps({"outcomes": outcomes, "ttft": ttft, "direct": direct, "walls": walls}), flush=True)


# ---- the orchestration --------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_s(pid: int, thread: int | None = None) -> float:
    """CPU seconds of process `pid`, or of its thread `thread` only (the main thread: tid == pid)."""
    path = f"/proc/{pid}/stat" if thread is None else f"/proc/{pid}/task/{thread}/stat"
    fields = Path(path).read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


_ARENA_ALIGN = 64 << 20  # glibc's per-thread malloc heaps are mmapped at multiples of HEAP_MAX_SIZE (64 MB)


def rss_by_kind(pid: int) -> dict[str, float]:
    """RSS in MB by mapping kind, from /proc/PID/smaps: "heap" (glibc's main arena: the brk heap, where
    the event-loop thread's malloc and Python's small objects outside its arenas go), "thread_arenas"
    (glibc's per-thread arenas: gRPC's and other threads' malloc), "anon" (other anonymous mappings:
    CPython's 1 MB obmalloc arenas, large mallocs, thread stacks) and "files" (code and data of the
    executable and libraries)."""
    out = {"heap": 0.0, "thread_arenas": 0.0, "anon": 0.0, "files": 0.0}
    kind = "anon"
    try:
        lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        head, _, rest = line.partition(" ")
        if "-" in head and not head.endswith(":"):  # a mapping's first line: "start-end perms offset dev inode path"
            name = rest.split()[4:] if len(rest.split()) > 4 else []
            start = int(head.split("-")[0], 16)
            if name and name[0] == "[heap]":
                kind = "heap"
            elif name and not name[0].startswith("["):
                kind = "files"
            elif not name and start % _ARENA_ALIGN == 0:
                kind = "thread_arenas"
            else:
                kind = "anon"
        elif head == "Rss:":
            out[kind] += int(rest.split()[0]) / 1024
    return {k: round(v, 1) for k, v in out.items()}


def runqueue_wait_s(pid: int) -> float:
    """Seconds the thread `pid` (a process's main thread: its event loop) was runnable but waiting for a
    CPU, from the scheduler's own count: how much of "its core" something else took (0 where unknown)."""
    try:
        return int(Path(f"/proc/{pid}/task/{pid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return 0.0


def cpus_busy_s(cpus: list[int]) -> float:
    """Seconds the CPUs `cpus` were busy (any process, interrupts included), from /proc/stat."""
    total = 0.0
    for line in Path("/proc/stat").read_text().splitlines():
        name, *ticks = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(t) for t in ticks]
            total += sum(values) - values[3] - values[4]  # all but idle and iowait
    return total / os.sysconf("SC_CLK_TCK")


def machine_stalls_ms() -> dict[str, float]:
    """The machine's pressure stall totals (Linux PSI, /proc/pressure): for memory and io, how long some
    task, and all tasks, waited for it, in ms; empty where PSI is not available. A difference over the hold
    says whether a stall there was the machine's (reclaim, I/O) rather than the server's."""
    out: dict[str, float] = {}
    for resource in ("memory", "io"):
        try:
            lines = Path(f"/proc/pressure/{resource}").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            kind, *fields = line.split()
            out[f"{resource}_{kind}"] = int(dict(f.split("=") for f in fields)["total"]) / 1000
    return out


def _die_with_us() -> None:
    """In a child, before it runs: SIGTERM when this bench dies, so a killed run leaves no servers behind."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _in_child(cpus: set[int] | None) -> Any:
    """The child's set-up before it runs: die with this bench, and run on `cpus` (all its threads, since
    they are made after) when pinned."""

    def setup() -> None:
        _die_with_us()
        if cpus:
            os.sched_setaffinity(0, cpus)

    return setup


def _spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, __file__, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        bufsize=1,
        preexec_fn=_die_with_us,  # pinned or not, a rig process runs where this orchestrator may
    )


def pin_plan(pin: bool | None) -> dict[str, list[int]] | None:
    """With pinning (None: when this process may use 2 CPUs or more), the server under test gets the first
    CPU and the rig the rest. Returns {"server": [...], "rig": [...]}, or None when not pinned."""
    if not hasattr(os, "sched_getaffinity"):
        if pin:
            raise SystemExit("--pin needs os.sched_setaffinity (Linux); run with --no-pin")
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if pin is None:
        pin = len(cpus) >= 2
    if not pin:
        return None
    if len(cpus) < 2:
        raise SystemExit(f"--pin needs 2 CPUs or more, this process may use {cpus}; run with --no-pin")
    return {"server": cpus[:1], "rig": cpus[1:]}


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(opts: argparse.Namespace, arm: str = "gateway") -> dict[str, Any]:
    """One measurement. `arm`: "gateway" (this tree's), "floor-grpc" (bench/floor.py's paced mode: grpc.aio
    alone streaming the same deltas at the same rate, what the framework itself costs per message),
    "floor" (its bare grpc.aio + aiohttp proxy of the same upstream; neither floor keeps a ledger or
    sheds), or the path of another source tree whose gateway runs instead (e.g. main exported with
    `git archive`), for A/Bs."""
    tmp = Path(tempfile.mkdtemp(prefix="feather-held-"))
    pins: dict[str, list[int]] | None = opts.pins  # main() plans it once, before this process is pinned
    up_port, gw_port = _free_port(), _free_port()
    hold_s = opts.interval * opts.chunks
    upstream = _spawn(["--role", "upstream", "--port", str(up_port), "--chunks", str(opts.chunks),
                       "--interval", str(opts.interval)])  # fmt: skip
    assert upstream.stdout is not None and json.loads(upstream.stdout.readline())["ready"]
    db = tmp / "usage.db"
    server: dict[str, Any] = {"host": "127.0.0.1", "gracePeriodS": 2}
    if opts.max_loop_lag_ms is not None:
        server["maxLoopLagMs"] = opts.max_loop_lag_ms
    if opts.max_in_flight is not None:
        server["maxInFlight"] = opts.max_in_flight
    cfg = {
        "providers": {
            "up": {
                "type": "openai-compatible",
                "baseUrl": f"http://127.0.0.1:{up_port}/v1",
                "maxConnections": max(opts.streams * 2, 1000),
                "timeoutMs": int((hold_s + 60) * 1000),
                "models": [{"name": MODEL, "inputPer1M": 0.15, "outputPer1M": 0.6}],
            }
        },
        "cache": {"enabled": False},
        "ledger": {"type": "sqlite", "path": str(db)},
        "server": server,
    }
    (tmp / "config.json").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FEATHER_", "METRICS_", "OTEL_", "LOG_"))}
    metrics_port = _free_port()
    env.update(FEATHER_EVENT_LOOP=opts.loop, LOG_LEVEL="warning", METRICS_PORT=str(metrics_port))
    env.update(kv.split("=", 1) for kv in opts.gateway_env)
    log = (tmp / "gateway.log").open("w")
    if arm == "floor-grpc":
        command = [
            sys.executable,
            str(ROOT / "bench" / "floor.py"),
            "--mode",
            "paced",
            "--port",
            str(gw_port),
            "--chunks",
            str(opts.chunks),
            "--interval",
            str(opts.interval),
        ]
        command += (["--uvloop"] if opts.loop == "uvloop" else []) + ["--tune-gc"]
        source = ROOT
    elif arm == "floor":
        command = [
            sys.executable,
            str(ROOT / "bench" / "floor.py"),
            "--mode",
            "proxy",
            "--port",
            str(gw_port),
            "--upstream",
            f"http://127.0.0.1:{up_port}",
            "--connections",
            str(max(opts.streams * 2, 1000)),
        ]
        command += (["--uvloop"] if opts.loop == "uvloop" else []) + ["--tune-gc"]
        source = ROOT
    else:
        command = [
            sys.executable,
            "-m",
            "feather_grpc.cli",
            "serve",
            "--config",
            str(tmp / "config.json"),
            "--port",
            str(gw_port),
        ]
        source = ROOT if arm == "gateway" else Path(arm).resolve()
        env["PYTHONPATH"] = str(source)
    gateway = subprocess.Popen(
        command,
        cwd=source,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_in_child(set(pins["server"]) if pins is not None else None),
    )
    address = f"127.0.0.1:{gw_port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", gw_port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or gateway.poll() is not None:
                raise SystemExit(f"the gateway did not start: {(tmp / 'gateway.log').read_text()[-2000:]}") from None
            time.sleep(0.1)
    time.sleep(1.0)
    idle = rss_mb(gateway.pid)
    idle_kinds = rss_by_kind(gateway.pid)
    cpu0, t0 = cpu_s(gateway.pid), time.monotonic()
    loop0 = cpu_s(gateway.pid, gateway.pid)  # the event-loop thread alone: the one that cannot use a second core
    per = -(-opts.streams // opts.holders)
    holders = [
        _spawn(["--role", "holder", "--address", address, "--prefix", f"h{k}", "--count",
                str(min(per, opts.streams - k * per)), "--ramp", str(opts.ramp), "--per-channel",
                str(opts.per_channel), "--interval", str(opts.interval)])
        for k in range(opts.holders) if opts.streams - k * per > 0
    ]  # fmt: skip
    probe_window = max(hold_s - opts.ramp - 2 * opts.interval - 1, 1.0)
    probe = _spawn(["--role", "probe", "--address", address, "--delay", str(opts.ramp + 0.5), "--duration",
                    str(probe_window), "--every", str(opts.probe_every), "--port", str(up_port)])  # fmt: skip
    # The peak: after the ramp, while every stream is open (sampled through the hold, highest kept).
    peak = idle
    rig = [upstream, *holders, probe]
    stalls0 = machine_stalls_ms()
    # (time, rig CPU, server CPU, its loop's run-queue wait, its CPUs busy), once every stream is open
    rig0: tuple[float, float, float, float, float] | None = None
    while time.monotonic() < t0 + opts.ramp + probe_window:
        if time.monotonic() > t0 + opts.ramp:
            peak = max(peak, rss_mb(gateway.pid))
            if rig0 is None:
                rig0 = (
                    time.monotonic(),
                    sum(cpu_s(p.pid) for p in rig),
                    cpu_s(gateway.pid),
                    runqueue_wait_s(gateway.pid),
                    cpus_busy_s(pins["server"]) if pins is not None else 0.0,
                )
        time.sleep(0.25)
    stalls = {k: round(v - stalls0.get(k, 0.0), 1) for k, v in machine_stalls_ms().items()}
    cpu_hold = cpu_s(gateway.pid) - cpu0
    wall_hold = time.monotonic() - t0
    # The rig's CPU (upstream, holders, probe) and the server's over the same part of the hold: every
    # stream open. Pinned, the rig must stay below its CPUs' count, or it is the rig that is measured.
    # Whether the server's core was its own: the share of it that other processes and interrupts took
    # (on a shared machine, others' processes scheduled there), and how long its loop thread waited to run
    # (behind those, or behind its own process's other threads: gRPC's, the ledger's).
    rig_cores = server_cores_held = loop_wait = others = None
    if rig0 is not None:
        wall = time.monotonic() - rig0[0]
        rig_cores = round((sum(cpu_s(p.pid) for p in rig) - rig0[1]) / wall, 2)
        server_cpu = cpu_s(gateway.pid) - rig0[2]
        server_cores_held = round(server_cpu / wall, 2)
        loop_wait = round((runqueue_wait_s(gateway.pid) - rig0[3]) / wall, 2)
        if pins is not None:
            others = round(max(0.0, cpus_busy_s(pins["server"]) - rig0[4] - server_cpu) / wall, 2)
    results = []
    for p in [*holders, probe]:
        out, _ = p.communicate(timeout=hold_s + 120)
        results.append(json.loads(out.strip().splitlines()[-1]))
    cpu_all = cpu_s(gateway.pid) - cpu0  # the whole load: every stream opened, streamed and ended
    loop_all = cpu_s(gateway.pid, gateway.pid) - loop0
    import urllib.request

    ttft_buckets = []
    gc_pauses: dict[str, dict[str, float]] = {}  # generation -> {le: collections that took at most le seconds}
    lateness: dict[str, float] = {}  # le -> loop-lag samples at most le seconds late
    waits: dict[str, float] = {}  # le -> the gateway's probes to itself that took at most le seconds
    # One scrape, once the load is over: the gateway's histograms keep every sample, so it is not scraped
    # during the load, which the floors (no metrics) would be spared.
    if not arm.startswith("floor"):
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
            scraped = reply.read().decode().splitlines()
        ttft_buckets = [line for line in scraped if line.startswith("feather_time_to_first_token_seconds_bucket")]
        for line in scraped:
            labels, _, value = line.rpartition(" ")
            le = labels.split('le="')[1].split('"')[0] if 'le="' in labels else ""
            if line.startswith("feather_event_loop_lateness_seconds_bucket"):
                lateness[le] = float(value)
            elif line.startswith("feather_new_call_wait_seconds_bucket"):
                waits[le] = float(value)
            elif line.startswith("feather_gc_pause_seconds_bucket"):
                generation = labels.split('generation="')[1].split('"')[0]
                gc_pauses.setdefault(generation, {})[le] = float(value)
    # RSS each second after the load: the gateway's trimmer acts once nothing has been in flight across a
    # whole check (5 s), so when memory comes back matters as much as how much.
    trace = []
    settle_end = time.monotonic() + opts.settle
    while (left := settle_end - time.monotonic()) > 0:
        time.sleep(min(1.0, left))
        trace.append(round(rss_mb(gateway.pid), 1))
    after = rss_mb(gateway.pid)
    after_kinds = rss_by_kind(gateway.pid)
    gateway.terminate()
    gateway.wait(timeout=30)
    upstream.terminate()
    upstream.wait(timeout=10)

    seen: dict[str, str] = {}
    for r in results:
        seen.update(r["outcomes"])
    ttft = next(r["ttft"] for r in results if "ttft" in r)
    direct = next(r["direct"] for r in results if "direct" in r)
    held_ttft = [t for r in results for t in r.get("held_ttft", [])]
    gaps = [g for r in results for g in r.get("gaps", [])]
    rows: dict[str, str] = {}
    to_start: list[float] = []  # probes: from the client's call to the gateway's start of it
    from_start: list[float] = []  # ... and from there to the client's first token
    if not arm.startswith("floor"):  # the floor keeps no ledger: nothing to count as lost
        with sqlite3.connect(db) as conn:
            rows = dict(conn.execute("SELECT request_id, outcome || '/' || error_reason FROM usage_records").fetchall())
            probes = "SELECT request_id, time_ns FROM usage_records WHERE request_id LIKE 'probe-%'"
            started = dict(conn.execute(probes).fetchall())
        walls = next(r["walls"] for r in results if "walls" in r)
        for rid, (sent, token) in walls.items():
            if rid in started:
                to_start.append(started[rid] / 1e9 - sent)
                from_start.append(token - started[rid] / 1e9)
    lost = sorted(rid for rid in seen if rid not in rows) if not arm.startswith("floor") else []
    messages = sum(r.get("messages", 0) for r in results)
    held = [v for k, v in seen.items() if not k.startswith("probe")]
    statuses: dict[str, int] = {}
    for v in seen.values():
        statuses[v] = statuses.get(v, 0) + 1
    held_ok = held.count("OK")
    return {
        "arm": arm,
        "streams": opts.streams,
        "interval_s": opts.interval,
        "chunks": opts.chunks,
        "ramp_s": opts.ramp,
        "holders": opts.holders,
        "loop": opts.loop,
        "server": server,
        "cpus": pins or {"server": "unpinned", "rig": "unpinned"},
        "rss_idle_mb": round(idle, 1),
        "rss_peak_mb": round(peak, 1),
        "rss_after_mb": round(after, 1),
        "rss_kept_mb": round(after - idle, 1),  # after the load minus idle: what was not returned
        "rss_after_trace_mb": trace,
        "rss_idle_by_kind_mb": idle_kinds,
        "rss_after_by_kind_mb": after_kinds,
        "held_ok": held_ok,
        "kb_per_stream": round((peak - idle) * 1024 / held_ok, 1) if held_ok else None,
        "probe_calls": len(ttft),
        "ttft_p50_ms": round(_pct(ttft, 0.5) * 1000, 2),
        "ttft_p99_ms": round(_pct(ttft, 0.99) * 1000, 2),
        "ttft_max_ms": round(max(ttft) * 1000, 2) if ttft else None,
        # The probes' TTFT split where the gateway's engine started the call (its ledger row's time; one
        # clock): before it, gRPC's side (the call taken from core, its request read, each step a completion
        # through grpc.aio's poller and a loop turn or more) and the interceptor; after it, the gateway's part
        # (the upstream's first chunk, the messages out) and the way back to the client.
        "probe_wait_to_start_ms_p50": round(_pct(to_start, 0.5) * 1000, 2) if to_start else None,
        "probe_wait_to_start_ms_p99": round(_pct(to_start, 0.99) * 1000, 2) if to_start else None,
        "probe_start_to_token_ms_p50": round(_pct(from_start, 0.5) * 1000, 2) if from_start else None,
        "probe_start_to_token_ms_p99": round(_pct(from_start, 0.99) * 1000, 2) if from_start else None,
        "held_ttft_p50_ms": round(_pct(held_ttft, 0.5) * 1000, 2),
        "held_ttft_p99_ms": round(_pct(held_ttft, 0.99) * 1000, 2),
        # The held streams' own messages: each stream's longest wait between two of them (the upstream sends
        # one every interval), p99 and max over the streams, and how many waits, all streams, passed twice
        # the interval. A stall of the whole server shows here as well as in new calls' TTFT.
        "held_gap_ms_p99": round(_pct(gaps, 0.99) * 1000, 1),
        "held_gap_ms_max": round(max(gaps, default=0) * 1000, 1),
        "held_gaps_over_2x_interval": sum(r.get("late", 0) for r in results),
        "direct_ttft_p50_ms": round(_pct(direct, 0.5) * 1000, 2),
        "direct_ttft_p99_ms": round(_pct(direct, 0.99) * 1000, 2),
        "shed": sum(1 for v in seen.values() if v.endswith("/OVERLOADED")),
        "lost": len(lost),
        "lost_examples": lost[:5],
        "statuses": statuses,
        "gateway_cpu_cores_during_hold": round(cpu_hold / wall_hold, 2),
        "server_cores_all_open": server_cores_held,
        "rig_cores_all_open": rig_cores,
        "server_loop_runqueue_wait_share": loop_wait,
        "server_cpus_taken_by_others": others,  # cores' worth, pinned only
        # ms the machine stalled on memory or I/O during the ramp and the hold ("some" task / "full": all).
        "machine_stalls_ms": stalls,
        # CPU of the whole load (calls set up, streamed, ended) per message the holders received.
        "messages": messages,
        "cpu_us_per_message": round(cpu_all * 1e6 / messages, 1) if messages else None,
        "loop_thread_us_per_message": round(loop_all * 1e6 / messages, 1) if messages else None,
        # The gateway's own probes to itself (every 0.1 s under load) over the whole run: how many, and how
        # many waited past 100 ms and past the default shedding limit (500 ms).
        "self_probes": int(waits["+Inf"]) if waits else None,
        "self_probes_over_100ms": int(waits["+Inf"] - waits["0.1"]) if waits else None,
        "self_probes_over_500ms": int(waits["+Inf"] - waits["0.5"]) if waits else None,
        "ledger_rows": len(rows),
        # The gateway's garbage collections over the whole load (the hold and the streams' ends).
        "gc_collections": {g: int(b["+Inf"]) for g, b in sorted(gc_pauses.items())},
        "gc_full_collections": int(gc_pauses.get("2", {}).get("+Inf", 0)),
        "gc_pauses_over_50ms": int(sum(b["+Inf"] - b["0.05"] for b in gc_pauses.values())),
        # Every loop-lag sample (each 50 ms) over the whole load: a stall of the loop itself shows here,
        # whether or not a scrape of the gauge caught it.
        "loop_lag_samples_over_100ms": int(lateness["+Inf"] - lateness["0.1"]) if lateness else None,
        "loop_lag_samples_over_25ms": int(lateness["+Inf"] - lateness["0.025"]) if lateness else None,
        "gateway_ttft_histogram": [line.rpartition("le=")[2] for line in ttft_buckets],
        "machine_load_1m": os.getloadavg()[0],
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "mean_ttft_ms": round(statistics.fmean(ttft) * 1000, 2) if ttft else None,
        # The probes' TTFTs in the order they came: a stall shows as a run of falling values.
        "ttft_series_ms": [round(t * 1000) for t in ttft],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--role", default="main", choices=["main", "upstream", "holder", "probe"])
    ap.add_argument("--streams", type=int, default=1000)
    ap.add_argument("--interval", type=float, default=0.2, help="seconds between two chunks of a stream")
    ap.add_argument("--chunks", type=int, default=75, help="chunks per stream (its length: chunks x interval)")
    ap.add_argument("--ramp", type=float, default=5.0, help="seconds over which the streams are opened")
    ap.add_argument("--holders", type=int, default=2, help="client processes holding the streams")
    ap.add_argument("--per-channel", type=int, default=100, help="streams per client connection")
    ap.add_argument("--probe-every", type=float, default=0.1, help="seconds between two probe calls")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds after the load before RSS is read again")
    ap.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    ap.add_argument("--max-loop-lag-ms", type=int, help="the gateway's server.maxLoopLagMs (default: its own)")
    ap.add_argument("--max-in-flight", type=int, help="the gateway's server.maxInFlight (default: its own)")
    ap.add_argument("--json", help="also write the result to this file")
    ap.add_argument(
        "--pin",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the server under test on the first CPU, the rig on the others (default: on with 2 CPUs or more)",
    )
    ap.add_argument(
        "--arms",
        default="gateway",
        help="comma-separated servers measured in turn: gateway (this tree), floor-grpc (bench/floor.py's "
        "paced mode: grpc.aio streaming the same deltas at the same rate, no upstream), floor (its bare "
        "grpc.aio + aiohttp proxy), or the path of another source tree's gateway",
    )
    ap.add_argument("--rounds", type=int, default=1, help="times the arms are run, interleaved")
    ap.add_argument("--gateway-env", action="append", default=[], help="NAME=VALUE for the gateway (repeatable)")
    # Internal (child processes):
    ap.add_argument("--port", type=int)
    ap.add_argument("--address")
    ap.add_argument("--prefix")
    ap.add_argument("--count", type=int)
    ap.add_argument("--delay", type=float)
    ap.add_argument("--duration", type=float)
    ap.add_argument("--every", type=float)
    opts = ap.parse_args()
    if opts.role != "main":
        runner: Callable[[Coroutine[Any, Any, None]], None]
        try:
            import uvloop

            runner = uvloop.run
        except ImportError:
            runner = asyncio.run
        if opts.role == "upstream":
            runner(upstream_main(opts.port, opts.chunks, opts.interval))
        elif opts.role == "holder":
            runner(holder_main(opts.address, opts.prefix, opts.count, opts.ramp, opts.per_channel, opts.interval))
        else:
            runner(probe_main(opts.address, opts.delay, opts.duration, opts.every, opts.port))
        return
    opts.pins = pin_plan(opts.pin)
    if opts.pins is not None:  # this orchestrator and every rig process it starts (they inherit it)
        os.sched_setaffinity(0, opts.pins["rig"])
    arms = opts.arms.split(",")
    runs = []
    for _ in range(opts.rounds):
        for arm in arms:
            result = run(opts, arm)
            runs.append(result)
            print(json.dumps(result, indent=2), flush=True)
    if len(runs) > 1:  # one line per run, and each arm's CPU per message as a ratio to the first arm's
        print(f"{'arm':<12} {'held':>5} {'shed':>5} {'lost':>4} {'cores':>5} {'us/msg':>7} {'loop':>6} {'ratio':>6} "
              f"{'ttft p50':>9} {'ttft p99':>9} {'KB/stream':>9} {'rig':>5} {'wait':>5} {'other':>5}")  # fmt: skip
        for i, r in enumerate(runs):
            base = runs[i - i % len(arms)]["cpu_us_per_message"]
            ratio = r["cpu_us_per_message"] / base if base and r["cpu_us_per_message"] else float("nan")
            print(f"{Path(r['arm']).name[:12]:<12} {r['held_ok']:>5} {r['shed']:>5} {r['lost']:>4} "
                  f"{r['gateway_cpu_cores_during_hold']:>5} {r['cpu_us_per_message']:>7} "
                  f"{r['loop_thread_us_per_message']:>6} {ratio:>6.2f} "
                  f"{r['ttft_p50_ms']:>9} {r['ttft_p99_ms']:>9} {r['kb_per_stream']!s:>9} "
                  f"{r['rig_cores_all_open']!s:>5} {r['server_loop_runqueue_wait_share']!s:>5} "
                  f"{r['server_cpus_taken_by_others']!s:>5}")  # fmt: skip
    if opts.json:
        Path(opts.json).write_text(json.dumps(runs if len(runs) > 1 else runs[0], indent=2))


if __name__ == "__main__":
    main()
