"""Configuration: the original schema, extensions, env overrides, and errors with field paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from feather_grpc import config

# The ConfigMap from the original deployment guide, verbatim.
GUIDE_CONFIG = """{
  "policy": "cheapest",
  "providers": {
    "openai": {"apiKeyEnv": "OPENAI_API_KEY", "models": [
      {"name": "gpt-4", "aliases": ["smart", "expensive"], "inputPer1K": 0.03, "outputPer1K": 0.06},
      {"name": "gpt-3.5-turbo", "aliases": ["fast", "cheap"], "inputPer1K": 0.001, "outputPer1K": 0.002}]},
    "anthropic": {"apiKeyEnv": "ANTHROPIC_API_KEY", "models": [
      {"name": "claude-3-5-haiku", "aliases": ["fast", "balanced"], "inputPer1K": 0.008, "outputPer1K": 0.024}]}
  }
}"""


def _load(text: str, env: dict[str, str] | None = None) -> config.GatewayConfig:
    return config.resolve(config.parse_file_config(text, "test.json"), env or {}, "test.json")


def test_original_schema_loads_with_inferred_types_and_exact_prices() -> None:
    cfg = _load(GUIDE_CONFIG, {"OPENAI_API_KEY": "sk-test", "ANTHROPIC_API_KEY": "ak-test"})
    assert cfg.routing.policy == "cheapest"
    assert [(p.name, p.type, p.base_url) for p in cfg.providers] == [
        ("openai", "openai", "https://api.openai.com/v1"),
        ("anthropic", "anthropic", "https://api.anthropic.com"),
    ]
    gpt4 = cfg.providers[0].models[0]
    assert gpt4.aliases == ("smart", "expensive")
    assert gpt4.price is not None
    # 0.03 USD per 1K tokens = 30 USD per 1M = 30e9 nano-USD per 1M, exactly.
    assert gpt4.price.input == 30_000_000_000 and gpt4.price.output == 60_000_000_000
    assert "sk-test" not in repr(cfg)  # keys never printed


def test_provider_without_its_key_is_skipped_unless_required() -> None:
    cfg = _load(GUIDE_CONFIG, {"ANTHROPIC_API_KEY": "ak"})
    assert [p.name for p in cfg.providers] == ["anthropic"]
    assert cfg.skipped_providers == ("openai",)
    doc = json.loads(GUIDE_CONFIG)
    doc["providers"]["openai"]["required"] = True
    with pytest.raises(config.ConfigError) as caught:
        _load(json.dumps(doc), {"ANTHROPIC_API_KEY": "ak"})
    assert caught.value.path == "providers.openai"


@pytest.mark.parametrize(
    ("mutate", "path"),
    [
        (
            lambda d: d["providers"]["openai"]["models"][1].update(inputPer1K="cheap"),
            "providers.openai.models[1].inputPer1K",
        ),
        (lambda d: d["providers"]["openai"]["models"][0].pop("outputPer1K"), "providers.openai.models[0].inputPer1K"),
        (lambda d: d["providers"]["anthropic"].update(apiKeyEnvv="X"), "providers.anthropic.apiKeyEnvv"),
        (lambda d: d.update(policy="cheapest-first"), "policy"),
        (lambda d: d["providers"]["openai"].update(baseUrl="api.openai.com"), "providers.openai.baseUrl"),
        (lambda d: d["providers"]["openai"]["models"][0].update(inputPer1K=-1), "providers.openai.models[0]"),
        (lambda d: d["providers"]["openai"].update(maxResponseBytes=100), "providers.openai.maxResponseBytes"),
        (lambda d: d["providers"]["openai"].update(maxStreamEventBytes=0), "providers.openai.maxStreamEventBytes"),
        (
            lambda d: d["providers"].update(local={"models": [{"name": "x", "inputPer1K": 0, "outputPer1K": 0}]}),
            "providers.local.type",
        ),
    ],
)
def test_bad_config_names_the_field_and_a_fix(mutate, path) -> None:  # type: ignore[no-untyped-def]
    doc = json.loads(GUIDE_CONFIG)
    mutate(doc)
    with pytest.raises(config.ConfigError) as caught:
        _load(json.dumps(doc), {"OPENAI_API_KEY": "k", "ANTHROPIC_API_KEY": "k"})
    assert caught.value.path == path
    assert "Fix:" in str(caught.value)


def test_unpriced_model_only_when_explicitly_allowed() -> None:
    doc = {
        "providers": {
            "local": {
                "type": "openai-compatible",
                "baseUrl": "http://127.0.0.1:1/v1",
                "models": [{"name": "llama", "allowUnpriced": True}],
            }
        }
    }
    cfg = _load(json.dumps(doc))
    assert cfg.providers[0].models[0].price is None


def test_embedded_default_serves_mock_and_adds_providers_with_keys() -> None:
    bare = config.load(None, {})
    assert [p.name for p in bare.providers] == ["mock"]
    with_keys = config.load(None, {"OPENAI_API_KEY": "sk", "ANTHROPIC_API_KEY": "ak", "PORT": "6000"})
    assert [p.name for p in with_keys.providers] == ["mock", "openai", "anthropic"]
    assert with_keys.server.port == 6000


def test_cli_refuses_a_bad_config_with_path_and_exit_code(tmp_path: Path) -> None:
    bad = tmp_path / "feather.config.json"
    bad.write_text('{"providers": {"mock": {"type": "mock", "models": [{"name": "m", "inputPer1K": "x"}]}}}')
    run = subprocess.run(
        [sys.executable, "-m", "feather_grpc.cli", "serve", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2
    assert "providers.mock.models[0].inputPer1K" in run.stderr
    assert "Fix:" in run.stderr


def test_cli_refuses_to_serve_when_the_ledger_cannot_open(tmp_path: Path) -> None:
    cfg = tmp_path / "feather.config.json"
    missing = tmp_path / "no-such-dir" / "usage.db"
    mock = {"type": "mock", "models": [{"name": "m", "inputPer1M": 1, "outputPer1M": 1}]}
    cfg.write_text(json.dumps({"ledger": {"type": "sqlite", "path": str(missing)}, "providers": {"mock": mock}}))
    run = subprocess.run(
        [sys.executable, "-m", "feather_grpc.cli", "serve", "--config", str(cfg), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2, run.stderr
    assert f"ledger: {missing}: cannot open the usage ledger" in run.stderr
    assert "serving on" not in run.stderr


def _mock(*models: dict[str, object], **extra: object) -> dict[str, object]:
    return {"type": "mock", "models": list(models), **extra}


def _model(name: str, *aliases: str, **prices: object) -> dict[str, object]:
    return {"name": name, "aliases": list(aliases), "inputPer1M": 1, "outputPer1M": 2, **prices}


@pytest.mark.parametrize(
    ("models", "path"),
    [
        ([_model("m1", "")], "providers.p.models[0].aliases[0]"),
        ([_model("m1", "fast", " ")], "providers.p.models[0].aliases[1]"),
        ([_model("m1", "a", "b", "a")], "providers.p.models[0].aliases[2]"),
        ([_model("m1", "m1")], "providers.p.models[0].aliases[0]"),
        # `m2` and `p/m2` would reach m1 as well as m2
        ([_model("m1", "x", "m2"), _model("m2")], "providers.p.models[0].aliases[1]"),
        ([_model("m1"), _model("m2", "m1")], "providers.p.models[1].aliases[0]"),
    ],
)
def test_an_alias_must_name_one_model_of_its_provider(models: list[dict[str, object]], path: str) -> None:
    # checked even for a provider skipped for its missing key
    doc = {"providers": {"p": _mock(*models, apiKeyEnv="NOT_SET"), "mock": _mock(_model("ok"))}}
    with pytest.raises(config.ConfigError) as caught:
        _load(json.dumps(doc))
    assert caught.value.path == path
    assert "Fix:" in str(caught.value)


def test_an_alias_may_repeat_across_providers_and_name_another_providers_model() -> None:
    doc = {"providers": {"a": _mock(_model("m1", "smart", "m2")), "b": _mock(_model("m2", "smart"))}}
    cfg = _load(json.dumps(doc))
    assert [m.aliases for p in cfg.providers for m in p.models] == [("smart", "m2"), ("smart",)]


@pytest.mark.parametrize(
    ("prices", "accepted"),
    [
        ({"inputPer1M": 1e30}, False),
        ({"outputPer1M": "1000000.000000001"}, False),
        ({"cachedInputPer1M": 2_000_000}, False),
        ({"inputPer1K": 0, "outputPer1K": "1000.01", "inputPer1M": None, "outputPer1M": None}, False),
        ({"inputPer1M": 1_000_000, "cacheWritePer1M": 1_000_000}, True),
        ({"inputPer1K": 1000, "outputPer1K": 1000, "inputPer1M": None, "outputPer1M": None}, True),
    ],
)
def test_prices_are_at_most_a_million_usd_per_million_tokens(prices: dict[str, object], accepted: bool) -> None:
    model = {k: v for k, v in _model("m", **prices).items() if v is not None}
    doc = {"providers": {"mock": _mock(model)}}
    if accepted:
        price = _load(json.dumps(doc)).providers[0].models[0].price
        assert price is not None and max(price.input, price.output) <= 10**15 < 2**63
        return
    with pytest.raises(config.ConfigError) as caught:
        _load(json.dumps(doc))
    assert caught.value.path == "providers.mock.models[0]"
    assert "above the maximum of 1,000,000 USD per 1M tokens" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("mysql://feather:s3cret-pw@db:3306/feather", "must start with postgres:// or postgresql://"),
        ("garbage", "must start with postgres:// or postgresql://"),
        ("s3cret-pw@db/feather", "must start with postgres:// or postgresql://"),
        ("postgres://feather:s3cret-pw@/feather", "names no host"),
        ("postgresql://feather:s3cret-pw@db:abc/feather", "port is not a number"),
        ("postgresql://feather:s3cret-pw@db:70000/feather", "port is not a number"),
        ("postgresql:///feather", "names no host"),
    ],
)
def test_database_url_must_be_postgres_with_a_host_and_is_never_echoed(url: str, problem: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        _load(json.dumps({"providers": {"mock": _mock(_model("m"))}}), {"DATABASE_URL": url})
    assert caught.value.path == "DATABASE_URL"
    assert problem in str(caught.value)
    assert "s3cret" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://postgres@127.0.0.1:5432/feather",
        "postgres://u:p%40ss@db/feather?sslmode=require",
        "postgresql://u@[::1]:5432/feather",
        "postgresql://u@db1:5432,db2:5433/feather",
        "postgresql:///feather?host=/var/run/postgresql",
    ],
)
def test_database_url_accepts_libpq_urls(url: str) -> None:
    cfg = _load(json.dumps({"providers": {"mock": _mock(_model("m"))}}), {"DATABASE_URL": url})
    assert cfg.ledger.database_url == url
    # no host in the URL: libpq's PGHOST names it
    with_pghost = {"DATABASE_URL": "postgresql:///feather", "PGHOST": "/var/run/postgresql"}
    assert _load(json.dumps({"providers": {"mock": _mock(_model("m"))}}), with_pghost).ledger.database_url


@pytest.mark.parametrize(("port", "accepted"), [("65535", True), ("0", True), ("65536", False), ("99999", False)])
def test_port_from_the_environment_is_a_port(port: str, accepted: bool) -> None:
    doc = json.dumps({"providers": {"mock": _mock(_model("m"))}})
    if accepted:
        assert _load(doc, {"PORT": port}).server.port == int(port)
        return
    with pytest.raises(config.ConfigError) as caught:
        _load(doc, {"PORT": port})
    assert caught.value.path == "PORT" and "from 0 to 65535" in str(caught.value)


def test_limits_name_a_model_or_alias_of_their_provider() -> None:
    providers = {
        "mock": _mock(_model("mock-fast", "fast"), _model("mock-smart", "smart")),
        "openai": _mock(_model("gpt-4o"), apiKeyEnv="NOT_SET"),  # skipped, but its limits are not typos
    }
    limits = {"mock:fast": {"rps": 5}, "mock:mock-smart": {"rps": 1, "burst": 3}, "openai:gpt-4o": {"rps": 2}}
    cfg = _load(json.dumps({"providers": providers, "limits": limits}))
    # the engine's buckets are keyed by model name: an alias key lands on its model
    assert cfg.tenancy.provider_limits == {"mock:mock-fast": (5, 5), "mock:mock-smart": (1, 3), "openai:gpt-4o": (2, 2)}
    for bad, problem in [
        ({"mock:mock-fats": {"rps": 1}}, "is not a configured provider:model"),
        ({"mock:gpt-4o": {"rps": 1}}, "is not a configured provider:model"),
        ({"mock:fast": {"rps": 1}, "mock:mock-fast": {"rps": 2}}, "is the same model as limits.mock:fast"),
    ]:
        with pytest.raises(config.ConfigError) as caught:
            _load(json.dumps({"providers": providers, "limits": bad}))
        assert caught.value.path == f"limits.{list(bad)[-1]}" and problem in str(caught.value)


def test_non_utf8_config_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "feather.config.json"
    path.write_bytes(b'{"providers": {"mock": {"type": "mock", "models": [{"name": "\xff"}]}}}')
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path), {})
    assert caught.value.path == "(file)" and "not UTF-8" in str(caught.value)


def test_tls_files_must_be_readable_at_load(tmp_path: Path) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_text("cert")
    key.write_text("key")
    tls = {"certFile": str(cert), "keyFile": str(key)}
    base = {"providers": {"mock": _mock(_model("m"))}}
    assert _load(json.dumps({**base, "server": {"tls": tls}})).server.tls == config.TlsConfig(str(cert), str(key))
    for field_name, missing in [
        ("keyFile", str(tmp_path / "missing.key")),
        ("clientCaFile", str(tmp_path / "missing-ca.pem")),
        ("certFile", str(tmp_path)),  # a directory
    ]:
        with pytest.raises(config.ConfigError) as caught:
            _load(json.dumps({**base, "server": {"tls": {**tls, field_name: missing}}}))
        assert caught.value.path == f"server.tls.{field_name}" and f"cannot read {missing}" in str(caught.value)


@pytest.mark.parametrize("content", ["", "  \n\t\n"])
def test_an_empty_api_key_file_counts_as_a_missing_key(tmp_path: Path, content: str) -> None:
    key_file = tmp_path / "openai.key"
    key_file.write_text(content)
    doc = {"providers": {"mock": _mock(_model("m")), "openai": _mock(_model("gpt"), apiKeyFile=str(key_file))}}
    cfg = _load(json.dumps(doc))
    assert [p.name for p in cfg.providers] == ["mock"] and cfg.skipped_providers == ("openai",)
    doc["providers"]["openai"]["required"] = True
    with pytest.raises(config.ConfigError) as caught:
        _load(json.dumps(doc))
    assert caught.value.path == "providers.openai" and "is not set or is empty" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "http://",
        "https:///v1",
        "http://h:abc/v1",
        "http://h:99999/v1",
        "http://h:0/v1",
        "http://h h:8000/v1",
        "http://h:8000/v1 ",
        "http://[::1/v1",
    ],
)
def test_base_url_needs_a_host_a_valid_port_and_no_whitespace(url: str) -> None:
    doc = {"providers": {"local": {"type": "openai-compatible", "baseUrl": url, "models": [_model("l")]}}}
    with pytest.raises(config.ConfigError) as caught:
        _load(json.dumps(doc))
    assert caught.value.path == "providers.local.baseUrl"
    assert "Fix: use http(s)://host[:port][/path]" in str(caught.value)


@pytest.mark.parametrize(
    ("section", "doc", "path"),
    [
        ("routes", {"routes": {"smrat": {"policy": "cheapest"}}}, "routes.smrat"),
        ("fallbacks", {"fallbacks": {"smrat": ["fast"]}}, "fallbacks.smrat"),
        ("contextWindowFallbacks", {"contextWindowFallbacks": {"nope": ["smart"]}}, "contextWindowFallbacks.nope"),
        ("allowedModels", {"tenants": {"t": {"allowedModels": ["fast", "gpt-4o-mni"]}}}, "tenants.t.allowedModels[1]"),
        # admission matches provider/model by the model's name, never by an alias
        ("allowedModels", {"tenants": {"t": {"allowedModels": ["mock/fast"]}}}, "tenants.t.allowedModels[0]"),
        ("jwtDefaultPolicy", {"jwtDefaultPolicy": {"allowedModels": ["fsat"]}}, "jwtDefaultPolicy.allowedModels[0]"),
    ],
)
def test_routes_fallbacks_and_allowed_models_name_configured_models(
    section: str, doc: dict[str, object], path: str
) -> None:
    providers = {"mock": _mock(_model("mock-fast", "fast"), _model("mock-smart", "smart"))}
    with pytest.raises(config.ConfigError) as caught:
        _load(json.dumps({"providers": providers, **doc}))
    assert caught.value.path == path and "is not a configured model or alias" in str(caught.value)


def test_routes_and_allowed_models_accept_every_form_a_request_may_use() -> None:
    providers = {
        "mock": _mock(_model("mock-fast", "fast"), _model("mock-smart", "smart")),
        "openai": _mock(_model("gpt-4o", "smart"), apiKeyEnv="NOT_SET"),  # skipped: its names stay valid
    }
    doc = {
        "providers": providers,
        "routes": {"mock/fast": {"policy": "roundrobin"}, "gpt-4o": {"policy": "cheapest"}},
        "fallbacks": {"smart": ["mock/mock-fast"], "openai/smart": ["fast"]},
        "tenants": {"t": {"allowedModels": ["fast", "mock-smart", "mock/mock-fast", "openai/gpt-4o"]}},
    }
    cfg = _load(json.dumps(doc))
    assert cfg.routing.routes["smart"].fallbacks == ("mock/mock-fast",)
    assert cfg.tenancy.tenants["t"].allowed_models == frozenset(
        ["fast", "mock-smart", "mock/mock-fast", "openai/gpt-4o"]
    )


@pytest.mark.parametrize(
    ("window", "usd", "nanos"),
    [
        ("dailyUsd", "0.0000000001", None),
        ("monthlyUsd", "1e-10", None),
        ("dailyUsd", "0.000000001", 1),
        ("monthlyUsd", 0, 0),
    ],
)
def test_a_positive_budget_below_one_nano_dollar_is_refused(window: str, usd: object, nanos: int | None) -> None:
    doc = {"providers": {"mock": _mock(_model("m"))}, "tenants": {"t": {"budget": {window: usd}}}}
    if nanos is not None:
        tenant = _load(json.dumps(doc)).tenancy.tenants["t"]
        assert (tenant.daily_budget_nanos if window == "dailyUsd" else tenant.monthly_budget_nanos) == nanos
        return
    with pytest.raises(config.ConfigError) as caught:
        _load(json.dumps(doc))
    assert caught.value.path == f"tenants.t.budget.{window}" and "below one nano-dollar" in str(caught.value)


@pytest.mark.parametrize(("usd", "ok"), [("1000000000", True), ("1000000000.000000001", False), ("1e30", False)])
def test_a_budget_must_fit_the_nano_dollar_counters(usd: str, ok: bool) -> None:
    doc = {"providers": {"mock": _mock(_model("m"))}, "tenants": {"t": {"budget": {"dailyUsd": usd}}}}
    if ok:
        assert _load(json.dumps(doc)).tenancy.tenants["t"].daily_budget_nanos == 10**18
        return
    with pytest.raises(config.ConfigError) as caught:
        _load(json.dumps(doc))
    assert caught.value.path == "tenants.t.budget.dailyUsd" and "too large" in str(caught.value)


def test_jwt_default_policy_is_validated_like_a_tenant() -> None:
    providers = {"mock": _mock(_model("mock-fast", "fast"))}
    policy = {"allowedModels": ["fast"], "limits": {"rpm": 60, "tpm": 1000}, "budget": {"dailyUsd": 1}}
    unlisted = _load(json.dumps({"providers": providers, "jwtDefaultPolicy": policy})).tenancy.auth.unlisted
    assert (unlisted.allowed_models, unlisted.requests, unlisted.tpm) == (frozenset(["fast"]), (1.0, 60), 1000)
    assert unlisted.daily_budget_nanos == 1_000_000_000 and unlisted.role == "member"
    # without one, a tenant the config does not list may call nothing
    assert _load(json.dumps({"providers": providers})).tenancy.auth.unlisted.allowed_models == frozenset()
    for bad, path in [
        ({"budget": {"dailyUsd": 2e9}}, "jwtDefaultPolicy.budget.dailyUsd"),
        ({"keys": []}, "jwtDefaultPolicy.keys"),  # keys and roles belong to listed tenants only
        ({"role": "admin"}, "jwtDefaultPolicy.role"),
    ]:
        with pytest.raises(config.ConfigError) as caught:
            _load(json.dumps({"providers": providers, "jwtDefaultPolicy": bad}))
        assert caught.value.path == path, caught.value


def test_an_api_key_from_the_environment_loses_surrounding_whitespace_like_one_from_a_file(tmp_path: Path) -> None:
    key_file = tmp_path / "anthropic.key"
    key_file.write_text("ak-test\n")  # a Kubernetes Secret made from a file ends in a newline
    doc = json.loads(GUIDE_CONFIG)
    doc["providers"]["anthropic"]["apiKeyFile"] = str(key_file)
    del doc["providers"]["anthropic"]["apiKeyEnv"]
    cfg = _load(json.dumps(doc), {"OPENAI_API_KEY": " sk-test\r\n"})
    assert [(p.name, p.api_key) for p in cfg.providers] == [("openai", "sk-test"), ("anthropic", "ak-test")]


@pytest.mark.parametrize(
    ("key", "kind"),
    [
        ("sk-a\nsk-b", "whitespace"),
        ("sk-a b", "whitespace"),
        ("sk-\x00x", "a control character"),
        ("sk-“x”", "a non-ASCII character"),
    ],
)
def test_an_api_key_an_http_header_cannot_carry_names_the_provider_and_the_variable(key: str, kind: str) -> None:
    with pytest.raises(config.ConfigError) as caught:
        _load(GUIDE_CONFIG, {"OPENAI_API_KEY": key, "ANTHROPIC_API_KEY": "ak"})
    message = str(caught.value)
    assert caught.value.path == "providers.openai.apiKeyEnv"
    assert f"the key in $OPENAI_API_KEY contains {kind}, which an HTTP header cannot carry" in message
    assert key not in message and "sk-a" not in message  # never echoed


def test_check_config_and_serve_refuse_an_unusable_key_with_the_same_line(tmp_path: Path) -> None:
    cfg = tmp_path / "feather.config.json"
    cfg.write_text(GUIDE_CONFIG)
    lines = []
    for command in (["check-config"], ["serve", "--port", "0"]):
        run = subprocess.run(
            [sys.executable, "-m", "feather_grpc.cli", *command, "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
            env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "sk-one\nsk-two", "LOG_FORMAT": "json"},
        )
        assert run.returncode == 2, run.stderr
        assert "Traceback" not in run.stderr and "sk-one" not in run.stderr
        (line,) = [ln for ln in run.stderr.splitlines() if ln.startswith("feather-grpc: ")]
        lines.append(line)
    assert lines[0] == lines[1]
    assert lines[0].startswith("feather-grpc: invalid configuration: ")
    assert "providers.openai.apiKeyEnv: the key in $OPENAI_API_KEY contains whitespace" in lines[0]


def test_resolved_config_is_grouped_by_section_and_prints_no_secret() -> None:
    doc = {
        "providers": {"mock": _mock(_model("m"))},
        "policy": "cheapest",
        "server": {"maxInFlight": 7},
        "ledger": {"type": "sqlite", "synchronous": "FULL"},
        "stateFailureMode": "open",
        "rateLimitMode": "reject",
    }
    env = {
        "PORT": "6001",
        "FEATHER_LEDGER_PATH": "/var/lib/feather/usage.db",
        "REDIS_URL": "redis://:redis-secret@127.0.0.1:6379/0",
        "DATABASE_URL": "postgresql://u:pg-secret@db/feather",
        "JWT_SECRET": "jwt-secret",
    }
    cfg = _load(json.dumps(doc), env)
    assert (cfg.routing.policy, cfg.server.port, cfg.server.max_in_flight) == ("cheapest", 6001, 7)
    assert cfg.ledger == config.LedgerConfig(
        "sqlite", "/var/lib/feather/usage.db", "FULL", "postgresql://u:pg-secret@db/feather"
    )
    assert cfg.shared_state == config.SharedStateConfig("redis://:redis-secret@127.0.0.1:6379/0", "open")
    assert (cfg.tenancy.rate_limit_mode, cfg.tenancy.auth.jwt_secret) == ("reject", "jwt-secret")
    assert cfg.tenancy.default_tenant is cfg.tenancy.tenants["default"]
    shown = repr(cfg)
    assert all(secret not in shown for secret in ("redis-secret", "pg-secret", "jwt-secret")), shown
