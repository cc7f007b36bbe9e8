"""Azure OpenAI (type `azure-openai`): the OpenAI Chat Completions adapter at Azure's URLs, with Azure's auth.

URLs, from `baseUrl` (the resource endpoint, e.g. https://my-resource.openai.azure.com):
- with `apiVersion`: `{baseUrl}/openai/deployments/{deployment}/chat/completions?api-version={apiVersion}`;
- without: Azure's v1 endpoint, `{baseUrl}/openai/v1/chat/completions`, the deployment named in `model`.
A model's `deployment` (default: its name) is what Azure knows it as.

Auth: the `api-key` header (apiKeyEnv/apiKeyFile), or with `auth: entra` a Microsoft Entra bearer token
from azure-identity's DefaultAzureCredential (environment, workload identity, managed identity, Azure
CLI...), fetched off the event loop and cached until 5 minutes before it expires.

Azure's content filter: a `content_filter` finish reason, or a 200 whose `prompt_filter_results` say the
prompt was filtered, is FinishReason.CONTENT_FILTER; a 400 with code `content_filter` is
UPSTREAM_CONTENT_FILTERED (the request's fault: neither retried nor sent to another provider,
see providers/http.py).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any
from urllib.parse import quote

from feather_grpc.engine.types import ChatRequest, FinishReason, ProviderResponse
from feather_grpc.providers.base import ProviderSettings
from feather_grpc.providers.credentials import CachedCredential, load
from feather_grpc.providers.http_client import UpstreamClient, UpstreamEndpoint, encode_headers
from feather_grpc.providers.openai import OpenAIProvider
from feather_grpc.providers.responses import OpenAIResponsesProvider

__all__ = ["ENTRA_SCOPE", "AzureOpenAIProvider", "AzureResponsesProvider"]

ENTRA_SCOPE = "https://cognitiveservices.azure.com/.default"


class AzureOpenAIProvider(OpenAIProvider):
    def __init__(self, settings: ProviderSettings, session: UpstreamClient) -> None:
        # The parent's endpoint is the v1 URL; deployment URLs are made per deployment below.
        base = settings.base_url.rstrip("/")
        super().__init__(_v1_settings(settings, base), session)
        self.settings = settings
        self._api_key = settings.api_key  # redacted from every error message
        self._session = session
        self._base = base
        self._deployments = dict(settings.upstream_ids)
        self._endpoints: dict[str, UpstreamEndpoint] = {}
        self._headers = [("Content-Type", "application/json")]
        if settings.auth != "entra" and settings.api_key:
            self._headers.append(("api-key", settings.api_key))
        self._headers += settings.extra_headers
        # Every Azure chat model takes max_completion_tokens (its reasoning models refuse max_tokens).
        self._max_tokens_field = "max_completion_tokens"
        self._token: CachedCredential[str] | None = None
        if settings.auth == "entra":
            self._token = CachedCredential(settings.name, _entra_fetcher())

    def target(self, model: str) -> tuple[UpstreamEndpoint, str]:
        deployment = self._deployments.get(model, model)
        if not self.settings.api_version:
            return self._endpoint, deployment
        endpoint = self._endpoints.get(deployment)
        if endpoint is None:  # one per configured deployment: the config bounds this map
            url = (
                f"{self._base}/openai/deployments/{quote(deployment, safe='')}/chat/completions"
                f"?api-version={quote(self.settings.api_version, safe='')}"
            )
            endpoint = self._endpoints[deployment] = self._session.endpoint(url, self._headers, self.settings.egress)
        return endpoint, deployment

    async def request_headers(self) -> bytes:
        if self._token is None:
            return b""
        return encode_headers([("Authorization", f"Bearer {await self._token.get()}")])

    def _parse_completion(self, doc: object, request: ChatRequest) -> ProviderResponse:
        out = super()._parse_completion(doc, request)
        if isinstance(doc, dict) and _prompt_filtered(doc.get("prompt_filter_results")):
            out.finish_reason = FinishReason.CONTENT_FILTER
        return out

    async def aclose(self) -> None:
        if self._token is not None:
            await self._token.aclose()


class AzureResponsesProvider(AzureOpenAIProvider, OpenAIResponsesProvider):
    """Azure OpenAI whose `"api": "responses"` models use the Responses API, at Azure's v1 endpoint
    (`{baseUrl}/openai/v1/responses`, the deployment as `model`), with the same auth."""


def _v1_settings(settings: ProviderSettings, base: str) -> ProviderSettings:
    headers = list(settings.extra_headers)
    if settings.auth != "entra" and settings.api_key:
        headers.insert(0, ("api-key", settings.api_key))
    # api_key "" keeps the parent from sending `Authorization: Bearer <key>`; redaction still knows it.
    return replace(settings, base_url=f"{base}/openai/v1", api_key="", extra_headers=tuple(headers))


def _prompt_filtered(results: object) -> bool:
    if not isinstance(results, list):
        return False
    for item in results:
        filters = item.get("content_filter_results") if isinstance(item, dict) else None
        if isinstance(filters, dict) and any(isinstance(f, dict) and f.get("filtered") for f in filters.values()):
            return True
    return False


def _entra_fetcher() -> Any:
    credential: Any = None

    def fetch() -> tuple[str, float | None]:
        nonlocal credential
        if credential is None:
            identity: Any = load("azure.identity")
            credential = identity.DefaultAzureCredential()
        token = credential.get_token(ENTRA_SCOPE)
        return str(token.token), float(token.expires_on)

    return fetch
