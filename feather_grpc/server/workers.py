"""`feather-grpc serve --workers N`: N fresh gateway processes on one port (SO_REUSEPORT), supervised.

The supervisor never imports grpc: it starts each worker as a new interpreter (`python -m
feather_grpc.cli serve ...`), so no process is ever forked after gRPC is initialised. Each worker binds the
same host:port with `grpc.so_reuseport` and the kernel spreads incoming connections across them. With the
SQLite ledger, the supervisor first starts one ledger writer process (state.ledger_writer explains why one
writer): the workers send it their rows and read the file for Usage. With REDIS_URL they share the Redis
state. With METRICS_PORT the supervisor serves every worker's metrics on that one port, each sample
labelled `worker` (server.metrics_merge); each worker serves its own on a free loopback port it reports.
Worker i tags its log lines with `worker: i`.

SIGTERM or SIGINT to the supervisor is forwarded to every worker, which drains and exits; the ledger writer
stops after the last worker. The supervisor exits 0 when every process exited 0; if a worker or the
writer dies on its own, it stops the others and exits non-zero.
A worker whose supervisor dies receives SIGTERM (Linux parent-death signal) and drains too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from types import FrameType

from feather_grpc.core.settings import environ

log = logging.getLogger(__name__)

WORKER_INDEX_ENV = "FEATHER_WORKER_INDEX"  # set by the supervisor in each worker's environment
SUPERVISOR_PID_ENV = "FEATHER_SUPERVISOR_PID"


def worker_index(env: Mapping[str, str]) -> int | None:
    raw = env.get(WORKER_INDEX_ENV)
    return int(raw) if raw else None


def die_with_parent(env: Mapping[str, str]) -> None:
    """In a worker: ask the kernel for SIGTERM when the supervisor dies, so no worker is orphaned."""
    supervisor = env.get(SUPERVISOR_PID_ENV)
    if not supervisor or not sys.platform.startswith("linux"):
        return
    import ctypes

    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGTERM))
    if os.getppid() != int(supervisor):  # it died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def cpu_count(cpu_max: str = "/sys/fs/cgroup/cpu.max") -> int:
    """The CPUs this process may use (`--workers auto`): its affinity set, capped by a container's CPU
    quota (cgroup v2 `cpu.max`, rounded up), not the machine's count."""
    try:
        cpus = len(os.sched_getaffinity(0)) or 1
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota
    return cpus


_WRITER_START_S = 30.0


def run_workers(
    count: int,
    serve_args: Sequence[str],
    env: Mapping[str, str] | None = None,
    *,
    ledger: tuple[str, str] | None = None,
    metrics: tuple[str, int] | None = None,
) -> int:
    """Runs `count` workers with `feather-grpc serve <serve_args>` until they all exit; returns the exit code.
    `ledger`: (path, synchronous) of the SQLite ledger, whose one writer process starts first.
    `metrics`: (host, port) of the merged metrics endpoint (port 0: a free one)."""
    env = environ() if env is None else dict(env)
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    procs: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}
    stopping = False
    failed: int | None = None
    writer: subprocess.Popen[bytes] | None = None
    socket_dir = ""
    closers: list[Callable[[], None]] = []

    def stop_all(signum: int, frame: FrameType | None = None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT) and not stopping:
            log.info("supervisor: stopping %d workers", sum(p.poll() is None for _, p in procs.values()))
        stopping = True
        for _, p in procs.values():
            if p.returncode is None:
                # os.kill, not Popen.send_signal: that polls, and could reap a child os.wait() is waiting for.
                # An unreaped child keeps its pid, so this never signals a stranger.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        if ledger is not None:
            from feather_grpc.state.ledger_writer import SOCKET_ENV

            socket_dir = tempfile.mkdtemp(prefix="feather-ledger-")  # 0700: only this user reaches the socket
            socket_path = os.path.join(socket_dir, "writer.sock")
            cmd = [sys.executable, "-m", "feather_grpc.server.workers", "ledger-writer", *ledger, socket_path]
            writer = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)
            deadline = time.monotonic() + _WRITER_START_S
            while not os.path.exists(socket_path):
                if writer.poll() is not None or time.monotonic() > deadline or stopping:
                    log.error("supervisor: the ledger writer did not start")
                    return 1
                time.sleep(0.01)  # the supervisor has nothing else to do yet
            log.info("supervisor: ledger writer started", extra={"worker_pid": writer.pid})
            env[SOCKET_ENV] = socket_path
        worker_env = [{**env, WORKER_INDEX_ENV: str(i)} for i in range(count)]
        if metrics is not None:
            from feather_grpc.server.metrics_merge import PORT_FILE_ENV, serve_merged

            host, port = metrics
            ports_dir = tempfile.mkdtemp(prefix="feather-metrics-")
            closers.append(lambda: shutil.rmtree(ports_dir, ignore_errors=True))
            port_files = [os.path.join(ports_dir, f"worker-{i}.port") for i in range(count)]
            try:
                merged, bound = serve_merged(host, port, port_files)
            except OSError as e:
                log.error("supervisor: cannot serve metrics on %s:%d (%s)", host, port, e.strerror)
                return 2
            closers.append(merged.shutdown)
            log.info("supervisor: metrics of all workers on %s:%d", host, bound, extra={"metrics_port": bound})
            for i, port_file in enumerate(port_files):
                worker_env[i].update({"METRICS_PORT": "0", "METRICS_HOST": "127.0.0.1", PORT_FILE_ENV: port_file})
        for i in range(count):
            if stopping:
                break
            cmd = [sys.executable, "-m", "feather_grpc.cli", "serve", *serve_args]
            p = subprocess.Popen(cmd, env=worker_env[i], stdin=subprocess.DEVNULL)
            procs[p.pid] = (i, p)
            log.info("supervisor: worker %d started", i, extra={"worker": i, "worker_pid": p.pid})
        running = len(procs)
        while running:
            pid, status = os.wait()  # PEP 475: resumes after a signal handler runs
            if writer is not None and pid == writer.pid:
                writer.returncode = os.waitstatus_to_exitcode(status)
                log.error("supervisor: the ledger writer exited with %d", writer.returncode)
                failed = failed or 1
                stop_all(0)
                continue
            if pid not in procs:
                continue
            i, p = procs[pid]
            p.returncode = code = os.waitstatus_to_exitcode(status)
            running -= 1
            if code == 0:
                log.info("supervisor: worker %d exited", i, extra={"worker": i, "worker_pid": pid})
                if not stopping:  # a worker does not stop on its own: treat it like a crash
                    failed = failed or 1
                    stop_all(0)
                continue
            log.error("supervisor: worker %d exited with %d", i, code, extra={"worker": i, "worker_pid": pid})
            failed = failed or (128 - code if code < 0 else code)
            stop_all(0)
        if writer is not None and writer.returncode is None:
            writer.send_signal(signal.SIGTERM)  # the last worker has recorded its last call
            if writer.wait() != 0:
                log.error("supervisor: the ledger writer exited with %d", writer.returncode)
                failed = failed or 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for p in [*(p for _, p in procs.values()), *([writer] if writer is not None else [])]:
            if p.returncode is None:
                p.kill()
                p.wait()
        if socket_dir:
            shutil.rmtree(socket_dir, ignore_errors=True)
        for close in reversed(closers):  # last opened, first closed
            close()
    return failed or 0


def _writer_main(path: str, synchronous: str, socket_path: str) -> int:
    """The ledger writer process (see state.ledger_writer)."""
    from feather_grpc.server.logs import configure_logging
    from feather_grpc.state.ledger_writer import serve_writer

    env = environ()
    configure_logging(env)
    die_with_parent(env)
    if synchronous not in ("NORMAL", "FULL"):
        raise SystemExit(f"synchronous must be NORMAL or FULL, not {synchronous!r}")
    asyncio.run(serve_writer(path, socket_path, "FULL" if synchronous == "FULL" else "NORMAL"))
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] != ["ledger-writer"] or len(sys.argv) != 5:
        raise SystemExit("usage: python -m feather_grpc.server.workers ledger-writer PATH SYNCHRONOUS SOCKET")
    sys.exit(_writer_main(*sys.argv[2:]))
