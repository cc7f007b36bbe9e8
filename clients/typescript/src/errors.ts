// FeatherError: a failed call's gRPC code plus the google.rpc.Status details from its trailers.
import { Metadata, status } from "@grpc/grpc-js";
import type { ServiceError } from "@grpc/grpc-js";
import { BadRequest, ErrorInfo, QuotaFailure, RetryInfo } from "./gen/google/rpc/error_details";
import { Status } from "./gen/google/rpc/status";

const STATUS_DETAILS_KEY = "grpc-status-details-bin";
const TYPE_PREFIX = "type.googleapis.com/";

/** One invalid request field (google.rpc.BadRequest), e.g. `messages[0].content`. */
export interface FieldViolation {
  field: string;
  description: string;
  reason: string;
}

/** One exceeded quota (google.rpc.QuotaFailure). */
export interface QuotaViolation {
  subject: string;
  description: string;
}

/**
 * A call that failed. Branch on `code` and `reason`, never on the message.
 *
 * `reason`, `metadata`, `retryDelayMs` and `fieldViolations` come from the google.rpc.Status the gateway sends
 * in the trailers. Errors not made by the gateway (connection refused, a client deadline) carry no status:
 * their `reason` is "" and their lists are empty.
 */
export class FeatherError extends Error {
  override readonly name = "FeatherError";
  /** The gRPC status code (`status.INVALID_ARGUMENT`, ...). */
  readonly code: status;
  /** The status message from the gateway. */
  readonly details: string;
  /** The whole google.rpc.Status, when the error carried one. */
  readonly status: Status | undefined;
  /** The ErrorInfo reason, UPPER_SNAKE (e.g. `MODEL_NOT_FOUND`); "" when there is none. */
  readonly reason: string;
  /** The ErrorInfo domain: `feather.v1` for the gateway's own errors. */
  readonly domain: string;
  /** The ErrorInfo metadata (lowerCamel keys such as `requestId`, `model`). */
  readonly metadata: Record<string, string>;
  /** How long the gateway asks the caller to wait before retrying (RetryInfo), if it said. */
  readonly retryDelayMs: number | undefined;
  readonly fieldViolations: FieldViolation[];
  readonly quotaViolations: QuotaViolation[];

  constructor(code: status, details: string, trailers?: Metadata) {
    const raw = trailers?.get(STATUS_DETAILS_KEY)[0];
    const decoded = raw instanceof Buffer ? Status.decode(raw) : undefined;
    const unpack = <T>(name: string, decode: (b: Uint8Array) => T): T[] =>
      (decoded?.details ?? []).filter((d) => d.typeUrl === TYPE_PREFIX + name).map((d) => decode(d.value));
    const info = unpack("google.rpc.ErrorInfo", ErrorInfo.decode)[0];
    super(`${status[code] ?? code}${info?.reason ? ` ${info.reason}` : ""}: ${details}`);
    this.code = code;
    this.details = details;
    this.status = decoded;
    this.reason = info?.reason ?? "";
    this.domain = info?.domain ?? "";
    this.metadata = { ...(info?.metadata ?? {}) };
    const delay = unpack("google.rpc.RetryInfo", RetryInfo.decode)[0]?.retryDelay;
    this.retryDelayMs = delay ? Number(delay.seconds) * 1000 + delay.nanos / 1e6 : undefined;
    this.fieldViolations = unpack("google.rpc.BadRequest", BadRequest.decode).flatMap((b) =>
      b.fieldViolations.map((v) => ({ field: v.field, description: v.description, reason: v.reason })),
    );
    this.quotaViolations = unpack("google.rpc.QuotaFailure", QuotaFailure.decode).flatMap((q) =>
      q.violations.map((v) => ({ subject: v.subject, description: v.description })),
    );
  }

  /** The status code's name, e.g. `INVALID_ARGUMENT`. */
  get codeName(): string {
    return status[this.code] ?? String(this.code);
  }

  get requestId(): string {
    return this.metadata.requestId ?? "";
  }

  static fromServiceError(error: ServiceError): FeatherError {
    return new FeatherError(error.code ?? status.UNKNOWN, error.details ?? error.message, error.metadata);
  }
}
