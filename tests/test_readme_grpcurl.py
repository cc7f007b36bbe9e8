"""Runs the README's grpcurl session verbatim against a live `feather-grpc serve` process."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
GRPCURL = str(Path(sys.executable).parent / "grpcurl")


def readme_grpcurl_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Talking to it with grpcurl", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block is not None
    commands = [line for line in block.group(1).splitlines() if line.startswith("grpcurl ")]
    assert len(commands) >= 8
    return commands


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    port = _free_port()
    workdir = tmp_path_factory.mktemp("serve")
    env = {k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "FEATHER_CONFIG")}
    env["PORT"] = str(port)
    proc = subprocess.Popen(
        [sys.executable, "-m", "feather_grpc.cli", "serve"],
        cwd=workdir,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # the server logs once it is serving
            if "serving on" in line:
                break
        else:
            pytest.fail(f"server exited with {proc.wait()} before serving")
        yield port
    finally:
        proc.terminate()
        assert proc.wait(timeout=30) == 0, "SIGTERM must shut the server down cleanly"
    assert (workdir / "feather-usage.db").exists(), "the embedded default keeps a SQLite ledger in the cwd"


def _run(command: str, port: int) -> subprocess.CompletedProcess[str]:
    command = command.replace("localhost:50051", f"localhost:{port}")
    assert command.startswith("grpcurl ")
    return subprocess.run(
        ["bash", "-c", GRPCURL + command[len("grpcurl") :]], capture_output=True, text=True, timeout=60
    )


def test_readme_grpcurl_session(live_server: int) -> None:
    outputs = []
    commands = readme_grpcurl_commands()
    for command in commands[:-1]:
        run = _run(command, live_server)
        assert run.returncode == 0, f"{command}\n{run.stderr}"
        outputs.append(run.stdout)
    listed, described, health, chat, stream, image, cached, reasoning, usage, models = outputs
    assert "feather.v1.FeatherService" in listed and "grpc.health.v1.Health" in listed
    assert (
        "rpc StreamChat ( .feather.v1.StreamChatRequest ) returns ( stream .feather.v1.StreamChatResponse )"
        in described
    )
    assert json.loads(health)["status"] == "SERVING"
    reply = json.loads(chat)
    assert reply["provider"] == "mock" and reply["model"] == "mock-fast"
    assert int(reply["cost_nanos_usd"]) > 0 and reply["finish_reason"] == "FINISH_REASON_STOP"
    events = [json.loads(chunk) for chunk in re.split(r"(?<=})\n(?={)", stream.strip())]
    assert "start" in events[0] and "end" in events[-1] and all("delta" in e for e in events[1:-1])
    for answer in (image, cached, reasoning):
        reply = json.loads(answer)
        assert reply["provider"] == "mock" and reply["finish_reason"] == "FINISH_REASON_STOP"
    assert json.loads(image)["message"]["content"].endswith("What is in this image?")
    assert int(json.loads(image)["usage"]["input_tokens"]) >= 2_500  # the image's conservative estimate
    assert json.loads(cached)["message"]["content"].endswith("Can I return a used kettle?")
    rows = json.loads(usage)["rows"]
    assert {r["model"] for r in rows} == {"mock-fast", "mock-smart"}
    assert {m["name"] for m in json.loads(models)["models"]} == {"mock-fast", "mock-smart"}

    bad = _run(commands[-1], live_server)
    assert bad.returncode != 0
    assert "Code: InvalidArgument" in bad.stderr
    assert '"reason":"INVALID_REQUEST"' in bad.stderr and '"domain":"feather.v1"' in bad.stderr
    assert '"field":"messages[0].content"' in bad.stderr and '"field":"temperature"' in bad.stderr
