"""The optional SDKs some providers need (botocore, google-auth, azure-identity), and the extra that
installs each: config names a missing one at load, the providers import it when they build."""

from __future__ import annotations

import importlib.util

__all__ = ["EXTRAS", "missing_extra"]

# provider need -> (a module it imports, the extra that installs it)
EXTRAS = {
    "entra": ("azure.identity", "azure"),
    "bedrock": ("botocore", "bedrock"),
    "vertex": ("google.auth", "vertex"),
}


def missing_extra(need: str) -> str:
    """'' when the SDK for `need` is importable, else a one-line fix naming the extra that installs it."""
    module, extra = EXTRAS[need]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        found = False
    return "" if found else f"pip install 'feather-grpc[{extra}]' (it provides {module})"
