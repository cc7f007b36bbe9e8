"""Logs: one JSON line per call with its facts and without prompts, completions or keys; every other line
JSON too; content only with FEATHER_LOG_CONTENT=true at debug; known secrets redacted everywhere."""

from __future__ import annotations

import io
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

import grpc
import pytest

from feather_grpc import config
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc
from feather_grpc.server.app import GatewayServer, ServerOptions
from feather_grpc.server.logs import (
    CONTENT_LOGGER,
    JsonFormatter,
    SecretRedactor,
    TextFormatter,
    configure_logging,
    stop_logging,
)
from sim.upstream import Reply, SimUsage, UpstreamSimulator
from tests.gateway_harness import MOCK_CONFIG, user
from tests.ops_harness import GatewayProcess, free_port

API_KEY = "sk-live-ThisIsTheUpstreamKey-0123456789"
PROMPT = "my medical history is confidential-prompt-4711"
CALL_FIELDS = {
    "request_id",
    "tenant",
    "provider",
    "model",
    "outcome",
    "error_reason",
    "input_tokens",
    "output_tokens",
    "cost_nanos_usd",
    "duration_ms",
    "attempts",
    "upstream_response_id",
}


def write_config(tmp_path: Path, sim: UpstreamSimulator) -> Path:
    path = tmp_path / "feather.config.json"
    doc = {
        "ledger": {"type": "memory"},
        "retry": {"maxAttempts": 2, "baseMs": 1, "maxMs": 2},
        "providers": {
            "openai": {
                "type": "openai",
                "apiKeyEnv": "SIM_OPENAI_KEY",
                "baseUrl": sim.url + "/v1",
                "models": [{"name": "gpt-sim", "aliases": ["fast"], "inputPer1K": 0.03, "outputPer1K": 0.06}],
            }
        },
    }
    path.write_text(json.dumps(doc))
    return path


async def run_one_call(tmp_path: Path, env: dict[str, str]) -> tuple[GatewayProcess, pb.ChatResponse]:
    async with UpstreamSimulator() as sim:
        # The upstream fails once (retried), then answers with the prompt echoed in its completion.
        sim.enqueue(
            Reply(status=500),
            Reply(content=f"echo: {PROMPT}", usage=SimUsage(30, 12), response_id="chatcmpl-logs-4711"),
        )
        port = free_port()
        cfg = write_config(tmp_path, sim)
        gw = GatewayProcess.start(
            ["feather-grpc", "serve", "--config", str(cfg), "--port", str(port)],
            {"SIM_OPENAI_KEY": API_KEY, **env},
            tmp_path,
        )
        try:
            await gw.wait_logged("serving on")
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                reply = await pb_grpc.FeatherServiceStub(channel).Chat(
                    pb.ChatRequest(model="fast", messages=[user(PROMPT)], tags={"team": "logs"}), timeout=10
                )
            gw.proc.send_signal(signal.SIGTERM)
            assert await gw.wait_exit() == 0
        finally:
            gw.kill()
    return gw, reply


async def test_one_json_line_per_call_without_prompt_completion_or_key(tmp_path: Path) -> None:
    gw, reply = await run_one_call(tmp_path, {"LOG_LEVEL": "info", "LOG_FORMAT": "json"})
    everything = "".join(gw.raw)
    assert all(line.strip().startswith("{") for line in gw.raw), "every line is JSON with LOG_FORMAT=json"
    assert len(gw.lines) == len(gw.raw)
    calls = [entry for entry in gw.lines if entry["logger"] == "feather_grpc.calls"]
    assert len(calls) == 1
    (call,) = calls
    assert set(call) >= CALL_FIELDS
    assert call["request_id"] == reply.request_id
    assert (call["tenant"], call["provider"], call["model"]) == ("default", "openai", "gpt-sim")
    assert (call["outcome"], call["error_reason"]) == ("ok", "")
    assert (call["input_tokens"], call["output_tokens"]) == (30, 12)
    assert call["cost_nanos_usd"] == reply.cost_nanos_usd > 0
    assert call["attempts"] == 2 and call["duration_ms"] >= 0
    assert call["upstream_response_id"] == "chatcmpl-logs-4711"  # the provider's id of the reply that answered
    (failed,) = call["attempt_errors"]  # why the first attempt failed, with the provider's own words
    assert {k: failed[k] for k in ("provider", "model", "outcome", "reason", "http_status")} == {
        "provider": "openai",
        "model": "gpt-sim",
        "outcome": "retryable_error",
        "reason": "UPSTREAM_SERVER_ERROR",
        "http_status": 500,
    }
    assert failed["detail"].startswith("openai: ") and "500" in failed["detail"]
    assert "upstream_response_id" not in failed  # a failed attempt had no reply to name
    assert call["level"] == "info" and isinstance(call["pid"], int)
    assert "confidential-prompt-4711" not in everything
    assert API_KEY not in everything and "ThisIsTheUpstreamKey" not in everything


async def test_content_is_logged_only_when_enabled_and_at_debug(tmp_path: Path) -> None:
    enabled_at_info, _ = await run_one_call(tmp_path, {"LOG_LEVEL": "info", "FEATHER_LOG_CONTENT": "true"})
    assert "confidential-prompt-4711" not in "".join(enabled_at_info.raw)
    debug_only, _ = await run_one_call(tmp_path, {"LOG_LEVEL": "debug"})
    assert "confidential-prompt-4711" not in "".join(debug_only.raw)
    enabled, reply = await run_one_call(tmp_path, {"LOG_LEVEL": "debug", "FEATHER_LOG_CONTENT": "true"})
    (content,) = [e for e in enabled.lines if e["logger"] == "feather_grpc.content"]
    assert content["level"] == "debug" and content["request_id"] == reply.request_id
    assert content["messages"] == [{"role": "ROLE_USER", "content": PROMPT}]
    assert content["completion"] == f"echo: {PROMPT}"
    assert API_KEY not in "".join(enabled.raw)
    assert len([e for e in enabled.lines if e["logger"] == "feather_grpc.calls"]) == 1


async def test_content_logging_leaves_usage_and_list_models_alone(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=CONTENT_LOGGER)
    cfg = config.resolve(config.parse_file_config(json.dumps(MOCK_CONFIG), "<test>"), {}, "<test>")
    server = GatewayServer(cfg, options=ServerOptions(log_content=True))
    port = await server.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.FeatherServiceStub(channel)
            reply = await stub.Chat(pb.ChatRequest(model="fast", messages=[user(PROMPT)]))
            assert (await stub.Usage(pb.UsageRequest())).total.request_count == 1
            assert (await stub.ListModels(pb.ListModelsRequest())).models
    finally:
        await server.stop(0)
    (content,) = [r for r in caplog.records if r.name == CONTENT_LOGGER]
    assert (content.__dict__["request_id"], content.__dict__["method"]) == (reply.request_id, "Chat")


def _render(formatter: logging.Formatter, redactor: SecretRedactor, emit: Any) -> str:
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(redactor)
    logger = logging.getLogger("tests.logs.redaction")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        emit(logger)
    finally:
        logger.removeHandler(handler)
    return out.getvalue()


def test_known_secrets_are_redacted_from_messages_fields_and_tracebacks() -> None:
    redactor = SecretRedactor()
    redactor.add([API_KEY, "short"])

    def emit(logger: logging.Logger) -> None:
        try:
            raise RuntimeError(f"upstream said: bad key {API_KEY}")
        except RuntimeError:
            logger.exception("call failed with %s", API_KEY, extra={"detail": f"Bearer {API_KEY}"})
        logger.info("a short word stays")

    text = _render(JsonFormatter(), redactor, emit)
    assert API_KEY not in text
    first, second = (json.loads(line) for line in text.splitlines() if line.startswith("{"))
    assert first["message"] == "call failed with [REDACTED]"
    assert first["detail"] == "Bearer [REDACTED]"
    assert "bad key [REDACTED]" in first["exception"]
    assert second["message"] == "a short word stays"


def test_text_format_keeps_fields_as_key_value_pairs() -> None:
    text = _render(TextFormatter(), SecretRedactor(), lambda log: log.info("call", extra={"outcome": "ok"}))
    assert text.rstrip().endswith("tests.logs.redaction: call outcome=ok")


def test_text_format_quotes_values_a_caller_could_use_to_forge_fields_or_lines() -> None:
    forged = "mock-fast\n2026-11-26 12:00:00,000 INFO feather_grpc.calls: call tenant=admin outcome=ok"
    extra = {"requested_model": forged, "tag": "x tenant=victim", "model": "mock-fast", "empty": ""}
    text = _render(TextFormatter(), SecretRedactor(), lambda log: log.info("call", extra=extra))
    assert text.count("\n") <= 1 and text.rstrip("\n").count("\n") == 0  # one line
    assert "model=mock-fast" in text  # plain values stay plain
    assert 'tag="x tenant=victim"' in text and 'empty=""' in text
    assert 'requested_model="mock-fast\\n2026-11-26' in text


def test_grpcs_error_for_an_answer_to_a_call_that_had_ended_is_kept_only_when_debugging() -> None:
    """Found by bench/fuzz.py --serve: a call whose caller's deadline passed as the gateway answered made
    gRPC log `ExecuteBatchError raised in core by servicer method [...]` at ERROR with a traceback (its own
    race, grpc/grpc#32551); the call itself is recorded as usual. Other gRPC errors still show."""
    root, grpc_log = logging.getLogger(), logging.getLogger("grpc._cython.cygrpc")
    saved = (list(root.handlers), root.level, list(grpc_log.filters), grpc_log.level)
    try:
        raise RuntimeError('Failed "execute_batch"')
    except RuntimeError:
        exc_info = sys.exc_info()
    try:
        for level, kept in (("info", False), ("debug", True)):
            out = io.StringIO()
            configure_logging({"LOG_LEVEL": level, "LOG_FORMAT": "json"}, out)
            try:
                grpc_log.error("ExecuteBatchError raised in core by servicer method [%s]", "/x/Chat", exc_info=exc_info)
                grpc_log.error("Unexpected [%s] raised by servicer method [%s]", "ValueError", "/x/Chat")
            finally:
                stop_logging()
            messages = [json.loads(line)["message"] for line in out.getvalue().splitlines()]
            assert ("ExecuteBatchError raised in core by servicer method [/x/Chat]" in messages) is kept
            assert "Unexpected [ValueError] raised by servicer method [/x/Chat]" in messages
    finally:  # the test process's own logging, as it was
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        grpc_log.filters[:] = saved[2]
        grpc_log.setLevel(saved[3])
