// What the facade hands back (ChatResult, TokenUsage), message helpers and exact cost formatting.
import {
  Attempt,
  ChatResponse,
  FinishReason as PbFinishReason,
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
