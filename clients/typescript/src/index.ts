// Feather gRPC client for TypeScript: a typed facade over the generated feather.v1 grpc-js stubs.
export { DEFAULT_RETRY, serviceConfig, target } from "./channel";
export type { RetryPolicy, TlsOptions } from "./channel";
export { ChatStream, DEFAULT_TIMEOUT_MS, FeatherClient } from "./client";
export type { CallOpts, ChatOptions, ClientOptions, GroupBy, Policy, UsageOptions } from "./client";
export { FeatherError } from "./errors";
export type { FieldViolation, QuotaViolation } from "./errors";
export { assistant, assistantTurn, formatUsd, system, toMessage, toolResult, user } from "./results";
export type { ChatResult, Content, FinishReason, MessageLike, OpenAIContentPart, OpenAIMessage, TokenUsage } from "./results";
export { audio, cached, image, imageUrl, pdf, pdfUrl, reasoning, text } from "./parts";
export type { Detail, Effort, ImageMediaType, Ttl } from "./parts";
export * as pb from "./gen/feather/v1/feather_service";
export { status } from "@grpc/grpc-js";
