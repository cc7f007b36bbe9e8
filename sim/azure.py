"""A local Azure OpenAI: the OpenAI simulator (sim/upstream.py) at Azure's URLs, with Azure's auth and
content-filter annotations.

    async with AzureSimulator(api_key="azure-key") as sim:      # sim.url is the resource endpoint
        POST {sim.url}/openai/deployments/{deployment}/chat/completions?api-version=2024-10-21
        POST {sim.url}/openai/v1/chat/completions               (the deployment in `model`)

Auth as Azure takes it: the `api-key` header, or `Authorization: Bearer` with the key (v1) or an Entra
token (`entra_token`). A missing `api-version` on a deployment URL is Azure's 404. Replies carry
`prompt_filter_results` (streams: in a first chunk with no choices, as Azure sends it) and per-choice
`content_filter_results`; `filter_prompt = True` marks the prompt as filtered. Scripting (`enqueue`,
`Reply`, `requests`) is the parent's; a `Reply(status=400, error_code="content_filter")` gets Azure's
content-filter error body.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from sim.upstream import Reply, UpstreamSimulator

__all__ = ["AzureSimulator"]

_SAFE = {"filtered": False, "severity": "safe"}
_CATEGORIES = ("hate", "self_harm", "sexual", "violence")


def _filters(filtered: bool) -> dict[str, Any]:
    out: dict[str, Any] = {c: dict(_SAFE) for c in _CATEGORIES}
    if filtered:
        out["violence"] = {"filtered": True, "severity": "high"}
    return out


class AzureSimulator(UpstreamSimulator):
    def __init__(self, *, api_key: str | None = None, entra_token: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.azure_key = api_key
        self.entra_token = entra_token
        self._filter_prompt = False
        self.api_versions: list[str] = []  # the api-version of each deployment-URL request

    @property
    def filter_prompt(self) -> bool:
        return self._filter_prompt

    @filter_prompt.setter
    def filter_prompt(self, value: bool) -> None:
        self._filter_prompt = value
        self._cache.clear()  # cached default replies carry the old annotations

    def _routes(self, app: web.Application) -> None:
        app.router.add_post("/openai/deployments/{deployment}/chat/completions", self._deployment)
        app.router.add_post("/openai/v1/chat/completions", self._v1)

    async def _deployment(self, request: web.Request) -> web.StreamResponse:
        version = request.query.get("api-version")
        if not version:
            return _azure_error(404, "404", "Resource not found")
        self.api_versions.append(version)
        return await self._checked(request, v1=False)

    async def _v1(self, request: web.Request) -> web.StreamResponse:
        return await self._checked(request, v1=True)

    async def _checked(self, request: web.Request, *, v1: bool) -> web.StreamResponse:
        key = request.headers.get("api-key")
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        allowed = {t for t in (self.azure_key, self.entra_token) if t}
        if allowed and key not in allowed and bearer not in allowed:
            message = "Access denied due to invalid subscription key or wrong API endpoint."
            return _azure_error(401, "401", message)
        return await self._handle(request, openai=True)

    def _error(
        self, openai: bool, status: int, err_type: str, code: str | None, message: str, reply: Reply | None = None
    ) -> web.Response:
        if code != "content_filter":
            return super()._error(openai, status, err_type, code, message, reply)
        text = message or (
            "The response was filtered due to the prompt triggering Azure OpenAI's content management policy."
        )
        inner = {"code": "ResponsibleAIPolicyViolation", "content_filter_result": _filters(True)}
        body: dict[str, dict[str, Any]] = {
            "error": {"message": text, "type": None, "param": "prompt", "code": code, "status": status}
        }
        body["error"]["innererror"] = inner
        return web.json_response(body, status=status, dumps=lambda o: orjson.dumps(o).decode())

    def _encode(
        self,
        body: dict[str, Any],
        model: str,
        stream: bool,
        openai: bool,
        reply: Reply,
        last_user: str,
        include_usage: bool,
    ) -> bytes | list[bytes]:
        encoded = super()._encode(body, model, stream, openai, reply, last_user, include_usage)
        prompt = [{"prompt_index": 0, "content_filter_results": _filters(self._filter_prompt)}]
        filtered = reply.finish_reason == "content_filter"
        if isinstance(encoded, bytes):
            doc = orjson.loads(encoded)
            doc["prompt_filter_results"] = prompt
            for choice in doc.get("choices", ()):
                choice["content_filter_results"] = _filters(filtered)
            return orjson.dumps(doc)
        first = {"choices": [], "created": 0, "id": "", "model": "", "object": "", "prompt_filter_results": prompt}
        return [b"data: " + orjson.dumps(first) + b"\n\n", *encoded]


def _azure_error(status: int, code: str, message: str) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps({"error": {"code": code, "message": message}}),
        content_type="application/json",
    )
