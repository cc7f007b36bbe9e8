"""Provider adapters, one per wire format, built from configuration by `build_provider`."""

from __future__ import annotations

from feather_grpc.engine import inputs
from feather_grpc.providers.anthropic import AnthropicProvider
from feather_grpc.providers.base import Provider, ProviderSettings
from feather_grpc.providers.http import new_session
from feather_grpc.providers.http_client import UpstreamClient
from feather_grpc.providers.mock import MockProvider
from feather_grpc.providers.openai import OpenAIProvider
from feather_grpc.providers.transport.client import HttpClient

__all__ = [
    "ACCEPTED_INPUTS",
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

# The input kinds (engine.inputs) each wire format carries. OpenAI chat takes a PDF only inline (`file`) and
# a tool result only as text; Anthropic takes no audio. The mock answers from the text alone.
_OPENAI_INPUTS = frozenset({inputs.IMAGE, inputs.IMAGE_URL, inputs.DOCUMENT, inputs.AUDIO})
ACCEPTED_INPUTS: dict[str, frozenset[str]] = {
    "openai": _OPENAI_INPUTS,
    "openai-compatible": _OPENAI_INPUTS,
    "anthropic": frozenset(
        {inputs.IMAGE, inputs.IMAGE_URL, inputs.DOCUMENT, inputs.DOCUMENT_URL, inputs.TOOL_RESULT_MEDIA}
    ),
    "mock": frozenset(inputs.DESCRIPTIONS),
}


def build_provider(settings: ProviderSettings, session: UpstreamClient) -> Provider:
    """The adapter for `settings.type`, on `session` (`new_session()`, or `UpstreamClients.get` for the
    provider's transport); the providers of one transport share one."""
    if settings.type in ("openai", "openai-compatible"):
        return OpenAIProvider(settings, session)
    if settings.type == "anthropic":
        return AnthropicProvider(settings, session)
    if settings.type == "mock":
        return MockProvider(settings)
    raise ValueError(f"unknown provider type {settings.type!r}; expected one of {', '.join(PROVIDER_TYPES)}")
