"""Runs every client example in the README (Python, TypeScript, CLI) verbatim against a live gateway."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TS_CLIENT = ROOT / "clients" / "typescript"


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    body = text.split(f"\n{title}\n", 1)[1]
    return re.split(r"\n#{2,3} ", body, maxsplit=1)[0]


def readme_blocks(title: str, language: str) -> list[str]:
    blocks = re.findall(rf"```{language}\n(.*?)```", _section(title), re.S)
    assert blocks, f"no {language} example under {title!r}"
    return list(blocks)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    drop = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "FEATHER_CONFIG", "FEATHER_ADDR", "FEATHER_API_KEY", "PORT")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """`feather-grpc serve` on its embedded defaults, as the README's quick start runs it."""
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "feather_grpc.cli", "serve", "--port", str(port)],
        cwd=tmp_path_factory.mktemp("readme-clients"),
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "serving on" in line:
                break
        else:
            pytest.fail(f"server exited with {proc.wait()} before serving")
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _localize(code: str, port: int) -> str:
    """Points the example at the live gateway; the README's second gateway (50052) becomes a dead port."""
    code = code.replace("127.0.0.1:50052", f"127.0.0.1:{_free_port()}")
    return code.replace("localhost:50051", f"localhost:{port}").replace("127.0.0.1:50051", f"127.0.0.1:{port}")


def _check(run: subprocess.CompletedProcess[str], what: str) -> str:
    assert run.returncode == 0, f"{what} failed:\n{run.stdout}\n{run.stderr}"
    return run.stdout


@pytest.mark.parametrize("index", [0, 1, 2])
def test_readme_python_examples(port: int, index: int, tmp_path: Path) -> None:
    blocks = readme_blocks("### Python", "python")
    assert len(blocks) == 3
    script = tmp_path / "example.py"
    script.write_text(_localize(blocks[index], port))
    out = _check(
        subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=_env()),
        f"README Python example {index}",
    )
    if index == 0:
        assert "Feather mock reply to: Say hello mock mock-fast" in out
        assert "Feather mock reply to: Stream a short answer" in out
        assert re.search(r"^mock-fast \d+ \$0\.\d+$", out, re.M)
        assert "mock-smart ['smart']" in out
        assert out.rstrip().endswith("NOT_FOUND MODEL_NOT_FOUND no-such-model")
    elif index == 1:
        assert out == "Feather mock reply to: Say hello\n"  # OpenAI-style messages
    else:
        assert "Feather mock reply to: Count to three" in out
        assert re.search(r"^mock/mock-fast stop \$0\.\d+$", out, re.M)
        assert out.rstrip().endswith("INVALID_REQUEST ['messages[0].content', 'temperature']")


@pytest.fixture(scope="module")
def ts_client() -> Path:
    """The TypeScript client, built (scripts/test.sh builds it again later; tsc is quick)."""
    if not (TS_CLIENT / "node_modules" / ".bin" / "tsc").exists():
        pytest.fail("clients/typescript is not installed: run `make test` (npm ci --prefix clients/typescript)")
    subprocess.run(["npm", "--prefix", str(TS_CLIENT), "run", "--silent", "build"], check=True, timeout=300)
    return TS_CLIENT


def test_readme_typescript_example(port: int, ts_client: Path, tmp_path: Path) -> None:
    (block,) = readme_blocks("### TypeScript", "ts")
    # A project that depends on the package, as a user's would.
    modules = tmp_path / "node_modules"
    modules.mkdir()
    (modules / "feather-grpc-client").symlink_to(ts_client, target_is_directory=True)
    (modules / "@types").symlink_to(ts_client / "node_modules" / "@types", target_is_directory=True)
    (tmp_path / "example.ts").write_text(_localize(block, port))
    tsc = ts_client / "node_modules" / ".bin" / "tsc"
    flags = "--strict --target ES2022 --module commonjs --esModuleInterop --skipLibCheck --types node"
    _check(
        subprocess.run([str(tsc), *flags.split(), "example.ts"], cwd=tmp_path, capture_output=True, text=True),
        "compiling the README TypeScript example",
    )
    out = _check(
        subprocess.run(
            [shutil.which("node") or "node", "example.js"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env=_env(),
        ),
        "running the README TypeScript example",
    )
    assert "Feather mock reply to: Say hello mock mock-fast" in out
    assert "Feather mock reply to: Stream a short answer" in out
    assert re.search(r"^mock-fast \d+ \$0\.\d+$", out, re.M)
    assert "mock-fast fast,cheap" in out
    assert out.rstrip().endswith("NOT_FOUND MODEL_NOT_FOUND no-such-model")


def test_readme_cli_session(port: int) -> None:
    (block,) = readme_blocks("## Command line", "sh")
    commands = [line for line in block.splitlines() if line.startswith("feather-grpc ")]
    assert len(commands) == 5
    outputs = []
    for command in commands:
        argv = [sys.executable, "-m", "feather_grpc.cli", *shlex.split(command)[1:]]
        run = subprocess.run(
            argv, capture_output=True, text=True, timeout=60, env=_env(FEATHER_ADDR=f"localhost:{port}")
        )
        outputs.append((_check(run, command), run.stderr))
    (haiku, haiku_summary), (summary, _), (table, _), (daily, _), (models, _) = outputs
    assert haiku == "Feather mock reply to: Write a haiku about gRPC\n"
    assert re.fullmatch(r"-- mock/mock-fast · \d+ in \+ \d+ out tokens · \$0\.\d+ · .* · stop\n", haiku_summary)
    assert summary == "Feather mock reply to: Summarise the plan\n"
    assert table.splitlines()[0].split()[:2] == ["PROVIDER", "MODEL"] and "TOTAL" in table
    assert '"group_by": [\n    "day"\n  ]' in daily
    assert "mock-fast" in models and "fast,cheap" in models
