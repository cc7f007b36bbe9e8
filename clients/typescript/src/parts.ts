// Typed helpers for content parts: text, images, PDF documents and audio in one message.
//   client.chat([user("What is in this picture?", image(pngBytes, "image/png"))], { model: "smart" })
import { CacheTtl, ImageDetail, Message, Part, ReasoningEffort, ReasoningOptions, Tool } from "./gen/feather/v1/feather_service";

export type ImageMediaType = "image/jpeg" | "image/png" | "image/gif" | "image/webp";
export type Detail = "" | "auto" | "low" | "high";

const DETAIL: Record<Detail, ImageDetail> = {
  "": ImageDetail.IMAGE_DETAIL_UNSPECIFIED,
  auto: ImageDetail.IMAGE_DETAIL_AUTO,
  low: ImageDetail.IMAGE_DETAIL_LOW,
  high: ImageDetail.IMAGE_DETAIL_HIGH,
};

export const text = (value: string): Part => Part.fromPartial({ kind: { $case: "text", value: value } });

/** An inline image (sent base64-encoded); `detail` is OpenAI's detail level. */
export const image = (data: Buffer, mediaType: ImageMediaType, detail: Detail = ""): Part =>
  Part.fromPartial({ kind: { $case: "image", value: { source: { $case: "data", value: data }, mediaType, detail: DETAIL[detail] } } });

/** An image the provider fetches from an http(s) URL. */
export const imageUrl = (url: string, detail: Detail = ""): Part =>
  Part.fromPartial({ kind: { $case: "image", value: { source: { $case: "url", value: url }, detail: DETAIL[detail] } } });

/** An inline PDF document. */
export const pdf = (data: Buffer, title = ""): Part =>
  Part.fromPartial({ kind: { $case: "document", value: { source: { $case: "data", value: data }, mediaType: "application/pdf", title } } });

/** A PDF document by URL (Anthropic only: routing skips providers that cannot fetch one). */
export const pdfUrl = (url: string, title = ""): Part =>
  Part.fromPartial({ kind: { $case: "document", value: { source: { $case: "url", value: url }, mediaType: "application/pdf", title } } });

/** Audio input (OpenAI only: routing skips providers that take none). */
export const audio = (data: Buffer, format: "wav" | "mp3"): Part =>
  Part.fromPartial({ kind: { $case: "audio", value: { data, format } } });

export type Ttl = "" | "5m" | "1h";
const TTL: Record<Ttl, CacheTtl> = {
  "": CacheTtl.CACHE_TTL_UNSPECIFIED,
  "5m": CacheTtl.CACHE_TTL_FIVE_MINUTES,
  "1h": CacheTtl.CACHE_TTL_ONE_HOUR,
};

/** Marks a prompt-cache breakpoint after a message (a system prompt), a part or a tool, and returns it:
 * `cached(system(rules), "1h")`. Anthropic caches the prompt up to there; "" is its default TTL (5m). */
export function cached<T extends Message | Part | Tool>(item: T, ttl: Ttl = ""): T {
  return { ...item, cacheBreakpoint: { ttl: TTL[ttl] } };
}

export type Effort = "" | "none" | "minimal" | "low" | "medium" | "high" | "xhigh";

/** Reasoning options: `effort` is OpenAI's reasoning_effort (on Anthropic without a budget, thinking with the
 * effort's budget); `budgetTokens` is Anthropic's extended-thinking budget (at least 1,024). */
export function reasoning(effort: Effort = "", budgetTokens?: number): ReasoningOptions {
  const name = `REASONING_EFFORT_${(effort || "unspecified").toUpperCase()}` as keyof typeof ReasoningEffort;
  return ReasoningOptions.fromPartial({ effort: ReasoningEffort[name], thinkingBudgetTokens: budgetTokens });
}
