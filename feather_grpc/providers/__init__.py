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
    "wire_format",
]

PROVIDER_TYPES = ("openai", "openai-compatible", "anthropic", "azure-openai", "bedrock", "gemini", "vertex", "mock")

# The input kinds (engine.inputs) each wire format (see `wire_format`) carries. OpenAI chat takes a PDF only
# inline (`file`) and a tool result only as text; Anthropic takes no audio. The mock answers from the text
# alone. A wire format missing here takes none: routing skips it for a request with parts.
_OPENAI_INPUTS = frozenset({inputs.IMAGE, inputs.IMAGE_URL, inputs.DOCUMENT, inputs.AUDIO})
ACCEPTED_INPUTS: dict[str, frozenset[str]] = {
    "openai": _OPENAI_INPUTS,
    "openai-compatible": _OPENAI_INPUTS,
    "anthropic": frozenset(
        {inputs.IMAGE, inputs.IMAGE_URL, inputs.DOCUMENT, inputs.DOCUMENT_URL, inputs.TOOL_RESULT_MEDIA}
    ),
    "azure-openai": _OPENAI_INPUTS,
    # Responses: input_image (URL or data URL), input_file (PDF inline or by URL), and both in tool results
    # (function_call_output); its message content has no audio.
    "responses": frozenset(
        {inputs.IMAGE, inputs.IMAGE_URL, inputs.DOCUMENT, inputs.DOCUMENT_URL, inputs.TOOL_RESULT_MEDIA}
    ),
    # Gemini (both types): inlineData for bytes, fileData for URLs, and both in a functionResponse's parts.
    "gemini": frozenset(inputs.DESCRIPTIONS),
    "vertex": frozenset(inputs.DESCRIPTIONS),
    # Bedrock Converse: image, document and audio blocks with inline bytes (it fetches no URL); images and
    # PDFs in tool results.
    "bedrock": frozenset({inputs.IMAGE, inputs.DOCUMENT, inputs.AUDIO, inputs.TOOL_RESULT_MEDIA}),
    "mock": frozenset(inputs.DESCRIPTIONS),
}


def wire_format(ptype: str, model: str, responses_models: tuple[str, ...] = ()) -> str:
    """The API that serves upstream `model` at a provider of type `ptype`: the type itself, except the
    Responses API ("responses") for the models configured to use it, and Claude on Vertex ("anthropic")."""
    if model in responses_models:
        return "responses"
    if ptype == "vertex" and model.startswith("claude"):
        return "anthropic"
    return ptype


def build_provider(settings: ProviderSettings, session: UpstreamClient) -> Provider:
    """The adapter for `settings.type`, on `session` (`new_session()`, or `UpstreamClients.get` for the
    provider's transport); the providers of one transport share one."""
    if settings.type in ("openai", "openai-compatible"):
        if settings.responses_models:
            from feather_grpc.providers.responses import OpenAIResponsesProvider

            return OpenAIResponsesProvider(settings, session)
        return OpenAIProvider(settings, session)
    if settings.type == "anthropic":
        return AnthropicProvider(settings, session)
    if settings.type == "azure-openai":
        from feather_grpc.providers.azure import AzureOpenAIProvider, AzureResponsesProvider

        if settings.responses_models:
            return AzureResponsesProvider(settings, session)
        return AzureOpenAIProvider(settings, session)
    if settings.type == "bedrock":
        from feather_grpc.providers.bedrock import BedrockProvider

        return BedrockProvider(settings, session)
    if settings.type in ("gemini", "vertex"):
        from feather_grpc.providers.gemini import GeminiProvider

        return GeminiProvider(settings, session)
    if settings.type == "mock":
        return MockProvider(settings)
    raise ValueError(f"unknown provider type {settings.type!r}; expected one of {', '.join(PROVIDER_TYPES)}")
