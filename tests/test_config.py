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
    assert cfg.policy == "cheapest"
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
    assert with_keys.port == 6000


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
