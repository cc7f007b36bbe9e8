"""A real, throwaway PostgreSQL server for tests and benchmarks.

The binaries come from the `pgserver` wheel (PostgreSQL 16, a dev dependency), located without
importing the package (its import-time side effects are not wanted here). `FEATHER_PG_BIN` names
another bin directory, and Debian's packages (`/usr/lib/postgresql/*/bin`) are the last resort.

The cluster lives in a fresh temp directory and listens on 127.0.0.1 at a free port chosen once,
so a `stop()` / `start()` pair simulates an outage and the same DSN works afterwards. PostgreSQL
refuses to run as root: under root the server runs as `nobody`, which then owns the directory.

    with PgServer() as pg:
        dsn = pg.create_database("feather")
        pg.stop()          # outage ("fast" shutdown; mode="immediate" is a crash)
        pg.start()
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from types import TracebackType

NOBODY_UID = 65534
_AS_USER = (
    "import os, sys; uid = int(sys.argv[1]); os.setgroups([]); os.setgid(uid); os.setuid(uid); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


def as_user(uid: int, argv: list[str]) -> list[str]:
    """`argv` run as `uid` (its group too, no others), by a Python child that drops to it and execs.
    subprocess's own `user=` forks (not vforks) this test process, and its gRPC threads' fork handlers can
    crash the child before the exec (pg_ctl "failed (-7)", SIGBUS, seen once in CI)."""
    return [sys.executable, "-c", _AS_USER, str(uid), *argv]


def find_bin_dir() -> Path:
    """Where initdb, pg_ctl and psql are: FEATHER_PG_BIN, the pgserver wheel, or Debian's packages."""
    candidates: list[Path] = []
    if os.environ.get("FEATHER_PG_BIN"):
        candidates.append(Path(os.environ["FEATHER_PG_BIN"]))
    spec = importlib.util.find_spec("pgserver")
    if spec is not None and spec.submodule_search_locations:
        candidates.extend(Path(p) / "pginstall" / "bin" for p in spec.submodule_search_locations)
    candidates.extend(sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))
    for candidate in candidates:
        if (candidate / "pg_ctl").is_file() and (candidate / "initdb").is_file():
            return candidate
    raise RuntimeError("no PostgreSQL binaries: pip install pgserver (the dev extra), or set FEATHER_PG_BIN")


def runnable_bin_dir(bin_dir: Path, uid: int) -> Path:
    """`bin_dir`, or a world-readable copy of its install if user `uid` cannot run it where it is
    (a checkout under a private home directory, say). The pgserver wheel's binaries find their
    libraries at `$ORIGIN/../../../pgserver.libs`, so the copy keeps that layout."""
    with contextlib.suppress(OSError):
        argv = as_user(uid, [str(bin_dir / "pg_ctl"), "--version"])
        if subprocess.run(argv, capture_output=True, check=False).returncode == 0:
            return bin_dir
    install = bin_dir.parent  # .../pgserver/pginstall
    package = install.parent
    libs = package.parent / f"{package.name}.libs"
    key = hashlib.sha256(f"{install.resolve()}:{(bin_dir / 'postgres').stat().st_mtime_ns}".encode()).hexdigest()[:16]
    target = Path(tempfile.gettempdir()) / f"feather-pginstall-{key}"
    if not target.exists():
        staging = Path(tempfile.mkdtemp(prefix="feather-pginstall-"))
        tree = staging / "tree"
        shutil.copytree(install, tree / package.name / install.name, symlinks=True)
        if libs.is_dir():
            shutil.copytree(libs, tree / libs.name, symlinks=True)
        os.chmod(tree, 0o755)
        with contextlib.suppress(OSError):  # another process may have won the race
            tree.rename(target)
        shutil.rmtree(staging, ignore_errors=True)
    return target / package.name / install.name / bin_dir.name


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class PgServer:
    """One PostgreSQL cluster in a temp directory. `start()` initialises it on first use."""

    def __init__(self, *, fsync: bool = False, port: int | None = None, settings: dict[str, str] | None = None) -> None:
        self._as_nobody = os.geteuid() == 0
        self.bin_dir = find_bin_dir()
        if self._as_nobody:
            self.bin_dir = runnable_bin_dir(self.bin_dir, NOBODY_UID)
        self.port = port or free_port()
        # Under root, somewhere `nobody` can reach: /tmp rather than a private TMPDIR.
        self.root = Path(tempfile.mkdtemp(prefix="feather-pg-", dir="/tmp" if self._as_nobody else None))
        self.data_dir = self.root / "data"
        self.log_file = self.root / "server.log"
        if self._as_nobody:
            os.chown(self.root, NOBODY_UID, NOBODY_UID)
        # fsync=off makes tests fast; a process crash (stop mode "immediate") still loses nothing,
        # because the kernel keeps what postgres wrote. Benchmarks pass fsync=True.
        self.settings = {
            "fsync": "on" if fsync else "off",
            "full_page_writes": "on" if fsync else "off",
            "max_connections": "200",
            "shared_buffers": "64MB",
            "listen_addresses": "127.0.0.1",
            "unix_socket_directories": str(self.root),
            **(settings or {}),
        }
        self._initialised = False
        self._started_once = False

    @property
    def running(self) -> bool:
        return self._ctl("status", check=False).returncode == 0

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def start(self) -> None:
        if not self._initialised:
            self._run(
                [
                    str(self.bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ]
            )
            self._initialised = True
        options = " ".join(f"-c {name}={value}" for name, value in self.settings.items())
        for attempt in range(3):
            try:
                self._ctl("start", "-w", "-t", "60", "-l", str(self.log_file), "-o", f"-p {self.port} {options}")
                break
            except RuntimeError:
                # The free port may have been taken since it was picked: before the first start, take another.
                if self._started_once or attempt == 2 or "could not bind" not in self.log_tail():
                    raise
                self.port = free_port()
        self._started_once = True

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down: "fast" (clean), or "immediate" (a crash: no checkpoint)."""
        if self.running:
            self._ctl("stop", "-w", "-t", "60", "-m", mode)

    def psql(self, sql: str, database: str = "postgres") -> str:
        result = subprocess.run(
            [str(self.bin_dir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-At", "-d", self.dsn(database), "-c", sql],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def create_database(self, name: str) -> str:
        """Create database `name` and return its DSN."""
        self.psql(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def cleanup(self) -> None:
        with contextlib.suppress(Exception):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def __enter__(self) -> PgServer:
        try:
            self.start()
        except BaseException:
            self.cleanup()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    def _ctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self._run([str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), *args], check=check)

    def _run(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        if self._as_nobody:
            argv = as_user(NOBODY_UID, argv)
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            check=False,
            cwd=self.root,
            env={**os.environ, "LC_ALL": "C", "TZ": "UTC"},
        )
        if check and result.returncode != 0:
            raise RuntimeError(
                f"{Path(argv[0]).name} failed ({result.returncode}): {result.stderr.strip()}\n{self.log_tail()}"
            )
        return result
