"""Plan, the first stage of a call: validate and redact the request, and list the candidates (provider,
model) this tenant may use for it, in order, keeping only those whose API can honour it."""

from __future__ import annotations

from feather_grpc.config import GatewayConfig, TenantConfig
from feather_grpc.core import inputs
from feather_grpc.core.errors import FieldViolation, InvalidRequest
from feather_grpc.core.types import ChatRequest
from feather_grpc.engine.admission import Admission
from feather_grpc.engine.call import Call
from feather_grpc.engine.ledger_guard import LedgerGuard
from feather_grpc.engine.redaction import Redactor
from feather_grpc.engine.routing import RouteCandidate, Router
from feather_grpc.engine.validation import validate_chat
from feather_grpc.providers import ACCEPTED_INPUTS, wire_format

STRUCTURED_OUTPUT = frozenset({"json_object", "json_schema"})  # response_format types that shape the reply
# The structured-output types each wire format (providers.wire_format) can be asked for. Anthropic's
# structured outputs (`output_config.format`, on Vertex too) and Bedrock's take a JSON schema; neither has a
# schema-less JSON mode.
STRUCTURED_OUTPUT_SUPPORT = {
    "openai": STRUCTURED_OUTPUT,
    "openai-compatible": STRUCTURED_OUTPUT,
    "anthropic": frozenset({"json_schema"}),
    "bedrock": frozenset({"json_schema"}),  # Converse's outputConfig.textFormat
    "azure-openai": STRUCTURED_OUTPUT,
    "responses": STRUCTURED_OUTPUT,
    "gemini": STRUCTURED_OUTPUT,
    "vertex": STRUCTURED_OUTPUT,
    "mock": STRUCTURED_OUTPUT,
}


class Planner:
    def __init__(self, config: GatewayConfig, router: Router, ledger_guard: LedgerGuard) -> None:
        self._config = config
        self._default_tenant = config.tenancy.default_tenant
        self._tenants = config.tenancy.tenants
        self._input_limits = config.routing.input_limits
        self._router = router
        self._ledger_guard = ledger_guard
        self._redactor = Redactor(config.routing.redact_pii) if config.routing.redact_pii else None
        self._providers = {p.name: p for p in config.providers}

    def plan(self, call: Call) -> tuple[TenantConfig, list[RouteCandidate]]:
        """Validates and redacts the request, and lists the candidates this tenant may use, in order."""
        self._ledger_guard.check()  # before any upstream: a call whose cost cannot be recorded is not made
        validate_chat(call.request, self._input_limits)
        if self._redactor is not None:
            call.request = self._redactor.request(call.request)
        req = call.request
        tenant = self.tenant(call)
        candidates = Admission.allowed(tenant, req.model, self._router.plan(req.model, req.provider, req.policy))
        return tenant, self.capable(req, candidates)

    def tenant(self, call: Call) -> TenantConfig:
        """The call's tenant: as authenticated, else as configured by name (an in-process embedding)."""
        return call.ctx.tenant_config or self._tenants.get(call.ctx.tenant, self._default_tenant)

    def capable(self, req: ChatRequest, candidates: list[RouteCandidate]) -> list[RouteCandidate]:
        """The candidates whose API can honour the request's JSON reply and take its parts (INVALID_ARGUMENT
        when none can)."""
        if req.response_format is not None and req.response_format.type in STRUCTURED_OUTPUT:
            candidates = self._structured_output_capable(req.model, req.response_format.type, candidates)
        needed = inputs.needs(req)
        if needed:
            candidates = self._input_capable(req.model, candidates, needed)
        return candidates

    def _structured_output_capable(
        self, requested: str, kind: str, candidates: list[RouteCandidate]
    ) -> list[RouteCandidate]:
        """A JSON reply is a promise the caller parses: never route it to an API that would ignore it."""

        def supports(c: RouteCandidate) -> bool:
            return kind in STRUCTURED_OUTPUT_SUPPORT.get(self._wire(c), frozenset())

        capable = [c for c in candidates if supports(c)]
        if not capable:
            why = f"no provider serving {requested!r} supports {kind}"
            apis = {self._wire(c) for c in candidates}
            if kind == "json_object" and "anthropic" in apis:
                why += " (the Anthropic Messages API takes a JSON schema: use RESPONSE_FORMAT_TYPE_JSON_SCHEMA)"
            elif kind == "json_object" and "bedrock" in apis:
                why += " (the Bedrock Converse API takes a JSON schema: use RESPONSE_FORMAT_TYPE_JSON_SCHEMA)"
            raise InvalidRequest([FieldViolation("response_format", why)])
        return capable

    def _wire(self, c: RouteCandidate) -> str:
        """The API serving the candidate (providers.wire_format)."""
        p = self._providers[c.provider]
        return wire_format(p.type, c.model.name, p.responses_models)

    def _input_capable(
        self, requested: str, candidates: list[RouteCandidate], needed: dict[str, str]
    ) -> list[RouteCandidate]:
        """Images, documents and audio go only where the wire format carries them: never dropped silently."""

        def takes(c: RouteCandidate) -> bool:
            return ACCEPTED_INPUTS.get(self._wire(c), frozenset()).issuperset(needed)

        capable = [c for c in candidates if takes(c)]
        if capable:
            return capable
        violations = []
        for kind, path in needed.items():
            refusing = sorted(
                {t for c in candidates if kind not in ACCEPTED_INPUTS.get(t := self._wire(c), frozenset())}
            )
            if refusing:
                apis = " or ".join(refusing)
                violations.append(
                    FieldViolation(
                        path, f"{inputs.DESCRIPTIONS[kind]} cannot be sent to the {apis} API serving {requested!r}"
                    )
                )
        if not violations:  # each kind has a taker, but no one provider takes them all
            path = next(iter(needed.values()))
            violations.append(
                FieldViolation(path, f"no provider serving {requested!r} takes all of this request's parts")
            )
        raise InvalidRequest(violations)
