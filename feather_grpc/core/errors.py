"""Typed failures the engine raises; the server maps each to one gRPC status (server/status.py)."""

from __future__ import annotations

from dataclasses import dataclass

from feather_grpc.core.results import LastFailure


class FeatherError(Exception):
    """Base of every error the engine reports to a caller. `message` is safe to show: no secrets."""

    reason = "INTERNAL"
    code = "INTERNAL"  # the gRPC status code name this error maps to (DESIGN.md section 3)

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


@dataclass(frozen=True, slots=True)
class FieldViolation:
    field: str  # path in the request, e.g. "messages[2].content"
    description: str


class InvalidRequest(FeatherError):
    reason = "INVALID_REQUEST"
    code = "INVALID_ARGUMENT"

    def __init__(self, violations: list[FieldViolation]) -> None:
        super().__init__("invalid request: " + "; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


class ModelNotFound(FeatherError):
    reason = "MODEL_NOT_FOUND"
    code = "NOT_FOUND"

    def __init__(self, model: str, provider: str = "") -> None:
        where = f" in provider {provider!r}" if provider else ""
        super().__init__(f"no model or alias named {model!r}{where}")
        self.model = model
        self.provider = provider


class UpstreamUnavailable(FeatherError):
    """Every candidate failed with a retryable error (or had an open circuit)."""

    reason = "UPSTREAM_UNAVAILABLE"
    code = "UNAVAILABLE"

    def __init__(
        self,
        message: str,
        retry_after_s: float | None = None,
        upstream_reason: str = "",
        last_failure: LastFailure | None = None,
    ) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.upstream_reason = upstream_reason  # the last attempt's, e.g. UPSTREAM_REDIRECT
        self.last_failure = last_failure  # the upstream failure behind it (for an open circuit: what opened it)


class UpstreamInvalidRequest(FeatherError):
    """The provider rejected the request itself (400, 404, 413, 422...): retrying cannot help."""

    reason = "UPSTREAM_INVALID_REQUEST"
    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, provider: str, http_status: int, upstream_reason: str = "") -> None:
        super().__init__(message)
        self.provider = provider
        self.http_status = http_status
        self.upstream_reason = upstream_reason  # e.g. UPSTREAM_CONTEXT_TOO_LONG


class UpstreamAuthFailed(FeatherError):
    """The gateway's own credentials were rejected: the caller did nothing wrong."""

    reason = "UPSTREAM_AUTH_FAILED"
    code = "INTERNAL"

    def __init__(self, provider: str) -> None:
        super().__init__(f"provider {provider!r} rejected the gateway's credentials")
        self.provider = provider


class DeadlineExceeded(FeatherError):
    reason = "DEADLINE_EXCEEDED"
    code = "DEADLINE_EXCEEDED"

    def __init__(self, message: str, request_timeout_ms: int | None = None) -> None:
        super().__init__(message)
        self.request_timeout_ms = request_timeout_ms  # set when the gateway's requestTimeoutMs ran out


class ProviderError(Exception):
    """One failed upstream attempt, classified by the adapter.

    `message` must be safe to surface: adapters put the provider's error type/message in it, never keys
    or request bodies. An `http_status` of 2xx says the upstream answered (and billed) but the reply could
    not be used (not JSON, cut, over a size limit): the engine bills that attempt as an estimate.
    """

    def __init__(
        self,
        reason: str,
        message: str,
        *,
        http_status: int = 0,
        retryable: bool,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason  # UPPER_SNAKE, e.g. UPSTREAM_RATE_LIMITED, UPSTREAM_SERVER_ERROR
        self.message = message
        self.http_status = http_status
        self.retryable = retryable
        self.retry_after_s = retry_after_s


class Unauthenticated(FeatherError):
    reason = "API_KEY_INVALID"
    code = "UNAUTHENTICATED"


class ModelNotAllowed(FeatherError):
    reason = "MODEL_NOT_ALLOWED"
    code = "PERMISSION_DENIED"

    def __init__(self, tenant: str, model: str) -> None:
        super().__init__(f"tenant {tenant!r} may not use model {model!r}")
        self.tenant = tenant
        self.model = model


class PermissionDenied(FeatherError):
    reason = "PERMISSION_DENIED"
    code = "PERMISSION_DENIED"


class RateLimitExceeded(FeatherError):
    """A gateway limit (tenant requests/tokens per minute, concurrency, provider:model rate) is exhausted."""

    reason = "RATE_LIMITED"
    code = "RESOURCE_EXHAUSTED"

    def __init__(self, subject: str, description: str, retry_after_s: float | None) -> None:
        super().__init__(f"rate limit exceeded: {description}")
        self.subject = subject  # e.g. "tenant:acme:rpm" or "provider:openai:gpt-4o"
        self.description = description
        self.retry_after_s = retry_after_s


class BudgetExhausted(FeatherError):
    reason = "BUDGET_EXCEEDED"
    code = "RESOURCE_EXHAUSTED"

    def __init__(self, tenant: str, window: str, budget_nanos: int, spent_nanos: int) -> None:
        super().__init__(f"tenant {tenant!r} has used its {window} budget")
        self.tenant = tenant
        self.window = window
        self.budget_nanos = budget_nanos
        self.spent_nanos = spent_nanos


class Overloaded(FeatherError):
    reason = "OVERLOADED"
    code = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class StateStoreUnavailable(FeatherError):
    """The shared state store (Redis) is unreachable and the gateway is configured to fail closed."""

    reason = "STATE_UNAVAILABLE"
    code = "UNAVAILABLE"


class LedgerUnavailable(FeatherError):
    """The usage ledger cannot write (disk full, read-only file system, database errors). Calls are refused
    before they reach an upstream while it cannot: what they would cost could not be recorded."""

    reason = "LEDGER_UNAVAILABLE"
    code = "UNAVAILABLE"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ConfigError(Exception):
    """A configuration problem, with the field path and a one-line fix."""

    def __init__(self, source: str, path: str, problem: str, fix: str) -> None:
        super().__init__(f"{source}: {path}: {problem}. Fix: {fix}")
        self.path = path
