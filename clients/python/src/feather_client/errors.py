"""FeatherError: a failed call's gRPC code plus the google.rpc.Status details, decoded when first asked for."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from functools import cached_property
from typing import Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

__all__ = ["FeatherError", "FieldViolation", "QuotaViolation"]

_STATUS_DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid request field (google.rpc.BadRequest), e.g. `messages[0].content`."""

    field: str
    description: str
    reason: str = ""


@dataclass(frozen=True)
class QuotaViolation:
    """One exceeded quota (google.rpc.QuotaFailure)."""

    subject: str
    description: str


class FeatherError(Exception):
    """A call that failed. Branch on `code` and `reason`, never on `message`.

    `reason`, `metadata`, `retry_delay` and `field_violations` come from the google.rpc.Status the gateway sends
    in the trailers; they are decoded on first access. Errors not made by the gateway (a connection refused, a
    deadline the client enforced) have no status: their `reason` is "" and their lists are empty.
    """

    def __init__(self, code: Any, message: str, trailing_metadata: Iterable[tuple[str, str | bytes]] = ()) -> None:
        super().__init__(code, message)
        self.code: Any = code
        """The `grpc.StatusCode`."""
        self.message = message
        self._details_bin: bytes | None = next(
            (v for k, v in trailing_metadata if k == _STATUS_DETAILS_KEY and isinstance(v, bytes)), None
        )

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> FeatherError:
        """From the exception grpc raises (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else None
        trailers = error.trailing_metadata() if hasattr(error, "trailing_metadata") else None
        return cls(code, str(details or ""), tuple(trailers or ()))

    def __str__(self) -> str:
        reason = f" {self.reason}" if self.reason else ""
        return f"{self.code.name}{reason}: {self.message}"

    def __repr__(self) -> str:
        return f"FeatherError(code={self.code.name}, reason={self.reason!r}, message={self.message!r})"

    @cached_property
    def status(self) -> status_pb2.Status | None:
        """The whole google.rpc.Status, or None when the error carried none."""
        if self._details_bin is None:
            return None
        return status_pb2.Status.FromString(self._details_bin)

    def _details(self, message_type: type[Any]) -> list[Any]:
        found = []
        for packed in self.status.details if self.status else ():
            if isinstance(packed, any_pb2.Any) and packed.Is(message_type.DESCRIPTOR):
                detail = message_type()
                packed.Unpack(detail)
                found.append(detail)
        return found

    @cached_property
    def _error_info(self) -> error_details_pb2.ErrorInfo:
        infos = self._details(error_details_pb2.ErrorInfo)
        return infos[0] if infos else error_details_pb2.ErrorInfo()

    @property
    def reason(self) -> str:
        """The ErrorInfo reason, UPPER_SNAKE (e.g. `MODEL_NOT_FOUND`); "" when there is none."""
        return str(self._error_info.reason)

    @property
    def domain(self) -> str:
        """The ErrorInfo domain: `feather.v1` for the gateway's own errors."""
        return str(self._error_info.domain)

    @property
    def metadata(self) -> dict[str, str]:
        """The ErrorInfo metadata (lowerCamel keys such as `requestId`, `model`)."""
        return dict(self._error_info.metadata)

    @property
    def request_id(self) -> str:
        return self.metadata.get("requestId", "")

    @cached_property
    def retry_delay(self) -> timedelta | None:
        """How long the gateway asks the caller to wait before retrying (RetryInfo), if it said."""
        infos = self._details(error_details_pb2.RetryInfo)
        if not infos:
            return None
        return timedelta(microseconds=infos[0].retry_delay.ToNanoseconds() / 1000)

    @cached_property
    def field_violations(self) -> list[FieldViolation]:
        """The invalid fields (BadRequest), in the order the gateway listed them."""
        return [
            FieldViolation(v.field, v.description, v.reason)
            for bad in self._details(error_details_pb2.BadRequest)
            for v in bad.field_violations
        ]

    @cached_property
    def quota_violations(self) -> list[QuotaViolation]:
        """The exceeded quotas (QuotaFailure) of a RESOURCE_EXHAUSTED error."""
        return [
            QuotaViolation(v.subject, v.description)
            for failure in self._details(error_details_pb2.QuotaFailure)
            for v in failure.violations
        ]
