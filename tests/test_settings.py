"""The environment is read in one place (core/settings.py) and every boolean setting has one rule: the
circuit breaker's switch and the content log's switch accept and reject the same values."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path

import pytest

from feather_grpc import config
from feather_grpc.core.errors import ConfigError
from feather_grpc.core.settings import Settings, parse_flag
from feather_grpc.server.app import ServerOptions

PACKAGE = Path(__file__).resolve().parent.parent / "feather_grpc"
DOC = '{"providers": {"mock": {"type": "mock", "models": [{"name": "m", "allowUnpriced": true}]}}}'


def breaker_enabled(value: str) -> bool:
    cfg = config.resolve(config.parse_file_config(DOC, "t"), {"CIRCUIT_BREAKER_ENABLED": value}, "t")
    return cfg.routing.breaker.enabled


def log_content(value: str) -> bool:
    return ServerOptions.from_env({"FEATHER_LOG_CONTENT": value}).log_content


@pytest.mark.parametrize("read", [breaker_enabled, log_content])
def test_every_flag_reads_the_same_words(read: Callable[[str], bool]) -> None:
    for word in ("1", "true", "TRUE", "yes", "on", " Yes "):
        assert read(word) is True, word
    for word in ("0", "false", "No", "off"):
        assert read(word) is False, word


@pytest.mark.parametrize(
    ("read", "name"), [(breaker_enabled, "CIRCUIT_BREAKER_ENABLED"), (log_content, "FEATHER_LOG_CONTENT")]
)
def test_every_flag_rejects_junk_naming_the_variable(read: object, name: str) -> None:
    assert callable(read)
    with pytest.raises(ConfigError, match=f"environment: {name}: 'ture' is not a boolean. Fix: set {name} to true"):
        read("ture")


def test_unset_or_blank_means_the_default() -> None:
    settings = Settings({"BLANK": "  "})
    assert settings.flag("UNSET") is False and settings.flag("UNSET", True) is True
    assert settings.flag("BLANK", True) is True
    assert settings.integer("UNSET", 7, minimum=1) == 7 and settings.port("BLANK") is None
    with pytest.raises(ValueError, match="'maybe' is not a boolean"):
        parse_flag("maybe")


def test_only_core_settings_reads_the_process_environment() -> None:
    readers = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if "gen" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
                and node.attr in ("environ", "getenv", "environb")
            ):
                readers.append(str(path.relative_to(PACKAGE)))
    assert sorted(set(readers)) == ["core/settings.py"]
