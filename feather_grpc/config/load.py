"""Where the configuration comes from: a file (`path`, `$FEATHER_CONFIG`, ./feather.config.json) or the
embedded default, a data file shipped in the package (config/default.json)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from feather_grpc.config.model import GatewayConfig
from feather_grpc.config.resolve import resolve
from feather_grpc.config.schema import parse_file_config
from feather_grpc.core.errors import ConfigError
from feather_grpc.core.settings import environ


def load(path: str | None, env: dict[str, str] | None = None) -> GatewayConfig:
    """Loads `path`, else `$FEATHER_CONFIG`, else ./feather.config.json if present, else the embedded default."""
    env = environ() if env is None else env
    chosen = path or env.get("FEATHER_CONFIG")
    if not chosen and Path("feather.config.json").is_file():
        chosen = "feather.config.json"
    if chosen:
        try:
            text = Path(chosen).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(chosen, "(file)", f"cannot read it ({e.strerror})", "check the path") from None
        except UnicodeDecodeError as e:
            problem = f"not UTF-8 text (byte {e.start})"
            raise ConfigError(chosen, "(file)", problem, "save the file as UTF-8 JSON") from None
        return resolve(parse_file_config(text, chosen), env, chosen)
    # The mock provider, plus OpenAI and Anthropic when their keys are in the environment (providers with a
    # missing key are skipped).
    document = resources.files(__package__).joinpath("default.json").read_text(encoding="utf-8")
    return resolve(parse_file_config(document, "<embedded default>"), env, "<embedded default>")
