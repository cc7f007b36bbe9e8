// What the facade hands back (ChatResult, TokenUsage), message helpers and exact cost formatting.
import {
  Attempt,
  ChatResponse,
  FinishReason as PbFinishReason,
  ImageDetail,
  Message,
  Part,
  Role,
  StreamChatResponse,
  StreamEnd,
  StreamStart,
  ThinkingBlock,
  TokenUsage as PbTokenUsage,
  ToolCall,
  UpstreamReply,
} from "./gen/feather/v1/feather_service";

export type FinishReason = "unspecified" | "stop" | "length" | "tool_calls" | "content_filter";

/** Tokens of one call, normalised across providers (cached and cache-write tokens are part of input). */
export interface TokenUsage {
  inputTokens: number;
  outputTokens: number;
  cachedInputTokens: number;
  cacheWriteTokens: number;
  reasoningTokens: number;
  /** Server-side web search requests the provider ran (billed per request when priced). */
  webSearchRequests: number;
}

/** A complete reply, from `chat()` or from a finished `streamChat()`. */
export interface ChatResult {
  text: string;
  finishReason: FinishReason;
  provider: string;
  /** The configured model that answered (what an alias resolved to). */
  model: string;
  usage: TokenUsage;
  /** Exact cost in nano-dollars (1e-9 USD); `formatUsd()` prints it without rounding. */
  costNanosUsd: bigint;
  latencyMs: number;
  requestId: string;
  toolCalls: ToolCall[];
  cached: boolean;
  unpriced: boolean;
  usageEstimated: boolean;
  timeToFirstTokenMs: number | undefined;
  attempts: Attempt[];
  /** The model's thinking, apart from `text` (Anthropic blocks keep their signatures). */
  thinking: ThinkingBlock[];
  /** What the provider said about its reply: id, model snapshot, system fingerprint, service tier, stop
   * sequence, refusal. */
  upstream: UpstreamReply | undefined;
}

/** The reply as the assistant message of the next turn: text, tool calls and thinking, unchanged. */
export const assistantTurn = (r: ChatResult): Message =>
  Message.fromPartial({ role: Role.ROLE_ASSISTANT, content: r.text, toolCalls: r.toolCalls, thinking: r.thinking });

/** One string is `content`; anything else is ordered parts (a string among them is a text part). */
export type Content = string | Part;

function withContent(role: Role, content: Content[], fields: Partial<Message> = {}): Message {
  if (content.length === 1 && typeof content[0] === "string") {
    return Message.fromPartial({ ...fields, role, content: content[0] });
  }
  const parts = content.map((c) => (typeof c === "string" ? Part.fromPartial({ kind: { $case: "text", value: c } }) : c));
  return Message.fromPartial({ ...fields, role, parts });
}

/** A system message: one text, or text parts. */
export const system = (...content: Content[]): Message => withContent(Role.ROLE_SYSTEM, content);
/** A user message: one text, or parts (`user("Describe this", image(data, "image/png"))`). */
export const user = (...content: Content[]): Message => withContent(Role.ROLE_USER, content);
export const assistant = (text: string, toolCalls: ToolCall[] = []): Message =>
  Message.fromPartial({ role: Role.ROLE_ASSISTANT, content: text, toolCalls });
/** A tool's answer to the call `toolCallId`: text or parts (images and documents: Anthropic only); `isError` when
 * the tool failed and the content says how. */
export const toolResult = (toolCallId: string, content: Content | Content[], isError = false): Message =>
  withContent(Role.ROLE_TOOL, Array.isArray(content) ? content : [content], { toolCallId, isError });

/** A content part as OpenAI's Chat Completions API writes it (an image by http(s) or data: URL, a file as inline
 * `file_data`), or a feather.v1 Part (`image(...)`, `pdf(...)`). */
export type OpenAIContentPart =
  | { type: "text"; text: string }
  | { type: "image_url"; image_url: string | { url: string; detail?: "auto" | "low" | "high" } }
  | { type: "input_audio"; input_audio: { data: string; format: "wav" | "mp3" } }
  | { type: "file"; file: { file_data?: string; filename?: string; file_id?: string } }
  | Part;

/** A message as OpenAI's Chat Completions API writes it: `{ role: "user", content: "..." }`. */
export interface OpenAIMessage {
  role: "system" | "developer" | "user" | "assistant" | "tool";
  content?: string | OpenAIContentPart[] | null;
  name?: string;
  tool_call_id?: string;
  tool_calls?: { id: string; type?: "function"; function: { name: string; arguments: string | object } }[];
}

/** A feather.v1 Message, or one written as for OpenAI. */
export type MessageLike = Message | OpenAIMessage;

const ROLES: Record<string, Role> = {
  system: Role.ROLE_SYSTEM,
  developer: Role.ROLE_SYSTEM, // OpenAI's newer name for the system turn
  user: Role.ROLE_USER,
  assistant: Role.ROLE_ASSISTANT,
  tool: Role.ROLE_TOOL,
};

/** A Message from itself or from an OpenAI-style object; a malformed one is a TypeError naming the field. */
export function toMessage(m: MessageLike, where = "message"): Message {
  if (typeof m.role === "number") return m as Message;
  const o = m as OpenAIMessage;
  const role = ROLES[String(o.role).toLowerCase()];
  if (role === undefined) {
    throw new TypeError(`${where}.role: ${JSON.stringify(o.role)} is not one of ${Object.keys(ROLES).join(", ")}`);
  }
  if (o.content != null && typeof o.content !== "string" && !Array.isArray(o.content)) {
    throw new TypeError(`${where}.content: must be a string or an array of parts`);
  }
  const parts = Array.isArray(o.content) ? o.content.map((p, i) => toPart(p, `${where}.content[${i}]`)) : [];
  const toolCalls = (o.tool_calls ?? []).map((c, i) => {
    if (typeof c?.function?.name !== "string") {
      throw new TypeError(`${where}.tool_calls[${i}].function.name: a tool call is { id, type: "function", function: { name, arguments } }`);
    }
    const args = c.function.arguments;
    return ToolCall.fromPartial({ id: c.id, name: c.function.name, arguments: typeof args === "string" ? args : JSON.stringify(args) });
  });
  const content = typeof o.content === "string" ? o.content : "";
  return Message.fromPartial({ role, content, parts, name: o.name ?? "", toolCallId: o.tool_call_id ?? "", toolCalls });
}

const DETAILS: Record<string, ImageDetail> = {
  auto: ImageDetail.IMAGE_DETAIL_AUTO,
  low: ImageDetail.IMAGE_DETAIL_LOW,
  high: ImageDetail.IMAGE_DETAIL_HIGH,
};
const PART_TYPES = ["text", "image_url", "input_audio", "file"];

function base64Bytes(value: unknown, where: string): Buffer {
  if (typeof value !== "string" || !/^[A-Za-z0-9+/]*={0,2}$/.test(value) || value.length % 4 !== 0) {
    throw new TypeError(`${where}: not valid base64`);
  }
  return Buffer.from(value, "base64");
}

/** `data:<media type>;base64,<data>` as its media type and bytes. */
function dataUrl(url: string, where: string): { mediaType: string; data: Buffer } {
  const comma = url.indexOf(",");
  const header = comma < 0 ? "" : url.slice(0, comma);
  if (!header.endsWith(";base64")) throw new TypeError(`${where}: a data URL must be data:<media type>;base64,<data>`);
  return { mediaType: header.slice("data:".length, -";base64".length), data: base64Bytes(url.slice(comma + 1), where) };
}

function str(value: unknown, where: string): string {
  if (value != null && typeof value !== "string") throw new TypeError(`${where}: must be a string`);
  return typeof value === "string" ? value : "";
}

function object(value: unknown, where: string): Record<string, unknown> {
  if (value === null || typeof value !== "object" || Array.isArray(value)) throw new TypeError(`${where}: must be an object`);
  return value as Record<string, unknown>;
}

/** A Part from itself, a string, or one of OpenAI's content parts; a malformed one is a TypeError naming the field. */
function toPart(p: OpenAIContentPart | string, where: string): Part {
  if (typeof p === "string") return Part.fromPartial({ kind: { $case: "text", value: p } });
  const o = object(p, where);
  if (!("type" in o) && "kind" in o) return p as Part;
  switch (o.type) {
    case "text":
      return Part.fromPartial({ kind: { $case: "text", value: str(o.text, `${where}.text`) } });
    case "image_url": {
      const image: Record<string, unknown> =
        typeof o.image_url === "string" ? { url: o.image_url } : object(o.image_url, `${where}.image_url`);
      const url = str(image.url, `${where}.image_url.url`);
      const detail = str(image.detail, `${where}.image_url.detail`);
      if (detail && DETAILS[detail] === undefined) {
        throw new TypeError(`${where}.image_url.detail: ${JSON.stringify(detail)} is not one of ${Object.keys(DETAILS).join(", ")}`);
      }
      const level = detail ? DETAILS[detail] : ImageDetail.IMAGE_DETAIL_UNSPECIFIED;
      if (url.startsWith("data:")) {
        const { mediaType, data } = dataUrl(url, `${where}.image_url.url`);
        return Part.fromPartial({ kind: { $case: "image", value: { source: { $case: "data", value: data }, mediaType, detail: level } } });
      }
      return Part.fromPartial({ kind: { $case: "image", value: { source: { $case: "url", value: url }, detail: level } } });
    }
    case "input_audio": {
      const audio = object(o.input_audio, `${where}.input_audio`);
      const data = base64Bytes(audio.data, `${where}.input_audio.data`);
      return Part.fromPartial({ kind: { $case: "audio", value: { data, format: str(audio.format, `${where}.input_audio.format`) } } });
    }
    case "file": {
      const file = object(o.file, `${where}.file`);
      if (file.file_id != null) {
        throw new TypeError(`${where}.file.file_id: uploaded files are not supported; send file_data (a data: URL)`);
      }
      const fileData = str(file.file_data, `${where}.file.file_data`);
      const { mediaType, data } = fileData.startsWith("data:")
        ? dataUrl(fileData, `${where}.file.file_data`)
        : { mediaType: "application/pdf", data: base64Bytes(fileData, `${where}.file.file_data`) };
      const title = str(file.filename, `${where}.file.filename`);
      return Part.fromPartial({ kind: { $case: "document", value: { source: { $case: "data", value: data }, mediaType, title } } });
    }
    default:
      throw new TypeError(`${where}.type: ${JSON.stringify(o.type)} is not one of ${PART_TYPES.join(", ")}`);
  }
}

/** Exact, without floating point: `$0.000001234`, `$1.50`, `$0.00`. */
export function formatUsd(nanos: bigint): string {
  const sign = nanos < 0n ? "-" : "";
  const abs = nanos < 0n ? -nanos : nanos;
  const fraction = (abs % 1_000_000_000n).toString().padStart(9, "0").replace(/0+$/, "").padEnd(2, "0");
  return `${sign}$${abs / 1_000_000_000n}.${fraction}`;
}

export function finishReason(value: PbFinishReason): FinishReason {
  const name = PbFinishReason[value] ?? "FINISH_REASON_UNSPECIFIED";
  return name.replace(/^FINISH_REASON_/, "").toLowerCase() as FinishReason;
}

export function tokenUsage(u: PbTokenUsage | undefined): TokenUsage {
  return {
    inputTokens: Number(u?.inputTokens ?? 0n),
    outputTokens: Number(u?.outputTokens ?? 0n),
    cachedInputTokens: Number(u?.cachedInputTokens ?? 0n),
    cacheWriteTokens: Number(u?.cacheWriteTokens ?? 0n),
    reasoningTokens: Number(u?.reasoningTokens ?? 0n),
    webSearchRequests: Number(u?.webSearchRequests ?? 0n),
  };
}

export function chatResult(reply: ChatResponse): ChatResult {
  return {
    text: reply.message?.content ?? "",
    finishReason: finishReason(reply.finishReason),
    provider: reply.provider,
    model: reply.model,
    usage: tokenUsage(reply.usage),
    costNanosUsd: reply.costNanosUsd,
    latencyMs: Number(reply.latencyMs),
    requestId: reply.requestId,
    toolCalls: reply.message?.toolCalls ?? [],
    cached: reply.cached,
    unpriced: reply.unpriced,
    usageEstimated: reply.usageEstimated,
    timeToFirstTokenMs: undefined,
    attempts: reply.attempts,
    thinking: reply.message?.thinking ?? [],
    upstream: reply.upstream,
  };
}

/** Folds stream events into text deltas and, at `end`, a ChatResult. */
export class StreamAssembler {
  start: StreamStart | undefined;
  end: StreamEnd | undefined;
  readonly text: string[] = [];
  private readonly toolCalls = new Map<number, ToolCall>();
  private readonly thinking = new Map<number, ThinkingBlock>();

  /** The text to hand to the caller, if the event carries any. */
  feed(event: StreamChatResponse): string | undefined {
    const e = event.event;
    if (e?.$case === "start") this.start = e.value;
    else if (e?.$case === "end") this.end = e.value;
    else if (e?.$case === "delta") {
      for (const f of e.value.toolCalls) {
        const call = this.toolCalls.get(f.index) ?? { id: "", name: "", arguments: "" };
        call.id ||= f.id;
        call.name ||= f.name;
        call.arguments += f.arguments;
        this.toolCalls.set(f.index, call);
      }
      for (const t of e.value.thinking) {
        const block = this.thinking.get(t.index) ?? { text: "", signature: "", redactedData: "" };
        block.text += t.text;
        block.signature += t.signature;
        block.redactedData += t.redactedData;
        this.thinking.set(t.index, block);
      }
      if (e.value.content) {
        this.text.push(e.value.content);
        return e.value.content;
      }
    }
    return undefined;
  }

  result(): ChatResult {
    const end = this.end;
    if (!end) throw new Error("the stream has not ended: iterate it to the end first");
    return {
      text: this.text.join(""),
      finishReason: finishReason(end.finishReason),
      provider: this.start?.provider ?? "",
      model: this.start?.model ?? "",
      usage: tokenUsage(end.usage),
      costNanosUsd: end.costNanosUsd,
      latencyMs: Number(end.latencyMs),
      requestId: this.start?.requestId ?? "",
      toolCalls: [...this.toolCalls.entries()].sort(([a], [b]) => a - b).map(([, c]) => c),
      cached: end.cached,
      unpriced: end.unpriced,
      usageEstimated: end.usageEstimated,
      timeToFirstTokenMs: Number(end.timeToFirstTokenMs),
      attempts: end.attempts,
      thinking: [...this.thinking.entries()].sort(([a], [b]) => a - b).map(([, t]) => t),
      upstream: end.upstream,
    };
  }
}
