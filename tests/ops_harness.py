"""Helpers for the operations tests: an in-process gateway with ServerOptions, a metrics scrape, and a
`feather-grpc serve` subprocess whose JSON log lines can be read as they come."""

from __future__ import annotations

import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

from feather_grpc import config
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from feather_grpc.server.app import GatewayServer, ServerOptions
from feather_grpc.server.calls import ServerCall

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@dataclass
class Running:
    server: GatewayServer
    channel: grpc.aio.Channel
    stub: pb_grpc.FeatherServiceStub


@asynccontextmanager
async def running_server(
    document: dict[str, Any], env: dict[str, str] | None = None, options: ServerOptions | None = None
) -> AsyncIterator[Running]:
    cfg = config.resolve(config.parse_file_config(json.dumps(document), "<test>"), env or {}, "<test>")
    server = GatewayServer(cfg, options=options)
    port = await server.start("127.0.0.1", 0)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Running(server, channel, pb_grpc.FeatherServiceStub(channel))
    finally:
        await channel.close()
        await server.stop(0)


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        return str(reply.read().decode())


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample as {(name, labels): value}."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(scrape_text(port)):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def eventually(check: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class GatewayProcess:
    """`feather-grpc serve` (or any command) in a subprocess, its stderr collected as parsed JSON lines."""

    proc: subprocess.Popen[str]
    lines: list[dict[str, Any]] = field(default_factory=list)
    raw: list[str] = field(default_factory=list)
    _reader: threading.Thread | None = None

    @classmethod
    def start(cls, args: list[str], env: dict[str, str], cwd: Path) -> GatewayProcess:
        full_env = {**os.environ, "LOG_FORMAT": "json", **env, "PATH": f"{BIN}:{os.environ.get('PATH', '')}"}
        proc = subprocess.Popen(
            args,
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        gp = cls(proc)
        gp._reader = threading.Thread(target=gp._read, daemon=True)
        gp._reader.start()
        return gp

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.raw.append(line)
            with suppress(ValueError):
                self.lines.append(json.loads(line))

    def logged(self, message_part: str) -> list[dict[str, Any]]:
        return [entry for entry in list(self.lines) if message_part in str(entry.get("message", ""))]

    async def wait_logged(self, message_part: str, count: int = 1, timeout_s: float = 15.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout_s
        while len(found := self.logged(message_part)) < count:
            if self.proc.poll() is not None and self._reader is not None:
                self._reader.join(timeout=2)
                if len(found := self.logged(message_part)) >= count:
                    return found
                raise AssertionError(f"exited with {self.proc.returncode} before {message_part!r}:\n{self.output()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {message_part!r} within {timeout_s}s:\n{self.output()}")
            await asyncio.sleep(0.02)
        return found

    def output(self) -> str:
        return "".join(self.raw)[-6000:]

    async def wait_exit(self, timeout_s: float = 20.0) -> int:
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            if time.monotonic() > deadline:
                self.proc.kill()
                raise AssertionError(f"did not exit within {timeout_s}s:\n{self.output()}")
            await asyncio.sleep(0.02)
        if self._reader is not None:
            self._reader.join(timeout=5)
        return int(self.proc.returncode)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def calls_reachable(root: object) -> list[ServerCall]:
    """The ServerCalls reachable from `root` through its own objects (an HTTP client's pools, connections,
    transports, their handles and contexts); the running event loop, modules, classes and functions are
    where the walk stops."""
    loop = asyncio.get_running_loop()
    seen = {id(root)}
    todo = [root]
    found: list[ServerCall] = []
    while todo:
        for ref in gc.get_referents(todo.pop()):
            if id(ref) in seen or ref is loop or isinstance(ref, (type, types.ModuleType, types.FunctionType)):
                continue
            if isinstance(ref, dict) and "__builtins__" in ref:  # a module's globals
                continue
            seen.add(id(ref))
            if isinstance(ref, ServerCall):
                found.append(ref)
            todo.append(ref)
    return found
