// The TypeScript client against a live gateway ($FEATHER_ADDR or one started here) and scripted servers.
import assert from "node:assert/strict";
import { getEventListeners } from "node:events";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { Metadata, Server, ServerCredentials, status } from "@grpc/grpc-js";
import type { sendUnaryData, ServerUnaryCall, ServerWritableStream } from "@grpc/grpc-js";
import { assistantTurn, audio, cached, FeatherClient, reasoning, FeatherError, formatUsd, image, imageUrl, pb, pdf, pdfUrl, system, target, text, toMessage, toolResult, user } from "../src";
import type { OpenAIContentPart, OpenAIMessage, TokenUsage } from "../src";
import { Any } from "../src/gen/google/protobuf/any";
import { ErrorInfo, QuotaFailure, RetryInfo } from "../src/gen/google/rpc/error_details";
import { Status } from "../src/gen/google/rpc/status";
import { startGateway } from "./gateway";
import type { Gateway } from "./gateway";

async function price(client: FeatherClient, model: string): Promise<pb.ModelPrice> {
  const info = (await client.listModels()).find((m) => m.name === model);
  assert.ok(info?.price, `${model} is priced`);
  return info.price;
}

/** The cost is tokens x price per million, rounded once to a whole nano-dollar. */
function assertPriced(cost: bigint, usage: TokenUsage, p: pb.ModelPrice): void {
  const exact = BigInt(usage.inputTokens) * p.inputNanosUsdPerMillion + BigInt(usage.outputTokens) * p.outputNanosUsdPerMillion;
  const diff = cost * 1_000_000n - exact;
  assert.ok(cost > 0n && diff < 1_000_000n && diff > -1_000_000n, `cost ${cost} for ${exact} / 1e6`);
}

describe("against a live gateway", () => {
  let gateway: Gateway;
  let client: FeatherClient;
  before(async () => {
    gateway = await startGateway();
    client = new FeatherClient(gateway.address);
  });
  after(async () => {
    client?.close();
    await gateway?.stop();
  });

  test("chat returns the text, the route, usage and an exact cost", async () => {
    const reply = await client.chat([system("Be brief."), user("Say hello")], {
      model: "fast",
      tags: { team: "docs" },
      requestId: "ts-req-1",
    });
    assert.equal(reply.text, "Feather mock reply to: Say hello");
    assert.equal(reply.provider, "mock");
    assert.equal(reply.model, "mock-fast");
    assert.equal(reply.finishReason, "stop");
    assert.equal(reply.requestId, "ts-req-1");
    assert.ok(reply.usage.inputTokens > 0 && reply.usage.outputTokens > 0);
    assertPriced(reply.costNanosUsd, reply.usage, await price(client, "mock-fast"));
  });

  test("messages may be written as for OpenAI, lowercase roles and all", async () => {
    const reply = await client.chat(
      [
        { role: "system", content: "Be brief." },
        { role: "user", content: "Say hello" },
      ],
      { model: "fast" },
    );
    assert.equal(reply.text, "Feather mock reply to: Say hello");
  });

  test("streamChat yields deltas, then exposes usage and cost", async () => {
    const stream = client.streamChat("Stream a short answer", { model: "smart" });
    assert.throws(() => stream.usage, /not ended/);
    const pieces: string[] = [];
    for await (const piece of stream) pieces.push(piece);
    assert.ok(pieces.length > 1);
    assert.equal(pieces.join(""), "Feather mock reply to: Stream a short answer");
    assert.equal(stream.text, stream.result.text);
    assert.equal(stream.model, "mock-smart");
    assert.equal(stream.finishReason, "stop");
    assert.ok(stream.done && stream.usage.outputTokens > 0);
    assertPriced(stream.costNanosUsd, stream.usage, await price(client, "mock-smart"));
    assert.equal(stream.requestId.length, 32);
    // a UUIDv7, as the gateway makes them: the time first, so the ledger's index takes it at its end
    assert.match(stream.requestId, /^[0-9a-f]{12}7[0-9a-f]{3}[89ab][0-9a-f]{15}$/);
    assert.ok(Math.abs(parseInt(stream.requestId.slice(0, 12), 16) - Date.now()) < 60_000);
  });

  test("usage groups the ledger; listModels describes the routes", async () => {
    const reply = await client.chat("count me", { model: "fast" });
    const report = await client.usage({ groupBy: ["model"] });
    const fast = report.rows.find((r) => r.model === "mock-fast");
    assert.ok(fast && fast.costNanosUsd >= reply.costNanosUsd);
    assert.equal(report.total?.costNanosUsd, report.rows.reduce((sum, r) => sum + r.costNanosUsd, 0n));
    const models = await client.listModels();
    const mockFast = models.find((m) => m.name === "mock-fast");
    assert.ok(mockFast?.aliases.includes("fast"));
    assert.ok(mockFast?.price && mockFast.price.inputNanosUsdPerMillion > 0n);
    assert.equal(mockFast?.circuitState, pb.CircuitState.CIRCUIT_STATE_CLOSED);
  });

  test("usage pages: pageSize and pageToken in, nextPageToken out, empty on the last page", async () => {
    await client.chat("page one", { model: "fast" });
    await client.chat("page two", { model: "smart" });
    const whole = await client.usage({ groupBy: ["model"] });
    assert.ok(whole.rows.length >= 2 && whole.nextPageToken === "");
    const first = await client.usage({ groupBy: ["model"], pageSize: 1 });
    const pages = [first];
    while (pages[pages.length - 1].nextPageToken) {
      const pageToken = pages[pages.length - 1].nextPageToken;
      pages.push(await client.usage({ groupBy: ["model"], pageSize: 1, pageToken }));
    }
    assert.ok(pages.every((p) => p.rows.length === 1));
    assert.deepEqual(
      pages.map((p) => p.rows[0].model),
      whole.rows.map((r) => r.model),
    );
    assert.ok(pages.every((p) => p.total?.requestCount === whole.total?.requestCount));
    await assert.rejects(client.usage({ groupBy: ["provider"], pageToken: first.nextPageToken }), (e: FeatherError) => {
      assert.equal(e.code, status.INVALID_ARGUMENT);
      assert.deepEqual(
        e.fieldViolations.map((v) => v.field),
        ["page_token"],
      );
      return true;
    });
  });

  test("INVALID_ARGUMENT carries the reason and the field violations", async () => {
    const bad = pb.Message.fromPartial({ role: pb.Role.ROLE_USER });
    const error = await client.chat([bad], { model: "fast", temperature: 7, requestId: "ts-bad" }).then(
      () => assert.fail("expected an error"),
      (e: unknown) => e,
    );
    assert.ok(error instanceof FeatherError);
    assert.equal(error.code, status.INVALID_ARGUMENT);
    assert.equal(error.codeName, "INVALID_ARGUMENT");
    assert.equal(error.reason, "INVALID_REQUEST");
    assert.equal(error.domain, "feather.v1");
    assert.equal(error.requestId, "ts-bad");
    assert.deepEqual(
      error.fieldViolations.map((v) => v.field),
      ["messages[0].content", "temperature"],
    );
    assert.match(error.message, /^INVALID_ARGUMENT INVALID_REQUEST: /);
  });

  test("NOT_FOUND carries MODEL_NOT_FOUND, from chat and from a stream", async () => {
    await assert.rejects(client.chat("hi", { model: "no-such-model" }), (e: FeatherError) => {
      assert.equal(e.code, status.NOT_FOUND);
      assert.equal(e.reason, "MODEL_NOT_FOUND");
      assert.equal(e.metadata.model, "no-such-model");
      return true;
    });
    const stream = client.streamChat("hi", { model: "no-such-model" });
    await assert.rejects(
      (async () => {
        for await (const _ of stream) void _;
      })(),
      (e: FeatherError) => e instanceof FeatherError && e.reason === "MODEL_NOT_FOUND",
    );
  });
});

// --- A scripted FeatherService: each Chat pops the next outcome; records what it saw. ---

type Outcome = { code: status; reason: string; details?: Any[] };

class Scripted {
  readonly server = new Server();
  calls: { request: pb.ChatRequest; metadata: Metadata; deadline: number }[] = [];
  streamEvents: pb.StreamChatResponse[] = [];
  streamCalls = 0;
  address = "";

  constructor(public script: Outcome[] = []) {
    this.server.addService(pb.FeatherServiceService, {
      chat: (call: ServerUnaryCall<pb.ChatRequest, pb.ChatResponse>, callback: sendUnaryData<pb.ChatResponse>) => {
        const deadline = call.getDeadline();
        this.calls.push({ request: call.request, metadata: call.metadata, deadline: Number(deadline) - Date.now() });
        const outcome = this.script.shift();
        if (outcome) return callback(statusError(outcome));
        callback(
          null,
          pb.ChatResponse.fromPartial({
            message: { role: pb.Role.ROLE_ASSISTANT, content: "scripted" },
            finishReason: pb.FinishReason.FINISH_REASON_STOP,
            provider: "script",
            requestId: call.request.requestId,
          }),
        );
      },
      streamChat: (call: ServerWritableStream<pb.StreamChatRequest, pb.StreamChatResponse>) => {
        this.streamCalls++;
        for (const event of this.streamEvents) call.write(event);
        call.end();
      },
      usage: () => {},
      listModels: () => {},
    });
  }

  async start(): Promise<this> {
    const port = await new Promise<number>((ok, fail) =>
      this.server.bindAsync("127.0.0.1:0", ServerCredentials.createInsecure(), (e, p) => (e ? fail(e) : ok(p))),
    );
    this.address = `127.0.0.1:${port}`;
    return this;
  }

  stop(): void {
    this.server.forceShutdown();
  }
}

function pack(typeName: string, value: Uint8Array): Any {
  return { typeUrl: `type.googleapis.com/${typeName}`, value: Buffer.from(value) };
}

function statusError({ code, reason, details = [] }: Outcome) {
  const info = pack("google.rpc.ErrorInfo", ErrorInfo.encode({ reason, domain: "feather.v1", metadata: {} }).finish());
  const rich = Status.encode({ code, message: reason.toLowerCase(), details: [info, ...details] }).finish();
  const metadata = new Metadata();
  metadata.set("grpc-status-details-bin", Buffer.from(rich));
  return { code, details: reason.toLowerCase(), metadata };
}

describe("a gateway whose upstream refuses connections", () => {
  test("the client does not retry an UPSTREAM_UNAVAILABLE the gateway already retried", async () => {
    const dir = mkdtempSync(join(tmpdir(), "feather-ts-refused-"));
    const closed = createServer();
    await new Promise<void>((ok) => closed.listen(0, "127.0.0.1", ok));
    const { port } = closed.address() as { port: number };
    await new Promise<void>((ok) => closed.close(() => ok())); // nothing listens there now: refused
    const config = {
      ledger: { type: "memory" },
      providers: {
        local: { type: "openai-compatible", baseUrl: `http://127.0.0.1:${port}/v1`, models: [{ name: "m", inputPer1M: 1, outputPer1M: 1 }] },
      },
      retry: { maxAttempts: 2, baseMs: 1, maxMs: 2 },
      // Two failures per call: a client retry (grpc-js would make 3 attempts) would open the circuit.
      circuitBreaker: { enabled: true, failureThreshold: 3, windowMs: 60000, resetTimeoutMs: 60000 },
    };
    writeFileSync(join(dir, "feather.config.json"), JSON.stringify(config));
    const gateway = await startGateway({ config: join(dir, "feather.config.json") });
    const client = new FeatherClient(gateway.address);
    try {
      await assert.rejects(client.chat("hi", { model: "m" }), (e: unknown) => {
        assert.ok(e instanceof FeatherError);
        assert.equal(e.reason, "UPSTREAM_UNAVAILABLE");
        assert.equal(e.metadata.lastFailureReason, "UPSTREAM_CONNECT_ERROR");
        assert.doesNotMatch(e.message, /circuit open/);
        return true;
      });
    } finally {
      client.close();
      await gateway.stop();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});

describe("OpenAI-style messages", () => {
  test("tool calls and tool results in OpenAI's shape become feather.v1 messages", () => {
    const call = { id: "call_1", type: "function" as const, function: { name: "weather", arguments: { city: "Paris" } } };
    const assistant = toMessage({ role: "assistant", content: null, tool_calls: [call] });
    assert.equal(assistant.role, pb.Role.ROLE_ASSISTANT);
    assert.equal(assistant.content, "");
    assert.deepEqual(
      assistant.toolCalls.map((c) => [c.id, c.name, c.arguments]),
      [["call_1", "weather", '{"city":"Paris"}']],
    );
    const result = toMessage({ role: "tool", tool_call_id: "call_1", content: "18C" });
    assert.deepEqual([result.role, result.toolCallId, result.content], [pb.Role.ROLE_TOOL, "call_1", "18C"]);
    assert.equal(toMessage({ role: "developer", content: "x" }).role, pb.Role.ROLE_SYSTEM);
    assert.equal(toMessage(user("as is")).content, "as is");
  });

  test("content part lists in OpenAI's shape are sent as feather.v1 parts", async () => {
    const png = Buffer.from([0x89, 0x50, 0x4e, 0x47]);
    const pdfBytes = Buffer.from("%PDF-1.7");
    const content: OpenAIContentPart[] = [
      { type: "text", text: "What is in these?" },
      { type: "image_url", image_url: { url: "https://x/cat.jpg", detail: "high" } },
      { type: "image_url", image_url: { url: `data:image/png;base64,${png.toString("base64")}` } },
      { type: "file", file: { filename: "a.pdf", file_data: `data:application/pdf;base64,${pdfBytes.toString("base64")}` } },
      { type: "input_audio", input_audio: { data: png.toString("base64"), format: "wav" } },
      pdf(pdfBytes, "b.pdf"),
    ];
    const server = await new Scripted().start();
    const client = new FeatherClient(server.address);
    try {
      await client.chat([{ role: "user", content }], { model: "m" });
    } finally {
      client.close();
      server.stop();
    }
    const [sent] = server.calls[0].request.messages;
    assert.equal(sent.content, "");
    const expected = [
      text("What is in these?"),
      imageUrl("https://x/cat.jpg", "high"),
      image(png, "image/png"),
      pdf(pdfBytes, "a.pdf"),
      audio(png, "wav"),
      pdf(pdfBytes, "b.pdf"),
    ];
    assert.deepEqual(sent.parts.map((p) => pb.Part.toJSON(p)), expected.map((p) => pb.Part.toJSON(p)));
  });

  test("a malformed OpenAI-style part is a TypeError naming its field", () => {
    const cases: [unknown, string][] = [
      [{ type: "image_url", image_url: { url: "data:image/png,abc" } }, "messages[0].content[0].image_url.url: a data URL must be"],
      [{ type: "image_url", image_url: { url: "https://x/a.png", detail: "max" } }, 'content[0].image_url.detail: "max" is not one of'],
      [{ type: "input_audio", input_audio: { data: "@@@@", format: "wav" } }, "content[0].input_audio.data: not valid base64"],
      [{ type: "file", file: { file_id: "file-abc" } }, "content[0].file.file_id: uploaded files are not supported"],
      [{ type: "refusal", refusal: "no" }, 'content[0].type: "refusal" is not one of text, image_url, input_audio, file'],
    ];
    for (const [part, message] of cases) {
      assert.throws(() => toMessage({ role: "user", content: [part] } as OpenAIMessage, "messages[0]"), (e: unknown) => {
        assert.ok(e instanceof TypeError);
        assert.ok(e.message.includes(message), `${e.message} should include ${message}`);
        return true;
      });
    }
  });

  test("a malformed message is a TypeError naming its field, before any call", async () => {
    const client = new FeatherClient("127.0.0.1:1");
    try {
      const bad = [user("ok"), { role: "usr", content: "hi" }] as unknown as pb.Message[];
      await assert.rejects(client.chat(bad, { model: "m" }), {
        name: "TypeError",
        message: 'messages[1].role: "usr" is not one of system, developer, user, assistant, tool',
      });
    } finally {
      client.close();
    }
  });
});

describe("against scripted servers", () => {
  test("UNAVAILABLE is retried by the service config, with the same request id", async () => {
    const server = await new Scripted([{ code: status.UNAVAILABLE, reason: "UPSTREAM_UNAVAILABLE" }]).start();
    const client = new FeatherClient(server.address);
    try {
      const reply = await client.chat("hi", { model: "m" });
      assert.equal(reply.text, "scripted");
      assert.equal(server.calls.length, 2);
      assert.equal(server.calls[0].request.requestId, server.calls[1].request.requestId);
    } finally {
      client.close();
      server.stop();
    }
  });

  test("with retry: null, UNAVAILABLE is the caller's", async () => {
    const server = await new Scripted([{ code: status.UNAVAILABLE, reason: "UPSTREAM_UNAVAILABLE" }]).start();
    const client = new FeatherClient(server.address, { retry: null });
    try {
      await assert.rejects(client.chat("hi", { model: "m" }), (e: FeatherError) => e.code === status.UNAVAILABLE);
      assert.equal(server.calls.length, 1);
    } finally {
      client.close();
      server.stop();
    }
  });

  test("RESOURCE_EXHAUSTED is not retried and carries RetryInfo and QuotaFailure", async () => {
    const retry = pack("google.rpc.RetryInfo", RetryInfo.encode({ retryDelay: { seconds: 1n, nanos: 500_000_000 } }).finish());
    const quota = pack(
      "google.rpc.QuotaFailure",
      QuotaFailure.encode(
        QuotaFailure.fromPartial({ violations: [{ subject: "tenant:default", description: "10 rps" }] }),
      ).finish(),
    );
    const server = await new Scripted([
      { code: status.RESOURCE_EXHAUSTED, reason: "RATE_LIMITED", details: [retry, quota] },
    ]).start();
    const client = new FeatherClient(server.address);
    try {
      const error = await client.chat("hi", { model: "m" }).catch((e: FeatherError) => e);
      assert.ok(error instanceof FeatherError);
      assert.equal(error.reason, "RATE_LIMITED");
      assert.equal(error.retryDelayMs, 1500);
      assert.deepEqual(error.quotaViolations, [{ subject: "tenant:default", description: "10 rps" }]);
      assert.equal(server.calls.length, 1);
    } finally {
      client.close();
      server.stop();
    }
  });

  test("the API key and the deadline reach the server", async () => {
    const server = await new Scripted().start();
    const client = new FeatherClient(server.address, { apiKey: "fk_secret", timeoutMs: 30_000 });
    try {
      await client.chat("hi", { model: "m", metadata: { "x-trace": "t1" } });
      await client.chat("hi", { model: "m", timeoutMs: 5000 });
      const [first, second] = server.calls;
      assert.deepEqual(first.metadata.get("authorization"), ["Bearer fk_secret"]);
      assert.deepEqual(first.metadata.get("x-trace"), ["t1"]);
      assert.ok(first.deadline > 25_000 && first.deadline < 31_000, `deadline ${first.deadline}`);
      assert.ok(second.deadline < 6000, `deadline ${second.deadline}`);
    } finally {
      client.close();
      server.stop();
    }
  });

  test("calls are balanced round robin across several gateways", async () => {
    const one = await new Scripted().start();
    const two = await new Scripted().start();
    const client = new FeatherClient([one.address, two.address]);
    try {
      for (let i = 0; i < 20; i++) await client.chat(`call ${i}`, { model: "m" });
      assert.equal(one.calls.length + two.calls.length, 20);
      assert.ok(Math.min(one.calls.length, two.calls.length) >= 5, `${one.calls.length}/${two.calls.length}`);
    } finally {
      client.close();
      one.stop();
      two.stop();
    }
  });

  test("a stream that closes without its end event throws", async () => {
    const server = await new Scripted().start();
    server.streamEvents = [
      pb.StreamChatResponse.fromPartial({ event: { $case: "start", value: { provider: "p", model: "m" } } }),
      pb.StreamChatResponse.fromPartial({ event: { $case: "delta", value: { content: "half" } } }),
    ];
    const client = new FeatherClient(server.address);
    try {
      const stream = client.streamChat("hi", { model: "m" });
      await assert.rejects(
        (async () => {
          for await (const _ of stream) void _;
        })(),
        /without its end event/,
      );
      assert.equal(stream.text, "half");
      assert.equal(stream.provider, "p");
    } finally {
      client.close();
      server.stop();
    }
  });
});

describe("signals and closing", () => {
  test("streamChat with an already aborted signal throws CANCELLED without calling", async () => {
    const server = await new Scripted().start();
    const client = new FeatherClient(server.address);
    try {
      const controller = new AbortController();
      controller.abort();
      const stream = client.streamChat("hi", { model: "m", signal: controller.signal });
      await assert.rejects(
        (async () => {
          for await (const _ of stream) void _;
        })(),
        (e: unknown) => e instanceof FeatherError && e.code === status.CANCELLED,
      );
      assert.equal(server.streamCalls, 0);
    } finally {
      client.close();
      server.stop();
    }
  });

  test("unary calls remove their abort listener when they settle", async () => {
    const server = await new Scripted([{ code: status.NOT_FOUND, reason: "MODEL_NOT_FOUND" }]).start();
    const client = new FeatherClient(server.address);
    const warnings: Error[] = [];
    const onWarning = (w: Error) => warnings.push(w);
    process.on("warning", onWarning);
    try {
      const controller = new AbortController();
      const signal = controller.signal;
      await assert.rejects(client.chat("hi", { model: "m", signal }), (e: FeatherError) => e.code === status.NOT_FOUND);
      for (let i = 0; i < 12; i++) await client.chat(`call ${i}`, { model: "m", signal });
      await client.listModels({ signal, timeoutMs: 50 }).catch(() => undefined); // fails (unimplemented): settles
      assert.equal(getEventListeners(signal, "abort").length, 0);
      await new Promise((r) => setImmediate(r));
      assert.deepEqual(
        warnings.filter((w) => w.name === "MaxListenersExceededWarning"),
        [],
      );
    } finally {
      process.off("warning", onWarning);
      client.close();
      server.stop();
    }
  });

  test("a closed client throws FeatherError, from unary calls and streams", async () => {
    const server = await new Scripted().start();
    const client = new FeatherClient(server.address);
    await client.chat("hi", { model: "m" });
    client.close();
    try {
      const closed = (e: unknown) =>
        e instanceof FeatherError && e.code === status.CANCELLED && /client is closed/.test(e.message);
      await assert.rejects(client.chat("hi", { model: "m" }), closed);
      await assert.rejects(client.usage(), closed);
      await assert.rejects(
        (async () => {
          for await (const _ of client.streamChat("hi", { model: "m" })) void _;
        })(),
        closed,
      );
      assert.equal(server.calls.length, 1);
      assert.equal(server.streamCalls, 0);
    } finally {
      server.stop();
    }
  });
});

test("targets for one or several gateways", () => {
  assert.equal(target("localhost:50051"), "localhost:50051");
  assert.equal(target(["127.0.0.1:1", "localhost:2"]), "ipv4:127.0.0.1:1,127.0.0.1:2");
  assert.equal(target("[::1]:1,[::1]:2"), "ipv6:[::1]:1,[::1]:2");
  assert.throws(() => target(["gw-a:1", "gw-b:2"]), /IP literals/);
});

test("costs format exactly", () => {
  assert.equal(formatUsd(0n), "$0.00");
  assert.equal(formatUsd(1_234n), "$0.000001234");
  assert.equal(formatUsd(1_500_000_000n), "$1.50");
  assert.equal(formatUsd(12_345_678_901_234_567n), "$12345678.901234567");
});

test("message helpers build content or ordered parts", () => {
  assert.deepEqual(user("hi"), pb.Message.fromPartial({ role: pb.Role.ROLE_USER, content: "hi" }));
  const png = Buffer.from([0x89, 0x50, 0x4e, 0x47]);
  const m = user("Compare", image(png, "image/png", "high"), imageUrl("https://x/c.jpg"), pdf(png, "A"), audio(png, "wav"));
  assert.equal(m.content, "");
  assert.deepEqual(
    m.parts.map((p) => p.kind?.$case),
    ["text", "image", "image", "document", "audio"],
  );
  const first = m.parts[1].kind;
  assert.ok(first?.$case === "image" && first.value.source?.$case === "data");
  assert.equal(first.value.mediaType, "image/png");
  assert.equal(first.value.detail, pb.ImageDetail.IMAGE_DETAIL_HIGH);
  const failed = toolResult("t1", "boom", true);
  assert.deepEqual([failed.content, failed.toolCallId, failed.isError], ["boom", "t1", true]);
  assert.equal(toolResult("t1", [text("see"), pdfUrl("https://x/a.pdf")]).parts.length, 2);
});

test("cached marks a breakpoint on a message, a part or a tool", () => {
  const rules = cached(system("rules"), "1h");
  assert.deepEqual([rules.content, rules.cacheBreakpoint?.ttl], ["rules", pb.CacheTtl.CACHE_TTL_ONE_HOUR]);
  assert.equal(cached(text("doc")).cacheBreakpoint?.ttl, pb.CacheTtl.CACHE_TTL_UNSPECIFIED);
  assert.equal(cached(pb.Tool.fromPartial({ name: "t" }), "5m").cacheBreakpoint?.ttl, pb.CacheTtl.CACHE_TTL_FIVE_MINUTES);
});

test("reasoning options and the assistant turn of a reply", () => {
  assert.deepEqual(reasoning("high"), pb.ReasoningOptions.fromPartial({ effort: pb.ReasoningEffort.REASONING_EFFORT_HIGH }));
  assert.equal(reasoning("", 2048).thinkingBudgetTokens, 2048);
  const thinking = [pb.ThinkingBlock.fromPartial({ text: "hmm", signature: "sig" })];
  const turn = assistantTurn({ text: "ok", toolCalls: [], thinking } as unknown as Parameters<typeof assistantTurn>[0]);
  assert.deepEqual([turn.role, turn.content, turn.thinking], [pb.Role.ROLE_ASSISTANT, "ok", thinking]);
});
