"""The one error configuration raises: the source, the field path, what is wrong and a one-line fix."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem, with the field path and a one-line fix."""

    def __init__(self, source: str, path: str, problem: str, fix: str) -> None:
        super().__init__(f"{source}: {path}: {problem}. Fix: {fix}")
        self.path = path
