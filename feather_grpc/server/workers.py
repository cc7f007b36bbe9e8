"""`feather-grpc serve --workers N`: N fresh gateway processes on one port (SO_REUSEPORT), supervised.

The supervisor never imports grpc: it starts each worker as a new interpreter (`python -m
feather_grpc.cli serve ...`), so no process is ever forked after gRPC is initialised. Each worker binds the
same host:port with `grpc.so_reuseport` and the kernel spreads incoming connections across them. Workers
share the SQLite ledger file (WAL + busy_timeout) and, with REDIS_URL, the Redis state. Worker i serves
metrics on METRICS_PORT + i and tags its log lines with `worker: i`.

SIGTERM or SIGINT to the supervisor is forwarded to every worker, which drains and exits. The supervisor
exits 0 when every worker exited 0; if a worker dies on its own, it stops the others and exits non-zero.
A worker whose supervisor dies receives SIGTERM (Linux parent-death signal) and drains too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from types import FrameType

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


def run_workers(count: int, serve_args: Sequence[str], env: Mapping[str, str] | None = None) -> int:
    """Runs `count` workers with `feather-grpc serve <serve_args>` until they all exit; returns the exit code."""
    env = dict(os.environ if env is None else env)
    env[SUPERVISOR_PID_ENV] = str(os.getpid())
    procs: dict[int, tuple[int, subprocess.Popen[bytes]]] = {}
    stopping = False
    failed: int | None = None

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
        for i in range(count):
            if stopping:
                break
            cmd = [sys.executable, "-m", "feather_grpc.cli", "serve", *serve_args]
            p = subprocess.Popen(cmd, env={**env, WORKER_INDEX_ENV: str(i)}, stdin=subprocess.DEVNULL)
            procs[p.pid] = (i, p)
            log.info("supervisor: worker %d started", i, extra={"worker": i, "worker_pid": p.pid})
        running = len(procs)
        while running:
            pid, status = os.wait()  # PEP 475: resumes after a signal handler runs
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
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        for _, p in procs.values():
            if p.returncode is None:
                p.kill()
                p.wait()
    return failed or 0
