"""Egress in corporate networks: HTTPS_PROXY/HTTP_PROXY/NO_PROXY, a per-provider proxy, a provider's own CA
bundle and client certificate.

The upstream simulator listens on 127.0.0.2 under the name `llm.corp.invalid`, which resolves nowhere
(RFC 6761): only the test's CONNECT proxy (sim/proxy.py), which maps that name, can reach it. Its
certificate comes from a throwaway CA made here with openssl.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import uvloop

from feather_grpc import config
from feather_grpc.config import ConfigError
from feather_grpc.core.egress import Egress, Proxy, bypasses_proxy, env_proxy, parse_proxy
from feather_grpc.core.errors import ProviderError
from feather_grpc.core.http_client import ConnectError
from feather_grpc.gen.feather.v1 import feather_service_pb2 as pb
from feather_grpc.providers import ProviderSettings, build_provider
from feather_grpc.providers.http import UpstreamClients
from feather_grpc.providers.transport.client import HttpClient
from feather_grpc.server.calls import ServerCall
from sim.proxy import ConnectProxy
from sim.upstream import UpstreamSimulator
from tests.gateway_harness import user
from tests.ops_harness import REPO, calls_reachable, eventually, running_server

HOST = "llm.corp.invalid"  # only the proxy knows where this is
KEY = "sk-egress-key-123"
ENV = {"EGRESS_KEY": KEY}


# -- a throwaway PKI ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """ca.pem; server.pem/.key for llm.corp.invalid and localhost; client.pem/.key, signed by the CA."""
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=egress-test-ca",
            "-keyout", "ca.key", "-out", "ca.pem")  # fmt: skip
    for name, san in (("server", f"DNS:{HOST},DNS:localhost,IP:127.0.0.1"), ("client", "DNS:feather-gateway")):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", f"{name}.key",
                "-out", f"{name}.csr")  # fmt: skip
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem")  # fmt: skip
    return d


def server_context(pki: Path, *, client_certs: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(pki / "server.pem", pki / "server.key")
    if client_certs:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki / "ca.pem")
    return ctx


@pytest.fixture
async def hidden_https(pki: Path) -> AsyncIterator[UpstreamSimulator]:
    """An https upstream on 127.0.0.2, requiring no client certificate."""
    async with UpstreamSimulator(host="127.0.0.2", ssl_context=server_context(pki, client_certs=False)) as sim:
        yield sim


def provider(url: str, model: str = "gpt-egress", **extra: Any) -> dict[str, Any]:
    return {
        "type": "openai",
        "apiKeyEnv": "EGRESS_KEY",
        "baseUrl": url,
        "models": [{"name": model, "inputPer1M": 1, "outputPer1M": 1}],
        **extra,
    }


def document(providers: dict[str, Any]) -> dict[str, Any]:
    return {"ledger": {"type": "memory"}, "retry": {"maxAttempts": 1}, "providers": providers}


async def ask(stub: Any, model: str) -> pb.ChatResponse:
    reply = await stub.Chat(pb.ChatRequest(model=model, messages=[user("hello")]), timeout=10)
    assert isinstance(reply, pb.ChatResponse)
    return reply


# -- NO_PROXY, the environment, proxy URLs ---------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "port", "no_proxy", "bypass"),
    [
        ("api.openai.com", 443, "", False),
        ("api.openai.com", 443, "*", True),
        ("api.openai.com", 443, "openai.com", True),  # a name covers its subdomains
        ("openai.com", 443, ".openai.com", True),  # curl: a leading dot is ignored
        ("api.openai.com", 443, "*.openai.com", True),
        ("api.openai.com", 443, "penai.com", False),  # whole labels only, unlike a bare suffix test
        ("API.OpenAI.com", 443, "api.openai.COM", True),
        ("api.openai.com", 443, "example.com, api.openai.com:443", True),
        ("api.openai.com", 443, "api.openai.com:8443", False),  # another port
        ("api.openai.com", 443, "example.com api.openai.com", True),  # spaces separate too
        ("10.1.2.3", 80, "10.0.0.0/8", True),
        ("10.1.2.3", 80, "10.1.2.3", True),
        ("10.1.2.3", 80, "192.168.0.0/16,localhost", False),
        ("::1", 8000, "[::1]:8000", True),
        ("::1", 8000, "::1", True),
        ("fd00::5", 443, "fd00::/8", True),
        ("localhost", 80, "127.0.0.1", False),  # names are never resolved
        ("127.0.0.1", 80, "localhost", False),
    ],
)
def test_no_proxy_follows_curl(host: str, port: int, no_proxy: str, bypass: bool) -> None:
    assert bypasses_proxy(host, port, no_proxy) is bypass


def test_the_environment_names_the_proxy_by_scheme_lowercase_first() -> None:
    env = {"HTTPS_PROXY": "http://upper:3128", "https_proxy": "lower:3129", "HTTP_PROXY": "http://plain:8080"}
    proxy, var = env_proxy("https://api.openai.com/v1", env)
    assert (proxy, var) == (Proxy("lower", 3129), "https_proxy")  # no scheme means http://
    assert env_proxy("http://vllm.internal:8000/v1", env)[0] == Proxy("plain", 8080)
    assert env_proxy("https://api.openai.com/v1", {"https_proxy": " ", "HTTPS_PROXY": "h:1"})[0] == Proxy("h", 1)
    assert env_proxy("https://api.openai.com/v1", {"HTTP_PROXY": "http://plain:8080"}) == (None, "")
    exempt = {**env, "NO_PROXY": "openai.com"}
    assert env_proxy("https://api.openai.com/v1", exempt) == (None, "")
    assert env_proxy("http://vllm.internal:8000/v1", {**exempt, "no_proxy": "internal"}) == (None, "")
    for loopback in ("http://localhost:8000/v1", "http://127.0.0.2:8000/v1", "https://[::1]:8443/v1"):
        assert env_proxy(loopback, env) == (None, ""), loopback  # as Go's net/http: never an env proxy


def test_proxy_urls_credentials_and_what_is_refused() -> None:
    proxy = parse_proxy("http://alice:p%40ss%3Aword@Proxy.Corp:3128/")
    assert (proxy.host, proxy.port) == ("proxy.corp", 3128)
    assert base64.b64decode(proxy.authorization.removeprefix("Basic ")) == b"alice:p@ss:word"
    assert "p@ss" not in repr(proxy) and "alice" not in repr(proxy) and "Basic" not in repr(proxy)
    assert str(proxy) == "http://proxy.corp:3128"
    assert parse_proxy("http://proxy.corp").port == 80
    for url, problem in [
        ("https://proxy.corp:443", "TLS to the proxy"),
        ("socks5://proxy.corp:1080", "SOCKS"),
        ("http://:3128", "no host"),
        ("http://proxy.corp:3128/path", "path"),
        ("http://proxy.corp:99999", "not a valid proxy URL"),
    ]:
        with pytest.raises(ValueError, match=problem):
            parse_proxy(url)


# -- configuration -------------------------------------------------------------------------------


def resolve(doc: dict[str, Any], env: dict[str, str] | None = None) -> config.GatewayConfig:
    return config.resolve(config.parse_file_config(json.dumps(doc), "t.json"), {**ENV, **(env or {})}, "t.json")


def egress_of(doc: dict[str, Any], env: dict[str, str] | None = None) -> dict[str, Egress]:
    return {p.name: p.egress for p in resolve(doc, env).providers}


def test_a_provider_proxy_overrides_the_environment_and_null_goes_direct() -> None:
    env = {"HTTPS_PROXY": "http://corp:3128", "HTTP_PROXY": "http://corp:3128", "NO_PROXY": "internal"}
    doc = document(
        {
            "from-env": provider("https://api.example.com/v1"),
            "exempt": provider("https://llm.internal/v1"),
            "own": provider("https://api.example.com/v1", proxy="http://u:p@other:8080"),
            "own-even-if-exempt": provider("https://llm.internal/v1", proxy="http://other:8080"),
            "direct-null": provider("https://api.example.com/v1", proxy=None),
            "direct-empty": provider("https://api.example.com/v1", proxy=""),
            "loopback": provider("http://127.0.0.1:8000/v1"),
            "loopback-own": provider("http://127.0.0.1:8000/v1", proxy="http://other:8080"),
            "mock": {"type": "mock", "models": [{"name": "m", "inputPer1M": 1, "outputPer1M": 1}]},
        }
    )
    proxies = {name: e.proxy for name, e in egress_of(doc, env).items()}
    assert proxies["from-env"] == Proxy("corp", 3128)
    assert proxies["exempt"] is None
    assert proxies["own"] == parse_proxy("http://u:p@other:8080")
    assert proxies["own-even-if-exempt"] == Proxy("other", 8080)
    assert proxies["direct-null"] is None and proxies["direct-empty"] is None and proxies["mock"] is None
    assert proxies["loopback"] is None and proxies["loopback-own"] == Proxy("other", 8080)


def test_unusable_proxy_settings_name_the_field_or_the_variable() -> None:
    with pytest.raises(ConfigError) as bad:
        resolve(document({"p": provider("https://api.example.com/v1", proxy="socks5://u:secret@h:1080")}))
    assert "providers.p.proxy" in str(bad.value) and "SOCKS" in str(bad.value) and "secret" not in str(bad.value)
    with pytest.raises(ConfigError) as bad:
        resolve(document({"p": provider("https://api.example.com/v1")}), {"HTTPS_PROXY": "https://u:secret@h:443"})
    assert str(bad.value).startswith("environment: HTTPS_PROXY: TLS to the proxy")
    assert "secret" not in str(bad.value)
    # The variable of the other scheme does not matter, nor a proxy NO_PROXY exempts the provider from.
    resolve(document({"p": provider("https://api.example.com/v1")}), {"HTTP_PROXY": "socks5://h:1080"})
    resolve(document({"p": provider("https://api.example.com/v1")}), {"HTTPS_PROXY": "socks5://h", "NO_PROXY": "*"})


def test_tls_files_are_checked_at_load(pki: Path, tmp_path: Path) -> None:
    def load(**tls: str) -> dict[str, Egress]:
        return egress_of(document({"p": provider(f"https://{HOST}/v1", **tls)}))

    good = load(
        caFile=str(pki / "ca.pem"), clientCertFile=str(pki / "client.pem"), clientKeyFile=str(pki / "client.key")
    )
    assert good["p"] == Egress(None, str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
    combined = tmp_path / "client-and-key.pem"
    combined.write_bytes((pki / "client.pem").read_bytes() + (pki / "client.key").read_bytes())
    assert load(clientCertFile=str(combined))["p"].client_key_file is None
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        ({"caFile": str(tmp_path / "missing.pem")}, "providers.p.caFile: cannot read"),
        ({"caFile": str(garbage)}, "providers.p.caFile: not a PEM CA bundle"),
        ({"clientCertFile": str(pki / "client.pem")}, "providers.p.clientCertFile: unusable certificate or key"),
        (
            {"clientCertFile": str(pki / "client.pem"), "clientKeyFile": str(pki / "server.key")},
            "providers.p.clientCertFile: unusable certificate or key",  # a key that is not the certificate's
        ),
        ({"clientKeyFile": str(pki / "client.key")}, "providers.p.clientKeyFile: a client key needs its certificate"),
    ]
    for tls, expected in cases:
        with pytest.raises(ConfigError) as bad:
            load(**tls)
        assert expected in str(bad.value), (tls, str(bad.value))
    with pytest.raises(ConfigError, match=r"providers\.p\.caFile: TLS settings need an https:// baseUrl"):
        egress_of(document({"p": provider(f"http://{HOST}/v1", caFile=str(pki / "ca.pem"))}))


def test_check_config_reports_an_unreadable_client_certificate(tmp_path: Path) -> None:
    path = tmp_path / "feather.config.json"
    doc = document({"p": provider(f"https://{HOST}/v1", clientCertFile=str(tmp_path / "nope.pem"))})
    path.write_text(json.dumps(doc))
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")} | ENV
    run = subprocess.run(
        [sys.executable, "-m", "feather_grpc.cli", "check-config", "--config", str(path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert "providers.p.clientCertFile: cannot read" in run.stderr


# -- through a live gateway ---------------------------------------------------------------------


async def test_https_through_a_connect_proxy_to_a_host_only_the_proxy_reaches(
    pki: Path, hidden_https: UpstreamSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    base = f"https://{HOST}:{hidden_https.port}/v1"
    async with ConnectProxy(hosts={HOST: "127.0.0.2"}, credentials=("gw", "pr0xy-s3cret")) as proxy:
        env = {**ENV, "HTTPS_PROXY": proxy.url_with("gw", "pr0xy-s3cret")}
        doc = document(
            {
                "corp": provider(base, caFile=str(pki / "ca.pem")),
                "direct": provider(base, "gpt-direct", caFile=str(pki / "ca.pem"), proxy=None),
            }
        )
        async with running_server(doc, env) as gw:
            for _ in range(3):
                assert (await ask(gw.stub, "gpt-egress")).provider == "corp"
            stream = gw.stub.StreamChat(pb.StreamChatRequest(model="gpt-egress", messages=[user("go")]), timeout=10)
            assert [e async for e in stream][-1].HasField("end")
            # Without the proxy the name does not even resolve.
            with pytest.raises(grpc.aio.AioRpcError) as direct:
                await ask(gw.stub, "gpt-direct")
            assert direct.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "cannot resolve llm.corp.invalid" in (direct.value.details() or "")
    authority = f"{HOST}:{hidden_https.port}"
    assert proxy.tunnels == [authority], "one tunnel, to the origin, reused for every call (pooled)"
    (connect,) = proxy.requests
    assert connect.headers["host"] == authority
    assert connect.headers["proxy-authorization"] == "Basic " + base64.b64encode(b"gw:pr0xy-s3cret").decode()
    assert len(hidden_https.requests) == 4
    for request in hidden_https.requests:  # TLS inside the tunnel: the origin gets the request, the proxy cannot
        assert request.headers["authorization"] == f"Bearer {KEY}"
        assert request.headers["host"] == authority
        assert "proxy-authorization" not in request.headers
    assert "pr0xy-s3cret" not in caplog.text and base64.b64encode(b"gw:pr0xy-s3cret").decode() not in caplog.text


async def test_a_proxy_that_refuses_is_a_connect_error_without_the_credentials(
    pki: Path, hidden_https: UpstreamSimulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with ConnectProxy(hosts={HOST: "127.0.0.2"}, credentials=("gw", "right")) as proxy:
        doc = document(
            {
                "p": provider(
                    f"https://{HOST}:{hidden_https.port}/v1",
                    caFile=str(pki / "ca.pem"),
                    proxy=proxy.url_with("gw", "wr0ng-s3cret"),
                )
            }
        )
        async with running_server(doc, ENV) as gw:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await ask(gw.stub, "gpt-egress")
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    details = refused.value.details() or ""
    assert f"proxy http://127.0.0.1:{proxy.port} refused CONNECT {HOST}:{hidden_https.port}: 407" in details
    assert [r.status for r in proxy.requests] == [407]
    assert not hidden_https.requests
    assert "wr0ng-s3cret" not in caplog.text + details


async def test_plain_http_goes_through_the_proxy_in_absolute_form_unless_no_proxy_says_otherwise() -> None:
    async with (
        UpstreamSimulator(host="127.0.0.2") as hidden,
        UpstreamSimulator() as local,
        ConnectProxy(hosts={HOST: "127.0.0.2"}, credentials=("gw", "pw")) as proxy,
    ):
        env = {**ENV, "http_proxy": proxy.url_with("gw", "pw")}
        doc = document(
            {
                "vllm": provider(f"http://{HOST}:{hidden.port}/v1"),
                "local": provider(local.url + "/v1", "gpt-local"),
                "bad-login": provider(f"http://{HOST}:{hidden.port}/v1", "gpt-bad", proxy=proxy.url_with("gw", "no")),
            }
        )
        async with running_server(doc, env) as gw:
            assert (await ask(gw.stub, "gpt-egress")).provider == "vllm"
            assert (await ask(gw.stub, "gpt-local")).provider == "local"
            with pytest.raises(grpc.aio.AioRpcError) as refused:  # not the caller's fault: not INVALID_ARGUMENT
                await ask(gw.stub, "gpt-bad")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "refused the request: 407 Proxy Authentication Required" in (refused.value.details() or "")
        forwarded, rejected = proxy.requests
        assert rejected.status == 407
        assert (forwarded.method, forwarded.target) == ("POST", f"http://{HOST}:{hidden.port}/v1/chat/completions")
        assert forwarded.headers["proxy-authorization"] == "Basic " + base64.b64encode(b"gw:pw").decode()
        assert forwarded.headers["host"] == f"{HOST}:{hidden.port}"
        (at_origin,) = hidden.requests
        assert at_origin.path == "/v1/chat/completions" and "proxy-authorization" not in at_origin.headers
        assert len(local.requests) == 1  # loopback: straight to 127.0.0.1, never to an environment proxy


async def test_mutual_tls_to_the_upstream_through_the_proxy(pki: Path) -> None:
    async with (
        UpstreamSimulator(host="127.0.0.2", ssl_context=server_context(pki, client_certs=True)) as mtls,
        ConnectProxy(hosts={HOST: "127.0.0.2"}) as proxy,
    ):
        base = f"https://{HOST}:{mtls.port}/v1"
        ca = str(pki / "ca.pem")
        doc = document(
            {
                "with-cert": provider(
                    base,
                    proxy=proxy.url,
                    caFile=ca,
                    clientCertFile=str(pki / "client.pem"),
                    clientKeyFile=str(pki / "client.key"),
                ),
                "without-cert": provider(base, "gpt-anonymous", proxy=proxy.url, caFile=ca),
                "untrusted": provider(base, "gpt-system-cas", proxy=proxy.url),  # the system CAs only
            }
        )
        async with running_server(doc, ENV) as gw:
            assert (await ask(gw.stub, "gpt-egress")).provider == "with-cert"
            for model in ("gpt-anonymous", "gpt-system-cas"):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await ask(gw.stub, model)
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE, model
        assert [r.model for r in mtls.requests] == ["gpt-egress"]
        assert len(proxy.tunnels) == 3  # one per provider: connections never cross egress settings


async def test_the_pool_keeps_tunnels_apart_by_origin_and_egress(pki: Path) -> None:
    await _tunnels_apart(pki)


def test_tunnels_on_uvloop(pki: Path) -> None:
    """`serve` runs uvloop: the CONNECT exchange on the raw socket, then TLS over it, work there too."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_tunnels_apart(pki))


async def _tunnels_apart(pki: Path) -> None:
    async with (
        UpstreamSimulator(host="127.0.0.2", ssl_context=server_context(pki, client_certs=False)) as a,
        UpstreamSimulator(host="127.0.0.2", ssl_context=server_context(pki, client_certs=False)) as b,
        ConnectProxy(hosts={HOST: "127.0.0.2"}) as proxy,
    ):
        client = HttpClient()
        try:
            egress = Egress(parse_proxy(proxy.url), ca_file=str(pki / "ca.pem"))
            providers = [
                build_provider(ProviderSettings(n, "openai", f"https://{HOST}:{s.port}/v1", egress=egress), client)
                for n, s in (("a", a), ("b", b), ("a-again", a))
            ]
            for p in providers * 2:
                await p.chat("gpt", _request())
            # Each provider has its own pools (its maxConnections is its own): "a" and "a-again" reach the
            # same origin through tunnels of their own, each reused for the provider's second call.
            assert sorted(proxy.tunnels) == sorted([f"{HOST}:{a.port}", f"{HOST}:{b.port}", f"{HOST}:{a.port}"])
            assert client.connections() == 3
            assert (len(a.requests), len(b.requests)) == (4, 2)
            direct = build_provider(ProviderSettings("d", "openai", f"https://{HOST}:{a.port}/v1"), client)
            with pytest.raises(ProviderError, match=r"cannot resolve llm\.corp\.invalid"):
                await direct.chat("gpt", _request())
        finally:
            await client.close()


async def test_a_tunnel_to_an_unknown_host_is_a_connect_error(pki: Path) -> None:
    async with ConnectProxy() as proxy:
        client = HttpClient()
        try:
            ep = client.endpoint("https://nowhere.invalid/v1", egress=Egress(parse_proxy(proxy.url)))
            with pytest.raises(ConnectError, match=r"refused CONNECT nowhere\.invalid:443: 502 Bad Gateway"):
                await ep.request(b"{}")
            assert client.connections() == 0
        finally:
            await client.close()


def _request() -> Any:
    from feather_grpc.core.types import ChatRequest, Message, Role

    return ChatRequest(model="gpt", messages=[Message(Role.USER, "hi")])


def test_the_readme_example_loads(pki: Path) -> None:
    readme = (Path(REPO) / "README.md").read_text()
    section = readme[readme.index("### Egress: proxies and the upstream's TLS") :]
    block = section[section.index("```json") + len("```json") : section.index("```\n\n")]
    for name, path in [("internal-ca.pem", "ca.pem"), ("gateway.pem", "client.pem"), ("gateway.key", "client.key")]:
        block = block.replace(f"/etc/feather/{name}", str(pki / path))
    cfg = config.resolve(config.parse_file_config(block, "README.md"), {"OPENAI_API_KEY": "sk-x"}, "README.md")
    by_name = {p.name: p for p in cfg.providers}
    assert by_name["openai"].egress == Egress(Proxy("egress.corp.example", 3128))
    vllm = by_name["vllm"]
    assert vllm.egress == Egress(None, str(pki / "ca.pem"), str(pki / "client.pem"), str(pki / "client.key"))
    assert not vllm.propagate_trace_context and by_name["openai"].propagate_trace_context


# -- pooled connections keep no call alive ---------------------------------------------------------


@pytest.mark.parametrize("transport", ["builtin", "aiohttp"])
async def test_pooled_connections_keep_no_call_alive(pki: Path, transport: str) -> None:
    await _no_call_kept(pki, transport)


@pytest.mark.parametrize("transport", ["builtin", "aiohttp"])
def test_pooled_connections_keep_no_call_alive_on_uvloop(pki: Path, transport: str) -> None:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_no_call_kept(pki, transport))


async def _no_call_kept(pki: Path, transport: str) -> None:
    """A transport runs its protocol's callbacks in the context it was created in. A pooled connection
    opened inside a call must not keep that call's context, and with it the call's ServerCall and request
    (a past caller's prompt), alive while it waits in the pool for other callers: direct (plain http and
    TLS) and through a CONNECT tunnel, for Chat and StreamChat, on either upstream client."""
    async with (
        UpstreamSimulator() as plain,
        UpstreamSimulator(ssl_context=server_context(pki, client_certs=False)) as tls,
        UpstreamSimulator(host="127.0.0.2", ssl_context=server_context(pki, client_certs=False)) as hidden,
        ConnectProxy(hosts={HOST: "127.0.0.2"}) as proxy,
    ):
        ca = str(pki / "ca.pem")
        doc = document(
            {
                "plain": provider(f"http://127.0.0.1:{plain.port}/v1", "gpt-plain", transport=transport),
                "tls": provider(f"https://localhost:{tls.port}/v1", "gpt-tls", caFile=ca, transport=transport),
                "tunnelled": provider(
                    f"https://{HOST}:{hidden.port}/v1", "gpt-tunnelled", proxy=proxy.url, caFile=ca, transport=transport
                ),
            }
        )
        async with running_server(doc, ENV) as gw:
            for model in ("gpt-plain", "gpt-tls", "gpt-tunnelled"):
                assert (await ask(gw.stub, model)).provider == model.removeprefix("gpt-")
                stream = gw.stub.StreamChat(pb.StreamChatRequest(model=model, messages=[user("go")]), timeout=10)
                assert [e async for e in stream][-1].HasField("end")
            assert (len(plain.requests), len(tls.requests), len(hidden.requests)) == (2, 2, 2)
            upstream = gw.server.engine._upstream
            assert isinstance(upstream, UpstreamClients)
            client = upstream.get(transport)
            # Every connection opened for these calls is back in its pool, idle (each reused once).
            await eventually(lambda: client.idle_connections() == 3, what="3 idle connections")
            assert client.connections() == 3
            gc.collect()
            assert calls_reachable(client) == []
            if isinstance(asyncio.get_running_loop(), uvloop.Loop):
                # serve's loop: nothing else keeps a call either. (asyncio's own loop keeps a cancelled
                # timer's context until the timer would have fired, which holds the call's deadline timer
                # there for up to the deadline; that is asyncio's, not the pool's.)
                alive = [o for o in gc.get_objects() if isinstance(o, ServerCall)]
                assert alive == [], [c.request for c in alive]
