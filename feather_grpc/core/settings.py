"""The environment, read in one place.

Only this module reads `os.environ`; everything else gets the mapping from here (or a test's own) and reads
each variable through `Settings`: one parser per kind (a flag, a whole number, a port), each rejecting junk
with the variable's name and a one-line fix, so `FEATHER_LOG_CONTENT=ture` fails at start instead of
quietly meaning false. An unset or blank variable means its default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from feather_grpc.core.errors import ConfigError

__all__ = ["Settings", "environ", "parse_flag"]

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def environ() -> dict[str, str]:
    """A copy of the process environment, as it is now."""
    return dict(os.environ)


def parse_flag(raw: str) -> bool:
    """The one boolean rule: 1/true/yes/on and 0/false/no/off, any case, surrounding spaces ignored.
    Raises ValueError for anything else."""
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"{raw!r} is not a boolean")


class Settings:
    """Typed reads of an environment (the process's by default)."""

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        self.env: Mapping[str, str] = os.environ if env is None else env

    def text(self, name: str, default: str = "") -> str:
        return self.env.get(name, "").strip() or default

    def flag(self, name: str, default: bool = False) -> bool:
        raw = self.env.get(name, "")
        if not raw.strip():
            return default
        try:
            return parse_flag(raw)
        except ValueError as e:
            raise ConfigError("environment", name, str(e), f"set {name} to true or false") from None

    def integer(self, name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
        raw = self.env.get(name)
        if not raw:
            return default
        try:
            value = int(raw)
        except ValueError:
            value = minimum - 1
        if maximum is not None and not minimum <= value <= maximum:
            raise ConfigError(
                "environment",
                name,
                f"{raw!r} is not an integer from {minimum} to {maximum}",
                f"set {name} to a whole number from {minimum} to {maximum}",
            )
        if value < minimum:
            raise ConfigError(
                "environment",
                name,
                f"{raw!r} is not an integer >= {minimum}",
                f"set {name} to a whole number of at least {minimum}",
            )
        return value

    def port(self, name: str) -> int | None:
        """A TCP port (0: any free one), or None when unset."""
        raw = self.env.get(name, "").strip()
        if not raw:
            return None
        if not raw.isdigit() or int(raw) > 65535:
            raise ConfigError("environment", name, f"{raw!r} is not a port", "set a port number, or unset it")
        return int(raw)
