// The gateway the tests talk to: $FEATHER_ADDR when set, otherwise a `feather-grpc serve` started here. A test that
// needs a gateway of its own (a config file, TLS) always gets one started here.
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { Client, credentials } from "@grpc/grpc-js";
import type { ChannelCredentials } from "@grpc/grpc-js";

const REPO = resolve(__dirname, "..", "..", "..", "..");
const SERVING = Buffer.from([0x08, 0x01]); // grpc.health.v1.HealthCheckResponse{status: SERVING}

export interface GatewayOptions {
  /** Passed as `serve --config`; $FEATHER_ADDR is then ignored, since the test needs this very gateway. */
  config?: string;
  /** How the health check connects to a gateway serving TLS (PEM): the CA to trust, and for mutual TLS the
   * client certificate and its key. */
  tls?: { rootCerts: Buffer; certChain?: Buffer; privateKey?: Buffer };
}

export interface Gateway {
  address: string;
  /** True when the tests started this gateway (so they know its ledger started empty and only mock serves). */
  own: boolean;
  stop(): Promise<void>;
}

function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address() as { port: number };
      server.close(() => ok(port));
    });
  });
}

function healthCheck(address: string, creds: ChannelCredentials): Promise<boolean> {
  const client = new Client(address, creds);
  return new Promise((ok) => {
    client.makeUnaryRequest(
      "/grpc.health.v1.Health/Check",
      (b: Buffer) => b,
      (b: Buffer) => b,
      Buffer.alloc(0),
      { deadline: Date.now() + 1000 },
      (error, reply) => {
        client.close();
        ok(!error && reply !== undefined && reply.equals(SERVING));
      },
    );
  });
}

export async function startGateway(options: GatewayOptions = {}): Promise<Gateway> {
  if (process.env.FEATHER_ADDR && options.config === undefined && options.tls === undefined) {
    return { address: process.env.FEATHER_ADDR, own: false, stop: async () => {} };
  }
  const port = await freePort();
  const cwd = mkdtempSync(join(tmpdir(), "feather-ts-"));
  const env = { ...process.env };
  for (const k of ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "FEATHER_CONFIG", "PORT"]) delete env[k];
  const bin = process.env.FEATHER_GRPC_BIN ?? join(REPO, ".venv", "bin", "feather-grpc");
  const args = ["serve", "--port", String(port), ...(options.config === undefined ? [] : ["--config", options.config])];
  const child = spawn(bin, args, { cwd, env, stdio: ["ignore", "ignore", "pipe"] });
  let log = "";
  child.stderr.on("data", (chunk: Buffer) => (log += chunk.toString()));
  let ended = false;
  const exited = new Promise<number | null>((ok) => {
    child.once("exit", (code) => ok(code));
    child.once("error", (e) => {
      log += `${e}\n`; // e.g. no such binary: the start fails with this in its log instead of crashing the run
      ok(null);
    });
  }).finally(() => (ended = true));
  const address = `127.0.0.1:${port}`;
  const tls = options.tls;
  const creds = tls
    ? credentials.createSsl(tls.rootCerts, tls.privateKey ?? null, tls.certChain ?? null)
    : credentials.createInsecure();
  const deadline = Date.now() + 30_000;
  while (!(await healthCheck(address, creds))) {
    if (ended || Date.now() > deadline) {
      child.kill("SIGKILL");
      await exited;
      rmSync(cwd, { recursive: true, force: true });
      throw new Error(`feather-grpc serve did not become healthy:\n${log}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    address,
    own: true,
    async stop() {
      child.kill("SIGTERM");
      const code = await exited;
      rmSync(cwd, { recursive: true, force: true });
      if (code !== 0) throw new Error(`feather-grpc serve exited with ${code} on SIGTERM:\n${log}`);
    },
  };
}
