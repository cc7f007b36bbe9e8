"""The one place gRPC error statuses are built (google.rpc.Status with ErrorInfo and friends)."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from feather_grpc.core.errors import (
    BudgetExhausted,
    DeadlineExceeded,
    FeatherError,
    InvalidRequest,
    LedgerUnavailable,
    ModelNotAllowed,
    ModelNotFound,
    Overloaded,
    RateLimitExceeded,
    UpstreamAuthFailed,
    UpstreamInvalidRequest,
    UpstreamUnavailable,
)
from feather_grpc.engine.validation import usable_request_id

DOMAIN = "feather.v1"
NO_RETRY_PUSHBACK = "grpc-retry-pushback-ms"


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def _retry_info(seconds: float) -> any_pb2.Any:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(int(max(seconds, 0.0) * 1e9))
    return _pack(error_details_pb2.RetryInfo(retry_delay=delay))


# A client reads at most 8 KiB of trailers (gRPC's default grpc.max_metadata_size) and fails the call with
# RESOURCE_EXHAUSTED, the error lost, past that. The message goes there twice (grpc-message, percent-encoded:
# up to 3 bytes per UTF-8 byte; and in grpc-status-details-bin, base64), so the message, each ErrorInfo
# value and the BadRequest violations (which echo the caller's values) are bounded in UTF-8 bytes.
MAX_MESSAGE_BYTES = 768
MAX_METADATA_VALUE_BYTES = 200
MAX_VIOLATIONS_BYTES = 1024
_VIOLATION_PART_BYTES = 200


def bounded(text: str, limit: int) -> str:
    """`text`, cut to at most `limit` UTF-8 bytes (on a character boundary) and marked "..." if cut."""
    data = text.encode("utf-8", "surrogatepass")
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode("utf-8", "ignore") + "..."


def _violations(violations: list[tuple[str, str]]) -> error_details_pb2.BadRequest:
    """The first violations that fit MAX_VIOLATIONS_BYTES, then one saying how many more there were."""
    kept: list[error_details_pb2.BadRequest.FieldViolation] = []
    size = 0
    for i, (field, description) in enumerate(violations):
        v = error_details_pb2.BadRequest.FieldViolation(
            field=bounded(field, _VIOLATION_PART_BYTES), description=bounded(description, _VIOLATION_PART_BYTES)
        )
        size += v.ByteSize()
        if size > MAX_VIOLATIONS_BYTES:
            more = len(violations) - i
            kept.append(
                error_details_pb2.BadRequest.FieldViolation(field="request", description=f"and {more} more violations")
            )
            break
        kept.append(v)
    return error_details_pb2.BadRequest(field_violations=kept)


def build_status(
    code: grpc.StatusCode,
    reason: str,
    message: str,
    metadata: dict[str, str] | None = None,
    details: list[any_pb2.Any] | None = None,
) -> grpc.Status:
    """A status whose message matches the call's, carrying exactly one ErrorInfo first; bounded in size."""
    values = {k: bounded(v, MAX_METADATA_VALUE_BYTES) for k, v in (metadata or {}).items()}
    info = error_details_pb2.ErrorInfo(reason=reason, domain=DOMAIN, metadata=values)
    status = status_pb2.Status(
        code=getattr(code_pb2, code.name),
        message=bounded(message, MAX_MESSAGE_BYTES),
        details=[_pack(info), *(details or [])],
    )
    return rpc_status.to_status(status)


def status_for(error: FeatherError, request_id: str = "") -> grpc.Status:
    """Maps an engine error to its status (DESIGN.md section 3)."""
    request_id = usable_request_id(request_id)  # an over-long one is not echoed back
    metadata: dict[str, str] = {"requestId": request_id} if request_id else {}
    details: list[any_pb2.Any] = []
    if isinstance(error, InvalidRequest):
        details.append(_pack(_violations([(v.field, v.description) for v in error.violations])))
    elif isinstance(error, ModelNotFound):
        metadata["model"] = error.model
        if error.provider:
            metadata["provider"] = error.provider
    elif isinstance(error, DeadlineExceeded) and error.request_timeout_ms is not None:
        metadata["requestTimeoutMs"] = str(error.request_timeout_ms)
    elif isinstance(error, UpstreamUnavailable):
        if error.upstream_reason:
            metadata["upstreamReason"] = error.upstream_reason  # why the last attempt failed
        if error.retry_after_s is not None:
            details.append(_retry_info(error.retry_after_s))
        if error.last_failure is not None:  # why: for an open circuit, the failure that opened it
            metadata["lastFailureReason"] = error.last_failure.reason
            metadata["lastFailure"] = error.last_failure.message
            if error.last_failure.http_status:
                metadata["lastFailureHttpStatus"] = str(error.last_failure.http_status)
    elif isinstance(error, UpstreamInvalidRequest):
        metadata["provider"] = error.provider
        metadata["httpStatus"] = str(error.http_status)
        if error.upstream_reason:  # e.g. UPSTREAM_CONTENT_FILTERED, UPSTREAM_CONTEXT_TOO_LONG
            metadata["upstreamReason"] = error.upstream_reason
    elif isinstance(error, UpstreamAuthFailed):
        metadata["provider"] = error.provider
    elif isinstance(error, RateLimitExceeded):
        metadata["subject"] = error.subject
        details.append(
            _pack(
                error_details_pb2.QuotaFailure(
                    violations=[
                        error_details_pb2.QuotaFailure.Violation(subject=error.subject, description=error.description)
                    ]
                )
            )
        )
        if error.retry_after_s is not None:
            details.append(_retry_info(error.retry_after_s))
    elif isinstance(error, BudgetExhausted):
        metadata.update(
            tenant=error.tenant,
            window=error.window,
            budgetNanosUsd=str(error.budget_nanos),
            spentNanosUsd=str(error.spent_nanos),
        )
    elif isinstance(error, Overloaded | LedgerUnavailable):
        details.append(_retry_info(error.retry_after_s))
    elif isinstance(error, ModelNotAllowed):
        metadata.update(tenant=error.tenant, model=error.model)
    status = build_status(grpc.StatusCode[error.code], error.reason, error.message, metadata, details)
    if isinstance(error, UpstreamUnavailable):
        # The gateway already retried and failed over across its upstreams: a client retrying this too would
        # multiply every attempt (and open the circuits it then reports). gRPC clients honour a negative
        # pushback as "do not retry" (gRPC A6); UNAVAILABLE from the transport (a gateway down) still retries.
        return status._replace(trailing_metadata=(*status.trailing_metadata, (NO_RETRY_PUSHBACK, "-1")))
    return status


def internal_status(request_id: str = "") -> grpc.Status:
    """For anything unexpected: no traceback, no upstream text, no secrets."""
    return build_status(
        grpc.StatusCode.INTERNAL,
        "INTERNAL",
        "internal gateway error; the request id identifies it in the gateway's logs",
        {"requestId": request_id} if usable_request_id(request_id) else {},
    )
