"""`feather-grpc chat | usage | models` run as real subprocesses against live `feather-grpc serve` processes."""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from decimal import Decimal
from pathlib import Path
from typing import NoReturn

import pytest

API_KEY = "fk_cli_test_key"
MOCK = {
    "mock": {
        "type": "mock",
        "models": [
            {"name": "mock-fast", "aliases": ["fast"], "inputPer1M": 0.15, "outputPer1M": 0.6},
            {"name": "mock-smart", "aliases": ["smart"], "inputPer1M": 2.5, "outputPer1M": 10},
        ],
    }
}
SUMMARY = re.compile(
    r"^-- (?P<provider>\S+)/(?P<model>\S+) · (?P<input>\d+) in \+ (?P<output>\d+) out tokens · "
    r"\$(?P<cost>\d+\.\d+) · \d+ ms, first token \d+ ms · (?P<finish>\w+)$"
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env() -> dict[str, str]:
    drop = ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "FEATHER_CONFIG", "FEATHER_ADDR", "FEATHER_API_KEY", "PORT")
    return {k: v for k, v in os.environ.items() if k not in drop}


def _serve(workdir: Path, config: dict[str, object]) -> Iterator[str]:
    port = _free_port()
    (workdir / "feather.config.json").write_text(json.dumps(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "feather_grpc.cli", "serve", "--port", str(port)],
        cwd=workdir,
        env=_clean_env(),
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
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _serve(tmp_path_factory.mktemp("cli"), {"providers": MOCK, "ledger": {"type": "memory"}})


@pytest.fixture(scope="module")
def keyed_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    digest = "sha256:" + hashlib.sha256(API_KEY.encode()).hexdigest()
    config = {"providers": MOCK, "ledger": {"type": "memory"}, "tenants": {"cli": {"keys": [digest]}}}
    yield from _serve(tmp_path_factory.mktemp("cli-keyed"), config)


def cli(*args: str, addr: str | None = None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "feather_grpc.cli", *args]
    if addr:
        command += ["--addr", addr]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, env={**_clean_env(), **(env or {})})


def test_chat_streams_the_answer_then_one_summary_line(gateway: str) -> None:
    run = cli("chat", "Say hello", "--model", "fast", "--tag", "team=cli", addr=gateway)
    assert run.returncode == 0, run.stderr
    assert run.stdout == "Feather mock reply to: Say hello\n"
    summary = SUMMARY.match(run.stderr.strip().splitlines()[-1])
    assert summary, run.stderr
    assert (summary["provider"], summary["model"], summary["finish"]) == ("mock", "mock-fast", "stop")
    # $0.15 / $0.60 per 1M tokens: 150 / 600 nano-USD per token, printed exactly
    nanos = int(summary["input"]) * 150 + int(summary["output"]) * 600
    assert Decimal(summary["cost"]) == Decimal(nanos) / 10**9


def test_chat_reads_the_prompt_from_stdin_and_takes_the_address_from_the_environment(gateway: str) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "feather_grpc.cli", "chat", "-", "-m", "smart", "--system", "Be brief."],
        input="from stdin",
        capture_output=True,
        text=True,
        timeout=60,
        env={**_clean_env(), "FEATHER_ADDR": gateway},
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout == "Feather mock reply to: from stdin\n"
    assert "mock/mock-smart" in run.stderr


def test_usage_prints_a_table_and_one_json_document(gateway: str) -> None:
    assert cli("chat", "one", "-m", "fast", addr=gateway).returncode == 0
    assert cli("chat", "two", "-m", "smart", addr=gateway).returncode == 0
    table = cli("usage", "--group-by", "provider,model", "--since", "1h", addr=gateway)
    assert table.returncode == 0, table.stderr
    header, *rows, total = table.stdout.strip().splitlines()
    assert header.split()[:3] == ["PROVIDER", "MODEL", "REQUESTS"] and "COST (USD)" in header
    assert any(r.split()[:2] == ["mock", "mock-fast"] for r in rows)
    assert total.startswith("TOTAL")

    document = cli("usage", "--group-by", "model", "--json", addr=gateway)
    assert document.returncode == 0, document.stderr
    report = json.loads(document.stdout)
    assert report["group_by"] == ["model"]
    by_model = {r["model"]: r for r in report["rows"]}
    assert {"mock-fast", "mock-smart"} <= set(by_model)
    assert report["total"]["cost_nanos_usd"] == sum(r["cost_nanos_usd"] for r in report["rows"])
    assert Decimal(report["total"]["cost_usd"]) == Decimal(report["total"]["cost_nanos_usd"]) / 10**9
    assert report["total"]["requests"] == sum(r["requests"] for r in report["rows"])
    # every token sum the Usage reply carries (the mock provider reports no cache writes or reasoning)
    assert report["total"]["cache_write_tokens"] == report["total"]["reasoning_tokens"] == 0


def test_usage_names_calls_refused_before_routing_as_refused(tmp_path: Path) -> None:
    admin_key = "fk_cli_admin_key"
    digests = {k: "sha256:" + hashlib.sha256(k.encode()).hexdigest() for k in (API_KEY, admin_key)}
    tenants = {"cli": {"keys": [digests[API_KEY]]}, "ops": {"keys": [digests[admin_key]], "role": "admin"}}
    config = {"providers": MOCK, "ledger": {"type": "memory"}, "tenants": tenants}
    with contextmanager(_serve)(tmp_path, config) as addr:
        assert cli("chat", "served", "-m", "fast", "--api-key", API_KEY, addr=addr).returncode == 0
        refused = cli("chat", "refused", "-m", "fast", "--api-key", "fk_not_a_key", addr=addr)
        assert refused.returncode == 1 and "UNAUTHENTICATED" in refused.stderr
        as_admin = ("--api-key", admin_key, "--since", "1h")
        table = cli("usage", "--group-by", "tenant,provider,model", *as_admin, addr=addr)
        assert table.returncode == 0, table.stderr
        rows = [line.split() for line in table.stdout.strip().splitlines()[1:-1]]
        assert sorted(r[:5] for r in rows) == [
            ["(unauthenticated)", "(refused)", "(refused)", "1", "0"],
            ["cli", "mock", "mock-fast", "1", "1"],
        ]
        document = json.loads(cli("usage", "--group-by", "model", "--json", *as_admin, addr=addr).stdout)
        by_model = {r["model"]: (r["refused"], r["errors"]) for r in document["rows"]}
        assert by_model == {"": (True, 1), "mock-fast": (False, 0)}  # JSON keeps the exact (empty) values


def test_models_lists_aliases_prices_and_state(gateway: str) -> None:
    table = cli("models", addr=gateway)
    assert table.returncode == 0, table.stderr
    header, fast, smart = table.stdout.strip().splitlines()
    assert header.split()[:4] == ["PROVIDER", "MODEL", "ALIASES", "STATE"]
    assert fast.split()[:6] == ["mock", "mock-fast", "fast", "ok", "$0.15", "$0.60"]
    assert smart.split()[:6] == ["mock", "mock-smart", "smart", "ok", "$2.50", "$10.00"]
    listed = json.loads(cli("models", "--json", addr=gateway).stdout)
    assert listed[0]["price_usd_per_million_tokens"]["input"] == "0.15"
    assert listed[1]["aliases"] == ["smart"] and listed[1]["state"] == "ok"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["chat", "hi", "-m", "no-such-model"], "feather-grpc: NOT_FOUND MODEL_NOT_FOUND: no model or alias named"),
        (["chat", "hi", "--temperature", "9"], "feather-grpc: INVALID_ARGUMENT INVALID_REQUEST: "),
        (["usage", "--group-by", "color"], "feather-grpc: group_by must be among"),
    ],
)
def test_errors_print_one_line_and_exit_non_zero(gateway: str, args: list[str], expected: str) -> None:
    run = cli(*args, addr=gateway)
    assert run.returncode != 0
    assert run.stdout == ""
    assert len(run.stderr.strip().splitlines()) == 1 and run.stderr.startswith(expected), run.stderr


def test_an_unreachable_gateway_is_one_line_too() -> None:
    run = cli("models", "--timeout", "5", addr=f"127.0.0.1:{_free_port()}")
    assert run.returncode == 1
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("feather-grpc: UNAVAILABLE: ") and "is a gateway listening on" in line


def test_the_api_key_comes_from_the_flag_or_the_environment(keyed_gateway: str) -> None:
    refused = cli("models", addr=keyed_gateway)
    assert refused.returncode == 1
    assert refused.stderr.startswith("feather-grpc: UNAUTHENTICATED API_KEY_INVALID: "), refused.stderr
    assert cli("models", "--api-key", API_KEY, addr=keyed_gateway).returncode == 0
    run = cli("chat", "keyed", addr=keyed_gateway, env={"FEATHER_API_KEY": API_KEY})
    assert run.returncode == 0, run.stderr
    assert run.stdout == "Feather mock reply to: keyed\n"


def _write_config(path: Path, **extra: object) -> str:
    path.write_text(json.dumps({"providers": MOCK, "ledger": {"type": "memory"}, **extra}))
    return str(path)


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("non-utf8", ": (file): not UTF-8 text (byte 64). Fix: "),
        ("workers", "environment: FEATHER_WORKERS: 'abc' is not a whole number. Fix: "),
        ("tls-check", ": server.tls.keyFile: cannot read "),
        ("tls-serve", ": server.tls.keyFile: cannot read "),
        ("port-flag", "feather-grpc: --port must be from 0 to 65535"),
        ("port-env", "environment: PORT: '99999' is not an integer from 0 to 65535. Fix: "),
        ("database-url", "environment: DATABASE_URL: the URL must start with postgres:// or postgresql://. Fix: "),
        ("health-ca", "feather-grpc: [Errno 2] No such file or directory: "),
    ],
)
def test_bad_settings_are_one_line_and_exit_2(tmp_path: Path, case: str, expected: str) -> None:
    good = _write_config(tmp_path / "good.json")
    tls = {"certFile": good, "keyFile": str(tmp_path / "missing.key")}
    tls_config = _write_config(tmp_path / "tls.json", server={"tls": tls})
    non_utf8 = tmp_path / "latin1.json"
    non_utf8.write_bytes(b'{"providers": {"mock": {"type": "mock", "models": [{"name": "caf\xe9"}]}}}')
    args, env = {
        "non-utf8": (["check-config", str(non_utf8)], {}),
        "workers": (["serve", "--config", good, "--port", "0"], {"FEATHER_WORKERS": "abc"}),
        "tls-check": (["check-config", "--config", tls_config], {}),
        "tls-serve": (["serve", "--config", tls_config, "--port", "0"], {}),
        "port-flag": (["serve", "--config", good, "--port", "70000"], {}),
        "port-env": (["serve", "--config", good], {"PORT": "99999"}),
        "database-url": (["serve", "--config", good, "--port", "0"], {"DATABASE_URL": "mysql://u:s3cret@db/x"}),
        "health-ca": (["health", "--ca-cert", str(tmp_path / "missing-ca.pem")], {}),
    }[case]
    run = cli(*args, env=env)
    assert run.returncode == 2, run.stderr
    (line,) = run.stderr.strip().splitlines()
    assert expected in line and line.startswith("feather-grpc: ")
    assert "s3cret" not in line


def test_a_bad_feather_workers_only_concerns_serve() -> None:
    run = cli("keys", "new", env={"FEATHER_WORKERS": "abc"})
    assert run.returncode == 0, run.stderr
    assert "sha256:" in run.stdout


def test_usage_since_too_far_back_is_a_usage_error_not_a_traceback() -> None:
    run = cli("usage", "--since", "999999d", addr=f"127.0.0.1:{_free_port()}")
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    assert (
        run.stderr.strip()
        .splitlines()[-1]
        .endswith("argument --since: '999999d': too far back (the earliest date is year 1)")
    )


def test_serve_on_a_port_in_use_says_so_and_is_not_called_a_configuration_error(tmp_path: Path) -> None:
    config = _write_config(tmp_path / "feather.config.json")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = cli("serve", "--config", config, "--port", str(port))
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("feather-grpc: ")]
    assert lines == [
        f"feather-grpc: cannot listen on 127.0.0.1:{port}: the port is in use by another process. Fix: stop the "
        "process that holds the port, or pick another with --port, PORT or server.port"
    ]


def test_serve_on_a_host_that_is_not_this_machines_says_so(tmp_path: Path) -> None:
    run = cli("serve", "--config", _write_config(tmp_path / "c.json"), "--host", "192.0.2.1", "--port", "0")
    assert run.returncode == 2, run.stderr
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("feather-grpc: ")]
    assert line.startswith("feather-grpc: cannot listen on 192.0.2.1:0: the host is not an address of this machine")


def test_check_config_takes_the_file_as_its_argument(tmp_path: Path) -> None:
    good = _write_config(tmp_path / "good.json")
    run = cli("check-config", good)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == f"ok: {good}" and "mock/mock-fast [mock] aliases=fast" in run.stdout
    assert cli("check-config", "--config", good).stdout == run.stdout, "the older --config still works"
    other = _write_config(tmp_path / "other.json")
    both = cli("check-config", good, "--config", other)
    assert both.returncode == 2 and "takes one file" in both.stderr
    missing = cli("check-config", str(tmp_path / "missing.json"))
    assert missing.returncode == 2 and "missing.json" in missing.stderr


def test_health_takes_addr_and_feather_addr_like_every_command(gateway: str) -> None:
    for args, env in [
        (["--addr", gateway], {}),
        ([], {"FEATHER_ADDR": gateway}),
        ([], {"PORT": gateway.rsplit(":", 1)[1]}),  # the port `serve` listens on, in the same environment
        (["--address", gateway], {}),  # the older spelling, kept so scripts and probes do not break
    ]:
        run = cli("health", *args, env=env)
        assert run.returncode == 0, (args, env, run.stderr)
        assert run.stdout.strip().endswith("(server): SERVING")
    elsewhere = cli("health", env={"FEATHER_ADDR": f"127.0.0.1:{_free_port()}"})
    assert elsewhere.returncode == 1 and "UNAVAILABLE" in elsewhere.stderr
    several = cli("health", "--addr", f"{gateway},{gateway}")
    assert several.returncode == 2 and "health checks one gateway" in several.stderr


def test_serve_with_tls_files_that_are_not_pem_exits_2_and_says_so(tmp_path: Path) -> None:
    (tmp_path / "server.pem").write_text("not a certificate")
    (tmp_path / "server.key").write_text("not a key")
    tls = {"certFile": str(tmp_path / "server.pem"), "keyFile": str(tmp_path / "server.key")}
    run = cli("serve", "--config", _write_config(tmp_path / "tls.json", server={"tls": tls}), "--port", "0")
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    (line,) = [line for line in run.stderr.splitlines() if line.startswith("feather-grpc: ")]
    assert line.startswith("feather-grpc: invalid configuration: server: tls: not a valid PEM certificate and key")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["chat", "hi", "--cert", "{pem}"], "feather-grpc: --cert needs --key"),
        (["models", "--key", "{pem}"], "feather-grpc: --key needs --cert"),
        (["health", "--cert", "{pem}"], "feather-grpc: --cert needs --key"),
        (["health", "--key", "{pem}", "--ca-cert", "{pem}"], "feather-grpc: --key needs --cert"),
    ],
)
def test_a_client_certificate_without_its_key_or_a_key_alone_is_one_line_and_exit_2(
    tmp_path: Path, args: list[str], expected: str
) -> None:
    pem = tmp_path / "client.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    run = cli(*[a.format(pem=pem) for a in args], "--timeout", "3", addr=f"127.0.0.1:{_free_port()}")
    assert run.returncode == 2, (run.returncode, run.stderr)  # not -6: gRPC aborts on a chain without its key
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith(expected), line


@pytest.mark.parametrize("command", ["chat", "models", "health"])
@pytest.mark.parametrize("timeout", ["0", "-1", "nan"])
def test_a_timeout_that_is_not_above_zero_is_a_bad_argument(command: str, timeout: str) -> None:
    args = [command, "hi"] if command == "chat" else [command]
    run = cli(*args, f"--timeout={timeout}", addr=f"127.0.0.1:{_free_port()}")
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert (
        run.stderr.strip()
        .splitlines()[-1]
        .endswith(f"argument --timeout: '{timeout}': the timeout must be a number of seconds above 0")
    )


@pytest.fixture
def breaking_gateway() -> Iterator[str]:
    """A FeatherService whose StreamChat sends a start and one delta, then fails UNAVAILABLE without a reason
    (as when the connection to the gateway drops mid-stream)."""
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from feather_client import pb
    from feather_client.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc

    def unimplemented(context: grpc.ServicerContext) -> NoReturn:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not implemented!")
        raise AssertionError("abort always raises")

    class Breaking(pb_grpc.FeatherServiceServicer):
        def StreamChat(
            self, request: pb.StreamChatRequest, context: grpc.ServicerContext
        ) -> Iterator[pb.StreamChatResponse]:
            yield pb.StreamChatResponse(start=pb.StreamStart(provider="p", model="m"))
            yield pb.StreamChatResponse(delta=pb.ChatDelta(content="half an ans"))
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost")

        # Not served here: answered as the generated base class answers them (its stub marks them abstract).
        def Chat(self, request: pb.ChatRequest, context: grpc.ServicerContext) -> pb.ChatResponse:
            unimplemented(context)

        def Usage(self, request: pb.UsageRequest, context: grpc.ServicerContext) -> pb.UsageResponse:
            unimplemented(context)

        def ListModels(self, request: pb.ListModelsRequest, context: grpc.ServicerContext) -> pb.ListModelsResponse:
            unimplemented(context)

    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_FeatherServiceServicer_to_server(Breaking(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_a_stream_failing_mid_way_ends_the_partial_line_and_gives_no_listening_hint(breaking_gateway: str) -> None:
    run = cli("chat", "hi", addr=breaking_gateway)
    assert run.returncode == 1, run.stderr
    assert run.stdout == "half an ans\n"
    (line,) = run.stderr.strip().splitlines()
    assert line == "feather-grpc: UNAVAILABLE: connection lost"


@pytest.mark.parametrize(
    ("env", "expected"),
    [({"LOG_FORMAT": "jsno"}, "LOG_FORMAT='jsno'"), ({"LOG_LEVEL": "bogus"}, "LOG_LEVEL='bogus'")],
)
def test_a_mistyped_log_setting_is_one_line_and_exit_2(env: dict[str, str], expected: str) -> None:
    run = cli("check-config", env=env)
    assert run.returncode == 2 and run.stderr.startswith(f"feather-grpc: {expected}"), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert cli("check-config", env={"LOG_FORMAT": "TEXT", "LOG_LEVEL": "Warn"}).returncode == 0
