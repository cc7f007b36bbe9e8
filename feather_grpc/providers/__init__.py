"""Provider adapters, one per wire format, built from configuration by `build_provider`."""

from __future__ import annotations

from feather_grpc.providers.anthropic import AnthropicProvider
from feather_grpc.providers.base import Provider, ProviderSettings
from feather_grpc.providers.http import new_session
from feather_grpc.providers.mock import MockProvider
from feather_grpc.providers.openai import OpenAIProvider
from feather_grpc.providers.transport import HttpClient

__all__ = [
    "PROVIDER_TYPES",
    "AnthropicProvider",
    "HttpClient",
    "MockProvider",
    "OpenAIProvider",
    "Provider",
    "ProviderSettings",
    "build_provider",
    "new_session",
]

PROVIDER_TYPES = ("openai", "openai-compatible", "anthropic", "mock")


def build_provider(settings: ProviderSettings, session: object) -> Provider:
    """The adapter for `settings.type`. Every HTTP adapter shares `session`, the `HttpClient` from
    `new_session()`.

    `session` is typed `object` only while engine/gateway.py still annotates its session as an aiohttp
    `ClientSession`; it is checked here at run time. Once the engine says `HttpClient`, type it so.
    """
    if settings.type in ("openai", "openai-compatible", "anthropic") and not isinstance(session, HttpClient):
        raise TypeError(f"build_provider needs the HttpClient from new_session(), not {type(session).__name__}")
    if settings.type in ("openai", "openai-compatible"):
        assert isinstance(session, HttpClient)
        return OpenAIProvider(settings, session)
    if settings.type == "anthropic":
        assert isinstance(session, HttpClient)
        return AnthropicProvider(settings, session)
    if settings.type == "mock":
        return MockProvider(settings)
    raise ValueError(f"unknown provider type {settings.type!r}; expected one of {', '.join(PROVIDER_TYPES)}")
