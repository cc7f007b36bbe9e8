"""Fuzz a real gateway: odd-but-valid requests and malformed bytes on every RPC, odd upstream replies behind it.

    nice -n 19 .venv/bin/python bench/fuzz.py                    # 30,000 requests, seed 1, a few minutes
    .venv/bin/python bench/fuzz.py --seed 7 --requests 2000 --concurrency 16 --show 5

One in-process gateway (`GatewayServer`, as the tests run it; SQLite ledger in a temporary directory) in
front of every simulator in `sim/`, so each adapter's request and reply mapping is exercised: OpenAI and
Anthropic and an OpenAI-compatible server (sim/upstream.py), Azure OpenAI (sim/azure.py), Bedrock with
SigV4 (sim/bedrock.py), Gemini and Vertex AI through google-auth's ADC against a local token endpoint,
Claude on Vertex (sim/gemini.py), the Responses API (sim/responses.py), and the mock provider. Three API
keys (a member, a member with a tiny budget and limits, an admin) and a JWT secret are configured.

Each request is one of Chat, StreamChat, Usage, ListModels (built from every proto field with odd values:
unicode, empty and over-limit strings, extreme and non-finite numbers, unknown enum values, content parts
with bad data, odd tool schemas and extra_fields, odd page tokens and filters) or raw bytes sent through a
generic channel (truncated, corrupt or random protobuf), with odd metadata, auth headers and deadlines.
About one call in four first scripts its simulator to answer oddly (errors, bad JSON, cut or reset
streams, odd usage, tool calls with bad arguments, unknown finish reasons).

A bug is: an INTERNAL or UNKNOWN status, an error status without ErrorInfo that the gateway (not the
client library) sent, a call that does not end within its deadline plus 10 s, or a log record at ERROR
with a traceback. Prints the counts of status codes and ErrorInfo reasons, each bug with the request that
caused it (`--show`), and how many Chat/StreamChat calls the ledger recorded. Exit 1 when there is a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import math
import os
import random
import re
import string
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import jwt
from aiohttp import web
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from feather_grpc import config  # noqa: E402
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb  # noqa: E402
from feather_grpc.gen.feather.v1 import feather_service_pb2_grpc as pb_grpc  # noqa: E402
from feather_grpc.server.app import GatewayServer  # noqa: E402
from feather_grpc.server.logs import EndedCallFilter  # noqa: E402
from sim.azure import AzureSimulator  # noqa: E402
from sim.bedrock import BedrockReply, BedrockSimulator, encode_event  # noqa: E402
from sim.gemini import GeminiReply, GeminiSimulator  # noqa: E402
from sim.responses import ResponsesReply, ResponsesSimulator  # noqa: E402
from sim.upstream import ANTHROPIC_PATH, OPENAI_PATH, Reply, SimToolCall, SimUsage, UpstreamSimulator  # noqa: E402
from tests.ops_harness import GatewayProcess, free_port  # noqa: E402

MEMBER_KEY, POOR_KEY, ADMIN_KEY = "fk_fuzz_member_key", "fk_fuzz_poor_key", "fk_fuzz_admin_key"
JWT_SECRET = "fuzz-jwt-secret-" + "s" * 48  # 64 bytes: long enough for HS512 (odd tokens use it)
AWS = ("AKIDFUZZ000000000001", "fuzz/secret/key/0123456789abcdef0123", None)
PROJECT = "feather-fuzz"
SERVICE = "/feather.v1.FeatherService/"
METHODS = ("Chat", "StreamChat", "Usage", "ListModels")
BAD_CODES = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# INTERNAL by design (DESIGN.md section 3): the gateway's own credentials were rejected (the fuzzer scripts
# upstream 401s and 403s), which is never the caller's fault.
EXPECTED_INTERNAL = ("UPSTREAM_AUTH_FAILED",)
# Statuses the client library makes itself, with no ErrorInfo: the caller's deadline passing, metadata or
# a message the client or gRPC's transport refuses before the gateway sees it.
CLIENT_SIDE = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED)

# (provider, model) pairs the config serves; "any" is an alias on every one of them.
MODELS: dict[str, list[str]] = {
    "openai": ["gpt-4o"],
    "anthropic": ["claude-sonnet-4-5"],
    "compat": ["llama-3.3-70b"],
    "azure": ["gpt-4o-mini"],
    "bedrock": ["us.anthropic.claude-3-7-sonnet-20250219-v1:0", "amazon.nova-pro-v1:0"],
    "gemini": ["gemini-2.5-flash"],
    "vertex": ["gemini-2.5-pro", "claude-sonnet-4@20250514"],
    "responses": ["o3"],
    "mock": ["mock-fast"],
}


# -- the stack: simulators, ADC token endpoint, gateway ------------------------------------------------------


class TokenEndpoint:
    """An OAuth 2.0 token endpoint for a service-account ADC file (Vertex's credentials)."""

    def __init__(self) -> None:
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> TokenEndpoint:
        app = web.Application()
        app.router.add_post("/token", self._token)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/token"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _token(self, request: web.Request) -> web.Response:
        await request.post()
        return web.json_response({"access_token": "ya29.fuzz", "expires_in": 3600, "token_type": "Bearer"})


def _adc_file(directory: Path, token_url: str) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    info = {
        "type": "service_account",
        "project_id": PROJECT,
        "private_key_id": "fuzz-1",
        "private_key": pem,
        "client_email": f"gateway@{PROJECT}.iam.gserviceaccount.com",
        "client_id": "1",
        "token_uri": token_url,
    }
    path = directory / "adc.json"
    path.write_text(json.dumps(info))
    return path


@contextlib.contextmanager
def _process_env(values: dict[str, str]) -> Iterator[None]:
    """Bedrock (botocore's chain) and Vertex (google-auth's ADC) read credentials from the process env."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _digest(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Sims:
    upstream: UpstreamSimulator  # openai, anthropic, compat
    azure: AzureSimulator
    bedrock: BedrockSimulator
    gemini: GeminiSimulator  # gemini and vertex (Claude on Vertex too)
    responses: ResponsesSimulator

    def forget(self) -> None:
        """The simulators record every request: keep memory flat over a long run."""
        self.upstream.requests.clear()
        self.azure.requests.clear()
        self.bedrock.requests.clear()
        self.gemini.requests.clear()
        self.responses.requests.clear()


def gateway_document(sims: Sims, ledger_path: str) -> dict[str, Any]:
    price = {"aliases": ["any"], "inputPer1M": 1, "outputPer1M": 2, "cachedInputPer1M": 0.5, "cacheWritePer1M": 1.25}

    def models(provider: str) -> list[dict[str, Any]]:
        return [{"name": m, **price} for m in MODELS[provider]]

    up = sims.upstream.url
    return {
        "ledger": {"type": "sqlite", "path": ledger_path},
        "policy": "roundrobin",
        "retry": {"maxAttempts": 2, "baseMs": 1, "maxMs": 5},
        "timeoutMs": 5_000,
        "requestTimeoutMs": 8_000,
        "circuitBreaker": {"failureThreshold": 1_000, "resetTimeoutMs": 500},
        "routes": {"gpt-4o": {"hedgeAfterMs": 20}},
        "fallbacks": {"mock-fast": ["gpt-4o"]},
        "providers": {
            "openai": {"type": "openai", "baseUrl": up + "/v1", "apiKeyEnv": "FZ_OPENAI", "models": models("openai")},
            "anthropic": {
                "type": "anthropic",
                "baseUrl": up,
                "apiKeyEnv": "FZ_ANTHROPIC",
                "models": models("anthropic"),
            },
            "compat": {"type": "openai-compatible", "baseUrl": up + "/v1", "models": models("compat")},
            "azure": {
                "type": "azure-openai",
                "baseUrl": sims.azure.url,
                "apiKeyEnv": "FZ_AZURE",
                "apiVersion": "2024-10-21",
                "models": models("azure"),
            },
            "bedrock": {
                "type": "bedrock",
                "region": "us-east-1",
                "baseUrl": sims.bedrock.url,
                "models": models("bedrock"),
            },
            "gemini": {
                "type": "gemini",
                "baseUrl": sims.gemini.url + "/v1beta",
                "apiKeyEnv": "FZ_GEMINI",
                "models": models("gemini"),
            },
            "vertex": {
                "type": "vertex",
                "project": PROJECT,
                "region": "us-central1",
                "baseUrl": sims.gemini.url + "/v1",
                "models": models("vertex"),
            },
            "responses": {
                "type": "openai",
                "api": "responses",
                "baseUrl": sims.responses.url + "/v1",
                "apiKeyEnv": "FZ_RESPONSES",
                "models": models("responses"),
            },
            "mock": {"type": "mock", "models": models("mock")},
        },
        "tenants": {
            "member": {"keys": [_digest(MEMBER_KEY)]},
            "poor": {
                "keys": [_digest(POOR_KEY)],
                "allowedModels": ["any", "mock-fast"],
                "limits": {"rpm": 600, "tpm": 200_000, "concurrency": 4},
                "budget": {"dailyUsd": 0.01},
            },
            "ops": {"keys": [_digest(ADMIN_KEY)], "role": "admin"},
        },
        "jwtDefaultPolicy": {},
        "limits": {"openai:gpt-4o": {"rps": 200, "burst": 50}},
        "safety": {"maxContentChars": 20_000, "maxMessages": 64},
        "server": {"maxMessageBytes": 1_048_576},
    }


GATEWAY_ENV = {
    "FZ_OPENAI": "sk-fuzz-openai",
    "FZ_ANTHROPIC": "sk-ant-fuzz",
    "FZ_AZURE": "az-fuzz",
    "FZ_GEMINI": "gm-fuzz",
    "FZ_RESPONSES": "sk-fuzz-rs",
    "JWT_SECRET": JWT_SECRET,
}


@dataclass
class Stack:
    channel: grpc.aio.Channel
    stub: pb_grpc.FeatherServiceStub
    sims: Sims
    address: str
    process: GatewayProcess | None  # --serve: the `feather-grpc serve` subprocess


async def _in_process(document: dict[str, Any]) -> tuple[int, Callable[[], Any]]:
    # What `feather-grpc serve` installs with its logging (configure_logging), as this process has its own.
    if not any(isinstance(f, EndedCallFilter) for f in logging.getLogger("grpc._cython.cygrpc").filters):
        logging.getLogger("grpc._cython.cygrpc").addFilter(EndedCallFilter())
    cfg = config.resolve(config.parse_file_config(json.dumps(document), "<fuzz>"), GATEWAY_ENV, "<fuzz>")
    server = GatewayServer(cfg)
    return await server.start("127.0.0.1", 0), lambda: server.stop(0)


def _subprocess(document: dict[str, Any], directory: Path) -> tuple[int, GatewayProcess]:
    """`feather-grpc serve` on a free port, its JSON log lines (stderr) collected as they come."""
    path = directory / "feather.config.json"
    path.write_text(json.dumps(document))
    port = free_port()
    env = {**os.environ, **GATEWAY_ENV, "LOG_LEVEL": "warning"}
    args = [sys.executable, "-m", "feather_grpc.cli", "serve", "--config", str(path), "--port", str(port)]
    return port, GatewayProcess.start(args, env, ROOT)


@asynccontextmanager
async def fuzz_stack(serve: bool = False) -> AsyncIterator[Stack]:
    """Every simulator, Vertex's token endpoint and one gateway in front of them: in this event loop, or
    (`serve`) a `feather-grpc serve` subprocess."""
    async with AsyncExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="feather-fuzz-")))
        token = await stack.enter_async_context(TokenEndpoint())
        stack.enter_context(
            _process_env(
                {
                    "AWS_ACCESS_KEY_ID": AWS[0],
                    "AWS_SECRET_ACCESS_KEY": AWS[1],
                    "AWS_EC2_METADATA_DISABLED": "true",
                    "GOOGLE_APPLICATION_CREDENTIALS": str(_adc_file(tmp, token.url)),
                    "NO_GCE_CHECK": "True",
                }
            )
        )
        os.environ.pop("AWS_SESSION_TOKEN", None)
        sims = Sims(
            await stack.enter_async_context(UpstreamSimulator(record=False)),
            await stack.enter_async_context(AzureSimulator(api_key="az-fuzz", record=False)),
            await stack.enter_async_context(BedrockSimulator(credentials=AWS, region="us-east-1")),
            await stack.enter_async_context(GeminiSimulator(api_key="gm-fuzz")),
            await stack.enter_async_context(ResponsesSimulator(api_key="sk-fuzz-rs")),
        )
        document = gateway_document(sims, str(tmp / "ledger.db"))
        process = None
        if serve:
            port, process = _subprocess(document, tmp)
            stack.callback(process.kill)
        else:
            port, stop = await _in_process(document)
            stack.push_async_callback(stop)
        options = [("grpc.max_send_message_length", 64 * 1024 * 1024), ("grpc.max_receive_message_length", -1)]
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options)
        stack.push_async_callback(channel.close)
        await asyncio.wait_for(channel.channel_ready(), 60)
        yield Stack(channel, pb_grpc.FeatherServiceStub(channel), sims, f"127.0.0.1:{port}", process)


# -- odd values -----------------------------------------------------------------------------------------------

_UNICODE_RANGES = [
    (0x20, 0x7E),
    (0xA0, 0x24F),
    (0x0590, 0x06FF),
    (0x0300, 0x036F),
    (0x4E00, 0x4FFF),
    (0x1F300, 0x1FAFF),
]
_SPECIAL = [
    "",
    " ",
    "\x00",
    "\x00\x01\x7f",
    "\u200b\u200e\u202e",
    "\ufeff",
    "\U0010ffff",
    "e\u0301" * 50,
    "null",
    "[]",
    "{}",
    '{"a":',
    "NaN",
    "-1",
    "9" * 400,
    "'; DROP TABLE calls; --",
    "%s%n%x{0}{{}}",
    "../../../etc/passwd",
    "\r\n\r\nX-Injected: 1",
    "data: [DONE]\n\n",
    "<script>alert(1)</script>",
    "\\u0000",
    "a" * 1_025,
]


class Odd:
    """Odd values drawn from one seeded Random."""

    def __init__(self, rng: random.Random) -> None:
        self.r = rng
        # How odd this request is: the chance that a value is odd rather than ordinary. Most requests are
        # nearly valid, so they reach the routing, the adapters and the reply mapping; some are odd all over.
        self.wild = 0.1

    def plain(self) -> bool:
        """True: draw an ordinary value this time."""
        return self.r.random() >= self.wild

    def chance(self, p: float) -> bool:
        return self.r.random() < p

    def text(self, huge: float = 0.01) -> str:
        r = self.r
        if self.plain():
            return " ".join(
                r.choice(["hello", "weather", "Paris", "tool", "42", "é", "🙂"]) for _ in range(r.randint(1, 8))
            )
        pick = r.random()
        if pick < huge:
            return r.choice(string.ascii_letters) * r.choice([20_000, 20_001, 65_536, 200_001])
        if pick < 0.35:
            return r.choice(_SPECIAL)
        if pick < 0.7:
            lo, hi = r.choice(_UNICODE_RANGES)
            return "".join(chr(r.randint(lo, hi)) for _ in range(r.randint(0, 40)))
        return " ".join(
            r.choice(["hello", "weather", "Paris", "tool", "42", "é", "🙂"]) for _ in range(r.randint(1, 8))
        )

    def name(self) -> str:
        if self.plain():
            return self.r.choice(["get_weather", "lookup", "search_docs"])
        return self.r.choice(
            ["get_weather", "f", "", "a" * 300, "with space", "名前", "x-y.z", "1abc", "$ref", self.text()]
        )

    def enum(self, values: list[int]) -> int:
        if self.plain():
            return self.r.choice(values)
        return self.r.choice([*values, *values, -1, 7, 99, 2**31 - 1, -(2**31)])

    def int32(self) -> int:
        if self.plain():
            return self.r.choice([1, 16, 100, 1024, 4096])
        return self.r.choice(
            [0, 1, -1, 2, 16, 1024, 4096, 65_536, 200_000, 2**31 - 1, -(2**31), self.r.randint(-5, 10_000)]
        )

    def int64(self) -> int:
        return self.r.choice([0, -1, 2**63 - 1, -(2**63), 2**53 + 1, self.r.randint(-(2**40), 2**40)])

    def double(self) -> float:
        if self.plain():
            return self.r.choice([0.0, 0.2, 0.7, 1.0])
        return self.r.choice(
            [0.0, -0.0, 0.5, 1.0, 2.0, 2.0000001, -1.0, 1e308, -1e308, 5e-324, math.inf, -math.inf, math.nan, 0.3]
        )

    def blob(self) -> bytes:
        r = self.r
        pick = r.random()
        if pick < 0.2:
            return b""
        if pick < 0.4:
            return b"\x89PNG\r\n\x1a\n" + r.randbytes(r.randint(0, 64))
        if pick < 0.5:
            return b"%PDF-1.7\n" + r.randbytes(32)
        if pick < 0.55:
            return r.randbytes(300_000)
        return r.randbytes(r.randint(1, 256))

    def url(self) -> str:
        if self.plain():
            return self.r.choice(["https://example.com/cat.png", "gs://bucket/doc.pdf"])
        return self.r.choice(
            [
                "",
                "https://example.com/cat.png",
                "http://169.254.169.254/latest/meta-data/",
                "file:///etc/passwd",
                "javascript:alert(1)",
                "data:image/png;base64,iVBORw0KGgo=",
                "data:;base64,@@@",
                "gs://bucket/doc.pdf",
                "https://" + "a" * 3000 + ".com",
                "ftp://x",
                "https://exa mple.com/\x00",
                self.text(),
            ]
        )

    def media_type(self) -> str:
        if self.plain():
            return self.r.choice(["", "image/png", "image/jpeg", "application/pdf"])
        return self.r.choice(
            [
                "",
                "image/png",
                "image/jpeg",
                "image/gif",
                "image/webp",
                "image/svg+xml",
                "application/pdf",
                "text/plain",
                "audio/wav",
                "x/y",
                "image/",
                "image/png; charset=utf-8",
                self.text(),
            ]
        )

    def json_value(self, depth: int = 0) -> Any:
        r = self.r
        pick = r.random()
        if depth > 4 or pick < 0.3:
            return r.choice([None, True, False, 0, -1, 1e308, 2**53, self.double(), self.text(), "", []])
        if pick < 0.5:
            return [self.json_value(depth + 1) for _ in range(r.randint(0, 4))]
        return {self.key(): self.json_value(depth + 1) for _ in range(r.randint(0, 4))}

    def key(self) -> str:
        return self.r.choice(
            [
                "type",
                "properties",
                "required",
                "items",
                "$ref",
                "enum",
                "model",
                "messages",
                "stream",
                "tools",
                "max_tokens",
                "n",
                "input",
                "contents",
                "system",
                "",
                "a.b",
                "名前",
                "additionalProperties",
                self.text(),
            ]
        )

    def struct(self) -> struct_pb2.Struct:
        s = struct_pb2.Struct()
        pick = self.r.random()
        if pick < 0.1:
            deep: dict[str, Any] = {}
            node = deep
            for _ in range(self.r.choice([30, 60, 90])):
                node["a"] = {}
                node = node["a"]
            value: Any = deep
        elif pick < 0.25:
            value = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
        else:
            value = self.json_value()
        if not isinstance(value, dict):
            value = {self.key(): value}
        with contextlib.suppress(ValueError, TypeError):
            s.update(value)
        return s

    def schema(self) -> struct_pb2.Struct:
        r = self.r
        if r.random() < 0.5:
            return self.struct()
        s = struct_pb2.Struct()
        options: list[dict[str, Any]] = [
            {"type": "object", "properties": {}},
            {"type": "object", "properties": {"x": {"type": self.text()}}},
            {"type": "array"},
            {"type": 5},
            {"$ref": "#"},
            {"$ref": "#/definitions/loop", "definitions": {"loop": {"$ref": "#/definitions/loop"}}},
            {"type": "object", "required": ["missing"], "additionalProperties": False},
            {"anyOf": [], "oneOf": [{}]},
            {"type": ["object", "null"], "properties": {"a": {"enum": []}}},
            {"properties": "not an object"},
        ]
        s.update(r.choice(options))
        return s


def _breakpoint(o: Odd) -> pb.CacheBreakpoint | None:
    return pb.CacheBreakpoint(ttl=pb.CacheTtl.ValueType(o.enum([0, 1, 2]))) if o.chance(0.2) else None


def odd_part(o: Odd) -> pb.Part:
    if o.plain():
        return o.r.choice(
            [
                pb.Part(text=o.text()),
                pb.Part(image=pb.ImagePart(data=_PNG, media_type="image/png")),
                pb.Part(image=pb.ImagePart(url="https://example.com/cat.png")),
                pb.Part(document=pb.DocumentPart(data=b"%PDF-1.7\n%%EOF", media_type="application/pdf", title="doc")),
                pb.Part(audio=pb.AudioPart(data=b"RIFF\x24\x00\x00\x00WAVEfmt ", format="wav")),
            ]
        )
    kind = o.r.choice(["text", "image", "document", "audio", "empty"])
    part = pb.Part()
    if kind == "text":
        part.text = o.text()
    elif kind == "image":
        if o.chance(0.5):
            part.image.url = o.url()
        else:
            part.image.data = o.blob()
        part.image.media_type = o.media_type()
        part.image.detail = pb.ImageDetail.ValueType(o.enum([0, 1, 2, 3]))
    elif kind == "document":
        if o.chance(0.5):
            part.document.url = o.url()
        else:
            part.document.data = o.blob()
        part.document.media_type = o.media_type()
        part.document.title = o.text()
    elif kind == "audio":
        part.audio.data = o.blob()
        part.audio.format = o.r.choice(["wav", "mp3", "", "flac", o.text()])
    bp = _breakpoint(o)
    if bp is not None:
        part.cache_breakpoint.CopyFrom(bp)
    return part


def odd_arguments(o: Odd) -> str:
    if o.plain():
        return '{"city": "Paris"}'
    return o.r.choice(
        [
            '{"city": "Paris"}',
            "",
            "{",
            "[]",
            "null",
            "42",
            '"str"',
            '{"a": NaN}',
            "[" * 5000 + "]" * 5000,
            '{"a": 1e999}',
            '{"a":"\\ud800"}',
            o.text(),
            json.dumps(o.json_value()),
        ]
    )


_PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def plain_conversation(o: Odd, req: Any) -> None:
    """A valid conversation, a tool round trip some of the time: what most callers send."""
    if o.chance(0.3):
        req.messages.append(pb.Message(role=pb.ROLE_SYSTEM, content="Be brief."))
    first = pb.Message(role=pb.ROLE_USER, content=o.text())
    if o.chance(0.2):
        first.parts.extend(odd_part(o) for _ in range(o.r.randint(1, 2)))
    req.messages.append(first)
    if o.chance(0.3):
        call = pb.ToolCall(id="call_1", name="get_weather", arguments=odd_arguments(o))
        req.messages.append(pb.Message(role=pb.ROLE_ASSISTANT, tool_calls=[call]))
        req.messages.append(
            pb.Message(role=pb.ROLE_TOOL, tool_call_id="call_1", content="sunny", is_error=o.chance(0.1))
        )
        req.messages.append(pb.Message(role=pb.ROLE_USER, content="thanks"))
        schema = struct_pb2.Struct()
        schema.update({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]})
        req.tools.append(pb.Tool(name="get_weather", description="Weather for a city", parameters=schema))


def odd_message(o: Odd) -> pb.Message:
    r = o.r
    m = pb.Message(role=pb.Role.ValueType(o.enum([1, 2, 2, 2, 3, 3, 4])))
    if r.random() < 0.8:
        m.content = o.text()
    if o.chance(0.2):
        m.name = o.name()
    if m.role == pb.ROLE_TOOL or o.chance(0.05):
        m.tool_call_id = r.choice(["call_1", "", "x" * 500, o.text()])
    if (m.role == pb.ROLE_ASSISTANT and o.chance(0.4)) or o.chance(0.03):
        for i in range(r.randint(1, 3)):
            m.tool_calls.append(
                pb.ToolCall(id=r.choice([f"call_{i}", "", o.text()]), name=o.name(), arguments=odd_arguments(o))
            )
    if o.chance(0.05):
        m.is_error = True
    if o.chance(0.25):
        if o.plain():
            m.ClearField("content")  # content or parts, not both
        m.parts.extend(odd_part(o) for _ in range(r.randint(1, 4)))
    bp = _breakpoint(o)
    if bp is not None:
        m.cache_breakpoint.CopyFrom(bp)
    if o.chance(0.1):
        m.thinking.append(
            pb.ThinkingBlock(
                text=o.text(),
                signature=r.choice(["", "sig", "gemini:abc", "gemini:", "rs:x", o.text()]),
                redacted_data=r.choice(["", "", "opaque", o.text()]),
            )
        )
    return m


def odd_chat(o: Odd, index: int, message_type: type[Any]) -> Any:
    r = o.r
    req = message_type()
    providers = list(MODELS)
    model = r.random()
    if model < 0.5:
        req.model = "any"
    elif model < 0.85:
        req.model = r.choice([m for ms in MODELS.values() for m in ms])
    else:
        req.model = r.choice(["", "nope", "GPT-4O", "any ", "mock/mock-fast", "openai/gpt-4o", o.text()])
    if o.chance(0.3):
        req.provider = r.choice([*providers, "", "nope", o.text()])
    if o.wild <= 0.05:
        plain_conversation(o, req)
    else:
        n = r.choice([0, 1, 1, 1, 2, 3, 5, 70]) if o.chance(0.95) else 0
        if n >= 1 and o.chance(0.8):
            req.messages.append(pb.Message(role=pb.ROLE_USER, content=o.text(huge=0.0) or "hi"))
            n -= 1
        req.messages.extend(odd_message(o) for _ in range(n))
    if o.chance(0.3):
        req.max_tokens = o.int32()
    if o.chance(0.2):
        req.temperature = o.double()
    if o.chance(0.15):
        req.top_p = o.double()
    if o.chance(0.1):
        count = r.choice([1, 2, 4]) if o.plain() else r.choice([1, 5, 20])
        req.stop.extend(r.choice(["\n", "END"]) if o.plain() else r.choice(["", o.text()]) for _ in range(count))
    if o.chance(0.1):
        req.seed = o.int64()
    if o.chance(0.15):
        req.response_format.type = o.enum([0, 1, 2, 3])
        if o.chance(0.6):
            req.response_format.json_schema.CopyFrom(o.schema())
        if o.chance(0.5):
            req.response_format.schema_name = o.name()
        req.response_format.strict = o.chance(0.5)
    if o.chance(0.2) and o.wild > 0.05:
        for _ in range(r.choice([1, 1, 2, 3, 130])):
            tool = req.tools.add(name=o.name(), description=o.text(), strict=o.chance(0.3))
            if o.chance(0.8):
                tool.parameters.CopyFrom(o.schema())
            bp = _breakpoint(o)
            if bp is not None:
                tool.cache_breakpoint.CopyFrom(bp)
    if o.chance(0.15):
        req.tool_choice.mode = o.enum([0, 1, 2, 3])
        if o.chance(0.5) and req.tool_choice.mode in (0, 3) and req.tools:
            req.tool_choice.function_name = req.tools[0].name if o.plain() else o.name()
    if o.chance(0.1):
        req.policy = o.enum([0, 1, 2, 3, 4, 5])
    if o.chance(0.1):
        for fname in ("max_attempts", "base_ms", "max_ms"):
            if o.chance(0.6):
                setattr(req.retry, fname, o.int32())
    if o.chance(0.1):
        req.cache = o.enum([0, 1])
    if o.chance(0.15):
        for _ in range(r.choice([1, 3, 40])):
            key = r.choice(["team", "app", "env"]) if o.plain() else r.choice(["", "k" * 300, o.text(huge=0.0)])
            req.tags[key] = o.text(huge=0.0)
    if o.chance(0.3):
        # Unique per call (a repeated request_id is one ledger record by design), odd in shape.
        req.request_id = (
            f"fz-{index}" if o.plain() else r.choice([f"fz-{index}-" + o.text(huge=0.0), f"fz-{index}-" + "x" * 300])
        )
        if o.chance(0.2):
            # A retry of an earlier call (maybe still in flight, maybe by another method): one ledger record.
            req.request_id = f"fz-{r.randrange(max(index, 1))}"
    if o.chance(0.1):
        req.parallel_tool_calls = o.chance(0.5)
    if o.chance(0.1):
        req.prompt_cache_key = o.text()
    if o.chance(0.15):
        req.reasoning.effort = o.enum([0, 1, 2, 3, 4, 5, 6])
        if o.chance(0.5):
            req.reasoning.thinking_budget_tokens = o.int32()
    if o.chance(0.15):
        req.extra_fields.CopyFrom(o.struct())
    return req


def _timestamp(o: Odd, ts: Any) -> None:
    seconds = o.r.choice(
        [0, -1, 1, int(time.time()), int(time.time()) + 3600, 253_402_300_799, 253_402_300_800, -62_135_596_801, 2**62]
    )
    nanos = o.r.choice([0, 0, 999_999_999, 1_000_000_000, -1, 2**31 - 1])
    ts.seconds = seconds
    ts.nanos = nanos


def odd_usage(o: Odd) -> pb.UsageRequest:
    r = o.r
    req = pb.UsageRequest()
    if o.chance(0.4):
        _timestamp(o, req.start_time)
    if o.chance(0.4):
        _timestamp(o, req.end_time)
    if o.chance(0.6):
        req.group_by.extend(
            pb.UsageGroupBy.ValueType(o.enum([1, 2, 3, 4, 5, 6])) for _ in range(r.choice([1, 1, 2, 3, 7]))
        )
    for fname in ("tenant", "provider", "model", "tag_key"):
        if o.chance(0.15):
            setattr(req, fname, r.choice(["", "member", "mock", "any", "team", "%", "_", "'", o.text()]))
    if o.chance(0.1):
        for _ in range(r.choice([1, 2, 30])):
            req.tags[r.choice(["team", "", o.text(huge=0.0)])] = o.text(huge=0.0)
    if o.chance(0.4):  # small pages most of the time: their next_page_token feeds odd_page
        req.page_size = r.choice([1, 2, 3, 10]) if o.plain() else o.int32()
    if o.chance(0.3):
        token_json = json.dumps(o.json_value())
        req.page_token = r.choice(
            [
                "",
                "x",
                "====",
                base64.urlsafe_b64encode(token_json.encode()).decode(),
                base64.urlsafe_b64encode(o.r.randbytes(40)).decode(),
                base64.urlsafe_b64encode(b'{"v":1,"after":["a",1]}').decode().rstrip("="),
                o.text(),
            ]
        )
    return req


def odd_list_models(o: Odd) -> pb.ListModelsRequest:
    return pb.ListModelsRequest(provider=o.r.choice(["", *MODELS, "nope", o.text()]) if o.chance(0.5) else "")


def odd_bytes(o: Odd, valid: bytes) -> bytes:
    r = o.r
    pick = r.random()
    if pick < 0.2 and valid:
        return valid[: r.randint(0, len(valid) - 1)]  # truncated
    if pick < 0.45 and valid:
        data = bytearray(valid)
        for _ in range(r.randint(1, 8)):
            data[r.randrange(len(data))] = r.randrange(256)
        return bytes(data)
    if pick < 0.6:
        return r.choice(
            [b"\x0a\xff\xff\xff\xff\x0f", b"\x1a\x05\x12\x03\xff\xfe\xfd", b"\x08" * 11, b"\x0a\x80", b"\xff"]
        )
    if pick < 0.7:
        return b"\x1a\x02\x1a\x00" * 64 + b"\x1a" + b"\x0a\x00" * 2  # nested messages, dangling tag
    return r.randbytes(r.randint(0, 200))


# -- metadata, deadlines ------------------------------------------------------------------------------------


def odd_metadata(o: Odd) -> tuple[list[tuple[str, str | bytes]], str]:
    """(metadata, who): who says which tenant should be seen, for the record counts."""
    r = o.r
    pick = r.random()
    md: list[tuple[str, str | bytes]] = []
    if pick < 0.6:
        md.append(("authorization", f"Bearer {MEMBER_KEY}"))
    elif pick < 0.7:
        md.append(("authorization", f"Bearer {POOR_KEY}"))
    elif pick < 0.8:
        md.append(("authorization", f"Bearer {ADMIN_KEY}"))
    elif pick < 0.9:
        claims: dict[str, Any] = {
            "tenant": r.choice(["jwt-team", "member", "", "x" * 200]),
            "exp": int(time.time()) + 600,
        }
        if o.chance(0.3):
            claims = r.choice(
                [
                    {"tenant": "t"},
                    {"exp": "soon", "tenant": "t"},
                    {"tenant": 5, "exp": claims["exp"]},
                    {"tenant": ["a"], "exp": claims["exp"]},
                    {"tenant": "t", "exp": 1},
                ]
            )
        secret = JWT_SECRET if o.chance(0.8) else "another-secret-" + "x" * 49
        alg = "HS256" if o.chance(0.9) else r.choice(["HS384", "HS512"])
        md.append(("authorization", "Bearer " + jwt.encode(claims, secret, algorithm=alg)))
    else:
        md.append(
            (
                "authorization",
                r.choice(
                    [
                        "",
                        "Bearer",
                        "Bearer ",
                        "bearer " + MEMBER_KEY,
                        MEMBER_KEY,
                        "Basic dXNlcjpwYXNz",
                        "Bearer x.y.z",
                        "Bearer eyJhbGciOiJub25lIn0.eyJ0ZW5hbnQiOiJ4In0.",
                        "Bearer " + "a" * 4000,
                        "Bearer  " + MEMBER_KEY,
                        f"Bearer {MEMBER_KEY} trailing",
                    ]
                ),
            )
        )
        if o.chance(0.2):
            md.append(("authorization", f"Bearer {MEMBER_KEY}"))  # a second one
    if o.chance(0.1):
        md.append(
            ("traceparent", r.choice(["", "00-zz-yy-01", "00-" + "0" * 32 + "-" + "0" * 16 + "-01", "ff-" + "a" * 100]))
        )
    if o.chance(0.05):
        md.append(("tracestate", "a=" + "b" * 600))
    if o.chance(0.05):
        md.append(("x-feather-start-probe", r.choice(["", "guess", "0" * 64])))
    if o.chance(0.05):
        md.append(("x-odd-bin", r.randbytes(r.randint(0, 64))))
    if o.chance(0.05):
        # gRPC refuses to send a header value outside printable ASCII: only such values are sent
        md.append(("x-request-id", "".join(c for c in o.text(huge=0.0) if " " <= c <= "~")))
    return md, ""


def odd_deadline(o: Odd) -> float | None:
    if o.chance(0.9):
        return o.r.choice([None, 30.0, 10.0])
    return o.r.choice([2.0, 0.2, 0.05, 0.01, 0.0001])


# -- odd upstream replies --------------------------------------------------------------------------------------


_OPENAI_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": "hi",
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            "finish_reason": "stop",
        }
    ],
    "usage": {
        "prompt_tokens": 3,
        "completion_tokens": 2,
        "total_tokens": 5,
        "prompt_tokens_details": {"cached_tokens": 1},
        "completion_tokens_details": {"reasoning_tokens": 1},
    },
}
_OPENAI_CHUNKS: list[dict[str, Any]] = [
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}],
    },
    {"id": "c", "object": "chat.completion.chunk", "model": "m", "choices": [{"index": 0, "delta": {"content": "hi"}}]},
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": {
                    "tool_calls": [
                        {"index": 0, "id": "call_1", "type": "function", "function": {"name": "f", "arguments": '{"a"'}}
                    ]
                },
            }
        ],
    },
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": {"arguments": ": 1}"}}]}}],
    },
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
    },
    {
        "id": "c",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    },
]
_ANTHROPIC_MESSAGE: dict[str, Any] = {
    "id": "msg_1",
    "type": "message",
    "role": "assistant",
    "model": "m",
    "content": [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "text", "text": "hi"},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
    ],
    "stop_reason": "end_turn",
    "stop_sequence": None,
    "usage": {"input_tokens": 3, "output_tokens": 2, "cache_read_input_tokens": 1, "cache_creation_input_tokens": 1},
}
_ANTHROPIC_EVENTS: list[dict[str, Any]] = [
    {
        "type": "message_start",
        "message": {**_ANTHROPIC_MESSAGE, "content": [], "usage": {"input_tokens": 3, "output_tokens": 1}},
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}},
    },
    {"type": "content_block_delta", "index": 1, "delta": {"type": "input_json_delta", "partial_json": '{"a": 1}'}},
    {"type": "content_block_stop", "index": 1},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {"output_tokens": 5},
    },
    {"type": "message_stop"},
]


_GEMINI_CANDIDATES: dict[str, Any] = {
    "candidates": [
        {
            "content": {
                "role": "model",
                "parts": [
                    {"text": "hmm", "thought": True},
                    {"text": "hi"},
                    {"functionCall": {"name": "f", "args": {"a": 1}}, "thoughtSignature": "sig"},
                ],
            },
            "finishReason": "STOP",
            "index": 0,
        }
    ],
    "usageMetadata": {
        "promptTokenCount": 3,
        "candidatesTokenCount": 2,
        "totalTokenCount": 6,
        "cachedContentTokenCount": 1,
        "thoughtsTokenCount": 1,
    },
    "modelVersion": "m",
    "responseId": "r",
}
_RESPONSE: dict[str, Any] = {
    "id": "resp_1",
    "object": "response",
    "status": "completed",
    "model": "o3",
    "output": [
        {
            "type": "reasoning",
            "id": "rs_1",
            "summary": [{"type": "summary_text", "text": "s"}],
            "encrypted_content": "e",
        },
        {
            "type": "message",
            "id": "msg_1",
            "role": "assistant",
            "status": "completed",
            "content": [{"type": "output_text", "text": "hi", "annotations": []}],
        },
        {
            "type": "function_call",
            "id": "fc_1",
            "call_id": "call_1",
            "name": "f",
            "arguments": "{}",
            "status": "completed",
        },
    ],
    "usage": {
        "input_tokens": 3,
        "input_tokens_details": {"cached_tokens": 1},
        "output_tokens": 2,
        "output_tokens_details": {"reasoning_tokens": 1},
        "total_tokens": 5,
    },
    "incomplete_details": None,
}
_RESPONSE_EVENTS: list[dict[str, Any]] = [
    {"type": "response.created", "response": {**_RESPONSE, "status": "in_progress", "output": []}},
    {"type": "response.output_item.added", "output_index": 0, "item": {**_RESPONSE["output"][1], "content": []}},
    {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "item_id": "msg_1", "delta": "hi"},
    {"type": "response.output_item.added", "output_index": 1, "item": {**_RESPONSE["output"][2], "arguments": ""}},
    {"type": "response.function_call_arguments.delta", "output_index": 1, "item_id": "fc_1", "delta": "{}"},
    {"type": "response.output_item.done", "output_index": 1, "item": _RESPONSE["output"][2]},
    {"type": "response.completed", "response": _RESPONSE},
]
_CONVERSE: dict[str, Any] = {
    "output": {
        "message": {
            "role": "assistant",
            "content": [
                {"reasoningContent": {"reasoningText": {"text": "t", "signature": "s"}}},
                {"text": "hi"},
                {"toolUse": {"toolUseId": "t1", "name": "f", "input": {"a": 1}}},
            ],
        }
    },
    "stopReason": "end_turn",
    "usage": {
        "inputTokens": 3,
        "outputTokens": 2,
        "totalTokens": 5,
        "cacheReadInputTokens": 1,
        "cacheWriteInputTokens": 1,
    },
    "metrics": {"latencyMs": 1},
}
_CONVERSE_EVENTS: list[tuple[str, dict[str, Any]]] = [
    ("messageStart", {"role": "assistant"}),
    ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"text": "t"}}}),
    ("contentBlockDelta", {"contentBlockIndex": 0, "delta": {"reasoningContent": {"signature": "s"}}}),
    ("contentBlockStop", {"contentBlockIndex": 0}),
    ("contentBlockDelta", {"contentBlockIndex": 1, "delta": {"text": "hi"}}),
    ("contentBlockStop", {"contentBlockIndex": 1}),
    ("contentBlockStart", {"contentBlockIndex": 2, "start": {"toolUse": {"toolUseId": "t1", "name": "f"}}}),
    ("contentBlockDelta", {"contentBlockIndex": 2, "delta": {"toolUse": {"input": "{}"}}}),
    ("contentBlockStop", {"contentBlockIndex": 2}),
    ("messageStop", {"stopReason": "tool_use"}),
    ("metadata", {"usage": {"inputTokens": 3, "outputTokens": 2, "totalTokens": 5}, "metrics": {"latencyMs": 1}}),
]


def _sse(o: Odd, events: list[dict[str, Any]], named: bool, tail: bytes = b"", sep: bytes = b"\n\n") -> bytes:
    """An SSE body of `events`, some of them mutated; `named`: each with its `event:` line (its type)."""
    out = b""
    for e in events:
        e = mutated(o, e) if o.chance(0.3) else e
        name = str(e.get("type")) if isinstance(e, dict) else "x"
        out += (b"event: " + name.encode() + b"\n" if named else b"") + b"data: " + json.dumps(e).encode() + sep
    return out + tail


def odd_cloud_body(o: Odd, provider: str) -> Any:
    """A raw reply for the Gemini, Responses or Bedrock simulator, mutated (whole, or streamed)."""
    stream = o.chance(0.5)
    if provider in ("gemini", "vertex"):
        if stream:
            chunks = [
                {**_GEMINI_CANDIDATES, "candidates": [{"content": {"role": "model", "parts": [p]}, "index": 0}]}
                for p in _GEMINI_CANDIDATES["candidates"][0]["content"]["parts"]
            ]
            chunks[-1] = _GEMINI_CANDIDATES
            return GeminiReply(body=_sse(o, chunks, False, sep=b"\r\n\r\n"), content_type="text/event-stream")
        return GeminiReply(body=json.dumps(mutated(o, _GEMINI_CANDIDATES)).encode())
    if provider == "responses":
        if stream:
            return ResponsesReply(body=_sse(o, _RESPONSE_EVENTS, True), content_type="text/event-stream")
        return ResponsesReply(body=json.dumps(mutated(o, _RESPONSE)).encode())
    if stream:
        frames = b""
        for kind, payload in _CONVERSE_EVENTS:
            if o.chance(0.3):
                payload = mutated(o, payload)
            if o.chance(0.03):
                kind = o.r.choice(["", "unknownEvent", "metadata", o.text(huge=0.0)[:50]])
            headers = {":event-type": kind, ":content-type": "application/json", ":message-type": "event"}
            frames += encode_event(headers, json.dumps(payload).encode())
        if o.chance(0.1):
            frames = frames[: o.r.randrange(len(frames))]  # cut inside a frame
        elif o.chance(0.1):
            data = bytearray(frames)
            data[o.r.randrange(len(data))] ^= 0xFF  # a flipped byte: a CRC no longer matches
            frames = bytes(data)
        return BedrockReply(body=frames, content_type="application/vnd.amazon.eventstream")
    return BedrockReply(body=json.dumps(mutated(o, _CONVERSE)).encode())


def _slots(node: Any, out: list[tuple[Any, Any]]) -> list[tuple[Any, Any]]:
    """Every (container, key) pair under `node`, depth first."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for k, v in items:
        out.append((node, k))
        _slots(v, out)
    return out


def mutated(o: Odd, doc: Any) -> Any:
    """A deep copy of `doc` with one to three leaves or containers replaced by a value of another type, or
    removed: the reply mapping must refuse it (UPSTREAM_BAD_RESPONSE) or make sense of it, never crash."""
    doc = json.loads(json.dumps(doc))
    for _ in range(o.r.randint(1, 3)):
        slots = _slots(doc, [])
        if not slots:
            break
        parent, key = o.r.choice(slots)
        if isinstance(parent, dict) and o.chance(0.25):
            del parent[key]
        else:
            parent[key] = o.r.choice(
                [
                    None,
                    "",
                    "x",
                    0,
                    -1,
                    2**63,
                    1.5,
                    1e308,
                    True,
                    [],
                    {},
                    [None],
                    {"": None},
                    "\u0000",
                    "é" * 50,
                    o.text(),
                ]
            )
    return doc


def odd_body(o: Odd, provider: str) -> Reply:
    """A raw reply body in the provider's format, mutated: a whole JSON reply or an SSE stream."""
    stream = o.chance(0.5)
    if provider == "anthropic":
        if stream:
            events = [mutated(o, e) if o.chance(0.3) else e for e in _ANTHROPIC_EVENTS]
            body = b"".join(
                b"event: "
                + str(e.get("type") if isinstance(e, dict) else "x").encode()
                + b"\ndata: "
                + json.dumps(e).encode()
                + b"\n\n"
                for e in events
            )
            return Reply(body=body, content_type="text/event-stream")
        return Reply(body=json.dumps(mutated(o, _ANTHROPIC_MESSAGE)).encode())
    if stream:
        chunks = [mutated(o, c) if o.chance(0.3) else c for c in _OPENAI_CHUNKS]
        body = b"".join(b"data: " + json.dumps(c).encode() + b"\n\n" for c in chunks) + b"data: [DONE]\n\n"
        return Reply(body=body, content_type="text/event-stream")
    return Reply(body=json.dumps(mutated(o, _OPENAI_COMPLETION)).encode())


def odd_reply(o: Odd, sims: Sims, provider: str) -> None:
    """Script the simulator behind `provider` to answer its next request oddly."""
    r = o.r
    if provider in ("openai", "anthropic", "compat", "azure"):
        sim: UpstreamSimulator = sims.azure if provider == "azure" else sims.upstream
        usage = SimUsage(
            input=r.choice([0, 5, -3, 2**40]),
            output=r.choice([0, 2, -1, 2**40]),
            cached=r.choice([0, 3, 100, -2]),
            cache_write=r.choice([0, 4]),
            reasoning=r.choice([0, 7, 99]),
            cache_write_1h=r.choice([0, 1, 10]),
        )
        options: list[Callable[[], Reply]] = [
            lambda: Reply(status=r.choice([400, 401, 403, 404, 408, 409, 413, 422, 429, 500, 502, 503, 529, 418, 302])),
            lambda: Reply(
                status=r.choice([429, 503]),
                retry_after=r.choice(["0", "-1", "1e9", "soon", "Wed, 21 Oct 2015 07:28:00 GMT", "0.001"]),
            ),
            lambda: Reply(
                body=r.choice(
                    [
                        b"",
                        b"null",
                        b"[]",
                        b"{",
                        b'{"choices": []}',
                        b'{"choices": [{}]}',
                        b'{"content": 5}',
                        b"\xff\xfe",
                        b'{"choices":[{"message":{"content":5}}]}',
                        b'{"type":"message","content":[{"type":"text"}]}',
                        b'{"usage": {"prompt_tokens": "x"}}',
                    ]
                ),
                status=r.choice([200, 200, 400, 500]),
            ),
            lambda: Reply(body=b"<html>bad gateway</html>", content_type="text/html", status=r.choice([200, 502])),
            lambda: Reply(content=o.text()),
            lambda: Reply(content=o.text(), usage=usage),
            lambda: Reply(omit_usage=True),
            lambda: Reply(usage_every_chunk=True, usage=usage),
            lambda: Reply(
                finish_reason=r.choice(
                    ["", "weird", "content_filter", "length", "max_tokens", "function_call", "refusal", "pause_turn"]
                )
            ),
            # Anthropic's tool_use input is an object: the simulator sends arguments parsed, so they must parse.
            lambda: Reply(
                tool_calls=(
                    SimToolCall(
                        name=o.name(),
                        arguments=odd_arguments(o) if provider != "anthropic" else json.dumps({"a": o.json_value()}),
                        id=r.choice(["", "x", o.text()]),
                    ),
                )
            ),
            lambda: Reply(
                tool_calls=(SimToolCall(name="f", arguments="{" if provider != "anthropic" else "{}"),),
                legacy_function_call=True,
            ),
            lambda: Reply(thinking=(o.text(), "redacted:" + o.text())),
            lambda: Reply(
                model=o.text(),
                system_fingerprint=o.text(),
                service_tier=o.text(),
                stop_sequence=o.text(),
                refusal=o.text(),
            ),
            lambda: Reply(ignore_stream=True),
            lambda: Reply(drop=True),
            lambda: Reply(truncate_body=True),
            lambda: Reply(cut_after=r.randint(0, 4)),
            lambda: Reply(reset_after=r.randint(0, 4)),
            lambda: Reply(
                error_after=r.randint(0, 4),
                stream_error_type=r.choice(["overloaded_error", "api_error", "invalid_request_error", "weird"]),
            ),
            lambda: Reply(split="awkward", piece_delay_s=0.001),
            lambda: Reply(
                split=r.choice([1, 3, 7]), line_ending=r.choice(["\n", "\r\n", "\r"]), pings=True, comments=True
            ),
            lambda: Reply(latency_s=r.choice([0.05, 0.3])),
            lambda: odd_body(o, provider),
            lambda: odd_body(o, provider),
            lambda: odd_body(o, provider),
        ]
        # One simulator serves openai, compat and anthropic: the reply goes to the path of the provider's format.
        path = None if provider == "azure" else ANTHROPIC_PATH if provider == "anthropic" else OPENAI_PATH
        sim.enqueue(r.choice(options)(), path=path)
    elif provider == "bedrock":
        options_b: list[Callable[[], BedrockReply]] = [
            lambda: BedrockReply(
                status=r.choice([400, 403, 404, 408, 429, 500, 503]),
                error_type=r.choice(
                    [
                        "ThrottlingException",
                        "ValidationException",
                        "ServiceQuotaExceededException",
                        "ModelNotReadyException",
                        "Weird",
                    ]
                ),
            ),
            lambda: BedrockReply(
                text=o.text(),
                input_tokens=r.choice([0, -1, 2**40]),
                output_tokens=r.choice([0, -5]),
                cache_read=r.choice([0, 9]),
                cache_write=r.choice([0, 3]),
                cache_write_1h=r.choice([0, 2, 50]),
            ),
            lambda: BedrockReply(tool_uses=((o.name(), o.json_value() if o.chance(0.5) else {"a": 1}),)),
            lambda: BedrockReply(
                stop_reason=r.choice(
                    ["weird", "max_tokens", "guardrail_intervened", "content_filtered", "tool_use", ""]
                )
            ),
            lambda: BedrockReply(reasoning=o.text(), signature=o.text()),
            lambda: BedrockReply(omit_usage=True),
            lambda: BedrockReply(
                exception_after=r.randint(0, 5),
                error_type=r.choice(["ThrottlingException", "ModelStreamErrorException", "Weird"]),
            ),
            lambda: BedrockReply(stream_pieces=r.choice([2, 7, 50])),
            lambda: odd_cloud_body(o, provider),
            lambda: odd_cloud_body(o, provider),
        ]
        sims.bedrock.enqueue(r.choice(options_b)())
    elif provider in ("gemini", "vertex"):
        options_g: list[Callable[[], GeminiReply]] = [
            lambda: GeminiReply(status=r.choice([400, 401, 403, 404, 429, 500, 503])),
            lambda: GeminiReply(
                text=o.text(),
                prompt_tokens=r.choice([0, -1, 2**40]),
                candidates_tokens=r.choice([0, -3]),
                cached_tokens=r.choice([0, 5, 10**6]),
                thoughts_tokens=r.choice([0, 4]),
            ),
            lambda: GeminiReply(
                function_calls=((o.name(), o.json_value() if o.chance(0.5) else {"a": 1}),), signature=o.text()
            ),
            lambda: GeminiReply(thought=o.text(), signature=o.text()),
            lambda: GeminiReply(
                finish_reason=r.choice(
                    ["SAFETY", "RECITATION", "MAX_TOKENS", "WEIRD", "", "MALFORMED_FUNCTION_CALL", "OTHER"]
                )
            ),
            lambda: GeminiReply(block_reason=r.choice(["SAFETY", "OTHER", "WEIRD"])),
            lambda: GeminiReply(error_after=r.randint(0, 4)),
            lambda: odd_cloud_body(o, provider),
            lambda: odd_cloud_body(o, provider),
        ]
        sims.gemini.enqueue(r.choice(options_g)())
    elif provider == "responses":
        options_r: list[Callable[[], ResponsesReply]] = [
            lambda: ResponsesReply(
                status=r.choice([400, 401, 404, 429, 500, 503]),
                error_code=r.choice(["server_error", "rate_limit_exceeded", "context_length_exceeded", "weird"]),
            ),
            lambda: ResponsesReply(
                text=o.text(),
                input_tokens=r.choice([0, -1, 2**40]),
                output_tokens=r.choice([0, -2]),
                cached=r.choice([0, 7, 10**6]),
                reasoning_tokens=r.choice([0, 3]),
            ),
            lambda: ResponsesReply(function_calls=((o.name(), odd_arguments(o)),)),
            lambda: ResponsesReply(reasoning=o.text(), summary=(o.text(), "")),
            lambda: ResponsesReply(refusal=o.text() or "no"),
            lambda: ResponsesReply(incomplete=r.choice(["max_output_tokens", "content_filter", "weird"])),
            lambda: ResponsesReply(error_after=r.randint(0, 6), error_code=r.choice(["server_error", "weird"])),
            lambda: odd_cloud_body(o, provider),
            lambda: odd_cloud_body(o, provider),
        ]
        sims.responses.enqueue(r.choice(options_r)())


# -- running ---------------------------------------------------------------------------------------------------


@dataclass
class Finding:
    kind: str  # "status" | "no-errorinfo" | "hang" | "log"
    what: str
    request: str


@dataclass
class Report:
    requests: int = 0
    by_method: Counter[str] = field(default_factory=Counter)
    codes: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    client_side: Counter[str] = field(default_factory=Counter)  # statuses the client library made itself
    findings: list[Finding] = field(default_factory=list)
    chat_answered: int = 0  # Chat/StreamChat calls the gateway answered (OK or a status with ErrorInfo)
    repeats: int = 0  # of those, calls that repeated an earlier call's request_id (one record per id)
    recorded: int = -1  # the ledger's request_count at the end (-1: not read)
    violations: Counter[str] = field(default_factory=Counter)  # INVALID_REQUEST field paths
    served: Counter[str] = field(default_factory=Counter)  # Chat/StreamChat answers per provider
    oversized: list[tuple[str, Any, Any, float | None]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def bugs(self) -> list[Finding]:
        return self.findings

    def summary(self, show: int = 3) -> str:
        lines = [
            f"{self.requests} requests in {self.seconds:.1f} s: "
            + ", ".join(f"{m} {n}" for m, n in sorted(self.by_method.items())),
            "statuses: " + ", ".join(f"{c} {n}" for c, n in self.codes.most_common()),
            "reasons: " + ", ".join(f"{c} {n}" for c, n in self.reasons.most_common()),
            "invalid fields: " + ", ".join(f"{c} {n}" for c, n in self.violations.most_common(25)),
            "made by gRPC itself, no ErrorInfo (the client's deadline or cancel, transport limits): "
            + (", ".join(f"{c} {n}" for c, n in self.client_side.most_common()) or "none"),
            "served by: " + ", ".join(f"{c} {n}" for c, n in self.served.most_common()),
            f"Chat/StreamChat answered by the gateway: {self.chat_answered} ({self.repeats} repeating an earlier"
            f" request_id); recorded in the ledger: {self.recorded}",
        ]
        kinds = Counter(f.kind + ": " + f.what for f in self.findings)
        lines.append(f"bugs: {len(self.findings)}" + "".join(f"\n  {n} x {k}" for k, n in kinds.most_common()))
        shown: Counter[str] = Counter()
        for f in self.findings:
            key = f.kind + f.what
            if shown[key] < show:
                shown[key] += 1
                lines.append(f"--- {f.kind}: {f.what}\n{f.request[:3000]}")
        return "\n".join(lines)


class ErrorLogs(logging.Handler):
    """Collects every log record at ERROR or above that carries a traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        # aiohttp.server's are the simulators' own (a scripted reply they cannot encode), not the gateway's.
        if (record.exc_info or record.stack_info) and not record.name.startswith("aiohttp.server"):
            self.records.append(record)


def _error_info(err: grpc.aio.AioRpcError) -> str | None:
    """The ErrorInfo reason the status carries, or None when it carries none."""
    return _details(err)[0]


def _details(err: grpc.aio.AioRpcError) -> tuple[str | None, list[str]]:
    """(the ErrorInfo reason or None, the BadRequest field paths with indexes as [i])."""
    try:
        status = rpc_status.from_call(err)
    except ValueError:
        return None, []
    if status is None:
        return None, []
    reason, fields = None, []
    for d in status.details:
        if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR) and reason is None:
            info = error_details_pb2.ErrorInfo()
            d.Unpack(info)
            reason = str(info.reason)
        elif d.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            br = error_details_pb2.BadRequest()
            d.Unpack(br)
            fields += [re.sub(r"\[\d+\]|\.\d+(?=\.|$)", "[i]", v.field) for v in br.field_violations]
    return reason, fields


def _describe(method: str, request: Any, metadata: Any, deadline: float | None) -> str:
    if isinstance(request, bytes):
        body = "raw bytes " + request[:200].hex()
    else:
        body = str(request)
        if len(body) > 2500:
            body = body[:2500] + f"... ({len(body)} chars)"
    md = [(k, v if isinstance(v, bytes) or len(v) < 120 else v[:120] + "...") for k, v in metadata]
    return f"{method} deadline={deadline} metadata={md}\n{body}"


class Fuzzer:
    def __init__(self, stack: Stack, seed: int, odd_replies: float = 0.25) -> None:
        self.stack = stack
        self.rng = random.Random(seed)
        self.odd = Odd(self.rng)
        self.odd_replies = odd_replies
        self.report = Report()
        # (query, its next_page_token, the caller's metadata) of Usage replies that had another page
        self.pages: list[tuple[pb.UsageRequest, str, Any]] = []
        self.page_metadata: Any = None
        self.request_ids: set[str] = set()
        self.cancel_after: int | None = None
        self.raw = {
            m: (
                stack.channel.unary_stream(SERVICE + m) if m == "StreamChat" else stack.channel.unary_unary(SERVICE + m)
            )
            for m in METHODS
        }

    def odd_page(self, o: Odd) -> pb.UsageRequest:
        """A query that had a next page, asking for it with its real token, or the token's `after` made odd
        (the token is unsigned JSON: a caller can write any value into it)."""
        query, token, self.page_metadata = o.r.choice(self.pages)
        request = pb.UsageRequest()
        request.CopyFrom(query)
        request.page_size = o.r.choice([1, 2, 3])
        if o.chance(0.3):
            request.page_token = token
            return request
        body = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        odd_values: list[Any] = [
            10**30,
            -(2**63) - 1,
            2**63,
            -1,
            1.5,
            True,
            None,
            "",
            "\x00",
            "\ud800",
            "a" * 70_000,
            [],
            {},
            o.text(),
        ]
        after = [o.r.choice(odd_values) if o.chance(0.6) else v for v in body["after"]]
        if o.chance(0.2):
            after = after[:-1] if o.chance(0.5) else [*after, o.r.choice(odd_values)]
        body["after"] = after
        raw = json.dumps(body, ensure_ascii=o.chance(0.5)).encode("utf-8", "surrogatepass")
        if o.chance(0.1):
            raw = raw.replace(b"[", b"[NaN,", 1) if o.chance(0.5) else raw.replace(b"]", b",1e999]", 1)
        request.page_token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
        return request

    def next_call(self, index: int) -> tuple[str, Any, list[tuple[str, str | bytes]], float | None]:
        o = self.odd
        o.wild = o.r.choice([0.0, 0.02, 0.05, 0.1, 0.1, 0.3, 0.6])
        method = o.r.choice(["Chat", "Chat", "Chat", "StreamChat", "StreamChat", "StreamChat", "Usage", "ListModels"])
        request: Any
        if method == "Chat":
            request = odd_chat(o, index, pb.ChatRequest)
        elif method == "StreamChat":
            request = odd_chat(o, index, pb.StreamChatRequest)
        elif method == "Usage":
            request = odd_usage(o)
        else:
            request = odd_list_models(o)
        if method == "Usage" and self.pages and o.chance(0.5):
            request = self.odd_page(o)
        if o.chance(0.06):
            request = odd_bytes(o, request.SerializeToString())
        if method in ("Chat", "StreamChat") and not isinstance(request, bytes) and o.chance(self.odd_replies):
            provider = request.provider if request.provider in MODELS else o.r.choice(list(MODELS))
            odd_reply(o, self.stack.sims, provider)
        metadata, _ = odd_metadata(o)
        if self.page_metadata is not None:  # a page token is the tenant's own: ask as that tenant
            metadata, self.page_metadata = self.page_metadata, None
        return method, request, metadata, odd_deadline(o)

    async def call(self, index: int) -> None:
        method, request, metadata, deadline = self.next_call(index)
        # Some streams the caller walks away from after a few events: the gateway must cancel, bill and record.
        self.cancel_after = self.odd.r.choice([1, 2, 3]) if self.odd.chance(0.1) else None
        request_id = getattr(request, "request_id", "")
        repeat = bool(request_id) and request_id in self.request_ids
        self.request_ids.add(request_id)
        self.report.requests += 1
        self.report.by_method[method + (" (raw)" if isinstance(request, bytes) else "")] += 1
        limit = (deadline if deadline is not None else 8.0) + 10.0
        try:
            async with asyncio.timeout(limit):
                await self._send(method, request, metadata, deadline)
            self.report.codes["OK"] += 1
            if method in ("Chat", "StreamChat"):
                self.report.chat_answered += 1
                self.report.repeats += repeat
        except TimeoutError:
            self._found("hang", f"{method} did not end within {limit:.0f} s", method, request, metadata, deadline)
        except grpc.aio.AioRpcError as err:
            if self._status(err, method, request, metadata, deadline) and method in ("Chat", "StreamChat"):
                self.report.chat_answered += 1
                self.report.repeats += repeat
        except (ValueError, TypeError) as e:  # metadata the client library refuses to send
            self.report.client_side[f"refused by the client: {type(e).__name__}"] += 1

    async def _send(self, method: str, request: Any, metadata: Any, deadline: float | None) -> None:
        stub = self.stack.stub
        if isinstance(request, bytes):
            if method == "StreamChat":
                async for _ in self.raw[method](request, metadata=metadata, timeout=deadline):
                    pass
            else:
                await self.raw[method](request, metadata=metadata, timeout=deadline)
            return
        if method == "StreamChat":
            call, seen, cancel_after = (
                stub.StreamChat(request, metadata=metadata, timeout=deadline),
                0,
                self.cancel_after,
            )
            async for event in call:
                if event.HasField("start"):
                    self.report.served[event.start.provider] += 1
                seen += 1
                if cancel_after is not None and seen >= cancel_after and not event.HasField("end"):
                    call.cancel()
                    self.report.client_side["CANCELLED by the fuzzer mid-stream (answered)"] += 1
                    break
        elif method == "Chat":
            self.report.served[(await stub.Chat(request, metadata=metadata, timeout=deadline)).provider] += 1
        elif method == "Usage":
            reply = await stub.Usage(request, metadata=metadata, timeout=deadline)
            if reply.next_page_token and len(self.pages) < 200:
                self.pages.append((request, reply.next_page_token, metadata))
        else:
            await stub.ListModels(request, metadata=metadata, timeout=deadline)

    def _status(
        self, err: grpc.aio.AioRpcError, method: str, request: Any, metadata: Any, deadline: float | None
    ) -> bool:
        """Counts one error status; True when the gateway sent it with a reason (the call was answered)."""
        code = err.code()
        reason, fields = _details(err)
        self.report.violations.update(set(fields))
        if "metadata size exceeds" in (err.details() or ""):
            # The gateway's trailers (the status and its details) are too large for a client to read: a bug.
            # The same call on a channel that reads them says which status it was.
            self.report.oversized.append((method, request, metadata, deadline))
            return False
        if reason is None and code in CLIENT_SIDE:
            self.report.client_side[f"{code.name}: {(err.details() or '')[:60]}"] += 1
            return False
        self.report.codes[code.name] += 1
        if reason is not None:
            self.report.reasons[f"{code.name} {reason}"] += 1
        if code in BAD_CODES and reason not in EXPECTED_INTERNAL:
            self._found(
                "status", f"{code.name} {reason}: {(err.details() or '')[:160]}", method, request, metadata, deadline
            )
        elif reason is None:
            self._found(
                "no-errorinfo", f"{code.name}: {(err.details() or '')[:160]}", method, request, metadata, deadline
            )
        return reason is not None

    def _found(self, kind: str, what: str, method: str, request: Any, metadata: Any, deadline: float | None) -> None:
        self.report.findings.append(Finding(kind, what, _describe(method, request, metadata, deadline)))

    async def run(self, requests: int, concurrency: int) -> Report:
        started = time.monotonic()
        queue = iter(range(requests))

        async def worker() -> None:
            for index in queue:
                await self.call(index)
                if index % 500 == 0:
                    self.stack.sims.forget()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        self.report.seconds = time.monotonic() - started
        return self.report

    async def explain_oversized(self) -> None:
        """Each call whose trailers a client could not read, sent again on a channel that reads them."""
        options = [("grpc.max_metadata_size", 4 * 1024 * 1024), ("grpc.max_send_message_length", -1)]
        async with grpc.aio.insecure_channel(self.stack.address, options=options) as channel:
            stub = pb_grpc.FeatherServiceStub(channel)
            for method, request, metadata, deadline in self.report.oversized:
                what = "no error the second time"
                try:
                    if method == "StreamChat":
                        async for _ in stub.StreamChat(request, metadata=metadata, timeout=30):
                            pass
                    else:
                        await getattr(stub, method)(request, metadata=metadata, timeout=30)
                except grpc.aio.AioRpcError as err:
                    size = sum(len(k) + len(v) for k, v in (err.trailing_metadata() or ()))
                    reason, fields = _details(err)
                    what = (
                        f"{err.code().name} {reason}: trailers {size} bytes, message {len(err.details() or '')}"
                        f" chars, violations {dict(Counter(fields))}"
                    )
                self._found("oversized-trailers", what.split(":")[0], method, request, metadata, deadline)
                self.report.findings[-1].request = what + "\n" + self.report.findings[-1].request

    async def ledger_count(self) -> int:
        """Every call the ledger holds (an admin's Usage total), once the writer has caught up."""
        admin = (("authorization", f"Bearer {ADMIN_KEY}"),)
        last = -1
        for _ in range(100):
            total = (await self.stack.stub.Usage(pb.UsageRequest(), metadata=admin, timeout=30)).total.request_count
            if total == last and total >= self.report.chat_answered - self.report.repeats:
                break
            last = total
            await asyncio.sleep(0.1)
        return int(last)


async def fuzz(
    seed: int = 1, requests: int = 30_000, concurrency: int = 32, odd_replies: float = 0.25, serve: bool = False
) -> Report:
    """Run the fuzzer against a fresh stack; the report's `findings` are the bugs."""
    logs = ErrorLogs()
    root = logging.getLogger()
    root.addHandler(logs)
    try:
        async with fuzz_stack(serve) as stack:
            fuzzer = Fuzzer(stack, seed, odd_replies)
            report = await fuzzer.run(requests, concurrency)
            await fuzzer.explain_oversized()
            report.recorded = await fuzzer.ledger_count()
            if stack.process is not None:
                _process_findings(stack.process, report)
    finally:
        root.removeHandler(logs)
    for record in logs.records:
        text = logging.Formatter().format(record)
        report.findings.append(Finding("log", f"{record.name}: {record.getMessage()[:160]}", text[-3000:]))
    return report


def _process_findings(process: GatewayProcess, report: Report) -> None:
    """--serve: the subprocess must still run, and log no ERROR line with a traceback."""
    if process.proc.poll() is not None:
        report.findings.append(Finding("crash", f"exited with {process.proc.returncode}", process.output()))
    for line in list(process.lines):
        if line.get("level") in ("error", "critical") and line.get("exception"):
            what = f"{line.get('logger', '')}: {str(line.get('message', ''))[:160]}"
            report.findings.append(Finding("log", what, str(line.get("exception", ""))[-3000:]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/fuzz.py", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--requests", type=int, default=30_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--odd-replies", type=float, default=0.25, help="share of calls whose upstream answers oddly")
    parser.add_argument("--show", type=int, default=2, help="requests shown per distinct bug")
    parser.add_argument("--json", type=Path, help="also write the counts to this file")
    parser.add_argument("--serve", action="store_true", help="fuzz a `feather-grpc serve` subprocess instead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    warnings.simplefilter("ignore")  # PyJWT's key-length warnings about the deliberately odd tokens
    report = asyncio.run(fuzz(args.seed, args.requests, args.concurrency, args.odd_replies, args.serve))
    print(report.summary(args.show))
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "seed": args.seed,
                    "requests": report.requests,
                    "seconds": round(report.seconds, 1),
                    "by_method": dict(report.by_method),
                    "statuses": dict(report.codes),
                    "reasons": dict(report.reasons),
                    "invalid_fields": dict(report.violations),
                    "served_by": dict(report.served),
                    "client_side": dict(report.client_side),
                    "chat_answered": report.chat_answered,
                    "recorded": report.recorded,
                    "bugs": [f.kind + ": " + f.what for f in report.findings],
                },
                indent=2,
            )
        )
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
