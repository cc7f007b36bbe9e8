// FeatherClient: the promise/async-iterator facade over the generated grpc-js FeatherService client.
import { randomBytes } from "node:crypto";
import { Metadata, status } from "@grpc/grpc-js";
import type { CallOptions, ChannelOptions, ClientReadableStream, ServiceError } from "@grpc/grpc-js";
import { channelCredentials, channelOptions, DEFAULT_RETRY, target } from "./channel";
import type { RetryPolicy, TlsOptions } from "./channel";
import { FeatherError } from "./errors";
import {
  CacheMode,
  ChatRequest,
  ChatResponse,
  FeatherServiceClient,
  ListModelsRequest,
  ListModelsResponse,
  ModelInfo,
  ReasoningOptions,
  ResponseFormat,
  RoutingPolicy,
  StreamChatRequest,
  StreamChatResponse,
  Tool,
  ToolChoice,
  UsageGroupBy,
  UsageRequest,
  UsageResponse,
} from "./gen/feather/v1/feather_service";
import { chatResult, StreamAssembler, toMessage, user } from "./results";
import type { ChatResult, FinishReason, MessageLike, TokenUsage } from "./results";

export const DEFAULT_TIMEOUT_MS = 120_000;

export interface ClientOptions {
  /** Sent as `authorization: Bearer <key>` with every call. */
  apiKey?: string;
  /** Default deadline of every call in milliseconds; `null` for none. Default 120 000. */
  timeoutMs?: number | null;
  /** `true` for TLS with the system roots, or custom roots / mutual TLS / a server-name override. */
  tls?: boolean | TlsOptions;
  /** Retries of UNAVAILABLE through the service config; `null` never retries. */
  retry?: RetryPolicy | null;
  /** Raw grpc-js channel options, applied last. */
  channelOptions?: ChannelOptions;
  /** Sent with every call. */
  metadata?: Record<string, string>;
}

export interface CallOpts {
  /** This call's deadline in milliseconds (default: the client's `timeoutMs`). */
  timeoutMs?: number | null;
  metadata?: Record<string, string>;
  /** Cancels the call when aborted. */
  signal?: AbortSignal;
}

export type Policy = "first" | "round_robin" | "cheapest" | "fastest" | "weighted";

export interface ChatOptions extends CallOpts {
  /** A model name, an alias (`fast`, `cheap`, `smart`) or `provider/model`. */
  model: string;
  provider?: string;
  maxTokens?: number;
  temperature?: number;
  topP?: number;
  stop?: string[];
  seed?: bigint;
  tools?: Tool[];
  toolChoice?: ToolChoice;
  responseFormat?: ResponseFormat;
  /** Reasoning effort and extended thinking: see `reasoning()`. */
  reasoning?: ReasoningOptions;
  /** With tools: whether the model may call several in one turn. */
  parallelToolCalls?: boolean;
  /** OpenAI's prompt cache routing key. */
  promptCacheKey?: string;
  /** Fields merged into the upstream request body (never the gateway's own: model, messages, max tokens...). */
  extraFields?: Record<string, unknown>;
  policy?: Policy;
  bypassCache?: boolean;
  tags?: Record<string, string>;
  /** Correlation and idempotent billing; generated when unset, so a retried call is billed once. */
  requestId?: string;
}

export type GroupBy = "tenant" | "provider" | "model" | "tag" | "hour" | "day";

export interface UsageOptions extends CallOpts {
  start?: Date;
  end?: Date;
  groupBy?: GroupBy[];
  tenant?: string;
  provider?: string;
  model?: string;
  tagKey?: string;
  tags?: Record<string, string>;
  /** Rows per page: 0 (the default) means the server's default, 1000; it lowers larger values to 2000. */
  pageSize?: number;
  /** `nextPageToken` of the previous reply to the same query, for the page after it. */
  pageToken?: string;
}

type Unary<Req, Res> = (
  request: Req,
  metadata: Metadata,
  options: Partial<CallOptions>,
  callback: (error: ServiceError | null, response: Res) => void,
) => { cancel(): void };

function chatFields(messages: string | MessageLike[], o: ChatOptions) {
  return {
    model: o.model,
    provider: o.provider ?? "",
    messages: typeof messages === "string" ? [user(messages)] : messages.map((m, i) => toMessage(m, `messages[${i}]`)),
    maxTokens: o.maxTokens,
    temperature: o.temperature,
    topP: o.topP,
    stop: o.stop ?? [],
    seed: o.seed,
    tools: o.tools ?? [],
    toolChoice: o.toolChoice,
    responseFormat: o.responseFormat,
    reasoning: o.reasoning,
    parallelToolCalls: o.parallelToolCalls,
    promptCacheKey: o.promptCacheKey ?? "",
    extraFields: o.extraFields,
    policy: o.policy ? RoutingPolicy[`ROUTING_POLICY_${o.policy.toUpperCase()}` as keyof typeof RoutingPolicy] : 0,
    cache: o.bypassCache ? CacheMode.CACHE_MODE_BYPASS : CacheMode.CACHE_MODE_UNSPECIFIED,
    tags: o.tags ?? {},
    requestId: o.requestId || newRequestId(),
  };
}

/**
 * A UUIDv7 (RFC 9562) as 32 hex digits, the form of the ids the gateway makes: Unix time in ms first,
 * then 74 random bits, so the gateway's ledger index takes a new id at its end, not at a random page.
 */
function newRequestId(): string {
  const id = randomBytes(16);
  id.writeUIntBE(Date.now(), 0, 6);
  id[6] = (id[6] & 0x0f) | 0x70; // version 7
  id[8] = (id[8] & 0x3f) | 0x80; // variant 0b10
  return id.toString("hex");
}

/**
 * Client for one Feather gateway, or several balanced round robin.
 *
 * ```ts
 * const client = new FeatherClient("localhost:50051", { apiKey });
 * const reply = await client.chat("Say hello", { model: "fast" });
 * client.close();
 * ```
 */
export class FeatherClient {
  /** The generated grpc-js client, for anything the facade does not cover. */
  readonly stub: FeatherServiceClient;
  private readonly timeoutMs: number | null;
  private readonly metadata: Record<string, string>;
  private closed = false;

  constructor(address: string | readonly string[] = "localhost:50051", options: ClientOptions = {}) {
    const tls = options.tls ?? false;
    const retry = options.retry === undefined ? DEFAULT_RETRY : options.retry;
    this.stub = new FeatherServiceClient(
      target(address),
      channelCredentials(tls),
      channelOptions(tls, retry, options.channelOptions ?? {}),
    );
    this.timeoutMs = options.timeoutMs === undefined ? DEFAULT_TIMEOUT_MS : options.timeoutMs;
    this.metadata = { ...(options.metadata ?? {}) };
    if (options.apiKey) this.metadata.authorization = `Bearer ${options.apiKey}`;
  }

  /** Closes the channel; calls made afterwards throw FeatherError (CANCELLED, "the client is closed"). */
  close(): void {
    this.closed = true;
    this.stub.close();
  }

  /** @internal throws when the client is closed (grpc-js would throw a plain Error). */
  checkOpen(): void {
    if (this.closed) throw new FeatherError(status.CANCELLED, "the client is closed");
  }

  /** @internal metadata and deadline for one call. */
  callArgs(o: CallOpts): [Metadata, Partial<CallOptions>] {
    const metadata = new Metadata();
    for (const [k, v] of Object.entries({ ...this.metadata, ...(o.metadata ?? {}) })) metadata.set(k, v);
    const timeout = o.timeoutMs === undefined ? this.timeoutMs : o.timeoutMs;
    return [metadata, timeout === null ? {} : { deadline: Date.now() + timeout }];
  }

  private unary<Req, Res>(method: Unary<Req, Res>, request: Req, o: CallOpts): Promise<Res> {
    const [metadata, options] = this.callArgs(o);
    return new Promise((resolve, reject) => {
      this.checkOpen();
      const signal = o.signal;
      if (signal?.aborted) return reject(new FeatherError(status.CANCELLED, "aborted before the call started"));
      const onAbort = () => call.cancel();
      const call = method.call(this.stub, request, metadata, options, (error, response) => {
        signal?.removeEventListener("abort", onAbort); // a long-lived signal must not collect one listener per call
        if (error) reject(FeatherError.fromServiceError(error));
        else resolve(response);
      });
      signal?.addEventListener("abort", onAbort, { once: true });
    });
  }

  /** One complete reply. `messages` is a prompt (one user message) or a conversation (see `user()` etc.). */
  async chat(messages: string | MessageLike[], options: ChatOptions): Promise<ChatResult> {
    const request = ChatRequest.fromPartial(chatFields(messages, options));
    return chatResult(await this.unary(this.stub.chat as Unary<ChatRequest, ChatResponse>, request, options));
  }

  /** The reply as it is generated: `for await (const text of stream)`, then `stream.usage`, `stream.result`... */
  streamChat(messages: string | MessageLike[], options: ChatOptions): ChatStream {
    return new ChatStream(this, StreamChatRequest.fromPartial(chatFields(messages, options)), options);
  }

  /** Ledger totals over `[start, end)`, grouped by any of tenant, provider, model, tag (with `tagKey`), hour, day.
   * Grouped rows come in pages: pass the reply's `nextPageToken` as `pageToken` until it is empty. */
  async usage(options: UsageOptions = {}): Promise<UsageResponse> {
    const groupBy = options.groupBy ?? [];
    if (groupBy.includes("tag") && !options.tagKey) throw new RangeError("groupBy 'tag' needs tagKey");
    const request = UsageRequest.fromPartial({
      startTime: options.start,
      endTime: options.end,
      groupBy: groupBy.map((g) => UsageGroupBy[`USAGE_GROUP_BY_${g.toUpperCase()}` as keyof typeof UsageGroupBy]),
      tenant: options.tenant ?? "",
      provider: options.provider ?? "",
      model: options.model ?? "",
      tagKey: options.tagKey ?? "",
      tags: options.tags ?? {},
      pageSize: options.pageSize ?? 0,
      pageToken: options.pageToken ?? "",
    });
    return this.unary(this.stub.usage as Unary<UsageRequest, UsageResponse>, request, options);
  }

  /** Routable models in configuration order, with aliases, prices and circuit state. */
  async listModels(options: CallOpts & { provider?: string } = {}): Promise<ModelInfo[]> {
    const request = ListModelsRequest.fromPartial({ provider: options.provider ?? "" });
    const reply = await this.unary(this.stub.listModels as Unary<ListModelsRequest, ListModelsResponse>, request, options);
    return reply.models;
  }
}

/**
 * An async iterable of text deltas. When it ends, the reply's summary is on the stream itself: `provider`,
 * `model`, `finishReason`, `usage`, `costNanosUsd`, `latencyMs` and the whole `result` (these throw before the
 * end; `provider` and `model` are known from the first event). A stream that closes without its `end` event
 * throws FeatherError, never ends quietly.
 */
export class ChatStream implements AsyncIterable<string> {
  private call: ClientReadableStream<StreamChatResponse> | undefined;
  private readonly events = new StreamAssembler();

  constructor(
    private readonly client: FeatherClient,
    private readonly request: StreamChatRequest,
    private readonly options: CallOpts,
  ) {}

  async *[Symbol.asyncIterator](): AsyncIterator<string> {
    if (this.call) throw new Error("a ChatStream can be iterated once");
    this.client.checkOpen();
    if (this.options.signal?.aborted) throw new FeatherError(status.CANCELLED, "aborted before the call started");
    const [metadata, callOptions] = this.client.callArgs(this.options);
    const call = (this.call = this.client.stub.streamChat(this.request, metadata, callOptions));
    const onAbort = () => call.cancel();
    this.options.signal?.addEventListener("abort", onAbort, { once: true });
    try {
      for await (const event of call as AsyncIterable<StreamChatResponse>) {
        const text = this.events.feed(event);
        if (text !== undefined) yield text;
      }
    } catch (error) {
      throw isServiceError(error) ? FeatherError.fromServiceError(error) : error;
    } finally {
      this.options.signal?.removeEventListener("abort", onAbort);
      call.cancel(); // a no-op once the call has finished; stops it when the loop broke early
    }
    if (!this.events.end) throw new FeatherError(status.UNKNOWN, "the stream closed without its end event");
  }

  /** Stops the stream (the gateway still bills what was generated). */
  cancel(): void {
    this.call?.cancel();
  }

  get done(): boolean {
    return this.events.end !== undefined;
  }
  get result(): ChatResult {
    return this.events.result();
  }
  /** The text received so far. */
  get text(): string {
    return this.events.text.join("");
  }
  get provider(): string {
    return this.events.start?.provider ?? this.result.provider;
  }
  get model(): string {
    return this.events.start?.model ?? this.result.model;
  }
  get requestId(): string {
    return this.events.start?.requestId ?? this.request.requestId;
  }
  get finishReason(): FinishReason {
    return this.result.finishReason;
  }
  get usage(): TokenUsage {
    return this.result.usage;
  }
  get costNanosUsd(): bigint {
    return this.result.costNanosUsd;
  }
  get latencyMs(): number {
    return this.result.latencyMs;
  }
}

function isServiceError(error: unknown): error is ServiceError {
  return typeof error === "object" && error !== null && "code" in error && "metadata" in error;
}
